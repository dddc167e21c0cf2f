"""`tflite` adapter: any TensorFlow Lite depth model, run by its own runtime (LiteRT, `ai-edge-litert`).

Input shape, dtype and (de)quantization are read from the file; the config gives `output_space`,
`output_index` and `input_mean`/`input_std`. Mobile exports have a fixed input and batch 1, so each image
is resized to the model's size — `resize = "stretch"` (default; it won on realeval for PyDNet v2) or
`"letterbox"` — the batch is looped and the output resized back. Threads: `torch_threads`, else the
actor's `num_cpus`. Fingerprint: the file's sha256. Config example: README, "Teachers".
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import TeacherCfg
from pipeline.models import digest, display, resolve
from stages.teachers import Teacher, TeacherSpec


def _interpreter(path: str, threads: int, what: str):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise ValueError(f"{what}: the tflite adapter needs LiteRT: pip install 'dad-pipeline[tflite]'") from None
    try:
        interp = Interpreter(model_path=path, num_threads=threads)
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{what}: {path} is not a loadable TensorFlow Lite model ({first})") from None
    return interp


class TFLiteTeacher(Teacher):
    def __init__(self, name: str, tcfg: TeacherCfg):
        self.path = resolve(tcfg.model, tcfg.sha256, what=f"teachers.{name}.model")
        threads = tcfg.torch_threads or max(1, int(tcfg.num_cpus))
        self.interp = _interpreter(self.path, threads, f"teachers.{name}")
        self.input, self.outputs = _io(self.interp, tcfg, name)
        self.spec = _spec(name, tcfg, self.path, self.input)
        self.size = tuple(int(s) for s in self.input["shape"][1:3])
        self.mean = np.asarray(tcfg.input_mean or (0.0, 0.0, 0.0), np.float32)
        self.std = np.asarray(tcfg.input_std or (1.0, 1.0, 1.0), np.float32)
        self.resize = tcfg.resize
        self.output = self.outputs[tcfg.output_index]

    @classmethod
    def describe(cls, name: str, tcfg: TeacherCfg) -> TeacherSpec:
        path = resolve(tcfg.model, tcfg.sha256, what=f"teachers.{name}.model")
        inp, _ = _io(_interpreter(path, 1, f"teachers.{name}"), tcfg, name)
        return _spec(name, tcfg, path, inp)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """RGB in [0, 1] (H,W,3) → the model's input tensor (1,H,W,3), normalised and quantized as declared."""
        real = np.subtract(x, self.mean, dtype=np.float32)
        real /= self.std
        dtype = np.dtype(self.input["dtype"])
        scale, zero = self.input["quantization"]
        if dtype.kind == "f":
            return real[None].astype(dtype)
        info = np.iinfo(dtype)
        real /= scale  # in place, op by op: the values of clip(round(real / scale + zero)) without its temporaries
        real += zero
        np.round(real, out=real)
        return np.clip(real, info.min, info.max, out=real)[None].astype(dtype)

    def run(self, x: np.ndarray) -> np.ndarray:
        """One image at the model's size (H,W,3) in [0, 1] → the chosen output (H',W'), dequantized."""
        self.interp.set_tensor(self.input["index"], self.quantize(x))
        self.interp.invoke()
        out = self.interp.get_tensor(self.output["index"])
        scale, zero = self.output["quantization"]
        out = out.astype(np.float32) if np.dtype(out.dtype).kind == "f" else (out.astype(np.float32) - zero) * scale
        return out.reshape(out.shape[1:3]) if out.ndim == 4 else out.reshape(out.shape[-2:])

    def model_images(self, rgb: torch.Tensor) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        """(B,3,H,W) in [0, 1] → the images at the model's size (B,H',W',3) and the box they fill."""
        mh, mw = self.size
        if self.resize == "letterbox":
            x, box = _letterbox(rgb.float().cpu(), mh, mw)
        else:
            x, box = _resized(rgb.float().cpu(), mh, mw), (0, 0, mh, mw)
        return x.permute(0, 2, 3, 1).numpy(), box

    @torch.no_grad()
    def predict(self, rgb: torch.Tensor) -> torch.Tensor:
        h, w = rgb.shape[-2:]
        mh, mw = self.size
        images, box = self.model_images(rgb)
        outs = torch.from_numpy(np.stack([self.run(np.ascontiguousarray(img)) for img in images]))[:, None]
        if outs.shape[-2:] != (mh, mw):  # an output at another resolution: bring it to the input grid first
            outs = F.interpolate(outs, size=(mh, mw), mode="bilinear", align_corners=False)
        y0, x0, y1, x1 = box
        outs = outs[..., y0:y1, x0:x1]
        if outs.shape[-2:] != (h, w):
            outs = F.interpolate(outs, size=(h, w), mode="bilinear", align_corners=False)
        return outs[:, 0].to(rgb.device)


def _spec(name: str, tcfg: TeacherCfg, path: str, inp: dict) -> TeacherSpec:
    h, w = (int(s) for s in inp["shape"][1:3])
    norm = f", mean {tcfg.input_mean} std {tcfg.input_std}" if tcfg.input_mean or tcfg.input_std else ""
    rule = f"{tcfg.resize} to {h}x{w}, {np.dtype(inp['dtype']).name} input{norm}, output {tcfg.output_index}"
    return TeacherSpec(name, "tflite", display(tcfg.model), tcfg.output_space, rule, tcfg.license,
                       f"sha256:{digest(path)}")


def _io(interp, tcfg: TeacherCfg, name: str) -> tuple[dict, list[dict]]:
    inputs, outputs = interp.get_input_details(), interp.get_output_details()
    if len(inputs) != 1 or len(inputs[0]["shape"]) != 4 or inputs[0]["shape"][-1] != 3:
        shapes = [tuple(int(s) for s in d["shape"]) for d in inputs]
        raise ValueError(f"teachers.{name}: expected one NHWC RGB input, the model has {shapes}")
    if tcfg.output_index >= len(outputs):
        raise ValueError(f"teachers.{name}.output_index = {tcfg.output_index}, but the model has "
                         f"{len(outputs)} output(s)")
    return inputs[0], outputs


def _resized(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    if x.shape[-2:] == (h, w):
        return x
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


def _letterbox(x: torch.Tensor, mh: int, mw: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Fit inside (mh, mw) with the aspect kept; the margin replicates the edges (no artificial border)."""
    h, w = x.shape[-2:]
    scale = min(mh / h, mw / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    inner = _resized(x, nh, nw)
    top, left = (mh - nh) // 2, (mw - nw) // 2
    padded = F.pad(inner, (left, mw - nw - left, top, mh - nh - top), mode="replicate")
    return padded, (top, left, top + nh, left + nw)
