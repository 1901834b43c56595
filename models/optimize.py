#!/usr/bin/env python3
"""Writes DIR/model.optimized.onnx beside each DIR/model.onnx: the graph after ONNX
Runtime's basic and extended optimizations, saved, so that the service's session does
not redo them at every start. Waking a free instance is CPU-bound under its 0.1 CPU:
building the EfficientNet-Lite0 int8 session took 24 ms of CPU from model.onnx and 12 ms
from this file, with the same outputs.

Only levels that ONNX Runtime documents as portable are saved: the layout optimizations
of the "all" level are specific to the CPU, so the service still runs them at load.

DIR/model.optimized.json says what the file was made from: the source's SHA-256, the
ONNX Runtime build, and the `session.x64quantprecision` setting (models/qmm.py). The
service loads the optimized file only when all three match its own (it hashes
model.onnx anyway: the hash is the model's identity, so the stored vectors stay
valid). Each file is verified against the source on photos before it is renamed into
place; a model it does not help (its session takes more than 0.75x the CPU to build
from the source: the int8 CLIP ViT-B/32, whose load is mostly its weights) or whose
outputs differ is left without one.

Usage: python models/optimize.py models/out/efficientnet-lite0-int8 [DIR...]
       [--photos .tools/data/skimage]
"""

import argparse
import json
import os
import resource
import sys

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from modelutil import sha256_file, write_atomic  # noqa: E402
from quantize import calibration_batches  # noqa: E402
from qmm import precise_qmm_needed, set_precise_qmm  # noqa: E402

MANIFEST = "model.optimized.json"
OPTIMIZED = "model.optimized.onnx"


def options(level, save=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = level
    set_precise_qmm(so)
    if save:
        so.optimized_model_filepath = save
    return so


def session(path, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, save=None):
    return ort.InferenceSession(path, options(level, save), providers=["CPUExecutionProvider"])


def build_cpu_s(*paths):
    """Median CPU seconds of five session builds from each of `paths`, taken in turns
    after one untimed build each (the files in the page cache)."""
    times = {p: [] for p in paths}
    for i in range(6):
        for p in paths:
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            session(p)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            if i:
                times[p].append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
    return [sorted(times[p])[2] for p in paths]


def inputs(sess, folder, photos):
    """Two of the photos preprocessed as the service does (quantize.py's calibration
    feeds), or random values without photos."""
    name = sess.get_inputs()[0].name
    if photos:
        with open(os.path.join(folder, "preprocessor_config.json")) as f:
            feeds = calibration_batches(photos, json.load(f), name, limit=2)[::2]
        return {name: np.concatenate([f[name] for f in feeds])}
    shape = [d if isinstance(d, int) else 2 for d in sess.get_inputs()[0].shape]
    return {name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


def manifest(source_sha):
    return {
        "source_sha256": source_sha,
        "onnxruntime_build": ort.get_build_info(),
        "x64quantprecision": "1" if precise_qmm_needed() else "0",
        "level": "extended",
    }


def optimize(folder, photos):
    src = os.path.join(folder, "model.onnx")
    want = manifest(sha256_file(src))
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            have = json.load(f)
        if {k: have.get(k) for k in want} == want and (
                "declined" in have or os.path.isfile(os.path.join(folder, OPTIMIZED))):
            print(f"[optimize] {folder}: up to date ({have.get('declined', 'written')})")
            return
    except (OSError, ValueError):
        pass
    for name in (MANIFEST, OPTIMIZED):  # a stale pair is worse than none
        if os.path.exists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    tmp = os.path.join(folder, OPTIMIZED + ".tmp")
    session(src, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, save=tmp)
    ref, opt = session(src), session(tmp)
    feed = inputs(ref, folder, photos)
    a = np.asarray(ref.run(None, feed)[0], np.float64)
    b = np.asarray(opt.run(None, feed)[0], np.float64)
    diff = float(np.abs(a - b).max())
    before, after = build_cpu_s(src, tmp)
    if not np.allclose(a, b, rtol=1e-4, atol=1e-5):
        want["declined"] = f"outputs differ by up to {diff:g}"
    elif after > 0.75 * before:
        want["declined"] = (f"a session took {after * 1e3:.0f} ms of CPU from it vs "
                            f"{before * 1e3:.0f} ms")
    if "declined" in want:
        os.remove(tmp)
    else:
        os.replace(tmp, os.path.join(folder, OPTIMIZED))
    # The manifest last: with it, a declined model is not tried again at each set-up.
    write_atomic(os.path.join(folder, MANIFEST), json.dumps(want, indent=1).encode())
    print(f"[optimize] {folder}: " + (f"none written: {want['declined']}" if "declined" in want
          else f"wrote {OPTIMIZED}: a session took {after * 1e3:.0f} ms of CPU vs "
          f"{before * 1e3:.0f} ms, outputs within {diff:g}"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--photos", help="a folder of photos to compare the outputs on")
    args = ap.parse_args()
    for folder in args.folders:
        optimize(folder, args.photos)


if __name__ == "__main__":
    main()
