"""ComfyUI entry point of the Blended Diffusion node pack.

The nodes import ComfyUI modules, so they are only loaded when ComfyUI is the importer; the pure library in
``blended/`` stays importable (and testable) without ComfyUI.
"""

import importlib.util

if importlib.util.find_spec("folder_paths") is not None and __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # imported outside ComfyUI (e.g. by a test collector)
    NODE_CLASS_MAPPINGS = {}
    NODE_DISPLAY_NAME_MAPPINGS = {}

# The frontend extension that opens workflows saved with earlier widget layouts.
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
