"""Helpers shared by the model build scripts in this folder (numpy + onnx + stdlib only)."""

import hashlib
import json
import os
import signal
import sys

import numpy as np
import onnx
from onnx import helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17; loads in any ORT >= 1.13
RESCALE_1_255 = 1.0 / 255.0


def sha256_file(path):
    """SHA-256 of a file, hex (read in 1 MiB pieces)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def clip_image_processor_config(size, mean, std):
    """preprocessor_config.json content in the HF CLIPImageProcessor format."""
    return {
        "crop_size": {"height": size, "width": size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(mean),
        "image_processor_type": "CLIPImageProcessor",
        "image_std": list(std),
        "resample": 3,  # PIL.Image.BICUBIC
        "rescale_factor": RESCALE_1_255,
        "size": {"shortest_edge": size},
    }


class Graph:
    """Accumulates nodes and initializers; node names are unique and deterministic."""

    def __init__(self):
        self.nodes, self.inits, self._n = [], [], 0

    def unique(self, base):
        self._n += 1
        return f"{base}_{self._n}"

    def const(self, name, array):
        self.inits.append(numpy_helper.from_array(np.asarray(array, order="C"), name))
        return name

    def node(self, op, inputs, output=None, name=None, **attrs):
        name = name or self.unique(op)
        output = output or name + "_out"
        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        return output


def make_model(graph, doc, metadata):
    """Wraps a GraphProto into a checked, serialized ModelProto (returns bytes). The graph
    proto is emptied to release memory early (large models hold ~350 MB of weights)."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="search-img/models", producer_version="1",
                              doc_string=doc)
    graph.Clear()
    model.ir_version = IR_VERSION
    for k, v in metadata.items():
        model.metadata_props.add(key=k, value=str(v))
    data = model.SerializeToString()
    del model
    onnx.checker.check_model(data)
    return data


def _write_file(path, data):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path, data):
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        _write_file(tmp, data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def publish(out_dir, model_bytes, preprocessor, verify=None):
    """Writes <out_dir>/model.onnx and preprocessor_config.json so that an interrupted build
    never leaves a partial model.onnx: the model goes to a temp file, is verified there
    (verify(path) raises on failure), and is renamed into place last."""
    os.makedirs(out_dir, exist_ok=True)
    final = os.path.join(out_dir, "model.onnx")
    tmp = f"{final}.tmp-{os.getpid()}"
    # SIGTERM would kill the process without running the cleanup below
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        _write_file(tmp, model_bytes)
        if verify is not None:
            verify(tmp)
        if preprocessor is not None:
            write_atomic(os.path.join(out_dir, "preprocessor_config.json"),
                         (json.dumps(preprocessor, indent=2, sort_keys=True) + "\n").encode())
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        signal.signal(signal.SIGTERM, previous)
    return final


def publish_and_report(args, model_bytes, preprocessor, verify, n_nodes, t0):
    """The builders' last step: publish (verified unless --no-verify), say what was
    written and how long it took; returns the exit status."""
    import time

    dest = publish(args.out, model_bytes, preprocessor, None if args.no_verify else verify)
    print(f"wrote {dest} ({len(model_bytes) / 1e6:.1f} MB, {n_nodes} nodes) "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


def run_once(model_path, input_shape, expected_outputs, seed=0):
    """Loads a model in onnxruntime, runs it on random input and checks output shapes and
    finiteness. expected_outputs: {name: shape}. Returns {name: array}."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.disable_prepacking", "1")  # less memory, same output
    sess = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(seed).standard_normal(input_shape).astype(np.float32)
    names = list(expected_outputs)
    res = dict(zip(names, sess.run(names, {"pixel_values": x})))
    for name, shape in expected_outputs.items():
        r = res[name]
        if tuple(r.shape) != tuple(shape) or not np.all(np.isfinite(r)):
            raise RuntimeError(f"self-test: {name} has shape {r.shape} (expected {shape}) "
                               f"or non-finite values")
    return res
