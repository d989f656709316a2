"""The deployment files: Prometheus config and alerts (with promtool), the compose
stack, its docs, Grafana provisioning and the dashboard (each query parsed by a real
Prometheus)."""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.grafana import (
    iter_panels,
    label_values_selector,
    load_dashboard,
    panel_queries,
    substitute,
    used_variables,
    variable_query,
    variables,
)
from tests.support.processes import REPO_ROOT
from tests.support.prometheus import PROMTOOL, PrometheusServer, require_binary

DEPLOY = REPO_ROOT / "deploy"
GRAFANA = REPO_ROOT / "grafana"
COMPOSE = DEPLOY / "docker-compose.yml"

REQUIRED_ALERTS = {
    "FlowtracePipelineFailureRatioHigh",
    "FlowtraceRunsStuckInProgress",
    "FlowtraceEventsDropped",
    "FlowtraceWebSocketClientsDropped",
}
GATEWAY_COMMAND = "flowtrace serve --redis-url redis://redis:6379/0 --host 0.0.0.0 --port 8000"
WORKER_COMMAND = "taskiq worker examples.fleet.worker:broker --workers 2"
API_COMMAND = "uvicorn examples.fleet.api:app --host 0.0.0.0 --port 8080"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = require_binary(PROMTOOL)
    return subprocess.run([binary, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120, check=False)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(COMPOSE)
    return data


def deploy_docs() -> tuple[Path, str]:
    """README.md's "## Deploy" section once the README has one, else docs/deploy.md."""
    readme = REPO_ROOT / "README.md"
    if readme.is_file():
        text = readme.read_text()
        match = re.search(r"^## Deploy\b.*?(?=^## |\Z)", text, flags=re.M | re.S)
        if match:
            return readme, match.group(0)
    path = REPO_ROOT / "docs" / "deploy.md"
    return path, path.read_text()


def command_text(command: str | list[str]) -> str:
    return command if isinstance(command, str) else shlex.join(command)


# ---------------------------------------------------------------------- promtool
def test_promtool_check_config() -> None:
    result = promtool("check", "config", str(DEPLOY / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(DEPLOY / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules() -> None:
    result = promtool("test", "rules", str(DEPLOY / "alerts_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def alert_rules() -> dict[str, dict[str, Any]]:
    groups = load_yaml(DEPLOY / "alerts.yml")["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def test_alerts_are_complete() -> None:
    rules = alert_rules()
    assert set(rules) >= REQUIRED_ALERTS
    for name, rule in rules.items():
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{name}: no `for:`"
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, name
        assert rule["annotations"].get("summary"), name
        assert rule["annotations"].get("description"), name


def test_every_alert_is_unit_tested_firing_and_silent() -> None:
    tests = load_yaml(DEPLOY / "alerts_test.yml")
    assert tests["rule_files"] == ["alerts.yml"]
    fires: set[str] = set()
    silent: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    assert set(alert_rules()) <= fires, "an alert is never shown to fire"
    assert set(alert_rules()) <= silent, "an alert is never shown to stay silent"


def test_prometheus_scrapes_the_gateway() -> None:
    config = load_yaml(DEPLOY / "prometheus.yml")
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    gateway = jobs["flowtrace-gateway"]
    assert gateway.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in gateway["static_configs"] for t in group["targets"]]
    assert targets == ["gateway:8000"]


# ---------------------------------------------------------------------- compose
def test_compose_services() -> None:
    services = compose()["services"]
    assert {"redis", "jaeger", "prometheus", "grafana", "gateway", "worker", "api"} <= set(services)

    assert str(services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"]).lower() == "true"
    assert command_text(services["gateway"]["command"]) == GATEWAY_COMMAND
    assert command_text(services["worker"]["command"]) == WORKER_COMMAND
    assert command_text(services["api"]["command"]) == API_COMMAND
    for name in ("worker", "api"):
        env = services[name]["environment"]
        assert env["FLOWTRACE_REDIS_URL"] == "redis://redis:6379/0", name
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317", name
    for name in ("gateway", "worker", "api"):
        build = services[name]["build"]
        context = (DEPLOY / build["context"]).resolve()
        assert context == REPO_ROOT
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), dockerfile
    dockerfile_text = (REPO_ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile_text, flags=re.M)
    assert 'pip install ".[redis,fastapi-instrumentation]"' in dockerfile_text


def published_ports(services: dict[str, Any]) -> dict[str, list[int]]:
    ports: dict[str, list[int]] = {}
    for name, service in services.items():
        for spec in service.get("ports", []):
            if isinstance(spec, dict):
                ports.setdefault(name, []).append(int(spec["published"]))
                continue
            parts = str(spec).split("/")[0].split(":")
            ports.setdefault(name, []).append(int(parts[-2] if len(parts) > 1 else parts[-1]))
    return ports


def test_compose_publishes_the_documented_ports() -> None:
    ports = published_ports(compose()["services"])
    assert ports["jaeger"] == [16686, 4317, 4318]
    assert ports["grafana"] == [3000]
    assert ports["prometheus"] == [9090]
    assert ports["gateway"] == [8000]
    assert ports["api"] == [8080]
    path, docs = deploy_docs()
    for service, numbers in ports.items():
        for port in numbers:
            assert re.search(rf"(?<!\d){port}(?!\d)", docs), (
                f"port {port} of {service} is not mentioned in {path.name}")


def test_docs_show_the_compose_commands() -> None:
    services = compose()["services"]
    path, docs = deploy_docs()
    for name in ("gateway", "worker", "api"):
        command = command_text(services[name]["command"])
        assert command in docs, f"{name} command {command!r} is not shown in {path.name}"
    for url in ("http://localhost:16686", "http://localhost:3000", "http://localhost:9090",
                "http://localhost:8000", "http://localhost:8080"):
        assert url in docs, url


def mounts() -> Iterator[tuple[str, Path, str]]:
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            if isinstance(volume, dict):
                source, target = volume.get("source", ""), volume.get("target", "")
            else:
                source, _, rest = str(volume).partition(":")
                target = rest.split(":")[0]
            if source.startswith((".", "/")):
                yield name, (DEPLOY / source).resolve(), target


def test_every_mounted_path_exists() -> None:
    found = list(mounts())
    assert {name for name, _, _ in found} >= {"prometheus", "grafana"}
    for name, source, _ in found:
        assert source.exists(), f"{name} mounts missing {source}"
    targets = {target: source for _, source, target in found}
    assert targets["/etc/prometheus/prometheus.yml"] == DEPLOY / "prometheus.yml"
    assert targets["/etc/prometheus/alerts.yml"] == DEPLOY / "alerts.yml"
    assert targets["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    # The dashboard provider reads where compose mounts grafana/dashboards.
    provider = load_yaml(GRAFANA / "provisioning" / "dashboards" / "flowtrace.yml")
    path = provider["providers"][0]["options"]["path"]
    assert targets[path] == GRAFANA / "dashboards"


def test_compose_modules_exist() -> None:
    """The worker and API commands name objects the example modules define."""
    for ref in ("examples.fleet.worker:broker", "examples.fleet.api:app"):
        module, _, attribute = ref.partition(":")
        path = REPO_ROOT / (module.replace(".", "/") + ".py")
        tree = ast.parse(path.read_text())
        names = {target.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                 for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                 if isinstance(target, ast.Name)}
        assert attribute in names, f"{path} defines no {attribute}"


# ---------------------------------------------------------------------- grafana
def test_grafana_datasource_provisioning() -> None:
    datasources = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    (prometheus,) = [d for d in datasources["datasources"] if d["type"] == "prometheus"]
    assert prometheus["url"] == "http://prometheus:9090"
    variable = variables(load_dashboard())["datasource"]
    assert variable["current"]["value"] == prometheus["uid"]


def test_dashboard_structure() -> None:
    dashboard = load_dashboard()
    panels = list(iter_panels(dashboard))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids are not unique"
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 36

    found = variables(dashboard)
    datasource = found["datasource"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    for name, label in (("pipeline", "pipeline"), ("step", "step")):
        variable = found[name]
        assert variable["type"] == "query"
        assert variable["multi"] is True and variable["includeAll"] is True
        assert variable["allValue"] == ".*"
        assert variable["datasource"]["uid"] == "${datasource}"
        assert label_values_selector(variable_query(variable))[1] == label

    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel.get("targets"), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]

    exprs = " ".join(q.expr for q in panel_queries(dashboard))
    for metric in ("flowtrace_pipeline_runs_total", "flowtrace_pipeline_duration_seconds_bucket",
                   "flowtrace_pipelines_in_progress", "flowtrace_step_runs_total",
                   "flowtrace_step_duration_seconds_bucket",
                   "flowtrace_step_queue_wait_seconds_bucket", "flowtrace_events_total",
                   "flowtrace_events_dropped_total", "flowtrace_ws_connections",
                   "flowtrace_ws_messages_sent_total", "flowtrace_ws_messages_dropped_total",
                   "flowtrace_ws_connections_rejected_total"):
        assert re.search(rf"\b{metric}\b", exprs), f"no panel shows {metric}"
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (pipeline, le) " in exprs
    assert '$pipeline' in exprs and '$step' in exprs


@pytest.fixture(scope="module")
def prometheus() -> Iterator[PrometheusServer]:
    with PrometheusServer() as server:
        yield server


@pytest.mark.parametrize("pipeline, step", [(".*", ".*"), ("etl", "fleet.load")])
def test_every_dashboard_query_parses(prometheus: PrometheusServer, pipeline: str,
                                      step: str) -> None:
    dashboard = load_dashboard()
    values = {"pipeline": pipeline, "step": step, "datasource": "flowtrace-prometheus"}
    queries = panel_queries(dashboard)
    assert len(queries) >= 15
    failures = []
    for query in queries:
        expr = substitute(query.expr, values)
        body = prometheus.query_response(expr)
        if body.get("status") != "success":
            failures.append(f"panel {query.panel_id} {query.panel_title!r} {query.ref_id}: "
                            f"{body.get('error')}\n  {expr}")
    assert not failures, "\n".join(failures)


def test_variable_queries_parse(prometheus: PrometheusServer) -> None:
    dashboard = load_dashboard()
    defined = set(variables(dashboard))
    for query in panel_queries(dashboard):
        assert used_variables(query.expr) - defined - {"__rate_interval", "__range"} == set()
    for name, variable in variables(dashboard).items():
        if variable["type"] != "query":
            continue
        selector, _ = label_values_selector(variable_query(variable))
        assert selector, name
        expr = substitute(selector, {"pipeline": ".*", "step": ".*"})
        body = prometheus.query_response(expr)
        assert body.get("status") == "success", f"${name}: {body.get('error')} ({expr})"
