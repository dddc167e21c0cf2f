"""`dad predict`: disparity maps for any images, with a student checkpoint or a configured teacher.

Inputs are files, folders (searched recursively), globs or fsspec URLs. Per image the output folder gets
`<stem>.npy` (float32 disparity at the original size, larger = nearer), `<stem>.png` (colour-mapped) and,
with `--side-by-side`, `<stem>_side.png`; repeated stems get `-2`, `-3`, …. Prediction is the evaluation
path (`student.infer`). Unreadable images are reported and skipped; an `--out` that would replace an
input is refused before anything is read or written.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import time

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import DadConfig
from pipeline.images import IMAGE_EXTS, Rejected, decode_rgb, encode
from pipeline.plots import colorize
from pipeline.storage import Root
from student.infer import processing_size, to_batch

log = logging.getLogger("dad.predict")
STAGE = "predict"
DEFAULT_MAX_PIXELS = 40_000_000
GLOB_CHARS = "*?["


def expand_inputs(inputs: list[str], extensions=IMAGE_EXTS) -> tuple[list[str], list[dict]]:
    """Images, folders, globs or URLs → (file URLs in order, [{input, reason}] for inputs that match nothing).

    Explicit files are kept whatever their extension (decoding decides); folders and globs keep only
    `extensions`. Duplicates are dropped."""
    files, problems, seen = [], [], set()
    for inp in inputs:
        fs, path = fsspec.core.url_to_fs(inp)
        keep_proto = "://" in inp
        if any(c in path for c in GLOB_CHARS):
            found = [p for p in sorted(fs.glob(path)) if not fs.isdir(p) and p.lower().endswith(extensions)]
        elif fs.isdir(path):
            found = [p for p in sorted(fs.find(path)) if p.lower().endswith(extensions)]
        elif fs.exists(path):
            found = [path]
        else:
            problems.append({"input": inp, "reason": "not found"})
            continue
        if not found:
            problems.append({"input": inp, "reason": "no image files matched"})
        for p in found:
            u = fs.unstrip_protocol(p) if keep_proto else p
            if u not in seen:
                seen.add(u)
                files.append(u)
    return files, problems


def unique_stems(urls: list[str]) -> list[str]:
    stems, used = [], set()
    for u in urls:
        base = posixpath.splitext(posixpath.basename(u.rstrip("/")))[0] or "image"
        stem, k = base, 1
        while stem in used:
            k += 1
            stem = f"{base}-{k}"
        if stem != base:
            log.warning("%s: output name %r is taken, writing %r", u, base, stem)
        used.add(stem)
        stems.append(stem)
    return stems


def output_names(stem: str, side_by_side: bool) -> list[str]:
    return [f"{stem}.npy", f"{stem}.png"] + ([f"{stem}_side.png"] if side_by_side else [])


def _identities(url: str) -> set[str]:
    """Every name under which writing `url` would replace a file: local paths with their folder's
    symlinks resolved (and the file's own target), other stores by their full URL."""
    fs, path = fsspec.core.url_to_fs(url)
    if not isinstance(fs, LocalFileSystem):
        return {fs.unstrip_protocol(path)}
    return {os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path)), os.path.realpath(path)}


def refuse_overwrites(files: list[str], stems: list[str], out: Root, side_by_side: bool) -> None:
    """Refuse, before anything is read or written, an output that would replace an input: `--out`
    pointing at the input folder would otherwise turn photos into colour maps, silently."""
    inputs = {key: f for f in files for key in _identities(f)}
    for stem in stems:
        for name in output_names(stem, side_by_side):
            hit = next((inputs[k] for k in _identities(out.uri(name)) if k in inputs), None)
            if hit is not None:
                raise ValueError(f"--out {out.url}: its {name} would overwrite the input image {hit}; "
                                 f"write the predictions to a folder that holds no input (e.g. --out {out.url}-depth)")


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def predict_batch(predict_fn, rgbs: list[np.ndarray], resolution: int, device="cpu") -> list[np.ndarray]:
    """Same-size uint8 images → float32 disparity maps at that size (one forward pass)."""
    h, w = rgbs[0].shape[:2]
    x = to_batch(rgbs, processing_size(h, w, resolution)).to(device)
    with torch.no_grad():
        pred = predict_fn(x).float()
        pred = F.interpolate(pred[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    return [p.astype(np.float32) for p in pred.cpu().numpy()]


def run(inputs: list[str], out_dir: str, checkpoint: str | None = None, teacher: str | None = None,
        cfg: DadConfig | None = None, resolution: int = 518, side_by_side: bool = False,
        batch_size: int = 4) -> dict:
    from pipeline.runtime import console, progress
    from stages.teachers.predictor import default_device, load_predictor

    t0 = time.time()
    if resolution < 14 or resolution % 14:
        raise ValueError(f"--resolution must be a positive multiple of 14, got {resolution}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    files, failures = expand_inputs(list(inputs))
    for f in failures:
        console.print(f"[yellow]skipped[/] {f['input']}: {f['reason']}")
    if not files:
        raise FileNotFoundError(f"no input images found in {list(inputs)}")
    out = Root(out_dir)
    stems = unique_stems(files)
    refuse_overwrites(files, stems, out, side_by_side)
    device = default_device()
    predict_fn, _, _ = load_predictor(checkpoint, teacher, cfg, device=device)
    max_pixels = cfg.corpus.max_pixels if cfg is not None else DEFAULT_MAX_PIXELS
    buckets: dict[tuple[int, int], list[tuple[str, str, np.ndarray]]] = {}
    written: list[str] = []

    with progress(len(files), f"predict → {out_dir}") as bar:
        task = bar.tasks[0].id

        def flush(size: tuple[int, int]) -> None:
            items = buckets.pop(size)
            preds = predict_batch(predict_fn, [rgb for _, _, rgb in items], resolution, device)
            for (src, stem, rgb), disp in zip(items, preds):
                colour = colorize(disp)
                out.write_bytes(_npy_bytes(disp), f"{stem}.npy")
                out.write_bytes(encode(colour, "png"), f"{stem}.png")
                if side_by_side:
                    out.write_bytes(encode(np.concatenate([rgb, colour], axis=1), "png"), f"{stem}_side.png")
                written.append(stem)
                bar.advance(task)

        for src, stem in zip(files, stems):
            try:
                with fsspec.open(src, "rb") as fh:
                    data = fh.read()
                rgb = decode_rgb(data, max_pixels=max_pixels)
            except (Rejected, OSError) as err:
                reason = str(err) if isinstance(err, Rejected) else f"cannot read: {type(err).__name__}: {err}"
                failures.append({"input": src, "reason": reason})
                console.print(f"[yellow]skipped[/] {src}: {reason}")
                bar.advance(task)
                continue
            size = rgb.shape[:2]
            buckets.setdefault(size, []).append((src, stem, rgb))
            if len(buckets[size]) >= batch_size:
                flush(size)
            elif sum(len(v) for v in buckets.values()) >= 4 * batch_size:  # many sizes: bound memory
                flush(max(buckets, key=lambda s: len(buckets[s])))
        for size in list(buckets):
            flush(size)

    if not written:
        raise ValueError(f"none of the {len(files)} input files could be read; see the messages above")
    return {"stage": STAGE, "out": out_dir, "written": len(written), "failed": len(failures),
            "failures": failures, "seconds": round(time.time() - t0, 2)}
