"""A student with the structure of a float TFLite graph, its weights imported from the `.tflite` file.

The distillation experiment needs a mobile student initialised from its teacher (PyDNet v2, a fixed-size
TFLite file). `read_tflite` turns the flatbuffer into plain data (ops in NCHW terms, numpy weights) and
`GraphStudent` runs it with real `nn.Parameter`s, rebuilt from a weights-only checkpoint; no TensorFlow is
needed. Ops follow TFLite exactly (TF's SAME padding, TF1 "asymmetric" resizes). Hybrid int8-weight graphs
import dequantized; graphs with quantized activations, and unknown ops, are refused, naming them.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from dataclasses import asdict, dataclass, field, fields
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

GRAPH_FORMAT, GRAPH_VERSION = "dad.tflite-graph", 1
DEPTH_EPS = 1e-6  # depth-like outputs become disparity as 1 / clamp(depth, DEPTH_EPS)

_DTYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 7: np.int16, 9: np.int8}
_QUANTIZED = {3: "uint8", 7: "int16", 9: "int8"}
_FUSED = {0: "NONE", 1: "RELU", 2: "RELU_N1_TO_1", 3: "RELU6", 4: "TANH"}
_ACTIVATION_OPS = ("LEAKY_RELU", "RELU", "RELU6", "RELU_N1_TO_1", "LOGISTIC", "TANH", "HARD_SWISH")
_BINARY_OPS = ("ADD", "MUL", "MAXIMUM", "MINIMUM")
_NCHW_AXIS = {0: 0, 1: 2, 2: 3, 3: 1}  # NHWC axis -> NCHW axis


class GraphImportError(ValueError):
    """The TFLite graph cannot become a student (quantized, an unsupported op or layout)."""


# -- reading the flatbuffer --------------------------------------------------------------------

def read_tflite(src) -> tuple[dict, dict[str, np.ndarray]]:
    """Parse a float TFLite model (path or bytes) into (graph, weights).

    `graph` holds plain lists/dicts/str/int/float/bool only (it is stored in weights-only checkpoints):
    the ops in execution order with NCHW options, the input, the outputs and the feature tensor.
    `weights` maps the GraphStudent state_dict names (`layers.<k>.weight`, ...) to float32 arrays in
    torch layout. Corrupt or truncated files raise ValueError.
    """
    return _parse(*_read_bytes(src))


def _parse(data: bytes, where: str) -> tuple[dict, dict[str, np.ndarray]]:
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ValueError(f"{where} is not a TFLite flatbuffer (no 'TFL3' file identifier)")
    try:
        return _Importer(data, where).run()
    except GraphImportError:
        raise
    except (ValueError, struct.error, IndexError, TypeError, KeyError, UnicodeDecodeError, OverflowError) as e:
        raise ValueError(f"{where} is a corrupt or truncated TFLite file ({type(e).__name__}: {e})") from None


def _read_bytes(src) -> tuple[bytes, str]:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src), f"<{len(src)} bytes of TFLite>"
    with open(src, "rb") as f:
        return f.read(), os.fspath(src)


class _Importer:
    """One pass over the operators: constants folded, each op turned into an NCHW op dict."""

    def __init__(self, data: bytes, where: str):
        import tflite
        from tflite.utils import BUILTIN_OPCODE2NAME

        self.tflite, self.names, self.where = tflite, BUILTIN_OPCODE2NAME, where
        self.model = tflite.Model.GetRootAsModel(data, 0)
        if self.model.SubgraphsLength() < 1:
            raise GraphImportError(f"{where} has no subgraph")
        self.sg = self.model.Subgraphs(0)
        self.const: dict[int, np.ndarray] = {}
        self.dequantized: dict[int, int] = {}  # DEQUANTIZE output -> its stored input
        self.handlers = {"CONV_2D": self._op_conv_2d, "DEPTHWISE_CONV_2D": self._op_depthwise_conv_2d,
                         "TRANSPOSE_CONV": self._op_transpose_conv, "CONCATENATION": self._op_concatenation,
                         "PAD": self._op_pad, "STRIDED_SLICE": self._op_strided_slice,
                         "RESIZE_BILINEAR": self._op_resize, "RESIZE_NEAREST_NEIGHBOR": self._op_resize,
                         **{k: self._op_binary for k in _BINARY_OPS}, **{k: self._op_activation for k in _ACTIVATION_OPS}}
        for t in range(self.sg.TensorsLength()):
            buf = self.model.Buffers(self.sg.Tensors(t).Buffer())
            if buf.DataLength():
                self.const[t] = self._array(t, buf.DataAsNumpy().tobytes())

    def _tensor_name(self, t: int) -> str:
        return (self.sg.Tensors(t).Name() or b"").decode()

    def _shape(self, t: int) -> list[int]:
        tensor = self.sg.Tensors(t)
        return tensor.ShapeAsNumpy().tolist() if tensor.ShapeLength() else []

    def _array(self, t: int, raw: bytes) -> np.ndarray:
        kind = self.sg.Tensors(t).Type()
        if kind not in _DTYPES:
            raise GraphImportError(f"constant tensor {self._tensor_name(t)!r} has TFLite type {kind}, not handled")
        return np.frombuffer(raw, _DTYPES[kind]).reshape(self._shape(t))

    def _float(self, t: int, what: str) -> np.ndarray:
        """A float32 constant: fp32 as is, fp16 widened, int8 weights of a hybrid graph dequantized."""
        arr = self.const.get(t)
        if arr is None:
            raise GraphImportError(f"{what} {self._tensor_name(t)!r} must be a constant in {self.where}")
        if arr.dtype in (np.float32, np.float16):
            return arr.astype(np.float32)
        quant = self.sg.Tensors(t).Quantization()
        if arr.dtype not in (np.int8, np.uint8) or quant is None or not quant.ScaleLength():
            raise GraphImportError(f"{what} {self._tensor_name(t)!r} is {arr.dtype} without a quantization scale")
        shape = [1] * arr.ndim
        if quant.ScaleLength() > 1:  # per-channel scales along the quantized dimension
            shape[quant.QuantizedDimension()] = -1
        scale = quant.ScaleAsNumpy().astype(np.float32).reshape(shape)
        zero = quant.ZeroPointAsNumpy().reshape(shape) if quant.ZeroPointLength() else 0
        return ((arr.astype(np.int32) - zero) * scale).astype(np.float32)

    def _ints(self, t: int) -> list:
        if t not in self.const:
            raise GraphImportError(f"{self._tensor_name(t)!r} must be a constant")
        return self.const[t].tolist()

    def _refuse_quantized(self, t: int) -> None:
        kind = self.sg.Tensors(t).Type()
        if kind in _QUANTIZED:
            raise GraphImportError(f"{self.where} is a quantized graph (tensor {self._tensor_name(t)!r} holds "
                                   f"{_QUANTIZED[kind]} activations): only float graphs (fp32, or fp16 weights "
                                   "with fp32 activations) can become students")

    def _activation(self, t: int) -> list[int]:
        """NHWC shape of an activation tensor, refusing quantized graphs and non-image tensors."""
        self._refuse_quantized(t)
        kind = self.sg.Tensors(t).Type()
        if kind != 0:
            raise GraphImportError(f"tensor {self._tensor_name(t)!r} has TFLite type {kind}; activations must "
                                   "be float32")
        shape = self._shape(t)
        if len(shape) != 4:
            raise GraphImportError(f"tensor {self._tensor_name(t)!r} has shape {shape}; only rank-4 NHWC "
                                   "image tensors are handled")
        return shape

    def _options(self, op, cls_name: str):
        table = op.BuiltinOptions()
        opts = getattr(self.tflite, cls_name)()
        if table is not None:
            opts.Init(table.Bytes, table.Pos)
            return opts
        opts.Init(bytearray(16), 0)  # absent options table: every field reads as its default
        return opts

    def _fused(self, opts) -> str:
        code = opts.FusedActivationFunction()
        if code not in _FUSED:
            raise GraphImportError(f"fused activation {code} is not handled")
        return _FUSED[code]

    def run(self) -> tuple[dict, dict[str, np.ndarray]]:
        sg = self.sg
        if sg.InputsLength() != 1:
            raise GraphImportError(f"{self.where} has {sg.InputsLength()} inputs; a student takes one image")
        inp = sg.Inputs(0)
        n, h, w, c = self._activation(inp)
        if c != 3:
            raise GraphImportError(f"{self.where} takes {c} channels; a student takes RGB")
        outputs = [sg.Outputs(i) for i in range(sg.OutputsLength())]
        entries: list[tuple[dict, dict[str, np.ndarray]]] = []
        for i in range(sg.OperatorsLength()):
            op = sg.Operators(i)
            code = self.model.OperatorCodes(op.OpcodeIndex())
            num = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            name = self.names.get(num, f"#{num}")
            if name == "CUSTOM":
                name = f"CUSTOM:{(code.CustomCode() or b'').decode()}"
            ins = [op.Inputs(j) for j in range(op.InputsLength())]
            outs = [op.Outputs(j) for j in range(op.OutputsLength())]
            if name == "DEQUANTIZE" and ins[0] in self.const:  # fp16 weights -> fp32, folded
                self.const[outs[0]] = self._float(ins[0], "DEQUANTIZE input")
                self.dequantized[outs[0]] = ins[0]
                continue
            tensors = [t for t in ins + outs if t >= 0 and t not in self.const]
            handler = self.handlers.get(name)
            if handler is None:
                for t in tensors:  # a QUANTIZE/DEQUANTIZE of activations: say why, not just "unsupported"
                    self._refuse_quantized(t)
                raise GraphImportError(f"unsupported TFLite op {name!r} (op {i}) in {self.where}")
            for t in tensors:
                self._activation(t)
            try:
                spec, arrays = handler(name, op, ins, outs)
            except GraphImportError as e:
                raise GraphImportError(f"TFLite op {name!r} (op {i}) in {self.where}: {e}") from None
            spec = {"type": name, "inputs": [t for t in ins if t >= 0 and t not in self.const], "outputs": outs,
                    "shape": _nchw(self._shape(outs[0])), **spec}
            entries.append((spec, arrays))
        entries = _fuse_leaky_relu(entries, outputs)
        ops, weights = [], {}
        for k, (spec, arrays) in enumerate(entries):
            ops.append(spec)
            weights.update({f"layers.{k}.{key}": np.ascontiguousarray(a, np.float32) for key, a in arrays.items()})
        produced = {inp} | {t for spec in ops for t in spec["outputs"]}
        missing = [t for t in outputs if t not in produced]
        if missing:
            raise GraphImportError(f"outputs {[self._tensor_name(t) for t in missing]} are not computed by any op")
        graph = {"format": GRAPH_FORMAT, "version": GRAPH_VERSION, "layout": "NCHW",
                 "input": {"tensor": inp, "name": self._tensor_name(inp), "shape": [n, c, h, w]},
                 "outputs": [{"tensor": t, "name": self._tensor_name(t), "shape": _nchw(self._activation(t))}
                             for t in outputs],
                 "features": _deepest(ops), "ops": ops}
        return graph, weights

    # -- op handlers: (NCHW options, {param name: torch-layout array}) ---------------------------

    def _op_conv_2d(self, name, op, ins, outs):
        opts = self._options(op, "Conv2DOptions")
        weight = self._float(ins[1], "weight").transpose(0, 3, 1, 2)  # OHWI -> OIHW
        groups, rem = divmod(self._shape(ins[0])[3], weight.shape[1])
        if rem:
            raise GraphImportError(f"input channels do not divide into filter channels {weight.shape[1]}")
        return self._conv(opts, weight, ins, groups, [opts.DilationHFactor(), opts.DilationWFactor()])

    def _op_depthwise_conv_2d(self, name, op, ins, outs):
        opts = self._options(op, "DepthwiseConv2DOptions")
        weight = self._float(ins[1], "weight").transpose(3, 0, 1, 2)  # [1, H, W, C*M] -> [C*M, 1, H, W]
        return self._conv(opts, weight, ins, self._shape(ins[0])[3], [opts.DilationHFactor(), opts.DilationWFactor()])

    def _weight_dtype(self, t: int) -> str:
        """What the file stores a weight as (int8: a hybrid graph's; LiteRT then quantizes the activations)."""
        producer = self.dequantized.get(t, t)
        return str(self.const[producer].dtype)

    def _conv(self, opts, weight, ins, groups, dilation):
        arrays = {"weight": weight}
        if len(ins) > 2 and ins[2] >= 0:
            arrays["bias"] = self._float(ins[2], "bias")
        return ({"weight": list(weight.shape), "weight_dtype": self._weight_dtype(ins[1]), "bias": "bias" in arrays,
                 "groups": groups,
                 "stride": [opts.StrideH(), opts.StrideW()], "dilation": dilation,
                 "padding": _padding(opts.Padding()), "activation": self._fused(opts)}, arrays)

    def _op_transpose_conv(self, name, op, ins, outs):
        opts = self._options(op, "TransposeConvOptions")
        weight = self._float(ins[1], "weight").transpose(3, 0, 1, 2)  # [O, H, W, I] -> [I, O, H, W]
        arrays = {"weight": weight}
        if len(ins) > 3 and ins[3] >= 0:
            arrays["bias"] = self._float(ins[3], "bias")
        stride = [opts.StrideH(), opts.StrideW()]
        (_, hi, wi, _), (_, ho, wo, _) = self._shape(ins[2]), self._shape(outs[0])
        return ({"weight": list(weight.shape), "weight_dtype": self._weight_dtype(ins[1]), "bias": "bias" in arrays,
                 "stride": stride,
                 "padding": _padding(opts.Padding()), "extra": [ho - hi * stride[0], wo - wi * stride[1]],
                 "activation": self._fused(opts)}, arrays)

    def _op_resize(self, name, op, ins, outs):
        cls = "ResizeBilinearOptions" if name == "RESIZE_BILINEAR" else "ResizeNearestNeighborOptions"
        opts = self._options(op, cls)
        (_, hi, wi, _), (_, ho, wo, _) = self._shape(ins[0]), self._shape(outs[0])
        return ({"mode": "bilinear" if name == "RESIZE_BILINEAR" else "nearest",
                 "align_corners": bool(opts.AlignCorners()), "half_pixel_centers": bool(opts.HalfPixelCenters()),
                 "scale": [ho / hi, wo / wi]}, {})

    def _op_concatenation(self, name, op, ins, outs):
        opts = self._options(op, "ConcatenationOptions")
        axis = opts.Axis() % 4
        if axis == 0:
            raise GraphImportError("concatenation along the batch axis")
        return {"axis": _NCHW_AXIS[axis], "activation": self._fused(opts)}, {}

    def _op_binary(self, name, op, ins, outs):
        activation = "NONE"
        if name in ("ADD", "MUL"):
            activation = self._fused(self._options(op, "AddOptions" if name == "ADD" else "MulOptions"))
        consts = [t for t in ins if t in self.const]
        if not consts:
            return {"const": None, "scalar": None, "activation": activation}, {}
        if len(consts) == len(ins):
            raise GraphImportError("all operands are constants")
        value = self._float(consts[0], "constant operand")
        if value.size == 1:  # a fixed scalar (e.g. a leaky slope), not a learned tensor
            return {"const": None, "scalar": float(value.reshape(())), "activation": activation}, {}
        nhwc = value.reshape((1,) * (4 - value.ndim) + value.shape)
        if any(d != 1 for d in nhwc.shape[:3]):
            raise GraphImportError(f"constant operand of shape {list(value.shape)} depends on the image size")
        const = nhwc.transpose(0, 3, 1, 2)
        return {"const": list(const.shape), "scalar": None, "activation": activation}, {"const": const}

    def _op_activation(self, name, op, ins, outs):
        alpha = self._options(op, "LeakyReluOptions").Alpha() if name == "LEAKY_RELU" else 0.0
        return {"alpha": alpha}, {}

    def _op_pad(self, name, op, ins, outs):
        (b0, b1), (t, b), (left, right), (c0, c1) = self._ints(ins[1])
        if b0 or b1:
            raise GraphImportError("padding along the batch axis")
        return {"pad": [left, right, t, b, c0, c1]}, {}

    def _op_strided_slice(self, name, op, ins, outs):
        opts = self._options(op, "StridedSliceOptions")
        if opts.EllipsisMask() or opts.NewAxisMask() or opts.ShrinkAxisMask() or opts.Offset():
            raise GraphImportError("only plain slices (no ellipsis/new-axis/shrink masks, no offset) are handled")
        shape = self._shape(ins[0])
        begin, end, strides = (self._ints(t) for t in ins[1:4])
        ranges = []
        for axis, dim in enumerate(shape):
            lo = 0 if opts.BeginMask() >> axis & 1 else begin[axis] % dim if begin[axis] < 0 else begin[axis]
            hi = dim if opts.EndMask() >> axis & 1 else end[axis] + dim if end[axis] < 0 else min(end[axis], dim)
            if strides[axis] < 1:
                raise GraphImportError("negative or zero strides")
            ranges.append([lo, hi, strides[axis]])
        if any(r != [0, d, 1] for r, d in zip(ranges[:3], shape[:3])):
            raise GraphImportError("only slices along the channel axis are handled")
        return {"channels": ranges[3]}, {}


def _nchw(shape: list[int]) -> list[int]:
    n, h, w, c = shape
    return [n, c, h, w]


def _padding(code: int) -> str:
    return {0: "SAME", 1: "VALID"}[code]


def _fuse_leaky_relu(entries: list, outputs: list[int]) -> list:
    """MAXIMUM(x, MUL(x, a)), 0 <= a <= 1, the MUL used only there -> LEAKY_RELU(x, a)."""
    producer = {spec["outputs"][0]: k for k, (spec, _) in enumerate(entries)}
    uses: dict[int, int] = {}
    for spec, _ in entries:
        for t in spec["inputs"]:
            uses[t] = uses.get(t, 0) + 1
    drop = set()
    for k, (spec, arrays) in enumerate(entries):
        if spec["type"] != "MAXIMUM" or len(spec["inputs"]) != 2:
            continue
        for x, y in (spec["inputs"], spec["inputs"][::-1]):
            mul = entries[producer[y]][0] if y in producer else None
            if (mul is not None and mul["type"] == "MUL" and mul["inputs"] == [x] and mul["scalar"] is not None
                    and 0 <= mul["scalar"] <= 1 and mul["activation"] == "NONE" and uses[y] == 1
                    and y not in outputs):
                entries[k] = ({"type": "LEAKY_RELU", "inputs": [x], "outputs": spec["outputs"],
                               "shape": spec["shape"], "alpha": mul["scalar"]}, {})
                drop.add(producer[y])
                break
    return [e for k, e in enumerate(entries) if k not in drop]


def _deepest(ops: list[dict]) -> int:
    """The feature tensor: the lowest-resolution op output, the widest of those, the last of equals."""
    best = max(range(len(ops)), key=lambda k: (-ops[k]["shape"][2] * ops[k]["shape"][3], ops[k]["shape"][1], k))
    return ops[best]["outputs"][0]


def graph_multiple(graph: dict) -> int:
    """Side multiple every level needs: the largest input/level size ratio (the product of strides)."""
    _, _, h, w = graph["input"]["shape"]
    ratios = [Fraction(size, s) for op in graph["ops"] for size, s in ((h, op["shape"][2]), (w, op["shape"][3]))]
    return max(1, math.ceil(max(ratios, default=1)))


# -- the torch side -----------------------------------------------------------------------------

def _activate(x: torch.Tensor, kind: str, alpha: float = 0.0) -> torch.Tensor:
    if kind == "NONE":
        return x
    if kind == "LEAKY_RELU":
        return F.leaky_relu(x, alpha)
    if kind == "RELU":
        return F.relu(x)
    if kind == "RELU6":
        return F.relu6(x)
    if kind == "RELU_N1_TO_1":
        return x.clamp(-1.0, 1.0)
    if kind == "TANH":
        return torch.tanh(x)
    if kind == "LOGISTIC":
        return torch.sigmoid(x)
    if kind == "HARD_SWISH":
        return F.hardswish(x)
    raise ValueError(f"unknown activation {kind!r}")


def _same_pad(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    """TensorFlow SAME padding of one axis: (before, after), the odd pixel after."""
    total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


class Conv(nn.Conv2d):
    """CONV_2D / DEPTHWISE_CONV_2D with TensorFlow's SAME/VALID padding and a fused activation."""

    def __init__(self, op: dict):
        out_ch, in_per_group, kh, kw = op["weight"]
        super().__init__(in_per_group * op["groups"], out_ch, (kh, kw), op["stride"], 0, op["dilation"],
                         op["groups"], op["bias"])
        self.same, self.act = op["padding"] == "SAME", op["activation"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = (0, 0)
        if self.same:
            (t, b), (left, right) = (_same_pad(int(x.shape[2 + a]), self.kernel_size[a], self.stride[a], self.dilation[a])
                                     for a in (0, 1))
            if t == b and left == right:
                padding = (t, left)
            else:
                x = F.pad(x, (left, right, t, b))
        y = F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)
        return _activate(y, self.act)


class TransposeConv(nn.ConvTranspose2d):
    """TRANSPOSE_CONV: output side = input*stride + extra; TFLite's crop (SAME) and bias after it."""

    def __init__(self, op: dict):
        in_ch, out_ch, kh, kw = op["weight"]
        super().__init__(in_ch, out_ch, (kh, kw), op["stride"], bias=op["bias"])
        self.same, self.extra, self.act = op["padding"] == "SAME", op["extra"], op["activation"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv_transpose2d(x, self.weight, None, self.stride)
        for a in (0, 1):
            out = x.shape[2 + a] * self.stride[a] + self.extra[a]
            k, s = self.kernel_size[a], self.stride[a]
            start = _same_pad(out, k, s, 1)[0] if self.same else 0
            y = y.narrow(2 + a, start, min(out, y.shape[2 + a] - start))
            if y.shape[2 + a] < out:  # TFLite writes zeros (then the bias) past the full output
                y = F.pad(y, (0, out - y.shape[3]) if a else (0, 0, 0, out - y.shape[2]))
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return _activate(y, self.act)


def _source_index(n_in: int, n_out: int, mode: str, align_corners: bool, half_pixel: bool, device):
    """TFLite's resize coordinates along one axis (lo, hi, frac; nearest: lo only), in float32 like its kernels."""
    dst = torch.arange(n_out, device=device, dtype=torch.float32)
    if align_corners and n_out > 1:
        scale = (n_in - 1) / (n_out - 1)
    else:
        scale = n_in / n_out
    if mode == "nearest":
        offset = 0.5 if half_pixel else 0.0
        src = torch.floor((dst + offset) * scale + (0.5 if align_corners else 0.0))  # round: half away from 0
        return src.long().clamp(0, n_in - 1), None, None
    src = (dst + 0.5) * scale - 0.5 if half_pixel else dst * scale
    lo = torch.floor(src)
    frac = src - lo
    return lo.long().clamp(min=0), torch.ceil(src).long().clamp(max=n_in - 1), frac


class Resize(nn.Module):
    """RESIZE_BILINEAR / RESIZE_NEAREST_NEIGHBOR by the graph's scale, TFLite coordinates exactly."""

    def __init__(self, op: dict):
        super().__init__()
        self.mode, self.scale = op["mode"], op["scale"]
        self.align_corners, self.half_pixel = op["align_corners"], op["half_pixel_centers"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for axis, scale in ((2, self.scale[0]), (3, self.scale[1])):
            n_in = int(x.shape[axis])  # a Python int even while tracing: sizes inside the graph are static
            n_out = max(1, round(n_in * scale))
            if n_out == n_in:
                continue
            lo, hi, frac = _source_index(n_in, n_out, self.mode, self.align_corners, self.half_pixel, x.device)
            a = x.index_select(axis, lo)
            if hi is None:
                x = a
                continue
            shape = (-1, 1) if axis == 2 else (-1,)
            x = a + (x.index_select(axis, hi) - a) * frac.view(shape).to(x.dtype)
        return x


class Concat(nn.Module):
    def __init__(self, op: dict):
        super().__init__()
        self.axis, self.act = op["axis"], op["activation"]

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return _activate(torch.cat(xs, self.axis), self.act)


class Binary(nn.Module):
    """ADD / MUL / MAXIMUM / MINIMUM of two tensors, or of a tensor and a learned (1, C, 1, 1) constant
    (e.g. a transposed conv's bias) or a fixed scalar."""

    def __init__(self, op: dict):
        super().__init__()
        self.kind, self.scalar, self.act = op["type"], op["scalar"], op["activation"]
        self.const = nn.Parameter(torch.zeros(op["const"])) if op["const"] is not None else None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        other = y if y is not None else self.const if self.const is not None else self.scalar
        if self.kind == "ADD":
            out = x + other
        elif self.kind == "MUL":
            out = x * other
        elif isinstance(other, float):
            out = x.clamp_min(other) if self.kind == "MAXIMUM" else x.clamp_max(other)
        else:
            out = torch.maximum(x, other) if self.kind == "MAXIMUM" else torch.minimum(x, other)
        return _activate(out, self.act)


class Activation(nn.Module):
    def __init__(self, op: dict):
        super().__init__()
        self.kind, self.alpha = op["type"], op["alpha"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _activate(x, self.kind, self.alpha)


class Pad(nn.Module):
    def __init__(self, op: dict):
        super().__init__()
        self.pad = op["pad"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pad)


class ChannelSlice(nn.Module):
    def __init__(self, op: dict):
        super().__init__()
        self.begin, self.end, self.step = op["channels"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.begin:self.end:self.step]


_LAYERS = {"CONV_2D": Conv, "DEPTHWISE_CONV_2D": Conv, "TRANSPOSE_CONV": TransposeConv,
           "RESIZE_BILINEAR": Resize, "RESIZE_NEAREST_NEIGHBOR": Resize, "CONCATENATION": Concat,
           "PAD": Pad, "STRIDED_SLICE": ChannelSlice,
           **{k: Binary for k in _BINARY_OPS}, **{k: Activation for k in _ACTIVATION_OPS}}


@dataclass
class GraphConfig:
    """Everything that rebuilds a GraphStudent; `graph` is read_tflite's plain dict."""

    arch: str = "tflite"
    graph: dict = field(default_factory=dict)
    source: str = ""  # sha256 of the .tflite file
    output_index: int = 0  # which graph output is the prediction
    output_space: str = "disparity"  # "disparity" or "depth" (converted to disparity: 1 / clamp(x, eps))
    mean: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # input normalisation of RGB in [0, 1]
    std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    multiple: int = 1  # input sides must be multiples of this (the graph's total downsampling)
    input_size: list[int] | None = None  # [h, w]: every input is stretched to it (a fixed-size mobile model's rule)
    encoder: str = "tflite"  # a short description for logs

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, config: dict) -> GraphConfig:
        unknown = sorted(set(config) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"graph model_config has fields this code does not know: {unknown}")
        return cls(**config)


class GraphStudent(nn.Module):
    """RGB in [0, 1], (B, 3, H, W) -> disparity (B, H, W), computed by the imported TFLite graph.

    Parameters are `layers.<k>.weight|bias|const` (k: the op's index in `config.graph["ops"]`); none
    starts with `encoder.`, so the trainer puts them all in one group. Only the ops that the chosen
    output and the feature tensor need are run (other heads' parameters then get no gradient).
    """

    def __init__(self, config: GraphConfig):
        super().__init__()
        graph = config.graph
        if config.arch != "tflite" or graph.get("format") != GRAPH_FORMAT or graph.get("version") != GRAPH_VERSION:
            raise ValueError(f"not a {GRAPH_FORMAT} v{GRAPH_VERSION} graph config (arch {config.arch!r}, format "
                             f"{graph.get('format')!r}, version {graph.get('version')!r})")
        if config.output_space not in ("disparity", "depth"):
            raise ValueError(f"output_space must be 'disparity' or 'depth', got {config.output_space!r}")
        if not 0 <= config.output_index < len(graph["outputs"]):
            raise ValueError(f"output_index {config.output_index} out of range: the graph has "
                             f"{len(graph['outputs'])} outputs")
        output = graph["outputs"][config.output_index]
        if output["shape"][1] != 1:
            raise ValueError(f"output {output['name']!r} has {output['shape'][1]} channels; a depth map has 1")
        if config.input_size and any(v % config.multiple for v in config.input_size):
            raise ValueError(f"input_size {config.input_size} must be multiples of {config.multiple} (the graph's "
                             f"total stride)")
        self.config = config
        self.patch = config.multiple
        self.ops = graph["ops"]
        self.layers = nn.ModuleList(_LAYERS[op["type"]](op) for op in self.ops)
        self.register_buffer("mean", torch.tensor(config.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self._input, self._output, self._features = graph["input"]["tensor"], output["tensor"], graph["features"]
        self._plan = self._schedule()

    def _schedule(self) -> list[tuple[int, list[int]]]:
        """Ops needed for the output and features, in order, each with the tensors to release after it."""
        producer = {op["outputs"][0]: k for k, op in enumerate(self.ops)}
        needed, todo = set(), [self._output, self._features]
        while todo:
            t = todo.pop()
            if t in producer and producer[t] not in needed:
                needed.add(producer[t])
                todo.extend(self.ops[producer[t]]["inputs"])
        order = sorted(needed)
        last = {}
        for k in order:
            for t in self.ops[k]["inputs"]:
                last[t] = k
        keep = {self._output, self._features}
        return [(k, [t for t in set(self.ops[k]["inputs"]) if last[t] == k and t not in keep]) for k in order]

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The graph on a normalised NCHW input: (the chosen output (B, 1, h, w), the feature map)."""
        env = {self._input: x}
        for k, release in self._plan:
            op = self.ops[k]
            env[op["outputs"][0]] = self.layers[k](*(env[t] for t in op["inputs"]))
            for t in release:
                del env[t]
        return env[self._output], env[self._features]

    def fit_size(self, h: int, w: int) -> tuple[int, int]:
        """The size the graph runs at: the native one, else the nearest sides that are multiples."""
        if self.config.input_size:
            return tuple(self.config.input_size)
        h, w = int(h), int(w)  # while tracing for ONNX: the traced size is baked in (export with input_size)
        native = tuple(self.config.graph["input"]["shape"][2:])
        if (h, w) == native:
            return native
        m = self.patch
        return max(1, round(h / m)) * m, max(1, round(w / m)) * m

    def forward(self, x: torch.Tensor, return_features: bool = False):
        h, w = x.shape[-2:]
        x = (x - self.mean) / self.std
        size = self.fit_size(h, w)
        if size != (h, w):  # plain bilinear (no antialias): ONNX's Resize runs it exactly, so exports agree
            x = F.interpolate(x, size, mode="bilinear", align_corners=False)
        out, feats = self.run(x)
        pred = out[:, 0]
        if self.config.output_space == "depth":
            pred = 1.0 / pred.clamp_min(DEPTH_EPS)
        if pred.shape[-2:] != (h, w):
            pred = F.interpolate(pred[:, None], (h, w), mode="bilinear", align_corners=False)[:, 0]
        if return_features:
            return pred, feats.flatten(2).transpose(1, 2)
        return pred


def graph_student_from_tflite(path, output_index: int = 0, output_space: str = "disparity",
                              mean=None, std=None, input_size=None) -> GraphStudent:
    """A GraphStudent with the graph and weights of a float `.tflite` file (path or bytes)."""
    data, where = _read_bytes(path)
    graph, weights = _parse(data, where)
    stem = Path(where).stem if not isinstance(path, (bytes, bytearray, memoryview)) else "bytes"
    convs = sum(op["type"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV") for op in graph["ops"])
    config = GraphConfig(graph=graph, source=hashlib.sha256(data).hexdigest(), output_index=output_index,
                         output_space=output_space, mean=[float(v) for v in (mean or (0.0, 0.0, 0.0))],
                         std=[float(v) for v in (std or (1.0, 1.0, 1.0))], multiple=graph_multiple(graph),
                         encoder=f"tflite:{stem} ({convs} convs)",
                         input_size=[int(v) for v in input_size] if input_size else None)
    model = GraphStudent(config)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    return model
