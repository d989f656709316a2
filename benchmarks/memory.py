"""Memory: RSS per idle WebSocket connection, and the gateway's RSS under many runs.

1. *Idle connections*: ``flowtrace serve`` (subprocess, private Redis) with a raised
   ``RLIMIT_NOFILE``; after 20 warm-up connections (so that lazily imported code and
   first-use allocations are not counted), 1 000 idle ``websockets`` clients on ``/ws/*``
   from one client process (raises its own ``ulimit -n``). RSS (psutil, the kernel's VmRSS)
   before and after, divided by the number of connections.
2. *Many runs*: a child process builds ``create_app(InMemoryTransport())``, starts the
   gateway (the app's lifespan, no HTTP server needed), and publishes 100 000 plain-task
   runs (4 events each: start, step start, step complete, complete) straight into the
   transport. RSS is sampled as runs accumulate: it must level off, bounded by the run
   store (``max_runs`` 10 000) and the transport's ring (10 000 events).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import sys
import time
from typing import Any

from benchmarks.common import (
    RedisServer,
    free_port,
    rss_kib,
    run_json_child,
    stop_process,
    wait_for,
)
from benchmarks.fanout import _Proc
from benchmarks.fleet import _ws_metrics, serve_gateway
from benchmarks.wsload import run_clients

IDLE_CLIENTS = 1000
WARM_CLIENTS = 20


# --------------------------------------------------------------------------- idle connections
def _connections(port: int) -> int:
    try:
        return int(_ws_metrics(port)["connections"])
    except OSError:
        return -1


def _settled_rss(pid: int, seconds: float = 1.0) -> int:
    time.sleep(seconds)
    return rss_kib(pid)


def idle_connections(clients: int = IDLE_CLIENTS,
                     compression: str | None = "deflate") -> dict[str, Any]:
    """``compression="deflate"`` offers per-message deflate, as browsers do."""
    ctx = multiprocessing.get_context("spawn")
    with RedisServer() as redis:
        port = free_port()
        gateway = serve_gateway(redis.url, port, max_connections=clients + WARM_CLIENTS + 100,
                                nofile=clients * 2 + 1024)
        warm: _Proc | None = None
        load: _Proc | None = None
        try:
            url = f"ws://127.0.0.1:{port}/ws/*"
            warm = _Proc(ctx, _clients_entry, (url, WARM_CLIENTS, 0.0, compression))
            if warm.recv(60) != ("ready", WARM_CLIENTS):
                raise RuntimeError("warm-up clients failed")
            wait_for(lambda: _connections(port) >= WARM_CLIENTS, 30, "warm-up connections")
            before = _settled_rss(gateway.pid, 2.0)
            load = _Proc(ctx, _clients_entry, (url, clients, 500.0, compression))
            ready = load.recv(300)
            if ready != ("ready", clients):
                raise RuntimeError(f"clients: {ready}")
            wait_for(lambda: _connections(port) >= clients + WARM_CLIENTS, 60,
                     f"{clients} connections")
            after = _settled_rss(gateway.pid, 2.0)
            connections = _connections(port)
        finally:
            for proc in (load, warm):
                if proc is not None:
                    proc.stop(("close",))
            stop_process(gateway)
    per_connection = (after - before) / clients
    return {
        "clients": clients,
        "compression": compression or "none",
        "connections_seen": connections,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "rss_per_connection_kib": per_connection,
    }


def _clients_entry(url: str, n: int, conn: Any, connect_rate: float,
                   compression: str | None) -> None:
    run_clients(url, n, False, conn, None, compression=compression, connect_rate=connect_rate,
                nofile=n * 2 + 1024)


# --------------------------------------------------------------------------- many runs
async def _many_runs(runs: int, samples: int) -> dict[str, Any]:
    from flowtrace.app import create_app
    from flowtrace.events import (
        PipelineCompleteEvent,
        PipelineStartEvent,
        StepCompleteEvent,
        StepStartEvent,
    )
    from flowtrace.transport.memory import InMemoryTransport

    transport = InMemoryTransport()
    app = create_app(transport)
    store = app.state.flowtrace_store
    gateway = app.state.flowtrace_gateway
    series: list[dict[str, Any]] = []
    every = max(1, runs // samples)
    async with app.router.lifespan_context(app):
        await asyncio.sleep(0.05)
        gc.collect()
        series.append({"runs": 0, "rss_kib": rss_kib(os.getpid()), "store": len(store)})
        start = time.monotonic()
        for i in range(runs):
            pid = f"{i:08x}-memory-bench-run"
            common: dict[str, Any] = {"pipeline_id": pid, "pipeline_name": f"etl_{i % 5}",
                      "pipeline_type": "task", "trace_id": f"{i:032x}", "span_id": f"{i:016x}"}
            await transport.publish(PipelineStartEvent(**common, input={"n": i},
                                                       total_steps=1, steps=["step"]))
            await transport.publish(StepStartEvent(**common, step_name="step", task_id=pid,
                                                   worker="bench:1"))
            await transport.publish(StepCompleteEvent(**common, step_name="step", task_id=pid,
                                                      result={"n": i}, duration_ms=1.0))
            await transport.publish(PipelineCompleteEvent(**common, result={"n": i},
                                                          duration_ms=2.0))
            if i % 200 == 199:  # let the gateway consume (its queue holds 10 000 events)
                while gateway.events_consumed < 4 * (i + 1):
                    await asyncio.sleep(0)
            if (i + 1) % every == 0:
                while gateway.events_consumed < 4 * (i + 1):
                    await asyncio.sleep(0)
                series.append({"runs": i + 1, "rss_kib": rss_kib(os.getpid()),
                               "store": len(store)})
        elapsed = time.monotonic() - start
        consumed = gateway.events_consumed
    return {
        "runs": runs,
        "events": 4 * runs,
        "events_consumed": consumed,
        "events_per_s": 4 * runs / elapsed,
        "dropped": dict(transport.dropped),
        "series": series,
        "rss_start_kib": series[0]["rss_kib"],
        "rss_at_10pct_kib": series[max(1, len(series) // 10)]["rss_kib"],
        "rss_end_kib": series[-1]["rss_kib"],
        "rss_max_kib": max(s["rss_kib"] for s in series),
        "store_size_end": series[-1]["store"],
    }


def many_runs(runs: int) -> dict[str, Any]:
    result: dict[str, Any] = run_json_child(
        ["-m", "benchmarks.memory", "--child-runs", str(runs)], timeout=900)
    return result


# --------------------------------------------------------------------------- entry
def run(quick: bool = False) -> dict[str, Any]:
    runs = 30_000 if quick else 100_000
    idle = {}
    for compression in (("deflate",) if quick else ("deflate", None)):
        print(f"  memory: {IDLE_CLIENTS} idle WebSocket connections "
              f"(compression {compression or 'none'})", flush=True)
        idle[compression or "none"] = idle_connections(IDLE_CLIENTS, compression)
    print(f"  memory: gateway RSS over {runs:,} runs", flush=True)
    store = many_runs(runs)
    # bounded: the last half of the run adds (almost) nothing
    half = next(s for s in store["series"] if s["runs"] >= runs // 2)["rss_kib"]
    growth_second_half = store["rss_end_kib"] - half
    store["rss_growth_second_half_kib"] = growth_second_half
    summary = {
        "rss_per_idle_connection_kib": {k: v["rss_per_connection_kib"]
                                        for k, v in idle.items()},
        "idle_connections": IDLE_CLIENTS,
        "gateway_rss_start_mib": store["rss_start_kib"] / 1024,
        "gateway_rss_end_mib": store["rss_end_kib"] / 1024,
        "gateway_rss_max_mib": store["rss_max_kib"] / 1024,
        "gateway_rss_growth_second_half_mib": growth_second_half / 1024,
        "runs": runs,
        "store_size_end": store["store_size_end"],
    }
    targets = {
        "memory: gateway RSS bounded over runs (second half grows < 5%)":
            growth_second_half < 0.05 * store["rss_end_kib"],
    }
    return {"summary": summary, "targets": targets, "idle": idle, "store": store}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child-runs", type=int, default=0)
    parser.add_argument("--samples", type=int, default=20)
    args = parser.parse_args(argv)
    if args.child_runs:
        print(json.dumps(asyncio.run(_many_runs(args.child_runs, args.samples))))
        return 0
    print(json.dumps(run(args.quick), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
