"""Worker overhead on a real broker: no-op tasks/s of a ``taskiq worker`` process on Redis.

:mod:`benchmarks.overhead` measures on the in-memory broker, where taskiq's own work per
message is all there is. Here each variant (bare, otel_prom, flowtrace; see
:mod:`benchmarks.broker_app`) has its own ``taskiq worker --workers 1`` process on a
private ``redis-server``: a ``RedisStreamBroker`` queue and a Redis result backend, the
setup of ``examples/brokers/redis_stream.py`` with taskiq-redis's default read size.
flowtrace publishes its events to the same Redis, as a fleet's workers do.

One sample: the worker is stopped (``SIGSTOP``), N no-op messages are kicked by a broker
with the variant's middlewares (so the messages carry what an instrumented kicker
writes), the worker is continued, and the sample is the time until the N-th result is in
Redis. The worker's rate is all that is timed; the kicking is not. Samples are taken in
slots, as in :mod:`benchmarks.overhead` (every variant once per slot, the order rotated),
and a ratio is the median of the slot-by-slot ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import psutil
from redis.asyncio import Redis

from benchmarks.broker_app import VARIANT_ENV, VARIANTS, add_middlewares, make_broker
from benchmarks.common import RedisServer, median, python_child, stop_process
from benchmarks.overhead import span_provider

SIZE, QUICK_SIZE = 3000, 1000
SAMPLES, QUICK_SAMPLES = 7, 3
RESULTS_DB = 1
"""The results' database: its ``DBSIZE`` is the number of results stored."""
TIMEOUT_S = 120.0


class _Worker:
    """One variant's ``taskiq worker`` process group, stopped between samples."""

    def __init__(self, variant: str, url: str, results_url: str, queue: str) -> None:
        self.variant = variant
        self.log = tempfile.NamedTemporaryFile(prefix=f"flowtrace-bench-{variant}-",  # noqa: SIM115
                                               suffix=".log")
        self.proc = python_child(
            ["-m", "taskiq", "worker", "benchmarks.broker_app:broker", "--workers", "1",
             "--wait-tasks-timeout", "5"],
            stdout=self.log, stderr=subprocess.STDOUT,
            env_extra={VARIANT_ENV: variant, "FLOWTRACE_BENCH_REDIS": url,
                       "FLOWTRACE_BENCH_RESULTS": results_url, "FLOWTRACE_BENCH_QUEUE": queue})

    def pause(self) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def cpu_seconds(self) -> float:
        """User + system time of the worker processes (taskiq's children) so far."""
        total = 0.0
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            times = child.cpu_times()
            total += times.user + times.system
        return total

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def stop(self) -> None:
        self.resume()  # a stopped process cannot act on SIGTERM
        stop_process(self.proc, timeout=20)
        self.log.close()


class _Variant:
    """A variant's worker and the kicking broker that feeds it."""

    def __init__(self, variant: str, redis: RedisServer, provider: Any) -> None:
        self.variant = variant
        url = redis.url
        self.results_url = f"redis://127.0.0.1:{redis.port}/{RESULTS_DB + VARIANTS.index(variant)}"
        queue = f"flowtrace-bench-{variant}"
        self.worker = _Worker(variant, url, self.results_url, queue)
        self.kicker = make_broker(url, self.results_url, queue)
        self.middleware = add_middlewares(self.kicker, variant, provider, url, worker=False)
        self.results: Redis = Redis.from_url(self.results_url)

    async def start(self) -> None:
        await self.kicker.startup()
        await self.results.flushdb()

    async def sample(self, n: int) -> dict[str, float]:
        """Kick ``n`` messages to the stopped worker, continue it, time it until done."""
        task = self.kicker.find_task("noop")
        assert task is not None
        self.worker.pause()
        try:
            ids = [(await task.kiq()).task_id for _ in range(n)]
            if self.middleware is not None:
                await self.middleware.transport.flush()  # the kicker's events, not timed
        finally:
            cpu_before = self.worker.cpu_seconds()
            started = time.perf_counter()
            self.worker.resume()
        await self._until_stored(n)
        elapsed = time.perf_counter() - started
        cpu = self.worker.cpu_seconds() - cpu_before
        await self._check(ids)
        await self.results.flushdb()
        return {"per_s": n / elapsed, "per_cpu_s": n / cpu if cpu > 0 else float("nan")}

    async def _until_stored(self, n: int) -> None:
        deadline = time.perf_counter() + TIMEOUT_S
        while await self.results.dbsize() < n:
            if time.perf_counter() > deadline or self.worker.proc.poll() is not None:
                raise RuntimeError(
                    f"broker {self.variant}: {await self.results.dbsize()} of {n} results "
                    f"(worker exit code {self.worker.proc.poll()}):\n{self.worker.output()}")
            await asyncio.sleep(0.002)

    async def _check(self, ids: list[str]) -> None:
        """Every message ran and succeeded (a sample of them read back)."""
        backend = self.kicker.result_backend
        for task_id in ids[:: max(1, len(ids) // 20)]:
            result = await backend.get_result(task_id)
            if result.is_err:
                raise RuntimeError(f"broker {self.variant}: task failed: {result.error!r}")

    async def close(self) -> None:
        try:
            await self.kicker.shutdown()
            await self.results.aclose()
        finally:
            self.worker.stop()


async def _measure(variants: tuple[str, ...], n: int, samples: int) -> dict[str, Any]:
    provider, _ = span_provider("batch", "discard")
    rates: dict[str, dict[str, list[float]]] = {
        metric: {v: [] for v in variants} for metric in ("per_s", "per_cpu_s")}
    with RedisServer() as redis:
        running = [_Variant(v, redis, provider) for v in variants]
        try:
            for variant in running:
                await variant.start()
                await variant.sample(max(100, n // 5))  # warm-up: imports, connections
            for slot in range(samples):
                print(f"  broker {slot + 1}/{samples}", file=sys.stderr)
                shift = slot % len(running)
                for variant in running[shift:] + running[:shift]:
                    result = await variant.sample(n)
                    for metric, value in result.items():
                        rates[metric][variant.variant].append(value)
        finally:
            for variant in running:
                await variant.close()
            provider.shutdown()
    ratios = {metric: {v: {b: median([a / c for a, c in zip(rates[metric][v], rates[metric][b],
                                                              strict=True)])
                           for b in ("bare", "otel_prom") if b in variants}
                       for v in variants}
              for metric in rates}
    return {
        "size": n,
        "samples_per_cell": samples,
        "median": {metric: {v: median(rates[metric][v]) for v in variants} for metric in rates},
        "samples": rates,
        "ratios": ratios,
    }


def run(quick: bool = False, variants: tuple[str, ...] = VARIANTS,
        samples: int | None = None) -> dict[str, Any]:
    return asyncio.run(_measure(variants, QUICK_SIZE if quick else SIZE,
                                samples or (QUICK_SAMPLES if quick else SAMPLES)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--samples", type=int)
    args = parser.parse_args(argv)
    print(json.dumps(run(args.quick, tuple(args.variants.split(",")), args.samples), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
