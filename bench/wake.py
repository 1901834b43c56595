#!/usr/bin/env python3
"""`make bench-wake`: waking on Render's free instance, several builds alternated.

A wake is what Render does to a stopped free instance: a new process, and at once the
request that woke it. Here each wake is a new service process in fresh cgroups
(bench/render_free.py's: BENCH_RF_CPU [0.1] CPU, BENCH_RF_MEMORY_MB [512] MB) with the
first search sent as soon as it is healthy; the CPU the process used up to that answer
(/proc/PID/stat) and the first search's latency are recorded. The builds in BENCH_BINS
(comma-separated binaries, each with libonnxruntime.so beside it or found as usual) wake
in turn, BENCH_WAKE_ROUNDS [4] times each, on one catalogue of BENCH_WAKE_PRODUCTS
[10000] products indexed once beforehand (unconstrained): the machine's noise then falls
on every build alike, and the table compares medians measured in one run.

Prints a table and writes bench/results/wake.{json,md} (BENCH_RESULTS).
"""

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import render_free as rf  # noqa: E402  (its cgroups)
import run as bench  # noqa: E402  (the shared helpers of `make bench`)

BINS = [Path(b) for b in os.environ.get("BENCH_BINS", str(bench.BIN)).split(",") if b]
ROUNDS = int(os.environ.get("BENCH_WAKE_ROUNDS", "4"))
SIZE = int(os.environ.get("BENCH_WAKE_PRODUCTS", "10000"))
MODEL = os.environ.get("BENCH_WAKE_MODEL", "efficientnet-lite0-int8")
log = bench.log


def wake(binary, env, uri, label):
    """One wake of `binary`: (CPU ms to the first answer, first search ms)."""
    svc, cg = rf.constrained(label, env, uri, settle=False, binary=binary)
    try:
        cpu0 = bench.cpu_s(svc.pid)
        first = svc.load(1, 1)
        cpu = (bench.cpu_s(svc.pid) - cpu0) * 1e3
        assert first["ok"] == 1, first
    finally:
        svc.stop()
        cg.close()
    return cpu, first["p50_ms"]


def main():
    why = rf.cgroups_usable()
    if why:
        print(f"[bench-wake] skipped: cannot create cgroups here ({why}); it needs root and "
              "cgroup v1 cpu and memory controllers under /sys/fs/cgroup.")
        return 0
    for f in [*BINS, bench.LOAD]:
        if not f.exists():
            sys.exit(f"{f} missing: run `make bench-wake` (it builds it) or fix BENCH_BINS")
    bench.WORK.mkdir(parents=True, exist_ok=True)
    runs = {str(b): [] for b in BINS}
    mongo_port = None
    try:
        mongo_port, uri, _ = bench.start_mongo()
        img_port, _ = bench.serve_photos(bench.make_photos(SIZE))
        bench.seed_catalogue(uri, SIZE, img_port)
        env = {"MODEL_PATH": str(bench.ROOT / "models/out" / MODEL / "model.onnx"),
               "MAX_PRODUCTS": str(SIZE), "EMBEDDINGS_COLLECTION": "wake",
               "CACHE_PRODUCTS": "auto", "REQUEST_TIMEOUT_SECS": "7200"}
        svc = bench.Service("wake-index", env, uri, binary=BINS[-1]).start()
        code, report = bench.http_json("POST", svc.port, "/api/v1/refresh", timeout=7200)
        svc.stop()
        assert code == 200, report
        log(f"indexed {report['embedded']} images (unconstrained)")
        for i in range(ROUNDS):
            for n, b in enumerate(BINS):
                cpu, ms = wake(b, env, uri, f"wake-{i}-{n}")
                runs[str(b)].append({"cpu_ms": cpu, "first_search_ms": ms})
                log(f"{b}: CPU {cpu:.0f} ms, first search {ms:.0f} ms")
    finally:
        bench.stop_children(mongo_port)
    mach = bench.machine()
    rows = ["| build | CPU ms to the first answer (median; all) | first search ms (median; all) |",
            "|---|---|---|"]
    for b, r in runs.items():
        cpu = sorted(x["cpu_ms"] for x in r)
        ms = sorted(x["first_search_ms"] for x in r)
        rows.append(f"| {b} | {statistics.median(cpu):.0f}; {', '.join(f'{x:.0f}' for x in cpu)} "
                    f"| {statistics.median(ms):.0f}; {', '.join(f'{x:.0f}' for x in ms)} |")
    md = (f"Machine: {mach['nproc']} cores ({mach['cpu']}), ONNX Runtime {mach['onnxruntime']}; "
          f"{SIZE} products, {MODEL}, CACHE_PRODUCTS=auto; each wake a new process in "
          f"cgroups of {rf.CPU:g} CPU and {rf.MEMORY_MB} MB, {ROUNDS} wakes a build, "
          f"alternated.\n\n" + "\n".join(rows) + "\n")
    print(md)
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    (bench.RESULTS / "wake.json").write_text(json.dumps(
        {"machine": mach, "products": SIZE, "model": MODEL, "cpu": rf.CPU, "runs": runs},
        indent=1) + "\n")
    (bench.RESULTS / "wake.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
