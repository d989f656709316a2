"""A real ``prometheus`` server for tests: temp config and TSDB, free port, HTTP API.

    with PrometheusServer(targets=["127.0.0.1:8123"]) as prom:
        prom.wait_for_up()
        prom.wait_for_query('flowtrace_events_total{type="PipelineStartEvent"}')

Scrapes every ``scrape_interval`` (1 s by default) so that tests wait on
conditions (a target up, a series present) instead of sleeping.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.processes import free_port
from tests.support.waiting import wait_until

PROMETHEUS = "prometheus"
PROMTOOL = "promtool"


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed: apt-get install prometheus")
    return path


class PrometheusError(RuntimeError):
    """The HTTP API answered with ``status: error`` (``errorType``, ``error``)."""

    def __init__(self, expr: str, body: dict[str, Any]) -> None:
        self.expr = expr
        self.body = body
        super().__init__(f"{body.get('errorType')}: {body.get('error')} (query: {expr})")


class PrometheusServer:
    """A private Prometheus scraping ``targets`` (``host:port``) at ``metrics_path``."""

    def __init__(self, targets: Sequence[str] = (), *, job: str = "flowtrace-gateway",
                 metrics_path: str = "/metrics", scrape_interval: str = "1s",
                 rule_files: Sequence[str | Path] = ()) -> None:
        self.binary = require_binary(PROMETHEUS)
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="flowtrace-prometheus-"))
        self.targets = list(targets)
        self.job = job
        self.metrics_path = metrics_path
        self.scrape_interval = scrape_interval
        self.rule_files = [str(Path(p).resolve()) for p in rule_files]
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "prometheus.log"
        self._log: Any = None
        self.client = httpx.Client(base_url=self.url, timeout=10.0)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.dir / "prometheus.yml"

    def config(self) -> dict[str, Any]:
        scrape_configs = []
        if self.targets:
            scrape_configs.append({
                "job_name": self.job,
                "metrics_path": self.metrics_path,
                "scrape_interval": self.scrape_interval,
                "scrape_timeout": self.scrape_interval,
                "static_configs": [{"targets": self.targets}],
            })
        return {
            "global": {"scrape_interval": self.scrape_interval,
                       "evaluation_interval": self.scrape_interval},
            "rule_files": self.rule_files,
            "scrape_configs": scrape_configs,
        }

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> PrometheusServer:
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [self.binary,
             f"--config.file={self.config_path}",
             f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}",
             "--storage.tsdb.retention.time=1h",
             "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=self.dir,
        )
        try:
            wait_until(self._ready, timeout=30, interval=0.05, message="prometheus to be ready")
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.output()}")
        try:
            return self.client.get("/-/ready").status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        self.client.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # ------------------------------------------------------------------ HTTP API
    def query_response(self, expr: str, time: float | None = None) -> dict[str, Any]:
        """The raw JSON body of ``POST /api/v1/query`` (success or error)."""
        data = {"query": expr}
        if time is not None:
            data["time"] = str(time)
        response = self.client.post("/api/v1/query", data=data)
        body: dict[str, Any] = response.json()
        return body

    def query(self, expr: str, time: float | None = None) -> list[dict[str, Any]]:
        """The result vector of an instant query; raises :class:`PrometheusError`."""
        body = self.query_response(expr, time)
        if body.get("status") != "success":
            raise PrometheusError(expr, body)
        result = body["data"]["result"]
        if body["data"]["resultType"] == "scalar":
            return [{"metric": {}, "value": result}]
        return list(result)

    def wait_for_query(self, expr: str,
                       predicate: Callable[[list[dict[str, Any]]], bool] = bool,
                       timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll ``expr`` until ``predicate(result)`` holds; returns that result."""
        last: list[list[dict[str, Any]]] = [[]]

        def check() -> bool:
            last[0] = self.query(expr)
            return predicate(last[0])

        try:
            wait_until(check, timeout=timeout, interval=0.2, message=f"prometheus: {expr}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last result: {last[0]}") from None
        return last[0]

    def targets(self) -> list[dict[str, Any]]:
        body = self.client.get("/api/v1/targets").json()
        return list(body["data"]["activeTargets"])

    def wait_for_up(self, timeout: float = 30.0) -> None:
        """Every configured target scraped successfully at least once."""
        expected = len(self.targets)

        def all_up() -> bool:
            result = self.query(f'up{{job="{self.job}"}} == 1')
            return len(result) == expected

        try:
            wait_until(all_up, timeout=timeout, interval=0.2, message="targets up")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; targets: {self.targets()}") from None


def sample_value(sample: dict[str, Any]) -> float:
    """The float value of one instant-vector sample (NaN and ±Inf included)."""
    return float(sample["value"][1])


__all__ = ["PROMETHEUS", "PROMTOOL", "PrometheusError", "PrometheusServer", "require_binary",
           "sample_value"]
