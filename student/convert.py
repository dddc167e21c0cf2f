"""Initialise a student from a transformers Depth Anything (v1/v2) checkpoint, and export one as such.

The paper initialises its students from Depth Anything v2. DAv2 and the Distill-Any-Depth releases are
published in the transformers layout, which is exactly the student's architecture, so conversion is a key
rename (`_RENAMES`; q/k/v fused into timm's `qkv`; a relative head's `max_depth` folded into the last conv)
and reproduces `predicted_depth` at any multiple of 14. Metric heads and SwiGLU backbones are refused.
`save_depth_anything` runs the tables backwards and checks the result before anything is written.
"""

from __future__ import annotations

import json
import os
import re

import fsspec
import torch
from timm.models.vision_transformer import Attention, Block, Mlp
from torch import nn

from .model import IMAGENET_MEAN, IMAGENET_STD, HFPosEmbedViT, StudentConfig, StudentModel

_TIMM_BY_WIDTH = {384: "vit_small_patch14_dinov2", 768: "vit_base_patch14_dinov2",
                  1024: "vit_large_patch14_dinov2"}

_BLOCK = r"backbone\.encoder\.layer\.(\d+)\."
_RENAMES = [
    (r"backbone\.embeddings\.cls_token$", "encoder.cls_token"),
    (r"backbone\.embeddings\.position_embeddings$", "encoder.pos_embed"),
    (r"backbone\.embeddings\.patch_embeddings\.projection\.", "encoder.patch_embed.proj."),
    (_BLOCK + r"norm([12])\.", r"encoder.blocks.\1.norm\2."),
    (_BLOCK + r"attention\.(?:output\.dense|o_proj)\.", r"encoder.blocks.\1.attn.proj."),
    (_BLOCK + r"layer_scale([12])\.lambda1$", r"encoder.blocks.\1.ls\2.gamma"),
    (_BLOCK + r"mlp\.fc([12])\.", r"encoder.blocks.\1.mlp.fc\2."),
    (r"backbone\.layernorm\.", "encoder.norm."),
    (r"neck\.reassemble_stage\.layers\.(\d+)\.projection\.", r"head.projects.\1."),
    (r"neck\.reassemble_stage\.layers\.(\d+)\.resize\.", r"head.resize.\1."),
    (r"neck\.convs\.(\d+)\.", r"head.layer_rn.\1."),
    (r"neck\.fusion_stage\.layers\.(\d+)\.projection\.", r"head.fusions.\1.out_conv."),
    (r"neck\.fusion_stage\.layers\.(\d+)\.residual_layer([12])\.convolution([12])\.",
     r"head.fusions.\1.res\2.conv\3."),
    (r"head\.conv([123])\.", r"head.out_conv\1."),
]
_QKV_NAMES = ("query", "key", "value")  # the order of the rows of timm's fused qkv
_QKV = re.compile(_BLOCK + rf"attention\.(?:attention\.({'|'.join(_QKV_NAMES)})|([qkv])_proj)\.(weight|bias)$")
_DROPPED = re.compile(r"backbone\.embeddings\.mask_token$")
_TIMM_QKV = re.compile(r"encoder\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")
_GROUP = re.compile(r"\((\?:)?([^()]*)\)")


def student_from_depth_anything(source) -> StudentModel:
    """A student equal to a transformers Depth Anything model (an instance or a saved directory)."""
    config, state = _read_hf(source)
    student = StudentModel(student_config_from_hf(config))
    student.load_state_dict(convert_state_dict(state, config), strict=True)
    return student


def student_config_from_hf(config: dict) -> StudentConfig:
    """StudentConfig for a `DepthAnythingConfig.to_dict()`; raises for what the student cannot hold."""
    bb = config.get("backbone_config")
    if not isinstance(bb, dict) or bb.get("model_type") != "dinov2":
        raise ValueError("only Depth Anything models with an inline Dinov2 backbone_config can be converted")
    _require(bb, "use_swiglu_ffn", False, "SwiGLU (giant) backbones are not supported")
    _require(bb, "hidden_act", "gelu", "the timm DINOv2 MLP uses exact GELU")
    _require(bb, "apply_layernorm", True, "DAv2 feeds LayerNorm-ed features to the head")
    _require(bb, "qkv_bias", True, "timm DINOv2 attention has a qkv bias")
    _require(bb, "layer_norm_eps", 1e-6, "timm DINOv2 uses LayerNorm eps 1e-6")
    _require(config, "reassemble_factors", [4, 2, 1, 0.5], "the DPT head resizes x4, x2, x1, x0.5")
    _require(config, "head_in_index", -1, "the head reads the finest fusion output")
    _require(config, "depth_estimation_type", "relative", "metric (sigmoid) heads are not students")
    width = bb["hidden_size"]
    out_indices = bb.get("out_indices") or [int(name.removeprefix("stage")) for name in bb.get("out_features", [])]
    if config.get("reassemble_hidden_size", width) != width or len(out_indices) != 4:
        raise ValueError("expected 4 out_indices and reassemble_hidden_size == backbone hidden_size")
    mlp = bb.get("intermediate_size") or int(width * bb.get("mlp_ratio", 4))
    encoder_kwargs = {"embed_dim": width, "depth": bb["num_hidden_layers"], "num_heads": bb["num_attention_heads"],
                      "mlp_ratio": mlp / width, "patch_size": bb["patch_size"]}
    return StudentConfig(encoder=_TIMM_BY_WIDTH.get(width, "vit_small_patch14_dinov2"),
                         layers=[i - 1 for i in out_indices], features=config["fusion_hidden_size"],
                         out_channels=list(config["neck_hidden_sizes"]), head_features=config["head_hidden_size"],
                         img_size=bb["image_size"], encoder_kwargs=encoder_kwargs, pos_antialias=False)


def convert_state_dict(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Rename a transformers Depth Anything state dict into the student's keys."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if _DROPPED.match(key):
            continue
        if m := _QKV.match(key):
            block, part = m.group(1), (m.group(2) or m.group(3))[0]  # "query" -> "q"
            qkv.setdefault((block, m.group(4)), {})[part] = value
            continue
        for pattern, repl in _RENAMES:
            if re.match(pattern, key):
                out[re.sub("^" + pattern, repl, key)] = value
                break
        else:
            raise ValueError(f"unexpected key in Depth Anything state dict: {key}")
    for (block, kind), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ValueError(f"block {block} {kind}: need query, key and value, got {sorted(parts)}")
        out[f"encoder.blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    scale = float(config.get("max_depth", 1) or 1)
    if scale <= 0:
        raise ValueError(f"max_depth must be positive, got {scale}")
    if scale != 1:
        for kind in ("weight", "bias"):
            out[f"head.out_conv3.{kind}"] = out[f"head.out_conv3.{kind}"] * scale
    return out


def save_depth_anything(model: StudentModel, directory) -> None:
    """Write `model` as a transformers `DepthAnythingForDepthEstimation` directory (config.json,
    model.safetensors, preprocessor_config.json) that `from_pretrained` and `pipeline("depth-estimation")`
    load; `directory` is a path or an fsspec URL. Refuses (ValueError, nothing written) what it cannot hold."""
    from safetensors.torch import save

    config = hf_config_from_student(model.config)
    student = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state = _to_depth_anything(student)
    back = convert_state_dict(state, config)
    if back.keys() != student.keys() or not all(torch.equal(back[k], v) for k, v in student.items()):
        raise RuntimeError("the inverse of _RENAMES does not convert back exactly; fix student/convert.py")
    from transformers import DepthAnythingConfig

    files = {"config.json": DepthAnythingConfig.from_dict(config).to_json_string().encode(),
             "model.safetensors": save(state, metadata={"format": "pt"}),
             "preprocessor_config.json": json.dumps(_processor_config(config), indent=2).encode()}
    fs, root = fsspec.core.url_to_fs(os.fspath(directory))
    fs.makedirs(root, exist_ok=True)
    for name, data in files.items():
        fs.pipe_file(f"{root.rstrip('/')}/{name}", data)


def hf_config_from_student(config: StudentConfig) -> dict:
    """The `DepthAnythingConfig.to_dict()` of a model computing what `StudentModel(config)` does (the inverse
    of `student_config_from_hf`). Raises ValueError naming the field transformers has no equivalent for."""
    if config.pos_antialias:
        raise ValueError("cannot export pos_antialias=True: transformers' Dinov2 resamples position embeddings "
                         "without antialiasing (it would differ off the native size)")
    with torch.device("meta"):
        student = StudentModel(config)
    encoder = student.encoder
    _check_encoder(config, encoder)
    width, depth = encoder.embed_dim, len(encoder.blocks)
    hidden = encoder.blocks[0].mlp.fc1.out_features
    if hidden % width:
        raise ValueError(f"cannot export encoder_kwargs mlp_ratio={hidden / width:g}: transformers' "
                         "Dinov2Config.mlp_ratio is an integer")
    taken = sorted({i + depth if i < 0 else i for i in config.layers})  # timm takes blocks in block order
    if len(taken) != 4 or not 0 <= taken[0] <= taken[-1] < depth:
        raise ValueError(f"cannot export layers={config.layers}: need 4 distinct blocks of the encoder's {depth}")
    (size, size_w), patch = encoder.patch_embed.img_size, student.patch
    if size != size_w or encoder.patch_embed.patch_size != (patch, patch):
        raise ValueError(f"cannot export img_size={config.img_size!r} / patch {encoder.patch_embed.patch_size}: "
                         "transformers' Dinov2 position embedding is a square grid of square patches")
    backbone = {"model_type": "dinov2", "hidden_size": width, "num_hidden_layers": depth,
                "num_attention_heads": encoder.blocks[0].attn.num_heads, "mlp_ratio": hidden // width,
                "hidden_act": "gelu", "layer_norm_eps": 1e-6, "qkv_bias": True, "use_swiglu_ffn": False,
                "image_size": size, "patch_size": patch, "num_channels": 3, "apply_layernorm": True,
                "reshape_hidden_states": False, "out_indices": [i + 1 for i in taken],
                "out_features": [f"stage{i + 1}" for i in taken]}
    hf = {"model_type": "depth_anything", "architectures": ["DepthAnythingForDepthEstimation"],
          "backbone_config": backbone, "patch_size": patch, "reassemble_hidden_size": width,
          "reassemble_factors": list(student.head.factors), "neck_hidden_sizes": list(config.out_channels),
          "fusion_hidden_size": config.features, "head_hidden_size": config.head_features, "head_in_index": -1,
          "depth_estimation_type": "relative", "max_depth": 1}
    _check_shapes(hf, student)
    return hf


def _check_encoder(config: StudentConfig, encoder: nn.Module) -> None:
    """Refuse what transformers' Dinov2 computes differently but the weights' names and shapes cannot show."""
    name = f"encoder={config.encoder!r} (encoder_kwargs {config.encoder_kwargs})"
    if type(encoder) is not HFPosEmbedViT:
        raise ValueError(f"cannot export {name}: only timm VisionTransformers with a position embedding "
                         "(DINOv2) have a transformers Dinov2 equivalent")
    if encoder.num_prefix_tokens != 1 or encoder.cls_token is None or encoder.no_embed_class:
        raise ValueError(f"cannot export {name}: transformers' Dinov2 has one class token, no register tokens, "
                         "and adds the position embedding to it")
    for block in encoder.blocks:
        mlp, attn = block.mlp, block.attn
        if type(block) is not Block or type(attn) is not Attention or type(mlp) is not Mlp:
            raise ValueError(f"cannot export {name}: needs timm's pre-norm Block, Attention and Mlp (the Dinov2 "
                             f"layer), got {type(block).__name__}/{type(attn).__name__}/{type(mlp).__name__}")
        if not isinstance(mlp.act, nn.GELU) or mlp.act.approximate != "none":
            raise ValueError(f"cannot export {name}: transformers' Dinov2 MLP uses exact GELU, not {mlp.act}")
    eps = {m.eps for m in encoder.modules() if isinstance(m, nn.LayerNorm)}
    if eps != {1e-6}:
        raise ValueError(f"cannot export {name}: transformers' Dinov2 LayerNorms use eps 1e-6, got {sorted(eps)}")


def _check_shapes(hf: dict, student: StudentModel) -> None:
    """Refuse unless transformers builds, from `hf`, exactly the student's tensors (names and shapes)."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation

    with torch.device("meta"):
        reference = DepthAnythingForDepthEstimation(DepthAnythingConfig.from_dict(hf))
    want = {k: tuple(v.shape) for k, v in convert_state_dict(reference.state_dict(), hf).items()}
    have = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    if want != have:
        diff = sorted(set(want.items()) ^ set(have.items()))
        raise ValueError(f"cannot export encoder_kwargs {student.config.encoder_kwargs}: transformers' Depth Anything "
                         f"and the student differ in {len(diff)} weights, e.g. {diff[:4]} (name, shape)")


def _to_depth_anything(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The student's state dict under transformers' on-disk Depth Anything names (inverse of convert_state_dict)."""
    width = state["encoder.cls_token"].shape[-1]
    out = {_template(_DROPPED.pattern)[0]: state["encoder.cls_token"].new_zeros(1, width)}  # unused, as released
    for key, value in state.items():
        if m := _TIMM_QKV.match(key):
            block, kind = m.groups()
            for name, part in zip(_QKV_NAMES, value.chunk(3)):
                out[f"backbone.encoder.layer.{block}.attention.attention.{name}.{kind}"] = part.clone()
            continue
        for pattern, template in _EXPORT:
            if m := pattern.match(key):
                out[m.expand(template) + key[m.end():]] = value.contiguous()
                break
        else:
            raise ValueError(f"cannot export {key}: transformers' Depth Anything has no such weight")
    return out


def _template(pattern: str) -> tuple[str, list[str]]:
    """A `_RENAMES` pattern as a re template (capturing groups -> \\g<gK>, `(?:disk|memory)` -> disk) + groups."""
    groups: list[str] = []

    def slot(m: re.Match) -> str:
        if m.group(1):
            return m.group(2).split("|")[0]
        groups.append(m.group(2))
        return f"\\g<g{len(groups)}>"

    return _GROUP.sub(slot, pattern).removesuffix("$").replace("\\.", "."), groups


def _inverse(pattern: str, repl: str) -> tuple[re.Pattern, str]:
    """(student key pattern, transformers key template) undoing one `_RENAMES` entry."""
    template, groups = _template(pattern)
    parts = re.split(r"\\(\d)", repl)  # literal, group number, literal, ...
    student = "".join(re.escape(p) if i % 2 == 0 else f"(?P<g{p}>{groups[int(p) - 1]})" for i, p in enumerate(parts))
    return re.compile(student + ("$" if pattern.endswith("$") else "")), template


_EXPORT = [_inverse(pattern, repl) for pattern, repl in _RENAMES]


def _processor_config(hf: dict) -> dict:
    """DAv2's preprocessor_config.json at the student's native size: keep aspect, multiple of the patch, bicubic."""
    size, patch = hf["backbone_config"]["image_size"], hf["patch_size"]
    return {"image_processor_type": "DPTImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
            "keep_aspect_ratio": True, "ensure_multiple_of": patch, "resample": 3, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(IMAGENET_MEAN),
            "image_std": list(IMAGENET_STD), "do_pad": False}


def _require(config: dict, key: str, expected, why: str) -> None:
    value = config.get(key, expected)
    if value != expected:
        raise ValueError(f"cannot convert: {key}={value!r}, student needs {expected!r} ({why})")


def _read_hf(source) -> tuple[dict, dict[str, torch.Tensor]]:
    if hasattr(source, "config") and hasattr(source, "state_dict"):
        return source.config.to_dict(), source.state_dict()
    directory = os.fspath(source)
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    return config, _read_weights(directory)


def _read_weights(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = os.path.join(directory, "model.safetensors")
    index = single + ".index.json"
    if os.path.exists(single):
        return load_file(single)
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return {k: v for name in files for k, v in load_file(os.path.join(directory, name)).items()}
    legacy = os.path.join(directory, "pytorch_model.bin")
    if os.path.exists(legacy):
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no model.safetensors(.index.json) or pytorch_model.bin in {directory}")
