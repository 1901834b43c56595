#!/usr/bin/env python3
"""Int8 quantization of a model folder: SRC/model.onnx -> DST/model.onnx.

Dynamic (the default): onnxruntime.quantization.quantize_dynamic with QInt8 weights
(per-tensor by default; activations are quantized at run time).

Static (--static --calibrate DIR): quantize_static in QDQ format with per-channel QInt8
weights and QUInt8 activations whose ranges are calibrated (MinMax) on the photos in DIR,
preprocessed as SRC/preprocessor_config.json says, each also mirrored. `make setup`
calibrates on scikit-image's sample photos, never on a test catalogue. A convolutional
network such as EfficientNet-Lite0 (ReLU6, no squeeze-excitation) loses almost nothing
this way and runs all its convolutions in int8.

Dynamic mode details: MatMuls with constant weights and the patch Conv are
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
       python models/quantize.py models/out/efficientnet-lite0 models/out/efficientnet-lite0-int8
       --static --calibrate .tools/data/skimage
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
from qmm import set_precise_qmm


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


def output_cosine(float_path, quant_path, batch=2, seed=0, x=None):
    """Runs both models on the same input (`x`, else a random batch); returns the worst
    and the mean per-row cosine of each output."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    # As the service runs it: exact int8 products on x86 CPUs without VNNI.
    set_precise_qmm(so)
    sf = ort.InferenceSession(float_path, so, providers=["CPUExecutionProvider"])
    sq = ort.InferenceSession(quant_path, so, providers=["CPUExecutionProvider"])
    inp = sf.get_inputs()[0]
    if x is None:
        shape = [batch] + [d if isinstance(d, int) else 1 for d in inp.shape[1:]]
        x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    batch = x.shape[0]
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
        res[name] = (float(cos.min()), float(cos.mean()))
    return res


def calibration_batches(folder, preprocessor, input_name, limit=None):
    """The photos in `folder` (png/jpg; the first `limit` of them), each as itself and
    mirrored, preprocessed like the service does (shorter side resized bicubic, centre
    crop, rescale, normalise): one {input_name: [1, 3, H, W]} feed each, for
    onnxruntime's CalibrationDataReader."""
    from PIL import Image

    from check_efficientnet import preprocess

    names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".png", ".jpg", ".jpeg")))
    names = names[:limit]
    if not names:
        raise SystemExit(f"--calibrate {folder}: no photos there")
    feeds = []
    for name in names:
        with Image.open(os.path.join(folder, name)) as im:
            rgb = np.asarray(im.convert("RGB"))
        for img in (rgb, rgb[:, ::-1]):
            x = preprocess(np.ascontiguousarray(img), preprocessor)
            feeds.append({input_name: x[None].astype(np.float32)})
    return feeds


def quantize_static_qdq(src, dst, feeds):
    """Static QDQ quantization of `src` into `dst`, calibrated on `feeds`."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(feeds)

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                    calibrate_method=CalibrationMethod.MinMax)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", help="folder with model.onnx and preprocessor_config.json")
    ap.add_argument("dst", help="output folder")
    ap.add_argument("--per-channel", action="store_true", help="per-channel weight scales")
    ap.add_argument("--no-preprocess", action="store_true",
                    help="skip quant_pre_process (quantize the model as it is)")
    ap.add_argument("--static", action="store_true",
                    help="static QDQ quantization with calibrated activations (needs --calibrate)")
    ap.add_argument("--calibrate", metavar="DIR",
                    help="photos to calibrate the activation ranges on (--static)")
    ap.add_argument("--min-cosine", type=float, default=0.95,
                    help="fail when an output's cosine to the float model is lower")
    args = ap.parse_args(argv)
    if args.static != bool(args.calibrate):
        ap.error("--static and --calibrate DIR go together")

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
        # Static ranges are calibrated for photos, so it is checked on photos (random
        # input lies outside them), by the mean: texture-only photos (grass, a retina
        # scan) drift most, to about 0.91, and recall is measured elsewhere
        # (`bench-load relevance`).
        photos = None
        if args.static:
            import onnx

            name = onnx.load(src_model, load_external_data=False).graph.input[0].name
            feeds = calibration_batches(args.calibrate, preprocessor, name)
            photos = np.concatenate([f[name] for f in feeds[::2]])

        to_quantize = src_model
        if not args.no_preprocess:
            to_quantize = os.path.join(work, "preprocessed.onnx")
            quant_pre_process(src_model, to_quantize, skip_symbolic_shape=True)
        quantized = os.path.join(work, "model.onnx")
        if args.static:
            quantize_static_qdq(to_quantize, quantized, feeds)
        else:
            quantize_dynamic(to_quantize, quantized, weight_type=QuantType.QInt8,
                             per_channel=args.per_channel)
        data = prune_opset_imports(quantized)
        report = {}

        def verify(path):
            report.update(output_cosine(src_model, path, x=photos))
            judged = 1 if args.static else 0
            bad = {k: v for k, v in report.items() if v[judged] < args.min_cosine}
            if bad:
                raise RuntimeError(f"quantized outputs drift from the float model: {bad}")

        dest = publish(args.dst, data, preprocessor, verify)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cos = ", ".join(f"{k} {v[0]:.4f} (mean {v[1]:.4f})" for k, v in report.items())
    print(f"wrote {dest} ({len(data) / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s; "
          f"worst cosine to the float outputs on {'the photos' if args.static else 'random input'}: "
          f"{cos}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
