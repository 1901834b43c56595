#!/usr/bin/env bash
# Downloads a public ONNX export of the real openai/clip-vit-base-patch32 image tower
# (Hugging Face repo Xenova/clip-vit-base-patch32, the transformers.js export of
# CLIPVisionModelWithProjection: input `pixel_values` [batch, 3, 224, 224], output
# `image_embeds` [batch, 512], plus `last_hidden_state`) with its preprocessor_config.json:
#
#   models/out/clip-vit-b32-real/{model.onnx, preprocessor_config.json}        (~350 MB)
#   models/out/clip-vit-b32-real-int8/{model.onnx, preprocessor_config.json}   (~90 MB,
#       the repo's own onnx/vision_model_quantized.onnx; only with --int8 or --all)
#
# These are the same graph and cost as the seeded random model that build_clip.py makes,
# but with the real weights, so embeddings are semantically meaningful. This needs access
# to huggingface.co (not available on the CI/dev machines of this project, which reach
# only package registries); run it where you have internet, or copy the files over.
#
# Usage: models/download_real_clip.sh [--int8 | --all] [--force]
#   HF_ENDPOINT   mirror base URL (default https://huggingface.co)
#   CLIP_REPO     repo id (default Xenova/clip-vit-base-patch32)
#   CLIP_REVISION branch, tag or commit (default main)
#
# Note: preprocessor_config.json is stored exactly as published. Hugging Face configs
# come in two styles: {"size": {"shortest_edge": 224}, "crop_size": {"height": 224,
# "width": 224}} or the older plain integers {"size": 224, "crop_size": 224}; both mean
# "resize the shorter side to 224, center-crop 224x224".
set -euo pipefail
cd "$(dirname "$0")/.."

ENDPOINT=${HF_ENDPOINT:-https://huggingface.co}
REPO=${CLIP_REPO:-Xenova/clip-vit-base-patch32}
REV=${CLIP_REVISION:-main}
OUT=models/out

want_fp32=1 want_int8=0 force=0
for arg in "$@"; do
  case $arg in
    --int8) want_fp32=0; want_int8=1 ;;
    --all) want_fp32=1; want_int8=1 ;;
    --force) force=1 ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

command -v curl >/dev/null || { echo "error: curl is required" >&2; exit 1; }

url() { echo "$ENDPOINT/$REPO/resolve/$REV/$1"; }

# Fail early and clearly when the hub is unreachable (offline machine, firewall).
if ! curl -fsSL --head --connect-timeout 10 --max-time 30 -o /dev/null \
    "$(url preprocessor_config.json)"; then
  echo "error: cannot reach $(url preprocessor_config.json)" >&2
  echo "       This script needs internet access to $ENDPOINT (set HF_ENDPOINT for a mirror)." >&2
  echo "       Offline, use the seeded random stand-in: python models/build_clip.py --size base" >&2
  exit 1
fi

fetch() { # remote-path  local-file
  local tmp="$2.part"
  echo "downloading $(url "$1")"
  curl -fL --retry 3 --connect-timeout 10 -o "$tmp" "$(url "$1")"
  mv "$tmp" "$2"
}

# Checks the ONNX interface when the project's venv (scripts/setup.sh) is available.
check_model() { # model-file
  local py=.tools/venv/bin/python
  [ -x "$py" ] || { echo "(skipping interface check: $py not found)"; return 0; }
  "$py" - "$1" <<'PYEOF'
import sys, onnx
m = onnx.load(sys.argv[1], load_external_data=False)
ins = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
outs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in m.graph.output}
print(f"  inputs {ins}\n  outputs {outs}")
if "pixel_values" not in ins or "image_embeds" not in outs:
    sys.exit("error: expected input pixel_values and output image_embeds")
PYEOF
}

get() { # remote-model-path  dest-dir
  local dir=$OUT/$2
  if [ -f "$dir/model.onnx" ] && [ "$force" = 0 ]; then
    echo "$dir/model.onnx exists (use --force to download again)"
    return 0
  fi
  mkdir -p "$dir"
  fetch preprocessor_config.json "$dir/preprocessor_config.json"
  fetch "$1" "$dir/model.onnx.download"
  check_model "$dir/model.onnx.download"
  mv "$dir/model.onnx.download" "$dir/model.onnx"
  echo "ok: $dir ($(du -h "$dir/model.onnx" | cut -f1))"
}

[ "$want_fp32" = 1 ] && get onnx/vision_model.onnx clip-vit-b32-real
[ "$want_int8" = 1 ] && get onnx/vision_model_quantized.onnx clip-vit-b32-real-int8
exit 0
