"""Launch files (k8s/, Dockerfile, slurm/*.sbatch): valid, consistent with each other and with the job.

No cluster and no Docker: every manifest is checked strictly against the Kubernetes API schemas shipped by
kubernetes-validate (Kubernetes 1.31, the oldest minor these manifests claim, where Job podFailurePolicy
is GA, and 1.37, the newest it ships); TrainJob and PyTorchJob against their CRDs in ../shared/schemas,
and the pods inside them strictly as Pods. Every torchrun line is parsed by torchrun's own parser in the
environment its operator would give it, and its job arguments by job.config; the check that every training pod
runs before torchrun is run on the ConfigMap's config. hadolint lints every Dockerfile.
"""

import copy
import dataclasses
import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from urllib.parse import urlsplit

from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.k8s_model")  # its asserts explain their failures like the ones here

from job import config, mlflow_env  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.k8s_model import (  # noqa: E402
    CRDS, DOCKERFILE, DOCKERFILES, DOCS, EXPECTED_FILES, GPU, K8S, KUBERNETES_VERSIONS, KUEUE_QUEUE, LAUNCHES,
    LAUNCHES_ERROR, LOADED, PODS, PODS_ERROR, ROOT, TRAINING, admission_problems, as_pod, broken_copy, built_image,
    by_name, check_first_problems, config_file_text, container_env, crd_errors, doc_id, dockerfile_home,
    dockerfile_instructions, dockerfile_user, exit_2_problems, find, hadolint, http_status, ignored_flags, image_dockerfile,
    is_torchrun, job_config, k8s_launches, kubernetes_validate, launch_id, launchers, local_paths, localize,
    mlflow_server, need, network_policy_problems, parse_torchrun, pip_installs, pod_id, probe_problems,
    provenance_problems,
    security_problems, server_image_problems, shell_launches, strings, torchrun_index)

BUILTIN_DOCS = [(n, d) for n, d in DOCS if (d["apiVersion"], d["kind"]) not in CRDS]
CRD_DOCS = [(n, d) for n, d in DOCS if (d["apiVersion"], d["kind"]) in CRDS]
CRD_PODS = [p for p in PODS if p.launcher.split("/")[0] in {k for _, k in CRDS}]  # pods that the operators make
K8S_LAUNCHES = [launch for launch in LAUNCHES if launch.pod is not None]
LAUNCHERS = launchers() if PODS_ERROR is None else []
SERVER_DOCKERFILE = ROOT / "Dockerfile.mlflow"
# Label sets of pods that must not reach the MLflow server: unlabelled, another app's, the server's own kind
OUTSIDERS = [{}, {"app": "notebook"}, {"app.kubernetes.io/name": "mlflow"}, {"app.kubernetes.io/name": "senet-jobs"}]


def mlflow_server_pod():
    """The pod of the MLflow Deployment."""
    deployment, _, _ = mlflow_server()
    return next(p for p in PODS if p.spec is deployment["spec"]["template"]["spec"])


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


@pytest.mark.parametrize("check", ["builtin", "crd", "crd-pod", "security", "overrides", "check-first", "exit-2",
                                   "admission", "ignored-flags", "probes", "provenance", "server-image",
                                   "network-policy"])
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
        pod.spec["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
        pod.spec["automountServiceAccountToken"] = True
        problems = " ".join(security_problems(pod, dockerfile_user()[0], dockerfile_home()))
        assert "allowPrivilegeEscalation" in problems and "literal value" in problems and "/dev/shm" in problems
        assert "readOnlyRootFilesystem is not true" in problems and "API token" in problems
        assert "/tmp is not a writable" in problems and f"{dockerfile_home()} is not a writable" in problems
        trainjob = copy.deepcopy(next(p for p in PODS if p.launcher.startswith("TrainJob/")))
        del trainjob.spec["serviceAccountName"]  # the namespace's default account: a token in every pod
        assert "API token" in " ".join(security_problems(trainjob, dockerfile_user()[0], dockerfile_home()))
    elif check == "overrides":
        launch = copy.deepcopy(k8s_launches()[0])
        launch.argv.append("train.epochz=3")
        with pytest.raises(pytest.fail.Exception, match="did you mean train.epochs"):
            job_config(launch, parse_torchrun(launch, monkeypatch), tmp_path)
    elif check == "check-first":  # torchrun alone; after `;`; without exec; the check given other arguments
        launch = k8s_launches()[0]
        check_line, torchrun = launch.commands[-2][1], launch.commands[-1][1]
        other = [*check_line[:-1], "train.out_dir=/mnt/senet/runs/other"]
        for commands, problem in (([("", torchrun[1:])], "without"), ([("", check_line), (";", torchrun)], "&&"),
                                  ([("", check_line), ("&&", torchrun[1:])], "exec"),
                                  ([("", other), ("&&", torchrun)], "not torchrun's job arguments")):
            assert problem in " ".join(check_first_problems(dataclasses.replace(launch, commands=commands))), commands
    elif check == "exit-2":  # no FailJob rule; a Count rule for 2 before it; restartPolicy OnFailure
        name = next(launch.container["name"] for launch in k8s_launches() if launch.pod.launcher.startswith("Job/"))
        rules = ["spec", "podFailurePolicy", "rules"]
        job = broken_copy("indexed-job.yaml", rules, [])
        assert "no podFailurePolicy rule" in " ".join(exit_2_problems(job, name))
        count = {"action": "Count", "onExitCodes": {"operator": "NotIn", "values": [0]}}
        kept = find("Job", "senet-indexed")["spec"]["podFailurePolicy"]["rules"]
        job = broken_copy("indexed-job.yaml", rules, [count, *kept])
        assert "rule Count first" in " ".join(exit_2_problems(job, name))
        job = broken_copy("indexed-job.yaml", ["spec", "template", "spec", "restartPolicy"], "OnFailure")
        assert "restartPolicy" in " ".join(exit_2_problems(job, name))
    elif check == "admission":  # no queue label; suspend false; suspend where PyTorchJob has none (its CRD says so)
        job = broken_copy("indexed-job.yaml", ["metadata", "labels"], {})
        assert f"no {KUEUE_QUEUE}" in " ".join(admission_problems(job))
        assert "spec.suspend" in " ".join(admission_problems(broken_copy("trainjob.yaml", ["spec", "suspend"], False)))
        pytorchjob = broken_copy("pytorchjob.yaml", ["spec", "suspend"], True)
        del pytorchjob["spec"]["runPolicy"]["suspend"]
        assert "runPolicy.suspend" in " ".join(admission_problems(pytorchjob))
        assert any(e.startswith("spec:") and "suspend" in e for e in crd_errors(pytorchjob))
    elif check == "ignored-flags":
        launch = copy.deepcopy(k8s_launches()[0])
        launch.argv.insert(0, "--node_rank=1")
        assert ignored_flags(launch, "c10d") == ["--node_rank=1"] and ignored_flags(launch, "static") == []
    elif check == "probes":  # the readiness probe on another port; no liveness probe
        _, container, _ = mlflow_server()
        container = copy.deepcopy(container)
        container["readinessProbe"]["httpGet"]["port"] = 8080
        del container["livenessProbe"]
        problems = " ".join(probe_problems(container, 5000))
        assert "readinessProbe asks /health on port 8080" in problems and "no livenessProbe" in problems
    elif check == "provenance":  # no ENV; the ARG before the install
        ops = dockerfile_instructions()
        no_env = [(op, arg) for op, arg in ops if not (op == "ENV" and "SENET_GIT_COMMIT" in arg)]
        assert "no ENV SENET_GIT_COMMIT" in " ".join(provenance_problems(no_env))
        arg = next(o for o in ops if o[0] == "ARG" and o[1].startswith("GIT_COMMIT"))
        early = [ops[0], arg, *[o for o in ops[1:] if o != arg]]
        assert "a RUN after ARG GIT_COMMIT" in " ".join(provenance_problems(early))
    elif check == "network-policy":  # any pod of any namespace; every pod; another port; no policy at all
        server, policies = mlflow_server_pod(), [d for _, d in DOCS if d["kind"] == "NetworkPolicy"]
        for path, value, problem in ((["from", 0], {"namespaceSelector": {}}, "other namespaces"),
                                     (["from", 0, "podSelector"], {}, "admits a pod labelled {}"),
                                     (["ports", 0, "port"], 8080, "not for port 5000 alone")):
            broken = copy.deepcopy(policies)
            node = broken[0]["spec"]["ingress"][0]
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
            assert problem in " ".join(network_policy_problems(broken, server, 5000, TRAINING, OUTSIDERS)), path
        assert "no NetworkPolicy selects" in " ".join(network_policy_problems([], server, 5000, TRAINING, []))
    else:  # an unpinned driver, an MLflow older than pyproject allows, a store without its driver
        manifest, pyproject = (K8S / "mlflow-server.yaml").read_text(), (ROOT / "pyproject.toml").read_text()
        ops = [("RUN", "python -m pip install --no-cache-dir mlflow==2.22.0 boto3 && mlflow --version")]
        problems = " ".join(server_image_problems(ops, manifest, pyproject))
        assert "boto3 is not pinned" in problems and "mlflow==2.22.0 is not" in problems
        assert "postgresql:// needs psycopg2-binary" in problems and "basic-auth needs mlflow[auth]" in problems


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
    assert ignored_flags(launch, args.rdzv_backend) == [], "the rendezvous ignores them: they only read as working"
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


@pytest.mark.parametrize("launch", K8S_LAUNCHES, ids=launch_id)
def test_training_pods_check_the_config_before_torchrun(launch, tmp_path, capfd):
    """The pod's own check, run on the ConfigMap's config: it passes (writing nothing), and a mistake in the job's
    arguments ends it with exit 2 and one line."""
    from job.train import main, parse_args
    from tests.fakecifar import make_cifar10

    assert check_first_problems(launch) == []
    paths = local_paths(launch.pod, launch.container, tmp_path)
    check = [localize(a, paths) for a in launch.commands[torchrun_index(launch.commands) - 1][1][3:]]
    capfd.readouterr()
    assert main(check) == 2  # CIFAR-10 not staged on the volume yet: found before torchrun, not in every restart
    assert "error: CIFAR-10 not found: " in capfd.readouterr().err
    args = parse_args(check)
    make_cifar10(Path(config.load(args.config, args.overrides).data.root), n_train_per_batch=10, n_test=10)
    check.append("data.verify=false")  # staged, as docs/kubernetes.md says, but not the original files' md5
    empty = [path for path in paths.values() if not any(path.iterdir())]
    assert main(check) == 0, capfd.readouterr().err
    assert "senet-job: config OK; starts fresh" in capfd.readouterr().out
    assert main([*check, "train.epochz=3"]) == 2
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "train.epochz" in err[0], err
    assert empty and not any(any(path.iterdir()) for path in empty), "the check wrote to a volume"


def test_indexed_job_fails_at_once_when_the_check_exits_2():
    for launch in [launch for launch in K8S_LAUNCHES if launch.pod.launcher.startswith("Job/")]:
        job = find(*launch.pod.launcher.split("/"))
        assert exit_2_problems(job, launch.container["name"]) == []


def test_pytorchjob_retries_of_the_check_are_counted():
    """Its API has no rule per exit code that spares torchrun's exit 1 on SIGTERM (k8s/pytorchjob.yaml): the
    check's exit 2 restarts in place, counted against backoffLimit, which counts restarts of Running pods only."""
    for _, doc in [(n, d) for n, d in LAUNCHERS if d["kind"] == "PyTorchJob"]:
        assert isinstance(doc["spec"]["runPolicy"].get("backoffLimit"), int)
        for replica in doc["spec"]["pytorchReplicaSpecs"].values():
            assert replica["restartPolicy"] == "OnFailure"
            assert not replica["template"]["spec"].get("initContainers"), "a failing init container is never counted"


@pytest.mark.parametrize("name,doc", LAUNCHERS, ids=[doc_id(n, d) for n, d in LAUNCHERS])
def test_launchers_wait_suspended_for_kueue(name, doc):
    assert admission_problems(doc) == []
    line = next(line for line in (K8S / name).read_text().splitlines() if f"{KUEUE_QUEUE}:" in line)
    assert "# EDIT" in line, "the queue is the cluster's: mark it for editing"


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
    dockerfile = image_dockerfile(pod.spec["containers"][0]["image"])
    uid, gid = dockerfile_user(dockerfile)
    assert security_problems(pod, uid, dockerfile_home(dockerfile)) == []
    sc = pod.spec["securityContext"]
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
    assert int(env["TORCH_FR_BUFFER_SIZE"]["value"]) > 0 and env["TORCH_NCCL_DUMP_ON_TIMEOUT"]["value"] == "1"
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):  # multi-NIC nodes: one ConfigMap key, empty = unset
        ref = env[name]["valueFrom"]["configMapKeyRef"]
        assert (ref["name"], ref["key"]) == ("senet-network", "SOCKET_IFNAME")
        assert find("ConfigMap", "senet-network")["data"]["SOCKET_IFNAME"] == ""


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
        assert [s for s in strings(doc) if mlflow_env.redact(s) != s] == [], f"{doc_id(name, doc)}: a URI with a password"


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
    assert probe_problems(container, options["port"]) == []
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


def test_only_the_jobs_pods_reach_the_mlflow_server():
    policies = [d for _, d in DOCS if d["kind"] == "NetworkPolicy"]
    _, _, args = mlflow_server()
    port = int(next(a for a in args if a.startswith("--port=")).split("=", 1)[1])
    assert network_policy_problems(policies, mlflow_server_pod(), port, TRAINING, OUTSIDERS) == []
    assert all(p.labels for p in TRAINING), "every training pod carries the labels the policy admits"


def test_mlflow_server_requires_the_credentials_the_training_pods_send():
    """basic-auth, its admin from the Secret the training pods read, its user store on the volume."""
    import configparser

    deployment, container, args = mlflow_server()
    assert "--app-name=basic-auth" in args
    env = container_env(container)
    for admin, sent in (("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_TRACKING_USERNAME"),
                        ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_TRACKING_PASSWORD")):
        ref = env[admin]["valueFrom"]["secretKeyRef"]
        for pod in TRAINING:
            theirs = container_env(next(c for c in pod.spec["containers"] if is_torchrun(c)))[sent]
            assert theirs["valueFrom"]["secretKeyRef"] | {"optional": True} == ref | {"optional": True}, pod.where
    pod = mlflow_server_pod()
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod.spec["volumes"]}
    ini = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    source = volumes[mounts[str(ini.parent)]]["configMap"]["name"]
    auth = configparser.ConfigParser()
    auth.read_string(find("ConfigMap", source)["data"][ini.name])
    store = auth["mlflow"]["database_uri"].removeprefix("sqlite:///")
    assert "persistentVolumeClaim" in volumes[mounts[str(Path(store).parent)]], "the user store is not on the PVC"
    assert auth["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    assert not {"admin_username", "admin_password"} & set(auth["mlflow"]), "the admin comes from the Secret"


@pytest.mark.slow
def test_mlflow_server_starts_with_the_manifest_settings(tmp_path):
    """The manifest's command and environment, with the volume under tmp_path: /health, and Host checks."""
    deployment, container, args = mlflow_server()
    pod = next(p for p in PODS if p.spec is deployment["spec"]["template"]["spec"])
    paths = local_paths(pod, container, tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update({e["name"]: localize(e["value"], paths) for e in container.get("env", []) if "value" in e})
    secret = {"MLFLOW_TRACKING_USERNAME": "senet", "MLFLOW_TRACKING_PASSWORD": "a-test-password-0123",
              "MLFLOW_FLASK_SERVER_SECRET_KEY": "a-test-key"}
    env.update({e["name"]: secret[e["valueFrom"]["secretKeyRef"]["key"]] for e in container.get("env", [])
                if "secretKeyRef" in e.get("valueFrom", {})})  # the Secret mlflow-credentials, as kubectl makes it
    user = (secret["MLFLOW_TRACKING_USERNAME"], secret["MLFLOW_TRACKING_PASSWORD"])
    for source in container["envFrom"]:
        if "configMapRef" in source:
            settings = find("ConfigMap", source["configMapRef"]["name"])["data"]
            env.update({k: localize(v, paths) for k, v in settings.items()})
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
        assert http_status(port, search, uri.netloc, user) == 200
        assert http_status(port, search, uri.netloc) == 401, "the server answers without credentials"
        assert http_status(port, search, uri.netloc, ("senet", "wrong-password-0123")) == 401
        assert http_status(port, search, "evil.example.com", user) == 403
        for store in ("mlflow.db", "basic_auth.db"):
            assert any(path.joinpath(store).is_file() for path in paths.values()), \
                f"{store} is not on the volume where the ConfigMaps put it"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---------------------------------------------------------------------------------------------------------
# Tests: the image

@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(path):
    result = subprocess.run([hadolint(), "--no-color", path.name], cwd=ROOT, capture_output=True, text=True,
                            check=False)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    bad = subprocess.run([hadolint(), "--no-color", "-"], input="FROM pytorch/pytorch:latest\nRUN pip install x\n",
                         capture_output=True, text=True, check=False)
    assert bad.returncode != 0 and "DL3007" in bad.stdout, "hadolint finds nothing in a bad Dockerfile"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_base_user_and_entrypoint(path):
    ops = dockerfile_instructions(path)
    bases = [arg.split()[0] for op, arg in ops if op == "FROM"]
    assert bases, f"{path.name}: no FROM"
    for base in bases:
        name, _, tag = base.partition("@")[0].rpartition(":")
        assert name and re.fullmatch(r"\d+\.\d+\.\d+[-\w.]*", tag), f"FROM {base}: pin a full version tag"
        assert "devel" not in tag, f"FROM {base}: a runtime image, not devel"
    assert not [op for op, _ in ops if op == "ENTRYPOINT"], "the manifests state their commands"
    dockerfile_user(path)


def test_dockerfile_installs_the_package_with_its_gpu_extra():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r"^gpu\s*=", pyproject, re.MULTILINE), "pyproject has no gpu extra"
    extras = {e.strip() for spec in pip_installs(dockerfile_instructions())
              if (m := re.fullmatch(r"\./?\[([^\]]*)\]", spec)) for e in m.group(1).split(",")}
    assert "gpu" in extras, "MLflow's GPU system metrics need nvidia-ml-py (the gpu extra) in the training image"


def test_dockerfile_exports_the_git_commit():
    assert provenance_problems(dockerfile_instructions()) == []
    builds = [line for path in (DOCKERFILE, ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
              for line in path.read_text().splitlines()
              if "docker build" in line and built_image(DOCKERFILE) in line]
    assert builds and all("--build-arg GIT_COMMIT=$(git rev-parse HEAD)" in line for line in builds), builds


def test_dockerfiles_copy_what_the_build_needs():
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python 3.11+; the project allows 3.10)
    readme = re.search(r'^readme\s*=\s*"([^"]+)"', pyproject, re.MULTILINE).group(1)
    packages = re.search(r"^include\s*=\s*\[([^\]]*)\]", pyproject, re.MULTILINE).group(1)
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    for path in DOCKERFILES:  # both build from the repository root, with the one .dockerignore
        copied = {src.rstrip("/") for op, arg in dockerfile_instructions(path) if op in ("COPY", "ADD")
                  for src in shlex.split(arg)[:-1] if not src.startswith("--")}
        if path == DOCKERFILE:
            needed = {"pyproject.toml", readme} | {p.split("*")[0] for p in re.findall(r'"([^"]+)"', packages)}
            assert needed <= copied, f"not copied into the image: {needed - copied}"
        if "*" in ignore:  # an allow-list: each copied path must be let back in
            assert all(f"!{src}" in ignore or f"!{src}/" in ignore for src in copied), (path.name, ignore)


def test_every_pod_runs_the_image_of_its_dockerfile():
    assert len({built_image(p) for p in DOCKERFILES}) == len(DOCKERFILES), "each Dockerfile builds its own image"
    training = {c["image"] for pod in TRAINING for c in pod.spec["containers"]}
    assert training == {built_image(DOCKERFILE)}, training
    _, server, _ = mlflow_server()
    assert image_dockerfile(server["image"]) == SERVER_DOCKERFILE, "the server needs none of the CUDA image"
    for image in {c["image"] for pod in PODS for c in pod.spec["containers"]}:
        image_dockerfile(image)
        assert ":" in image and not image.endswith(":latest")


def test_mlflow_image_serves_the_manifest_stores():
    manifest = (K8S / "mlflow-server.yaml").read_text()
    ops = dockerfile_instructions(SERVER_DOCKERFILE)
    assert server_image_problems(ops, manifest, (ROOT / "pyproject.toml").read_text()) == []
    _, container, args = mlflow_server()
    assert any(a.startswith("--serve-artifacts") for a in args) and container["command"][0] == "mlflow"
