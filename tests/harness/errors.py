"""What can go wrong while driving ComfyUI, and how the harness reports it."""

from __future__ import annotations

import re
from typing import Any

# Lines ComfyUI logs when a custom node package fails to import; startup itself carries on regardless.
IMPORT_FAILURE_MARKERS = ("IMPORT FAILED", "Cannot import")
# ComfyUI's own optional extras (e.g. the audio nodes, which need torchaudio, absent for some torch
# versions) log the same markers; they are not ours to fix, so they are reported but not failed on.
_BUILTIN_FAILURE = re.compile(r"IMPORT FAILED: nodes_\w+\.py\s*$|comfy_extras[/\\]|comfy_api_nodes[/\\]")


class HarnessError(RuntimeError):
    """The harness itself could not do its job (no ComfyUI, server did not start, ...)."""


class PromptExecutionError(RuntimeError):
    """ComfyUI reported `execution_error` (or refused the prompt) for a prompt the test expected to run."""

    def __init__(self, message: str, details: Any = None):
        super().__init__(message)
        self.details = details


def custom_node_import_failures(log_lines) -> list[str]:
    """The log lines saying a custom node package (ours or another) failed to import."""
    return [line for line in log_lines
            if any(marker in line for marker in IMPORT_FAILURE_MARKERS) and not _BUILTIN_FAILURE.search(line)]


def shorten(text: str, limit: int = 3000) -> str:
    return text if len(text) <= limit else text[: limit // 2] + "\n[...]\n" + text[-limit // 2:]


def tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])
