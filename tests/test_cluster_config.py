"""The shipped cluster definitions: `cluster.yaml` (Ray cluster launcher, AWS) and `k8s/rayjob.yaml` (KubeRay).

`cluster.yaml` goes through the same preparation and schema validation that `ray up` runs before it touches AWS, and
then through medray's own rules: a head without GPU, an autoscaled GPU worker type, one pinned image, token
authentication on every node and a dashboard bound to localhost. `k8s/rayjob.yaml` is checked against the fields of
KubeRay's `ray.io/v1` RayJob API.
"""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from medray.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
RAYJOB_YAML = ROOT / "k8s" / "rayjob.yaml"
CLUSTER_DOC = ROOT / "docs" / "cluster.md"

# EC2 instance families with NVIDIA GPUs (the ones a newcomer is likely to pick).
GPU_FAMILIES = ("g4dn", "g5", "g6", "g6e", "gr6", "p3", "p4d", "p4de", "p5", "p5e", "p5en", "p6")

# Fields of KubeRay's ray.io/v1 types (ray-operator/apis/ray/v1/*_types.go); anything else is a typo the API server
# would drop or reject.
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata", "clusterSelector",
    "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode",
    "entrypointResources", "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes", "suspend", "schedule",
}  # fmt: skip
RAYCLUSTER_SPEC_FIELDS = {
    "upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations",
    "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs",
}  # fmt: skip
HEAD_GROUP_FIELDS = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP_FIELDS = {
    "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "rayStartParams",
    "template", "scaleStrategy", "numOfHosts",
}  # fmt: skip
AUTH_OPTIONS_FIELDS = {"mode", "secretName", "enableK8sTokenAuth"}


@pytest.fixture(scope="module")
def cluster() -> dict:
    """cluster.yaml as `ray up` sees it: merged with Ray's AWS defaults, then validated against Ray's schema."""
    prepared = prepare_config(yaml.safe_load(CLUSTER_YAML.read_text()))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load(RAYJOB_YAML.read_text())


def start_commands(cluster: dict) -> list[str]:
    commands = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    return [command for command in commands if "ray start" in command]


def containers(rayjob: dict) -> list[dict]:
    cluster_spec = rayjob["spec"]["rayClusterSpec"]
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [container for group in groups for container in group["template"]["spec"]["containers"]]


# -- cluster.yaml ------------------------------------------------------------------------------------------------------


def test_cluster_yaml_passes_rays_own_validation(cluster):
    assert cluster["provider"]["type"] == "aws"
    assert cluster["head_node_type"] in cluster["available_node_types"]


def test_rays_validation_rejects_a_misspelt_key():
    """The schema check has teeth: an unknown key (here a typo) fails, as it would in `ray up`."""
    broken = yaml.safe_load(CLUSTER_YAML.read_text())
    broken["idle_timeout_minuts"] = 5
    with pytest.raises(jsonschema.ValidationError, match="idle_timeout_minuts"):
        validate_config(prepare_config(copy.deepcopy(broken)))


def test_head_node_has_no_gpu(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    family = head["node_config"]["InstanceType"].split(".")[0]
    assert family not in GPU_FAMILIES, f"the head runs {head['node_config']['InstanceType']}, a GPU instance"
    assert head["resources"].get("GPU", 0) == 0


def test_a_gpu_worker_type_scales_from_zero(cluster):
    workers = {
        name: node
        for name, node in cluster["available_node_types"].items()
        if name != cluster["head_node_type"] and node["node_config"]["InstanceType"].split(".")[0] in GPU_FAMILIES
    }
    assert workers, "cluster.yaml has no GPU worker type"
    for name, node in workers.items():
        assert node["min_workers"] == 0, f"{name}: idle GPU nodes should scale to zero"
        assert 1 <= node["max_workers"] <= cluster["max_workers"], name


def test_one_pinned_image_with_the_installed_ray_version(cluster):
    docker = cluster["docker"]
    images = {docker["image"], docker.get("head_image", docker["image"]), docker.get("worker_image", docker["image"])}
    assert images == {f"rayproject/ray:{ray.__version__}-py312-cu128"}


def test_nodes_install_this_checkout_workers_with_the_gpu_extra(cluster):
    assert cluster["file_mounts"]["~/medray"] == "."
    assert any('pip install --quiet "$HOME/medray"' in cmd for cmd in cluster["head_setup_commands"])
    assert any("$HOME/medray[gpu]" in cmd for cmd in cluster["worker_setup_commands"])
    assert not any("medray[gpu]" in cmd for cmd in cluster["head_setup_commands"])


def test_dashboard_listens_on_localhost_only(cluster):
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "--dashboard-port=8265" in head_start  # the port `ray dashboard cluster.yaml` forwards
    assert "0.0.0.0" not in CLUSTER_YAML.read_text()


def test_token_auth_is_on_for_every_ray_start(cluster):
    commands = start_commands(cluster)
    assert len(commands) == 2, commands
    for command in commands:
        before_start = command.split("ray start")[0]
        assert "RAY_AUTH_MODE=token" in before_start, command
        assert "RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token" in before_start, command


def test_the_token_file_reaches_every_node(cluster):
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "~/.ray/auth_token" not in cluster.get("cluster_synced_files", [])  # file_mounts already go to workers


def test_every_command_is_valid_bash(cluster):
    keys = ("setup_commands", "head_setup_commands", "worker_setup_commands")
    keys += ("head_start_ray_commands", "worker_start_ray_commands")
    for key in keys:
        for command in cluster[key]:
            result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
            assert result.returncode == 0, f"{key}: {command}\n{result.stderr}"


# -- k8s/rayjob.yaml ---------------------------------------------------------------------------------------------------


def test_rayjob_is_a_ray_io_v1_rayjob(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", rayjob["metadata"]["name"])


def test_rayjob_uses_only_kuberay_fields(rayjob):
    spec = rayjob["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS, set(spec) - RAYJOB_SPEC_FIELDS
    cluster_spec = spec["rayClusterSpec"]
    assert set(cluster_spec) <= RAYCLUSTER_SPEC_FIELDS, set(cluster_spec) - RAYCLUSTER_SPEC_FIELDS
    assert set(cluster_spec["headGroupSpec"]) <= HEAD_GROUP_FIELDS
    assert set(cluster_spec["authOptions"]) <= AUTH_OPTIONS_FIELDS
    for group in cluster_spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_FIELDS, set(group) - WORKER_GROUP_FIELDS
    for params in [cluster_spec["headGroupSpec"]["rayStartParams"]] + [
        g["rayStartParams"] for g in cluster_spec["workerGroupSpecs"]
    ]:
        assert all(isinstance(value, str) for value in params.values()), "rayStartParams values must be strings"


def test_rayjob_runs_the_gpu_preset_through_jobs_train(rayjob):
    words = shlex.split(rayjob["spec"]["entrypoint"])
    assert words[:2] == ["python", "jobs/train.py"]
    preset = words[words.index("--config") + 1]
    assert preset == "mistral7b-medical-o1"
    overrides = [word for word in words[2:] if "=" in word]
    config = load_config(preset, overrides)
    assert config.scaling.use_gpu
    assert config.run.storage_path.startswith("s3://")


def test_rayjob_deletes_its_cluster_when_done(rayjob):
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True


def test_rayjob_gpu_workers_and_cpu_head(rayjob):
    cluster_spec = rayjob["spec"]["rayClusterSpec"]
    head = cluster_spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus") == "0"
    for container in head["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {})
    gpu_groups = [
        group
        for group in cluster_spec["workerGroupSpecs"]
        if any("nvidia.com/gpu" in c["resources"]["limits"] for c in group["template"]["spec"]["containers"])
    ]
    assert gpu_groups, "no worker group asks for nvidia.com/gpu"
    for group in gpu_groups:
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        assert group["maxReplicas"] >= 1


def test_rayjob_token_comes_from_a_secret(rayjob):
    cluster_spec = rayjob["spec"]["rayClusterSpec"]
    assert cluster_spec["authOptions"]["mode"] == "token"
    assert cluster_spec["authOptions"]["secretName"]
    for container in containers(rayjob):
        for variable in container.get("env", []):
            if variable["name"].startswith("RAY_AUTH_TOKEN"):
                assert "secretKeyRef" in variable.get("valueFrom", {}), f"{variable['name']} is written in the manifest"


def test_rayjob_images_match_ray_version(rayjob):
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    images = {container["image"] for container in containers(rayjob)}
    assert images == {f"rayproject/ray:{ray.__version__}-py312-cu128"}


def test_rayjob_code_and_packages_come_from_one_pinned_release(rayjob):
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    source = runtime_env["working_dir"]
    assert re.search(r"/archive/refs/tags/v[\w.]+\.zip$", source), f"pin a release, not a branch: {source}"
    assert runtime_env["pip"] == [f"medray[gpu] @ {source}"]


# -- docs/cluster.md ---------------------------------------------------------------------------------------------------


def test_docs_walk_through_the_commands_that_use_these_files():
    text = CLUSTER_DOC.read_text()
    for command in (
        "ray up cluster.yaml",
        "ray job submit",
        "ray dashboard cluster.yaml",
        "ray down cluster.yaml",
        "kubectl apply -f k8s/rayjob.yaml",
        "RAY_AUTH_MODE=token",
    ):
        assert command in text, f"docs/cluster.md does not mention `{command}`"
