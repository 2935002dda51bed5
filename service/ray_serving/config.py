"""What `ganserve ray` deploys, decided without ray: the application's arguments (the same ones a
KubeRay RayService's `serveConfigV2` passes) and one deployment plan per model, read from each
model's serving configuration (`serving.replicas` in spec.json or serving.json)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.model_config import ServingConfig, serving_config
from service.repository import scan_repository
from service.settings import Settings
from service.version_policy import selected_versions

APP_NAME = "ganserve"
IMPORT_PATH = "service.ray_serving.deployments:build_app"  # what a RayService's serveConfigV2 names
DEPLOYMENT_PREFIX = "model-"


class RayAppArgs(BaseModel):
    """The application's arguments. `repository` must be a path every node of the cluster reads
    at the same place (a shared filesystem, a PersistentVolume, or object storage synced or
    mounted there: docs/ray.md); replicas load their model files from it."""

    model_config = ConfigDict(extra="forbid")

    repository: str
    models: list[str] = Field(default_factory=list)  # deploy only these names (empty: every model in the repository)
    settings: dict[str, Any] = Field(default_factory=dict)  # server settings for every replica, by field name (GANSERVE_* without the prefix)
    ingress_replicas: int = Field(1, ge=1, le=100)
    metrics_push_s: float = Field(1.0, gt=0, le=60)  # each replica sends its /metrics to the board this often

    @model_validator(mode="after")
    def check_settings(self) -> "RayAppArgs":
        unknown = sorted(set(self.settings) - set(Settings.model_fields))
        if unknown:
            raise ValueError(f"unknown server settings {unknown}: use service/settings.py's field names")
        for fixed in ("repository", "models"):
            if fixed in self.settings:
                raise ValueError(f"settings.{fixed}: give it as the application's own `{fixed}`")
        for process_setting in ("workers", "role", "engine_dir"):  # a replica is one process; Ray gives the scale-out
            if process_setting in self.settings:
                raise ValueError(f"settings.{process_setting}: `serve --workers` is the single machine's scale-out; on Ray, use replicas")
        self.server_settings()  # invalid values fail here, on the driver, not in every replica
        return self

    def server_settings(self, model: str | None = None, cpus: float | None = None) -> Settings:
        """The settings one replica runs with: the application's, serving `model` only. Its
        runtime and encoder threads default to the CPUs the replica reserves (`cpus`), not to
        the node's core count, which several replicas on one node would each claim."""
        threads = {name: max(1, round(cpus)) for name in ("intra_op_threads", "encoder_threads") if cpus is not None and name not in self.settings}
        return Settings(**self.settings, **threads, repository=self.repository, models=[model] if model else self.models,
                        workers=1, role="single", engine_dir=None)


@dataclass(frozen=True)
class ModelDeploymentPlan:
    model: str
    versions: list[int]
    config: ServingConfig  # the latest served version's; its `replicas` section places every version

    @property
    def deployment_name(self) -> str:
        return DEPLOYMENT_PREFIX + self.model

    @property
    def initial_replicas(self) -> int:
        scaling = self.config.replicas.autoscaling
        return scaling.min_replicas if scaling else self.config.replicas.num_replicas or 1

    def options(self, shutdown_grace_s: float) -> dict[str, Any]:
        """The keyword arguments of Ray's `Deployment.options` for this model."""
        replicas = self.config.replicas
        options: dict[str, Any] = {
            "name": self.deployment_name,
            "ray_actor_options": {"num_cpus": replicas.num_cpus, "num_gpus": replicas.num_gpus},
            "max_ongoing_requests": self.config.max_ongoing_requests,
            "max_queued_requests": self.config.max_queued_requests,
            # draining: readiness false, accepted requests finish by their deadline
            "graceful_shutdown_timeout_s": shutdown_grace_s,
            "health_check_period_s": 2.0,
        }
        if replicas.autoscaling is not None:
            scaling = replicas.autoscaling
            options["autoscaling_config"] = {
                "min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
                "target_ongoing_requests": scaling.target_ongoing_requests or float(self.config.max_batch_size),
                "upscale_delay_s": scaling.upscale_delay_s, "downscale_delay_s": scaling.downscale_delay_s,
                "look_back_period_s": scaling.look_back_period_s,
            }
        else:
            options["num_replicas"] = replicas.num_replicas or 1
        return options


def plan_deployments(args: RayAppArgs) -> list[ModelDeploymentPlan]:
    """One plan per model the repository holds (or `args.models` names), checked here so a
    broken entry or serving section fails the deployment with its reason, before any replica."""
    settings = args.server_settings()
    entries = scan_repository(settings.repository)
    names = sorted({e.name for e in entries})
    missing = sorted(set(args.models) - set(names))
    if missing:
        raise ValueError(f"no model {missing} in the repository {args.repository} (has {names})")
    plans = []
    for name in args.models or names:
        candidates = [e for e in entries if e.name == name]
        chosen = selected_versions(settings.policy_for(name), [e.version for e in candidates])
        served = [e for e in candidates if e.version in chosen]
        if not served:
            raise ValueError(f"{name}: its version policy {settings.policy_for(name)!r} selects no version on disk")
        broken = [e.problem for e in served if e.problem]
        if broken:
            raise ValueError("; ".join(broken))
        latest = max(served, key=lambda e: e.version)
        plans.append(ModelDeploymentPlan(name, sorted(e.version for e in served), serving_config(latest, settings)))
    return plans
