#!/usr/bin/env bash
# Start ComfyUI with this pack: set up (idempotent), put the example photos where the shipped workflows
# expect them, then run ComfyUI on 127.0.0.1:${PORT:-8188}. Extra arguments go to ComfyUI's main.py.
# Works without a GPU: --cpu is added when torch sees no CUDA, MPS or XPU device (and --directml is not given).
# --download-models first fetches the models the pack uses into ComfyUI's model folders (resumable; files
# already there are kept): see scripts/download_models.py. --download-required-models fetches only the required
# ones (not the optional class-conditional models and ViT-L-14).
set -euo pipefail
# BLENDED_VENV and COMFYUI_PATH may be relative to the caller's folder: make them absolute before any cd.
for var in BLENDED_VENV COMFYUI_PATH; do
  case "${!var:-}" in ""|/*) ;; *) export "$var=$PWD/${!var}" ;; esac
done
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BLENDED_VENV:-$ROOT/.venv}"

DOWNLOAD=0
download_args=()
args=()
for arg in "$@"; do
  case "$arg" in
    --download-models) DOWNLOAD=1 ;;
    --download-required-models) DOWNLOAD=1; download_args=(--required-only) ;;
    *) args+=("$arg") ;;
  esac
done
set -- ${args[@]+"${args[@]}"}

bash "$ROOT/scripts/setup_env.sh"
COMFY="$(cat "$VENV/comfyui-path")"

if [ "$DOWNLOAD" = 1 ]; then
  status=0
  PYTHONPATH="$ROOT" "$VENV/bin/python" "$ROOT/scripts/download_models.py" --comfyui "$COMFY" \
    ${download_args[@]+"${download_args[@]}"} || status=$?
  # 130: stopped with Ctrl-C, which stops this script too (the download keeps its .part to resume).
  if [ "$status" = 130 ]; then exit 130; fi
  if [ "$status" != 0 ]; then
    echo "[start] some models were not fetched (see above): starting ComfyUI anyway"
  fi
fi

# The workflows' LoadImage nodes name these files; ComfyUI only lists files in its input folder.
mkdir -p "$COMFY/input"
for example in "$ROOT"/tests/fixtures/examples/*.png; do
  cp -f "$example" "$COMFY/input/blended_example_$(basename "$example")"
done

extra=()
if ! "$VENV/bin/python" -c "import sys, torch
mps = getattr(torch.backends, 'mps', None)
xpu = getattr(torch, 'xpu', None)
sys.exit(0 if torch.cuda.is_available() or (mps is not None and mps.is_available())
         or (xpu is not None and xpu.is_available()) else 1)" 2>/dev/null; then
  case " $* " in
    *" --cpu "*|*" --directml "*|*" --directml="*) ;;
    *)
      # A GPU the driver sees but torch cannot use: most often torch's CUDA build is newer than the driver
      # supports (or torch is a CPU-only build). Say so, with the versions, and how to get a matching torch.
      gpu="$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | sed -n 1p)" || gpu=""
      if [ -n "$gpu" ]; then
        driver_cuda="$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' | sed -n 1p)" || true
        torch_build="$("$VENV/bin/python" -c 'import torch; print(torch.__version__, torch.version.cuda)' \
                       2>/dev/null)" || torch_build="(not importable) None"
        echo "[start] nvidia-smi lists ${gpu%,*} (driver ${gpu##*, }, CUDA up to ${driver_cuda:-?}), but torch" \
             "${torch_build% *} (built for CUDA ${torch_build##* }) sees no CUDA device: a torch built for a newer" \
             "CUDA than the driver supports, or a CPU-only torch (CUDA None), does that."
        echo "[start] To use the GPU, update the NVIDIA driver, or install a torch built for the driver's CUDA:"
        echo "[start]   \"$VENV/bin/python\" -m pip uninstall -y torch torchvision"
        echo "[start]   TORCH_INDEX_URL=https://download.pytorch.org/whl/cuXYZ bash \"$ROOT/scripts/start.sh\""
        echo "[start] where cuXYZ is a CUDA build of torch at or below the driver's CUDA ${driver_cuda:-version}" \
             "(e.g. cu126 for CUDA 12.6 or newer; pytorch.org lists the builds of each torch release, and" \
             "TORCH_VERSION picks the release). See README."
        echo "[start] running ComfyUI with --cpu for now"
      else
        echo "[start] no CUDA, MPS or XPU device found: running ComfyUI with --cpu"
      fi
      extra+=(--cpu) ;;
  esac
fi

echo "[start] models go in $COMFY/models/guided_diffusion and $COMFY/models/clip_guidance"
cd "$COMFY"
exec "$VENV/bin/python" main.py --listen 127.0.0.1 --port "${PORT:-8188}" ${extra[@]+"${extra[@]}"} "$@"
