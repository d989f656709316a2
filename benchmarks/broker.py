"""Worker overhead on a real broker: no-op tasks/s of a ``taskiq worker`` process on Redis.

:mod:`benchmarks.overhead` measures on the in-memory broker, where taskiq's own work per
message is all there is. Here each variant (see :mod:`benchmarks.broker_app`) has its
own ``taskiq worker --workers 1`` process on a private ``redis-server``: a
``RedisStreamBroker`` queue and a Redis result backend, the
setup of ``examples/brokers/redis_stream.py`` with taskiq-redis's default read size.
flowtrace publishes its events to the same Redis, as a fleet's workers do;
``flowtrace_in_process`` keeps them in the worker, so that the difference between the two
is what publishing costs a worker.

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
import sys
import time
from typing import Any

import psutil
from redis.asyncio import Redis

from benchmarks.broker_app import (
    VARIANT_ENV,
    VARIANTS,
    add_middlewares,
    install_span_provider,
    make_broker,
)
from benchmarks.common import (
    RedisServer,
    Workers,
    child_cwd,
    child_env,
    median,
    paired_ratio,
    process_cpu_seconds,
    slot_order,
)

SIZE, QUICK_SIZE = 3000, 1000
SAMPLES, QUICK_SAMPLES = 7, 3
RESULTS_DB = 1
"""The first results' database (one per variant): its ``DBSIZE`` is the results stored."""
TIMEOUT_S = 120.0


class _Variant:
    """A variant's ``taskiq worker`` process (stopped between samples) and the kicking
    broker that feeds it."""

    def __init__(self, variant: str, redis: RedisServer) -> None:
        self.variant = variant
        url = redis.url
        results_url = f"redis://127.0.0.1:{redis.port}/{RESULTS_DB + VARIANTS.index(variant)}"
        queue = f"flowtrace-bench-{variant}"
        self.worker = Workers(
            "benchmarks.broker_app:broker", workers=1, cwd=child_cwd(),
            env=child_env(**{VARIANT_ENV: variant, "FLOWTRACE_BENCH_REDIS": url,
                             "FLOWTRACE_BENCH_RESULTS": results_url,
                             "FLOWTRACE_BENCH_QUEUE": queue}))
        self.kicker = make_broker(url, results_url, queue)
        self.middleware = add_middlewares(self.kicker, variant, url, worker=False)
        self.results: Redis = Redis.from_url(results_url)

    async def start(self) -> None:
        await self.kicker.startup()
        await self.results.flushdb()

    def _signal(self, sig: int) -> None:
        os.killpg(self.worker.proc.pid, sig)

    def _worker_cpu_seconds(self) -> float:
        """User + system time of the worker processes (taskiq's children) so far."""
        children = psutil.Process(self.worker.proc.pid).children(recursive=True)
        return process_cpu_seconds(*(child.pid for child in children))

    async def sample(self, n: int) -> dict[str, float]:
        """Kick ``n`` messages to the stopped worker, continue it, time it until done."""
        task = self.kicker.find_task("noop")
        assert task is not None
        self._signal(signal.SIGSTOP)
        try:
            ids = [(await task.kiq()).task_id for _ in range(n)]
            if self.middleware is not None:
                await self.middleware.transport.flush()  # the kicker's events, not timed
        finally:
            cpu_before = self._worker_cpu_seconds()
            started = time.perf_counter()
            self._signal(signal.SIGCONT)
        await self._until_stored(n)
        elapsed = time.perf_counter() - started
        cpu = self._worker_cpu_seconds() - cpu_before
        await self._check(ids)
        await self.results.flushdb()
        return {"per_s": n / elapsed, "per_cpu_s": n / cpu if cpu > 0 else float("nan")}

    async def _until_stored(self, n: int) -> None:
        deadline = time.perf_counter() + TIMEOUT_S
        while await self.results.dbsize() < n:
            if time.perf_counter() > deadline or self.worker.proc.poll() is not None:
                raise RuntimeError(
                    f"broker {self.variant}: {await self.results.dbsize()} of {n} results "
                    f"(worker exit code {self.worker.proc.poll()}):\n"
                    f"{self.worker.output()[-4000:]}")
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
            if self.worker.proc.poll() is None:
                self._signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            self.worker.stop(timeout=20)
            os.unlink(self.worker.log.name)


async def _measure(variants: tuple[str, ...], n: int, samples: int) -> dict[str, Any]:
    provider = install_span_provider()
    rates: dict[str, dict[str, list[float]]] = {
        metric: {v: [] for v in variants} for metric in ("per_s", "per_cpu_s")}
    with RedisServer() as redis:
        running = [_Variant(v, redis) for v in variants]
        try:
            for variant in running:
                await variant.start()
                await variant.sample(max(100, n // 5))  # warm-up: imports, connections
            for slot in range(samples):
                print(f"  broker {slot + 1}/{samples}", file=sys.stderr)
                for variant in slot_order(running, slot):
                    for metric, value in (await variant.sample(n)).items():
                        rates[metric][variant.variant].append(value)
        finally:
            for variant in running:
                await variant.close()
            provider.shutdown()
    ratios = {metric: {v: {b: paired_ratio(rates[metric][v], rates[metric][b])
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
