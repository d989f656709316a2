"""Worker overhead in CPU instructions: a count that machine noise does not move.

Wall-clock rates on a shared (virtual) machine drift by ±20 % from one minute to the
next, so ``overhead`` interleaves variants and takes medians. This benchmark counts the
instructions the process executes instead (valgrind's cachegrind, no cache simulation):
the overhead benchmark's no-op child is run twice per variant, with N and 3N tasks, and
the difference divided by the extra tasks is the cost of one task, start-up excluded.
The counts are exact and repeat to within a fraction of a percent. They leave out what
instructions cannot show (cache misses, the kernel), which is why ``overhead`` stays the
reference; this one shows where a change helps or hurts without needing quiet hardware.

    python -m benchmarks.instructions          # needs valgrind (apt-get install valgrind)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks.common import python_child, stop_process
from benchmarks.overhead import ABLATION_VARIANTS, FLOOR, warm_up_size

VARIANTS = ("bare", "otel_prom", "flowtrace")
ABLATION = ("flowtrace_no_hook", *ABLATION_VARIANTS, FLOOR)
"""flowtrace with parts taken away (see ``benchmarks.overhead``): where its instructions go;
and the floor, the contract's work written flat (``benchmarks.floor``)."""
SIZES = (500, 1500)
_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")


def _tasks(n: int) -> int:
    """Tasks one child runs for ``n``: its warm-up plus ``n``."""
    return n + warm_up_size(n)


def _instructions(variant: str, n: int, workload: str = "noop") -> int:
    proc = python_child(
        ["-m", "benchmarks.overhead", "--child", variant, "--workloads", workload,
         "--sizes", json.dumps({workload: n}), "--reps", "1"],
        wrapper=["valgrind", "--tool=cachegrind", "--cache-sim=no",
                 "--cachegrind-out-file=/dev/null"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        raise
    text = err.decode(errors="replace")
    match = _REFS.search(text)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"{variant} under valgrind failed ({proc.returncode}):\n{text[-3000:]}")
    return int(match[1].replace(",", ""))


def run(quick: bool = False) -> dict[str, Any]:
    if shutil.which("valgrind") is None:
        return {"skipped": "valgrind is not installed (apt-get install valgrind)"}
    small, large = SIZES
    jobs = [(variant, n, "noop") for variant in VARIANTS for n in (small, large)]
    # The same with spans encoded to OTLP protobuf by the exporter (bare has none).
    jobs += [(variant, n, "noop_otlp") for variant in VARIANTS[1:] for n in (small, large)]
    jobs += [(variant, n, "noop") for variant in ABLATION for n in (small, large)]
    with ThreadPoolExecutor(2) as pool:  # one valgrind per core
        counts = dict(zip(jobs, pool.map(lambda job: _instructions(*job), jobs), strict=True))
    extra = _tasks(large) - _tasks(small)
    per_task = {v: (counts[v, large, "noop"] - counts[v, small, "noop"]) / extra
                for v in VARIANTS + ABLATION}
    encoded = {v: (counts[v, large, "noop_otlp"] - counts[v, small, "noop_otlp"]) / extra
               for v in VARIANTS[1:]}
    bare, otel, ours = per_task["bare"], per_task["otel_prom"], per_task["flowtrace"]
    no_hook = per_task["flowtrace_no_hook"]
    return {
        "tool": "valgrind --tool=cachegrind --cache-sim=no",
        "sizes": list(SIZES),
        "instructions_per_task": per_task,
        "overhead_per_task": {"otel_prom": otel - bare, "flowtrace": ours - bare},
        # As throughput ratios (higher is better for flowtrace), comparable with ``overhead``.
        "ratios": {"flowtrace_vs_otel_prom": otel / ours, "flowtrace_vs_bare": bare / ours},
        # What each part adds to a no-op task (the parts overlap a little: the rows need not
        # sum to flowtrace's overhead exactly).
        "parts_per_task": {
            "hook (one async hook: four deliveries)": ours - no_hook,
            "spans (tracing on)": no_hook - per_task["flowtrace_no_tracing"],
            "ring (the in-memory transport keeps events)": no_hook - per_task["flowtrace_no_ring"],
            "bookkeeping (labels, executions, event fields)":
                per_task["flowtrace_bookkeeping"] - bare,
        },
        # The contract's work for a plain task written flat: what flowtrace's own code adds.
        "floor": {"instructions_per_task": per_task[FLOOR], "flowtrace_over_floor":
                  ours - per_task[FLOOR], "floor_vs_bare": bare / per_task[FLOOR]},
        "otlp_encoded": {
            "instructions_per_task": encoded,
            "encoding_per_task": {v: encoded[v] - per_task[v] for v in encoded},
            "ratios": {"flowtrace_vs_otel_prom": encoded["otel_prom"] / encoded["flowtrace"],
                       "flowtrace_vs_bare": bare / encoded["flowtrace"]},
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the same (it is already short)")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.quick), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
