"""``make demo`` from the repository root: installs what it needs, serves, stops on Ctrl-C.

The first run on a machine installs the package (``pip install -e '.[dev]'``), so this
test allows minutes for the server to come up; later runs reuse the install stamp.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import httpx
import pytest

from tests.support.processes import REPO_ROOT, free_port, port_open
from tests.support.waiting import wait_until

INSTALL_AND_START_TIMEOUT = 480


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return None


@pytest.mark.timeout(INSTALL_AND_START_TIMEOUT + 120)
def test_make_demo_serves_the_page_metrics_and_runs_then_stops_cleanly() -> None:
    assert shutil.which("make"), "make is not installed"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)  # make must install what it needs, not lean on the tests' path
    with tempfile.NamedTemporaryFile(prefix="flowtrace-make-demo-", suffix=".log",
                                     delete=False) as log:
        proc = subprocess.Popen(["make", "demo", f"PORT={port}"], cwd=REPO_ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    output = Path(log.name)
    try:
        wait_until(lambda: proc.poll() is not None or _get(base + "/healthz") is not None,
                   timeout=INSTALL_AND_START_TIMEOUT, interval=0.2,
                   message="make demo to serve /healthz")
        assert proc.poll() is None, f"make demo exited:\n{output.read_text(errors='replace')}"

        page = httpx.get(base + "/", timeout=10)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'data-testid="runs"' in page.text  # the live page, not the placeholder
        assert httpx.get(base + "/static/app.js", timeout=10).status_code == 200

        def finished_runs() -> list[dict[str, object]]:
            response = httpx.get(base + "/api/pipelines?limit=100", timeout=10)
            assert response.status_code == 200
            return [run for run in response.json() if run["status"] != "RUNNING"]

        runs = wait_until(finished_runs, timeout=60, interval=0.2, message="finished runs")
        assert {"pipeline_id", "pipeline_name", "status", "steps"} <= set(runs[0])

        def metrics() -> str:
            text = httpx.get(base + "/metrics", timeout=10).text
            return text if "flowtrace_pipeline_runs_total{" in text else ""

        assert "flowtrace_step_runs_total{" in wait_until(metrics, timeout=30,
                                                          message="run metrics")

        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal: make and the demo
        proc.wait(timeout=60)
        text = output.read_text(errors="replace")
        assert "flowtrace demo stopped" in text, text
        assert "Application shutdown complete" in text, text
        assert "Traceback" not in text, text
        # make re-raises the SIGINT it got once its child has exited.
        assert proc.returncode in (0, -signal.SIGINT), (proc.returncode, text)
        assert not port_open(port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        output.unlink(missing_ok=True)
