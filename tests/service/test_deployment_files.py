"""No Docker engine runs here, so the deployment files are checked against the code instead."""
import json
import re
from pathlib import Path

import yaml

from service.metrics import ServiceMetrics
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_runs_the_serve_verb_on_the_published_port():
    service = compose()["services"]["ganserve"]
    command = service["command"]
    assert command[:2] == ["ganserve", "serve"]
    port = command[command.index("--port") + 1]
    assert f"{port}:{port}" in service["ports"]
    assert int(port) == Settings().port
    repository = command[command.index("--repository") + 1]
    assert any(v.endswith(f":{repository}:ro") for v in service["volumes"])
    for variable in service.get("environment", {}):
        assert variable.removeprefix("GANSERVE_").lower() in Settings.model_fields


def test_every_mounted_file_exists_in_the_repository():
    for service in compose()["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert (REPO / source).exists(), source


def test_prometheus_scrapes_the_service_metrics_endpoint():
    config = yaml.safe_load((REPO / "docker" / "prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"ganserve:{Settings().port}"]


def test_the_dashboard_queries_only_metrics_the_service_exports():
    dashboard = json.loads((REPO / "docker" / "grafana" / "dashboards" / "ganserve.json").read_text())
    exported = {m.name for m in ServiceMetrics().registry.collect()}
    queried = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            queried |= set(re.findall(r"ganserve_[a-z_]+", target["expr"]))
    base = {re.sub(r"_(bucket|sum|count|total)$", "", name) for name in queried}
    assert base <= exported | {"ganserve_requests", "ganserve_rejected"}
    assert {"ganserve_request_duration_seconds", "ganserve_batch_items"} <= base


def test_dockerfile_has_a_cpu_build_arg_and_starts_the_server():
    text = (REPO / "Dockerfile").read_text()
    assert "ARG BASE=" in text and "ARG VARIANT=gpu" in text and '".[${VARIANT}]"' in text
    assert 'CMD ["ganserve", "serve"]' in text
    assert (REPO / "docker" / "entrypoint.sh").stat().st_mode & 0o111
