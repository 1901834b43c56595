#!/usr/bin/env python3
"""Dynamic int8 quantization of a model folder: SRC/model.onnx -> DST/model.onnx.

Uses onnxruntime.quantization.quantize_dynamic with QInt8 weights (per-tensor by default;
activations are quantized at run time). MatMuls with constant weights and the patch Conv are
quantized; attention score MatMuls between activations stay float (ORT's default
MatMulConstBOnly). Before quantizing, the model goes through ORT's recommended
pre-processing (onnxruntime.quantization.quant_pre_process: ORT graph optimization + ONNX
shape inference; the symbolic shape inference step is skipped because it needs sympy,
which a transformer with static shapes such as CLIP does not need). For CLIP this step
leaves the graph unchanged but is what ORT asks for; opset imports it adds that no node
uses are removed again.

SRC/preprocessor_config.json is copied unchanged. The quantized model is verified with
onnxruntime against the float model (cosine of the outputs on random input) before it is
renamed into place, so an interrupted run never leaves a partial DST/model.onnx.

Usage: python models/quantize.py models/out/clip-vit-b32 models/out/clip-vit-b32-int8
       [--per-channel] [--no-preprocess]
"""

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time

import numpy as np

from modelutil import publish


def prune_opset_imports(path):
    """The pre-processing step declares every opset domain ORT knows (ai.onnx.ml, training,
    com.microsoft, ...); keep only the domains that nodes use. Returns the serialized model."""
    import onnx

    model = onnx.load(path)
    used = {n.domain for n in model.graph.node} | {""}
    keep = [o for o in model.opset_import if o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def output_cosine(float_path, quant_path, batch=2, seed=0):
    """Runs both models on the same random input; returns the worst per-row cosine of each
    output plus the input shape."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sf = ort.InferenceSession(float_path, so, providers=["CPUExecutionProvider"])
    sq = ort.InferenceSession(quant_path, so, providers=["CPUExecutionProvider"])
    inp = sf.get_inputs()[0]
    shape = [batch] + [d if isinstance(d, int) else 1 for d in inp.shape[1:]]
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    names = [o.name for o in sf.get_outputs()]
    if names != [o.name for o in sq.get_outputs()]:
        raise RuntimeError("quantized model has different outputs")
    res = {}
    for name, a, b in zip(names, sf.run(names, {inp.name: x}), sq.run(names, {inp.name: x})):
        if a.shape != b.shape or not np.all(np.isfinite(b)):
            raise RuntimeError(f"quantized output {name}: shape {b.shape} vs {a.shape} or "
                               "non-finite values")
        a2, b2 = a.reshape(batch, -1), b.reshape(batch, -1)
        cos = np.sum(a2 * b2, 1) / (np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1))
        res[name] = float(cos.min())
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", help="folder with model.onnx and preprocessor_config.json")
    ap.add_argument("dst", help="output folder")
    ap.add_argument("--per-channel", action="store_true", help="per-channel weight scales")
    ap.add_argument("--no-preprocess", action="store_true",
                    help="skip quant_pre_process (quantize the model as it is)")
    ap.add_argument("--min-cosine", type=float, default=0.95,
                    help="fail when an output's cosine to the float model is lower")
    args = ap.parse_args(argv)

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # let SIGTERM unwind through the cleanup of the temporary folder
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    t0 = time.perf_counter()
    src_model = os.path.join(args.src, "model.onnx")
    with open(os.path.join(args.src, "preprocessor_config.json")) as f:
        preprocessor = json.load(f)
    os.makedirs(args.dst, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".quantize-", dir=args.dst)
    try:
        to_quantize = src_model
        if not args.no_preprocess:
            to_quantize = os.path.join(work, "preprocessed.onnx")
            quant_pre_process(src_model, to_quantize, skip_symbolic_shape=True)
        quantized = os.path.join(work, "model.onnx")
        quantize_dynamic(to_quantize, quantized, weight_type=QuantType.QInt8,
                         per_channel=args.per_channel)
        data = prune_opset_imports(quantized)
        report = {}

        def verify(path):
            report.update(output_cosine(src_model, path))
            bad = {k: v for k, v in report.items() if v < args.min_cosine}
            if bad:
                raise RuntimeError(f"quantized outputs drift from the float model: {bad}")

        dest = publish(args.dst, data, preprocessor, verify)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cos = ", ".join(f"{k} {v:.4f}" for k, v in report.items())
    print(f"wrote {dest} ({len(data) / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s; "
          f"cosine to float outputs on random input: {cos}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
