#!/usr/bin/env python3
"""Turns the JSON lines of `scripts/bench-encoder.sh` into its markdown table and its
results file. Ratios are ours / bare for the same model and session settings."""

import argparse
import datetime
import json
import os
import platform


def fmt(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"


def ratio(a, b):
    return "-" if a is None or not b else f"{a / b:.2f}"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("lines")
    p.add_argument("out")
    p.add_argument("--threads", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--runs", type=int)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--elapsed", type=int)
    a = p.parse_args()

    with open(a.lines) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    ok = [r for r in rows if "error" not in r]
    errors = [r["error"] for r in rows if "error" in r]

    # One row per (model, impl, settings): over rounds, the least-contended time and the
    # highest peak RSS (the conservative figure for sizing an instance).
    groups = {}
    for r in ok:
        groups.setdefault((r["model"], r["impl"], r["label"]), []).append(r)
    agg = {}
    for key, rs in groups.items():
        row = dict(rs[0])
        for k in ("load_s", "batch1_ms", "batch1_ms_min", "batchB_ms_per_img", "sha256_s"):
            vals = [r[k] for r in rs if r.get(k) is not None]
            row[k] = min(vals) if vals else None
        row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rs)
        row["rss_end_mb"] = max(r["rss_end_mb"] for r in rs)
        row["rss_base_mb"] = min(r["rss_base_mb"] for r in rs)
        agg[key] = row

    b = a.batch
    print(
        f"Encoder benchmark: {a.threads} intra-op threads, B = MAX_BATCH_SIZE = {b}, "
        f"{a.rounds} round(s), {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} "
        f"at the end, {a.elapsed} s.\n"
        f"Times: median of {a.runs} runs after warm-up (min over rounds). Peak RSS: VmHWM "
        "(max over rounds); steady = RSS after the last run; base = RSS before the session "
        "is created, with the runtime library loaded (Python: interpreter, numpy, "
        "onnxruntime). x = ours / bare ONNX Runtime (Python) with the same settings.\n"
    )
    print(
        "| model | impl | settings | load s | batch1 ms "
        f"| batch{b} ms/img | peak RSS MB | steady MB | base MB "
        f"| load x | batch1 x | batch{b} x | peak RSS x | peak-base x |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (model, impl, label), r in agg.items():
        cells = [
            model,
            impl,
            label,
            fmt(r["load_s"], 2),
            fmt(r["batch1_ms"]),
            fmt(r["batchB_ms_per_img"]),
            fmt(r["peak_rss_mb"], 0),
            fmt(r["rss_end_mb"], 0),
            fmt(r["rss_base_mb"], 0),
        ]
        ref = agg.get((model, "bare", label)) if impl == "ours" else None
        if ref:
            delta = lambda x: x["peak_rss_mb"] - x["rss_base_mb"]  # noqa: E731
            cells += [
                ratio(r["load_s"], ref["load_s"]),
                ratio(r["batch1_ms"], ref["batch1_ms"]),
                ratio(r["batchB_ms_per_img"], ref["batchB_ms_per_img"]),
                ratio(r["peak_rss_mb"], ref["peak_rss_mb"]),
                ratio(delta(r), delta(ref)),
            ]
        else:
            cells += [""] * 5
        print("| " + " | ".join(cells) + " |")
    if errors:
        print("\nNot measured (failed or skipped; see the log above):")
        for e in errors:
            print(f"- {e}")

    doc = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {
            "cpus": os.cpu_count(),
            "loadavg_end": os.getloadavg(),
            "machine": platform.machine(),
            "kernel": platform.release(),
        },
        "threads": a.threads,
        "batch": a.batch,
        "runs": a.runs,
        "rounds": a.rounds,
        "elapsed_s": a.elapsed,
        "results": rows,
    }
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
