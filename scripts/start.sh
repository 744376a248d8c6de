#!/usr/bin/env bash
# Start ComfyUI with this pack: set up (idempotent), put the example photos where the shipped workflows
# expect them, then run ComfyUI on 127.0.0.1:${PORT:-8188}. Extra arguments go to ComfyUI's main.py.
# Works without a GPU: --cpu is added when torch sees neither CUDA nor MPS.
# --download-models first fetches the models the pack uses into ComfyUI's model folders (resumable; files
# already there are kept): see scripts/download_models.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BLENDED_VENV:-$ROOT/.venv}"

DOWNLOAD=0
args=()
for arg in "$@"; do
  if [ "$arg" = "--download-models" ]; then DOWNLOAD=1; else args+=("$arg"); fi
done
set -- ${args[@]+"${args[@]}"}

bash "$ROOT/scripts/setup_env.sh"
COMFY="$(cat "$VENV/comfyui-path")"

if [ "$DOWNLOAD" = 1 ]; then
  if ! PYTHONPATH="$ROOT" "$VENV/bin/python" "$ROOT/scripts/download_models.py" --comfyui "$COMFY"; then
    echo "[start] some models could not be fetched (see above; running it again resumes): starting ComfyUI anyway"
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
sys.exit(0 if torch.cuda.is_available() or (mps is not None and mps.is_available()) else 1)" 2>/dev/null; then
  case " $* " in *" --cpu "*) ;; *) echo "[start] no CUDA/MPS device found: running ComfyUI with --cpu"; extra+=(--cpu) ;; esac
fi

echo "[start] models go in $COMFY/models/guided_diffusion and $COMFY/models/clip_guidance"
cd "$COMFY"
exec "$VENV/bin/python" main.py --listen 127.0.0.1 --port "${PORT:-8188}" "${extra[@]}" "$@"
