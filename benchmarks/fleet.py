"""Fleet path: workers → Redis stream → ``flowtrace serve`` → WebSocket clients.

- a private ``redis-server`` on a free port;
- ``flowtrace serve --redis-url ...`` as a subprocess (the real gateway CLI);
- 10 ``websockets`` clients on ``/ws/*`` in one process (:mod:`benchmarks.wsload`);
- 2 publisher processes standing in for workers: ``RedisStreamTransport.publish`` at a
  paced total of 1 000 events/s (500 each), ~1 KB ``StepCompleteEvent`` s carrying their
  publish time (``time.monotonic_ns``, one clock for every process on this machine).

End-to-end latency is publish call → client receive, over every delivery; loss is
counted per client (every client must receive every published event exactly once).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import resource
import subprocess
import sys
import time
import urllib.request
from typing import Any

from benchmarks.common import (
    HostSteal,
    RedisServer,
    free_port,
    port_open,
    process_cpu_seconds,
    python_child,
    stop_process,
    wait_for,
)
from benchmarks.fanout import PAD, _Proc
from benchmarks.wsload import run_clients

CLIENTS = 10
PUBLISHERS = 2
TOTAL_RATE = 1000.0


# --------------------------------------------------------------------------- publisher
async def _publish(url: str, rate: float, duration: float, worker: int) -> dict[str, Any]:
    from flowtrace.events import StepCompleteEvent
    from flowtrace.transport.redis_stream import RedisStreamTransport

    transport = RedisStreamTransport(url)
    pad = "x" * PAD
    interval = 1 / rate
    published = 0
    start = time.monotonic()
    cpu0 = time.process_time()
    while True:
        t = time.monotonic()
        if t - start >= duration:
            break
        due = int((t - start) / interval) + 1
        while published < due:
            run = f"w{worker}-{published // 4:06d}"
            await transport.publish(StepCompleteEvent(
                pipeline_id=run, pipeline_name="fleet", pipeline_type="task",
                step_name="fleet_step", task_id=run, duration_ms=1.0,
                result={"t": time.monotonic_ns(), "pad": pad}))
            published += 1
        await asyncio.sleep(max(0.0, start + published * interval - time.monotonic()))
    elapsed = time.monotonic() - start
    cpu = time.process_time() - cpu0
    flushed = await transport.flush(timeout=10)
    dropped = dict(transport.dropped)
    await transport.close()
    return {"published": published, "rate": published / elapsed, "flushed": flushed,
            "dropped": dropped, "cpu_util": cpu / elapsed}


def publisher_main(url: str, rate: float, duration: float, worker: int) -> None:
    print(json.dumps(asyncio.run(_publish(url, rate, duration, worker))), flush=True)


# --------------------------------------------------------------------------- orchestration
def _ws_metrics(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ws/metrics", timeout=5) as response:
        return dict(json.load(response))


def _subscribed(port: int) -> int:
    try:
        return int(_ws_metrics(port)["clients_per_channel"].get("*", 0))
    except OSError:
        return -1


def serve_gateway(redis_url: str, port: int, max_connections: int = 1000,
                  nofile: int = 0) -> subprocess.Popen[bytes]:
    """``flowtrace serve`` as a subprocess; optionally with a raised ``RLIMIT_NOFILE``."""

    def limits() -> None:
        if nofile:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(nofile, hard)), hard))

    proc = python_child(
        ["-m", "flowtrace.cli", "serve", "--redis-url", redis_url, "--port", str(port),
         "--max-connections", str(max_connections), "--log-level", "warning"],
        stdout=subprocess.DEVNULL, preexec_fn=limits)
    wait_for(lambda: port_open(port) or proc.poll() is not None, 60, "flowtrace serve")
    if proc.poll() is not None:
        raise RuntimeError(f"flowtrace serve exited with {proc.returncode}")
    return proc


def run(quick: bool = False, duration: float | None = None) -> dict[str, Any]:
    duration = duration or (10.0 if quick else 30.0)
    ctx = multiprocessing.get_context("spawn")
    delivered = ctx.RawValue("q", 0)
    gateway: subprocess.Popen[bytes] | None = None
    clients: _Proc | None = None
    publishers: list[subprocess.Popen[bytes]] = []
    with RedisServer() as redis:
        try:
            port = free_port()
            gateway = serve_gateway(redis.url, port)
            clients = _Proc(ctx, _clients_entry,
                            (f"ws://127.0.0.1:{port}/ws/*", CLIENTS, False, delivered))
            ready = clients.recv(60)
            if ready != ("ready", CLIENTS):
                raise RuntimeError(f"clients: {ready}")
            wait_for(lambda: _subscribed(port) >= CLIENTS, 30, "clients to subscribe")
            clients.ask("reset")
            print(f"  fleet: {PUBLISHERS} publishers x {TOTAL_RATE / PUBLISHERS:.0f} events/s "
                  f"for {duration:.0f} s -> Redis -> flowtrace serve -> {CLIENTS} clients",
                  flush=True)
            gateway_cpu0 = process_cpu_seconds(gateway.pid)
            started, steal = time.monotonic(), HostSteal()
            publishers = [
                python_child(["-c", "import sys; from benchmarks.fleet import publisher_main; "
                              "publisher_main(sys.argv[1], float(sys.argv[2]), "
                              "float(sys.argv[3]), int(sys.argv[4]))",
                              redis.url, str(TOTAL_RATE / PUBLISHERS), str(duration), str(i)],
                             stdout=subprocess.PIPE)
                for i in range(PUBLISHERS)]
            reports = []
            for proc in publishers:
                out, _ = proc.communicate(timeout=duration + 120)
                if proc.returncode != 0:
                    raise RuntimeError(f"publisher failed ({proc.returncode})")
                reports.append(json.loads(out.decode().strip().splitlines()[-1]))
            published = sum(r["published"] for r in reports)
            # Let the last events arrive (or not): until the counter stops moving.
            expected = published * CLIENTS
            deadline = time.monotonic() + 30
            last, since = -1, time.monotonic()
            while time.monotonic() < deadline and delivered.value < expected:
                if delivered.value != last:
                    last, since = delivered.value, time.monotonic()
                elif time.monotonic() - since > 5:
                    break
                time.sleep(0.05)
            elapsed, steal_pct = time.monotonic() - started, steal.percent()
            gateway_cpu = process_cpu_seconds(gateway.pid) - gateway_cpu0
            report = clients.ask("report")[1]
            ws = _ws_metrics(port)
        finally:
            for proc in publishers:
                stop_process(proc)
            if clients is not None:
                clients.stop(("close",))
            stop_process(gateway)
    counts = report["counts"]
    lost = [published - c for c in counts]
    latency = report["latency_ns"]
    summary = {
        "duration_s": duration,
        "publishers": PUBLISHERS,
        "clients": CLIENTS,
        "target_rate": TOTAL_RATE,
        "published": published,
        "publish_rate": sum(r["rate"] for r in reports),
        "publisher_drops": [r["dropped"] for r in reports],
        "received_per_client": {"min": min(counts), "max": max(counts)},
        "lost_per_client": {"min": min(lost), "max": max(lost)},
        "duplicates_or_extra": max(0, max(counts) - published),
        "latency_ms": latency,
        "gateway_cpu_util": gateway_cpu / elapsed,
        "gateway_ws_dropped": ws.get("messages_dropped"),
        "host_steal_pct": steal_pct,
    }
    targets = {
        "fleet: p99 < 50 ms": latency.get("p99_ms", float("inf")) < 50,
        "fleet: zero loss": max(lost) == 0 and min(lost) == 0,
    }
    return {"summary": summary, "targets": targets, "publishers": reports}


def _clients_entry(url: str, n: int, conn: Any, stalled: bool, delivered: Any) -> None:
    run_clients(url, n, stalled, conn, delivered)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--duration", type=float, default=None)
    args = parser.parse_args(argv)
    result = run(args.quick, args.duration)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
