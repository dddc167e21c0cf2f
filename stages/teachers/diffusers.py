"""`diffusers` adapter: diffusion-based depth teachers (optional extra `diffusers`).

* Marigold (default): a `MarigoldDepthPipeline` directory or hub id, run with ensemble size 1, the model's
  own denoising steps and one seeded CPU generator per image, so a target depends on the image only. Its
  `prediction_type` must match the space: "depth" → `affine_depth` with `affine_depth = "invert"`.
* GenPercept (`model = "genpercept:<dir or hub id>"`, Xu et al., aim-uofa/GenPercept): one UNet call on the
  image latent, as its reference `GenPerceptPipeline`; DPT-head variants are not supported.
Weights identity: `hub:<id>@<revision>`, or a hash of every file of a local directory. Config: README.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.config import TeacherCfg
from stages.teachers import Teacher, TeacherSpec
from stages.teachers.hf import ModelRef, parse_model_ref

log = logging.getLogger("dad.teachers.diffusers")

SEED = 0
GENPERCEPT_PREFIX = "genpercept:"
GENPERCEPT_RESOLUTION = 768          # GenPerceptPipeline.default_processing_resolution
GENPERCEPT_LATENT_SCALE = 0.18215    # GenPerceptPipeline.latent_scale_factor (SD 2.1 VAE)
# aim-uofa/GenPercept hf_configs/scheduler_beta_1.0_1.0/scheduler_config.json (used for every
# genpercept-architecture model, whatever scheduler its checkpoint ships).
GENPERCEPT_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_end": 1.0,
    "beta_schedule": "scaled_linear",
    "beta_start": 1.0,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "dynamic_thresholding_ratio": 0.995,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "thresholding": False,
    "timestep_spacing": "leading",
    "trained_betas": None,
}
SPACES = ("disparity", "affine_depth")
MARIGOLD_SPACE = {"depth": "affine_depth", "disparity": "disparity"}   # pipeline prediction_type → space


def split_variant(model: str) -> tuple[str, str]:
    """'genpercept:<location>' → ('genpercept', location); anything else → ('marigold', model)."""
    if model.startswith(GENPERCEPT_PREFIX):
        return "genpercept", model[len(GENPERCEPT_PREFIX):]
    return "marigold", model


def hash_tree(path: str | Path) -> str:
    """sha256 over the relative names and bytes of every non-hidden file below `path`."""
    root = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()[:16]


def weights_identity(ref: ModelRef) -> str:
    return f"local:{hash_tree(ref.location)}" if ref.local else ref.identity


class DiffusersTeacher(Teacher):
    def __init__(self, name: str, tcfg: TeacherCfg):
        self.variant, _ = split_variant(tcfg.model)
        ref = _parse(name, tcfg)
        self.spec = self.describe(name, tcfg, ref)          # refuses a bad config before loading weights
        if not ref.local and ref.revision is None:
            log.warning("teacher %s: hub model %s has no pinned revision; its targets may change upstream",
                        name, ref.location)
        kwargs = {"revision": ref.revision} if ref.revision else {}
        if self.variant == "marigold":
            self._load_marigold(name, tcfg, ref.location, kwargs)
        else:
            self._load_genpercept(name, tcfg, ref.location, kwargs)

    @classmethod
    def describe(cls, name: str, tcfg: TeacherCfg, ref: ModelRef | None = None) -> TeacherSpec:
        variant, _ = split_variant(tcfg.model)
        ref = ref or _parse(name, tcfg)
        if tcfg.output_space not in SPACES:
            raise ValueError(f"teachers.{name}.output_space: a diffusers teacher predicts affine-invariant maps in "
                             f"[0, 1]; use one of {', '.join(SPACES)}, not {tcfg.output_space!r}")
        if tcfg.input_size is not None and tcfg.input_size <= 0:
            raise ValueError(f"teachers.{name}.input_size must be positive (got {tcfg.input_size})")
        if variant == "marigold":
            rule = (f"marigold: longest side {tcfg.input_size or 'model default'}, ensemble 1, "
                    f"model-default steps, seed {SEED}")
        else:
            rule = f"genpercept: longest side {tcfg.input_size or GENPERCEPT_RESOLUTION}, one step"
        return TeacherSpec(name, "diffusers", tcfg.model, tcfg.output_space, rule, tcfg.license, weights_identity(ref))

    # -- Marigold ---------------------------------------------------------------------------------

    def _load_marigold(self, name: str, tcfg: TeacherCfg, location: str, kwargs: dict) -> None:
        from diffusers import MarigoldDepthPipeline

        pipe = MarigoldDepthPipeline.from_pretrained(location, **kwargs)
        pipe.set_progress_bar_config(disable=True)
        expected = MARIGOLD_SPACE.get(pipe.config.prediction_type)
        if expected is None:
            raise ValueError(f"teachers.{name}: the pipeline predicts {pipe.config.prediction_type!r}; the adapter "
                             f"knows {' and '.join(MARIGOLD_SPACE)}")
        if expected != tcfg.output_space:
            raise ValueError(f"teachers.{name}: the pipeline predicts {pipe.config.prediction_type!r}, so "
                             f"output_space must be {expected!r}, not {tcfg.output_space!r}")
        self.steps = pipe.default_denoising_steps
        if not self.steps:
            raise ValueError(f"teachers.{name}: {location} sets no default_denoising_steps in model_index.json")
        self.resolution = tcfg.input_size or pipe.default_processing_resolution
        if not self.resolution:
            raise ValueError(f"teachers.{name}: {location} sets no default_processing_resolution; set input_size")
        if self.resolution % pipe.vae_scale_factor:
            raise ValueError(f"teachers.{name}.input_size: {self.resolution} is not a multiple of the VAE factor "
                             f"{pipe.vae_scale_factor}")
        self.pipe = pipe

    def _predict_marigold(self, x: torch.Tensor) -> torch.Tensor:
        generators = [torch.Generator("cpu").manual_seed(SEED) for _ in range(len(x))]
        out = self.pipe(x, num_inference_steps=self.steps, ensemble_size=1, processing_resolution=self.resolution,
                        match_input_resolution=True, batch_size=len(x), generator=generators, output_type="pt")
        return out.prediction[:, 0]

    # -- GenPercept -------------------------------------------------------------------------------

    def _load_genpercept(self, name: str, tcfg: TeacherCfg, location: str, kwargs: dict) -> None:
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.unet = UNet2DConditionModel.from_pretrained(location, subfolder="unet", **kwargs).eval()
        if self.unet.config.in_channels != 4:
            raise ValueError(f"teachers.{name}: the GenPercept UNet takes the image latent alone (4 channels); this "
                             f"one takes {self.unet.config.in_channels} (a Marigold UNet? drop the "
                             f"{GENPERCEPT_PREFIX!r} prefix)")
        self.vae = AutoencoderKL.from_pretrained(location, subfolder="vae", **kwargs).eval()
        tokenizer = CLIPTokenizer.from_pretrained(location, subfolder="tokenizer", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(location, subfolder="text_encoder", **kwargs).eval()
        ids = tokenizer("", padding="do_not_pad", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            self.text_embed = text_encoder(ids)[0]          # [1, 2, C]; the text encoder is not kept
        scheduler = DDIMScheduler.from_config(GENPERCEPT_SCHEDULER)
        scheduler.set_timesteps(1)
        self.timestep = scheduler.timesteps[0]
        alpha = scheduler.alphas_cumprod[self.timestep]
        self.x0_coef = (float(alpha.sqrt()), float((1 - alpha).sqrt()))   # v-prediction → x0
        self.resolution = tcfg.input_size or GENPERCEPT_RESOLUTION

    def _predict_genpercept(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        rgb = x * 255.0
        factor = min(self.resolution / w, self.resolution / h)
        rgb = F.interpolate(rgb, size=(int(h * factor), int(w * factor)), mode="bilinear", align_corners=False,
                            antialias=True)
        rgb = rgb / 255.0 * 2.0 - 1.0
        latent = self.vae.encode(rgb).latent_dist.mean * GENPERCEPT_LATENT_SCALE
        text = self.text_embed.to(latent).repeat(len(x), 1, 1)
        v = self.unet(latent, self.timestep.to(latent.device), encoder_hidden_states=text).sample
        a, b = self.x0_coef
        pred_latent = a * latent - b * v
        pred = self.vae.decode(pred_latent / GENPERCEPT_LATENT_SCALE).sample.mean(dim=1, keepdim=True)
        pred = (pred.clip(-1.0, 1.0) + 1.0) / 2.0
        pred = F.interpolate(pred, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        return pred.clip(0.0, 1.0)[:, 0]

    # -- common -----------------------------------------------------------------------------------

    def to(self, device):
        super().to(device)
        if self.variant == "marigold":
            self.pipe.to(self.device)
        else:
            self.unet.to(self.device)
            self.vae.to(self.device)
        return self

    @torch.no_grad()
    def predict(self, rgb: torch.Tensor) -> torch.Tensor:
        x = rgb.float().clamp(0, 1).to(self.device)
        pred = self._predict_marigold(x) if self.variant == "marigold" else self._predict_genpercept(x)
        return pred.float()


def _parse(name: str, tcfg: TeacherCfg) -> ModelRef:
    _, location = split_variant(tcfg.model)
    try:
        return parse_model_ref(location, tcfg.revision)
    except ValueError as err:
        raise ValueError(f"teachers.{name}.model ({tcfg.model!r}): {err}") from None
