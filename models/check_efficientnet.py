#!/usr/bin/env python3
"""Developer check of the converted EfficientNet-Lite0 model on three real photos.

Classifies scikit-image's chelsea.png (a cat), coffee.png (espresso) and motorcycle_left.png
(a moped) with onnxruntime, prints the top-5 ImageNet classes of each and exits non-zero when
a top-1 class is wrong. Preprocessing follows the model's preprocessor_config.json the way
HF CLIPImageProcessor does (resize shorter side with a PIL-style bicubic filter, center crop,
rescale, normalise), implemented here with numpy and a minimal stdlib PNG decoder, so the
script needs only numpy + onnxruntime. The service's own tests exercise the Rust pipeline;
this is a quick aid when changing build_efficientnet.py.

Usage: python models/check_efficientnet.py [--model models/out/efficientnet-lite0]
                                           [--images .tools/data/skimage]
The images come from the scikit-image wheel (scripts/setup.sh unpacks them into
.tools/data/skimage). An image may also be given as a .npy array (H, W, 3) uint8.
"""

import argparse
import json
import os
import struct
import sys
import time
import zlib

import numpy as np

from qmm import set_precise_qmm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# image -> accepted top-1 ImageNet classes
EXPECTED = {
    "chelsea.png": {281, 282, 285},  # tabby / tiger cat / Egyptian cat
    "coffee.png": {967},  # espresso
    "motorcycle_left.png": {665},  # moped
}

LABELS = {
    281: "tabby cat", 282: "tiger cat", 283: "Persian cat", 284: "Siamese cat",
    285: "Egyptian cat", 287: "lynx", 504: "coffee mug", 665: "moped", 670: "motor scooter",
    809: "soup bowl", 967: "espresso", 968: "cup",
}


# ---------------------------------------------------------------------- minimal PNG decoding

def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def decode_png(path):
    """8-bit gray/gray+alpha/RGB/RGBA, non-interlaced PNG -> (H, W, 3) uint8 RGB."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: not a PNG")
    pos, idat, hdr = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        ctype = data[pos + 4:pos + 8]
        chunk = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if ctype == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", chunk)
        elif ctype == b"IDAT":
            idat.append(chunk)
        elif ctype == b"IEND":
            break
    width, height, depth, color, _, _, interlace = hdr
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(color)
    if depth != 8 or channels is None or interlace:
        raise ValueError(f"{path}: unsupported PNG (depth {depth}, color {color}, "
                         f"interlace {interlace})")
    raw = zlib.decompress(b"".join(idat))
    stride = width * channels
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int32)
    bpp = channels
    for y in range(height):
        ftype = raw[y * (stride + 1)]
        line = np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int32)
        if ftype == 0:
            cur = line
        elif ftype == 2:
            cur = (line + prev) & 0xFF
        elif ftype in (1, 3, 4):
            cur = line.copy()
            # sequential dependency along the row: process one pixel (bpp bytes) at a time
            for x in range(stride):
                a = cur[x - bpp] if x >= bpp else 0
                b = prev[x]
                if ftype == 1:
                    cur[x] = (cur[x] + a) & 0xFF
                elif ftype == 3:
                    cur[x] = (cur[x] + ((a + b) >> 1)) & 0xFF
                else:
                    c = prev[x - bpp] if x >= bpp else 0
                    cur[x] = (cur[x] + _paeth(a, b, c)) & 0xFF
        else:
            raise ValueError(f"{path}: bad PNG filter {ftype}")
        out[y] = cur
        prev = cur
    img = out.reshape(height, width, channels)
    if channels in (1, 2):
        img = np.repeat(img[:, :, :1], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


# ------------------------------------------------------- PIL-style bicubic resize, HF steps

def _cubic(x, a=-0.5):
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _resample_matrix(in_size, out_size):
    """Weights (out_size, in_size) of PIL's separable bicubic filter (antialiased)."""
    scale = in_size / out_size
    fscale = max(scale, 1.0)
    support = 2.0 * fscale
    m = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        xs = np.arange(lo, hi)
        w = _cubic((xs - center + 0.5) / fscale)
        m[i, lo:hi] = w / w.sum()
    return m


def resize_bicubic(img, out_w, out_h):
    """(H, W, 3) uint8 -> (out_h, out_w, 3) uint8; horizontal then vertical pass like PIL."""
    x = img.astype(np.float64)
    if out_w != img.shape[1]:
        x = np.einsum("ow,hwc->hoc", _resample_matrix(img.shape[1], out_w), x)
        x = np.clip(np.round(x), 0, 255)
    if out_h != img.shape[0]:
        x = np.einsum("oh,hwc->owc", _resample_matrix(img.shape[0], out_h), x)
        x = np.clip(np.round(x), 0, 255)
    return x.astype(np.uint8)


def _size(value, key):
    return value if isinstance(value, int) else value[key]


def preprocess(img, cfg):
    short = _size(cfg["size"], "shortest_edge")
    crop_h = _size(cfg["crop_size"], "height")
    crop_w = _size(cfg["crop_size"], "width")
    h, w = img.shape[:2]
    if h <= w:
        new_h, new_w = short, int(short * w / h)
    else:
        new_h, new_w = int(short * h / w), short
    img = resize_bicubic(img, new_w, new_h)
    top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
    img = img[top:top + crop_h, left:left + crop_w]
    x = img.astype(np.float32) * np.float32(cfg.get("rescale_factor", 1 / 255))
    x = (x - np.array(cfg["image_mean"], np.float32)) / np.array(cfg["image_std"], np.float32)
    return x.transpose(2, 0, 1)


def load_image(path):
    if path.endswith(".npy"):
        return np.load(path).astype(np.uint8)[:, :, :3]
    return decode_png(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "models/out/efficientnet-lite0"))
    ap.add_argument("--images", default=os.path.join(ROOT, ".tools/data/skimage"))
    args = ap.parse_args(argv)

    import onnxruntime as ort

    with open(os.path.join(args.model, "preprocessor_config.json")) as f:
        cfg = json.load(f)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    set_precise_qmm(so)  # as the service
    sess = ort.InferenceSession(os.path.join(args.model, "model.onnx"), so,
                                providers=["CPUExecutionProvider"])

    names = list(EXPECTED)
    batch = np.stack([preprocess(load_image(os.path.join(args.images, n)), cfg)
                      for n in names]).astype(np.float32)
    t0 = time.perf_counter()
    embeds, logits = sess.run(["image_embeds", "logits"], {"pixel_values": batch})
    ms = (time.perf_counter() - t0) * 1000
    print(f"batch of {len(names)}: {ms:.1f} ms; image_embeds {embeds.shape}, "
          f"logits {logits.shape}")

    failed = 0
    for name, lg in zip(names, logits):
        p = np.exp(lg - lg.max())
        p /= p.sum()
        top = np.argsort(-lg)[:5]
        ok = int(top[0]) in EXPECTED[name]
        failed += not ok
        desc = ", ".join(f"{int(c)} {LABELS.get(int(c), '?')} {p[c]:.3f}" for c in top)
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {desc}")
    e = embeds / np.linalg.norm(embeds, axis=1, keepdims=True)
    print("embedding cosine matrix:\n" + np.array2string(e @ e.T, precision=3))
    if failed:
        print(f"{failed} image(s) misclassified", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
