"""``flowtrace demo`` from the built wheel, with the source tree out of reach.

The wheel ships only ``flowtrace/``: everything the demo needs must be in it. The wheel
is installed with ``pip --target`` into a temporary directory; its dependencies come from
this interpreter's site-packages. Python runs with ``-S`` and those directories on
``PYTHONPATH``, because the development install's ``.pth`` puts the repository on every
process's ``sys.path`` (``-S`` skips ``.pth`` files) and ``import examples`` would then
succeed anywhere.
"""

from __future__ import annotations

import os
import signal
import site
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.processes import REPO_ROOT, free_port, kill_process
from tests.support.waiting import wait_until

BUILD_TIMEOUT = 240


def build_and_install(work: Path) -> Path:
    """Build the wheel from the repository and install it (no dependencies) under ``work``."""
    dist, target = work / "dist", work / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", str(REPO_ROOT), "-w", str(dist)], check=True,
                   capture_output=True, timeout=BUILD_TIMEOUT)
    (wheel,) = dist.glob("flowtrace-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=BUILD_TIMEOUT)
    return target


def outside_env(target: Path) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("PYTHON", "OTEL_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(target), *site.getsitepackages()])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=2, trust_env=False)
    except httpx.HTTPError:
        return None


@pytest.mark.timeout(2 * BUILD_TIMEOUT + 180)
def test_the_installed_wheel_runs_the_demo_without_the_source_tree(tmp_path: Path) -> None:
    target = build_and_install(tmp_path)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = outside_env(target)
    python = [sys.executable, "-S"]

    probe = subprocess.run(
        [*python, "-c", "import flowtrace; print(flowtrace.__file__); import examples"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert Path(probe.stdout.strip()).is_relative_to(target), probe
    assert "No module named 'examples'" in probe.stderr, probe

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "demo.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([*python, "-m", "flowtrace.cli", "demo", "--port", str(port)],
                                cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: proc.poll() is not None or get(base + "/healthz") is not None,
                   timeout=60, interval=0.1, message="the demo to serve /healthz")
        assert proc.poll() is None, log.read_text(errors="replace")
        page = httpx.get(base + "/", timeout=10, trust_env=False)
        assert 'data-testid="runs"' in page.text  # the packaged page, not the placeholder

        def finished_runs() -> list[dict[str, object]]:
            runs = httpx.get(base + "/api/pipelines", timeout=10, trust_env=False).json()
            return [run for run in runs if run["status"] != "RUNNING"]

        wait_until(finished_runs, timeout=60, interval=0.2, message="a finished run")

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text(errors="replace")
        output = log.read_text(errors="replace")
        assert "flowtrace demo stopped" in output and "Traceback" not in output, output
    finally:
        kill_process(proc)
