#!/usr/bin/env python3
"""`make bench-render-free`: the service inside the limits of Render's free instance.

Each service runs as a real process in a cpu cgroup of 0.1 CPU (cfs_quota_us 10000 per
cfs_period_us 100000) and a memory cgroup of 512 MB (a child of the memory cgroup this
script runs in), entered by a small shell that writes its own PID into both and then
execs the binary. SecantusDB, the image server and the load generator stay outside, as
Atlas and the shop's clients would. Skipped, with the reason, where the cgroups cannot
be made (not root, no cgroup v1 controllers).

Per model and catalogue size (500 and 10,000 products by default):
  1. indexing: a fresh service in the cgroups, POST /api/v1/refresh, the whole catalogue
     embedded on demand (with BENCH_RF_INDEX_LIMIT [1000] products at most; larger
     catalogues are indexed by an unconstrained service and that time reported instead);
  2. waking: a new process in new cgroups, as Render starts a stopped instance for the
     request that woke it: spawn -> healthy, then at once the first search (model load and
     the catalogue pass included): start to first answer;
  3. warm searches at concurrency 1 and 10 (`bench-load load`), a health probe on new
     connections every 50 ms during both;
  4. the cgroup's peak memory, failcnt and OOM kills, VmHWM, and CPU throttling;
  5. the service's CPU a search (c=1) and an indexed product, beside the bare model's
     (bench/bare_ort.py on one thread, per model): under a quota the CPU a request
     decides the latency, and this shows how much of it is the model on this CPU.
Each setting of BENCH_RF_VARIANTS (default: ORT_ALLOW_SPINNING=false, to measure spinning
under the quota) repeats 2-4 for the first model on the smallest catalogue.

Knobs: BENCH_RF_MODELS [efficientnet-lite0-int8,efficientnet-lite0], BENCH_RF_SIZES
[500,10000], BENCH_RF_CACHE [false] (CACHE_PRODUCTS values to search with), BENCH_RF_CPU
[0.1], BENCH_RF_MEMORY_MB [512], BENCH_RF_INDEX_LIMIT [1000], BENCH_RF_VARIANTS
(';'-separated, each VAR=value[,VAR=value]), BENCH_C1_REQUESTS [100], BENCH_C10_REQUESTS
[60], BENCH_RF_BARE_RUNS [60], BENCH_MAX_SECS [10] and the other knobs of bench/run.py. Writes
bench/results/render-free.{json,md}.
"""

import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the shared helpers of `make bench`)

MODELS = [m for m in os.environ.get(
    "BENCH_RF_MODELS", "efficientnet-lite0-int8,efficientnet-lite0").split(",") if m]
SIZES = sorted(int(s) for s in os.environ.get("BENCH_RF_SIZES", "500,10000").split(",") if s)
CACHES = [c for c in os.environ.get("BENCH_RF_CACHE", "false").split(",") if c]
CPU = float(os.environ.get("BENCH_RF_CPU", "0.1"))
MEMORY_MB = int(os.environ.get("BENCH_RF_MEMORY_MB", "512"))
INDEX_LIMIT = int(os.environ.get("BENCH_RF_INDEX_LIMIT", "1000"))
BARE_RUNS = int(os.environ.get("BENCH_RF_BARE_RUNS", "60"))
VARIANTS = [dict(kv.split("=", 1) for kv in v.split(",") if "=" in kv)
            for v in os.environ.get("BENCH_RF_VARIANTS", "ORT_ALLOW_SPINNING=false").split(";")
            if v.strip()]
PERIOD_US = 100_000
CPU_ROOT = Path("/sys/fs/cgroup/cpu")
MEM_ROOT = Path("/sys/fs/cgroup/memory")
# The targets of the speed issue, with the default model.
TARGETS = {"c1_p50_ms": 50.0, "first_search_ms": 1000.0, "index_500_s": 20.0,
           "health_p99_ms": 150.0, "wake_ms": 1500.0}
log = bench.log


def own_memory_cgroup():
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.strip().split(":", 2)
            if "memory" in controllers.split(","):
                return path
    raise OSError("no memory cgroup in /proc/self/cgroup")


class Cgroups:
    """A cpu and a memory cgroup (v1) for one service process; removed by close()."""

    seq = 0

    def __init__(self, name):
        Cgroups.seq += 1
        leaf = f"search-img-{os.getpid()}-{Cgroups.seq}-{name}"
        self.cpu = CPU_ROOT / leaf
        self.mem = MEM_ROOT / own_memory_cgroup().lstrip("/") / leaf
        self.cpu.mkdir()
        try:
            self.mem.mkdir()
        except OSError:
            self.cpu.rmdir()
            raise
        try:
            (self.cpu / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (self.cpu / "cpu.cfs_quota_us").write_text(str(int(PERIOD_US * CPU)))
            limit = str(MEMORY_MB * 1024 * 1024)
            (self.mem / "memory.limit_in_bytes").write_text(limit)
            swap = self.mem / "memory.memsw.limit_in_bytes"
            if swap.exists():  # no swap either: what Render gives
                swap.write_text(limit)
        except OSError:
            self.close()
            raise

    def prefix(self):
        """The shell that moves itself into both cgroups, then execs the command."""
        script = (f'echo $$ > {self.cpu}/cgroup.procs && echo $$ > {self.mem}/cgroup.procs '
                  '&& exec "$@"')
        return ["sh", "-c", script, "sh"]

    def cpu_stat(self):
        out = {}
        for line in (self.cpu / "cpu.stat").read_text().splitlines():
            k, v = line.split()
            out[k] = int(v)
        return out

    def memory(self):
        read = lambda n: int((self.mem / n).read_text().split()[0])  # noqa: E731
        oom = dict(line.split() for line in
                   (self.mem / "memory.oom_control").read_text().splitlines())
        return {"peak_mb": read("memory.max_usage_in_bytes") / 1048576,
                "failcnt": read("memory.failcnt"), "oom_kill": int(oom.get("oom_kill", 0))}

    def close(self):
        for d in (self.cpu, self.mem):
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)  # the process is still leaving


def cgroups_usable():
    """None if cgroups can be made here, else why not."""
    try:
        Cgroups("probe").close()
        return None
    except OSError as e:
        return f"{type(e).__name__}: {e}"


class Prober:
    """GET /api/v1/health on a new connection every 50 ms until stopped; latencies."""

    def __init__(self, port):
        self.port, self.ms, self.errors = port, [], 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            t = time.monotonic()
            if bench.health_status(self.port, timeout=10) == 200:
                self.ms.append((time.monotonic() - t) * 1e3)
            else:
                self.errors += 1
            self._stop.wait(0.05)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    def p99(self):
        if not self.ms:
            return None
        s = sorted(self.ms)
        return s[min(len(s) - 1, int(0.99 * len(s)))]


def constrained(name, env, uri, settle=True, binary=None):
    """A started service (`binary`, BENCH_BIN by default) inside fresh cgroups:
    (service, cgroups)."""
    cg = Cgroups(name)
    svc = bench.Service(name, env, uri, prefix=cg.prefix(), binary=binary)
    try:
        svc.start(settle=settle)
    except Exception:
        cg.close()
        raise
    return svc, cg


def index(model, size, env, uri):
    """Whole-catalogue indexing on demand (POST /refresh): in the cgroups up to
    INDEX_LIMIT products, else unconstrained."""
    inside = size <= INDEX_LIMIT
    env = {**env, "REQUEST_TIMEOUT_SECS": "7200"}
    name = f"rf-{model}-{size}-index"
    svc, cg = constrained(name, env, uri) if inside else (
        bench.Service(name, env, uri).start(), None)
    try:
        t, cpu0 = time.monotonic(), bench.cpu_s(svc.pid)
        code, report = bench.http_json("POST", svc.port, "/api/v1/refresh", timeout=7200)
        wall, cpu = time.monotonic() - t, bench.cpu_s(svc.pid) - cpu0
        assert code == 200, report
        mem = cg.memory() if cg else None
    finally:
        svc.stop()
        if cg:
            cg.close()
    log(f"{name}: embedded {report['embedded']} in {wall:.1f} s "
        f"({'0.1 CPU' if inside else 'unconstrained'})")
    return {"constrained": inside, "wall_s": wall, "embedded": report["embedded"],
            "cpu_ms_per_product": cpu * 1e3 / max(1, report["embedded"]),
            "peak_rss_mb": svc.peak_mb, "cgroup": mem}


def wake_and_search(label, env, uri):
    """A new process in new cgroups, the first search sent as soon as it is healthy, then
    warm searches at c=1 and c=10 with the health probe beside them."""
    svc, cg = constrained(label, env, uri, settle=False)
    try:
        first = svc.load(1, 1)
        wake_ms = (time.monotonic() - svc.t_spawn) * 1e3
        assert first["ok"] == 1, first
        cpu0 = cg.cpu_stat()
        with Prober(svc.port) as probe:
            svc.load(1, 3)  # warm-up
            used = bench.cpu_s(svc.pid)
            c1 = svc.load(1, bench.C1)
            # The service's CPU a search (the probe's share included): what the quota pays.
            c1["cpu_ms"] = (bench.cpu_s(svc.pid) - used) * 1e3 / max(1, c1["ok"])
            c10 = svc.load(10, bench.C10)
        cpu1 = cg.cpu_stat()
        mem = cg.memory()
    finally:
        svc.stop()
        cg.close()
    periods = cpu1["nr_periods"] - cpu0["nr_periods"]
    out = {
        "healthy_ms": svc.health_ms,
        "first_search_ms": first["p50_ms"],
        "wake_ms": wake_ms,
        "c1": c1, "c10": c10,
        "health_p99_ms": probe.p99(), "health_probes": len(probe.ms),
        "health_errors": probe.errors,
        "throttled_share": (cpu1["nr_throttled"] - cpu0["nr_throttled"]) / periods
        if periods else None,
        "throttled_s": (cpu1["throttled_time"] - cpu0["throttled_time"]) / 1e9,
        "vm_hwm_mb": svc.peak_mb, "cgroup": mem, "model_load_ms": svc.model_load_ms,
    }
    log(f"{label}: wake {wake_ms:.0f} ms, c=1 p50 {c1['p50_ms']:.1f} ms, "
        f"c=10 {c10['rps']:.1f} req/s, health p99 {out['health_p99_ms'] or 0:.0f} ms, "
        f"peak {mem['peak_mb']:.0f} MB, oom {mem['oom_kill']}")
    return out


def bare_model(path):
    """The model alone in bare Python ONNX Runtime on one thread (what the quota gives
    the service): batch-1 latency and batch CPU per image, against which the service's
    CPU a search and an indexed product are read."""
    r = bench.bare(path, "true", "auto", threads=1, runs=BARE_RUNS, warmup=5)
    log(f"bare {path.parent.name}: batch 1 {r['batch1_ms']:.2f} ms, batch {r['batch']} "
        f"{r['batchB_cpu_ms_per_img']:.2f} ms CPU an image (1 thread)")
    return {"batch1_ms": r["batch1_ms"], "batch": r["batch"],
            "batch_cpu_ms_per_img": r["batchB_cpu_ms_per_img"]}


def cpu_table(runs):
    """The service's CPU a request beside the bare model's: how much of the quota is
    the model, whatever the CPU."""
    head = ("| model | products | cache | setting | bare model ms, batch 1 | CPU ms a search "
            "(c=1) | x bare | bare model CPU ms an image, batch | CPU ms an indexed product "
            "| x bare |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in runs:
        s, ix, b = r["search"], r.get("index"), r["bare"]
        per_product = ix["cpu_ms_per_product"] if ix else None
        ratio = lambda v, base: None if v is None else v / base  # noqa: E731
        rows.append(
            f"| {r['model']} | {r['size']} | {r['cache']} | {r['setting']} | "
            f"{fmt(b['batch1_ms'], 2)} | {fmt(s['c1']['cpu_ms'], 2)} | "
            f"{fmt(ratio(s['c1']['cpu_ms'], b['batch1_ms']), 2)} | "
            f"{fmt(b['batch_cpu_ms_per_img'], 2)} ({b['batch']}) | {fmt(per_product, 2)} | "
            f"{fmt(ratio(per_product, b['batch_cpu_ms_per_img']), 2)} |")
    return "\n".join(rows)


def fmt(v, digits=0):
    return "-" if v is None else f"{v:.{digits}f}"


def table(runs):
    head = ("| model | products | cache | setting | healthy ms | first search ms | "
            "start to first answer ms | c=1 p50 / p95 ms | c=10 p50 ms | c=10 req/s | "
            "health p99 ms | indexing s | peak MB (cgroup / VmHWM) | OOM kills | "
            "throttled periods |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in runs:
        s, ix = r["search"], r.get("index")
        index_s = "-" if not ix else (
            f"{ix['wall_s']:.1f}" + ("" if ix["constrained"] else " (unconstrained)"))
        rows.append(
            f"| {r['model']} | {r['size']} | {r['cache']} | {r['setting']} | "
            f"{fmt(s['healthy_ms'])} | {fmt(s['first_search_ms'])} | {fmt(s['wake_ms'])} | "
            f"{fmt(s['c1']['p50_ms'], 1)} / {fmt(s['c1']['p95_ms'], 1)} | "
            f"{fmt(s['c10']['p50_ms'], 1)} | {fmt(s['c10']['rps'], 1)} | "
            f"{fmt(s['health_p99_ms'])} | {index_s} | "
            f"{fmt(s['cgroup']['peak_mb'])} / {fmt(s['vm_hwm_mb'])} | "
            f"{s['cgroup']['oom_kill']} | {fmt(100 * (s['throttled_share'] or 0))}% |")
    return "\n".join(rows)


def targets(runs):
    """The issue's targets, for the first (default) model with the first cache setting."""
    lines = []
    for r in runs:
        if r["model"] != MODELS[0] or r["setting"] != "default" or r["cache"] != CACHES[0]:
            continue
        s, ix = r["search"], r.get("index")
        checks = [("c=1 p50", s["c1"]["p50_ms"], TARGETS["c1_p50_ms"], "ms"),
                  ("first search", s["first_search_ms"], TARGETS["first_search_ms"], "ms"),
                  ("start to first answer", s["wake_ms"], TARGETS["wake_ms"], "ms"),
                  ("health p99", s["health_p99_ms"], TARGETS["health_p99_ms"], "ms")]
        if ix and ix["constrained"] and r["size"] <= 500:
            checks.append(("indexing", ix["wall_s"], TARGETS["index_500_s"], "s"))
        for name, v, limit, unit in checks:
            ok = v is not None and v <= limit
            lines.append(f"- {r['size']} products, {name}: {fmt(v, 1)} {unit} "
                         f"(target <= {limit:g} {unit}): {'met' if ok else 'NOT met'}")
        # What the quota allows: a closed-loop c=1 p50 within half a period needs two
        # searches a period; indexing 500 in 20 s needs 500 products in 20 s of quota.
        b = r["bare"]
        search_budget = PERIOD_US * CPU / 1e3 / 2
        lines.append(f"- {r['size']} products, CPU a search: {fmt(s['c1']['cpu_ms'], 2)} ms "
                     f"(c=1 p50 <= {TARGETS['c1_p50_ms']:g} ms at {CPU:g} CPU needs <= "
                     f"{search_budget:g} ms; the bare model alone: {b['batch1_ms']:.2f} ms)")
        if ix and ix["constrained"] and r["size"] <= 500:
            budget = TARGETS["index_500_s"] * CPU * 1e3 / 500
            lines.append(f"- {r['size']} products, CPU an indexed product: "
                         f"{fmt(ix['cpu_ms_per_product'], 2)} ms (indexing 500 in "
                         f"{TARGETS['index_500_s']:g} s needs <= {budget:g} ms; the bare "
                         f"model alone: {b['batch_cpu_ms_per_img']:.2f} ms)")
        oom = s["cgroup"]["oom_kill"]
        lines.append(f"- {r['size']} products, OOM kills: {oom} (target 0): "
                     f"{'met' if oom == 0 else 'NOT met'}")
    return "\n".join(lines)


def main():
    why = cgroups_usable()
    if why:
        print(f"[bench-render-free] skipped: cannot create cgroups here ({why}); it needs "
              "root and cgroup v1 cpu and memory controllers under /sys/fs/cgroup.")
        return 0
    for f in (bench.BIN, bench.LOAD):
        if not f.exists():
            sys.exit(f"{f} missing: run `make bench-render-free` (it builds them)")
    bench.WORK.mkdir(parents=True, exist_ok=True)
    result = {"machine": bench.machine(), "settings": {
        "models": MODELS, "sizes": SIZES, "caches": CACHES, "cpu": CPU, "memory_mb": MEMORY_MB,
        "index_limit": INDEX_LIMIT, "variants": VARIANTS, "c1_requests": bench.C1,
        "c10_requests": bench.C10}, "runs": []}
    mongo_port = None
    try:
        mongo_port, uri, _ = bench.start_mongo()
        images = bench.make_photos(max(SIZES))
        img_port, _ = bench.serve_photos(images)
        bench.seed_catalogue(uri, max(SIZES), img_port)
        for model in MODELS:
            path = bench.ROOT / "models/out" / model / "model.onnx"
            bare = bare_model(path)
            for size in SIZES:
                env = {"MODEL_PATH": str(path), "MAX_PRODUCTS": str(size),
                       "EMBEDDINGS_COLLECTION": f"rf_{model.replace('-', '_')}_{size}"}
                ix = index(model, size, env, uri)
                settings = [("default", {})]
                if model == MODELS[0] and size == SIZES[0]:
                    settings += [(",".join(f"{k}={v}" for k, v in var.items()), var)
                                 for var in VARIANTS]
                for cache in CACHES:
                    for label, extra in settings:
                        name = f"rf-{model}-{size}-cache-{cache}-{len(result['runs'])}"
                        s = wake_and_search(name, {**env, "CACHE_PRODUCTS": cache, **extra}, uri)
                        result["runs"].append({"model": model, "size": size, "cache": cache,
                                               "setting": label, "search": s, "bare": bare,
                                               "index": ix if label == "default" else None})
    finally:
        bench.stop_children(mongo_port)
    result["total_s"] = time.monotonic() - bench.T0
    mach = result["machine"]
    md = (f"Machine: {mach['nproc']} cores ({mach['cpu']}), ONNX Runtime {mach['onnxruntime']}, "
          f"commit {mach['git']}; each service in cgroups of {CPU:g} CPU "
          f"({int(PERIOD_US * CPU)} us per {PERIOD_US} us) and {MEMORY_MB} MB; "
          f"{bench.C1} searches at c=1, {bench.C10} at c=10; took "
          f"{result['total_s'] / 60:.1f} min.\n\n{table(result['runs'])}\n\n"
          f"The service's CPU beside the bare model's (one thread):\n\n"
          f"{cpu_table(result['runs'])}\n\n"
          f"Targets ({MODELS[0]}, CACHE_PRODUCTS={CACHES[0]}):\n\n{targets(result['runs'])}\n")
    print(md)
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    (bench.RESULTS / "render-free.json").write_text(json.dumps(result, indent=1) + "\n")
    (bench.RESULTS / "render-free.md").write_text(md)
    log(f"wrote {bench.RESULTS / 'render-free.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
