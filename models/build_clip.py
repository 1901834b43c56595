#!/usr/bin/env python3
"""Build a CLIP ViT image tower as ONNX with seeded random weights (numpy + onnx only).

No package registry ships real CLIP weights, so this builds the exact graph of the
openai/clip-vit-base-patch32 vision tower (HF CLIPVisionModelWithProjection) with random
weights. It costs what the real model costs in time and memory, and its embeddings are a
deterministic, non-degenerate function of the image, but they carry no semantics. For real
weights see download_real_clip.sh.

Graph (opset 17), for --size base:
  patch embedding: conv 32x32 stride 32, 3 -> 768 channels, no bias  -> 7x7 = 49 patches
  class token + 50 learned position embeddings, pre-LayerNorm (ln_pre)
  12 pre-LN residual blocks: LayerNorm, 12-head self-attention (fused qkv linear with bias,
     out projection with bias), LayerNorm, MLP 768 -> 3072 -> 768 with quick-GELU
     (x * sigmoid(1.702 x))
  post-LayerNorm on the class token, projection 768 -> 512 without bias
--size tiny: the same builder with width 64, 2 layers, 2 heads, MLP 256, projection 32.

    pixel_values  float32 [batch, 3, 224, 224]
    image_embeds  float32 [batch, D]  (D = 512 base, 32 tiny; not normalised)

Weights come from numpy.random.default_rng(seed) in a fixed order, so a build is
byte-for-byte reproducible for a given numpy version (the PCG64 stream is stable).
Initialisation follows OpenAI CLIP's VisionTransformer.initialize_parameters scales
(normal; token/position embeddings and visual projection width^-0.5, attention
in-projection width^-0.5, MLP fc (2*width)^-0.5, residual output projections (attention
out-projection, MLP fc2) width^-0.5 / sqrt(2*layers)); the patch convolution uses the
PyTorch default scale 1/sqrt(fan_in); LayerNorm weight 1, bias 0; linear biases normal
std 0.02 so that they are exercised. With exactly those scales a random tower maps all
images close together (mean cosine ~0.9 between unrelated photos, some pairs 0.99), so the
attention in-projection is scaled up (x1.4 base, x1.2 tiny) and the residual output
projections x2: measured on 15 scikit-image photos (base) the mean cosine between distinct
photos is then ~0.57 (max ~0.91), while flipped / slightly cropped / brightened copies of a
photo stay at 0.81-0.95 and still have their source as nearest neighbour.

Writes <out>/model.onnx (temp file, verified with onnxruntime, then renamed) and
<out>/preprocessor_config.json with the OpenAI CLIP preprocessing values.

Usage: python models/build_clip.py --out models/out/clip-vit-b32 --size base [--seed N]
"""

import argparse
import sys
import time

import numpy as np
from onnx import TensorProto, helper

from modelutil import Graph, clip_image_processor_config, make_model, publish_and_report, run_once

SIZES = {
    # width, layers, heads, mlp, projection dim; gains on the OpenAI init scales of the
    # attention in-projection and of the residual output projections (see init_scales)
    "base": dict(width=768, layers=12, heads=12, mlp=3072, embed_dim=512,
                 attn_gain=1.4, proj_gain=2.0),
    "tiny": dict(width=64, layers=2, heads=2, mlp=256, embed_dim=32,
                 attn_gain=1.2, proj_gain=2.0),
}
IMAGE_SIZE = 224
PATCH = 32
LN_EPS = 1e-5
DEFAULT_SEED = 20240229

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PREPROCESSOR_CONFIG = clip_image_processor_config(IMAGE_SIZE, CLIP_MEAN, CLIP_STD)


class Weights:
    """Seeded random parameters, drawn in call order."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def normal(self, shape, std):
        return (self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std))


def init_scales(width, layers, attn_gain=1.0, proj_gain=1.0):
    """Standard deviations of the random parameters (see the module docstring)."""
    return dict(
        patch=(3 * PATCH * PATCH) ** -0.5,
        embedding=width ** -0.5,
        attn=attn_gain * width ** -0.5,
        proj=proj_gain * width ** -0.5 * (2 * layers) ** -0.5,
        fc=(2 * width) ** -0.5,
        bias=0.02,
        visual_projection=width ** -0.5,
    )


def build_graph(cfg, seed, scales=None):
    width, layers, heads, mlp, embed_dim = (cfg[k] for k in
                                            ("width", "layers", "heads", "mlp", "embed_dim"))
    if width % heads:
        raise ValueError("width must be a multiple of heads")
    head_dim = width // heads
    grid = IMAGE_SIZE // PATCH
    tokens = grid * grid + 1
    w = Weights(seed)
    g = Graph()

    sc = init_scales(width, layers, cfg.get("attn_gain", 1.0), cfg.get("proj_gain", 1.0))
    sc.update(scales or {})
    attn_std, proj_std, fc_std, bias_std = sc["attn"], sc["proj"], sc["fc"], sc["bias"]

    ones = np.ones(width, np.float32)
    zeros = np.zeros(width, np.float32)

    def layer_norm(x, name):
        return g.node("LayerNormalization",
                      [x, g.const(f"{name}.weight", ones), g.const(f"{name}.bias", zeros)],
                      name=name, axis=-1, epsilon=LN_EPS)

    def linear(x, name, n_in, n_out, std, bias=True, w_scale=1.0):
        wt = w.normal((n_in, n_out), std) * np.float32(w_scale)  # stored as [in, out]
        y = g.node("MatMul", [x, g.const(f"{name}.weight", wt)], name=f"{name}.matmul")
        if bias:
            b = w.normal((n_out,), bias_std) * np.float32(w_scale)
            y = g.node("Add", [y, g.const(f"{name}.bias", b)], name=f"{name}.add")
        return y

    # --- embeddings
    patch_w = w.normal((width, 3, PATCH, PATCH), sc["patch"])
    class_emb = w.normal((1, 1, width), sc["embedding"])
    pos_emb = w.normal((1, tokens, width), sc["embedding"])
    x = g.node("Conv", ["pixel_values", g.const("embeddings.patch_embedding.weight", patch_w)],
               name="embeddings.patch_embedding", kernel_shape=[PATCH, PATCH],
               strides=[PATCH, PATCH], pads=[0, 0, 0, 0], dilations=[1, 1], group=1)
    x = g.node("Reshape", [x, g.const("shape_batch_width_flat",
                                      np.array([0, width, -1], np.int64))], name="patches.flat")
    x = g.node("Transpose", [x], name="patches.transpose", perm=[0, 2, 1])  # [N, 49, W]
    shape = g.node("Shape", ["pixel_values"], name="input.shape")
    batch = g.node("Slice", [shape, g.const("i64_0", np.array([0], np.int64)),
                             g.const("i64_1", np.array([1], np.int64))], name="input.batch")
    cls_shape = g.node("Concat", [batch, g.const("shape_1_width", np.array([1, width], np.int64))],
                       name="class.shape", axis=0)
    cls = g.node("Expand", [g.const("embeddings.class_embedding", class_emb), cls_shape],
                 name="class.expand")
    x = g.node("Concat", [cls, x], name="embeddings.concat", axis=1)  # [N, 50, W]
    x = g.node("Add", [x, g.const("embeddings.position_embedding", pos_emb)],
               name="embeddings.add_position")
    x = layer_norm(x, "pre_layrnorm")

    qkv_shape = g.const("shape_qkv", np.array([0, 0, 3, heads, head_dim], np.int64))
    merge_shape = g.const("shape_merge_heads", np.array([0, 0, width], np.int64))
    idx = [g.const(f"index_{i}", np.array(i, np.int64)) for i in range(3)]
    q_scale = np.ones(3 * width, np.float32)
    q_scale[:width] = head_dim ** -0.5  # attention scaling folded into the q projection

    for i in range(layers):
        p = f"encoder.layers.{i}"
        # --- self-attention
        h = layer_norm(x, f"{p}.layer_norm1")
        h = linear(h, f"{p}.self_attn.qkv_proj", width, 3 * width, attn_std, w_scale=q_scale)
        h = g.node("Reshape", [h, qkv_shape], name=f"{p}.self_attn.split_heads")
        q = g.node("Gather", [h, idx[0]], name=f"{p}.self_attn.q", axis=2)  # [N, T, H, d]
        k = g.node("Gather", [h, idx[1]], name=f"{p}.self_attn.k", axis=2)
        v = g.node("Gather", [h, idx[2]], name=f"{p}.self_attn.v", axis=2)
        q = g.node("Transpose", [q], name=f"{p}.self_attn.q_t", perm=[0, 2, 1, 3])  # [N,H,T,d]
        k = g.node("Transpose", [k], name=f"{p}.self_attn.k_t", perm=[0, 2, 3, 1])  # [N,H,d,T]
        v = g.node("Transpose", [v], name=f"{p}.self_attn.v_t", perm=[0, 2, 1, 3])  # [N,H,T,d]
        s = g.node("MatMul", [q, k], name=f"{p}.self_attn.scores")
        a = g.node("Softmax", [s], name=f"{p}.self_attn.softmax", axis=-1)
        o = g.node("MatMul", [a, v], name=f"{p}.self_attn.context")
        o = g.node("Transpose", [o], name=f"{p}.self_attn.context_t", perm=[0, 2, 1, 3])
        o = g.node("Reshape", [o, merge_shape], name=f"{p}.self_attn.merge_heads")
        o = linear(o, f"{p}.self_attn.out_proj", width, width, proj_std)
        x = g.node("Add", [x, o], name=f"{p}.residual1")
        # --- MLP with quick-GELU
        h = layer_norm(x, f"{p}.layer_norm2")
        h = linear(h, f"{p}.mlp.fc1", width, mlp, fc_std)
        sig = g.node("Sigmoid", [g.node("Mul", [h, g.const(f"{p}.mlp.gelu_alpha",
                                                            np.array(1.702, np.float32))],
                                        name=f"{p}.mlp.gelu_scale")],
                     name=f"{p}.mlp.gelu_sigmoid")
        h = g.node("Mul", [h, sig], name=f"{p}.mlp.quick_gelu")
        h = linear(h, f"{p}.mlp.fc2", mlp, width, proj_std)
        x = g.node("Add", [x, h], name=f"{p}.residual2")

    pooled = g.node("Gather", [x, idx[0]], name="pooler.class_token", axis=1)  # [N, W]
    pooled = layer_norm(pooled, "post_layernorm")
    proj = w.normal((width, embed_dim), sc["visual_projection"])
    g.node("MatMul", [pooled, g.const("visual_projection.weight", proj)],
           output="image_embeds", name="visual_projection")

    return helper.make_graph(
        g.nodes, "clip_vision_model",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT,
                                       ["batch", 3, IMAGE_SIZE, IMAGE_SIZE])],
        [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT,
                                       ["batch", embed_dim])],
        initializer=g.inits)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--size", choices=sorted(SIZES), default="base")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--no-verify", action="store_true", help="skip the onnxruntime self-test")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    cfg = SIZES[args.size]
    graph = build_graph(cfg, args.seed)
    n_nodes = len(graph.node)
    data = make_model(
        graph,
        f"CLIP ViT-B/32-style image tower ({args.size}: width {cfg['width']}, "
        f"{cfg['layers']} layers, {cfg['heads']} heads, MLP {cfg['mlp']}, embedding "
        f"{cfg['embed_dim']}) with SEEDED RANDOM weights (seed {args.seed}): realistic cost, "
        "no semantics. image_embeds is not normalised.",
        {"architecture": f"clip-vit-32-{args.size}", "weights": "random",
         "seed": args.seed, "embedding_dim": cfg["embed_dim"],
         **{k: v for k, v in cfg.items() if k != "embed_dim"}})

    def verify(path):
        out = run_once(path, (3, 3, IMAGE_SIZE, IMAGE_SIZE),
                       {"image_embeds": (3, cfg["embed_dim"])})["image_embeds"]
        e = out / np.linalg.norm(out, axis=1, keepdims=True)
        cos = e @ e.T
        worst = float(np.max(cos[~np.eye(3, dtype=bool)]))
        if worst > 0.995:
            raise RuntimeError(f"self-test: embeddings of random inputs collapse "
                               f"(cosine {worst:.4f})")

    return publish_and_report(args, data, PREPROCESSOR_CONFIG, verify, n_nodes, t0)


if __name__ == "__main__":
    sys.exit(main())
