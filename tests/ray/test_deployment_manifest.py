"""No Kubernetes here: the KubeRay RayService manifest and its image are checked against the code
(as tests/service/test_deployment_files.py checks the compose file), and the single-process
server is checked never to load Ray."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml
from packaging.version import Version

from service.ray_serving.config import APP_NAME, IMPORT_PATH, RayAppArgs, plan_deployments
from service.ray_serving.edge import BODY_BUDGET_ENV, PROXY_CALLBACK, PROXY_CALLBACK_ENV, ProxyEdge

REPO = Path(__file__).resolve().parents[2]


def manifest() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all((REPO / "deploy" / "rayservice.yaml").read_text())}


def application() -> dict:
    (app,) = yaml.safe_load(manifest()["RayService"]["spec"]["serveConfigV2"])["applications"]
    return app


def pod_templates() -> list[dict]:
    cluster = manifest()["RayService"]["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]["spec"]] + [group["template"]["spec"] for group in cluster["workerGroupSpecs"]]


def test_the_application_is_ours_and_its_args_are_valid():
    app = application()
    assert app["name"] == APP_NAME and app["route_prefix"] == "/"
    assert app["import_path"] == IMPORT_PATH
    pytest.importorskip("ray")
    module, _, attribute = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attribute))
    RayAppArgs.model_validate(app["args"])  # unknown or invalid server settings fail here


def test_every_pod_mounts_the_repository_read_only_where_the_args_say():
    repository = application()["args"]["repository"]
    claim = manifest()["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    for pod in pod_templates():
        (container,) = pod["containers"]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == repository]
        assert mount["readOnly"] is True
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_every_nodes_http_proxy_runs_the_edge():
    """Ray's proxy applies ganserve's edge (headers, bodies, per-address shares: edge.py) only where
    its node's environment names the callback: on every pod, since proxies run on every node."""
    for pod in pod_templates():
        (container,) = pod["containers"]
        env = {item["name"]: item["value"] for item in container.get("env", [])}
        assert env.get(PROXY_CALLBACK_ENV) == PROXY_CALLBACK
        assert int(env[BODY_BUDGET_ENV]) >= 64 * 2**20
    module, _, attribute = PROXY_CALLBACK.partition(":")
    (edge,) = getattr(importlib.import_module(module), attribute)()
    assert edge.cls is ProxyEdge


def test_the_pods_run_the_ray_image_at_the_manifests_ray_version():
    cluster = manifest()["RayService"]["spec"]["rayClusterConfig"]
    dockerfile = (REPO / "deploy" / "Dockerfile.ray").read_text()
    built_tag = re.search(r"docker build -t (\S+) -f deploy/Dockerfile.ray", dockerfile)[1]
    assert {pod["containers"][0]["image"] for pod in pod_templates()} == {built_tag}
    assert re.search(r"ARG RAY_VERSION=(\S+)", dockerfile)[1] == cluster["rayVersion"]
    minimum = re.search(r'ray = \["ray\[serve\]>=([0-9.]+)"\]', (REPO / "pyproject.toml").read_text())[1]
    assert Version(cluster["rayVersion"]) >= Version(minimum)
    assert 'ENTRYPOINT []' in dockerfile  # KubeRay's `ray start` command, not the serve entrypoint
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"containerPort": 8000, "name": "serve"} in head["ports"]


def test_the_image_holds_every_package_the_ganserve_command_imports():
    """`ganserve` (the root image's CMD and Dockerfile.ray's) imports every verb's package; `pip
    install .` installs only the packages that were copied in."""
    dockerfile = (REPO / "Dockerfile").read_text()
    packages = re.search(r'include = \[([^\]]*)\]', (REPO / "pyproject.toml").read_text())[1]
    for package in re.findall(r'"(\w+)\*"', packages):
        assert f"COPY {package} ./{package}" in dockerfile, package


def test_the_default_repository_fits_the_worker_groups_at_their_largest():
    """Every model of model_repository/ at its most replicas, on the CPUs the workers offer."""
    app = application()
    plans = plan_deployments(RayAppArgs.model_validate(app["args"] | {"repository": str(REPO / "model_repository")}))
    assert {p.model for p in plans} == {p.parent.parent.name for p in (REPO / "model_repository").glob("*/*/spec.json")}
    wanted = sum(p.config.replicas.num_cpus * (p.config.replicas.autoscaling.max_replicas if p.config.replicas.autoscaling else p.initial_replicas) for p in plans)
    groups = manifest()["RayService"]["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    offered = sum(g["maxReplicas"] * float(g["rayStartParams"]["num-cpus"]) for g in groups)
    assert 0 < wanted <= offered
    for plan in plans:
        assert plan.options(30.0)["max_ongoing_requests"] >= plan.config.max_batch_size  # Ray lets a full batch reach the batcher


def test_the_single_process_server_never_loads_ray(single_server):
    """The running `ganserve serve` process (started by the fixture, serving requests) has no Ray
    module mapped: Ray's core library is loaded by any `import ray`."""
    with single_server.client() as client:
        assert client.post("/v1/models/digits/generate", json={"seed": 1}).status_code == 200
    maps = Path(f"/proc/{single_server.process.pid}/maps").read_text()
    assert "onnxruntime" in maps  # the check reads the right process
    assert "_raylet" not in maps and "/ray/" not in maps
