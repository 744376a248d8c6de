"""Test-only helpers that run the pack inside a real ComfyUI, headless.

Three ways of driving ComfyUI live here because each catches different bugs:
- `inprocess`: ComfyUI's own PromptExecutor in this Python process (no HTTP), so tests can look at the raw
  output tensors of every node;
- `server` + `client`: a real `main.py` subprocess spoken to over HTTP and the websocket, exactly as the
  browser does, to catch import failures, progress messages, interruption and leaks;
- the repo's `workflow_format.ui_to_api`: the frontend's UI -> API conversion, so the shipped
  `workflows/*.json` run headlessly too (`prompts` makes them tiny); the browser test cross-checks it
  against the frontend's own `app.graphToPrompt()`.

`locate` finds the ComfyUI tree, `workspace` builds throw-away folders with the tiny models. Nothing here is
imported by the pack; ComfyUI's directory goes on `sys.path` only when a test needs ComfyUI's modules.
"""

from .client import ComfyClient
from .errors import HarnessError, PromptExecutionError, custom_node_import_failures, tail
from .inprocess import InProcessComfy, InProcessResult, throwaway_comfy
from .locate import ARTIFACTS, FIXTURES, PACK_DIR_NAME, REPO_ROOT, find_comfyui
from .prompts import (
                      SAMPLER,
                      graph_builder,
                      load_workflow,
                      shrink_prompt,
                      shrink_ui_workflow,
                      tiny_edit_prompt,
                      workflow_files,
)
from .server import ComfyServer, start_server
from .workspace import CLIP_TINY_NAME, GD_TINY_NAME, TINY_MODELS, ComfyWorkspace, build_workspace

__all__ = ["ARTIFACTS", "CLIP_TINY_NAME", "FIXTURES", "GD_TINY_NAME", "PACK_DIR_NAME", "REPO_ROOT", "SAMPLER",
           "TINY_MODELS", "ComfyClient", "ComfyServer", "ComfyWorkspace", "HarnessError", "InProcessComfy",
           "InProcessResult", "PromptExecutionError", "build_workspace", "custom_node_import_failures",
           "find_comfyui", "graph_builder", "load_workflow", "shrink_prompt", "shrink_ui_workflow", "start_server",
           "tail", "throwaway_comfy", "tiny_edit_prompt", "workflow_files"]
