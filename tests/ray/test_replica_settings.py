"""Per-model replica settings (`serving.replicas`) and the deployment plan read from them: no
cluster needed. Entries are copies of the shipped dcgan-digits with a serving.json beside them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from service.ray_serving.config import RayAppArgs, plan_deployments

REPO = Path(__file__).resolve().parents[2]


def repository_with(tmp_path: Path, serving: dict) -> Path:
    root = tmp_path / "model_repository"
    shutil.copytree(REPO / "model_repository" / "dcgan-digits", root / "dcgan-digits")
    (root / "dcgan-digits" / "1" / "serving.json").write_text(json.dumps(serving))
    return root


def plan_for(tmp_path: Path, serving: dict, **settings):
    (plan,) = plan_deployments(RayAppArgs(repository=str(repository_with(tmp_path, serving)), settings=settings))
    return plan


def test_max_ongoing_requests_lets_a_running_and_a_forming_batch_reach_the_replica(tmp_path):
    options = plan_for(tmp_path, {"max_batch_size": 16, "lane_threads": 2}).options(30.0)
    assert options["max_ongoing_requests"] == 3 * 16  # Ray's default, 5, would cap every batch at 5
    assert options["max_queued_requests"] == 4096  # the bound the single server has (max_queue_size)
    assert options["num_replicas"] == 1 and options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}


def test_max_ongoing_requests_never_exceeds_the_replicas_own_queue(tmp_path):
    assert plan_for(tmp_path, {"max_batch_size": 64, "max_queue_size": 100}).options(30.0)["max_ongoing_requests"] == 100


def test_explicit_replica_settings_win_and_autoscaling_targets_a_batch_by_default(tmp_path):
    serving = {"max_batch_size": 8, "replicas": {"autoscaling": {"min_replicas": 2, "max_replicas": 5}, "num_gpus": 0.25,
                                                 "max_ongoing_requests": 12, "max_queued_requests": 40}}
    options = plan_for(tmp_path, serving).options(30.0)
    assert "num_replicas" not in options
    assert options["autoscaling_config"]["min_replicas"] == 2 and options["autoscaling_config"]["max_replicas"] == 5
    assert options["autoscaling_config"]["target_ongoing_requests"] == 8.0
    assert options["max_ongoing_requests"] == 12 and options["max_queued_requests"] == 40
    assert options["ray_actor_options"]["num_gpus"] == 0.25


@pytest.mark.parametrize("replicas, reason", [
    ({"num_replicas": 2, "autoscaling": {"max_replicas": 3}}, "not both"),
    ({"autoscaling": {"min_replicas": 4, "max_replicas": 2}}, "above max_replicas"),
    ({"num_gpus": 1.5}, "whole GPUs"),
    ({"num_replica": 2}, "num_replica"),
])
def test_an_invalid_replicas_section_fails_the_plan_naming_the_entry(tmp_path, replicas, reason):
    with pytest.raises(ValueError, match=reason) as raised:
        plan_for(tmp_path, {"replicas": replicas})
    assert "dcgan-digits/1" in str(raised.value)


def test_unknown_server_settings_and_models_are_refused_before_any_replica(tmp_path):
    root = repository_with(tmp_path, {})
    with pytest.raises(ValueError, match="unknown server settings"):
        RayAppArgs(repository=str(root), settings={"max_batch": 4})
    with pytest.raises(ValueError, match="no model"):
        plan_deployments(RayAppArgs(repository=str(root), models=["nope"]))
    with pytest.raises(ValueError, match="use replicas"):  # a replica is one process, never a --workers supervisor
        RayAppArgs(repository=str(root), settings={"workers": 4})


def test_a_replicas_threads_default_to_the_cpus_it_reserves_not_the_nodes_cores(tmp_path):
    root = str(repository_with(tmp_path, {}))
    assert RayAppArgs(repository=root).server_settings("dcgan-digits", 2.0).intra_op_threads == 2
    assert RayAppArgs(repository=root).server_settings("dcgan-digits", 0.25).encoder_threads == 1
    assert RayAppArgs(repository=root, settings={"intra_op_threads": 3}).server_settings("dcgan-digits", 2.0).intra_op_threads == 3


def test_ganserve_ray_deploys_the_models_ganserve_models_names_when_no_model_is_given():
    """`ganserve ray` ignored GANSERVE_MODELS and deployed every model in the repository (a probe's
    start command then asked for more replicas than its CPUs and never became ready)."""
    import typer

    from service.ray_serving.cli import env_models

    assert env_models('["dcgan-digits", "sr-rrdb-x4"]') == ["dcgan-digits", "sr-rrdb-x4"]
    assert env_models("") == [] and env_models("[]") == []
    assert env_models("dcgan-digits") == ["dcgan-digits"] and env_models(" a, b ") == ["a", "b"]  # as `serve` reads it
    for wrong in ("[1, 2]", '["a"', '[["a"]]'):
        with pytest.raises(typer.BadParameter, match="comma-separated or a JSON list"):
            env_models(wrong)


def test_a_replica_takes_the_servers_settings_but_not_its_readiness_rule():
    """Each replica serves one model: GANSERVE_READY_REQUIRES naming two kept every replica unready
    (the ingress merges readiness over the models itself)."""
    from service.ray_serving.cli import replica_settings

    taken = replica_settings({"GANSERVE_READY_REQUIRES": "a,b", "GANSERVE_MODELS": "a,b", "GANSERVE_MAX_BATCH_SIZE": "8",
                              "GANSERVE_VERSION_POLICIES": '{"a": "latest:1"}', "HOME": "/root"})
    assert taken == {"max_batch_size": "8", "version_policies": {"a": "latest:1"}}
