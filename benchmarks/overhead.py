"""Worker overhead: tasks/s on taskiq's InMemoryBroker with and without instrumentation.

Variants (each in its own process, so that global state — the OpenTelemetry tracer
provider, prometheus_client's registry and its multiprocess mode — never leaks from one
variant into another):

- ``bare``: taskiq alone.
- ``otel_prom``: taskiq's ``OpenTelemetryMiddleware`` + ``PrometheusMiddleware``, an SDK
  ``TracerProvider`` with a span processor to an ``InMemorySpanExporter``.
- ``flowtrace``: ``flowtrace.instrument(broker, hooks=...)`` with the same provider
  (installed globally, so flowtrace uses it as is), events on the default in-memory
  transport, and a ``HookManager`` with one trivial async hook.
- ``flowtrace_sync_hook``: the same with a trivial *sync* hook (run on a thread).
- ``flowtrace_no_hook``: ``flowtrace.instrument(broker)`` as it comes, with no hook (the
  events still go to the in-memory transport's ring).
- ``floor``: not flowtrace but :mod:`benchmarks.floor`, a flat middleware doing for a
  plain task only what flowtrace's contract asks (the same events, span and hook as
  ``flowtrace``): what of flowtrace's cost is the contract's work, what its own code.

Ablation variants (not run by default; ``--variants``, and ``benchmarks.instructions``):
``flowtrace_no_hook`` with one part taken away, through the public API, to show where
flowtrace's time goes:

- ``flowtrace_no_tracing``: no tracer provider installed, so tracing is off (no spans).
- ``flowtrace_no_ring``: events go to a transport that keeps nothing (:class:`Discard`).
- ``flowtrace_bookkeeping``: both: what is left is labels, executions and event fields.

Span handling, for every variant that traces (``--processor``, ``--exporter``): the SDK's
``BatchSpanProcessor`` (default) or ``SimpleSpanProcessor`` (no thread: each span is
exported as it ends); an in-memory exporter that keeps every span (default, as
``InMemorySpanExporter`` does) or one that drops each batch once exported, as a network
exporter does. ``--workloads`` limits what runs (``--workloads noop`` for the ablation).

Workloads (every one kicks N messages, then awaits every result):

- ``noop``: ``async def noop(): return None``.
- ``work_1ms``: 1 ms of CPU (a busy loop): what instrumentation costs next to real work.
- ``pipeline3``: a taskiq-pipelines pipeline of three no-op steps (``PipelineMiddleware``
  in every variant); pipelines/s.
- ``noop_otlp``: ``noop`` with an exporter that also encodes every batch to OTLP protobuf,
  as the OTLP exporters do before sending: what exporting the spans costs, which the
  in-memory exporter of the other workloads never pays (bare has no exporter: = noop).

The parent starts one process per variant (``--serve``) and keeps them up for the whole
run. After one warm-up run of every variant and workload, it takes ``--samples`` slots per
workload: a slot asks every variant for one sample in turn (the order rotated from slot to
slot), so the samples of a slot lie seconds apart. A cell's rate is the median of its
samples; a ratio of two variants is the median of their slot-by-slot ratios: on a shared
host a slow minute slows both sides of each ratio instead of one variant's samples.
``--child`` measures one variant's workloads in one go (``benchmarks.instructions`` counts
such a child under valgrind).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any, cast

from benchmarks.common import (
    flowtrace_location,
    free_port,
    median,
    paired_ratio,
    python_child,
    slot_order,
    stop_process,
)

if TYPE_CHECKING:
    from taskiq import InMemoryBroker

FLOOR = "floor"
"""Not flowtrace: :mod:`benchmarks.floor`, the contract's work for a plain task written flat."""
VARIANTS = ("bare", "otel_prom", "flowtrace", "flowtrace_sync_hook", "flowtrace_no_hook", FLOOR)
ABLATION_VARIANTS = {  # variant: (tracing, ring)
    "flowtrace_no_tracing": (False, True),
    "flowtrace_no_ring": (True, False),
    "flowtrace_bookkeeping": (False, False),
}
WORKLOADS = ("noop", "work_1ms", "pipeline3", "noop_otlp")
NOT_RUN = {FLOOR: {"pipeline3"}}
"""Workloads a variant cannot run: the floor knows no pipelines (its hops would be runs)."""
SIZES = {"noop": 4000, "work_1ms": 500, "pipeline3": 500, "noop_otlp": 2000}
QUICK_SIZES = {"noop": 2000, "work_1ms": 300, "pipeline3": 300, "noop_otlp": 1000}
SAMPLES = 9
"""Samples per variant and workload (slots: each slot measures every variant once)."""
QUICK_SAMPLES = 3
WINDOW = 100
"""Messages in flight at most: taskiq's worker default ``--max-async-tasks``."""


def warm_up_size(n: int) -> int:
    """Tasks of the warm-up run before a workload of ``n`` is measured."""
    return max(100, n // 5)

# --------------------------------------------------------------------------- child
class _Counter:
    def __init__(self) -> None:
        self.events = 0


class AsyncHook(_Counter):
    async def on_event(self, event: Any) -> None:
        self.events += 1


class SyncHook(_Counter):
    def on_event(self, event: Any) -> None:
        self.events += 1


def _counting_hooks(sync: bool = False) -> tuple[_Counter, Any]:
    """A trivial counting hook and the ``HookManager`` that holds it."""
    from flowtrace import HookManager

    hook: _Counter = SyncHook() if sync else AsyncHook()
    hooks = HookManager()
    hooks.add_hook(hook)
    return hook, hooks


def _discarding_transport() -> Any:
    from flowtrace.transport.memory import InMemoryTransport

    class Discard(InMemoryTransport):
        """The in-memory transport without its ring: takes every event, keeps none."""

        def publish_nowait(self, event: Any) -> None:
            pass

        def publish_fields_nowait(self, fields: Any, event: Any = None) -> None:
            pass

    return Discard()


def _exporter(keep: bool) -> Any:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace.export import SpanExportResult
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    class Exporter(InMemorySpanExporter):
        """Keeps spans in memory (``keep``, the in-memory exporter's way) or drops them once
        exported, as a network exporter does; with ``encode`` set, first encodes each batch
        to OTLP protobuf bytes as the OTLP exporters do (everything but the network)."""

        encode = False
        exported = 0

        def export(self, spans: Any) -> Any:
            self.exported += len(spans)
            if self.encode:
                encode_spans(spans).SerializeToString()
            return super().export(spans) if keep else SpanExportResult.SUCCESS

        def clear(self) -> None:
            self.exported = 0
            super().clear()

    return Exporter()


def span_provider(processor: str, exporter_mode: str) -> tuple[Any, Any]:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    exporter = _exporter(exporter_mode == "keep")
    provider = TracerProvider()
    if processor == "simple":
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider, exporter


def otel_prom_middlewares(provider: Any, metrics_dir: str | None) -> list[Any]:
    """taskiq's ``OpenTelemetryMiddleware`` with ``provider``, and its
    ``PrometheusMiddleware`` keeping its metrics in ``metrics_dir`` (multiprocess mode;
    None: a kicker, which counts nothing). PrometheusMiddleware starts its HTTP server only
    in a worker process (``broker.is_worker_process``); a free port is given anyway."""
    from pathlib import Path

    from taskiq.middlewares import PrometheusMiddleware
    from taskiq.middlewares.opentelemetry_middleware import OpenTelemetryMiddleware

    middlewares: list[Any] = [OpenTelemetryMiddleware(tracer_provider=provider)]
    if metrics_dir is not None:
        middlewares.append(PrometheusMiddleware(metrics_path=Path(metrics_dir),
                                                server_port=free_port(),
                                                server_addr="127.0.0.1"))
    return middlewares


def _build(variant: str, processor: str, metrics_dir: str,
           exporter_mode: str = "keep") -> tuple[InMemoryBroker, Any, Any, Any, Any]:
    """(broker, provider, exporter, hook, middleware); None where a variant has none."""
    from taskiq import InMemoryBroker
    from taskiq_pipelines import PipelineMiddleware

    broker = InMemoryBroker(max_stored_results=-1)
    if variant == "bare":
        broker.add_middlewares(PipelineMiddleware())
        return broker, None, None, None, None
    provider, exporter = span_provider(processor, exporter_mode)
    if variant == "otel_prom":
        broker.add_middlewares(PipelineMiddleware(), *otel_prom_middlewares(provider, metrics_dir))
        return broker, provider, exporter, None, None
    from opentelemetry import trace

    import flowtrace

    if variant == FLOOR:
        from benchmarks.floor import FloorMiddleware
        from flowtrace.transport.memory import InMemoryTransport

        trace.set_tracer_provider(provider)
        hook, hooks = _counting_hooks()
        floor = FloorMiddleware(provider, hooks, InMemoryTransport())
        broker.add_middlewares(floor, PipelineMiddleware())  # first, where flowtrace sits
        return broker, provider, exporter, hook, floor
    broker.add_middlewares(PipelineMiddleware())
    if variant in ABLATION_VARIANTS:
        tracing, ring = ABLATION_VARIANTS[variant]
        if tracing:
            trace.set_tracer_provider(provider)
        else:  # no provider installed, nor one built from the environment's OTEL_* settings
            os.environ["OTEL_TRACES_EXPORTER"] = "none"
            provider = exporter = None
        transport = None if ring else _discarding_transport()
        return broker, provider, exporter, None, flowtrace.instrument(broker, transport=transport)
    trace.set_tracer_provider(provider)  # an installed SDK provider is used as is
    if variant == "flowtrace_no_hook":
        return broker, provider, exporter, None, flowtrace.instrument(broker)
    hook, hooks = _counting_hooks(sync=variant == "flowtrace_sync_hook")
    middleware = flowtrace.instrument(broker, hooks=hooks)
    return broker, provider, exporter, hook, middleware


async def _drain(broker: Any) -> None:
    """Wait until every task the broker started (including later pipeline hops) ended."""
    running = broker._running_tasks
    while running:
        await asyncio.gather(*list(running), return_exceptions=True)


async def _kick_windowed(kick: Any, n: int, broker: Any, window: int) -> list[str]:
    """Kick ``n`` messages keeping at most ``window`` in flight, like a worker's
    ``--max-async-tasks`` (default 100); returns the ids whose results to check."""
    running = broker._running_tasks
    ids = []
    for _ in range(n):
        ids.append((await kick()).task_id)
        if window and len(running) >= window:
            await asyncio.wait(list(running), return_when=asyncio.FIRST_COMPLETED)
    await _drain(broker)
    return ids


async def _hooks_caught_up(hook: Any, hooks: Any, expected: int, timeout: float = 60) -> None:
    """Hooks run after the task, off its path; the measurement waits for them too."""
    deadline = time.perf_counter() + timeout
    while hook.events + hooks.dropped < expected:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"hooks saw {hook.events} of {expected} events")
        await asyncio.sleep(0.0005)


class _Bench:
    """One variant's broker, tasks and instruments, measuring a workload when asked."""

    def __init__(self, variant: str, processor: str, exporter_mode: str, window: int) -> None:
        self.variant, self.window = variant, window
        self.metrics_dir = tempfile.mkdtemp(prefix="flowtrace-bench-prom-")
        (self.broker, self.provider, self.exporter, self.hook,
         self.middleware) = _build(variant, processor, self.metrics_dir, exporter_mode)
        broker = self.broker

        @broker.task(task_name="noop")
        async def noop() -> None:
            return None

        @broker.task(task_name="work_1ms")
        async def work_1ms() -> None:
            end = time.perf_counter() + 0.001
            while time.perf_counter() < end:
                pass

        @broker.task(task_name="step")
        async def step(value: int = 0) -> int:
            return value + 1

        self.tasks = {"noop": noop, "work_1ms": work_1ms, "noop_otlp": noop}
        self.step = step

    async def measure(self, workload: str, n: int) -> dict[str, Any]:
        """Kick ``n`` messages of ``workload`` and wait for everything they cause: results,
        hook calls and the export of their spans."""
        from taskiq_pipelines import Pipeline

        broker, exporter, hook, middleware = (self.broker, self.exporter, self.hook,
                                              self.middleware)
        backend = broker.result_backend
        backend.results.clear()
        if exporter is not None:
            exporter.clear()
            exporter.encode = workload == "noop_otlp"
        events_before = hook.events if hook is not None else 0
        transport = middleware.transport if middleware is not None else None
        published_before = getattr(transport, "_seq", 0)  # the in-memory ring's count
        start, cpu_start = time.perf_counter(), time.process_time()
        if workload == "pipeline3":
            pipe: Pipeline[Any, Any] = (
                Pipeline(broker, self.step).call_next(self.step).call_next(self.step))
            ids = await _kick_windowed(lambda: pipe.kiq(0), n, broker, self.window)
        else:
            ids = await _kick_windowed(self.tasks[workload].kiq, n, broker, self.window)
        if middleware is not None and hook is not None:
            published = middleware.transport._seq - published_before
            await _hooks_caught_up(hook, middleware.hooks, events_before + published)
        if self.provider is not None:
            self.provider.force_flush()  # the spans' export is part of the work measured
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
        self._check(workload, ids)
        return {
            "per_s": n / elapsed,
            "per_cpu_s": n / cpu,
            "spans_per_item": (exporter.exported / n) if exporter else 0,
            "hook_events_per_item": ((hook.events - events_before) / n) if hook else 0,
        }

    def _check(self, workload: str, ids: list[str]) -> None:
        results = self.broker.result_backend.results
        missing = [i for i in ids if i not in results]
        errors = sum(1 for i in ids if i in results and results[i].is_err)
        if missing or errors:
            raise RuntimeError(f"{self.variant}/{workload}: {len(missing)} results missing, "
                               f"{errors} failed")
        if workload == "pipeline3":
            finals = {results[i].return_value for i in ids}
            if finals != {3}:
                raise RuntimeError(f"pipeline results {finals}")

    def info(self) -> dict[str, Any]:
        """What the variant lost and which flowtrace it measured."""
        middleware = self.middleware
        if middleware is None:
            return {}
        info: dict[str, Any] = {"flowtrace": flowtrace_location(),
                                "dropped": dict(middleware.transport.dropped)}
        if middleware.hooks is not None:
            info["hook_dropped"] = middleware.hooks.dropped
        return info

    async def __aenter__(self) -> _Bench:
        await self.broker.startup()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.broker.shutdown()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)


async def _once(variant: str, processor: str, workloads: list[str], sizes: dict[str, int],
                reps: int, window: int, exporter_mode: str) -> dict[str, Any]:
    """Every workload measured ``reps`` times after a warm-up, in one go
    (``benchmarks.instructions`` counts such a child's instructions under valgrind)."""
    results: dict[str, Any] = {}
    async with _Bench(variant, processor, exporter_mode, window) as bench:
        for workload in workloads:
            n = sizes[workload]
            await bench.measure(workload, warm_up_size(n))
            samples = [await bench.measure(workload, n) for _ in range(reps)]
            results[workload] = {**samples[-1], "per_s": [s["per_s"] for s in samples],
                                 "per_cpu_s": [s["per_cpu_s"] for s in samples]}
        return {**results, **bench.info()}


async def _serve(variant: str, processor: str, exporter_mode: str, window: int) -> None:
    """The child's loop: one JSON request per stdin line (``{"workload": w, "n": n}``), one
    JSON answer per stdout line; at end of input, the variant's :meth:`_Bench.info`."""
    async with _Bench(variant, processor, exporter_mode, window) as bench:
        print(json.dumps({"ready": variant}), flush=True)
        # A blocking read: nothing of the variant runs between two measurements.
        for line in sys.stdin:
            request = json.loads(line)
            print(json.dumps(await bench.measure(request["workload"], request["n"])),
                  flush=True)
        print(json.dumps(bench.info()), flush=True)


# --------------------------------------------------------------------------- parent
class _Child:
    """A variant's :func:`_serve` process, up for the whole run, asked for one sample at a time."""

    def __init__(self, variant: str, processor: str, exporter: str) -> None:
        self.variant = variant
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
        self.proc = python_child(
            ["-m", "benchmarks.overhead", "--serve", variant, "--processor", processor,
             "--exporter", exporter], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.stderr)

    def _answer(self, timeout: float) -> Any:
        stdout = self.proc.stdout
        assert stdout is not None
        readable, _, _ = select.select([stdout], [], [], timeout)
        line = stdout.readline() if readable else b""
        if not line:
            self.stderr.seek(0)
            tail = self.stderr.read().decode(errors="replace")[-4000:]
            raise RuntimeError(f"overhead child {self.variant}: no answer within {timeout} s "
                               f"(exit code {self.proc.poll()}):\n{tail}")
        return json.loads(line)

    def ready(self) -> None:
        self._answer(120)

    def measure(self, workload: str, n: int) -> dict[str, Any]:
        stdin = self.proc.stdin
        assert stdin is not None
        stdin.write(json.dumps({"workload": workload, "n": n}).encode() + b"\n")
        stdin.flush()
        return cast(dict[str, Any], self._answer(600))

    def finish(self) -> dict[str, Any]:
        """End of input: the child answers with its :meth:`_Bench.info` and exits."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        info = cast(dict[str, Any], self._answer(60))
        self.proc.wait(60)
        return info

    def stop(self) -> None:
        stop_process(self.proc)
        self.stderr.close()


def run(quick: bool = False, variants: tuple[str, ...] = VARIANTS,
        processor: str = "batch", samples: int | None = None,
        exporter: str = "keep", workloads: tuple[str, ...] = WORKLOADS) -> dict[str, Any]:
    samples = samples or (QUICK_SAMPLES if quick else SAMPLES)
    sizes = QUICK_SIZES if quick else SIZES
    metrics = ("per_s", "per_cpu_s")
    runs = {v: [w for w in workloads if w not in NOT_RUN.get(v, ())] for v in variants}
    rates: dict[str, dict[str, dict[str, list[float]]]] = {
        m: {v: {w: [] for w in runs[v]} for v in variants} for m in metrics}
    info: dict[str, dict[str, Any]] = {v: {} for v in variants}
    children = {v: _Child(v, processor, exporter) for v in variants}
    try:
        for child in children.values():
            child.ready()
        for variant, child in children.items():
            for workload in runs[variant]:
                child.measure(workload, warm_up_size(sizes[workload]))
        for workload in workloads:
            takers = [v for v in variants if workload in runs[v]]
            for slot in range(samples):
                print(f"  overhead {workload} {slot + 1}/{samples}", file=sys.stderr)
                for variant in slot_order(takers, slot):
                    result = children[variant].measure(workload, sizes[workload])
                    for metric in metrics:
                        rates[metric][variant][workload].append(result[metric])
                    info[variant][workload] = {key: result[key] for key in
                                               ("spans_per_item", "hook_events_per_item")}
        for variant, child in children.items():
            info[variant].update(child.finish())
    finally:
        for child in children.values():
            child.stop()
    baselines = [b for b in ("bare", "otel_prom", FLOOR) if b in variants]
    ratios = {m: {w: {v: {b: paired_ratio(rates[m][v][w], rates[m][b][w]) for b in baselines
                          if w in runs[b]}
                      for v in variants if w in runs[v]}
                  for w in workloads}
              for m in metrics}
    targets = {}
    if {"bare", "otel_prom", "flowtrace"} <= set(variants) and "noop" in workloads:
        noop = ratios["per_s"]["noop"]["flowtrace"]
        targets = {
            "overhead: noop flowtrace >= 2.0x otel_prom": noop["otel_prom"] >= 2.0,
            "overhead: noop flowtrace >= 0.5x bare": noop["bare"] >= 0.5,
        }
    return {
        "processor": processor,
        "exporter": exporter,
        "window": WINDOW,
        "sizes": sizes,
        "samples_per_cell": samples,
        "median": {m: {v: {w: median(rates[m][v][w]) for w in runs[v]} for v in variants}
                   for m in metrics},
        "samples": rates,
        "ratios": ratios,
        "info": info,
        "targets": targets,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    children = parser.add_mutually_exclusive_group()
    children.add_argument("--serve", choices=[*VARIANTS, *ABLATION_VARIANTS],
                          help="be the child measuring this variant (the parent's)")
    children.add_argument("--child", choices=[*VARIANTS, *ABLATION_VARIANTS],
                          help="measure this variant's workloads in one go (--reps each)")
    parser.add_argument("--processor", choices=["batch", "simple"], default="batch")
    parser.add_argument("--exporter", choices=["keep", "discard"], default="keep",
                        help="the in-memory exporter keeps every span, or drops each batch "
                             "once exported (as a network exporter does)")
    parser.add_argument("--sizes", default=json.dumps(SIZES))
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--window", type=int, default=WINDOW)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"also: {','.join(ABLATION_VARIANTS)}")
    parser.add_argument("--samples", type=int,
                        help=f"samples per variant and workload (default {SAMPLES})")
    args = parser.parse_args(argv)
    if args.serve or args.child:
        os.environ.setdefault("OTEL_SDK_DISABLED", "false")
    if args.serve:
        asyncio.run(_serve(args.serve, args.processor, args.exporter, args.window))
        return 0
    if args.child:
        result = asyncio.run(_once(args.child, args.processor, args.workloads.split(","),
                                   json.loads(args.sizes), args.reps, args.window,
                                   args.exporter))
        print(json.dumps(result))
        return 0
    variants = tuple(args.variants.split(","))
    workloads = tuple(args.workloads.split(","))
    print(json.dumps(run(args.quick, variants, args.processor, args.samples, args.exporter,
                         workloads), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
