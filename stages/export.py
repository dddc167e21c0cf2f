"""`dad export`: a trained student as a file others can run, with a model card that says what it is.

One ONNX file for onnxruntime on any CPU, GPU or phone (or a transformers Depth Anything folder, `--format
hf`), and a card naming the teachers and their licences (the weights carry the terms of their labels),
the training data and steps, the evaluation beside the baselines, and a ready `[teachers.<name>]` section:
the student can teach the next round. An ONNX file is kept only once onnx.checker and onnxruntime agree
with torch at two batch sizes and image sizes.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import time
import warnings

import fsspec
import numpy as np
import torch

from pipeline.config import DadConfig
from pipeline.layout import eval_run
from pipeline.models import digest, is_remote
from pipeline.storage import Root, temp_file
from student.checkpoint import CHECKPOINT_NAME, resolve_checkpoint
from student.evaluation import BASELINES, safe_name

log = logging.getLogger("dad.export")
STAGE = "export"
# 17: LayerNormalization is one op from opset 17 (fused and exact in onnxruntime instead of ~8 primitive
# ops), and 17 runs nearly everywhere a student is deployed (onnxruntime >= 1.12, ORT mobile/web,
# TensorRT >= 8.6, OpenVINO); 18+ adds nothing this graph uses and narrows the runtimes that load it.
OPSET = 17
# Traced at sides that are not multiples of 14, so the trace records the student's general padding path
# (zero padding at other sizes); the checks use another batch and a multiple of 14.
TRACE_SHAPE = (2, 3, 75, 101)
CHECK_SHAPES = (TRACE_SHAPE, (1, 3, 98, 56))
TOLERANCE = 1e-3  # max |onnxruntime - torch|, relative to the largest |torch| output
DYNAMIC = {"rgb": {0: "batch", 2: "height", 3: "width"}, "disparity": {0: "batch", 1: "height", 2: "width"}}


def export_onnx(model, path: str, opset: int = OPSET) -> dict:
    """Write `model` as ONNX — `rgb` (B,3,H,W) float32 in [0, 1] → `disparity` (B,H,W) — verified, atomically."""
    try:
        import onnx
    except ImportError:
        raise ValueError("exporting ONNX needs onnx and onnxruntime: pip install 'dad-pipeline[onnx]'") from None
    model = model.float().cpu().eval()
    config = getattr(model, "config", None)
    if getattr(config, "arch", None) == "tflite" and not config.input_size:
        raise ValueError("a graph student exports to ONNX only with a fixed input size (its inner sizes are traced "
                         "as constants): train it with student.input_size = [H, W], as the quickstart does")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = temp_file(directory, suffix=".onnx")
    os.close(fd)
    try:
        # The TorchScript exporter (dynamo=False) needs no onnxscript and keeps the student's shape
        # arithmetic (pad to multiples of 14, position-embedding resampling) symbolic; torch.export would
        # specialise the branch on h % 14. Its TracerWarnings about such branches are what verify() checks.
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            x = torch.rand(TRACE_SHAPE, generator=torch.Generator().manual_seed(0))
            try:
                torch.onnx.export(model, (x,), tmp, input_names=["rgb"], output_names=["disparity"],
                                  opset_version=opset, dynamic_axes=DYNAMIC, dynamo=False)
            except Exception as err:  # noqa: BLE001 - the tracer raises anything the model's code raises
                raise ValueError(f"torch.onnx.export cannot trace this {type(model).__name__} "
                                 f"({type(err).__name__}: {str(err).strip().splitlines()[0][:300]})") from None
        try:
            onnx.checker.check_model(tmp, full_check=True)
        except onnx.checker.ValidationError as err:
            raise ValueError(f"the exported ONNX model fails onnx.checker: {str(err).splitlines()[0]}") from None
        check = verify(model, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return check


def verify(model, path: str) -> dict:
    """onnxruntime vs torch on seeded random images of CHECK_SHAPES; a disagreement is a ValueError."""
    from stages.teachers.onnx import session

    sess = session(path, "export", threads=torch.get_num_threads())
    gen, worst_abs, worst_rel = torch.Generator().manual_seed(1), 0.0, 0.0
    for shape in CHECK_SHAPES:
        x = torch.rand(shape, generator=gen)
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(["disparity"], {"rgb": x.numpy()})[0]
        if got.shape != ref.shape:
            raise ValueError(f"the exported ONNX model gives {got.shape} for input {shape}, torch {ref.shape}")
        diff = float(np.abs(got - ref).max())
        worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, diff / (float(np.abs(ref).max()) or 1.0))
    if not worst_rel <= TOLERANCE:
        raise ValueError(f"the exported ONNX model disagrees with torch: max |diff| {worst_abs:.3g} "
                         f"({worst_rel:.2e} of the output's scale, tolerance {TOLERANCE}); nothing written")
    return {"shapes": [list(s) for s in CHECK_SHAPES], "max_abs_diff": worst_abs, "max_rel_diff": worst_rel,
            "tolerance": TOLERANCE}


def run(checkpoint: str, out_dir: str | None = None, fmt: str = "onnx", cfg: DadConfig | None = None,
        opset: int | None = None) -> dict:
    """Export `checkpoint` (a file or a train/<name> folder) to `out_dir` with MODEL_CARD.md + model_card.json."""
    from student.checkpoint import load_checkpoint

    t0 = time.time()
    if fmt not in ("onnx", "hf"):
        raise ValueError(f"--format {fmt!r}: choose onnx or hf")
    path, _ = resolve_checkpoint(checkpoint)
    try:
        model, _ = load_checkpoint(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {checkpoint!r} not found (a student checkpoint file or a "
                                f"train/<name> folder)") from None
    name = _name(path)
    out = out_dir or (f"{cfg.run.root.rstrip('/')}/export/{name}" if cfg else f"export/{name}")
    if is_remote(out):
        raise ValueError(f"--out {out!r}: export writes a local folder (copy it to object storage afterwards)")
    os.makedirs(out, exist_ok=True)
    check = None
    if fmt == "onnx":
        target = os.path.join(out, "model.onnx")
        check = export_onnx(model, target, opset or OPSET)
        files = {"model.onnx": {"sha256": digest(target), "bytes": os.path.getsize(target), "opset": opset or OPSET}}
        teacher = {"adapter": "onnx", "model": os.path.abspath(target), "sha256": digest(target)}
    else:
        from student.convert import save_depth_anything

        save_depth_anything(model, out)
        files = {f: {"sha256": digest(os.path.join(out, f)), "bytes": os.path.getsize(os.path.join(out, f))}
                 for f in sorted(os.listdir(out)) if f not in ("MODEL_CARD.md", "model_card.json")}
        teacher = {"adapter": "hf", "model": os.path.abspath(out)}
    summary = _read_json(f"{posixpath.dirname(path)}/summary.json") or {}
    card = model_card(name, model, path, files, check, summary, _metrics(cfg, name, path), teacher)
    Root(out).write_bytes(json.dumps(card, indent=1).encode(), "model_card.json")
    Root(out).write_bytes(card_markdown(card).encode(), "MODEL_CARD.md")
    result = {"stage": STAGE, "name": name, "format": fmt, "out": out, "parameters": card["parameters"],
              "license": card["license"]}
    if check:
        result["max_abs_diff"] = float(f"{check['max_abs_diff']:.3g}")
    return result | {"seconds": round(time.time() - t0, 2)}


def most_restrictive(licenses: list[str]) -> str:
    """The labels' terms pass into the weights: the strictest wins (unknown > non-commercial > share-alike
    or no-derivatives > permissive); licences equally strict are all named."""
    def strictness(lic: str) -> int:
        low = lic.strip().lower()
        if low in ("", "unknown"):
            return 3
        if re.search(r"\bnc\b|non-?commercial|research|academic", low):
            return 2
        return 1 if re.search(r"\bsa\b|\bnd\b|gpl|copyleft|share-?alike", low) else 0

    if not licenses:
        return "unknown"
    top = max(map(strictness, licenses))
    return " AND ".join(sorted({lic for lic in licenses if strictness(lic) == top}))


def model_card(name: str, model, checkpoint: str, files: dict, check: dict | None, summary: dict,
               metrics: dict | None, teacher: dict) -> dict:
    teachers, labels = summary.get("teachers"), summary.get("label_licenses")
    if teachers is None or labels is None:
        log.warning("export: the training summary records no teachers/licences (%s): the card says 'unknown' — "
                    "check the licences of the labels this student learned from before publishing it",
                    f"{posixpath.dirname(checkpoint)}/summary.json")
    # labels' terms plus, for a student started from a teacher's weights, that teacher's (summary "licenses")
    licence = most_restrictive(summary.get("licenses", labels)) if labels is not None else "unknown"
    return {
        "format": "dad.model_card", "version": 1, "name": name, "checkpoint": checkpoint, "files": files,
        "architecture": architecture(model), "model_config": model.config.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "input": {"name": "rgb", "dtype": "float32", "shape": ["batch", 3, "height", "width"],
                  "meaning": "RGB in [0, 1] (the model normalises it itself); any height and width "
                             + (f"(stretched to {size[0]}×{size[1]} inside)" if (size := getattr(model.config, "input_size", None))
                                else f"(brought to multiples of {model.patch} inside)")},
        "output": {"name": "disparity", "dtype": "float32", "shape": ["batch", "height", "width"],
                   "space": "disparity", "meaning": "relative disparity, >= 0, known up to scale and shift "
                                                    "(fit both per image before comparing with depth)"},
        "teachers": teachers if teachers is not None else "unknown",
        "label_licenses": labels if labels is not None else "unknown", "license": licence,
        "weights_from": summary.get("weights_from"),
        "training": {"corpus": summary.get("corpus", "unknown"), "steps": summary.get("steps", "unknown")},
        "metrics": metrics, "verification": check,
        "teacher_config": teacher_section(name, {**teacher, "output_space": "disparity", "license": licence}),
    }


def architecture(model) -> str:
    c = model.config
    if getattr(c, "arch", None) == "tflite":  # student/graph.py: a TFLite graph's structure, trainable
        return f"TFLite graph student ({len(model.ops)} ops, imported from sha256 {c.source[:12]}…)"
    return (f"{c.encoder} ViT (embed {model.encoder.embed_dim}, {len(model.encoder.blocks)} blocks, patch "
            f"{model.patch}) + Depth Anything v2 DPT head (features {c.features})")


def teacher_section(name: str, values: dict) -> str:
    key = re.sub(r"[^A-Za-z0-9_-]", "_", name)
    return "\n".join([f"[teachers.{key}]", *(f"{k} = {json.dumps(v)}" for k, v in values.items())]) + "\n"


def card_markdown(card: dict) -> str:
    def fmt(v) -> str:
        return f"{v:.4f}" if isinstance(v, float) else "—" if v is None else str(v)

    files = ", ".join(f"`{f}`" + (f" (sha256 `{m['sha256']}`)" if "sha256" in m else "") for f, m in card["files"].items())
    lines = [f"# {card['name']} — a Distill-Any-Depth student", "",
             f"Exported by `dad export` from `{card['checkpoint']}`: {files}.", "", "## Model", "",
             f"- architecture: {card['architecture']}", f"- parameters: {card['parameters']:,}", "",
             "## Input and output", "", "| | name | dtype | shape | meaning |", "|---|---|---|---|---|"]
    for role in ("input", "output"):
        io_ = card[role]
        lines.append(f"| {role} | `{io_['name']}` | {io_['dtype']} | ({', '.join(map(str, io_['shape']))}) | "
                     f"{io_['meaning']} |")
    lines += ["", "## Teachers and licences", ""]
    if isinstance(card["teachers"], dict):
        lines += ["| teacher | model | licence | fingerprint |", "|---|---|---|---|"]
        lines += [f"| {n} | `{t.get('model', '?')}` | {t.get('license', 'unknown')} | `{t.get('fingerprint', '?')}` |"
                  for n, t in card["teachers"].items()]
    else:
        lines.append("Teachers: **unknown** (the training summary does not record them).")
    labels = card["label_licenses"]
    start = card.get("weights_from")
    lines += ["", (f"Labels learned under: {', '.join(labels) if isinstance(labels, list) else 'unknown'}. "
                   + (f"Initial weights: teacher {start['teacher']} ({start['license']}). " if start else "")
                   + f"The weights inherit the most restrictive terms: **{card['license']}**."), "", "## Training", "",
              f"- data: {json.dumps(card['training']['corpus'])}", f"- steps: {card['training']['steps']}"]
    if card["metrics"]:
        lines += ["", f"## Evaluation (`eval/{card['metrics']['name']}`)", "",
                  "| dataset | n | AbsRel | δ1 | " + " | ".join(f"{b} AbsRel / δ1" for b in BASELINES) + " |",
                  "|---|---|---|---|" + "---|" * len(BASELINES)]
        for ds, m in card["metrics"]["datasets"].items():
            base = " | ".join(f"{fmt(m['baselines'][b]['abs_rel'])} / {fmt(m['baselines'][b]['delta1'])}"
                              for b in BASELINES)
            lines.append(f"| {ds} | {m['n']} | {fmt(m['abs_rel'])} | {fmt(m['delta1'])} | {base} |")
    if card["verification"]:
        v = card["verification"]
        lines += ["", "## Verification", "", (f"onnxruntime vs torch on random inputs {v['shapes']}: max |diff| "
                                               f"{v['max_abs_diff']:.2e} ({v['max_rel_diff']:.2e} of the output's scale).")]
    lines += ["", "## Use as a teacher", "", "```toml", card["teacher_config"].rstrip(), "```", ""]
    return "\n".join(lines)


def _name(path: str) -> str:
    stem = posixpath.splitext(posixpath.basename(path))[0]
    generic = stem == "model" or CHECKPOINT_NAME.match(f"{stem}.pt")
    return safe_name(posixpath.basename(posixpath.dirname(path)) if generic else stem)


def _read_json(url: str) -> dict | None:
    try:
        with fsspec.open(url, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _local(p: str) -> str:
    return p if is_remote(p) else os.path.realpath(fsspec.core.strip_protocol(p))


def _metrics(cfg: DadConfig | None, name: str, checkpoint: str) -> dict | None:
    """AbsRel/δ1 per dataset (+ baselines) from eval/<name> or eval/student-<name>, if it scored this file."""
    if cfg is None:
        return None
    root = Root(cfg.run.root)
    for folder in (name, f"student-{name}"):
        if not root.exists(*eval_run(folder, "metrics.json")):
            continue
        m = root.read_json(*eval_run(folder, "metrics.json"))
        scored = (m.get("model") or {}).get("checkpoint")
        if scored and _local(scored) != _local(checkpoint):
            log.warning("export: eval/%s scored %s, not %s: its metrics are left out of the card", folder,
                        scored, checkpoint)
            continue
        keep = ("n", "abs_rel", "delta1")
        return {"name": folder, "protocol": m.get("protocol"),
                "datasets": {ds: {**{k: d[k] for k in keep},
                                  "baselines": {b: {k: d["baselines"][b][k] for k in keep} for b in BASELINES}}
                             for ds, d in m["datasets"].items()}}
    return None
