"""Launch files (k8s/, Dockerfile, slurm/*.sbatch): valid, consistent with each other and with the job.

No cluster and no Docker: every manifest is checked strictly against the Kubernetes API schemas shipped by
kubernetes-validate (Kubernetes 1.31, the oldest minor these manifests claim, where Job podFailurePolicy
is GA, and 1.37, the newest it ships); TrainJob and PyTorchJob against their CRDs in ../shared/schemas,
and the pods inside them strictly as Pods. Every torchrun line is parsed by torchrun's own parser in the
environment its operator would give it, and its job arguments by job.config. hadolint lints the Dockerfile.
"""

import copy
import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from urllib.parse import urlsplit

import pytest

pytest.register_assert_rewrite("tests.k8s_model")  # its asserts explain their failures like the ones here

from job import config  # noqa: E402
from tests.k8s_model import (  # noqa: E402
    CRDS, DOCS, EXPECTED_FILES, GPU, KUBERNETES_VERSIONS, LAUNCHES, LAUNCHES_ERROR, LOADED, PODS, PODS_ERROR, ROOT,
    TRAINING, as_pod, broken_copy, by_name, config_file_text, container_env, crd_errors, doc_id,
    dockerfile_instructions, dockerfile_user, find, free_port, hadolint, http_status, is_torchrun, job_config,
    k8s_launches, kubernetes_validate, launch_id, mlflow_server, need, parse_torchrun, pod_id, security_problems,
    shell_launches, strings)

BUILTIN_DOCS = [(n, d) for n, d in DOCS if (d["apiVersion"], d["kind"]) not in CRDS]
CRD_DOCS = [(n, d) for n, d in DOCS if (d["apiVersion"], d["kind"]) in CRDS]
CRD_PODS = [p for p in PODS if p.launcher.split("/")[0] in {k for _, k in CRDS}]  # pods that the operators make


# ---------------------------------------------------------------------------------------------------------
# Tests: files and schemas

def test_files_exist_and_parse():
    assert EXPECTED_FILES <= set(LOADED), f"missing in k8s/: {sorted(EXPECTED_FILES - set(LOADED))}"
    assert [error for _, error in LOADED.values() if error] == []
    assert (PODS_ERROR, LAUNCHES_ERROR) == (None, None)
    assert all(isinstance(d, dict) and {"apiVersion", "kind", "metadata"} <= d.keys() for _, d in DOCS)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name,doc", BUILTIN_DOCS, ids=[doc_id(n, d) for n, d in BUILTIN_DOCS])
def test_builtin_kinds_validate_strictly(name, doc, version):
    kubernetes_validate(doc, version)


@pytest.mark.parametrize("name,doc", CRD_DOCS, ids=[doc_id(n, d) for n, d in CRD_DOCS])
def test_crd_kinds_validate_against_their_crds(name, doc):
    assert crd_errors(doc) == []
    # x-kubernetes-validations (CEL) that jsonschema cannot run, and the operators' admission rules
    name = doc["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), "an RFC 1035 label"
    assert len(name) <= 50, "pod hostnames and Services append -master-0, -node-0-0, ... (63 at most)"
    if doc["kind"] == "PyTorchJob":
        replicas = doc["spec"]["pytorchReplicaSpecs"]
        assert set(replicas) <= {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
        assert all(by_name(r["template"]["spec"]["containers"], "pytorch") for r in replicas.values())
    if doc["kind"] == "TrainJob":
        assert doc["spec"]["trainer"]["numProcPerNode"] >= 1 and "managedBy" not in doc["spec"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("pod", CRD_PODS, ids=pod_id)
def test_pods_inside_crd_kinds_validate_strictly(pod, version):
    kubernetes_validate(as_pod(pod.spec, "x"), version)


@pytest.mark.parametrize("check", ["builtin", "crd", "crd-pod", "security", "overrides"])
def test_checks_reject_a_broken_copy(check, tmp_path, monkeypatch):
    """The validators above are not vacuous: one deliberate mistake each, caught."""
    if check == "builtin":  # a misspelled container field in the Indexed Job
        doc = broken_copy("indexed-job.yaml", ["spec", "template", "spec", "containers", 0, "volumeMount"], [])
        with pytest.raises(need("kubernetes_validate").ValidationError):
            kubernetes_validate(doc, KUBERNETES_VERSIONS[0])
    elif check == "crd":  # a misspelled field deep in the TrainJob's runtimePatches, and a wrong type
        patch = ["spec", "runtimePatches", 0, "trainingRuntimeSpec", "template", "spec", "replicatedJobs", 0,
                 "template", "spec", "template", "spec", "terminationGracePeriodSecond"]
        assert any("terminationGracePeriodSecond" in e for e in crd_errors(broken_copy("trainjob.yaml", patch, 120)))
        assert crd_errors(broken_copy("trainjob.yaml", ["spec", "trainer", "numNodes"], "two"))
    elif check == "crd-pod":  # a PyTorchJob's pod with `resources.limit` for limits
        pod = copy.deepcopy(next(p for p in PODS if p.launcher.startswith("PyTorchJob/")))
        pod.spec["containers"][0]["resources"] = {"limit": {GPU: 4}}
        with pytest.raises(need("kubernetes_validate").ValidationError, match="limit"):
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
    container = next(c for c in pod.spec["containers"] if is_torchrun(c))
    assert args.rdzv_backend == "c10d" and args.max_restarts >= 1
    assert args.rdzv_endpoint.rsplit(":", 1)[0] == pod.rdzv_host
    assert (args.nnodes, args.nproc_per_node) == (str(pod.nodes), str(container["resources"]["limits"][GPU]))
    if pod.nproc is not None:
        assert pod.nproc == container["resources"]["limits"][GPU], "processes per node = GPUs per node"
    mount = next(m["mountPath"] for m in container["volumeMounts"]
                 if "persistentVolumeClaim" in by_name(pod.spec["volumes"], m["name"]))
    for key, value in (("data.root", cfg.data.root), ("train.out_dir", cfg.train.out_dir)):
        assert value.startswith(mount + "/"), f"{launch.where}: {key} {value} is not on the shared volume"
    assert cfg.mlflow.tracking_uri == "", "the URI comes from MLFLOW_TRACKING_URI (ConfigMap)"


def test_indexed_job_and_its_headless_service_agree():
    job = next(d for _, d in DOCS if d["kind"] == "Job" and d["spec"].get("completionMode") == "Indexed")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completions"] == spec["parallelism"] and pod["restartPolicy"] == "Never"
    service = find("Service", pod["subdomain"])
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
    cm = find("ConfigMap", "senet-train-config")
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
    container = next(c for c in pod.spec["containers"] if is_torchrun(c))
    env = container_env(container)
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"]["value"] == "1"
    assert env["KUBERNETES_POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    ref = env["MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"]
    assert "MLFLOW_TRACKING_URI" in (find("ConfigMap", ref["name"]) or {}).get("data", {})
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
                cm = find("ConfigMap", ref["configMapKeyRef"]["name"])
                assert cm and ref["configMapKeyRef"]["key"] in cm["data"], f"{e['name']}: no such ConfigMap key"
            if "secretKeyRef" in ref:  # no Secret is shipped: every reference must be optional
                assert ref["secretKeyRef"].get("optional") is True, f"{e['name']}: Secret reference not optional"
        for source in c.get("envFrom", []):
            if "configMapRef" in source:
                assert find("ConfigMap", source["configMapRef"]["name"])
            if "secretRef" in source:
                assert source["secretRef"].get("optional") is True
    for v in volumes.values():
        if "configMap" in v:
            assert find("ConfigMap", v["configMap"]["name"]), f"volume {v['name']}: no such ConfigMap"
        if "persistentVolumeClaim" in v:
            assert find("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"])
        assert "secret" not in v or v["secret"].get("optional") is True


def test_no_secret_values_are_shipped():
    assert [doc_id(n, d) for n, d in DOCS if d["kind"] == "Secret"] == []
    for name, doc in DOCS:
        assert [s for s in strings(doc) if config.redact(s) != s] == [], f"{doc_id(name, doc)}: a URI with a password"


def test_shared_volume_is_read_write_many():
    for pod in TRAINING:
        for v in pod.spec["volumes"]:
            if "persistentVolumeClaim" in v:
                pvc = find("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"])
                assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "every node reads the checkpoints"


# ---------------------------------------------------------------------------------------------------------
# Tests: the MLflow server

@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # importing mlflow.cli (sqlalchemy, starlette)
def test_mlflow_server_settings():
    import mlflow.cli
    from mlflow.server.security_utils import is_allowed_host_header

    deployment, container, args = mlflow_server()
    server = mlflow.cli.cli.commands["server"]
    options = server.make_context("server", list(args)).params  # unknown or malformed options raise here
    assert options["serve_artifacts"] and options["workers"] and options["port"] == 5000
    envvars = {p.envvar for p in server.params if p.envvar}
    for source in container["envFrom"]:
        if "configMapRef" in source:
            settings = find("ConfigMap", source["configMapRef"]["name"])["data"]
            assert set(settings) <= envvars, f"not `mlflow server` settings: {set(settings) - envvars}"
            assert {"MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION"} <= set(settings)
    assert container_env(container)["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    spec = deployment["spec"]["template"]["spec"]
    assert spec["enableServiceLinks"] is False, "a Service named mlflow sets MLFLOW_PORT, mlflow server's --port"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys() & container["resources"]["limits"].keys()
    # the URI the training pods get reaches this Service, and the server accepts its Host header
    uri = urlsplit(find("ConfigMap", "mlflow-tracking")["data"]["MLFLOW_TRACKING_URI"])
    service = find("Service", uri.hostname)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service and service["spec"]["selector"].items() <= labels.items()
    assert uri.port in [p["port"] for p in service["spec"]["ports"]]
    allowed = [h.strip() for h in options["allowed_hosts"].split(",")]
    assert is_allowed_host_header(allowed, uri.netloc)
    assert is_allowed_host_header(allowed, f"{uri.hostname}.team-a.svc.cluster.local:{uri.port}")
    for foreign in ("evil.example.com", f"{uri.hostname}.evil.com:{uri.port}"):
        assert not is_allowed_host_header(allowed, foreign), foreign


def test_mlflow_server_starts_with_the_manifest_settings(tmp_path):
    """The manifest's command and environment, with the volume under tmp_path: /health, and Host checks."""
    _, container, args = mlflow_server()
    mount = container["volumeMounts"][0]["mountPath"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    for source in container["envFrom"]:
        if "configMapRef" in source:
            env.update({k: re.sub(re.escape(mount) + "(?=/|$)", str(tmp_path), v, count=1) for k, v in
                        find("ConfigMap", source["configMapRef"]["name"])["data"].items()})
    port = free_port()
    args = [a for a in args if not a.startswith(("--host", "--port"))] + ["--host=127.0.0.1", f"--port={port}"]
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", *args], cwd=tmp_path, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if http_status(port, "/health", "10.0.0.7:5000") == 200:  # a kubelet probe's Host: the pod IP
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not answer /health within 90 s"
            time.sleep(0.3)
        uri = urlsplit(find("ConfigMap", "mlflow-tracking")["data"]["MLFLOW_TRACKING_URI"])
        search = "/api/2.0/mlflow/experiments/search?max_results=1"
        assert http_status(port, search, uri.netloc) == 200
        assert http_status(port, search, "evil.example.com") == 403
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

def test_hadolint_is_clean():
    result = subprocess.run([hadolint(), "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True,
                            check=False)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    bad = subprocess.run([hadolint(), "--no-color", "-"], input="FROM pytorch/pytorch:latest\nRUN pip install x\n",
                         capture_output=True, text=True, check=False)
    assert bad.returncode != 0 and "DL3007" in bad.stdout, "hadolint finds nothing in a bad Dockerfile"


def test_dockerfile_base_user_and_entrypoint():
    ops = dockerfile_instructions()
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
    copied = {src.rstrip("/") for op, arg in dockerfile_instructions() if op == "COPY"
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
