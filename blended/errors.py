"""Exceptions the library raises for user-facing problems.

They exist so that the ComfyUI adapters (and any other caller) can tell a user's mistake, which deserves
a short message saying what to fix, from a programming error, which deserves a traceback.
"""

from __future__ import annotations

import os


class BlendedInputError(ValueError):
    """A user-supplied input (image, mask, prompt, setting) cannot be used as given."""


class CheckpointError(ValueError):
    """A model file cannot be used: wrong kind, damaged, unsafe or incompatible."""

    def __init__(self, path: str | os.PathLike | None, message: str):
        self.path = None if path is None else os.fspath(path)
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}{message}")
