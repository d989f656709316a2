"""WebSocket fan-out: flowtrace's gateway against a raw Starlette broadcaster.

Three processes: the server under test (uvicorn, one event loop, its own core),
the clients (100 ``websockets`` clients subscribed to every event, plus optionally
one stalled client, in one process on the other core), and this orchestrator.

- ``flowtrace``: ``create_app(InMemoryTransport())`` under uvicorn; events are
  ``StepCompleteEvent`` s (~1 KB of JSON) published into the transport, i.e. through
  the gateway's whole path: transport → run store → manager → per-client outboxes.
- ``raw``: :mod:`benchmarks.raw_broadcaster` (the ceiling), fed the same JSON text.

Phases, each against both servers. The servers take turns, three sessions each (raw,
flowtrace, raw, flowtrace, raw, flowtrace; one each with ``--quick``), flowtrace's rate is
compared with the raw session just before it, so that a host whose speed drifts within a
minute (seen: a factor of two) hits both alike, and the median of the rounds is reported,
so that one slow round does not decide it:

1. *throughput*: the publisher keeps at most ``window`` events per healthy client
   in flight (published − received, read from a counter the client process
   shares), so no healthy client ever overflows its queue; delivered events/s
   across the healthy clients, after a warm-up.
2. *throughput with one stalled client* (never reads, ``SO_RCVBUF`` 4 KiB): how much
   of phase 1 the healthy clients keep. Each session runs a warm-up (not counted), then
   healthy, stalled, healthy, and the stalled phase is compared with the two healthy
   ones around it.
3. *latency* (last session of each server): a paced rate (``rate`` events/s, the same
   for both servers), p50/p99 publish-to-receive latency over every delivery.

uvicorn runs with its defaults (as ``flowtrace serve`` does), so per-message
deflate is negotiated with clients that offer it; ``--compression none`` measures
without it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import sys
import time
from collections.abc import Callable
from statistics import fmean, median
from typing import Any

from benchmarks.common import HostSteal, free_port, port_open, wait_for
from benchmarks.wsload import run_clients

PAD = 860  # bytes of padding: the event's JSON is ~1 KB
WINDOW = 100
ROUNDS = 3
"""Sessions per server (taking turns); the ratios are medians over them."""


def _payload(kind: str) -> tuple[Any, Any]:
    """A function ``(i, t_ns) -> event or text`` for the server kind."""
    pad = "x" * PAD
    if kind == "flowtrace":
        from flowtrace.events import StepCompleteEvent

        def make(i: int, t_ns: int) -> Any:
            return StepCompleteEvent(
                pipeline_id=f"bench-{i % 1000:04d}", pipeline_name="bench",
                pipeline_type="task", step_name="bench_step", step_index=0,
                task_id=f"bench-{i % 1000:04d}", attempt=1, duration_ms=1.0,
                trace_id="0" * 31 + "1", span_id="0" * 15 + "1",
                result={"t": t_ns, "pad": pad})

        sample = make(0, time.monotonic_ns()).model_copy(update={"id": "1700000000000-1"})
        return make, sample.model_dump_json()
    from flowtrace.events import StepCompleteEvent

    template = json.loads(StepCompleteEvent(
        id="1700000000000-1", pipeline_id="bench-0000", pipeline_name="bench",
        pipeline_type="task", step_name="bench_step", task_id="bench-0000",
        trace_id="0" * 31 + "1", span_id="0" * 15 + "1",
        result={"t": 0, "pad": pad}).model_dump_json())

    def make_text(i: int, t_ns: int) -> str:
        template["id"] = f"1700000000000-{i}"
        template["result"] = {"t": t_ns, "pad": pad}
        return json.dumps(template, separators=(",", ":"))

    return make_text, make_text(0, 0)


# --------------------------------------------------------------------------- server
async def _server(kind: str, port: int, conn: Any, delivered: Any) -> None:
    import uvicorn
    from starlette.applications import Starlette

    make, sample = _payload(kind)
    app: Starlette  # flowtrace's FastAPI app or the raw broadcaster's Starlette one
    if kind == "flowtrace":
        from flowtrace.app import create_app
        from flowtrace.transport.memory import InMemoryTransport

        transport = InMemoryTransport()
        app = create_app(transport, max_connections=5000)
        manager = app.state.flowtrace_manager

        async def publish(i: int, t_ns: int) -> None:
            await transport.publish(make(i, t_ns))

        def subscribed() -> int:
            return int(manager.get_client_count("*"))

        def stats() -> dict[str, Any]:
            s = manager.stats()
            return {k: s[k] for k in ("connections", "messages_sent", "messages_dropped",
                                      "slow_consumer_disconnects")}
    else:
        from benchmarks.raw_broadcaster import create_raw_app

        app, broadcaster = create_raw_app()

        async def publish(i: int, t_ns: int) -> None:
            broadcaster.publish(make(i, t_ns))

        def subscribed() -> int:
            return broadcaster.connection_count

        def stats() -> dict[str, Any]:
            return {"connections": broadcaster.connection_count,
                    "messages_sent": broadcaster.sent, "messages_dropped": broadcaster.dropped}

    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    loop = asyncio.get_running_loop()
    try:
        while True:
            command = await loop.run_in_executor(None, conn.recv)
            name = command[0]
            if name == "wait_subscribed":
                deadline = time.monotonic() + 60
                while subscribed() < command[1] and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                conn.send(("subscribed", subscribed(), len(sample)))
            elif name == "throughput":
                _, duration, warmup, healthy, window, until_hit = command
                hit = _hit_check(stats) if until_hit else None
                conn.send(("throughput", await _throughput(
                    publish, delivered, duration, warmup, healthy, window, hit)))
            elif name == "paced":
                _, rate, duration = command
                conn.send(("paced", await _paced(publish, rate, duration)))
            elif name == "quiesce":
                await _quiesce(delivered, command[1])
                conn.send(("quiet", stats()))
            elif name == "stop":
                break
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(serving, 15)
        conn.send(("stopped",))


async def _quiesce(delivered: Any, expected: int | None, quiet_s: float = 2.0,
                   timeout: float = 30) -> None:
    """Wait until the clients received ``expected`` deliveries in all, or stopped receiving."""
    deadline = time.monotonic() + timeout
    last, since = delivered.value, time.monotonic()
    while time.monotonic() < deadline:
        if expected is not None and delivered.value >= expected:
            return
        await asyncio.sleep(0.02)
        value = delivered.value
        if value != last:
            last, since = value, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return


def _hit_check(stats: Any) -> Any:
    """True once the server has dealt with the stalled client (a drop or a disconnect)."""
    before = stats()

    def hit() -> bool:
        now = stats()
        return bool(now["messages_dropped"] > before["messages_dropped"]
                    or now.get("slow_consumer_disconnects", 0)
                    > before.get("slow_consumer_disconnects", 0))

    return hit


MAX_STALLED_S = 25.0
"""A stalled phase runs until the stall bit (plus ``duration``/2), at most this long."""


async def _throughput(publish: Any, delivered: Any, duration: float, warmup: float,
                      healthy: int, window: int, hit: Any = None) -> dict[str, Any]:
    """Publish as fast as the healthy clients receive (bounded in-flight window).

    The stalled client (if any) is not counted: it is what the window must not wait for.
    """
    base = delivered.value
    published = 0
    limit = window * healthy
    start = time.monotonic()
    measure_at = start + warmup
    end = measure_at + duration
    measured: tuple[float, int, float] | None = None
    clock = time.monotonic
    hit_at: float | None = None
    checked = 0.0
    while True:
        t = clock()
        if measured is None and t >= measure_at:
            measured = (t, delivered.value, time.process_time())
        if hit is not None and hit_at is None and t - checked > 0.05:
            checked = t
            if hit():
                hit_at = t
                end = max(end, t + duration / 2)  # measure past the moment it bit
        if t >= end and (hit is None or hit_at is not None or t - start >= MAX_STALLED_S):
            break
        burst = 0
        while published * healthy - (delivered.value - base) < limit and burst < 16:
            await publish(published, time.monotonic_ns())
            published += 1
            burst += 1
        await asyncio.sleep(0 if burst else 0.0002)
    assert measured is not None
    t0, d0, cpu0 = measured
    t1, d1, cpu1 = clock(), delivered.value, time.process_time()
    return {"deliveries_per_s": (d1 - d0) / (t1 - t0), "events_per_s": (d1 - d0) / (t1 - t0)
            / healthy, "published": published, "server_cpu_util": (cpu1 - cpu0) / (t1 - t0),
            "seconds": t1 - t0,
            "stall_hit_after_s": None if hit_at is None else hit_at - start}


async def _paced(publish: Any, rate: float, duration: float) -> dict[str, Any]:
    """``rate`` events/s for ``duration`` s (catching up in bursts when late)."""
    interval = 1 / rate
    start = time.monotonic()
    cpu0 = time.process_time()
    published = 0
    while True:
        t = time.monotonic()
        if t - start >= duration:
            break
        due = int((t - start) / interval) + 1
        while published < due:
            await publish(published, time.monotonic_ns())
            published += 1
        await asyncio.sleep(max(0.0, start + published * interval - time.monotonic()))
    elapsed = time.monotonic() - start
    return {"published": published, "rate": published / elapsed,
            "server_cpu_util": (time.process_time() - cpu0) / elapsed}


def server_main(kind: str, port: int, conn: Any, delivered: Any) -> None:
    """Process entry point (``multiprocessing``, spawn)."""
    logging_quiet()
    asyncio.run(_server(kind, port, conn, delivered))


def logging_quiet() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("flowtrace.websocket").setLevel(logging.WARNING)


# --------------------------------------------------------------------------- orchestration
class _Proc:
    """A ``multiprocessing`` child with a command pipe."""

    def __init__(self, ctx: Any, target: Any, args: tuple[Any, ...]) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(*args[:2], child, *args[2:]), daemon=True)
        self.proc.start()

    def ask(self, *command: Any, timeout: float = 120) -> Any:
        self.conn.send(command)
        return self.recv(timeout)

    def recv(self, timeout: float = 120) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"no answer from {self.proc.name}")
        return self.conn.recv()

    def stop(self, command: tuple[Any, ...], timeout: float = 20) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(Exception):
                self.conn.send(command)
            self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


def _session(kind: str, clients: int, phases: list[dict[str, Any]],
             compression: str | None) -> dict[str, Any]:
    """One server and one client process, running ``phases`` in order.

    A phase with ``stalled`` first adds the stalled client (and drops it after), so
    healthy and stalled phases alternate on the same server and connections.
    """
    ctx = multiprocessing.get_context("spawn")
    delivered = ctx.RawValue("q", 0)
    port = free_port()
    server = _Proc(ctx, server_main, (kind, port, delivered))
    client_proc: _Proc | None = None
    try:
        wait_for(lambda: port_open(port), 30, f"{kind} server")
        path = "/ws/*" if kind == "flowtrace" else "/ws"
        client_proc = _Proc(ctx, _clients_entry,
                            (f"ws://127.0.0.1:{port}{path}", clients, False, delivered,
                             compression))
        ready = client_proc.recv(120)
        if ready[0] != "ready" or ready[1] != clients:
            raise RuntimeError(f"clients not ready: {ready}")
        answer = server.ask("wait_subscribed", clients)
        out: dict[str, Any] = {"event_bytes": answer[2], "phases": []}
        for params in phases:
            if params.get("stalled"):
                client_proc.ask("stall")
                server.ask("wait_subscribed", clients + 1)
            client_proc.ask("reset")
            base, steal = delivered.value, HostSteal()
            if params["kind"] == "throughput":
                result = server.ask("throughput", params["duration"], params["warmup"],
                                    clients, params["window"], bool(params.get("stalled")),
                                    timeout=params["duration"] + MAX_STALLED_S + 60)[1]
            else:
                result = server.ask("paced", params["rate"], params["duration"],
                                    timeout=params["duration"] + 60)[1]
            result["host_steal_pct"] = steal.percent()
            quiet = server.ask("quiesce", base + clients * result["published"], timeout=90)[1]
            report = client_proc.ask("report")[1]
            if params.get("stalled"):
                client_proc.ask("unstall")
            counts = report["counts"]
            result.update({
                "phase": params["name"],
                "client_cpu_util": report["cpu_util"],
                "latency": report["latency_ns"],
                "per_client_min": min(counts), "per_client_max": max(counts),
                "clients_open": report["open"],
                "server": quiet,
            })
            out["phases"].append(result)
        return out
    finally:
        if client_proc is not None:
            client_proc.stop(("close",))
        server.stop(("stop",))


def _clients_entry(url: str, n: int, conn: Any, stalled: bool, delivered: Any,
                   compression: str | None) -> None:
    run_clients(url, n, stalled, conn, delivered, compression=compression)


def run(quick: bool = False, clients: int = 100, compression: str | None = "deflate",
        rate: float = 100.0) -> dict[str, Any]:
    duration, warmup = (2.0, 1.0) if quick else (4.0, 1.0)
    healthy = {"name": "healthy", "kind": "throughput", "duration": duration, "warmup": warmup,
               "window": WINDOW}
    # The stalled client first fills the kernel's socket buffers (~4 MB on loopback)
    # and only then its server-side queue: the phase runs from its connection until
    # past the moment the server dealt with it (dropped for it, or disconnected it).
    stalled = {**healthy, "name": "stalled", "stalled": True, "warmup": 0.0}
    paced = {"name": "paced", "kind": "paced", "rate": rate, "duration": duration}
    # Each stalled phase sits between two healthy ones and is compared with them, and the
    # servers take turns (see the module doc): the host's speed may drift within a minute
    # by more than what is measured.
    # A session's first seconds are slower (its run store and ring still filling, ~10 %
    # for flowtrace): a healthy phase that is not counted comes first.
    warm_up = {**healthy, "name": "warm-up"}
    phases = [warm_up, healthy, stalled, healthy]
    kinds = ("raw", "flowtrace")
    rounds = 1 if quick else ROUNDS
    sessions: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    for round_ in range(rounds):
        last = round_ == rounds - 1
        for kind in kinds:
            print(f"  fanout: {kind} ({clients} clients, compression={compression or 'none'}, "
                  f"round {round_ + 1}/{rounds})", flush=True)
            sessions[kind].append(
                _session(kind, clients, [*phases, paced] if last else phases, compression))

    def mean_of(kind: str, name: str, key: str) -> float:
        return _phase_mean(sessions[kind], name, key)

    def first(kind: str, name: str) -> dict[str, Any]:
        return next(p for p in sessions[kind][0]["phases"] if p["phase"] == name)

    throughput = {k: mean_of(k, "healthy", "deliveries_per_s") for k in kinds}
    paced_runs = {k: next(p for p in sessions[k][-1]["phases"] if p["phase"] == "paced")
                  for k in kinds}
    round_ratios = [_phase_mean([f], "healthy", "deliveries_per_s")
                    / _phase_mean([r], "healthy", "deliveries_per_s")
                    for r, f in zip(sessions["raw"], sessions["flowtrace"], strict=True)]
    summary = {
        "clients": clients,
        "compression": compression or "none",
        "event_bytes": sessions["flowtrace"][0]["event_bytes"],
        "deliveries_per_s": throughput,
        "events_per_s": {k: v / clients for k, v in throughput.items()},
        "ratio_vs_raw": median(round_ratios),
        "ratio_vs_raw_per_round": round_ratios,
        "with_stalled_deliveries_per_s": {
            k: mean_of(k, "stalled", "deliveries_per_s") for k in kinds},
        "stalled_vs_healthy": {
            k: median(_stalled_vs_neighbours(s["phases"], _deliveries) for s in sessions[k])
            for k in kinds},
        "server_cpu_util": {k: mean_of(k, "healthy", "server_cpu_util") for k in kinds},
        "client_cpu_util": {k: mean_of(k, "healthy", "client_cpu_util") for k in kinds},
        "stalled_vs_healthy_per_cpu": {
            k: median(_stalled_vs_neighbours(s["phases"], _deliveries_per_cpu)
                     for s in sessions[k])
            for k in kinds},
        "stall_hit_after_s": {k: first(k, "stalled")["stall_hit_after_s"] for k in kinds},
        "stalled_client_outcome": {k: first(k, "stalled")["server"] for k in kinds},
        "latency_rate_events_per_s": rate,
        "latency_ms": {k: paced_runs[k]["latency"] for k in kinds},
        "latency_delivered_fraction": {
            k: paced_runs[k]["per_client_min"] / max(1, paced_runs[k]["published"])
            for k in kinds},
    }
    targets = {
        "fanout: flowtrace >= 0.8x raw ceiling": summary["ratio_vs_raw"] >= 0.8,
        "fanout: with a stalled client, healthy keep >= 0.9x":
            summary["stalled_vs_healthy"]["flowtrace"] >= 0.9,
    }
    return {"summary": summary, "targets": targets, "sessions": sessions}


def _deliveries(phase: dict[str, Any]) -> float:
    return float(phase["deliveries_per_s"])


def _deliveries_per_cpu(phase: dict[str, Any]) -> float:
    return float(phase["deliveries_per_s"]) / float(phase["server_cpu_util"])


def _stalled_vs_neighbours(phases: list[dict[str, Any]],
                           rate: Callable[[dict[str, Any]], float]) -> float:
    """The mean over stalled phases of each one's rate over the mean of the healthy phases
    just before and after it."""
    return fmean(rate(p) / ((rate(phases[i - 1]) + rate(phases[i + 1])) / 2)
                 for i, p in enumerate(phases) if p["phase"] == "stalled")


def _phase_mean(sessions: list[dict[str, Any]], name: str, key: str) -> float:
    """The mean of ``key`` over the phases called ``name`` of ``sessions``."""
    return fmean(p[key] for s in sessions for p in s["phases"] if p["phase"] == name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--compression", choices=["deflate", "none"], default="deflate")
    parser.add_argument("--rate", type=float, default=100.0)
    args = parser.parse_args(argv)
    result = run(args.quick, args.clients, None if args.compression == "none" else "deflate",
                 args.rate)
    print(json.dumps(result["summary"], indent=2))
    print(json.dumps(result["targets"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
