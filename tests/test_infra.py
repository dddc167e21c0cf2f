"""Cluster infrastructure, checked without Docker or Kubernetes (neither runs here).

What `docker build` and `kubectl apply` would catch first, and what no tool would catch at all until
a job fails on a cluster, is checked by reading the files:

* every YAML under infra/ parses; Kubernetes objects have kind, apiVersion ray.io/v1, metadata.name;
* the RayCluster has a CPU head and GPU worker groups for teachers and training, with GPU limits;
* one image, declared in infra/image.env, is used by every manifest, and its tag is the project version;
* each stage's RayJob entrypoint is a real `dad` command: it parses with the real CLI (every option it
  uses is in that subcommand's --help), its config exists in the repo and validates, and it runs
  through the CLI up to the stage call;
* resources asked for in configs/cluster.toml (teacher actors, training workers) exist on the nodes
  that the k8s worker groups and the Ray cluster launcher's node types advertise, and fit there;
* credentials come from Secrets / the environment: no literal keys anywhere in infra/;
* the Dockerfiles install the project with its hf and s3 extras, at the pyproject pins;
* .dockerignore keeps local environments, run outputs and credential files out of the image.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

import pipeline.cli
from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
DOCKER = INFRA / "docker"
LAUNCHER = INFRA / "ray" / "cluster.yaml"
CLUSTER_TOML = ROOT / "configs" / "cluster.toml"
APP_DIR = "/app"                       # where the Dockerfiles put the repository inside the image
STAGES = ("shard", "teach", "score", "train", "eval")
STAGE_MODULE = {"eval": "evaluate"}    # `dad eval` runs stages/evaluate.py
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
STANDARD_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}


# -- helpers --------------------------------------------------------------------------------------

def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pin(package: str) -> str:
    """The exact version pyproject.toml pins for `package` (extras ignored)."""
    for req in pyproject()["project"]["dependencies"]:
        m = re.match(rf"^{re.escape(package)}(\[[^\]]*\])?==([^\s;,]+)$", req.strip())
        if m:
            return m.group(2)
    raise AssertionError(f"pyproject.toml pins no {package}==…")


def declared_images() -> dict[str, str]:
    out = {}
    for line in (INFRA / "image.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip().strip('"')
    return out


def load_yaml_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_objects() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(K8S.glob("*.yaml")) for d in load_yaml_docs(p)]


def raycluster() -> dict:
    clusters = [d for _, d in k8s_objects() if d.get("kind") == "RayCluster"]
    assert len(clusters) == 1, f"expected one RayCluster in infra/k8s, found {len(clusters)}"
    return clusters[0]


def rayjob(stage: str) -> dict:
    docs = load_yaml_docs(K8S / f"rayjob-{stage}.yaml")
    assert len(docs) == 1 and docs[0]["kind"] == "RayJob"
    return docs[0]


def walk(node, path=()):
    """Yield (path, key, value) for every mapping entry in a nested YAML structure."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield path, k, v
            yield from walk(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, path + (i,))


def containers_of(obj: dict) -> list[dict]:
    """Every container of every pod template in a k8s object (head, worker groups, submitter)."""
    found = []
    for _, key, value in walk(obj):
        if key in ("containers", "initContainers") and isinstance(value, list):
            found.extend(value)
    return found


def cpu_quantity(q) -> float:
    s = str(q)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


MEM_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def mem_quantity(q) -> float:
    m = re.fullmatch(r"([0-9.]+)([KMGT]i?)?", str(q))
    assert m, f"not a memory quantity: {q!r}"
    return float(m.group(1)) * MEM_UNITS.get(m.group(2) or "", 1)


def start_param_resources(params: dict) -> dict[str, float]:
    """rayStartParams.resources as `ray start --resources=…` receives it after shell quoting."""
    raw = (params or {}).get("resources")
    if raw is None:
        return {}
    words = shlex.split(str(raw))
    assert len(words) == 1, f"rayStartParams.resources must be one shell word: {raw!r}"
    return {k: float(v) for k, v in json.loads(words[0]).items()}


def group_node(group: dict) -> dict:
    """What one pod of a head/worker group offers Ray: CPU, GPU, memory (from limits) and custom resources."""
    ray_containers = group["template"]["spec"]["containers"]
    limits = ray_containers[0].get("resources", {}).get("limits", {})
    node = {"CPU": cpu_quantity(limits.get("cpu", 0)), "GPU": float(limits.get("nvidia.com/gpu", 0)),
            "memory": mem_quantity(limits.get("memory", 0))}
    params = group.get("rayStartParams") or {}
    if "num-cpus" in params:
        node["CPU"] = float(params["num-cpus"])
    node.update(start_param_resources(params))
    return node


def worker_groups() -> list[dict]:
    return raycluster()["spec"].get("workerGroupSpecs", [])


def custom(resources: dict) -> dict[str, float]:
    return {k: v for k, v in resources.items() if k not in STANDARD_RESOURCES}


def cluster_cfg():
    return load_config(CLUSTER_TOML)


def entrypoint_argv(stage: str) -> list[str]:
    return shlex.split(rayjob(stage)["spec"]["entrypoint"])


def option_values(argv: list[str]) -> list[tuple[str, str | None]]:
    """(option, value) pairs of an argv tail; flags get None. `--opt=value` is split."""
    out, i = [], 0
    while i < len(argv):
        word = argv[i]
        if word.startswith("-"):
            opt, eq, val = word.partition("=")
            if eq:
                out.append((opt, val))
            elif i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                out.append((opt, argv[i + 1]))
                i += 1
            else:
                out.append((opt, None))
        i += 1
    return out


def repo_path_of(container_path: str) -> Path:
    assert container_path.startswith(APP_DIR + "/"), f"{container_path} is not inside {APP_DIR}/ of the image"
    return ROOT / container_path[len(APP_DIR) + 1:]


def help_text(stage: str) -> str:
    result = CliRunner().invoke(pipeline.cli.app, [stage, "--help"],
                                env={"COLUMNS": "200", "TERMINAL_WIDTH": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, f"dad {stage} --help failed:\n{result.output}"
    return ANSI.sub("", result.output)


def click_options(stage: str) -> set[str]:
    command = typer.main.get_command(pipeline.cli.app).commands[stage]
    return {o for p in command.params for o in (*p.opts, *getattr(p, "secondary_opts", []))}


def dockerfile(name: str) -> str:
    return (DOCKER / name).read_text()


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined, buf = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#") and not buf:
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        if buf.strip():
            joined.append(buf.strip())
        buf = ""
    return [(w.split(None, 1)[0].upper(), (w.split(None, 1) + [""])[1]) for w in joined]


def resolved_base(text: str) -> str:
    instr = dockerfile_instructions(text)
    args = {}
    for kind, rest in instr:
        if kind == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            args[k.strip()] = v.strip()
        if kind == "FROM":
            image = rest.split()[0]
            return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)
    raise AssertionError("no FROM")


# -- every YAML parses; k8s objects are well formed ------------------------------------------------

def test_every_yaml_under_infra_parses():
    files = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))
    assert files, "no YAML under infra/"
    for path in files:
        docs = load_yaml_docs(path)
        assert docs and all(isinstance(d, dict) for d in docs), f"{path}: no YAML mapping"


def test_k8s_objects_have_required_fields():
    objects = k8s_objects()
    kinds = [d["kind"] for _, d in objects]
    assert kinds.count("RayCluster") == 1 and kinds.count("RayJob") == len(STAGES), kinds
    names = []
    for path, doc in objects:
        assert doc.get("apiVersion") == "ray.io/v1", f"{path.name}: apiVersion {doc.get('apiVersion')}"
        assert doc.get("kind") in ("RayCluster", "RayJob"), f"{path.name}: kind {doc.get('kind')}"
        name = doc.get("metadata", {}).get("name")
        assert name and DNS1123.match(name) and len(name) <= 63, f"{path.name}: metadata.name {name!r}"
        assert isinstance(doc.get("spec"), dict), f"{path.name}: no spec"
        names.append((doc["kind"], name))
    assert len(set(names)) == len(names), f"duplicate object names: {names}"


def test_raycluster_has_cpu_head_and_gpu_groups_for_teachers_and_training():
    rc = raycluster()
    spec = rc["spec"]
    assert spec.get("rayVersion") == pin("ray"), "rayVersion must be the Ray version pinned in pyproject.toml"
    assert spec.get("enableInTreeAutoscaling") is True, "groups scale from 0: the autoscaler must be on"

    head = spec["headGroupSpec"]
    assert isinstance(head.get("rayStartParams"), dict)
    head_containers = head["template"]["spec"]["containers"]
    assert head_containers and head_containers[0].get("image")
    ports = {p["containerPort"] for p in head_containers[0].get("ports", [])}
    assert {6379, 8265, 10001} <= ports, f"head must expose GCS, dashboard (jobs) and client ports: {ports}"
    assert group_node(head)["GPU"] == 0, "the head is CPU only"
    assert not custom(group_node(head)), "the head must not advertise teacher/train resources"

    groups = worker_groups()
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names), f"duplicate groupName: {names}"
    for g in groups:
        assert 0 <= g.get("minReplicas", 0) <= g.get("replicas", 0) <= g["maxReplicas"], g["groupName"]
        assert g["maxReplicas"] >= 1, g["groupName"]
        cs = g["template"]["spec"]["containers"]
        assert cs and cs[0].get("image"), g["groupName"]

    cfg = cluster_cfg()
    teacher_keys = {k for t in cfg.teachers.values() for k in t.resources}
    train_keys = set(cfg.train.resources_per_worker)
    teacher_groups = [g for g in groups if teacher_keys & set(custom(group_node(g)))]
    train_groups = [g for g in groups if train_keys & set(custom(group_node(g)))]
    assert teacher_groups, "no worker group advertises the teachers' custom resources"
    assert train_groups, "no worker group advertises the training workers' custom resources"
    assert not {g["groupName"] for g in teacher_groups} & {g["groupName"] for g in train_groups}, \
        "teachers and training need separate GPU groups"

    for g in teacher_groups + train_groups:
        node = group_node(g)
        c = g["template"]["spec"]["containers"][0]["resources"]
        assert float(c["limits"].get("nvidia.com/gpu", 0)) >= 1, f"{g['groupName']}: no GPU limit"
        requested = c.get("requests", {}).get("nvidia.com/gpu", c["limits"]["nvidia.com/gpu"])
        assert float(requested) == node["GPU"], f"{g['groupName']}: GPU requests != limits"
        for key, amount in custom(node).items():
            assert amount == node["GPU"], f"{g['groupName']}: {key}={amount}, not one per GPU"

    gpu_free = [g for g in groups if g not in teacher_groups + train_groups]
    for g in gpu_free:
        assert group_node(g)["GPU"] == 0, f"{g['groupName']}: GPUs without a teacher/train resource go unused"


# Field names of the KubeRay v1 API (apis/ray/v1 *_types.go, KubeRay 1.1 to 1.4) and of the core/v1
# objects used here. `kubectl apply` rejects unknown fields (strict field validation) only once a
# cluster is at hand; a typo such as `workerGroupSpec` is caught here instead.
KNOWN_FIELDS = {
    "RayCluster.spec": {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
                        "autoscalerOptions", "headServiceAnnotations", "suspend", "managedBy",
                        "gcsFaultToleranceOptions", "upgradeStrategy", "authOptions"},
    "headGroupSpec": {"serviceType", "headService", "enableIngress", "rayStartParams", "template",
                      "resources", "labels"},
    "workerGroupSpec": {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams",
                        "template", "scaleStrategy", "idleTimeoutSeconds", "suspend", "resources", "labels"},
    "autoscalerOptions": {"resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts",
                          "securityContext", "idleTimeoutSeconds", "upscalingMode", "version"},
    "RayJob.spec": {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
                    "metadata", "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy",
                    "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
                    "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
                    "shutdownAfterJobFinishes", "suspend"},
    "container": {"name", "image", "imagePullPolicy", "command", "args", "workingDir", "ports", "env",
                  "envFrom", "resources", "volumeMounts", "lifecycle", "livenessProbe", "readinessProbe",
                  "startupProbe", "securityContext"},
    "podSpec": {"containers", "initContainers", "volumes", "tolerations", "nodeSelector", "affinity",
                "restartPolicy", "serviceAccountName", "securityContext", "imagePullSecrets",
                "priorityClassName", "terminationGracePeriodSeconds"},
}


def _unknown(obj: dict, kind: str) -> set[str]:
    return set(obj) - KNOWN_FIELDS[kind]


def test_manifest_fields_are_known_to_kuberay():
    problems = []
    rc = raycluster()
    problems += [f"RayCluster.spec.{k}" for k in _unknown(rc["spec"], "RayCluster.spec")]
    problems += [f"autoscalerOptions.{k}" for k in _unknown(rc["spec"].get("autoscalerOptions", {}),
                                                             "autoscalerOptions")]
    head = rc["spec"]["headGroupSpec"]
    groups = [("headGroupSpec", head)] + [("workerGroupSpec", g) for g in worker_groups()]
    for kind, g in groups:
        problems += [f"{kind}.{k}" for k in _unknown(g, kind)]
        assert isinstance(g.get("rayStartParams"), dict), f"{kind}: rayStartParams is required (may be {{}})"
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), f"{kind}: string values only"
    templates = [g["template"] for _, g in groups]
    for stage in STAGES:
        spec = rayjob(stage)["spec"]
        problems += [f"rayjob-{stage}.spec.{k}" for k in _unknown(spec, "RayJob.spec")]
        assert isinstance(spec.get("entrypointResources", ""), str), "entrypointResources is a JSON string"
        templates.append(spec["submitterPodTemplate"])
    for t in templates:
        problems += [f"pod spec.{k}" for k in _unknown(t["spec"], "podSpec")]
        for c in t["spec"]["containers"]:
            problems += [f"container {c.get('name')}.{k}" for k in _unknown(c, "container")]
            for e in c.get("env", []):
                assert ("value" in e) != ("valueFrom" in e), f"env {e['name']}: one of value/valueFrom"
    assert not problems, f"fields KubeRay / Kubernetes do not know: {problems}"


# -- one image -------------------------------------------------------------------------------------

def test_one_declared_image_everywhere():
    images = declared_images()
    assert set(images) == {"DAD_IMAGE", "DAD_IMAGE_CPU"}
    version = pyproject()["project"]["version"]
    for name in images.values():
        assert re.fullmatch(r"[a-z0-9.\-/:]+", name) and ":" in name.rsplit("/", 1)[-1], name
        assert name.rsplit(":", 1)[1].startswith(version), f"{name}: tag should carry version {version}"
    used = {c["image"] for _, doc in k8s_objects() for c in containers_of(doc)}
    assert used == {images["DAD_IMAGE"]}, f"manifests use {used}; infra/image.env: {images['DAD_IMAGE']}"
    # every mention of the image repository anywhere in infra/ is one of the declared names
    repo = images["DAD_IMAGE"].rsplit(":", 1)[0]
    for path in INFRA.rglob("*"):
        if path.is_file():
            for ref in re.findall(re.escape(repo) + r":[\w.\-]+", path.read_text(errors="replace")):
                assert ref in images.values(), f"{path.relative_to(ROOT)} names undeclared image {ref}"


def test_every_pod_of_the_cluster_uses_the_same_image():
    rc = raycluster()
    images = {c["image"] for c in containers_of(rc)}
    assert len(images) == 1, f"head and workers must run one image (same Ray, same code): {images}"


# -- RayJobs: one per stage, entrypoints are real dad commands ----------------------------------------

@pytest.mark.parametrize("stage", STAGES)
def test_rayjob_targets_the_cluster_with_the_image(stage):
    job = rayjob(stage)
    spec = job["spec"]
    assert job["metadata"]["name"] == f"dad-{stage}"
    assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode")
    selector = spec.get("clusterSelector")
    assert selector == {"ray.io/cluster": raycluster()["metadata"]["name"]}, \
        f"rayjob-{stage} must submit to the RayCluster of raycluster.yaml"
    assert spec.get("shutdownAfterJobFinishes", False) is False, \
        "a job on a shared, selected cluster must not shut it down"
    submitter = spec["submitterPodTemplate"]["spec"]
    assert submitter.get("restartPolicy") == "Never"
    assert [c["image"] for c in submitter["containers"]] == [declared_images()["DAD_IMAGE"]]


@pytest.mark.parametrize("stage", STAGES)
def test_rayjob_entrypoint_is_a_valid_dad_command(stage):
    argv = entrypoint_argv(stage)
    assert argv[:2] == ["dad", stage], f"rayjob-{stage}: entrypoint should start with `dad {stage}`: {argv}"
    text = help_text(stage)
    known = click_options(stage)
    opts = option_values(argv[2:])
    positional = [w for w in argv[2:] if not w.startswith("-") and w not in {v for _, v in opts}]
    assert not positional, f"unexpected arguments {positional}"
    for opt, _ in opts:
        assert opt in known, f"dad {stage} has no option {opt} (it has {sorted(known)})"
        assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text), f"{opt} not in `dad {stage} --help`"

    values = dict(opts)
    config = values.get("-c") or values.get("--config")
    assert config, f"rayjob-{stage}: no -c/--config"
    local = repo_path_of(config)
    assert local == CLUSTER_TOML and local.exists(), f"{config} is not the repository's configs/cluster.toml"
    cfg = load_config(local)  # validates; raises ConfigError naming the key otherwise

    address = values.get("--address")
    if "--address" in known:
        assert address, f"rayjob-{stage}: pass --address auto (the driver runs inside the cluster)"
    address = address or cfg.run.ray_address
    assert address and re.fullmatch(r"auto|ray://[\w.\-]+:\d+|[\w.\-]+:\d+", address), \
        f"rayjob-{stage}: the stage must connect to the existing cluster, got {address!r}"
    for teacher in [v for o, v in opts if o == "--teacher"]:
        assert teacher in cfg.teachers, f"--teacher {teacher} is not configured in {config}"
    if stage == "eval":
        ckpt = values.get("--checkpoint")
        assert ckpt and ckpt.startswith(f"{cfg.run.root}/train/{cfg.train.name}"), \
            f"eval should read the student trained under the config's run root, got {ckpt!r}"


@pytest.mark.parametrize("stage", STAGES)
def test_rayjob_entrypoint_runs_through_the_cli(stage, monkeypatch):
    """The whole entrypoint goes through the real CLI (config load included) up to the stage call."""
    calls = []
    monkeypatch.setattr(pipeline.cli, "_run_stage",
                        lambda module, cfg, **kw: calls.append((module, cfg, kw)) or {"stage": module})
    argv = entrypoint_argv(stage)[1:]
    argv = [str(repo_path_of(w)) if w.startswith(APP_DIR + "/") else w for w in argv]
    result = CliRunner().invoke(pipeline.cli.app, argv)
    assert result.exit_code == 0, f"`dad {' '.join(argv)}` failed:\n{result.output}"
    assert len(calls) == 1
    module, cfg, kwargs = calls[0]
    assert module == STAGE_MODULE.get(stage, stage)
    assert cfg.run.root.startswith("s3://")
    if "address" in kwargs:
        assert kwargs["address"] == "auto"


@pytest.mark.parametrize("stage", STAGES)
def test_rayjob_entrypoint_resources_exist_on_some_group(stage):
    spec = rayjob(stage)["spec"]
    want = {"CPU": float(spec.get("entrypointNumCpus", 0)), "GPU": float(spec.get("entrypointNumGpus", 0))}
    want.update({k: float(v) for k, v in json.loads(spec.get("entrypointResources") or "{}").items()})
    if not any(want.values()):
        return  # the driver runs on the head, which needs nothing
    fits = [g["groupName"] for g in worker_groups()
            if all(group_node(g).get(k, 0) >= v for k, v in want.items())]
    assert fits, f"rayjob-{stage}: no worker group can host a driver needing {want}"


# -- config requests fit the nodes ------------------------------------------------------------------

def _fits(need: dict[str, float], node: dict[str, float]) -> int:
    """How many units of `need` one node holds (Ray keeps ~30% of memory for the object store)."""
    per = []
    for key, amount in need.items():
        if not amount:
            continue
        have = node.get(key, 0) * (0.7 if key == "memory" else 1)
        per.append(math.floor(have / amount + 1e-9))
    return min(per) if per else 0


def _teacher_need(t) -> dict[str, float]:
    return {"CPU": t.num_cpus, "GPU": t.num_gpus, "memory": t.memory or 0, **t.resources}


def _train_need(tr) -> dict[str, float]:
    return {"CPU": tr.cpus_per_worker, "GPU": tr.gpus_per_worker, **tr.resources_per_worker}


def test_cluster_config_is_a_gpu_config_on_object_storage():
    cfg = cluster_cfg()
    assert cfg.run.root.startswith("s3://"), "the cluster config keeps its run root on object storage"
    assert all(s.startswith("s3://") for s in cfg.corpus.sources)
    assert cfg.teachers, "no teachers configured"
    for name, t in cfg.teachers.items():
        assert t.num_gpus >= 1, f"teacher {name}: num_gpus"
        assert custom(t.resources), f"teacher {name}: no custom (accelerator pool) resource"
    assert cfg.train.gpus_per_worker >= 1 and custom(cfg.train.resources_per_worker)


def test_config_requests_fit_the_k8s_worker_groups():
    cfg = cluster_cfg()
    groups = worker_groups()
    for name, t in cfg.teachers.items():
        hosts = [g for g in groups if _fits(_teacher_need(t), group_node(g)) >= 1]
        assert hosts, f"teacher {name} needs {_teacher_need(t)}: no k8s worker group can host one actor"
        slots = sum(_fits(_teacher_need(t), group_node(g)) * g["maxReplicas"] for g in hosts)
        assert slots >= 1
    need = _train_need(cfg.train)
    slots = sum(_fits(need, group_node(g)) * g["maxReplicas"] for g in groups)
    assert slots >= cfg.train.workers, \
        f"train.workers={cfg.train.workers} needs {need} each; the worker groups hold at most {slots}"


def test_custom_resources_match_between_config_k8s_and_launcher():
    cfg = cluster_cfg()
    wanted = {k for t in cfg.teachers.values() for k in custom(t.resources)}
    wanted |= set(custom(cfg.train.resources_per_worker))
    k8s = {k for g in worker_groups() for k in custom(group_node(g))}
    launcher = yaml.safe_load(LAUNCHER.read_text())
    node_types = launcher["available_node_types"]
    ray_up = {k for nt in node_types.values() for k in custom(nt.get("resources", {}))}
    assert wanted == k8s == ray_up, f"config {wanted}, k8s groups {k8s}, cluster launcher {ray_up}"
    # per pool: the teacher resources live on the teacher group only, the training ones on theirs
    teacher_keys = {k for t in cfg.teachers.values() for k in custom(t.resources)}
    for g in worker_groups():
        keys = set(custom(group_node(g)))
        assert not keys or keys <= teacher_keys or keys <= set(cfg.train.resources_per_worker), g["groupName"]


# -- Ray cluster launcher ---------------------------------------------------------------------------

def test_ray_launcher_config():
    conf = yaml.safe_load(LAUNCHER.read_text())
    assert conf["provider"]["type"] == "aws" and conf["provider"].get("region")
    assert conf["cluster_name"] and conf["auth"]["ssh_user"]
    types = conf["available_node_types"]
    assert conf["head_node_type"] in types
    for name, nt in types.items():
        assert nt["node_config"].get("InstanceType"), name
        if name != conf["head_node_type"]:
            assert 0 <= nt.get("min_workers", 0) <= nt["max_workers"] <= conf["max_workers"], name
    assert sum(nt.get("max_workers", 0) for n, nt in types.items() if n != conf["head_node_type"]) \
        <= conf["max_workers"]
    gpu_types = [nt for nt in types.values() if nt.get("resources", {}).get("GPU", 0) >= 1]
    assert len(gpu_types) >= 2, "a teacher pool and a training pool"

    # the repository is mounted and installed with its extras; Ray with its dashboard/job server
    mounts = conf["file_mounts"]
    remote = [r for r, local in mounts.items() if local in (".", "./")]
    assert len(remote) == 1, f"file_mounts should ship the repository ('.'), got {mounts}"
    setup = "\n".join(conf["setup_commands"])
    assert re.search(rf'pip install[^\n]*"?{re.escape(remote[0])}\[hf,s3\]"?', setup), setup
    assert "requirements.py" in setup and "--add ray=default" in setup and "--extras hf,s3" in setup
    assert "python3.11" in setup
    head_start = "\n".join(conf["head_start_ray_commands"])
    assert "ray start --head" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert "ray start --address=$RAY_HEAD_IP:6379" in "\n".join(conf["worker_start_ray_commands"])
    excluded = set(conf.get("rsync_exclude", []))
    assert {".venv", "runs", ".git"} <= excluded, "local venv, run outputs and git history stay behind"


def test_config_requests_fit_the_launcher_node_types():
    cfg = cluster_cfg()
    conf = yaml.safe_load(LAUNCHER.read_text())
    workers = {n: nt for n, nt in conf["available_node_types"].items() if n != conf["head_node_type"]}
    for name, t in cfg.teachers.items():
        need = {k: v for k, v in _teacher_need(t).items() if k != "memory"}  # memory: autodetected per type
        assert any(_fits(need, nt.get("resources", {})) >= 1 for nt in workers.values()), \
            f"teacher {name} needs {need}: no node type offers it"
    need = _train_need(cfg.train)
    slots = sum(_fits(need, nt.get("resources", {})) * nt["max_workers"] for nt in workers.values())
    assert slots >= cfg.train.workers, f"train.workers={cfg.train.workers}, node types hold {slots}"


# -- credentials ------------------------------------------------------------------------------------

SENSITIVE_ENV = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL)", re.IGNORECASE)
SECRET_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[0-9A-Z]{16}\b"),               # AWS access key ids
    re.compile(r"(?i)aws_?secret_?access_?key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{40}\b"),  # AWS secret keys
    re.compile(r"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"),            # 40-char base64 blob
    re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),                                           # Hugging Face tokens
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),                                    # GitHub tokens
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


def _secret_hits(text: str) -> list[str]:
    hits = []
    for pattern in SECRET_PATTERNS:
        for m in pattern.finditer(text):
            token = m.group(0)
            # a generic 40-char run counts only if it mixes digits, upper and lower case like a key
            # (words, paths and hex digests do not)
            if pattern is SECRET_PATTERNS[2] and not (re.search(r"\d", token) and re.search(r"[A-Z]", token)
                                                      and re.search(r"[a-z]", token)):
                continue
            hits.append(token)
    return hits


def test_secret_detector_catches_real_looking_keys():
    fake_id = "AKIA" + "IOSFODNN7EXAMPLE"   # AWS's documented example, split so scanners stay calm
    fake_secret = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY"
    assert _secret_hits(f"AWS_ACCESS_KEY_ID={fake_id}")
    assert _secret_hits(f"aws_secret_access_key = {fake_secret}")
    assert _secret_hits("token: hf_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6")
    assert not _secret_hits("secretKeyRef: {name: dad-credentials, key: AWS_SECRET_ACCESS_KEY}")


def test_no_literal_secrets_anywhere_in_infra():
    files = [p for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    files += [ROOT / ".dockerignore", CLUSTER_TOML]
    for path in files:
        hits = _secret_hits(path.read_text(errors="replace"))
        assert not hits, f"{path.relative_to(ROOT)} holds what looks like a credential: {hits}"


def test_cluster_credentials_come_from_a_secret():
    rc = raycluster()
    secrets = set()
    for c in containers_of(rc):
        env = {e["name"]: e for e in c.get("env", [])}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert key in env, f"container {c['name']}: no {key} (S3 run root)"
            ref = env[key].get("valueFrom", {}).get("secretKeyRef")
            assert ref and ref.get("name") and ref.get("key") == key, f"{c['name']}: {key} not from a Secret"
            assert not ref.get("optional", False), f"{key} must not be optional"
            secrets.add(ref["name"])
    assert len(secrets) == 1, f"one Secret for the cluster's credentials, got {secrets}"
    for path, doc in k8s_objects():
        for c in containers_of(doc):
            for e in c.get("env", []):
                if SENSITIVE_ENV.search(e["name"]):
                    assert "value" not in e, f"{path.name}: {e['name']} has a literal value; use secretKeyRef"
                    assert "secretKeyRef" in e.get("valueFrom", {}), f"{path.name}: {e['name']}: no Secret"


# -- Dockerfiles ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfile_installs_the_project_with_extras(name):
    text = dockerfile(name)
    instr = dockerfile_instructions(text)
    kinds = [k for k, _ in instr]
    assert kinds.count("FROM") == 1
    runs = "\n".join(rest for k, rest in instr if k == "RUN")
    assert re.search(r"pip install [^\n]*\"?\.\[hf,s3\]\"?", runs), f"{name}: no `pip install .[hf,s3]`"
    assert "requirements.py" in runs and "--extras hf,s3" in runs and "--add ray=default" in runs, \
        f"{name}: dependencies must come from pyproject.toml (with ray[default] for the job server)"
    assert "python3.11" in runs, f"{name}: Python 3.11 as pyproject requires"
    assert ">=3.11" in pyproject()["project"]["requires-python"]
    assert ("WORKDIR", APP_DIR) in instr, f"{name}: the repository lives in {APP_DIR}"
    assert any(k == "COPY" and rest.split()[-1] in (APP_DIR, ".", APP_DIR + "/") and rest.split()[0] == "."
               for k, rest in instr), f"{name}: the repository is copied into {APP_DIR}"
    assert "wget" in runs, f"{name}: KubeRay's probes need wget"
    users = [rest for k, rest in instr if k == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{name}: run as a non-root user"
    assert "dad --help" in runs, f"{name}: the build smoke-tests the CLI"
    # nothing credential-like is baked in
    for kind, rest in instr:
        if kind in ("ENV", "ARG"):
            assert not re.search(r"AWS_|SECRET|TOKEN|PASSWORD", rest, re.IGNORECASE), f"{name}: {kind} {rest}"
        if kind in ("COPY", "ADD"):
            assert not re.search(r"\.aws|credentials|\.netrc|\.env\b|\.pem", rest), f"{name}: {kind} {rest}"


def test_gpu_dockerfile_has_a_cuda_base_matching_torch():
    base = resolved_base(dockerfile("Dockerfile"))
    cuda_base = r"nvidia/cuda:\d+\.\d+(\.\d+)?-[a-z-]+-ubuntu\d\d\.\d\d"
    assert re.fullmatch(rf"{cuda_base}|rayproject/ray:[\w.\-]+-cu\w+", base), base
    # the CUDA major of the base matches the torch build the pin resolves to (cu130 for torch 2.14.1);
    # read from the installed torch's version.py without importing torch (slow)
    cuda = re.search(r"cuda:(\d+)", base)
    spec = importlib.util.find_spec("torch")
    if cuda and spec and spec.origin:
        info = (Path(spec.origin).parent / "version.py").read_text()
        version = re.search(r"__version__ = '([^'+]+)", info)
        built = re.search(r"cuda: \S+ = '(\d+)\.", info)
        if version and built and version.group(1) == pin("torch"):
            assert cuda.group(1) == built.group(1), f"{base}: torch is a CUDA {built.group(1)} build"


def test_cpu_dockerfile_has_a_slim_python_base_and_cpu_torch():
    base = resolved_base(dockerfile("Dockerfile.cpu"))
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base), base
    runs = "\n".join(rest for k, rest in dockerfile_instructions(dockerfile("Dockerfile.cpu")) if k == "RUN")
    assert "--only torch,torchvision" in runs and "TORCH_INDEX_URL" in runs
    assert "download.pytorch.org/whl/cpu" in dockerfile("Dockerfile.cpu")


def test_requirements_helper_gives_the_pyproject_pins():
    helper = DOCKER / "requirements.py"

    def run(*args):
        out = subprocess.run([sys.executable, str(helper), str(ROOT / "pyproject.toml"), *args],
                             capture_output=True, text=True, check=True)
        return out.stdout.split()

    full = run("--extras", "hf,s3", "--add", "ray=default")
    project = pyproject()["project"]
    expected = [r for r in project["dependencies"] if not r.startswith("ray[") and not r.startswith("ray=")]
    expected += project["optional-dependencies"]["hf"] + project["optional-dependencies"]["s3"]
    for req in expected:
        assert req.replace(" ", "") in full, f"{req} missing from the image requirements"
    ray = [r for r in full if r.startswith("ray[")]
    assert len(ray) == 1 and ray[0].endswith(f"=={pin('ray')}") and "default" in ray[0] and "data" in ray[0]
    torch_pins = [f"torch=={pin('torch')}", f"torchvision=={pin('torchvision')}"]
    assert run("--only", "torch,torchvision") == torch_pins


# -- .dockerignore ----------------------------------------------------------------------------------

def _dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: last matching pattern wins; a match on a parent directory counts."""
    def to_regex(p: str) -> re.Pattern:
        p = p.strip("/")
        out, i = "", 0
        while i < len(p):
            if p.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif p.startswith("**", i):
                out, i = out + ".*", i + 2
            elif p[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif p[i] == "?":
                out, i = out + "[^/]", i + 1
            elif p[i] == "[":
                j = p.index("]", i)
                out, i = out + p[i:j + 1], j + 1
            else:
                out, i = out + re.escape(p[i]), i + 1
        return re.compile(out + r"\Z")

    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        rx = to_regex(raw[1:] if negate else raw)
        if any(rx.match(c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_the_context_clean():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
    for path in (".venv/bin/python", ".git/HEAD", "runs/example/dad.toml",
                 "pipeline/__pycache__/cli.cpython-311.pyc", "dad_pipeline.egg-info/PKG-INFO", ".env",
                 ".aws/credentials", "infra/k8s/credentials",
                 "keys/server.pem", "report/index.html", "build/lib/x.py"):
        assert _dockerignore_excludes(path, patterns), f".dockerignore lets {path} into the image"
    for path in ("pyproject.toml", "README.md", "pipeline/cli.py", "stages/shard.py", "student/metrics.py",
                 "configs/cluster.toml", "infra/docker/requirements.py"):
        assert not _dockerignore_excludes(path, patterns), f".dockerignore drops {path}; the build needs it"
    # what the image needs is actually in the repository
    for path in ("pyproject.toml", "configs/cluster.toml", "infra/docker/requirements.py"):
        assert (ROOT / path).exists(), path
