#!/usr/bin/env python3
"""Bare ONNX Runtime baseline for `scripts/bench-encoder.sh`.

The same measurement as `src/bin/bench-encoder.rs`, with Python onnxruntime alone: the
same model file, thread count and session options, on the same preprocessed input (the
.npy the Rust binary wrote with --dump-input). Prints one JSON line with the same fields.

Load time starts after `import onnxruntime` (which loads the shared library), as the
Rust side starts after loading the library; baseline RSS is taken at the same point.
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models"))
from qmm import set_precise_qmm  # noqa: E402

LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def status_mb(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def time_runs(warmup, runs, fn):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def on(s):
    return s.lower() in ("1", "true", "on", "yes")


# ORT_PREPACKING=auto prepacks model files up to this size: PREPACK_AUTO_MAX_BYTES in
# src/encoder/runtime.rs (keep the two equal; bench/run.py uses this one).
PREPACK_AUTO_MAX_BYTES = 128 * 1024 * 1024


def prepack_auto(model_path):
    """What the service's ORT_PREPACKING=auto resolves to for this model file."""
    return os.path.getsize(model_path) <= PREPACK_AUTO_MAX_BYTES


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True, help=".npy [B,3,H,W] float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--arena", default="false")
    p.add_argument("--prepacking", default="false",
                   help="true, false or auto (by the model file's size, as the service)")
    p.add_argument("--spinning", default="true", help="intra-op thread spinning")
    p.add_argument("--stop-spinning", default="false",
                   help="end spinning when a run returns (session.force_spinning_stop)")
    p.add_argument("--optimization", default="all", choices=sorted(LEVELS))
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--label")
    a = p.parse_args()
    arena, spinning, stop_spinning = on(a.arena), on(a.spinning), on(a.stop_spinning)
    prepacking = prepack_auto(a.model) if a.prepacking.lower() == "auto" else on(a.prepacking)

    batch = np.load(a.input)
    rss_base = status_mb("VmRSS")

    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads if a.threads > 0 else (os.cpu_count() or 1)
    so.inter_op_num_threads = 1
    so.graph_optimization_level = LEVELS[a.optimization]
    so.enable_cpu_mem_arena = arena
    so.add_session_config_entry("session.disable_prepacking", "0" if prepacking else "1")
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.add_session_config_entry("session.force_spinning_stop", "1" if stop_spinning else "0")
    set_precise_qmm(so)  # as the service
    so.log_severity_level = 3

    t = time.perf_counter()
    sess = ort.InferenceSession(a.model, so, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t
    rss_loaded = status_mb("VmRSS")

    inp = sess.get_inputs()[0].name
    outs = sess.get_outputs()
    out = next((o.name for o in outs if o.name == "image_embeds"), None) or next(
        o.name for o in outs if o.type == "tensor(float)" and len(o.shape) == 2
    )
    one = np.ascontiguousarray(batch[:1])
    b1 = time_runs(a.warmup, a.runs, lambda: sess.run([out], {inp: one}))
    rss_b1 = status_mb("VmRSS")
    # CPU of the whole process (all intra-op threads, spinning included) per image:
    # what the model leaves of the cores for everything else when indexing.
    cpu0 = time.process_time()
    bb = time_runs(a.warmup, a.runs, lambda: sess.run([out], {inp: batch}))
    batch_cpu_s = time.process_time() - cpu0
    dim = sess.run([out], {inp: one})[0].shape[1]

    n = batch.shape[0]
    onoff = lambda b: "on" if b else "off"  # noqa: E731
    print(
        json.dumps(
            {
                "impl": "bare",
                "label": a.label
                or f"arena {onoff(arena)} prepack {onoff(prepacking)} opt {a.optimization}"
                + ("" if spinning else " no-spin") + (" spin-stop" if stop_spinning else ""),
                "model": os.path.basename(os.path.dirname(os.path.abspath(a.model))),
                "model_path": a.model,
                "model_mb": os.path.getsize(a.model) / 1048576.0,
                "threads": so.intra_op_num_threads,
                "arena": arena,
                "prepacking": prepacking,
                "prepacking_setting": a.prepacking.lower(),
                "spinning": spinning,
                "stop_spinning": stop_spinning,
                "optimization": a.optimization,
                "batch": n,
                "runs": a.runs,
                "load_s": load_s,
                "batch1_ms": statistics.median(b1),
                "batch1_ms_min": min(b1),
                "batchB_ms": statistics.median(bb),
                "batchB_ms_per_img": statistics.median(bb) / n,
                "batchB_cpu_ms_per_img": batch_cpu_s * 1e3 / ((a.warmup + a.runs) * n),
                "rss_base_mb": rss_base,
                "rss_loaded_mb": rss_loaded,
                "rss_after_batch1_mb": rss_b1,
                "rss_end_mb": status_mb("VmRSS"),
                "peak_rss_mb": status_mb("VmHWM"),
                "dim": int(dim),
                "onnxruntime": ort.__version__,
                "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
            }
        )
    )


if __name__ == "__main__":
    main()
