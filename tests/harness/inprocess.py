"""ComfyUI's own PromptExecutor in this Python process (no HTTP), so tests can look at every node's raw
output tensors. ComfyUI keeps node mappings and loaded models in module globals: one per test session.

Works with ComfyUI from 0.3.x to 0.38 by asking ComfyUI what it has (never by its version): newer ones read
more cache settings, make the output cache asynchronous and have an assets system to switch off.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import inspect
import logging
import re
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

from workflow_format import node_info_v1

from .errors import HarnessError, PromptExecutionError, custom_node_import_failures, shorten
from .locate import REPO_ROOT, find_comfyui, use_comfyui
from .workspace import ComfyWorkspace, build_workspace

# The executor's cache settings: classic caching reads none, but executors read some at every prompt
# whatever the cache type ("ram" since 0.3.x, "ram_inactive" in newer ones). Any other key the installed
# executor indexes is found in its source (`executor_cache_args`); 0 is "no headroom", unused by classic caching.
CACHE_ARGS = {"lru": 0, "ram": 0, "ram_inactive": 0}
_INDEXED_KEY = re.compile(r"""cache_args\[\s*["'](\w+)["']\s*\]""")


def executor_cache_args(execution) -> dict:
    """`cache_args` for `execution.PromptExecutor`: the known keys plus every one its module indexes directly
    (a key read with `.get()` has a default and needs nothing)."""
    try:
        source = inspect.getsource(execution)
    except (OSError, TypeError):  # no source shipped: the known keys are the best guess
        source = ""
    return {**CACHE_ARGS, **{key: 0 for key in _INDEXED_KEY.findall(source)}}


def cached_output(cache, node_id: str):
    """A node's entry in the executor's output cache, on old and new caches alike.

    Newer caches make `get` a coroutine (it may ask external cache providers) and keep a synchronous
    `get_local`; older ones have only a synchronous `get`. A `get` returning an awaitable is awaited.
    """
    entry = cache.get_local(node_id) if hasattr(cache, "get_local") else cache.get(node_id)
    if inspect.isawaitable(entry):
        entry = asyncio.run(entry)
    return entry


class _LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.extend(record.getMessage().splitlines())


class _RecordingServer:
    """The few PromptServer attributes PromptExecutor touches, recording every message it sends."""

    def __init__(self) -> None:
        self.client_id = "in-process-tests"
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.messages: list[tuple[Any, Any]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


@dataclasses.dataclass
class InProcessResult:
    prompt_id: str
    outputs: dict            # history_result["outputs"]: what the UI would show per output node
    tensors: dict            # node id -> tuple of that node's outputs (each a list over list-outputs)
    messages: list           # (event, data) sent to the would-be client, progress included

    def __iter__(self):
        """Unpacks as `outputs, tensors = runner.run(prompt)`, the shape most tests want."""
        return iter((self.outputs, self.tensors))


class InProcessComfy:
    """ComfyUI's PromptExecutor running in this process against a workspace."""

    def __init__(self, comfy_dir: Path, workspace: ComfyWorkspace):
        self.comfy_dir = Path(comfy_dir)
        self.workspace = workspace
        self.import_failures: list[str] = []
        self._boot()

    def _boot(self) -> None:
        use_comfyui(self.comfy_dir)
        from comfy.cli_args import args  # parses an empty argv outside main.py

        args.cpu = True
        args.disable_api_nodes = True
        if hasattr(args, "disable_assets"):  # no asset database to scan or register outputs in
            args.disable_assets = True
        import folder_paths
        import utils.extra_config  # before `nodes`, whose import shadows the top-level `utils`

        folder_paths.set_output_directory(str(self.workspace.output_dir))
        folder_paths.set_input_directory(str(self.workspace.input_dir))
        folder_paths.set_temp_directory(str(self.workspace.temp_dir))
        folder_paths.set_user_directory(str(self.workspace.user_dir))
        utils.extra_config.load_extra_path_config(str(self.workspace.extra_model_paths))
        import comfy.utils
        import execution

        import nodes

        self._execution, self._nodes = execution, nodes
        capture = _LogCapture()
        logging.getLogger().addHandler(capture)
        try:
            self.builtin_import_failures = list(
                asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False)) or [])
        finally:
            logging.getLogger().removeHandler(capture)
        self.import_failures = custom_node_import_failures(capture.lines)
        self.server = _RecordingServer()
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC,
                                                 cache_args=executor_cache_args(execution))

        def progress_hook(value, total, preview_image, prompt_id=None, node_id=None):
            self.server.messages.append(("progress", {"value": value, "max": total, "node": node_id,
                                                      "prompt_id": prompt_id, "preview": preview_image is not None}))

        comfy.utils.set_progress_bar_global_hook(progress_hook)

    @property
    def node_class_mappings(self) -> dict:
        return self._nodes.NODE_CLASS_MAPPINGS

    def pack_module(self, name: str):
        """One of the pack's `nodes/` modules as ComfyUI loaded it (under a module name ComfyUI chose)."""
        path = REPO_ROOT / "nodes" / f"{name}.py"
        return next(module for module in list(sys.modules.values())
                    if getattr(module, "__file__", None) and Path(module.__file__).resolve() == path)

    def node_defs(self) -> dict[str, dict]:
        return {name: node_info_v1(cls) for name, cls in self._nodes.NODE_CLASS_MAPPINGS.items()}

    def validate(self, prompt: dict) -> tuple[bool, Any, list, dict]:
        return asyncio.run(self._execution.validate_prompt(str(uuid.uuid4()), prompt, None))

    def run(self, prompt: dict) -> InProcessResult:
        """Validate and execute an API prompt; raise PromptExecutionError unless it succeeds.

        The executor writes into the prompt (each node's IS_CHANGED result), so each run gets its own copy, as
        each prompt queued through the server is parsed afresh.
        """
        prompt = copy.deepcopy(prompt)
        prompt_id = str(uuid.uuid4())
        ok, error, outputs_to_execute, node_errors = asyncio.run(
            self._execution.validate_prompt(prompt_id, prompt, None))
        if not ok:
            reasons = "; ".join(f"node {nid} ({e.get('class_type')}): " + ", ".join(
                f"{x.get('message')} [{x.get('details')}]" for x in e.get("errors", []))
                for nid, e in (node_errors or {}).items())
            raise PromptExecutionError(f"prompt rejected: {error.get('message')}: {reasons or error}",
                                       {"error": error, "node_errors": node_errors})
        start = len(self.server.messages)
        self.executor.execute(prompt, prompt_id, {"client_id": self.server.client_id}, outputs_to_execute)
        messages = self.server.messages[start:]
        if not self.executor.success:
            errors = [data for event, data in messages if event in ("execution_error", "execution_interrupted")]
            summary = "; ".join(
                f"{e.get('node_type')} (node {e.get('node_id')}): {e.get('exception_type', 'interrupted')}: "
                f"{shorten(str(e.get('exception_message', '')))} at {(e.get('traceback') or ['?'])[-1].strip()}"
                for e in errors)
            raise PromptExecutionError(f"execution failed: {summary}", errors)
        tensors = {}
        for node_id in prompt:
            entry = cached_output(self.executor.caches.outputs, node_id)
            if entry is not None:
                tensors[node_id] = entry.outputs if hasattr(entry, "outputs") else entry
        return InProcessResult(prompt_id, self.executor.history_result.get("outputs", {}), tensors, messages)


@contextlib.contextmanager
def throwaway_comfy() -> Iterator[InProcessComfy]:
    """ComfyUI booted in this process on a workspace deleted afterwards, for the scripts that generate files from
    the live node definitions."""
    comfy = find_comfyui()
    if comfy is None:
        raise HarnessError("no ComfyUI found: run scripts/setup_env.sh first, or set COMFYUI_PATH")
    with tempfile.TemporaryDirectory() as tmp:
        yield InProcessComfy(comfy, build_workspace(Path(tmp), comfy))
