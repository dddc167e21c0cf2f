"""The student: a timm DINOv2 ViT encoder feeding four intermediate layers into a DPT head.

The paper's students are Depth Anything v2 models, so this reproduces DAv2's `depth_anything_v2/dpt.py`
layer for layer; the output is ReLU'd, non-negative disparity. RGB in [0, 1] (ImageNet mean/std applied
inside); sides not multiples of 14 are padded or resized. Position embeddings are resampled as HF's Dinov2
does (bicubic, no antialias), so a converted transformers checkpoint gives the same output at every input
size. `forward(x, return_features=True)` also returns the last tapped layer's tokens, for L_feat.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class StudentConfig:
    encoder: str = "vit_small_patch14_dinov2"  # timm model name
    layers: list[int] = field(default_factory=lambda: [2, 5, 8, 11])  # 0-based blocks fed to the head
    features: int = 64  # DPT fusion width
    out_channels: list[int] = field(default_factory=lambda: [48, 96, 192, 384])  # reassemble widths
    head_features: int = 32  # width of the last 3x3 conv of the output head
    img_size: int = 518  # image size the position embedding is stored for
    encoder_kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments
    fit: str = "pad"  # non-multiples of the patch size: "pad" (reflect) or "resize" (bilinear)
    pos_antialias: bool = False  # False: HF/DINOv2-style bicubic; True: timm's antialiased bicubic

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, dict] = {
    # tiny: DINOv2-S's recipe shrunk to embed 96, depth 4, 3 heads (~0.9M parameters), for tests and the demo
    "tiny": {"encoder_kwargs": {"embed_dim": 96, "depth": 4, "num_heads": 3}, "img_size": 224,
             "layers": [0, 1, 2, 3], "features": 32, "out_channels": [24, 48, 96, 96], "head_features": 16},
    "small": {},
    "base": {"encoder": "vit_base_patch14_dinov2", "features": 128, "out_channels": [96, 192, 384, 768]},
    "large": {"encoder": "vit_large_patch14_dinov2", "layers": [4, 11, 17, 23], "features": 256,
              "out_channels": [256, 512, 1024, 1024]},
}


def build_student(size: str = "small", encoder_weights: str | None = None, **overrides) -> StudentModel:
    """A student of preset `size` (tiny|small|base|large); `overrides` replace StudentConfig fields."""
    if size not in PRESETS:
        raise ValueError(f"unknown student size {size!r}; choose one of {sorted(PRESETS)}")
    model = StudentModel(StudentConfig(**{**PRESETS[size], **overrides}))
    if encoder_weights is None:
        logger.warning("student encoder %s starts from random weights (no encoder_weights file given)",
                       model.config.encoder)
    else:
        load_encoder_weights(model, encoder_weights)
    return model


class ResidualConvUnit(nn.Module):
    """Pre-activation residual unit: x + conv(relu(conv(relu(x))))."""

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """RefineNet fusion: add the refined skip, refine, upsample (to `size` or x2), 1x1 conv."""

    def __init__(self, features: int):
        super().__init__()
        self.res1 = ResidualConvUnit(features)
        self.res2 = ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None, size=None) -> torch.Tensor:
        if skip is not None:
            x = x + self.res1(skip)
        x = self.res2(x)
        resize = {"scale_factor": 2} if size is None else {"size": tuple(size)}
        x = F.interpolate(x, **resize, mode="bilinear", align_corners=True)
        return self.out_conv(x)


def _resize_layer(channels: int, factor: float) -> nn.Module:
    if factor > 1:
        return nn.ConvTranspose2d(channels, channels, kernel_size=int(factor), stride=int(factor))
    if factor == 1:
        return nn.Identity()
    return nn.Conv2d(channels, channels, kernel_size=3, stride=round(1 / factor), padding=1)


class DPTHead(nn.Module):
    """Depth Anything v2 DPT head; `fusions[0]` is the coarsest level.

    The last conv's bias starts at 1: with PyTorch's default init its pre-ReLU output is nearly
    constant (std ~0.005) around a random bias, so about half of all random heads would output 0
    everywhere and get no gradient. Loaded weights replace it.
    """

    factors = (4, 2, 1, 0.5)

    def __init__(self, embed_dim: int, features: int, out_channels: list[int], head_features: int, patch: int):
        super().__init__()
        self.patch = patch
        self.projects = nn.ModuleList(nn.Conv2d(embed_dim, c, 1) for c in out_channels)
        self.resize = nn.ModuleList(_resize_layer(c, f) for c, f in zip(out_channels, self.factors))
        self.layer_rn = nn.ModuleList(nn.Conv2d(c, features, 3, padding=1, bias=False) for c in out_channels)
        self.fusions = nn.ModuleList(FusionBlock(features) for _ in out_channels)
        self.out_conv1 = nn.Conv2d(features, features // 2, 3, padding=1)
        self.out_conv2 = nn.Conv2d(features // 2, head_features, 3, padding=1)
        self.out_conv3 = nn.Conv2d(head_features, 1, 1)
        nn.init.constant_(self.out_conv3.bias, 1.0)  # a random head must not start behind a dead ReLU

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        ph, pw = feats[0].shape[-2:]
        levels = [rn(rs(pj(f))) for f, pj, rs, rn in zip(feats, self.projects, self.resize, self.layer_rn)]
        levels = levels[::-1]  # coarse to fine
        x = None
        for i, (level, fuse) in enumerate(zip(levels, self.fusions)):
            size = levels[i + 1].shape[-2:] if i + 1 < len(levels) else None
            x = fuse(level, size=size) if x is None else fuse(x, level, size=size)
        x = self.out_conv1(x)
        x = F.interpolate(x, (ph * self.patch, pw * self.patch), mode="bilinear", align_corners=True)
        x = F.relu(self.out_conv3(F.relu(self.out_conv2(x))))
        return x[:, 0]


class HFPosEmbedViT(VisionTransformer):
    """timm's VisionTransformer, resampling position embeddings like HF Dinov2 (bicubic, no antialias).

    Only `_pos_embed` differs; a created timm ViT gets this class (`__class__` swap) so that the
    module stays picklable and deep-copyable with the same state dict keys.
    """

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        pos = resample_abs_pos_embed(self.pos_embed, new_size=(H, W), old_size=self.patch_embed.grid_size,
                                     num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens,
                                     antialias=False)
        x = x.view(B, -1, C)
        prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        x = torch.cat(prefix + [x + pos], 1) if self.no_embed_class else torch.cat(prefix + [x], 1) + pos
        return self.pos_drop(x)


class StudentModel(nn.Module):
    """RGB in [0, 1], (B, 3, H, W) -> non-negative disparity (B, H, W)."""

    def __init__(self, config: StudentConfig):
        super().__init__()
        if config.fit not in ("pad", "resize"):
            raise ValueError(f"fit must be 'pad' or 'resize', got {config.fit!r}")
        if len(config.layers) != 4 or len(config.out_channels) != 4:
            raise ValueError("the DPT head needs exactly 4 tapped layers and 4 out_channels")
        self.config = config
        self.encoder = timm.create_model(config.encoder, pretrained=False, num_classes=0, dynamic_img_size=True,
                                         img_size=config.img_size, **config.encoder_kwargs)
        if not hasattr(self.encoder, "forward_intermediates"):
            raise ValueError(f"timm model {config.encoder} has no forward_intermediates")
        if not config.pos_antialias and type(self.encoder) is VisionTransformer and self.encoder.pos_embed is not None:
            self.encoder.__class__ = HFPosEmbedViT  # same modules and keys, HF-style position resampling
        self.patch = self.encoder.patch_embed.patch_size[0]
        self.head = DPTHead(self.encoder.embed_dim, config.features, config.out_channels,
                            config.head_features, self.patch)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Normalised input whose sides are multiples of the patch -> 4 maps (B, C, H/14, W/14)."""
        return self.encoder.forward_intermediates(x, indices=list(self.config.layers), norm=True,
                                                  output_fmt="NCHW", intermediates_only=True, stop_early=True)

    def _fit(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = -h % self.patch, -w % self.patch
        if ph == pw == 0:
            return x
        if self.config.fit == "pad":
            return F.pad(x, (0, pw, 0, ph), mode="reflect")
        size = (max(1, round(h / self.patch)) * self.patch, max(1, round(w / self.patch)) * self.patch)
        return F.interpolate(x, size, mode="bilinear", align_corners=False)

    def _unfit(self, disp: torch.Tensor, h: int, w: int) -> torch.Tensor:
        if disp.shape[-2:] == (h, w):
            return disp
        if self.config.fit == "pad":
            return disp[:, :h, :w]
        return F.interpolate(disp[:, None], (h, w), mode="bilinear", align_corners=False)[:, 0]

    def forward(self, x: torch.Tensor, return_features: bool = False):
        h, w = x.shape[-2:]
        x = self._fit((x - self.mean) / self.std)
        feats = self.encode(x)
        disp = self._unfit(self.head(feats), h, w)
        if return_features:
            return disp, feats[-1].flatten(2).transpose(1, 2)  # last tapped layer, (B, N, C)
        return disp


def load_encoder_weights(model: StudentModel, path: str) -> None:
    """Load encoder weights from a local file in timm or original DINOv2 (`dinov2_vits14`) layout.

    Accepts `.safetensors` or torch files (read with weights_only=True), optionally nested under
    `model`/`state_dict` and prefixed by `module.`, `pretrained.` (a DAv2 checkpoint), `backbone.`
    or `encoder.` (a student checkpoint). DINOv2's chunked blocks (`blocks.0.5.`) are unchunked;
    `mask_token` is dropped and a position embedding of another size is resampled (timm's filter).
    """
    state = _read_state_dict(path)
    for prefix in ("module.", "pretrained.", "backbone.", "encoder."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    state = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state.items()}
    if isinstance(model.encoder, VisionTransformer):
        state = checkpoint_filter_fn(state, model.encoder, antialias=model.config.pos_antialias)
    if isinstance(model.encoder.head, nn.Identity):
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing, unexpected = model.encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"encoder weights {path} do not fit {model.config.encoder}: "
                         f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}")
    logger.info("loaded %d encoder tensors from %s", len(state), path)


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state
