"""Teacher adapters without network: tiny transformers models saved locally, hub ids, revisions, fingerprints."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from teach_fixtures import tiny_hf_models

from pipeline.config import TeacherCfg
from stages.teachers import build_teacher, resize_to_multiple, spec_for
from stages.teachers.hf import HFTeacher, ModelRef, parse_model_ref

transformers = pytest.importorskip("transformers")

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    return tiny_hf_models(tmp_path_factory.mktemp("hf"))


def _hf(path, **kw) -> TeacherCfg:
    return TeacherCfg(adapter="hf", model=str(path), **kw)


# -- the adapter is the model, with the model's own preprocessing ------------------------------

@pytest.mark.parametrize("kind", ["da", "dpt"])
@pytest.mark.parametrize("side", [42, 70])
def test_hf_output_equals_direct_transformers_call(hf_models, kind, side):
    teacher = build_teacher("t", _hf(hf_models[kind])).to("cpu")
    assert isinstance(teacher, HFTeacher)
    torch.manual_seed(side)
    rgb = torch.rand(3, 3, side, side)
    pred = teacher.predict(rgb)

    pixel_values = teacher.preprocess(rgb)
    assert pixel_values.shape == (3, 3, 56, 56)  # the processor's rule: size 56, multiple of 14
    model = transformers.AutoModelForDepthEstimation.from_pretrained(str(hf_models[kind])).eval()
    with torch.no_grad():
        direct = model(pixel_values=pixel_values).predicted_depth
    direct = F.interpolate(direct[:, None], size=(side, side), mode="bilinear", align_corners=False)[:, 0]
    assert pred.shape == (3, side, side) and pred.dtype == torch.float32
    assert torch.equal(pred, direct)
    # Batching does not change a sample's prediction (no cross-sample state).
    assert torch.allclose(teacher.predict(rgb[1:2])[0], pred[1], atol=1e-5)


@pytest.mark.parametrize("kind", ["da", "dpt"])
def test_hf_preprocessing_uses_processor_mean_std_and_size(hf_models, kind):
    teacher = build_teacher("t", _hf(hf_models[kind]))
    levels = torch.tensor([0.0, 0.25, 1.0]).view(1, 3, 1, 1)
    rgb = levels.expand(2, 3, 42, 42).contiguous()
    pv = teacher.preprocess(rgb)
    expected = ((levels[0] - IMAGENET_MEAN) / IMAGENET_STD).expand(3, 56, 56)
    assert pv.shape == (2, 3, 56, 56)
    assert torch.allclose(pv[0], expected, atol=1e-5) and torch.allclose(pv[1], expected, atol=1e-5)
    # input_size overrides the processor's size (the multiple-of-14 rule still applies)
    small = build_teacher("t", _hf(hf_models[kind], input_size=28))
    assert small.preprocess(rgb).shape == (2, 3, 28, 28)
    assert small.predict(rgb).shape == (2, 42, 42)


def test_hf_depth_anything_keeps_aspect_ratio(hf_models):
    teacher = build_teacher("t", _hf(hf_models["da"]))
    rgb = torch.rand(1, 3, 56, 112)
    pv = teacher.preprocess(rgb)
    assert pv.shape[-2] % 14 == 0 and pv.shape[-1] % 14 == 0
    assert pv.shape[-1] == 2 * pv.shape[-2]
    assert teacher.predict(rgb).shape == (1, 56, 112)


# -- model references and revision pinning (no network) ----------------------------------------

def test_parse_model_ref(tmp_path):
    assert parse_model_ref("depth-anything/Depth-Anything-V2-Small-hf") == ModelRef(
        "depth-anything/Depth-Anything-V2-Small-hf", None, False)
    assert parse_model_ref("Intel/dpt-hybrid-midas@1a2b3c") == ModelRef("Intel/dpt-hybrid-midas", "1a2b3c", False)
    assert parse_model_ref("Intel/dpt-large", revision="deadbeef") == ModelRef("Intel/dpt-large", "deadbeef", False)
    assert parse_model_ref("Intel/dpt-large@v1", revision="v1") == ModelRef("Intel/dpt-large", "v1", False)
    assert parse_model_ref("org/name").identity == "hub:org/name@main"
    assert parse_model_ref("org/name@abc").identity == "hub:org/name@abc"
    with pytest.raises(ValueError, match="revision given twice"):
        parse_model_ref("Intel/dpt-large@v1", revision="v2")
    for garbage in ("not a model", "a/b/c", "@rev", "org/", "/name", "org name/x", ""):
        with pytest.raises(ValueError):
            parse_model_ref(garbage)
    local = parse_model_ref(str(tmp_path))
    assert local.local and local.location == str(tmp_path) and local.revision is None
    assert parse_model_ref(f"file://{tmp_path}") == local
    assert local.identity.startswith("local:")
    with pytest.raises(ValueError, match="does not exist"):
        parse_model_ref(str(tmp_path / "missing"))


@pytest.fixture
def recorded_hub(monkeypatch, hf_models):
    """Replace from_pretrained: record (location, kwargs), serve the local tiny DA model."""
    calls = []
    real_model = transformers.AutoModelForDepthEstimation.from_pretrained
    real_proc = transformers.AutoImageProcessor.from_pretrained

    def fake(real):
        def load(location, **kwargs):
            calls.append((location, kwargs))
            return real(str(hf_models["da"]))
        return load

    monkeypatch.setattr(transformers.AutoModelForDepthEstimation, "from_pretrained", fake(real_model))
    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", fake(real_proc))
    return calls


def test_hub_revision_is_pinned_in_every_load(recorded_hub):
    teacher = build_teacher("t", TeacherCfg(adapter="hf", model="depth-anything/Depth-Anything-V2-Small-hf@3f1a7c"))
    assert recorded_hub == [("depth-anything/Depth-Anything-V2-Small-hf", {"revision": "3f1a7c"})] * 2
    assert teacher.spec.weights_id == "hub:depth-anything/Depth-Anything-V2-Small-hf@3f1a7c"
    recorded_hub.clear()
    build_teacher("t", TeacherCfg(adapter="hf", model="org/model", revision="cafe01"))
    assert recorded_hub == [("org/model", {"revision": "cafe01"})] * 2


def test_unpinned_hub_model_warns(recorded_hub, caplog):
    with caplog.at_level(logging.WARNING, logger="dad.teachers.hf"):
        teacher = build_teacher("t", TeacherCfg(adapter="hf", model="org/model"))
    assert recorded_hub == [("org/model", {})] * 2
    assert "no pinned revision" in caplog.text
    assert teacher.spec.weights_id == "hub:org/model@main"


def test_local_directory_loads_without_revision_kwargs(monkeypatch, hf_models):
    calls = []
    real = transformers.AutoModelForDepthEstimation.from_pretrained

    def load(location, **kwargs):
        calls.append((location, kwargs))
        return real(location, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForDepthEstimation, "from_pretrained", load)
    build_teacher("t", _hf(hf_models["dpt"]))
    assert calls == [(str(hf_models["dpt"]), {})]


# -- fingerprints -------------------------------------------------------------------------------

def test_spec_fingerprint_follows_revision_weights_and_settings(tmp_path, hf_models):
    fp = lambda tcfg, name="t": spec_for(name, tcfg).fingerprint
    hub = TeacherCfg(adapter="hf", model="org/model", revision="aaa")
    assert fp(hub) == fp(hub.model_copy(update={"revision": "aaa"}))
    assert fp(hub) != fp(hub.model_copy(update={"revision": "bbb"}))
    assert fp(hub) != fp(hub.model_copy(update={"revision": None}))
    assert fp(hub, "a") == fp(hub, "b")  # renaming a teacher does not change its targets
    assert fp(hub) != fp(hub.model_copy(update={"input_size": 518}))
    assert fp(hub) != fp(hub.model_copy(update={"output_space": "depth"}))
    assert fp(hub) == fp(hub.model_copy(update={"batch_size": 16, "actors": 3}))  # how, not what

    # local weights: the identity is a hash of the files, so new weights → new fingerprint
    same = tiny_hf_models(tmp_path / "same", seed=0)["da"]
    other = tiny_hf_models(tmp_path / "other", seed=1)["da"]
    ids = {k: spec_for("t", _hf(p)).weights_id for k, p in
           (("orig", hf_models["da"]), ("same", same), ("other", other))}
    assert ids["orig"] == ids["same"] != ids["other"]
    before = fp(_hf(same))
    (same / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    assert fp(_hf(same)) != before


# -- checkpoint adapter (a student of this project as a teacher) -------------------------------

def test_checkpoint_teacher_is_the_student(tmp_path):
    ckpt_mod = pytest.importorskip("student.checkpoint")
    model_mod = pytest.importorskip("student.model")
    torch.manual_seed(0)
    model = model_mod.build_student("tiny").eval()
    path = tmp_path / "student.pt"
    ckpt_mod.save_checkpoint(model, str(path))
    tcfg = TeacherCfg(adapter="checkpoint", model=str(path), input_size=28)
    teacher = build_teacher("self", tcfg).to("cpu")
    rgb = torch.rand(2, 3, 42, 42)
    with torch.no_grad():
        direct = model(resize_to_multiple(rgb, 28))
    direct = F.interpolate(direct[:, None], size=(42, 42), mode="bilinear", align_corners=False)[:, 0]
    assert torch.equal(teacher.predict(rgb), direct)
    assert teacher.spec.input_rule == "short side 28, multiple of 14"

    fp = spec_for("self", tcfg).fingerprint
    torch.manual_seed(1)
    ckpt_mod.save_checkpoint(model_mod.build_student("tiny"), str(path))
    assert spec_for("self", tcfg).fingerprint != fp
    with pytest.raises(ValueError, match="not found"):
        spec_for("self", tcfg.model_copy(update={"model": str(tmp_path / "nope.pt")}))
