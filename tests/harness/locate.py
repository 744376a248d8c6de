"""Where the repo, its fixtures and the ComfyUI tree under test are."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = REPO_ROOT / "tests" / "fixtures"
ARTIFACTS = REPO_ROOT / "test-artifacts"
PACK_DIR_NAME = "comfyui-blended-diffusion"
# Top-level names ComfyUI's own modules take; our repo has a `nodes/` package too.
_COMFY_TOP_LEVEL = ("nodes", "utils", "server", "execution")


def find_comfyui() -> Path | None:
    """The ComfyUI tree to test against, found the way scripts/setup_env.sh records it."""
    candidates = []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]))
    venv = Path(os.environ.get("BLENDED_VENV") or REPO_ROOT / ".venv")  # the scripts' venv, as they choose it
    recorded = venv / "comfyui-path"
    if recorded.is_file():
        candidates.append(Path(recorded.read_text(encoding="utf-8").strip()))
    candidates.append(REPO_ROOT / ".comfyui")
    for candidate in candidates:
        if (candidate / "main.py").is_file() and (candidate / "execution.py").is_file():
            return candidate.resolve()
    return None


def use_comfyui(comfy_dir: Path) -> None:
    """Make ComfyUI's top-level modules importable in this (test) process, ComfyUI's names winning."""
    comfy_dir = str(comfy_dir)
    for name in _COMFY_TOP_LEVEL:
        module = sys.modules.get(name)
        if module is not None and not str(getattr(module, "__file__", "") or "").startswith(comfy_dir):
            log.warning("dropping non-ComfyUI module %r from sys.modules before importing ComfyUI", name)
            del sys.modules[name]
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)


def pack_is_linked(comfy_dir: Path) -> bool:
    """Whether ComfyUI's own custom_nodes/ already loads this repo (setup_env.sh links it)."""
    custom_nodes = comfy_dir / "custom_nodes"
    if not custom_nodes.is_dir():
        return False
    for entry in custom_nodes.iterdir():
        if entry.name.endswith(".disabled"):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and entry.resolve() == REPO_ROOT:
                return True
    return False
