"""One real two-node Ray cluster for every Ray test (started and torn down here), the ganserve
application deployed on it by `ganserve ray`, and the single-process server beside it for
reference answers. All are package-scoped: torn down when tests/ray ends, as their replicas,
controller and proxy keep ~0.3 of a core busy while they live, which the rest of the suite would pay.

Footprint on a 2-core machine: two nodes of 2 logical CPUs each (logical, not cores), 100 MiB of
object store each, no dashboard; every model replica reserves 0.25 CPU. Short timings, set here
for the autoscaling test: Ray Serve's handles and replicas report queue lengths every 0.5 s (Ray's
default, 10 s, only slows the reaction; it changes nothing the test checks)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is the optional `ray` extra (`pip install -e .[ray]`; `make install` pulls it)")

from ray.cluster_utils import Cluster  # noqa: E402

from bench.server import free_port  # noqa: E402
from service.ray_serving.edge import BODY_BUDGET_ENV, PROXY_CALLBACK, PROXY_CALLBACK_ENV  # noqa: E402
from tests.serving import REPO, running_server  # noqa: E402

REPLICA_CPUS = 0.25
RAY_MODELS = {
    # two fixed replicas of 4 requests each, the rest waiting in Ray's queue: a replica that answers a
    # batch is handed 4 more at once, and they sit 400 ms in its batcher (the failover test kills it then)
    "digits": {"max_queue_delay_ms": 400, "max_batch_size": 16, "replicas": {"num_replicas": 2, "num_cpus": REPLICA_CPUS, "max_ongoing_requests": 4}},
    # two fixed replicas that take one request each (1 s in the batcher) and let one more wait: the fourth is refused by Ray
    "upx4": {"max_queue_delay_ms": 1000, "replicas": {"num_replicas": 2, "num_cpus": REPLICA_CPUS, "max_ongoing_requests": 1, "max_queued_requests": 1}},
    # autoscaling 1..3 replicas around 1 ongoing request each: up after 0.5 s over target, down after
    # 10 s under it (longer than a replica takes to start here, or a dip in the load stops it half-started)
    "cdigits": {"max_queue_delay_ms": 100, "max_batch_size": 16, "replicas": {"num_cpus": REPLICA_CPUS, "autoscaling": {
        "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1, "upscale_delay_s": 0.5, "downscale_delay_s": 10, "look_back_period_s": 2}}},
}
FAST_AUTOSCALING_ENV = {"RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5", "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}
QUIET_RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
# the edge in the proxy (service/ray_serving/edge.py), set where the nodes start as a cluster's
# nodes need it; a budget of 8 MiB: 2 MiB of bodies an address (test_ray_serve.py)
EDGE_ENV = {PROXY_CALLBACK_ENV: PROXY_CALLBACK, BODY_BUDGET_ENV: str(8 * 2**20)}


class RayDeployment:
    """The deployed application: its HTTP URL, the seconds `ganserve ray` took, and Ray's view."""

    def __init__(self, url: str, startup_s: float) -> None:
        self.url, self.startup_s = url, startup_s

    def replica_states(self, deployment: str) -> dict[str, int]:
        from ray import serve

        return dict(serve.status().applications["ganserve"].deployments[deployment].replica_states)

    def running(self, deployment: str) -> int:
        return self.replica_states(deployment).get("RUNNING", 0)

    def replica_names(self, deployment: str) -> list[str]:
        """The replicas' actor names, `SERVE_REPLICA::ganserve#<deployment>#<replica id>` (namespace `serve`)."""
        return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(f"SERVE_REPLICA::ganserve#{deployment}#"))


@pytest.fixture(scope="package")
def ray_repository(repository, tmp_path_factory) -> Path:
    """A copy of the test repository's digits, cdigits and upx4 (a shared directory: both nodes
    read it), each with the serving.json that places it on Ray."""
    root = tmp_path_factory.mktemp("ray") / "model_repository"
    for name, serving in RAY_MODELS.items():
        shutil.copytree(repository / name, root / name)
        (root / name / "1" / "serving.json").write_text(json.dumps(serving))
    return root


@pytest.fixture(scope="package")
def ray_cluster():
    os.environ.update(FAST_AUTOSCALING_ENV | QUIET_RAY_ENV | EDGE_ENV)  # the nodes' processes inherit them
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False, "object_store_memory": 100 * 2**20})
    cluster.add_node(num_cpus=2, object_store_memory=100 * 2**20)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="package")
def ray_app(ray_cluster, ray_repository):
    """`ganserve ray` deploys the application onto the running cluster and exits (--detach);
    the wall time of that command is the cluster deployment's start-up time."""
    from ray import serve

    port = free_port()
    env = {**os.environ, "GANSERVE_INTRA_OP_THREADS": "1", "GANSERVE_ENCODER_THREADS": "1"}
    command = [sys.executable, "-m", "ganserve_cli", "ray", "--repository", str(ray_repository), "--address", ray_cluster.address,
               "--host", "127.0.0.1", "--port", str(port), "--proxy-location", "HeadOnly", "--detach"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    deployment = RayDeployment(f"http://127.0.0.1:{port}", time.perf_counter() - started)
    print(f"\nganserve ray: deployed in {deployment.startup_s:.1f} s")
    try:
        yield deployment
    finally:
        serve.shutdown()


@pytest.fixture(scope="package")
def single_server(ray_repository):
    """The single-process server on the same repository: what Ray must answer identically."""
    with running_server(ray_repository) as server:
        yield server
