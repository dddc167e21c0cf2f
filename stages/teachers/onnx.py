"""`onnx` adapter: any ONNX depth model, run by onnxruntime (CPU, or CUDA when given a GPU).

`dad export` writes students in this form, so a student can teach the next round. What the file says is
read from it (NCHW or NHWC, dtype, fixed or dynamic dimensions): a dynamic batch runs in one call; fixed
H/W get each image resized (`resize = "stretch" | "letterbox"`); dynamic H/W take the image as it is, or
at `input_size` (multiples of 14). The config gives `output_space`, `output_index`, `input_mean` and
`input_std`. An output that is not one map per image is refused. Fingerprint: the file's sha256.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import TeacherCfg
from pipeline.models import digest, display, resolve
from stages.teachers import Teacher, TeacherSpec, resize_to_multiple
from stages.teachers.tflite import _letterbox, _resized

log = logging.getLogger("dad.teachers.onnx")
DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def session(path: str, what: str, threads: int = 1, gpu: bool = False, optimize: bool = True):
    """An onnxruntime session on `path`; a missing runtime or an unloadable file is a clear ValueError."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ValueError(f"{what}: ONNX models need onnxruntime: pip install 'dad-pipeline[onnx]'") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    if not optimize:  # describing a model needs its signature only: skip the (slow, for big models) graph optimization
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    providers = ["CPUExecutionProvider"]
    if gpu and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    elif gpu:
        log.warning("%s: num_gpus > 0 but this onnxruntime has no CUDA provider (pip install onnxruntime-gpu); "
                    "running on CPU", what)
    try:
        return ort.InferenceSession(path, sess_options=opts, providers=providers)
    except Exception as err:  # noqa: BLE001 - onnxruntime's errors derive from Exception only
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise ValueError(f"{what}: {path} is not a loadable ONNX model ({first})") from None


def one_map(shape, nhwc: bool) -> bool:
    """(B,H,W), (B,1,H,W) or, for an NHWC model, (B,H,W,1); a dynamic dimension (a name or None) may be 1."""
    def may_be_1(d) -> bool:
        return not isinstance(d, int) or d == 1

    return len(shape) == 3 or (len(shape) == 4 and (may_be_1(shape[1]) or (nhwc and may_be_1(shape[3]))))


class ONNXTeacher(Teacher):
    def __init__(self, name: str, tcfg: TeacherCfg):
        self.what = f"teachers.{name}"
        path = resolve(tcfg.model, tcfg.sha256, what=f"{self.what}.model")
        threads = tcfg.torch_threads or max(1, int(tcfg.num_cpus))
        self.session = session(path, self.what, threads, gpu=tcfg.num_gpus > 0)
        self.input, self.output, self.nhwc = _io(self.session, tcfg, self.what)
        self.spec = _spec(name, tcfg, path, self.input, self.output, self.nhwc)
        dims = self.input.shape[1:3] if self.nhwc else self.input.shape[2:4]
        self.size = tuple(dims) if all(isinstance(d, int) and d > 0 for d in dims) else None
        self.batch = self.input.shape[0] if isinstance(self.input.shape[0], int) else None
        self.dtype = DTYPES[self.input.type]
        self.mean = torch.tensor(tcfg.input_mean or (0.0, 0.0, 0.0)).view(1, 3, 1, 1)
        self.std = torch.tensor(tcfg.input_std or (1.0, 1.0, 1.0)).view(1, 3, 1, 1)
        self.resize, self.input_size = tcfg.resize, tcfg.input_size

    @classmethod
    def describe(cls, name: str, tcfg: TeacherCfg) -> TeacherSpec:
        what = f"teachers.{name}"
        path = resolve(tcfg.model, tcfg.sha256, what=f"{what}.model")
        inp, out, nhwc = _io(session(path, what, optimize=False), tcfg, what)
        return _spec(name, tcfg, path, inp, out, nhwc)

    def run(self, x: np.ndarray) -> torch.Tensor:
        """Model-ready images (N, …) → maps (N,1,H',W'); a fixed batch is filled up by repeating the last."""
        n = len(x)
        if self.batch and n < self.batch:
            x = np.concatenate([x, np.repeat(x[-1:], self.batch - n, axis=0)])
        try:
            out = self.session.run([self.output.name], {self.input.name: x})[0]
        except Exception as err:  # noqa: BLE001 - onnxruntime's errors derive from Exception only
            raise RuntimeError(f"{self.what}: onnxruntime failed on input {x.shape}: "
                               f"{str(err).strip().splitlines()[0][:300]}") from None
        if out.shape[0] != len(x) or not one_map(out.shape, self.nhwc):
            raise ValueError(f"{self.what}: output {self.output.name!r} has shape {out.shape} for input "
                             f"{x.shape}, not one depth map per image")
        out = torch.from_numpy(np.asarray(out[:n], np.float32))
        if out.ndim == 3:
            return out[:, None]
        return out if out.shape[1] == 1 else out.permute(0, 3, 1, 2)

    def model_input(self, rgb: torch.Tensor) -> tuple[np.ndarray, tuple[int, int], tuple | None]:
        """(B,3,H,W) in [0, 1] → the model's input array (resized, normalised, in its layout and dtype),
        the grid it is on, and the letterbox it fills (None without one)."""
        x = rgb.float().cpu()
        box = None
        if self.size and self.resize == "letterbox":
            x, box = _letterbox(x, *self.size)
        elif self.size:
            x = _resized(x, *self.size)
        elif self.input_size:
            x = resize_to_multiple(x, self.input_size)
        grid = x.shape[-2:]
        x = (x - self.mean) / self.std
        return np.ascontiguousarray((x.permute(0, 2, 3, 1) if self.nhwc else x).numpy().astype(self.dtype)), grid, box

    @torch.no_grad()
    def predict(self, rgb: torch.Tensor) -> torch.Tensor:
        h, w = rgb.shape[-2:]
        arr, grid, box = self.model_input(rgb)
        step = self.batch or len(arr)
        outs = torch.cat([self.run(arr[i:i + step]) for i in range(0, len(arr), step)])
        if outs.shape[-2:] != grid:  # an output at another resolution: bring it to the input grid first
            outs = F.interpolate(outs, size=grid, mode="bilinear", align_corners=False)
        if box:
            y0, x0, y1, x1 = box
            outs = outs[..., y0:y1, x0:x1]
        if outs.shape[-2:] != (h, w):
            outs = F.interpolate(outs, size=(h, w), mode="bilinear", align_corners=False)
        return outs[:, 0].to(rgb.device)


def _io(sess, tcfg: TeacherCfg, what: str):
    """(input, chosen output, nhwc) of a session, or a ValueError saying why the model cannot be a teacher."""
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    shapes = [(i.name, i.shape, i.type) for i in inputs]
    if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].type not in DTYPES:
        raise ValueError(f"{what}: expected one float image input (NCHW or NHWC), the model has {shapes}")
    shape = inputs[0].shape
    if shape[1] != 3 and shape[3] != 3:
        raise ValueError(f"{what}: input {inputs[0].name!r} {shape} has no RGB dimension of size 3 "
                         f"(NCHW or NHWC expected)")
    nhwc = shape[1] != 3
    if tcfg.output_index >= len(outputs):
        raise ValueError(f"{what}.output_index = {tcfg.output_index}, but the model has {len(outputs)} output(s)")
    out = outputs[tcfg.output_index]
    if not one_map(out.shape, nhwc):
        raise ValueError(f"{what}: output {out.name!r} has shape {out.shape}, not one depth map per image "
                         f"((B,H,W) or (B,1,H,W)); choose another with output_index")
    return inputs[0], out, nhwc


def _spec(name: str, tcfg: TeacherCfg, path: str, inp, out, nhwc: bool) -> TeacherSpec:
    dims = inp.shape[1:3] if nhwc else inp.shape[2:4]
    if all(isinstance(d, int) and d > 0 for d in dims):
        size = f"{tcfg.resize} to {dims[0]}x{dims[1]}"
    else:
        size = f"short side {tcfg.input_size}, multiple of 14" if tcfg.input_size else "input size kept"
    norm = f", mean {tcfg.input_mean} std {tcfg.input_std}" if tcfg.input_mean or tcfg.input_std else ""
    rule = (f"{size}, {'NHWC' if nhwc else 'NCHW'} {inp.type} input batch {inp.shape[0]}{norm}, "
            f"output {tcfg.output_index} {out.name!r}")
    return TeacherSpec(name, "onnx", display(tcfg.model), tcfg.output_space, rule, tcfg.license,
                       f"sha256:{digest(path)}")
