"""cluster.yaml and the KubeRay manifests, checked as far as a machine without a cloud allows.

cluster.yaml goes through the Ray cluster launcher's own preparation and schema validation; the
KubeRay manifests are checked for the kinds, versions and fields that KubeRay's v1 API defines,
and against each other: one image, one project version, one Ray version, one Serve config.
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"

# Fields of KubeRay's ray.io/v1 custom resources (its CRDs), the levels our manifests fill in.
RAYJOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "entrypoint", "entrypointNumCpus",
    "entrypointNumGpus", "entrypointResources", "jobId", "metadata", "rayClusterSpec",
    "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode", "submitterConfig",
    "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished", "managedBy", "deletionStrategy",
}  # fmt: skip
RAYSERVICE_SPEC = {
    "deploymentUnhealthySecondThreshold", "excludeHeadPodFromServeSvc", "rayClusterConfig",
    "rayClusterSpec", "serveConfigV2", "serveService", "serviceUnhealthySecondThreshold",
    "upgradeStrategy",
}  # fmt: skip
CLUSTER_SPEC = {
    "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec",
    "headServiceAnnotations", "managedBy", "rayVersion", "suspend", "workerGroupSpecs",
    "authOptions",
}  # fmt: skip
HEAD_GROUP = {"enableIngress", "headService", "rayStartParams", "serviceType", "template"}
WORKER_GROUP = {
    "groupName", "idleTimeoutSeconds", "maxReplicas", "minReplicas", "numOfHosts",
    "rayStartParams", "replicas", "scaleStrategy", "suspend", "template",
}  # fmt: skip


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return _yaml(ROOT / "cluster.yaml")


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    return {
        doc["kind"]: doc
        for path in sorted(DEPLOY.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
    }


def _containers(manifest: dict) -> list[dict]:
    spec = manifest["spec"]
    cluster_spec = spec["rayClusterSpec"]
    templates = [cluster_spec["headGroupSpec"]["template"]]
    templates += [group["template"] for group in cluster_spec["workerGroupSpecs"]]
    if "submitterPodTemplate" in spec:
        templates.append(spec["submitterPodTemplate"])
    return [c for template in templates for c in template["spec"]["containers"]]


# cluster.yaml


def test_cluster_yaml_passes_the_cluster_launchers_own_validation(cluster):
    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)

    # the validation is real: a misspelt field of a node type is refused
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(broken))


def test_cluster_has_a_cpu_head_and_a_bounded_gpu_worker_group(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    workers = [t for name, t in types.items() if name != cluster["head_node_type"]]

    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))
    assert len(workers) == 1
    gpu = workers[0]
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))
    assert 1 <= gpu["min_workers"] <= gpu["max_workers"] <= cluster["max_workers"]
    assert cluster["docker"]["image"].endswith("-gpu")


def test_every_node_installs_the_project_and_shares_storage(cluster):
    assert cluster["file_mounts"]["~/cmaclip"] == "."
    assert any(re.search(r"pip install .*~/cmaclip", c) for c in cluster["setup_commands"])
    assert any("/mnt/cluster_storage" in c for c in cluster["initialization_commands"])
    assert "/mnt/cluster_storage:/mnt/cluster_storage" in " ".join(cluster["docker"]["run_options"])

    for commands in (cluster["head_start_ray_commands"], cluster["worker_start_ray_commands"]):
        start = next(c for c in commands if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start
        assert "CMACLIP_HOME=/mnt/cluster_storage/" in start
    assert "~/.ray/auth_token" in cluster["file_mounts"]


def test_the_dashboard_listens_on_the_heads_loopback_only(cluster):
    start = next(c for c in cluster["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in start
    assert "0.0.0.0" not in start


# KubeRay


def test_manifests_use_kuberay_kinds_versions_and_fields(manifests):
    assert set(manifests) == {"RayJob", "RayService", "PersistentVolumeClaim"}

    for kind, spec_fields in (("RayJob", RAYJOB_SPEC), ("RayService", RAYSERVICE_SPEC)):
        manifest = manifests[kind]
        assert manifest["apiVersion"] == "ray.io/v1"
        assert set(manifest["spec"]) <= spec_fields, kind

        cluster_spec = manifest["spec"]["rayClusterSpec"]
        assert set(cluster_spec) <= CLUSTER_SPEC
        assert set(cluster_spec["headGroupSpec"]) <= HEAD_GROUP
        for group in cluster_spec["workerGroupSpecs"]:
            assert set(group) <= WORKER_GROUP
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        # KubeRay passes rayStartParams to `ray start` as strings
        params = [cluster_spec["headGroupSpec"]["rayStartParams"]]
        params += [g["rayStartParams"] for g in cluster_spec["workerGroupSpecs"]]
        assert all(isinstance(v, str) for p in params for v in p.values())


def test_the_rayjob_entrypoint_runs_the_training_job_with_a_shipped_config(manifests):
    args = shlex.split(manifests["RayJob"]["spec"]["entrypoint"])

    assert args[:2] == ["python", "ray_jobs/train.py"]
    config = args[args.index("--config") + 1]
    assert (ROOT / config).is_file()
    assert _yaml(ROOT / config)["scaling"]["use_gpu"] is True

    gpu_groups = manifests["RayJob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert any(
        c["resources"]["limits"].get("nvidia.com/gpu") for g in gpu_groups
        for c in g["template"]["spec"]["containers"]
    )  # fmt: skip


def _deployment_fields(serve_config: dict) -> tuple[dict, dict]:
    """The config without the fields a Kubernetes deployment must change, and those fields."""
    rest = copy.deepcopy(serve_config)
    fields = {
        "host": rest["http_options"].pop("host"),
        "models": {app["args"].pop("model") for app in rest["applications"]},
    }
    return rest, fields


def test_the_rayservice_serves_serve_config_yaml(manifests):
    local, _ = _deployment_fields(_yaml(ROOT / "serve" / "config.yaml"))
    embedded, fields = _deployment_fields(
        yaml.safe_load(manifests["RayService"]["spec"]["serveConfigV2"])
    )

    assert embedded == local
    # the pod's interfaces (behind a ClusterIP service), and the model the RayJob exports
    assert fields["host"] == "0.0.0.0"
    trained = _yaml(ROOT / "configs" / "vit-b-32.yaml")["run"]["name"]
    assert fields["models"] == {f"runs/{trained}/model"}


def test_one_image_one_project_version_one_ray_version(manifests, cluster):
    version = _project_version()
    images = {c["image"] for kind in ("RayJob", "RayService") for c in _containers(manifests[kind])}
    assert len(images) == 1
    (image,) = images
    assert image.rsplit(":", 1)[1] == version

    dockerfile = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.MULTILINE).group(1)
    assert base == cluster["docker"]["image"]
    assert f"cmaclip:{version}" in dockerfile

    ray_version = base.split(":")[1].split("-")[0]
    assert ray_version == ray.__version__
    for kind in ("RayJob", "RayService"):
        assert manifests[kind]["spec"]["rayClusterSpec"]["rayVersion"] == ray_version


def test_every_kuberay_pod_runs_with_token_auth_and_the_shared_home(manifests):
    storage = manifests["PersistentVolumeClaim"]
    assert "ReadWriteMany" in storage["spec"]["accessModes"]

    for kind in ("RayJob", "RayService"):
        for container in _containers(manifests[kind]):
            env = {e["name"]: e for e in container["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
            assert env["CMACLIP_HOME"]["value"].startswith("/mnt/cluster_storage/")
