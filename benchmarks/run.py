"""``make bench``: every benchmark, a table, and ``benchmarks/results.json``.

    python -m benchmarks.run [--quick] [--only overhead,instructions,broker,fanout,fleet,memory]
                             [--output PATH]

Each benchmark measures its baselines in the same run (bare taskiq, taskiq's own
OpenTelemetry + Prometheus middlewares, a raw Starlette broadcaster), so the ratios
compare like with like on this machine, now. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS_PATH,
    HostSteal,
    flowtrace_location,
    machine,
    table,
    write_json,
)

BENCHMARKS = ("overhead", "instructions", "broker", "fanout", "fleet", "memory")
NEEDS = {"psutil": "taskiq's OpenTelemetryMiddleware (taskiq[opentelemetry])",
         "websockets": "the WebSocket clients", "prometheus_client": "PrometheusMiddleware"}


def _missing() -> list[str]:
    return [f"{name} ({why})" for name, why in NEEDS.items()
            if importlib.util.find_spec(name) is None]


def _overhead_table(o: dict[str, Any]) -> str:
    med, cpu = o["median"]["per_s"], o["median"]["per_cpu_s"]
    paired, paired_cpu = o["ratios"]["per_s"], o["ratios"]["per_cpu_s"]
    rows = []
    for workload, unit in (("noop", "tasks/s"), ("work_1ms", "tasks/s"),
                           ("pipeline3", "pipelines/s"), ("noop_otlp", "tasks/s")):
        for variant in med:
            if workload not in med[variant]:
                continue  # a workload the variant does not run (overhead.NOT_RUN)
            ratio, ratio_cpu = paired[workload][variant], paired_cpu[workload][variant]
            rows.append([workload, variant, f"{med[variant][workload]:,.0f} {unit}",
                         f"{cpu[variant][workload]:,.0f}", f"{ratio['bare']:.2f}x",
                         f"{ratio['otel_prom']:.2f}x", f"{ratio_cpu['otel_prom']:.2f}x"])
    return table(rows, ["workload", "variant", "median (wall)", "per CPU-second", "vs bare",
                        "vs otel+prom", "vs otel+prom (CPU)"])


def _broker_table(b: dict[str, Any]) -> str:
    med, cpu = b["median"]["per_s"], b["median"]["per_cpu_s"]
    paired = b["ratios"]["per_s"]
    rows = [[variant, f"{med[variant]:,.0f} tasks/s", f"{cpu[variant]:,.0f}",
             f"{paired[variant]['bare']:.2f}x", f"{paired[variant]['otel_prom']:.2f}x"]
            for variant in med]
    return table(rows, ["variant", "median (wall)", "per worker CPU-second", "vs bare",
                        "vs otel+prom"])


def _fanout_table(f: dict[str, Any]) -> str:
    s = f["summary"]
    rows = []
    for kind in ("raw", "flowtrace"):
        lat = s["latency_ms"][kind]
        rows.append([kind, f"{s['deliveries_per_s'][kind]:,.0f}",
                     f"{s['deliveries_per_s'][kind] / max(1e-9, s['server_cpu_util'][kind]):,.0f}",
                     f"{s['server_cpu_util'][kind]:.0%}", f"{s['client_cpu_util'][kind]:.0%}",
                     f"{s['stalled_vs_healthy'][kind]:.2f}x",
                     f"{lat.get('p50_ms', float('nan')):.1f}",
                     f"{lat.get('p99_ms', float('nan')):.1f}"])
    return table(rows, ["server", "deliveries/s", "per server CPU-s", "server CPU",
                        "clients CPU", "w/ stalled", "p50 ms", "p99 ms"])


def _summary_table(results: dict[str, Any]) -> str:
    rows: list[list[Any]] = []
    o = results.get("overhead")
    if o:
        noop, noop_cpu = o["ratios"]["per_s"]["noop"], o["ratios"]["per_cpu_s"]["noop"]
        flowtrace = noop["flowtrace"]
        rows.append(["overhead: noop, flowtrace vs otel+prom", "≥ 2.0x",
                     f"{flowtrace['otel_prom']:.2f}x "
                     f"(CPU {noop_cpu['flowtrace']['otel_prom']:.2f}x)",
                     _met(o["targets"], "2.0x")])
        rows.append(["overhead: noop, flowtrace vs bare", "≥ 0.5x",
                     f"{flowtrace['bare']:.2f}x (CPU {noop_cpu['flowtrace']['bare']:.2f}x)",
                     _met(o["targets"], "0.5x")])
        if "flowtrace_no_hook" in noop:
            no_hook = noop["flowtrace_no_hook"]
            rows.append(["overhead: noop, flowtrace without a hook vs otel+prom / bare", "-",
                         f"{no_hook['otel_prom']:.2f}x / {no_hook['bare']:.2f}x", "-"])
        if "floor" in noop:
            rows.append(["overhead: noop, the contract's work written flat "
                         "(benchmarks/floor.py) vs bare", "-",
                         f"{noop['floor']['bare']:.2f}x (flowtrace "
                         f"{flowtrace['floor']:.2f}x of it)", "-"])
        lost = [o["info"].get(v, {}).get("hook_dropped") for v in ("flowtrace",
                                                                      "flowtrace_sync_hook")]
        if None not in lost:
            rows.append(["overhead: hook events lost, async hook / sync hook", "0",
                         f"{lost[0]:,} / {lost[1]:,}", "yes" if not any(lost) else "NO"])
        otlp = o["ratios"]["per_s"].get("noop_otlp", {}).get("flowtrace")
        if otlp:
            rows.append(["overhead: noop, spans encoded to OTLP, flowtrace vs otel+prom", "-",
                         f"{otlp['otel_prom']:.2f}x "
                         f"({o['median']['per_s']['flowtrace']['noop_otlp']:,.0f} tasks/s)", "-"])
    i = results.get("instructions")
    if i and "ratios" in i:
        per_task = i["instructions_per_task"]
        rows.append(["instructions per no-op task (valgrind): flowtrace vs otel+prom, bare",
                     "-", f"{per_task['flowtrace']:,.0f} vs {per_task['otel_prom']:,.0f}, "
                     f"{per_task['bare']:,.0f} ({i['ratios']['flowtrace_vs_otel_prom']:.2f}x, "
                     f"{i['ratios']['flowtrace_vs_bare']:.2f}x)", "-"])
        encoded = i.get("otlp_encoded")
        if encoded:
            per_task = encoded["instructions_per_task"]
            rows.append(["instructions, spans encoded to OTLP: flowtrace vs otel+prom", "-",
                         f"{per_task['flowtrace']:,.0f} vs {per_task['otel_prom']:,.0f} "
                         f"({encoded['ratios']['flowtrace_vs_otel_prom']:.2f}x)", "-"])
        floor = i.get("floor")
        if floor:
            rows.append(["instructions per no-op task: the contract's work written flat", "-",
                         f"{floor['instructions_per_task']:,.0f} ({floor['floor_vs_bare']:.2f}x"
                         f" bare; flowtrace adds {floor['flowtrace_over_floor']:,.0f})", "-"])
        for part, count in i.get("parts_per_task", {}).items():
            rows.append([f"instructions per no-op task: {part}", "-", f"{count:,.0f}", "-"])
    elif i:
        rows.append(["instructions per no-op task (valgrind)", "-", i["skipped"], "-"])
    b = results.get("broker")
    if b:
        redis_rows = (("flowtrace", "flowtrace"),
                      ("flowtrace_in_process", "flowtrace with its events kept in process,"))
        for variant, what in redis_rows:
            ratios = b["ratios"]["per_s"].get(variant)
            if ratios:
                rows.append([f"overhead on Redis: noop, {what} vs otel+prom / bare", "-",
                             f"{ratios['otel_prom']:.2f}x / {ratios['bare']:.2f}x "
                             f"({b['median']['per_s'][variant]:,.0f} tasks/s)", "-"])
    f = results.get("fanout")
    if f:
        s = f["summary"]
        cpu_ratio = ((s["deliveries_per_s"]["flowtrace"] / s["server_cpu_util"]["flowtrace"])
                     / (s["deliveries_per_s"]["raw"] / s["server_cpu_util"]["raw"]))
        rows.append(["fan-out: flowtrace vs raw ceiling", "≥ 0.8x",
                     f"{s['ratio_vs_raw']:.2f}x (per CPU-s {cpu_ratio:.2f}x)",
                     _met(f["targets"], "0.8x")])
        rows.append(["fan-out: healthy clients with a stalled one", "≥ 0.9x",
                     f"{s['stalled_vs_healthy']['flowtrace']:.2f}x "
                     f"(raw {s['stalled_vs_healthy']['raw']:.2f}x)",
                     _met(f["targets"], "0.9x")])
    fl = results.get("fleet")
    if fl:
        s = fl["summary"]
        rows.append(["fleet: p99 end-to-end latency", "< 50 ms",
                     f"{s['latency_ms'].get('p99_ms', float('nan')):.1f} ms "
                     f"(p50 {s['latency_ms'].get('p50_ms', float('nan')):.1f} ms, "
                     f"host steal {_percent(s.get('host_steal_pct'))})",
                     _met(fl["targets"], "p99")])
        rows.append(["fleet: loss per client", "0",
                     f"{s['lost_per_client']['max']} of {s['published']:,}",
                     _met(fl["targets"], "loss")])
    m = results.get("memory")
    if m:
        s = m["summary"]
        per = ", ".join(f"{v:.0f} KiB ({k})" for k, v in s["rss_per_idle_connection_kib"].items())
        rows.append(["memory: RSS per idle WebSocket", "-", per, "-"])
        rows.append([f"memory: gateway RSS after {s['runs']:,} runs", "bounded",
                     f"{s['gateway_rss_end_mib']:.0f} MiB (start {s['gateway_rss_start_mib']:.0f}"
                     f", 2nd half +{s['gateway_rss_growth_second_half_mib']:.1f})",
                     _met(m["targets"], "bounded")])
    return table(rows, ["target", "wanted", "measured", "met"])


def _met(targets: dict[str, bool], key: str) -> str:
    for name, ok in targets.items():
        if key in name:
            return "yes" if ok else "NO"
    return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs (about 2 minutes)")
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help="comma-separated subset of " + ",".join(BENCHMARKS))
    parser.add_argument("--output", type=Path, default=RESULTS_PATH)
    args = parser.parse_args(argv)
    missing = _missing()
    if missing:
        print("missing: " + "; ".join(missing) + "\n  pip install psutil websockets "
              "prometheus-client", file=sys.stderr)
        return 2
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(chosen) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    started = time.monotonic()
    results: dict[str, Any] = {
        "machine": machine(),
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None
                                                          else sys.argv[1:]),
        "quick": args.quick,
        "flowtrace": flowtrace_location(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    load = _loadavg()
    if load is not None:
        results["machine"]["loadavg_at_start"] = load
    for name in chosen:
        module = importlib.import_module(f"benchmarks.{name}")
        print(f"== {name}", flush=True)
        t, steal = time.monotonic(), HostSteal()
        results[name] = module.run(args.quick)
        results[name]["seconds"] = time.monotonic() - t
        results[name]["host_steal_pct"] = steal.percent()
        write_json(args.output, results)  # partial results survive a later failure
    results["seconds"] = time.monotonic() - started
    load = _loadavg()
    if load is not None:
        results["machine"]["loadavg_at_end"] = load
    write_json(args.output, results)
    m = results["machine"]
    print(f"\nmachine: {m['nproc']} CPUs, {m['cpu']}, Python {m['python']}, "
          f"load average {m.get('loadavg_at_start')} -> {m.get('loadavg_at_end')}")
    print("host steal (CPU time the hypervisor gave to other guests): " + ", ".join(
        f"{name} {_percent(results[name]['host_steal_pct'])}" for name in chosen))
    if "overhead" in results:
        print("\nWorker overhead (InMemoryBroker, medians of "
              f"{results['overhead']['samples_per_cell']} samples; ratios: medians of "
              "sample-by-sample ratios)")
        print(_overhead_table(results["overhead"]))
    if "broker" in results:
        print(f"\nWorker overhead on Redis (a taskiq worker process, RedisStreamBroker, "
              f"{results['broker']['size']:,} no-op tasks per sample, medians of "
              f"{results['broker']['samples_per_cell']} samples)")
        print(_broker_table(results["broker"]))
    if "fanout" in results:
        s = results["fanout"]["summary"]
        print(f"\nWebSocket fan-out ({s['clients']} clients, {s['event_bytes']} B events, "
              f"compression {s['compression']}; latency at {s['latency_rate_events_per_s']:.0f}"
              " events/s)")
        print(_fanout_table(results["fanout"]))
    print("\nTargets")
    print(_summary_table(results))
    print(f"\n{args.output} written ({results['seconds']:.0f} s)")
    return 0


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} %"


def _loadavg() -> list[float] | None:
    try:
        return [round(load, 2) for load in os.getloadavg()]  # as /proc/loadavg prints them
    except OSError:  # the platform has no load average
        return None


if __name__ == "__main__":
    sys.exit(main())
