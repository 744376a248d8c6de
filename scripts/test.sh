#!/usr/bin/env bash
# The project's test command: set up the environment (idempotent, fast when already done), then run the
# whole suite. Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not browser" -x`.
# Artifacts (pytest log, junit xml, ComfyUI server logs, browser screenshots) land in test-artifacts/.
set -euo pipefail
# BLENDED_VENV and COMFYUI_PATH may be relative to the caller's folder: make them absolute before any cd.
for var in BLENDED_VENV COMFYUI_PATH; do
  case "${!var:-}" in ""|/*) ;; *) export "$var=$PWD/${!var}" ;; esac
done
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${BLENDED_VENV:-$ROOT/.venv}"

bash "$ROOT/scripts/setup_env.sh" --test

mkdir -p "$ROOT/test-artifacts"
set +e
"$VENV/bin/python" -m pytest tests --junitxml="$ROOT/test-artifacts/junit.xml" "$@" 2>&1 \
  | tee "$ROOT/test-artifacts/pytest.log"
status=${PIPESTATUS[0]}
set -e
exit "$status"
