"""One checkpoint format for students: a plain dict that `torch.load(weights_only=True)` reads.

Checkpoints travel between stages, machines and people, so a pickle that can run code must never be how
weights arrive: loading uses the weights-only unpickler and a crafted file raises instead of executing.
The dict is self-describing: `format` ("dad.student"), `version`, `model_config` (a StudentConfig, or a
GraphConfig with "arch": "tflite"), `state_dict` (float16 with half=True) and `extra` (optimizer, step,
…). Paths are fsspec URLs or binary file objects; local writes go to a temporary file renamed into place.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import posixpath
import re

import fsspec
import torch

from pipeline.storage import temp_file

from .graph import GraphConfig, GraphStudent
from .model import StudentConfig, StudentModel

FORMAT, VERSION = "dad.student", 1


class CheckpointError(ValueError):
    """The file is not a student checkpoint this code can rebuild."""



# A run's periodic checkpoints: train/<name>/ckpt-<step, 7 digits>.pt (sorting by name sorts by step).
CHECKPOINT_NAME = re.compile(r"^ckpt-(\d{7})\.pt$")


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:07d}.pt"


def checkpoint_steps(names) -> list[int]:
    """The steps of the periodic checkpoints among file names, ascending."""
    return sorted(int(m.group(1)) for n in names if (m := CHECKPOINT_NAME.match(n)))

def save_checkpoint(model: StudentModel | GraphStudent, target, extra: dict | None = None, half: bool = False) -> None:
    """Write `model` (+ `extra`) to a path/URL or a binary file object."""
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "version": VERSION, "model_config": model.config.to_dict(),
               "state_dict": state, "extra": extra}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    if hasattr(target, "write"):
        target.write(data)
    elif fsspec.utils.get_protocol(str(target)) in ("file", "local"):
        _atomic_write_local(fsspec.core.strip_protocol(str(target)), data)
    else:
        with fsspec.open(str(target), "wb") as f:
            f.write(data)


def load_checkpoint(source, map_location="cpu") -> tuple[StudentModel | GraphStudent, dict | None]:
    """Rebuild the model from a checkpoint path/URL or binary file object; returns (model, extra)."""
    try:
        if hasattr(source, "read"):
            payload = torch.load(source, map_location=map_location, weights_only=True)
        else:
            with fsspec.open(str(source), "rb") as f:
                payload = torch.load(io.BytesIO(f.read()), map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as e:
        # The weights-only unpickler refused the file (it holds more than tensors and plain data: a
        # pickle that would run code), or the file is not a torch file at all. Nothing in it was executed.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{source!r} is not a loadable {FORMAT} checkpoint (refused by the weights-only "
                              f"loader, nothing in it was run): {type(e).__name__}: {first}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{source!r} is not a {FORMAT} checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"checkpoint version {payload.get('version')!r}; this code reads {VERSION}")
    config = config_from_dict(payload["model_config"])
    try:
        model = model_from_config(config)
    except (RuntimeError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"cannot build a student from model_config {config}: {e}") from e
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"state_dict does not fit its model_config: {e}") from e
    bad = nonfinite_tensors(payload["state_dict"])
    if bad:
        raise CheckpointError(f"{source!r} has non-finite weights ({len(bad)} tensor(s), e.g. {bad[0]}): the training "
                              f"that wrote it diverged; use an earlier checkpoint or retrain with a lower learning rate")
    if isinstance(map_location, (str, torch.device)):
        model = model.to(map_location)
    return model, payload.get("extra")


def nonfinite_tensors(state: dict) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity: weights that predict nothing
    (a diverged run) must be refused where they are loaded, never turned into all-NaN maps."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def model_from_config(config: StudentConfig | GraphConfig) -> StudentModel | GraphStudent:
    """The (randomly initialised) model a config describes."""
    return GraphStudent(config) if isinstance(config, GraphConfig) else StudentModel(config)


def config_from_dict(config: dict) -> StudentConfig | GraphConfig:
    """The config from its dict form: a GraphConfig when `arch` is "tflite", else a StudentConfig.

    Unknown fields or architectures mean a newer/other format and are an error.
    """
    if "arch" in config:
        if config["arch"] != "tflite":
            raise CheckpointError(f"model_config has an architecture this code does not know: {config['arch']!r}")
        try:
            return GraphConfig.from_dict(config)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    known = {f.name for f in dataclasses.fields(StudentConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise CheckpointError(f"model_config has fields this code does not know: {unknown}")
    return StudentConfig(**config)


def _atomic_write_local(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = temp_file(directory, suffix=".ckpt")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def resolve_checkpoint(path: str) -> tuple[str, str]:
    """(checkpoint file, default name). A file is itself (name: its stem); a training folder
    `train/<name>` means its final `model.pt`, else its newest `ckpt-*.pt` (name: the folder's)."""
    fs, p = fsspec.core.url_to_fs(path)
    base = path.rstrip("/")
    if not fs.isdir(p):
        return path, posixpath.splitext(posixpath.basename(base))[0]
    names = sorted(posixpath.basename(f.rstrip("/")) for f in fs.ls(p, detail=False))
    steps = checkpoint_steps(names)
    pick = "model.pt" if "model.pt" in names else (checkpoint_name(steps[-1]) if steps else None)
    if pick is None:
        raise FileNotFoundError(f"{path} is a folder without model.pt or ckpt-*.pt")
    return f"{base}/{pick}", posixpath.basename(base)
