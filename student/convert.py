"""Initialise a student from a transformers Depth Anything (v1/v2) checkpoint.

Why: the paper initialises its students from Depth Anything v2 (PAPER.md §5, §10 item 6), and
without a pretrained encoder the distillation drifts (PAPER.md §2.5, iss#35). DAv2 and the
Distill-Any-Depth releases are published in the transformers layout
(`DepthAnythingForDepthEstimation`: a Dinov2 backbone, a reassemble+fusion neck and a 3-conv head),
which is exactly the student's architecture (student/model.py), so conversion is a key rename:

- Dinov2 embeddings -> timm `cls_token`, `pos_embed`, `patch_embed.proj` (`mask_token` is unused at
  inference and dropped); separate query/key/value projections are concatenated into timm's fused
  `qkv` (rows q, k, v); `layer_scale{1,2}.lambda1` -> `ls{1,2}.gamma`; `layernorm` -> `norm`.
  Both the legacy (`attention.attention.query`, on disk) and the transformers>=5 in-memory names
  (`attention.q_proj`) are accepted.
- Backbone `out_indices` count the embedding output as stage 0, so block index = out_index - 1.
- neck `reassemble_stage`/`convs`/`fusion_stage` and `head.conv1..3` map one to one onto the DPT head.
- A relative head's `max_depth` multiplier (1 for every released model) is folded into the last
  conv: ReLU(m·x) = m·ReLU(x) for m > 0. Metric heads (sigmoid output) and SwiGLU (giant) backbones
  are refused with a clear error rather than converted approximately.

Position embeddings: the student resamples them like HF Dinov2 (bicubic, no antialias, to the
exact patch grid), so the converted student reproduces `predicted_depth` at any multiple of 14,
not only at the checkpoint's native size (tests/test_student_model.py checks both).
Reading a directory needs only safetensors/torch, not transformers.
"""

from __future__ import annotations

import json
import os
import re

import torch

from .model import StudentConfig, StudentModel

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
_QKV = re.compile(_BLOCK + r"attention\.(?:attention\.(query|key|value)|([qkv])_proj)\.(weight|bias)$")
_DROPPED = re.compile(r"backbone\.embeddings\.mask_token$")


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
