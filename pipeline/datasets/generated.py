"""Data that is generated, not downloaded: rendered scenes and scikit-image's bundled photographs.

Corpus sources: `"scenes:n=256,seed=100000,size=256"` (n rendered views, seeds seed … seed+n−1) and
`"skimage:photos"`. Evaluation set: `"scenes:n=200,seed=900000,size=256"`, held-out views with exact
depth. Seed ranges keep training and evaluation apart: the zoo trains below 100000, the quickstart corpus
uses 100000+, held-out evaluation 900000+. `stereo_motorcycle` (it has GT disparity) is never used.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.datasets.evalbase import EvalDataset, EvalSample

# Photographs of real things (not charts, text or micrographs) that ship with scikit-image.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "camera", "coins", "moon",
          "brick", "grass", "gravel")
EXCLUDED = {"stereo_motorcycle"}


def parse_params(text: str, defaults: dict[str, int]) -> dict[str, int]:
    """'n=256,seed=0' → {'n': 256, 'seed': 0, …defaults}; unknown keys are an error."""
    out = dict(defaults)
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, val = part.partition("=")
        if not sep or key not in defaults:
            raise ValueError(f"scenes spec: unknown or malformed {part!r} (keys: {', '.join(defaults)})")
        out[key] = int(val)
    return out


SCENE_DEFAULTS = {"n": 64, "seed": 100000, "size": 256}


def scene_uris(params: str) -> list[str]:
    p = parse_params(params, SCENE_DEFAULTS)
    return [f"scenes:seed={s},size={p['size']}" for s in range(p["seed"], p["seed"] + p["n"])]


def photo_uris() -> list[str]:
    return [f"skimage:{name}" for name in available_photos()]


def available_photos() -> list[str]:
    import skimage.data

    names = []
    for name in PHOTOS:
        if name in EXCLUDED:
            continue
        try:
            getattr(skimage.data, name)()
        except Exception:  # noqa: BLE001 - some need a download; those are simply not available offline
            continue
        names.append(name)
    return names


# -- rendered views, memoised on local disk ----------------------------------------------------
# A view is a pure function of (seed, size) and the renderer's code, and the same views are rendered
# again and again: the shard stage renders each one to hash it and again to write it, every `dad eval`
# re-renders its held-out set. The memo is keyed by a hash of the renderer's source files and the
# pybullet version, so a changed renderer never serves stale pixels. DAD_RENDER_CACHE=off disables
# it; DAD_RENDER_CACHE=DIR moves it (default ~/.cache/dad/renders).

RENDERER_MODULES = ("render", "layouts", "meshes", "props", "textures", "shading", "photometric", "bullet_args")


@functools.lru_cache(maxsize=1)
def renderer_fingerprint() -> str:
    from importlib.metadata import version

    import scenes

    h = hashlib.sha256(version("pybullet").encode())
    here = Path(scenes.__file__).parent
    for name in RENDERER_MODULES:
        h.update((here / f"{name}.py").read_bytes())
    return h.hexdigest()[:16]


def render_cache_dir() -> Path | None:
    where = os.environ.get("DAD_RENDER_CACHE", "")
    if where.lower() in ("off", "0", "no", "false"):
        return None
    base = Path(where).expanduser() if where else Path.home() / ".cache" / "dad" / "renders"
    return base / renderer_fingerprint()


def rendered(seeds: list[int], size: int) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """(rgb uint8, depth float32, kind) of views `seeds` at `size`, from the memo or rendered (and stored)."""
    from scenes.render import render_views

    folder = render_cache_dir()
    out: dict[int, tuple] = {}
    if folder is not None:
        for s in seeds:
            try:
                with np.load(folder / f"{size}-{s}.npz") as z:
                    out[s] = (z["rgb"], z["depth"], str(z["kind"]))
            except (OSError, KeyError, ValueError):  # missing or unreadable (half-written, corrupt): render
                pass
    for view in render_views([s for s in seeds if s not in out], size=size):
        out[view.seed] = (view.rgb, view.depth.astype(np.float32), view.kind)
        if folder is not None:
            _store(folder, f"{size}-{view.seed}.npz", *out[view.seed])
    return [out[s] for s in seeds]


def _store(folder: Path, name: str, rgb: np.ndarray, depth: np.ndarray, kind: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{name}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, rgb=rgb, depth=depth, kind=np.array(kind))
        os.replace(tmp, folder / name)  # atomic: readers see a whole file or none
    except OSError:  # a read-only or full disk only costs the memo, never the render
        pass


def render_bytes(uris: list[str]) -> list[bytes]:
    """PNG bytes of rendered views 'scenes:seed=S,size=Z' (consecutive seeds share a scene build)."""
    params = [parse_params(u.removeprefix("scenes:"), {"seed": 0, "size": 256}) for u in uris]
    by_size: dict[int, list[int]] = {}
    for p in params:
        by_size.setdefault(p["size"], []).append(p["seed"])
    pngs: dict[tuple[int, int], bytes] = {}
    for size, seeds in by_size.items():
        for seed, (rgb, _, _) in zip(seeds, rendered(seeds, size)):
            pngs[(seed, size)] = _png(rgb)
    return [pngs[(p["seed"], p["size"])] for p in params]


def photo_bytes(uri: str) -> bytes:
    import skimage.data

    name = uri.removeprefix("skimage:")
    if name in EXCLUDED or name not in PHOTOS:
        raise ValueError(f"{uri}: not an allowed scikit-image photograph")
    arr = getattr(skimage.data, name)()
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return _png(np.ascontiguousarray(arr[..., :3]).astype(np.uint8))


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _load_view(item: tuple[int, int]) -> EvalSample:
    from scenes.render import view_id

    seed, size = item
    [(rgb, depth, kind)] = rendered([seed], size)
    return EvalSample(view_id(seed), rgb, depth, "depth", depth > 0, kind)


def open_scenes(params: str) -> EvalDataset:
    """Held-out rendered views with exact depth (families = room / tabletop / outdoor)."""
    p = parse_params(params, {"n": 200, "seed": 900000, "size": 256})
    items = [(s, p["size"]) for s in range(p["seed"], p["seed"] + p["n"])]
    return EvalDataset(f"scenes[{p['seed']}+{p['n']}]", items, _load_view, 1e-3, 1e4)
