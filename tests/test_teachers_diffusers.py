"""The `diffusers` teacher adapter on tiny local pipelines (no network): Marigold and GenPercept."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from pipeline.config import TeacherCfg
from stages.teachers import adapters, build_teacher, spec_for
from stages.teachers.diffusers import SEED, DiffusersTeacher, hash_tree

# aim-uofa/GenPercept hf_configs/scheduler_beta_1.0_1.0/scheduler_config.json, verbatim.
GENPERCEPT_SCHEDULER_JSON = """{
  "_class_name": "DDIMScheduler", "_diffusers_version": "0.29.2", "beta_end": 1.0,
  "beta_schedule": "scaled_linear", "beta_start": 1.0, "clip_sample": false, "clip_sample_range": 1.0,
  "dynamic_thresholding_ratio": 0.995, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
  "rescale_betas_zero_snr": false, "sample_max_value": 1.0, "set_alpha_to_one": false,
  "skip_prk_steps": true, "steps_offset": 1, "thresholding": false, "timestep_spacing": "leading",
  "trained_betas": null
}"""
AFFINE = {"output_space": "affine_depth", "affine_depth": "invert"}


# -- tiny models --------------------------------------------------------------------------------

def tiny_tokenizer(folder):
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def tiny_components(tmp, unet_in: int, seed: int = 0) -> dict:
    """SD-shaped components, tiny: UNet (2 levels), VAE (3 levels: factor 4), CLIP text encoder."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(tmp / "tokenizer_src")
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=77, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=unet_in, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}


def save_marigold(path, scheduler: str = "ddim", seed: int = 0, **config):
    if scheduler == "ddim":  # Marigold v1-1 style: DDIM, trailing spacing, v-prediction
        sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction",
                                        timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False)
        steps = 4
    else:  # Marigold-LCM style: noise is injected between steps, through the generator
        sched = diffusers.LCMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction",
                                       clip_sample=False, set_alpha_to_one=False)
        steps = 2
    kw = {"prediction_type": "depth", "default_denoising_steps": steps, "default_processing_resolution": 32} | config
    pipe = diffusers.MarigoldDepthPipeline(**tiny_components(path.parent / f"{path.name}_tok", 8, seed),
                                           scheduler=sched, **kw)
    pipe.save_pretrained(path)
    return path


def save_genpercept(path, unet_in: int = 4, seed: int = 0):
    for sub, module in tiny_components(path.parent / f"{path.name}_tok", unet_in, seed).items():
        module.save_pretrained(path / sub)
    return path


def edit_index(src, dst, **changes):
    shutil.copytree(src, dst)
    index = json.loads((dst / "model_index.json").read_text())
    (dst / "model_index.json").write_text(json.dumps(index | changes))
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers")
    return {"ddim": save_marigold(root / "marigold_ddim", "ddim"),
            "lcm": save_marigold(root / "marigold_lcm", "lcm"),
            "genpercept": save_genpercept(root / "genpercept")}


def marigold(path, **kw) -> TeacherCfg:
    return TeacherCfg(adapter="diffusers", model=str(path), **(AFFINE | kw))


def genpercept(path, **kw) -> TeacherCfg:
    return TeacherCfg(adapter="diffusers", model=f"genpercept:{path}", **({"output_space": "disparity"} | kw))


def test_registered():
    assert adapters()["diffusers"] == "stages.teachers.diffusers:DiffusersTeacher"


# -- Marigold: the adapter is the pipeline, with pinned settings -------------------------------

def direct_marigold(path, rgb, seed=SEED, **kw):
    pipe = diffusers.MarigoldDepthPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(seed) for _ in range(len(rgb))]
    out = pipe(rgb, ensemble_size=1, batch_size=len(rgb), generator=gens, output_type="pt",
               match_input_resolution=False, **kw).prediction
    return F.interpolate(out, size=rgb.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


@pytest.mark.parametrize("sched", ["ddim", "lcm"])
def test_marigold_equals_direct_pipeline_call(models, sched):
    teacher = build_teacher("m", marigold(models[sched])).to("cpu")
    assert isinstance(teacher, DiffusersTeacher) and teacher.variant == "marigold"
    assert (teacher.steps, teacher.resolution) == ({"ddim": 4, "lcm": 2}[sched], 32)
    torch.manual_seed(1)
    rgb = torch.rand(3, 3, 40, 56)
    pred = teacher.predict(rgb)
    assert pred.shape == (3, 40, 56) and pred.dtype == torch.float32
    assert 0 <= pred.min() and pred.max() <= 1

    # the model's own step count and resolution, ensemble 1, one generator per image seeded SEED
    direct = direct_marigold(models[sched], rgb, processing_resolution=32, num_inference_steps=teacher.steps)
    torch.testing.assert_close(pred, direct, rtol=0, atol=1e-6)
    assert torch.equal(teacher.predict(rgb), pred)                          # deterministic across calls
    torch.testing.assert_close(teacher.predict(rgb[1:2])[0], pred[1], rtol=0, atol=1e-5)  # batch-independent
    # the seed matters (the initial latent is noise): pinning it is what makes targets reproducible
    assert not torch.allclose(direct_marigold(models[sched], rgb, seed=SEED + 1, processing_resolution=32), pred)


def test_marigold_input_size_is_processing_resolution(models):
    rgb = torch.rand(2, 3, 40, 56)
    teacher = build_teacher("m", marigold(models["ddim"], input_size=16))
    pred = teacher.predict(rgb)
    direct = direct_marigold(models["ddim"], rgb, processing_resolution=16)
    torch.testing.assert_close(pred, direct, rtol=0, atol=1e-6)
    assert not torch.allclose(pred, build_teacher("m", marigold(models["ddim"])).predict(rgb))
    with pytest.raises(ValueError, match="not a multiple of the VAE factor 4"):
        build_teacher("m", marigold(models["ddim"], input_size=30))


def test_marigold_output_space_follows_prediction_type(models, tmp_path):
    with pytest.raises(ValueError, match="output_space must be 'affine_depth'"):
        build_teacher("m", marigold(models["ddim"], output_space="disparity"))
    disp = edit_index(models["ddim"], tmp_path / "disp", prediction_type="disparity")
    pred = build_teacher("m", marigold(disp, output_space="disparity")).predict(torch.rand(1, 3, 32, 32))
    assert pred.shape == (1, 32, 32)
    with pytest.raises(ValueError, match="output_space must be 'disparity'"):
        build_teacher("m", marigold(disp))
    normals = edit_index(models["ddim"], tmp_path / "normals", prediction_type="normals")
    with pytest.raises(ValueError, match="predicts 'normals'; the adapter knows depth and disparity"):
        build_teacher("m", marigold(normals))
    for space in ("depth", "metric_depth"):  # not affine-invariant maps: refused without loading anything
        with pytest.raises(ValueError, match="use one of disparity, affine_depth"):
            spec_for("m", marigold(models["ddim"], output_space=space))


def test_marigold_needs_steps_and_resolution(models, tmp_path):
    nosteps = edit_index(models["ddim"], tmp_path / "nosteps", default_denoising_steps=None)
    with pytest.raises(ValueError, match="no default_denoising_steps"):
        build_teacher("m", marigold(nosteps))
    nores = edit_index(models["ddim"], tmp_path / "nores", default_processing_resolution=None)
    with pytest.raises(ValueError, match="no default_processing_resolution"):
        build_teacher("m", marigold(nores))
    assert build_teacher("m", marigold(nores, input_size=24)).resolution == 24
    with pytest.raises(ValueError, match="input_size must be positive"):
        spec_for("m", marigold(models["ddim"], input_size=-8))


# -- GenPercept: one step on the image latent ---------------------------------------------------

def genpercept_reference(path, rgb, processing_res):
    """A transcription of GenPerceptPipeline (genpercept_pipeline=True, no customised head, mode
    'depth', one image at a time) on raw diffusers/transformers modules."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resize

    unet = diffusers.UNet2DConditionModel.from_pretrained(str(path), subfolder="unet").eval()
    vae = diffusers.AutoencoderKL.from_pretrained(str(path), subfolder="vae").eval()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(path), subfolder="tokenizer")
    text_encoder = transformers.CLIPTextModel.from_pretrained(str(path), subfolder="text_encoder").eval()
    scheduler = diffusers.DDIMScheduler.from_config(json.loads(GENPERCEPT_SCHEDULER_JSON))
    out = []
    with torch.no_grad():
        for img in rgb:
            x = img[None] * 255.0                                              # [0, 255]
            h, w = x.shape[-2:]
            factor = min(processing_res / w, processing_res / h)
            x = resize(x, (int(h * factor), int(w * factor)), InterpolationMode.BILINEAR, antialias=True)
            x = x / 255.0 * 2.0 - 1.0
            scheduler.set_timesteps(1)
            mean, _ = torch.chunk(vae.quant_conv(vae.encoder(x)), 2, dim=1)
            latent = mean * 0.18215
            ids = tokenizer("", padding="do_not_pad", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            text = text_encoder(ids)[0].repeat((1, 1, 1))
            for t in scheduler.timesteps:
                noise_pred = unet(latent, t, encoder_hidden_states=text).sample
                step = scheduler.step(noise_pred, t, latent)
            pred_latent = step.pred_original_sample
            stacked = vae.decoder(vae.post_quant_conv(pred_latent / 0.18215)).mean(dim=1, keepdim=True)
            pred = (torch.clip(stacked, -1.0, 1.0) + 1.0) / 2.0
            pred = resize(pred, (h, w), InterpolationMode.BILINEAR, antialias=True)
            out.append(pred.squeeze().clip(0, 1))
    return torch.stack(out)


@pytest.mark.parametrize("size", [(40, 56), (20, 24), (32, 32)])  # down-, up-scaled, native
def test_genpercept_equals_reference(models, size):
    teacher = build_teacher("g", genpercept(models["genpercept"], input_size=32)).to("cpu")
    assert teacher.variant == "genpercept" and int(teacher.timestep) == 1
    torch.manual_seed(2)
    rgb = torch.rand(3, 3, *size)
    pred = teacher.predict(rgb)
    assert pred.shape == (3, *size) and pred.dtype == torch.float32
    ref = genpercept_reference(models["genpercept"], rgb, 32)
    torch.testing.assert_close(pred, ref, rtol=0, atol=1e-5)
    assert torch.equal(teacher.predict(rgb), pred)
    torch.testing.assert_close(teacher.predict(rgb[2:3])[0], pred[2], rtol=0, atol=1e-5)


def test_genpercept_default_resolution_and_checks(models, tmp_path):
    teacher = build_teacher("g", genpercept(models["genpercept"]))
    assert teacher.resolution == 768
    assert teacher.spec.input_rule == "genpercept: longest side 768, one step"
    assert not hasattr(teacher, "text_encoder") and teacher.text_embed.shape == (1, 2, 32)  # BOS, EOS: unpadded
    eight = save_genpercept(tmp_path / "eight", unet_in=8)
    with pytest.raises(ValueError, match="image latent alone"):
        build_teacher("g", genpercept(eight))


# -- model references, revision pinning, fingerprints (no network) -----------------------------

@pytest.fixture
def recorded_hub(monkeypatch, models):
    """Replace every from_pretrained the adapter uses: record (class, location, kwargs), serve local files."""
    calls = []

    def patch(cls, local):
        real = cls.from_pretrained

        def load(location, **kwargs):
            if Path(str(location)).exists():  # a pipeline loading its own components from disk
                return real(location, **kwargs)
            calls.append((cls.__name__, location, kwargs))
            return real(str(local), **{k: v for k, v in kwargs.items() if k != "revision"})
        monkeypatch.setattr(cls, "from_pretrained", load)

    patch(diffusers.MarigoldDepthPipeline, models["ddim"])
    for cls in (diffusers.UNet2DConditionModel, diffusers.AutoencoderKL, transformers.CLIPTokenizer,
                transformers.CLIPTextModel):
        patch(cls, models["genpercept"])
    return calls


def test_hub_revision_is_pinned_in_every_load(recorded_hub):
    teacher = build_teacher("m", TeacherCfg(adapter="diffusers", model="prs-eth/marigold-depth-v1-1@abc123", **AFFINE))
    assert recorded_hub == [("MarigoldDepthPipeline", "prs-eth/marigold-depth-v1-1", {"revision": "abc123"})]
    assert teacher.spec.weights_id == "hub:prs-eth/marigold-depth-v1-1@abc123"
    recorded_hub.clear()
    teacher = build_teacher("g", TeacherCfg(adapter="diffusers", model="genpercept:org/genpercept-disparity",
                                            revision="cafe01", output_space="disparity"))
    assert sorted(recorded_hub) == sorted(
        (cls, "org/genpercept-disparity", {"subfolder": sub, "revision": "cafe01"}) for cls, sub in
        [("UNet2DConditionModel", "unet"), ("AutoencoderKL", "vae"), ("CLIPTokenizer", "tokenizer"),
         ("CLIPTextModel", "text_encoder")])
    assert teacher.spec.weights_id == "hub:org/genpercept-disparity@cafe01"


def test_unpinned_hub_model_warns(recorded_hub, caplog):
    with caplog.at_level(logging.WARNING, logger="dad.teachers.diffusers"):
        teacher = build_teacher("m", TeacherCfg(adapter="diffusers", model="org/marigold", **AFFINE))
    assert recorded_hub == [("MarigoldDepthPipeline", "org/marigold", {})]
    assert "no pinned revision" in caplog.text and teacher.spec.weights_id == "hub:org/marigold@main"


def test_bad_model_reference():
    with pytest.raises(ValueError, match=r"teachers\.m\.model"):
        spec_for("m", TeacherCfg(adapter="diffusers", model="genpercept:not a model", output_space="disparity"))


def test_spec_fingerprint_follows_weights_variant_and_settings(models, tmp_path):
    fp = lambda tcfg, name="t": spec_for(name, tcfg).fingerprint
    hub = TeacherCfg(adapter="diffusers", model="prs-eth/marigold-depth-v1-1", revision="aaa", **AFFINE)
    assert fp(hub) == fp(hub, "other")
    assert fp(hub) != fp(hub.model_copy(update={"revision": "bbb"}))
    assert fp(hub) != fp(hub.model_copy(update={"input_size": 512}))
    assert fp(hub) == fp(hub.model_copy(update={"batch_size": 16, "actors": 3}))
    assert fp(hub) != fp(hub.model_copy(update={"model": "genpercept:prs-eth/marigold-depth-v1-1"}))
    assert spec_for("t", hub).input_rule == ("marigold: longest side model default, ensemble 1, "
                                             "model-default steps, seed 0")

    # local: every file under the directory counts, hidden ones do not
    same = save_genpercept(tmp_path / "same")
    other = save_genpercept(tmp_path / "other", seed=1)
    ids = {k: spec_for("t", genpercept(p)).weights_id for k, p in
           (("orig", models["genpercept"]), ("same", same), ("other", other))}
    assert ids["orig"] == ids["same"] != ids["other"] and ids["orig"].startswith("local:")
    (same / ".cache").mkdir()
    (same / ".cache" / "lock").write_text("x")
    assert hash_tree(same) == hash_tree(models["genpercept"])
    before = fp(genpercept(same))
    (same / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(
        (other / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
    assert fp(genpercept(same)) != before
    renamed = shutil.copytree(same, tmp_path / "renamed")
    (renamed / "vae" / "config.json").rename(renamed / "vae" / "config2.json")
    assert hash_tree(renamed) != hash_tree(same)
