"""Helpers shared by the benchmark scripts: ports, processes, RSS, statistics, tables."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tests.support.processes import RedisServer, Workers, free_port, port_open

__all__ = ["RedisServer", "Workers", "free_port", "port_open"]  # shared with the tests' helpers

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_PATH = Path(__file__).resolve().parent / "results.json"


def _prefer_pythonpath() -> None:
    """``PYTHONPATH=/tmp/patched python -m benchmarks.run`` measures the flowtrace there.

    ``python -m`` puts the working directory (this checkout) ahead of ``PYTHONPATH``;
    put ``PYTHONPATH`` first again, before anything imports flowtrace.
    """
    entries = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
               if p]
    if not entries or "flowtrace" in sys.modules:
        return
    for entry in reversed(entries):
        while entry in sys.path:
            sys.path.remove(entry)
        sys.path.insert(0, entry)


_prefer_pythonpath()
_CHILD_CWD = Path(tempfile.gettempdir()) / "flowtrace-bench-cwd"
"""Children start in an empty directory so that ``PYTHONPATH`` alone decides what they import."""


def wait_for(condition: Callable[[], bool], timeout: float, what: str,
             interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


def child_env(**extra: str) -> dict[str, str]:
    """The environment for child processes: this checkout first on the path.

    ``PYTHONPATH`` set by the caller (e.g. a patched copy of flowtrace) keeps precedence.
    """
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(REPO_ROOT)])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def child_cwd() -> Path:
    """Where children start: an empty directory, so that ``PYTHONPATH`` alone decides what
    they import (``python -m`` puts the working directory first on the path)."""
    _CHILD_CWD.mkdir(exist_ok=True)
    return _CHILD_CWD


def python_child(args: Sequence[str], wrapper: Sequence[str] = (),
                 **popen: Any) -> subprocess.Popen[bytes]:
    """``python -m ...`` in a new process group (stopped with :func:`stop_process`).

    ``wrapper`` goes before the interpreter (``valgrind ...``, say).
    """
    return subprocess.Popen([*wrapper, sys.executable, *args], env=child_env(), cwd=child_cwd(),
                            start_new_session=True, **popen)


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 10.0) -> None:
    """SIGTERM the child (and its group), SIGKILL after ``timeout``."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def run_json_child(args: Sequence[str], timeout: float) -> Any:
    """Run ``python -m ...`` to completion; its last stdout line is JSON."""
    proc = python_child(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n"
                           f"{err.decode(errors='replace')[-4000:]}")
    lines = [line for line in out.decode().splitlines() if line.strip()]
    return json.loads(lines[-1])


def process_cpu_seconds(*pids: int) -> float:
    """User + system CPU seconds the processes ``pids`` have used so far (psutil)."""
    import psutil  # imported here: run.py says it is missing before anything needs it

    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (psutil; on Linux the kernel's VmRSS)."""
    import psutil  # imported here: run.py says it is missing before anything needs it

    return int(psutil.Process(pid).memory_info().rss // 1024)


def raise_nofile(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(max(soft, wanted), hard) if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def paired_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """The median of sample-by-sample ratios: the samples of one slot ran seconds apart."""
    return median([a / b for a, b in zip(numerators, denominators, strict=True)])


def slot_order(items: Sequence[T], slot: int) -> list[T]:
    """``items`` rotated by ``slot``: over the slots each one takes each position as often."""
    shift = slot % len(items)
    return [*items[shift:], *items[:shift]]


def flowtrace_location() -> str:
    """Which flowtrace is measured (this checkout, or a patched copy on ``PYTHONPATH``)."""
    import flowtrace

    return str(Path(flowtrace.__file__).resolve().parent)


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _cpu_times() -> tuple[float, float] | None:
    """The machine's (steal, all) CPU seconds since boot, as psutil reads them; None where
    the platform reports no steal."""
    import psutil  # imported here: run.py says it is missing before anything needs it

    times = psutil.cpu_times()
    if not hasattr(times, "steal"):
        return None
    # Linux counts guest time inside user and nice already (as psutil's cpu_percent does).
    guest = getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)
    return times.steal, sum(times) - guest


class HostSteal:
    """The share of this machine's CPU time that its hypervisor gave to other guests
    ("steal") since this object was made.

    On a shared host, steal is what moves a latency tail or a throughput between runs of
    the same code; the benchmarks record it beside their numbers so that a reader can
    tell the host's share from flowtrace's.
    """

    def __init__(self) -> None:
        self._start = _cpu_times()

    def percent(self) -> float | None:
        """Steal as a percentage of all CPU time so far; None where it is not reported."""
        end = _cpu_times()
        if self._start is None or end is None or end[1] <= self._start[1]:
            return None
        return 100 * (end[0] - self._start[0]) / (end[1] - self._start[1])


@contextlib.contextmanager
def timed(label: str) -> Iterator[None]:
    start = time.monotonic()
    print(f"… {label}", flush=True)
    try:
        yield
    finally:
        print(f"  {label}: {time.monotonic() - start:.1f} s", flush=True)


def fmt(value: Any, digits: int = 2) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(h) for h in header], *[[fmt(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
             for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
