"""GraphStudent: TFLite graphs imported as trainable torch students, checked against the LiteRT runtime.

The real models come from the offline mirror (`DAD_MODEL_MIRROR`, default `<repo>/../shared/models`);
tests that need them skip when it is missing. Small graphs are built here with the flatbuffer builder
of the `tflite` package, so the ops PyDNet does not use are compared with LiteRT too.

Differences are pointwise relative: |ours - LiteRT| / (|LiteRT| + 1e-6), or, for maps that cross zero,
max |ours - LiteRT| / max |LiteRT|; both are printed (pytest -s) and asserted.
"""

import glob
import hashlib
import os
from importlib import import_module
from pathlib import Path

import numpy as np
import pytest
import torch

tflite = pytest.importorskip("tflite", reason="the tflite flatbuffer package reads .tflite files")
import flatbuffers  # installed with tflite

from student.checkpoint import load_checkpoint, save_checkpoint
from student.graph import (
    GraphConfig,
    GraphImportError,
    GraphStudent,
    graph_student_from_tflite,
    read_tflite,
)
from student.trainer import freeze_unused, make_optimizer

MIRROR = Path(os.environ.get("DAD_MODEL_MIRROR", Path(__file__).resolve().parents[1] / ".." / "shared" / "models"))
PYDNET = MIRROR / "pydnet_v2_384x640_fp16.tflite"
PYDNETPP = MIRROR / "pydnetpp_matterport_448x640.tflite"
FASTDEPTH = MIRROR / "fastdepth_nyu_224_int8.tflite"
IMAGES = sorted(glob.glob(str(MIRROR / ".." / "data" / "realeval" / "rgb" / "*.png")))[:3]

torch.set_num_threads(1)


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"model mirror file {path} is missing (set DAD_MODEL_MIRROR to the shared models folder)")
    return path


@pytest.fixture(scope="module")
def pydnet():
    return graph_student_from_tflite(_need(PYDNET)).eval()


def _images(h: int, w: int) -> np.ndarray:
    """The first 3 realeval images, resized to h x w: (3, h, w, 3) float32 in [0, 1]."""
    from PIL import Image

    if len(IMAGES) < 3:
        pytest.skip(f"realeval images missing next to the model mirror ({MIRROR})")
    return np.stack([np.asarray(Image.open(p).convert("RGB").resize((w, h), Image.BILINEAR), np.float32) / 255
                     for p in IMAGES])


def _interpreter(model, builtin: bool = False):
    """LiteRT on a path or bytes; `builtin`: reference kernels (no XNNPACK), every tensor kept."""
    lite = pytest.importorskip("ai_edge_litert.interpreter", reason="the LiteRT runtime is the reference")
    kwargs = {"model_path": str(model)} if isinstance(model, Path) else {"model_content": model}
    if builtin:
        kwargs.update(experimental_op_resolver_type=lite.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
                      experimental_preserve_all_tensors=True)
    it = lite.Interpreter(num_threads=1, **kwargs)
    it.allocate_tensors()
    return it


def _invoke(it, image: np.ndarray, output: int = 0) -> np.ndarray:
    it.set_tensor(it.get_input_details()[0]["index"], image[None])
    it.invoke()
    return it.get_tensor(it.get_output_details()[output]["index"])[0, ..., 0]


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def _rel(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.abs(ours - ref) / (np.abs(ref) + 1e-6)


# -- PyDNet v2: the teacher the mobile student starts from ------------------------------------


def test_pydnet_v2_matches_litert(pydnet):
    """fp32 torch vs LiteRT/XNNPACK (fp16 weights widened to fp32 by both): only summation order differs,
    measured ~4e-6 max / ~3e-7 median relative; 1e-4 leaves room for other CPUs' kernels while a wrong
    padding side or resize mode gives errors of 1e-2 and more."""
    images = _images(384, 640)
    it = _interpreter(PYDNET)
    ref = np.stack([_invoke(it, im) for im in images])
    with torch.no_grad():
        ours = pydnet(_nchw(images)).numpy()
    rel = _rel(ours, ref)
    print(f"\nPyDNet v2 vs LiteRT: max rel {rel.max():.2e}, median rel {np.median(rel):.2e}")
    assert ours.shape == ref.shape == (3, 384, 640)
    assert rel.max() < 1e-4 and np.median(rel) < 1e-5


def test_pydnet_v2_graph_and_config(pydnet):
    cfg = pydnet.config
    graph = cfg.graph
    counts = {t: sum(op["type"] == t for op in graph["ops"]) for t in {op["type"] for op in graph["ops"]}}
    assert counts == {"CONV_2D": 42, "LEAKY_RELU": 41, "RESIZE_BILINEAR": 6, "CONCATENATION": 5}
    resizes = [op for op in graph["ops"] if op["type"] == "RESIZE_BILINEAR"]
    assert all(not op["align_corners"] and not op["half_pixel_centers"] and op["scale"] == [2.0, 2.0]
               for op in resizes)  # TF1's legacy "asymmetric" x2 upsampling
    assert {op["weight_dtype"] for op in graph["ops"] if "weight" in op} == {"float16"}
    assert cfg.multiple == pydnet.patch == 64 and cfg.encoder == "tflite:pydnet_v2_384x640_fp16 (42 convs)"
    assert cfg.source == hashlib.sha256(PYDNET.read_bytes()).hexdigest()
    assert graph["input"]["shape"] == [1, 3, 384, 640]
    assert sum(p.numel() for p in pydnet.parameters()) == 1_971_697
    assert not any(n.startswith("encoder.") for n, _ in pydnet.named_parameters())
    assert all(isinstance(p, torch.nn.Parameter) for p in pydnet.parameters())


def test_any_size_and_batches(pydnet):
    images = _nchw(_images(384, 640)[:2])
    with torch.no_grad():
        native = pydnet(images)
        for h, w in [(256, 256), (320, 448), (200, 300)]:
            x = torch.nn.functional.interpolate(images, (h, w), mode="bilinear", align_corners=False)
            pred, feats = pydnet(x, return_features=True)
            singles = torch.cat([pydnet(x[i:i + 1]) for i in range(2)])
            fh, fw = (round(h / 64), round(w / 64))
            assert pred.shape == (2, h, w) and feats.shape == (2, fh * fw, 192) and torch.isfinite(pred).all()
            torch.testing.assert_close(pred, singles, rtol=1e-4, atol=1e-4 * float(singles.abs().max()))
            small = torch.nn.functional.interpolate(native[:, None], (h, w), mode="bilinear")[:, 0]
            corr = np.corrcoef(pred.flatten().numpy(), small.flatten().numpy())[0, 1]
            assert corr > 0.7, (h, w, corr)  # the same scene (squeezed at 256x256): roughly the same map
        fitted = torch.nn.functional.interpolate(x, (192, 320), mode="bilinear", align_corners=False)
        back = torch.nn.functional.interpolate(pydnet(fitted)[:, None], (200, 300), mode="bilinear")[:, 0]
        torch.testing.assert_close(pred, back, rtol=0, atol=0)  # 200x300: run at the nearest multiples of 64


def test_input_size_stretches_every_input_like_a_fixed_size_model():
    stretched = graph_student_from_tflite(PYDNET, input_size=[256, 448]).eval()
    plain = graph_student_from_tflite(PYDNET).eval()
    x = _nchw(_images(300, 300)[:1])
    with torch.no_grad():
        inner = torch.nn.functional.interpolate(x, (256, 448), mode="bilinear", align_corners=False)
        expect = torch.nn.functional.interpolate(plain(inner)[:, None], (300, 300), mode="bilinear")[:, 0]
        torch.testing.assert_close(stretched(x), expect, rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiples of 64"):
        graph_student_from_tflite(PYDNET, input_size=[250, 448])


def test_gradients_flow_and_the_trainer_can_use_it(pydnet):
    model = graph_student_from_tflite(PYDNET)
    assert freeze_unused(model) == []  # the trainer's probe: every parameter gets a gradient
    opt = make_optimizer(model, lr_encoder=1e-5, lr_decoder=1e-4, weight_decay=0.0)
    assert [len(g["params"]) for g in opt.param_groups] == [0, 84]  # one group: no "encoder." names
    x = torch.rand(2, 3, 128, 192, generator=torch.Generator().manual_seed(0))
    target = torch.rand(2, 128, 192, generator=torch.Generator().manual_seed(1)) * 100

    def loss():
        return (model(x) - target).abs().mean()

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    first = loss()
    first.backward()
    opt.step()
    opt.zero_grad()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
    with torch.no_grad():
        assert float(loss()) < float(first)


def test_checkpoint_round_trip(pydnet, tmp_path):
    path = tmp_path / "graph.pt"
    save_checkpoint(pydnet, str(path), extra={"step": 3})
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload["model_config"]["arch"] == "tflite" and payload["model_config"] == pydnet.config.to_dict()
    model, extra = load_checkpoint(str(path))
    assert isinstance(model, GraphStudent) and extra == {"step": 3} and model.config == pydnet.config
    state, loaded = pydnet.state_dict(), model.state_dict()
    assert state.keys() == loaded.keys() and all(torch.equal(state[k], loaded[k]) for k in state)
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), pydnet(x))


# -- PyDNet++: transposed convs, leaky ReLU as MAXIMUM/MUL, slices, three outputs, int8 weights --


def _hybrid_input_quantization(module, args):
    """LiteRT's hybrid conv on a float input: symmetric int8 per image, round half away from zero."""
    x = args[0]
    r = x.abs().amax(dim=(1, 2, 3), keepdim=True)
    q = x * (127.0 / r)
    q = (torch.sign(q) * torch.floor(q.abs() + 0.5)).clamp(-127, 127)
    return (q * (r / 127.0),)


def test_pydnetpp_matches_litert_op_by_op():
    """35 of PyDNet++'s 44 conv weights are int8 (a hybrid graph): LiteRT quantizes each such conv's input
    to int8 at run time, which the float student must not do. So each op is fed LiteRT's own input
    tensors (reference kernels, all tensors kept) with that input quantization emulated, and must give
    LiteRT's output: this checks weights, layouts, padding, transposed-conv crop, slices and resizes."""
    model = graph_student_from_tflite(_need(PYDNETPP), output_space="depth").eval()
    assert {op["type"] for op in model.ops} == {"CONV_2D", "LEAKY_RELU", "TRANSPOSE_CONV", "ADD", "CONCATENATION",
                                                "STRIDED_SLICE", "RESIZE_BILINEAR"}  # MAXIMUM(x, 0.2x) fused
    hybrid = [k for k, op in enumerate(model.ops) if op.get("weight_dtype") == "int8"]
    assert len(hybrid) == 35
    for k in hybrid:
        model.layers[k].register_forward_pre_hook(_hybrid_input_quantization)
    image = _images(448, 640)[0]
    it = _interpreter(PYDNETPP, builtin=True)
    _invoke(it, image)
    env = {model.config.graph["input"]["tensor"]: _nchw(image[None])}
    worst, flipped = 0.0, 0
    with torch.no_grad():
        for k, op in enumerate(model.ops):
            ours = model.layers[k](*(env[t] for t in op["inputs"])).permute(0, 2, 3, 1).numpy()
            ref = it.get_tensor(op["outputs"][0])
            err = np.abs(ours - ref) / np.abs(ref).max()
            worst, flipped = max(worst, float(err.max())), flipped + int((err > 1e-5).sum())
            env[op["outputs"][0]] = _nchw(ref)
    print(f"\nPyDNet++ op by op vs LiteRT: max error {worst:.1e} of the tensor's max, {flipped} values > 1e-5")
    # all but a few values that a rounding tie of the emulated int8 input quantization flips
    assert worst < 5e-3 and flipped < 2000


def test_pydnetpp_end_to_end():
    """End to end the float student differs from LiteRT by the int8 activation noise LiteRT adds: as much as
    LiteRT's own two kernel sets (XNNPACK, reference) differ from each other, a few per cent."""
    model = graph_student_from_tflite(_need(PYDNETPP), output_index=0, output_space="depth").eval()
    images = _images(448, 640)
    xnn, builtin = _interpreter(PYDNETPP), _interpreter(PYDNETPP, builtin=True)
    ref = 1 / np.maximum(np.stack([_invoke(xnn, im) for im in images]), 1e-6)
    other = 1 / np.maximum(np.stack([_invoke(builtin, im) for im in images]), 1e-6)
    with torch.no_grad():
        ours = model(_nchw(images)).numpy()
    rel, runtimes = _rel(ours, ref), _rel(other, ref)
    print(f"\nPyDNet++ (disparity) vs LiteRT: max rel {rel.max():.2e}, median rel {np.median(rel):.2e}; "
          f"LiteRT reference vs XNNPACK kernels: median rel {np.median(runtimes):.2e}")
    assert ours.shape == (3, 448, 640) and np.median(rel) < 4 * np.median(runtimes) and np.median(rel) < 0.1
    assert np.corrcoef(ours.flatten(), ref.flatten())[0, 1] > 0.95
    assert freeze_unused(graph_student_from_tflite(PYDNETPP)) != []  # heads of outputs 1 and 2 are unused


# -- small graphs built here: the other ops, errors ------------------------------------------


def _vector(b, start, offsets):
    start(b, len(offsets))
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return b.EndVector()


def build_tflite(tensors: list[tuple], ops: list[tuple], inputs: list[str], outputs: list[str]) -> bytes:
    """A TFLite flatbuffer: tensors (name, shape, data or None); ops (NAME, input names, output names,
    options table name or None, its fields)."""
    index = {t[0]: i for i, t in enumerate(tensors)}
    ops = [(name, [index[t] for t in ins], [index[t] for t in outs], options, values)
           for name, ins, outs, options, values in ops]
    inputs, outputs = [index[t] for t in inputs], [index[t] for t in outputs]
    fb = {n: import_module(f"tflite.{n}") for n in ("Model", "SubGraph", "Tensor", "Buffer", "Operator",
                                                     "OperatorCode")}
    b = flatbuffers.Builder(4096)
    buffers, tensor_offsets = [], []
    for data in [None] + [t[2] for t in tensors if t[2] is not None]:
        vec = b.CreateByteVector(np.ascontiguousarray(data).tobytes()) if data is not None else None
        fb["Buffer"].BufferStart(b)
        if vec is not None:
            fb["Buffer"].BufferAddData(b, vec)
        buffers.append(fb["Buffer"].BufferEnd(b))
    n_const = 0
    for name, shape, data in tensors:
        name_off, shape_off = b.CreateString(name), b.CreateNumpyVector(np.array(shape, np.int32))
        n_const += data is not None
        fb["Tensor"].TensorStart(b)
        fb["Tensor"].TensorAddShape(b, shape_off)
        fb["Tensor"].TensorAddType(b, 2 if data is not None and data.dtype == np.int32 else 0)
        fb["Tensor"].TensorAddBuffer(b, n_const if data is not None else 0)
        fb["Tensor"].TensorAddName(b, name_off)
        tensor_offsets.append(fb["Tensor"].TensorEnd(b))
    names = list(dict.fromkeys(op[0] for op in ops))
    codes = []
    for name in names:
        num = getattr(tflite.BuiltinOperator, name)
        fb["OperatorCode"].OperatorCodeStart(b)
        fb["OperatorCode"].OperatorCodeAddDeprecatedBuiltinCode(b, min(num, 127))
        fb["OperatorCode"].OperatorCodeAddBuiltinCode(b, num)
        fb["OperatorCode"].OperatorCodeAddVersion(b, 1)
        codes.append(fb["OperatorCode"].OperatorCodeEnd(b))
    op_offsets = []
    for name, ins, outs, options, values in ops:
        opts = None
        if options:
            mod = import_module(f"tflite.{options}")
            getattr(mod, f"{options}Start")(b)
            for key, value in values.items():
                getattr(mod, f"{options}Add{key}")(b, value)
            opts = getattr(mod, f"{options}End")(b)
        ins_off, outs_off = b.CreateNumpyVector(np.array(ins, np.int32)), b.CreateNumpyVector(np.array(outs, np.int32))
        fb["Operator"].OperatorStart(b)
        fb["Operator"].OperatorAddOpcodeIndex(b, names.index(name))
        fb["Operator"].OperatorAddInputs(b, ins_off)
        fb["Operator"].OperatorAddOutputs(b, outs_off)
        if opts is not None:
            fb["Operator"].OperatorAddBuiltinOptionsType(b, getattr(tflite.BuiltinOptions, options))
            fb["Operator"].OperatorAddBuiltinOptions(b, opts)
        op_offsets.append(fb["Operator"].OperatorEnd(b))
    sg = fb["SubGraph"]
    t_vec, o_vec = _vector(b, sg.SubGraphStartTensorsVector, tensor_offsets), _vector(b, sg.SubGraphStartOperatorsVector,
                                                                                         op_offsets)
    in_vec, out_vec = b.CreateNumpyVector(np.array(inputs, np.int32)), b.CreateNumpyVector(np.array(outputs, np.int32))
    sg.SubGraphStart(b)
    sg.SubGraphAddTensors(b, t_vec)
    sg.SubGraphAddInputs(b, in_vec)
    sg.SubGraphAddOutputs(b, out_vec)
    sg.SubGraphAddOperators(b, o_vec)
    subgraph = sg.SubGraphEnd(b)
    m = fb["Model"]
    code_vec, sub_vec = _vector(b, m.ModelStartOperatorCodesVector, codes), _vector(b, m.ModelStartSubgraphsVector,
                                                                                   [subgraph])
    buf_vec = _vector(b, m.ModelStartBuffersVector, buffers)
    m.ModelStart(b)
    m.ModelAddVersion(b, 3)
    m.ModelAddOperatorCodes(b, code_vec)
    m.ModelAddSubgraphs(b, sub_vec)
    m.ModelAddBuffers(b, buf_vec)
    b.Finish(m.ModelEnd(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def _zoo_graph() -> bytes:
    """16x24 RGB -> 32x48x1 through every other handled op and padding/resize flavour."""
    rng = np.random.default_rng(0)

    def w(*shape):
        return rng.normal(0, 0.4, shape).astype(np.float32)

    def i32(*values):
        return np.array(values, np.int32)

    tensors = [("im0", [1, 16, 24, 3], None), ("w1", [8, 3, 3, 3], w(8, 3, 3, 3)), ("b1", [8], w(8)),
               ("c1", [1, 8, 12, 8], None), ("wdw", [1, 3, 3, 16], w(1, 3, 3, 16)), ("bdw", [16], w(16)),
               ("dw", [1, 8, 12, 16], None), ("pads", [4, 2], i32([0, 0], [2, 2], [2, 2], [0, 0])),
               ("pad", [1, 12, 16, 16], None), ("wv", [8, 3, 3, 16], w(8, 3, 3, 16)), ("bv", [8], w(8)),
               ("cv", [1, 8, 12, 8], None), ("sig", [1, 8, 12, 8], None), ("add", [1, 8, 12, 8], None),
               ("k", [8], w(8)), ("mul", [1, 8, 12, 8], None), ("tanh", [1, 8, 12, 8], None),
               ("size", [2], i32(16, 24)), ("nn", [1, 16, 24, 8], None), ("ac", [1, 16, 24, 8], None),
               ("hp", [1, 16, 24, 8], None), ("nac", [1, 16, 24, 8], None), ("nlg", [1, 16, 24, 8], None),
               ("cat", [1, 16, 24, 40], None),
               ("floor", [], np.array(0.1, np.float32)), ("max", [1, 16, 24, 40], None),
               ("begin", [4], i32(0, 0, 0, 2)), ("end", [4], i32(0, 0, 0, 20)), ("strides", [4], i32(1, 1, 1, 3)),
               ("slice", [1, 16, 24, 6], None), ("oshape", [4], i32(1, 32, 48, 4)), ("wt", [4, 3, 3, 6], w(4, 3, 3, 6)),
               ("up", [1, 32, 48, 4], None), ("w1x1", [1, 1, 1, 4], w(1, 1, 1, 4)), ("bo", [1], w(1)),
               ("out", [1, 32, 48, 1], None)]
    conv = "Conv2DOptions"
    ops = [("CONV_2D", ["im0", "w1", "b1"], ["c1"], conv,
            {"Padding": 0, "StrideH": 2, "StrideW": 2, "FusedActivationFunction": 3}),  # SAME stride 2, RELU6
           ("DEPTHWISE_CONV_2D", ["c1", "wdw", "bdw"], ["dw"], "DepthwiseConv2DOptions",
            {"Padding": 0, "StrideH": 1, "StrideW": 1, "DepthMultiplier": 2}),
           ("PAD", ["dw", "pads"], ["pad"], None, {}),
           ("CONV_2D", ["pad", "wv", "bv"], ["cv"], conv,
            {"Padding": 1, "StrideH": 1, "StrideW": 1, "DilationHFactor": 2, "DilationWFactor": 2}),
           ("LOGISTIC", ["cv"], ["sig"], None, {}),
           ("ADD", ["c1", "sig"], ["add"], "AddOptions", {"FusedActivationFunction": 1}),
           ("MUL", ["add", "k"], ["mul"], "MulOptions", {}),
           ("TANH", ["mul"], ["tanh"], None, {}),
           ("RESIZE_NEAREST_NEIGHBOR", ["tanh", "size"], ["nn"], "ResizeNearestNeighborOptions",
            {"HalfPixelCenters": True}),
           ("RESIZE_BILINEAR", ["tanh", "size"], ["ac"], "ResizeBilinearOptions", {"AlignCorners": True}),
           ("RESIZE_BILINEAR", ["c1", "size"], ["hp"], "ResizeBilinearOptions", {"HalfPixelCenters": True}),
           ("RESIZE_NEAREST_NEIGHBOR", ["tanh", "size"], ["nac"], "ResizeNearestNeighborOptions",
            {"AlignCorners": True}),
           ("RESIZE_NEAREST_NEIGHBOR", ["c1", "size"], ["nlg"], "ResizeNearestNeighborOptions", {}),
           ("CONCATENATION", ["nn", "ac", "hp", "nac", "nlg"], ["cat"], "ConcatenationOptions", {"Axis": 3}),
           ("MAXIMUM", ["cat", "floor"], ["max"], None, {}),
           ("STRIDED_SLICE", ["max", "begin", "end", "strides"], ["slice"], "StridedSliceOptions",
            {"BeginMask": 7, "EndMask": 7}),
           ("TRANSPOSE_CONV", ["oshape", "wt", "slice"], ["up"], "TransposeConvOptions",
            {"Padding": 0, "StrideH": 2, "StrideW": 2}),  # k3 s2 SAME: TFLite crops one row/column
           ("CONV_2D", ["up", "w1x1", "bo"], ["out"], conv, {"Padding": 1, "StrideH": 1, "StrideW": 1})]
    return build_tflite(tensors, ops, ["im0"], ["out"])


def test_other_ops_match_litert():
    data = _zoo_graph()
    model = graph_student_from_tflite(data).eval()
    assert len(model.ops) == 18 and model.config.encoder == "tflite:bytes (5 convs)"
    image = np.random.default_rng(1).random((16, 24, 3), dtype=np.float32)
    with torch.no_grad():
        ours = model.run(_nchw(image[None]))[0][0, 0].numpy()
    for builtin in (False, True):
        ref = _invoke(_interpreter(data, builtin=builtin), image)
        err = np.abs(ours - ref).max() / np.abs(ref).max()
        print(f"\nsmall graph vs LiteRT ({'reference' if builtin else 'XNNPACK'} kernels): {err:.1e} of max")
        assert ours.shape == (32, 48) and err < 1e-5


def test_unsupported_op_is_named():
    tensors = [("im0", [1, 4, 4, 3], None), ("sq", [1, 4, 4, 3], None)]
    data = build_tflite(tensors, [("SQUARE", ["im0"], ["sq"], None, {})], ["im0"], ["sq"])
    with pytest.raises(ValueError, match=r"unsupported TFLite op 'SQUARE' \(op 0\)"):
        read_tflite(data)


def test_quantized_graph_is_refused():
    with pytest.raises(GraphImportError, match="quantized graph .* only float graphs"):
        read_tflite(_need(FASTDEPTH))


@pytest.mark.parametrize("cut", [0.02, 0.3, 0.9])
def test_corrupt_or_truncated_file_is_a_value_error(cut):
    data = _zoo_graph()
    with pytest.raises(ValueError, match="corrupt or truncated|not a TFLite"):
        read_tflite(data[:int(len(data) * cut)])
    with pytest.raises(ValueError, match="not a TFLite"):
        read_tflite(b"\x00" * 8 + os.urandom(64))


def test_random_student_from_config_and_weights_only_graph(tmp_path):
    graph, weights = read_tflite(_zoo_graph())
    model = GraphStudent(GraphConfig(graph=graph, multiple=2))
    assert set(model.state_dict()) == set(weights)
    assert all(tuple(model.state_dict()[k].shape) == v.shape for k, v in weights.items())
    torch.save({"graph": graph}, tmp_path / "g.pt")
    assert torch.load(tmp_path / "g.pt", weights_only=True)["graph"] == graph
    with pytest.raises(ValueError, match="output_space"):
        GraphStudent(GraphConfig(graph=graph, output_space="inverse"))
