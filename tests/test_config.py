"""Config: validation names the key and the file, overrides are checked like the file, nothing is written."""

from __future__ import annotations

import tomllib

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import ConfigError, DadConfig, apply_overrides, fingerprint, load_config, parse_override

MINIMAL = '[run]\nroot = "{root}"\n[corpus]\nsources = ["photos/**/*.jpg"]\n'


@pytest.fixture
def cfg_file(tmp_path):
    """Write a config = MINIMAL + extra text; returns (path, root) with root not yet existing."""
    root = tmp_path / "root"

    def _write(extra: str = "", name: str = "run.toml"):
        path = tmp_path / name
        path.write_text(MINIMAL.format(root=root) + extra)
        return path

    _write.root = root
    return _write


def _error(path, overrides=None, root=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, root=root, overrides=overrides or [])
    return str(info.value)


def test_minimal_config_fills_defaults(cfg_file):
    cfg = load_config(cfg_file())
    assert cfg.run.root == str(cfg_file.root)
    assert cfg.corpus.sources == ["photos/**/*.jpg"]
    assert (cfg.run.seed, cfg.corpus.shard_size, cfg.crops.min_region, cfg.crops.patch, cfg.crops.local_count) == (
        0, 64, 644, 560, 4)
    assert cfg.teachers == {}
    assert cfg.score.policy == "paper" and cfg.train.steps == 200
    assert not cfg_file.root.exists()


@pytest.mark.parametrize("extra, key", [
    ("[train]\nstepz = 3\n", "train.stepz"),
    ("[trian]\nsteps = 3\n", "trian"),
    ("[crops]\nmin_region = 700\nlocal = 3\n", "crops.local"),
    ('[teachers.a]\nadapter = "hf"\nmodel = "m"\nbatchsize = 2\n', "teachers.a.batchsize"),
    ("[corpus.x]\n", "corpus.x"),
])
def test_unknown_key_is_named_with_the_file(cfg_file, extra, key):
    path = cfg_file(extra)
    msg = _error(path)
    assert str(path) in msg
    assert f"  {key}: unknown key" in msg
    assert not cfg_file.root.exists()


@pytest.mark.parametrize("extra, key, words", [
    ('[train]\nsteps = "many"\n', "train.steps", "integer"),
    ("[train]\nsteps = 0\n", "train.steps", "greater than or equal to 1"),
    ('[corpus2]\n', "corpus2", "unknown key"),
    ('[crops]\npatch = 1.5\n', "crops.patch", "integer"),
    ('[score]\npolicy = "random"\n', "score.policy", "'paper'"),
    ('[train]\nuse_sc = "perhaps"\n', "train.use_sc", "boolean"),
])
def test_wrong_type_is_named(cfg_file, extra, key, words):
    path = cfg_file(extra)
    msg = _error(path)
    assert str(path) in msg
    line = next(ln for ln in msg.splitlines() if ln.strip().startswith(f"{key}:"))
    assert words in line
    assert not cfg_file.root.exists()


def test_invalid_toml_and_missing_file_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nroot = 1\n")
    assert f"invalid TOML in {bad}" in _error(bad)
    dup = tmp_path / "dup.toml"
    dup.write_text('[run]\nroot = "r"\n[run]\nseed = 1\n')
    assert f"invalid TOML in {dup}" in _error(dup)
    missing = tmp_path / "nope.toml"
    assert _error(missing) == f"config file not found: {missing}"


def test_missing_required_keys_are_named(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[run]\nseed = 1\n")
    msg = _error(path)
    assert "  run.root: Field required" in msg and "  corpus: Field required" in msg
    path.write_text('[run]\nroot = "r"\n[corpus]\nsources = []\n')
    assert "corpus.sources: List should have at least 1 item" in _error(path)


@pytest.mark.parametrize("extra, key, words", [
    ("[crops]\npatch = 700\n", "crops", "crops.patch (700) must not exceed crops.min_region (644)"),
    ('[score]\npolicy = "filter"\n', "score", "score.policy = 'filter' needs score.filter_threshold"),
    ('[teachers.rel]\nadapter = "hf"\nmodel = "m"\noutput_space = "affine_depth"\n', "teachers.rel",
     "output_space 'affine_depth' cannot be turned into disparity exactly"),
    ("[crops]\nglobal_size = 500\n", "crops", "crops.global_size (500) must be a multiple of 14"),
    ("[train]\nuse_sc = false\nuse_lg = false\n", "train", "train.use_sc and train.use_lg cannot both be false"),
    ("[eval]\nresolution = 500\n", "eval", "eval.resolution (500) must be a multiple of 14"),
])
def test_impossible_combinations_are_refused(cfg_file, extra, key, words):
    path = cfg_file(extra)
    msg = _error(path)
    assert str(path) in msg
    assert f"  {key}: {words}" in msg
    assert not cfg_file.root.exists()


def test_memory_root_with_ray_executor_is_refused(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text('[run]\nroot = "memory://x"\nexecutor = "ray"\n[corpus]\nsources = ["a"]\n')
    assert "run.executor = 'ray' cannot use a memory:// run.root" in _error(path)
    assert load_config(path, overrides=['run.executor="inline"']).run.executor == "inline"


def test_affine_depth_accepted_when_asked(cfg_file):
    path = cfg_file('[teachers.rel]\nadapter = "hf"\nmodel = "m"\noutput_space = "affine_depth"\n'
                    'affine_depth = "invert"\n')
    assert load_config(path).teachers["rel"].affine_depth == "invert"


# -- overrides ---------------------------------------------------------------------------------

def test_parse_override_literals():
    assert parse_override("train.steps=10") == (["train", "steps"], 10)
    assert parse_override("train.lr_encoder=1e-5") == (["train", "lr_encoder"], 1e-5)
    assert parse_override("train.amp=false") == (["train", "amp"], False)
    assert parse_override('run.root="s3://b/run"') == (["run", "root"], "s3://b/run")
    assert parse_override("run.root=s3://b/run") == (["run", "root"], "s3://b/run")  # bare → string
    assert parse_override('corpus.sources=["a", "b"]') == (["corpus", "sources"], ["a", "b"])
    assert parse_override("teachers.t.resources={GPU_A = 1}") == (["teachers", "t", "resources"], {"GPU_A": 1})


def test_overrides_apply_and_validate(cfg_file):
    path = cfg_file("[train]\nsteps = 3\n")
    cfg = load_config(path, overrides=["train.steps=7", "crops.local_count=9", "run.seed=5"],
                      root="memory://elsewhere")
    assert (cfg.train.steps, cfg.crops.local_count, cfg.run.seed, cfg.run.root) == (7, 9, 5, "memory://elsewhere")
    # overrides are validated exactly like the file
    msg = _error(path, ["train.stepz=7"])
    assert "  train.stepz: unknown key" in msg and str(path) in msg
    msg = _error(path, ["train.steps=seven"])
    assert "  train.steps: Input should be a valid integer" in msg
    msg = _error(path, ["crops.patch=1000"])
    assert "crops.patch (1000) must not exceed crops.min_region (644)" in msg


@pytest.mark.parametrize("item, words", [
    ("trainsteps", "expected section.key=value"),
    ("steps=3", "the key must name a section and a key"),
    ("run.root.x=1", "run.root is not a section"),
])
def test_malformed_overrides(cfg_file, item, words):
    msg = _error(cfg_file(), [item])
    assert f"--set {item!r}" in msg and words in msg


def test_apply_overrides_creates_sections():
    raw = apply_overrides({}, ["teachers.new.model=x", "teachers.new.adapter=hf"])
    assert raw == {"teachers": {"new": {"model": "x", "adapter": "hf"}}}


# -- round trip & fingerprints -----------------------------------------------------------------

def _rich_config() -> DadConfig:
    return load_config(raw={
        "run": {"root": "s3://bucket/run one", "seed": 3, "ray_address": "ray://h:10001", "num_cpus": 2},
        "corpus": {"sources": ["a/**/*.jpg", "b.tar", "list.txt"], "max_aspect": 2.5, "image_format": "jpeg"},
        "crops": {"min_region": 700, "patch": 350, "local_count": 9},
        "teachers": {
            "da.v2-L": {"adapter": "hf", "model": "depth-anything/x", "revision": "abc", "num_gpus": 0.5,
                        "resources": {"accel A": 1.0}, "prior": 0.7, "license": "cc-by-nc-4.0"},
            "gen": {"adapter": "checkpoint", "model": "file:///w/ckpt.pt", "output_space": "affine_depth",
                    "affine_depth": "invert", "prior": 0.3},
        },
        "score": {"policy": "filter", "filter_threshold": 0.25, "exclude_licenses": ["cc-by-nc-4.0"]},
        "train": {"lr_encoder": 5e-6, "resources_per_worker": {"CPU": 0.5}, "init_from": 'quote " and \\ back'},
        "eval": {"datasets": ["realeval:../shared/data/realeval"], "max_samples": 3},
    })


def test_to_toml_round_trip():
    cfg = _rich_config()
    text = cfg.to_toml()
    again = load_config(raw=tomllib.loads(text))
    assert again == cfg
    assert again.model_dump() == cfg.model_dump()
    assert again.to_toml() == text
    assert list(again.teachers) == ["da.v2-L", "gen"]
    # defaults round-trip too (None fields are omitted and come back as None)
    plain = load_config(raw={"run": {"root": "r"}, "corpus": {"sources": ["x"]}})
    assert load_config(raw=tomllib.loads(plain.to_toml())) == plain


def test_fingerprints_track_their_sections():
    cfg = _rich_config()
    fp = cfg.section_fingerprint("run.seed", "corpus", "crops")
    assert fp == cfg.section_fingerprint("run.seed", "corpus", "crops") and len(fp) == 12
    same = cfg.model_copy(deep=True)
    same.train.steps = 999
    assert same.section_fingerprint("run.seed", "corpus", "crops") == fp
    other = cfg.model_copy(deep=True)
    other.crops.local_count = 4
    assert other.section_fingerprint("run.seed", "corpus", "crops") != fp
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1}) != fingerprint({"a": 1, "b": 3})


# -- CLI ----------------------------------------------------------------------------------------

def test_cli_config_show_prints_resolved_config(cfg_file):
    long_source = "photos/" + "a-rather-long-folder-name/" * 6 + "**/*.jpg"
    path = cfg_file()
    res = CliRunner().invoke(app, ["config", "show", "-c", str(path), "--set", "train.steps=7",
                                   "--set", f"corpus.sources=[{long_source!r}]"])
    assert res.exit_code == 0, res.output
    shown = tomllib.loads(res.stdout)  # valid TOML, not wrapped at the terminal width
    expected = load_config(path, overrides=["train.steps=7", f"corpus.sources=[{long_source!r}]"])
    assert load_config(raw=shown) == expected
    assert shown["train"]["steps"] == 7 and shown["corpus"]["sources"] == [long_source]
    res = CliRunner().invoke(app, ["config", "show", "-c", str(path), "--json", "--root", "memory://j"])
    assert res.exit_code == 0
    import json

    assert json.loads(res.stdout)["run"]["root"] == "memory://j"
    assert not cfg_file.root.exists()


def test_cli_bad_config_fails_before_any_work(cfg_file):
    path = cfg_file("[train]\nstepz = 3\n")
    for cmd in (["config", "show"], ["shard"], ["status"]):
        res = CliRunner().invoke(app, [*cmd, "-c", str(path)])
        assert res.exit_code == 2, (cmd, res.output)
        assert "train.stepz: unknown key" in res.output and str(path) in res.output
    res = CliRunner().invoke(app, ["shard", "-c", str(cfg_file()), "--set", "crops.patch=900"])
    assert res.exit_code == 2 and "crops.patch (900) must not exceed" in res.output
    assert not cfg_file.root.exists()


def test_cli_help_lists_the_commands():
    res = CliRunner().invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("shard", "teach", "score", "train", "eval", "status", "config"):
        assert f" {cmd} " in res.stdout
