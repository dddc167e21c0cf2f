"""One TOML file describes a run; pydantic validates it before any work starts.

Every section has defaults except `[run].root` and `[corpus].sources`. Unknown keys, wrong types and
impossible combinations raise `ConfigError`, whose message names the file and the dotted key, so a
mistake costs seconds, not a half-finished stage. `--set section.key=value` overrides are applied to
the raw TOML before validation, so they are checked exactly like the file.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.images import IMAGE_EXTS
from pipeline.redact import redact_tree


class ConfigError(ValueError):
    """A config problem, already phrased for the user (file and key named)."""


class Section(BaseModel):
    # allow_inf_nan=False: one rule for every float of every section (lists and dicts of floats too).
    # No setting has a meaningful nan or inf; `prior = inf` made p = NaN and inverted the selection.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


MAX_SIDE = 8192  # px: any image side a setting asks for (a larger one only allocates absurd memory)
MAX_TEACH_SHARD_BYTES = 8 << 30  # teach holds one corpus shard's targets in memory at once


def folder_name(value: str, what: str) -> str:
    """A name that becomes one folder under the run root (cache/<teacher>, train/<name>): it must not
    climb out of it or name several levels (dots and spaces are fine)."""
    if value in ("", ".", "..") or any(c in value for c in "/\\") or any(ord(c) < 32 for c in value):
        raise ValueError(f"{what} {value!r} cannot be used as a folder name under the run root "
                         f"(no '/', '\\', control characters, and not '', '.' or '..')")
    return value


class RunCfg(Section):
    root: str = Field(description="fsspec URL of the run root (local path, s3://, memory://)")
    seed: int = Field(0, ge=0)
    ray_address: str | None = Field(None, description="existing cluster: auto, host:6379, ray://host:10001")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local cluster (default: all)")
    executor: Literal["auto", "ray", "inline"] = Field(
        "auto", description="inline runs tasks in this process (used automatically for memory:// roots)")
    model_mirror: list[str] = Field(default_factory=list, description="folders searched first for model files "
                                                                      "pinned by sha256 (also $DAD_MODEL_MIRROR)")
    model_cache: str | None = Field(None, description="download cache for model files (default "
                                                      "$DAD_MODEL_CACHE or ~/.cache/dad/models)")

    @model_validator(mode="after")
    def _executor(self) -> "RunCfg":
        if self.executor == "ray" and self.root.startswith("memory://"):
            raise ValueError("run.executor = 'ray' cannot use a memory:// run.root (other processes cannot see "
                             "it); use executor = 'auto' or 'inline'")
        return self


class CorpusCfg(Section):
    sources: list[str] = Field(min_length=1, description="folders, globs, .tar shards, .txt/.parquet lists")
    shard_size: int = Field(64, ge=1, le=100_000)
    image_format: Literal["png", "jpeg"] = "png"
    jpeg_quality: int = Field(95, ge=50, le=100)
    max_pixels: int = Field(40_000_000, ge=1, le=1_000_000_000,
                            description="decompression-bomb limit (width*height; 1e9 px is 3 GB decoded)")
    min_side: int = Field(32, ge=1)
    max_aspect: float = Field(4.0, ge=1.0)
    max_region: int = Field(1024, ge=14, le=MAX_SIDE, description="stored global region is capped at this side (px)")
    extensions: list[str] = Field(list(IMAGE_EXTS), min_length=1)
    timeout: float = Field(30.0, gt=0, le=3600, description="URL sources: seconds to connect, and to wait for "
                                                             "each read")
    retries: int = Field(2, ge=0, le=20, description="URL sources: attempts after the first that timed out or "
                                                     "lost its connection")
    view: Literal["webp", "ppm", "none"] = Field(
        "webp", description="how each sample's G×G global view is stored beside its region: lossless WebP "
                            "(~0.4× the raw bytes), ppm (raw: decodes ~10× faster, for loaders short of CPU), "
                            "none (computed from the region every time). The same pixels either way")

    @field_validator("extensions")
    @classmethod
    def _dotted(cls, v: list[str]) -> list[str]:
        """Matched against the file's suffix, dot included: 'jpg' would reject every file."""
        for ext in v:
            if not re.fullmatch(r"\.[^./\\\s]+", ext):
                raise ValueError(f"{ext!r} is not a file extension: write it with its dot, e.g. "
                                 f"'.{ext.strip().lstrip('.') or 'jpg'}'")
        return v


# How inputs are fetched or stored, not what is made of them: left out of fingerprints and of the
# recorded-config check (a shard keeps the view format it was written with; its marker records it).
FETCH_KEYS = {"corpus": {"timeout", "retries", "view"}}


class CropsCfg(Section):
    min_region: int = Field(644, ge=14, le=MAX_SIDE, description="smallest global-region side (paper: 644)")
    patch: int = Field(560, ge=14, le=MAX_SIDE, description="local patch side at native resolution (paper: 560)")
    local_count: int = Field(4, ge=1, le=64, description="K local patches per sample")
    global_size: int = Field(560, ge=14, le=MAX_SIDE, description="global region resized to G×G for teachers and student")
    local_store: int = Field(392, ge=8, le=MAX_SIDE, description="local predictions stored at L×L")

    @model_validator(mode="after")
    def _consistent(self) -> "CropsCfg":
        if self.patch > self.min_region:
            raise ValueError(f"crops.patch ({self.patch}) must not exceed crops.min_region ({self.min_region})")
        if self.global_size % 14:
            raise ValueError(f"crops.global_size ({self.global_size}) must be a multiple of 14 (ViT patch)")
        if self.local_store > self.global_size:
            raise ValueError("crops.local_store must not exceed crops.global_size")
        return self


OutputSpace = Literal["disparity", "depth", "metric_depth", "affine_depth"]


class TeacherCfg(Section):
    adapter: str = Field(description="hf | checkpoint | a plugin from the dad.teachers entry-point group")
    model: str = Field(description="hub id, local directory, or a model file's path or URL")
    revision: str | None = Field(None, description="hub revision (commit sha) to pin")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$",
                               description="digest of a model file (required for a URL; checked on every load)")
    output_index: int = Field(0, ge=0, description="which output of a multi-output model is the depth map")
    input_mean: list[float] | None = Field(None, min_length=3, max_length=3,
                                           description="per-channel mean subtracted from RGB in [0, 1]")
    input_std: list[Annotated[float, Field(gt=0)]] | None = Field(None, min_length=3, max_length=3,
                                                                 description="per-channel std dividing RGB in [0, 1]")
    resize: Literal["stretch", "letterbox"] = Field(
        "stretch", description="fixed-size models: stretch the image to the model's input, or pad it (letterbox)")
    flip_average: bool = Field(False, description="average the prediction with the flipped prediction of the "
                                                  "flipped image (a two-pass ensemble: better labels, 2× cost)")
    output_space: OutputSpace = "disparity"
    affine_depth: Literal["refuse", "invert"] = Field(
        "refuse", description="how to treat affine-invariant depth: refuse, or invert as if it were depth")
    license: str = "unknown"
    input_size: int | None = Field(None, description="teacher input side (default: its own rule)")

    @field_validator("input_size")
    @classmethod
    def _input_size(cls, v: int | None) -> int | None:
        if v is not None and not 1 <= v <= MAX_SIDE:
            raise ValueError(f"input_size must be positive and at most {MAX_SIDE} px (got {v}); "
                             "leave it unset for the model's own rule")
        return v
    batch_size: int = Field(4, ge=1)
    actors: int = Field(1, ge=1, description="actor-pool size (one model per actor)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor (0 = CPU)")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per actor")
    memory: int | None = Field(None, ge=1, description="bytes of memory per actor (Ray resource)")
    resources: dict[str, Annotated[float, Field(ge=0)]] = Field(default_factory=dict,
                                                               description="custom Ray resources per actor")
    torch_threads: int | None = Field(None, ge=1)
    prior: float = Field(1.0, ge=0, description="selection prior (paper: primary 0.7, assistant 0.3)")

    @model_validator(mode="after")
    def _space(self) -> "TeacherCfg":
        if self.output_space == "affine_depth" and self.affine_depth == "refuse":
            raise ValueError(
                "output_space 'affine_depth' cannot be turned into disparity exactly (1/(a·d+b) needs the "
                "unknown shift); set affine_depth = \"invert\" to accept the approximation")
        return self


class ScoreCfg(Section):
    policy: Literal["paper", "best", "weighted", "filter", "mix"] = "paper"
    metric: Literal["lg_consistency", "agreement", "combined"] = "combined"
    temperature: float = Field(0.05, gt=0, description="softmax temperature of the weighted policy")
    filter_base: Literal["paper", "best", "weighted"] = "paper"
    filter_threshold: float | None = Field(None, gt=0, description="drop samples whose best score is worse")
    exclude_licenses: list[str] = Field(default_factory=list)
    collapse_rel_std: float = Field(1e-3, ge=0, description="a map whose std/|mean| is below this is collapsed")
    min_valid_fraction: float = Field(0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _filter(self) -> "ScoreCfg":
        if self.policy == "filter" and self.filter_threshold is None:
            raise ValueError("score.policy = 'filter' needs score.filter_threshold")
        return self


class StudentCfg(Section):
    arch: Literal["vit", "tflite"] = Field("vit", description="vit: DINOv2 encoder + DPT head (student.size); "
                                                              "tflite: the graph of a TFLite model, weights imported")
    size: Literal["tiny", "small", "base", "large"] = "tiny"
    encoder_weights: str | None = Field(None, description="local timm/DINOv2 encoder weights file")
    init_from: str | None = Field(None, description="arch = tflite: the model whose graph and weights the student "
                                                    "starts from, 'teacher:<name>' or a .tflite path")
    input_size: list[Annotated[int, Field(ge=1, le=MAX_SIDE)]] | None = Field(None, min_length=2, max_length=2,
                                         description="arch = tflite: every input is resized (stretched) to this "
                                                     "[height, width], as fixed-size mobile models expect; default: "
                                                     "the nearest multiples of the graph's stride")

    @property
    def init_teacher(self) -> str | None:
        """The teacher `init_from = "teacher:<name>"` names, else None."""
        ref = self.init_from or ""
        return ref.removeprefix("teacher:") if ref.startswith("teacher:") else None

    @model_validator(mode="after")
    def _arch(self) -> "StudentCfg":
        if self.arch == "tflite" and not self.init_from:
            raise ValueError("student.arch = 'tflite' needs student.init_from ('teacher:<name>' or a .tflite file): "
                             "the student's structure comes from that model")
        if self.arch == "vit" and self.input_size:
            raise ValueError("student.input_size is for arch = 'tflite' (a ViT student takes any multiple of 14)")
        if self.arch == "vit" and self.init_from:
            raise ValueError("student.init_from is for arch = 'tflite'; a ViT student starts from train.init_from")
        return self


class TrainCfg(Section):
    name: str = "student"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return folder_name(v, "train.name")
    steps: int = Field(200, ge=1)
    seed: int | None = Field(None, ge=0, description="training seed (init of random parts, data order, teacher draws, "
                                               "augmentation); None = run.seed. Unlike run.seed it leaves the corpus "
                                               "and crop plan alone, so seeds of one corpus can be compared")
    batch_size: int = Field(4, ge=1, le=1024)
    workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(0.5, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    resources_per_worker: dict[str, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)
    lr_encoder: float = Field(5e-6, ge=0, le=1)  # AdamW: a learning rate above 1 only diverges
    lr_decoder: float = Field(5e-5, ge=0, le=1)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(20, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    norm: Literal["hybrid", "global", "local", "none"] = "hybrid"
    use_sc: bool = True
    use_lg: bool = True
    lambda_lg: float = Field(0.5, ge=0)  # a negative weight rewards the loss it weighs
    lambda_feat: float = Field(1.0, ge=0)
    lambda_grad: float = Field(2.0, ge=0)
    feature_loss: bool = False
    flip: bool = True
    jitter: float = Field(0.1, ge=0, le=1)
    init_from: str | None = None
    checkpoint_every: int = Field(50, ge=1)
    log_every: int = Field(10, ge=1)
    deterministic: bool = False
    amp: bool = True
    prefetch: int = Field(2, ge=0, le=64, description="batches read ahead (each one held in memory)")
    val_dataset: str | None = Field(None, description="periodic validation set, an eval spec kind:PATH (e.g. "
                                                      "scenes:n=32,seed=900000); never a set you report on")
    val_every: int | None = Field(None, ge=1, description="validate every N steps (default: checkpoint_every)")
    val_samples: int = Field(16, ge=1, description="images per validation (the first N of val_dataset)")

    @model_validator(mode="after")
    def _some_loss(self) -> "TrainCfg":
        if not (self.use_sc or self.use_lg):
            raise ValueError("train.use_sc and train.use_lg cannot both be false (nothing to learn from)")
        return self

    @field_validator("val_dataset")
    @classmethod
    def _val_spec(cls, v: str | None) -> str | None:
        if v is not None:
            from pipeline.datasets.eval_sets import parse_spec

            parse_spec(v)  # kind:PATH with a known kind; the data itself is opened by the training worker
        return v

    @model_validator(mode="after")
    def _val(self) -> "TrainCfg":
        if self.val_every is not None and self.val_dataset is None:
            raise ValueError("train.val_every needs train.val_dataset (an eval spec kind:PATH)")
        return self


class EvalCfg(Section):
    datasets: list[str] = Field(default_factory=list, description="e.g. realeval:../shared/data/realeval")
    align: Literal["disparity", "depth", "inverse_depth"] = Field(
        "disparity", description="LSQ fit in disparity scored in depth (Marigold), in depth, or fit+score in 1/depth")
    resolution: int = Field(518, ge=14, le=MAX_SIDE)
    max_samples: int | None = Field(None, ge=1)
    pictures: int = Field(6, ge=0)
    min_valid_pixels: int = Field(100, ge=1, description="a sample with fewer valid GT pixels is skipped, "
                                  "listed with its reason (a 2-parameter fit on a handful of pixels scores ≈ 0)")

    @model_validator(mode="after")
    def _mult(self) -> "EvalCfg":
        if self.resolution % 14:
            raise ValueError(f"eval.resolution ({self.resolution}) must be a multiple of 14")
        return self


class DadConfig(Section):
    run: RunCfg
    corpus: CorpusCfg
    crops: CropsCfg = Field(default_factory=CropsCfg)
    teachers: dict[str, TeacherCfg] = Field(default_factory=dict)
    score: ScoreCfg = Field(default_factory=ScoreCfg)
    student: StudentCfg = Field(default_factory=StudentCfg)
    train: TrainCfg = Field(default_factory=TrainCfg)
    eval: EvalCfg = Field(default_factory=EvalCfg)

    @field_validator("teachers")
    @classmethod
    def _teacher_names(cls, v: dict) -> dict:
        for name in v:
            folder_name(name, "teacher name")
        return v

    @model_validator(mode="after")
    def _student_teacher(self) -> "DadConfig":
        if self.student.arch == "tflite" and self.train.feature_loss:
            raise ValueError("train.feature_loss aligns ViT encoder tokens; a student.arch = 'tflite' student has "
                             "no such encoder: set train.feature_loss = false")
        name, ref = self.student.init_teacher, self.student.init_from
        if name is not None:
            if name not in self.teachers:
                raise ValueError(f"student.init_from = {ref!r}: no teacher {name!r} is configured "
                                 f"(teachers: {', '.join(self.teachers) or 'none'})")
            if self.teachers[name].adapter != "tflite":
                raise ValueError(f"student.init_from = {ref!r}: teacher {name!r} uses adapter "
                                 f"{self.teachers[name].adapter!r}; a tflite student starts from a tflite teacher")
        return self

    @model_validator(mode="after")
    def _teach_memory(self) -> "DadConfig":
        """teach fills one corpus shard's targets in memory (f16 maps + bool masks, global and local):
        a shard_size that passes alone can still ask for hundreds of GiB with large crops."""
        c = self.crops
        per_sample = 3 * (c.global_size ** 2 + c.local_count * c.local_store ** 2)
        need = self.corpus.shard_size * per_sample
        if need > MAX_TEACH_SHARD_BYTES:
            raise ValueError(f"corpus.shard_size = {self.corpus.shard_size} makes teach hold {need / 2**30:.1f} GiB "
                             f"per shard with these crops (at most {MAX_TEACH_SHARD_BYTES >> 30} GiB): set "
                             f"corpus.shard_size to {MAX_TEACH_SHARD_BYTES // per_sample} or less")
        return self

    def section_fingerprint(self, *keys: str) -> str:
        """Stable hash of the named sections (dotted keys allowed, e.g. 'run.seed'), of `identity()`."""
        dump = self.identity()
        picked = {}
        for key in keys:
            node: Any = dump
            for part in key.split("."):
                node = node[part]
            picked[key] = node
        return fingerprint(picked)

    def identity(self) -> dict:
        """The settings outputs depend on, as they may be stored: redacted, without `FETCH_KEYS`. A new
        timeout, rotated credentials or a fresh presigned URL leave every fingerprint as it was."""
        return redact_tree(self.model_dump(mode="json", exclude=FETCH_KEYS))

    @property
    def train_seed(self) -> int:
        """The training seed: `train.seed`, else `run.seed` (which also seeds the corpus's crop plan)."""
        return self.run.seed if self.train.seed is None else self.train.seed

    def to_toml(self) -> str:
        """The config as `dad.toml` records it and `dad config show` prints it: credentials redacted."""
        return dumps_toml(redact_tree(self.model_dump(mode="json", exclude_none=True)))


def fingerprint(obj: Any) -> str:
    """12 hex digits of sha256 over canonical JSON: what produced an output, in one short token."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.steps=10' → (['train','steps'], 10). Values are TOML literals, else plain strings."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if len(parts) < 2:
        raise ConfigError(f"--set {item!r}: the key must name a section and a key, e.g. train.steps=10")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        parts, value = parse_override(item)
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[:-1])} is not a section")
        node[parts[-1]] = value
    return raw


def validate(raw: dict, source: str = "<config>") -> DadConfig:
    try:
        return DadConfig.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "(top level)"
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = "unknown key"
            lines.append(f"  {key}: {msg}")
        raise ConfigError(f"invalid config {source}:\n" + "\n".join(lines)) from None


def load_config(path: str | Path | None = None, root: str | None = None,
                overrides: list[str] | None = None, raw: dict | None = None) -> DadConfig:
    """Read, override and validate a config. Nothing is written and no work starts here."""
    source = str(path) if path else "<inline>"
    if raw is None:
        if path is None:
            raise ConfigError("no config given: pass -c/--config FILE")
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"invalid TOML in {path}: {err}") from None
    raw = json.loads(json.dumps(raw))  # deep copy, plain types
    if root:
        raw.setdefault("run", {})["root"] = root
    apply_overrides(raw, overrides or [])
    cfg = validate(raw, source)
    from pipeline.models import use_run_settings

    use_run_settings(cfg.run.model_mirror, cfg.run.model_cache)
    return cfg


INLINE_TABLES = {"resources", "resources_per_worker"}
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(k: str) -> str:
    """A TOML key: bare when possible, else quoted (teacher names may contain dots or spaces)."""
    return k if _BARE_KEY.match(k) else json.dumps(k)


def dumps_toml(data: dict) -> str:
    """Minimal TOML writer for the config's own shape: sections, teacher sub-tables, inline resource maps."""
    out: list[str] = []

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{_toml_key(k)} = {scalar(x)}" for k, x in v.items()) + "}"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    def table(prefix: str, d: dict) -> None:
        nested = {k: v for k, v in d.items() if isinstance(v, dict) and k not in INLINE_TABLES}
        plain = {k: v for k, v in d.items() if k not in nested}
        if prefix and (plain or not nested):
            out.append(f"[{prefix}]")
            out.extend(f"{_toml_key(k)} = {scalar(v)}" for k, v in plain.items())
            out.append("")
        for k, v in nested.items():
            table(f"{prefix}.{_toml_key(k)}" if prefix else _toml_key(k), v)

    table("", data)
    return "\n".join(out).rstrip() + "\n"


def with_absolute_paths(cfg: DadConfig) -> DadConfig:
    """A copy whose local relative paths are absolute: Ray workers run in other working directories.

    The run root and local files (checkpoints, encoder weights, local teacher models) are resolved
    against this process's working directory; URLs and hub ids are left as they are.
    """
    import os

    def local(path: str | None, must_exist: bool) -> str | None:
        if not path or "://" in path or os.path.isabs(path):
            return path
        return os.path.abspath(path) if (not must_exist or os.path.exists(path)) else path

    data = cfg.model_dump()
    data["run"]["root"] = local(cfg.run.root, must_exist=False)
    data["run"]["model_mirror"] = [local(m, must_exist=False) for m in cfg.run.model_mirror]
    data["run"]["model_cache"] = local(cfg.run.model_cache, must_exist=False)
    data["train"]["init_from"] = local(cfg.train.init_from, must_exist=True)
    data["student"]["encoder_weights"] = local(cfg.student.encoder_weights, must_exist=True)
    if cfg.student.init_from and cfg.student.init_teacher is None:
        data["student"]["init_from"] = local(cfg.student.init_from, must_exist=True)
    if cfg.train.val_dataset:
        kind, _, path = cfg.train.val_dataset.partition(":")
        data["train"]["val_dataset"] = f"{kind}:{local(path, must_exist=True)}"
    for name, t in cfg.teachers.items():
        prefix, sep, rest = t.model.partition(":") if t.model.startswith("genpercept:") else ("", "", t.model)
        data["teachers"][name]["model"] = f"{prefix}{sep}{local(rest, must_exist=True)}"
    return DadConfig.model_validate(data)
