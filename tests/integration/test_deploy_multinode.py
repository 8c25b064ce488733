"""The trainer across nodes on Kubernetes: deploy/k8s/overlays/multinode (an Indexed Job, torchrun with a
static rendezvous at pod 0) and deploy/k8s/overlays/pytorchjob (a Kubeflow PyTorchJob). Each is built by
`kubectl kustomize` where kubectl exists (the real output); the static checks read the files."""

from __future__ import annotations

import copy
import os
import pathlib
import re
import shutil
import subprocess

import pytest
import yaml

from tests.integration.test_deploy_static import BASE, CONFIG, K8S, assert_torchrun_starts, find, load_all

MULTINODE = K8S / "overlays/multinode"
PYTORCHJOB = K8S / "overlays/pytorchjob"
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


def built(folder: pathlib.Path) -> list[dict]:
    result = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def env_of(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


def selects(service: dict, labels: dict) -> bool:
    return all(labels.get(key) == value for key, value in service["spec"]["selector"].items())


@needs_kubectl
def test_the_indexed_job_runs_one_torchrun_node_per_pod_with_pod_0_as_master():
    documents = built(MULTINODE)
    job = find(documents, "Job", "trainer")
    pod = job["spec"]["template"]
    container = pod["spec"]["containers"][0]
    env = env_of(container)
    nodes = int(env["NODES"]["value"])
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == nodes >= 2
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    command = container["command"]
    assert command[0] == "torchrun" and {"--nnodes=$(NODES)", "--node_rank=$(NODE_RANK)"} <= set(command)
    master = next(word.split("=", 1)[1] for word in command if word.startswith("--master_addr="))
    port = int(next(word.split("=", 1)[1] for word in command if word.startswith("--master_port=")))
    subdomain = pod["spec"]["subdomain"]
    assert master == f"{job['metadata']['name']}-0.{subdomain}", "pod 0's DNS name is <job>-0.<subdomain>"
    nodes_service = find(documents, "Service", subdomain)
    assert nodes_service["spec"]["clusterIP"] == "None" and nodes_service["spec"]["publishNotReadyAddresses"]
    assert selects(nodes_service, pod["metadata"]["labels"])
    named_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert any(p["port"] == port and named_ports[p["targetPort"]] == port for p in nodes_service["spec"]["ports"])
    rendezvous = find(documents, "Service", "trainer-rendezvous")
    pod_0 = {**pod["metadata"]["labels"], "batch.kubernetes.io/job-completion-index": "0"}
    pod_1 = {**pod["metadata"]["labels"], "batch.kubernetes.io/job-completion-index": "1"}
    assert selects(rendezvous, pod_0) and not selects(rendezvous, pod_1), "the broadcast store is on rank 0"
    claim = find(documents, "PersistentVolumeClaim", "belay-checkpoints")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


@needs_kubectl
def test_only_pod_0_probes_the_trainers_metrics():
    container = find(built(MULTINODE), "Job", "trainer")["spec"]["template"]["spec"]["containers"][0]
    for kind in ("startupProbe", "readinessProbe"):
        command = container[kind]["exec"]["command"]
        assert command[:2] == ["sh", "-c"]
        script = command[2].replace("exec python /app/docker/healthcheck.py", "exit 7; :")  # the real probe
        for rank, expected in (("1", 0), ("3", 0), ("0", 7)):
            result = subprocess.run(["sh", "-c", script], env={"NODE_RANK": rank, "PATH": os.environ["PATH"]})
            assert result.returncode == expected, f"{kind} with NODE_RANK={rank}"


def test_the_indexed_jobs_torchrun_command_starts():
    patch = load_all(MULTINODE / "trainer-indexed.yaml")[0]
    command = next(op["value"] for op in patch if op["path"].endswith("/command"))
    command = [re.sub(r"^--master_addr=.*", "--master_addr=127.0.0.1", word) for word in command]
    command = [re.sub(r"^--master_port=.*", "--master_port=0", word) for word in command]
    assert_torchrun_starts(command, {"NODES": "1", "GPUS": "1", "NODE_RANK": "0"})


def pod_without_torchrun_specifics(template: dict) -> dict:
    """A trainer pod template with what differs by launcher taken out: the container's name,
    command, the GPUS variable, probes and ports; the Job's restart policy."""
    template = copy.deepcopy(template)
    template["spec"].pop("restartPolicy", None)
    main = template["spec"]["containers"][0]
    for key in ("name", "command", "startupProbe", "readinessProbe", "ports"):
        main.pop(key, None)
    main["env"] = [item for item in main["env"] if item["name"] != "GPUS"]
    return template


@needs_kubectl
def test_the_pytorchjob_runs_the_base_trainer_pod_with_the_operators_rendezvous():
    documents = built(PYTORCHJOB)
    assert not [doc for doc in documents if doc["kind"] == "Job"], "the base Job must be gone"
    job = find(documents, "PyTorchJob", "trainer")
    base_pod = find(load_all(BASE / "trainer.yaml"), "Job", "trainer")["spec"]["template"]
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] >= 1
    config_maps = {doc["metadata"]["name"] for doc in documents if doc["kind"] == "ConfigMap"}
    for kind, replica in replicas.items():
        pod = replica["template"]
        main = pod["spec"]["containers"][0]
        assert main["name"] == "pytorch", "the operator sets its variables on the container named pytorch"
        assert main["command"][:3] == ["torchrun", "-m", "services.trainer"], "torchrun reads PET_* itself"
        assert int(job["spec"]["nprocPerNode"]) == main["resources"]["limits"]["nvidia.com/gpu"]
        assert ("startupProbe" in main) == (kind == "Master"), "only the Master (rank 0) serves /metrics"
        assert pod_without_torchrun_specifics(pod) == pod_without_torchrun_specifics(base_pod), kind
        for volume in pod["spec"]["volumes"]:
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, f"{kind} mounts a ConfigMap that is not built"
    rendezvous = find(documents, "Service", "trainer-rendezvous")
    labels = replicas["Master"]["template"]["metadata"]["labels"]
    assert selects(rendezvous, {**labels, "training.kubeflow.org/replica-type": "master"})
    assert not selects(rendezvous, {**labels, "training.kubeflow.org/replica-type": "worker"})
    assert find(documents, "PersistentVolumeClaim", "belay-checkpoints")["spec"]["accessModes"] == ["ReadWriteMany"]


def test_the_pytorchjob_overlays_config_is_configs_compose_yaml():
    assert (PYTORCHJOB / "belay.yaml").read_bytes() == CONFIG.read_bytes(), (
        "cp configs/compose.yaml deploy/k8s/overlays/pytorchjob/belay.yaml"
    )
