"""Data that is generated, not downloaded: rendered scenes and scikit-image's bundled photographs.

Corpus sources (in `corpus.sources`), deterministic and described entirely by the config:

    "scenes:n=256,seed=100000,size=256"   n unlabeled rendered views, seeds seed … seed+n−1
    "skimage:photos"                      the real photographs that ship inside scikit-image

Evaluation sets (in `eval.datasets`): `"scenes:n=200,seed=900000,size=256"` renders held-out
views with exact depth. Seed ranges keep training and evaluation apart: the zoo trains on seeds
below 100000, the quickstart corpus uses 100000+, held-out evaluation 900000+.

`stereo_motorcycle` is never used: it carries ground-truth disparity, so it is evaluation material.
"""

from __future__ import annotations

import io

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


def render_bytes(uris: list[str]) -> list[bytes]:
    """PNG bytes of rendered views 'scenes:seed=S,size=Z' (consecutive seeds share a scene build)."""
    from pipeline.datasets.scenes import render_views

    params = [parse_params(u.removeprefix("scenes:"), {"seed": 0, "size": 256}) for u in uris]
    by_size: dict[int, list[int]] = {}
    for p in params:
        by_size.setdefault(p["size"], []).append(p["seed"])
    rendered: dict[tuple[int, int], bytes] = {}
    for size, seeds in by_size.items():
        for view in render_views(seeds, size=size):
            rendered[(view.seed, size)] = _png(view.rgb)
    return [rendered[(p["seed"], p["size"])] for p in params]


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
    from pipeline.datasets.scenes import render_view, view_id

    seed, size = item
    v = render_view(seed, size=size)
    depth = v.depth.astype(np.float32)
    return EvalSample(view_id(seed), v.rgb, depth, "depth", depth > 0, v.kind)


def open_scenes(params: str) -> EvalDataset:
    """Held-out rendered views with exact depth (families = room / tabletop / outdoor)."""
    p = parse_params(params, {"n": 200, "seed": 900000, "size": 256})
    items = [(s, p["size"]) for s in range(p["seed"], p["seed"] + p["n"])]
    return EvalDataset(f"scenes[{p['seed']}+{p['n']}]", items, _load_view, 1e-3, 1e4)
