"""Test-only helpers that run the pack inside a real ComfyUI 0.3.75, headless.

Three ways of driving ComfyUI live here because each catches different bugs:
- `InProcessComfy`: ComfyUI's own PromptExecutor in this Python process (no HTTP), so tests can look at the
  raw output tensors of every node;
- `start_server` + `ComfyClient`: a real `main.py` subprocess spoken to over HTTP and the websocket, exactly
  as the browser does, to catch import failures, progress messages, interruption and leaks;
- `ui_to_api`: the frontend's UI-format -> API-format conversion, so the shipped `workflows/*.json` (which
  only the browser can execute) can be run headlessly too; the browser test cross-checks it against the
  frontend's own `app.graphToPrompt()`.

Nothing here is imported by the pack. ComfyUI's directory goes on `sys.path` only inside `InProcessComfy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = REPO_ROOT / "tests" / "fixtures"
ARTIFACTS = REPO_ROOT / "test-artifacts"
PACK_DIR_NAME = "comfyui-blended-diffusion"

# The tiny models the harness installs, as (ComfyUI folder, file name, fixture it is copied from).
TINY_MODELS = (
    ("guided_diffusion", "gd_tiny.safetensors", FIXTURES / "reference" / "gd_tiny" / "model.safetensors"),
    ("clip_guidance", "clip_tiny.safetensors", FIXTURES / "reference" / "clip_tiny" / "model.safetensors"),
)
GD_TINY_NAME = TINY_MODELS[0][1]
CLIP_TINY_NAME = TINY_MODELS[1][1]

# Example photos, under the names the shipped workflows' LoadImage nodes use.
EXAMPLE_IMAGES = {
    "blended_example_img.png": FIXTURES / "examples" / "img.png",
    "blended_example_mask.png": FIXTURES / "examples" / "mask.png",
    "blended_example_img2.png": FIXTURES / "examples" / "img2.png",
    "blended_example_mask2.png": FIXTURES / "examples" / "mask2.png",
    "blended_example_scribble.png": FIXTURES / "examples" / "scribble.png",
}

# Lines ComfyUI logs when a custom node package fails to import; startup itself carries on regardless.
IMPORT_FAILURE_MARKERS = ("IMPORT FAILED", "Cannot import")
# ComfyUI's own optional extras (e.g. the audio nodes, which need torchaudio, absent for some torch
# versions) log the same markers; they are not ours to fix, so they are reported but not failed on.
_BUILTIN_FAILURE = re.compile(r"IMPORT FAILED: nodes_\w+\.py\s*$|comfy_extras[/\\]|comfy_api_nodes[/\\]")


def custom_node_import_failures(log_lines) -> list[str]:
    """The log lines saying a custom node package (ours or another) failed to import."""
    return [line for line in log_lines
            if any(marker in line for marker in IMPORT_FAILURE_MARKERS) and not _BUILTIN_FAILURE.search(line)]


class HarnessError(RuntimeError):
    """The harness itself could not do its job (no ComfyUI, server did not start, ...)."""


class PromptExecutionError(RuntimeError):
    """ComfyUI reported `execution_error` (or refused the prompt) for a prompt the test expected to run."""

    def __init__(self, message: str, details: Any = None):
        super().__init__(message)
        self.details = details


# --------------------------------------------------------------------------------------------- locating


def find_comfyui() -> Path | None:
    """The ComfyUI tree to test against, found the way scripts/setup_env.sh records it."""
    candidates = []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]))
    recorded = REPO_ROOT / ".venv" / "comfyui-path"
    if recorded.is_file():
        candidates.append(Path(recorded.read_text(encoding="utf-8").strip()))
    candidates.append(REPO_ROOT / ".comfyui")
    for candidate in candidates:
        if (candidate / "main.py").is_file() and (candidate / "execution.py").is_file():
            return candidate.resolve()
    return None


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


# -------------------------------------------------------------------------------------------- workspace


@dataclasses.dataclass(frozen=True)
class ComfyWorkspace:
    """Throw-away directories for one ComfyUI run, so tests never write into the repo or ComfyUI's tree."""

    root: Path
    models_dir: Path
    input_dir: Path
    output_dir: Path
    temp_dir: Path
    user_dir: Path
    extra_model_paths: Path


def build_workspace(root: Path, comfy_dir: Path | None = None) -> ComfyWorkspace:
    """Create models (tiny fixtures), input (example photos), output/temp/user dirs and the extra-paths yaml.

    The yaml registers our two model folders under a base_path, as a user would; it also adds a
    `custom_nodes:` entry pointing at a folder holding a link to this repo when ComfyUI does not already
    load the pack from its own custom_nodes/ (loading it twice would register every node twice).
    """
    root = Path(root)
    models_dir = root / "models"
    for folder, name, source in TINY_MODELS:
        if not source.is_file():
            raise HarnessError(f"missing test fixture {source}: the repo checkout is incomplete")
        (models_dir / folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, models_dir / folder / name)
    input_dir = root / "input"
    input_dir.mkdir(parents=True, exist_ok=True)
    for name, source in EXAMPLE_IMAGES.items():
        shutil.copyfile(source, input_dir / name)
    output_dir, temp_dir, user_dir = root / "output", root / "temp", root / "user"
    for d in (output_dir, temp_dir, user_dir):
        d.mkdir(parents=True, exist_ok=True)

    lines = [
        "blended_diffusion_tests:",
        f"  base_path: {json.dumps(str(models_dir))}",
        "  guided_diffusion: guided_diffusion",
        "  clip_guidance: clip_guidance",
    ]
    if comfy_dir is not None and not pack_is_linked(comfy_dir):
        custom_nodes = root / "custom_nodes"
        custom_nodes.mkdir(exist_ok=True)
        link = custom_nodes / PACK_DIR_NAME
        if not link.exists():
            link.symlink_to(REPO_ROOT, target_is_directory=True)
        lines += ["blended_diffusion_pack:", f"  custom_nodes: {json.dumps(str(custom_nodes))}"]
    extra = root / "extra_model_paths.yaml"
    extra.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ComfyWorkspace(root, models_dir, input_dir, output_dir, temp_dir, user_dir, extra)


# ------------------------------------------------------------------------------------ UI -> API format

# Frontend-only node types: they never reach the server (graphToPrompt drops or resolves through them).
VIRTUAL_NODE_TYPES = frozenset({"Reroute", "PrimitiveNode", "Note", "MarkdownNote"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
MODE_MUTED, MODE_BYPASSED = 2, 4
# The frontend gives these INT inputs a control_after_generate widget even without the option.
IMPLICIT_SEED_NAMES = frozenset({"seed", "noise_seed"})
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")


class WorkflowConversionError(ValueError):
    """A UI workflow cannot be turned into an API prompt (unknown node type, subgraph, bad link)."""


def node_info_v1(node_class: type) -> dict:
    """The `/object_info` entry ComfyUI's server would build for one node class (input part only matters)."""
    if hasattr(node_class, "GET_NODE_INFO_V1"):  # V3 io.ComfyNode
        return node_class.GET_NODE_INFO_V1()
    input_types = node_class.INPUT_TYPES()
    return {
        "input": input_types,
        "input_order": {key: list(value.keys()) for key, value in input_types.items()},
        "output": node_class.RETURN_TYPES,
        "description": getattr(node_class, "DESCRIPTION", ""),
        "category": getattr(node_class, "CATEGORY", "sd"),
    }


def _is_widget(spec: Any) -> bool:
    type_, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    if options.get("forceInput"):
        return False
    return isinstance(type_, (list, tuple)) or type_ in WIDGET_TYPES


def widget_layout(node_def: dict) -> list[tuple[str | None, dict]]:
    """Widget input names in the order the frontend stores their values, None for value-only extras.

    The extras are the control_after_generate combo that follows a seed and the upload button of
    LoadImage-like nodes: both occupy a slot in `widgets_values` but are not prompt inputs. The frontend
    adds the upload button as one more required input, so its slot comes after ALL required widgets
    (LoadImageMask stores [file, channel, "image"]), as checked against the real frontend in test_browser.
    """
    inputs = node_def.get("input", {})
    order = node_def.get("input_order") or {k: list(v.keys()) for k, v in inputs.items()}
    layout: list[tuple[str | None, dict]] = []
    for section in ("required", "optional"):
        uploads = 0
        for name in order.get(section, []):
            spec = inputs.get(section, {}).get(name)
            if spec is None or not _is_widget(spec):
                continue
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            layout.append((name, spec))
            control = options.get("control_after_generate")
            if control is None and spec[0] == "INT":
                control = name in IMPLICIT_SEED_NAMES
            if control:
                layout.append((None, {"extra": "control_after_generate"}))
            if any(options.get(key) for key in UPLOAD_OPTIONS):
                uploads += 1
        layout.extend([(None, {"extra": "upload"})] * uploads)
    return layout


def _links_by_id(workflow: dict) -> dict[int, tuple[int, int, int, int, Any]]:
    links = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):  # schema version 1 spells links as objects
            links[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                                 link.get("type"))
        else:
            links[link[0]] = (link[1], link[2], link[3], link[4], link[5] if len(link) > 5 else None)
    return links


def ui_to_api(workflow: dict, node_defs: dict[str, dict]) -> dict[str, dict]:
    """Convert a UI-format (v0.4) workflow to the API prompt the frontend's graphToPrompt would queue.

    `node_defs` is `/object_info` (or `node_info_v1` of each class). Muted nodes are left out, bypassed
    nodes are wired through (an output takes the bypassed node's input of the same type), reroutes are
    followed, and widgets fed by a PrimitiveNode keep the value stored in the target's widgets_values.
    """
    if workflow.get("definitions", {}).get("subgraphs"):
        raise WorkflowConversionError("subgraphs are not supported by this converter")
    nodes = {node["id"]: node for node in workflow.get("nodes", [])}
    links = _links_by_id(workflow)

    def resolve(link_id: int, seen: frozenset = frozenset()) -> list | None:
        if link_id not in links:
            raise WorkflowConversionError(f"link {link_id} is referenced but not defined")
        origin_id, origin_slot, _, _, link_type = links[link_id]
        if origin_id in seen:
            raise WorkflowConversionError(f"link cycle through node {origin_id}")
        origin = nodes.get(origin_id)
        if origin is None:
            raise WorkflowConversionError(f"link {link_id} starts at missing node {origin_id}")
        mode = origin.get("mode", 0)
        if origin["type"] == "PrimitiveNode" or mode == MODE_MUTED:
            return None
        if origin["type"] == "Reroute" or mode == MODE_BYPASSED:
            candidates = origin.get("inputs") or []
            if origin["type"] == "Reroute":
                chosen = candidates[0] if candidates else None
            else:
                chosen = None
                if origin_slot < len(candidates) and _same_type(candidates[origin_slot].get("type"), link_type):
                    chosen = candidates[origin_slot]
                else:
                    chosen = next((c for c in candidates if _same_type(c.get("type"), link_type)), None)
            if chosen is None or chosen.get("link") is None:
                return None
            return resolve(chosen["link"], seen | {origin_id})
        return [str(origin_id), origin_slot]

    prompt: dict[str, dict] = {}
    for node in sorted(nodes.values(), key=lambda n: (n.get("order", 0), n["id"])):
        node_type = node["type"]
        if node_type in VIRTUAL_NODE_TYPES or node.get("mode", 0) in (MODE_MUTED, MODE_BYPASSED):
            continue
        if node_type not in node_defs:
            raise WorkflowConversionError(f"node {node['id']} has type {node_type!r}, which ComfyUI does not know")
        inputs: dict[str, Any] = {}
        values = node.get("widgets_values")
        if isinstance(values, dict):
            for name, _spec in widget_layout(node_defs[node_type]):
                if name is not None and name in values:
                    inputs[name] = values[name]
        elif values:
            for (name, _spec), value in zip(widget_layout(node_defs[node_type]), values):
                if name is not None:
                    inputs[name] = value
        for slot in node.get("inputs") or []:
            if slot.get("link") is None:
                continue
            source = resolve(slot["link"])
            if source is not None:
                inputs[slot["name"]] = source
        entry = {"class_type": node_type, "inputs": inputs}
        title = node.get("title")
        if title:
            entry["_meta"] = {"title": title}
        prompt[str(node["id"])] = entry
    return prompt


def _same_type(a: Any, b: Any) -> bool:
    if a is None or b is None or a == "*" or b == "*":
        return True
    return bool(set(str(a).split(",")) & set(str(b).split(",")))


def node_types_used(workflow: dict) -> set[str]:
    """Every real (server-side) node type a UI workflow needs."""
    return {n["type"] for n in workflow.get("nodes", []) if n["type"] not in VIRTUAL_NODE_TYPES}


def load_workflow(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def workflow_files() -> list[Path]:
    return sorted((REPO_ROOT / "workflows").glob("*.json"))


# ------------------------------------------------------------------------------------------ in-process


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
    """ComfyUI's PromptExecutor running in this process against a workspace.

    ComfyUI keeps node mappings and loaded models in module globals, so create one per test session.
    """

    def __init__(self, comfy_dir: Path, workspace: ComfyWorkspace):
        self.comfy_dir = Path(comfy_dir)
        self.workspace = workspace
        self.import_failures: list[str] = []
        self._boot()

    def _boot(self) -> None:
        comfy_dir = str(self.comfy_dir)
        # Our repo has a top-level `nodes/` package too; ComfyUI's nodes.py must win the name `nodes`.
        for name in ("nodes", "utils", "server", "execution"):
            module = sys.modules.get(name)
            if module is not None and not str(getattr(module, "__file__", "") or "").startswith(comfy_dir):
                log.warning("dropping non-ComfyUI module %r from sys.modules before booting ComfyUI", name)
                del sys.modules[name]
        if comfy_dir not in sys.path:
            sys.path.insert(0, comfy_dir)
        from comfy.cli_args import args  # parses an empty argv outside main.py

        args.cpu = True
        args.disable_api_nodes = True
        import folder_paths
        import utils.extra_config  # before `nodes`, which shadows top-level `utils` (spec §0)

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
                                                 cache_args={"lru": 0, "ram": 0})

        def progress_hook(value, total, preview_image, prompt_id=None, node_id=None):
            self.server.messages.append(("progress", {"value": value, "max": total, "node": node_id,
                                                      "prompt_id": prompt_id, "preview": preview_image is not None}))

        comfy.utils.set_progress_bar_global_hook(progress_hook)

    @property
    def node_class_mappings(self) -> dict:
        return self._nodes.NODE_CLASS_MAPPINGS

    def node_defs(self) -> dict[str, dict]:
        return {name: node_info_v1(cls) for name, cls in self._nodes.NODE_CLASS_MAPPINGS.items()}

    def validate(self, prompt: dict) -> tuple[bool, Any, list, dict]:
        return asyncio.run(self._execution.validate_prompt(str(uuid.uuid4()), prompt, None))

    def run(self, prompt: dict) -> InProcessResult:
        """Validate and execute an API prompt; raise PromptExecutionError unless it succeeds."""
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
                f"{_shorten(str(e.get('exception_message', '')))} at {(e.get('traceback') or ['?'])[-1].strip()}"
                for e in errors)
            raise PromptExecutionError(f"execution failed: {summary}", errors)
        tensors = {}
        for node_id in prompt:
            entry = self.executor.caches.outputs.get(node_id)
            if entry is not None:
                tensors[node_id] = entry.outputs if hasattr(entry, "outputs") else entry
        return InProcessResult(prompt_id, self.executor.history_result.get("outputs", {}), tensors, messages)


# ------------------------------------------------------------------------------------------------ server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class ComfyServer:
    process: subprocess.Popen
    port: int
    log_path: Path
    workspace: ComfyWorkspace

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def import_failures(self) -> list[str]:
        return custom_node_import_failures(self.log_text().splitlines())


def server_command(comfy_dir: Path, workspace: ComfyWorkspace, port: int, extra_args=()) -> list[str]:
    return [sys.executable, "-u", str(comfy_dir / "main.py"), "--cpu", "--listen", "127.0.0.1",
            "--port", str(port), "--extra-model-paths-config", str(workspace.extra_model_paths),
            "--output-directory", str(workspace.output_dir), "--input-directory", str(workspace.input_dir),
            "--temp-directory", str(workspace.temp_dir), "--user-directory", str(workspace.user_dir),
            "--database-url", "sqlite:///:memory:", "--disable-api-nodes", "--disable-auto-launch",
            *extra_args]


@contextlib.contextmanager
def start_server(comfy_dir: Path, workspace: ComfyWorkspace, log_path: Path, *, timeout: float = 180.0,
                 extra_args=(), require_clean_imports: bool = True) -> Iterator[ComfyServer]:
    """Run `main.py` until the block ends; fail fast with the log's tail if it dies or never serves."""
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(server_command(comfy_dir, workspace, port, extra_args), cwd=str(comfy_dir),
                                   stdout=log_file, stderr=subprocess.STDOUT, env=env)
    server = ComfyServer(process, port, log_path, workspace)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise HarnessError(f"ComfyUI exited with {process.returncode} before serving:\n"
                                   f"{_tail(server.log_text())}")
            try:
                with urllib.request.urlopen(server.base_url + "/system_stats", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise HarnessError(f"ComfyUI did not serve within {timeout:.0f} s:\n{_tail(server.log_text())}")
            time.sleep(0.5)
        failures = server.import_failures()
        if failures and require_clean_imports:
            raise HarnessError("ComfyUI failed to import a custom node package:\n" + "\n".join(failures)
                               + "\n" + _tail(server.log_text()))
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=20)


def _shorten(text: str, limit: int = 3000) -> str:
    return text if len(text) <= limit else text[: limit // 2] + "\n[...]\n" + text[-limit // 2:]


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


class ComfyClient:
    """A minimal HTTP + websocket client of ComfyUI's API, the same protocol the frontend uses."""

    def __init__(self, base_url: str):
        self.base_url = base_url.rstrip("/")
        self.client_id = uuid.uuid4().hex
        self._ws = None
        self._lock = threading.Lock()

    # ---- HTTP
    def get_json(self, path: str, timeout: float = 60) -> Any:
        with urllib.request.urlopen(self.base_url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def get_bytes(self, path: str, timeout: float = 60) -> tuple[int, str, bytes]:
        with urllib.request.urlopen(self.base_url + path, timeout=timeout) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()

    def post_json(self, path: str, payload: Any, timeout: float = 60) -> tuple[int, Any]:
        data = json.dumps(payload).encode()
        request = urllib.request.Request(self.base_url + path, data=data,
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read()
                return response.status, (json.loads(body) if body.strip() else None)
        except urllib.error.HTTPError as error:
            body = error.read()
            try:
                return error.code, json.loads(body)
            except ValueError:
                return error.code, body.decode(errors="replace")

    def object_info(self) -> dict:
        return self.get_json("/object_info")

    def history(self, prompt_id: str) -> dict:
        return self.get_json(f"/history/{prompt_id}").get(prompt_id, {})

    def view(self, image: dict) -> bytes:
        query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
        status, _ctype, body = self.get_bytes("/view?" + query)
        if status != 200:
            raise PromptExecutionError(f"/view returned {status} for {image}")
        return body

    def interrupt(self) -> None:
        self.post_json("/interrupt", {})

    def queue_prompt(self, prompt: dict) -> str:
        self.connect()
        status, body = self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if status != 200:
            raise PromptExecutionError(f"/prompt refused with HTTP {status}: {body}", body)
        return body["prompt_id"]

    # ---- websocket
    def connect(self, timeout: float = 30) -> None:
        if self._ws is not None:
            return
        import websocket  # websocket-client

        url = self.base_url.replace("http://", "ws://") + f"/ws?clientId={self.client_id}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._ws = websocket.create_connection(url, timeout=timeout)
                return
            except (ConnectionError, OSError, websocket.WebSocketException):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def close(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                self._ws.close()
            self._ws = None

    def messages(self, timeout: float) -> Iterator[dict]:
        """Yield JSON websocket messages (binary preview frames become {'type': 'binary', 'data': {...}})."""
        import websocket

        self.connect()
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no end of prompt within {timeout:.0f} s")
            self._ws.settimeout(max(remaining, 0.1))
            try:
                frame = self._ws.recv()
            except websocket.WebSocketTimeoutException as error:
                raise TimeoutError(f"no end of prompt within {timeout:.0f} s") from error
            if isinstance(frame, bytes):
                kind = int.from_bytes(frame[:4], "big") if len(frame) >= 4 else -1
                yield {"type": "binary", "data": {"event": kind, "size": len(frame)}}
            else:
                yield json.loads(frame)

    def wait_for_prompt(self, prompt_id: str, timeout: float = 300, *, on_message=None,
                        raise_on_error: bool = True) -> list[dict]:
        """Collect this prompt's messages until `executing` with node None (ComfyUI's end marker)."""
        collected: list[dict] = []
        for message in self.messages(timeout):
            data = message.get("data") or {}
            if message["type"] != "binary" and data.get("prompt_id") not in (None, prompt_id):
                continue
            collected.append(message)
            if on_message is not None:
                on_message(message)
            if message["type"] == "execution_error" and raise_on_error:
                raise PromptExecutionError(
                    f"{data.get('node_type')} (node {data.get('node_id')}) failed: "
                    f"{data.get('exception_type')}: {_shorten(str(data.get('exception_message')))}\n"
                    f"{_shorten(''.join(data.get('traceback') or []))}", data)
            if message["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                return collected

    def run_prompt(self, prompt: dict, timeout: float = 300, **kwargs) -> tuple[str, list[dict]]:
        prompt_id = self.queue_prompt(prompt)
        return prompt_id, self.wait_for_prompt(prompt_id, timeout, **kwargs)

    def output_images(self, prompt_id: str) -> list[dict]:
        images = []
        for output in self.history(prompt_id).get("outputs", {}).values():
            images.extend(output.get("images", []))
        return images


# ------------------------------------------------------------------------------------ prompt building


def widget_default(spec: Any) -> Any:
    """The value a freshly added node's widget starts with in the frontend."""
    type_, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    if "default" in options:
        return options["default"]
    if isinstance(type_, (list, tuple)):
        return type_[0] if type_ else None
    if type_ == "COMBO":
        return (options.get("options") or [None])[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(type_)


def fill_defaults(prompt: dict, node_defs: dict) -> dict:
    """Give every required widget a node's prompt leaves out its default, as the frontend would."""
    for entry in prompt.values():
        required = node_defs[entry["class_type"]].get("input", {}).get("required", {})
        for name, spec in required.items():
            if name not in entry["inputs"] and _is_widget(spec):
                entry["inputs"][name] = widget_default(spec)
    return prompt


SAMPLER = "BlendedDiffusion_Sampler"


def tiny_edit_prompt(node_defs: dict, *, seed: int = 1, respacing: str = "6", skip_timesteps: int = 1,
                     num_results: int = 1, text: str = "a red rock", image: str = "blended_example_img.png",
                     mask: str = "blended_example_mask.png", **sampler_inputs) -> dict:
    """A complete edit with the tiny models: photo + white-is-edit mask -> sampler -> SaveImage.

    Node ids are fixed so tests can find them: "1" image, "2" mask, "3" UNet, "4" CLIP, "5" guidance,
    "6" sampler, "7" SaveImage of the edits.
    """
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "LoadImageMask", "inputs": {"image": mask, "channel": "red"}},
        "3": {"class_type": "BlendedDiffusion_LoadGuidedDiffusion", "inputs": {"model_name": GD_TINY_NAME}},
        "4": {"class_type": "BlendedDiffusion_LoadCLIP", "inputs": {"clip_name": CLIP_TINY_NAME}},
        "5": {"class_type": "BlendedDiffusion_CLIPGuidance", "inputs": {"clip": ["4", 0], "prompt": text}},
        "6": {"class_type": SAMPLER, "inputs": {
            "model": ["3", 0], "guidance": ["5", 0], "image": ["1", 0], "mask": ["2", 0], "seed": seed,
            "num_results": num_results, "respacing": respacing, "skip_timesteps": skip_timesteps,
            **sampler_inputs}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "blended_test"}},
    }
    return fill_defaults(prompt, node_defs)


def set_widget_value(node: dict, node_def: dict, name: str, value: Any) -> bool:
    """Change one widget of a UI-format node in place; False when the node has no such widget."""
    values = node.get("widgets_values")
    if isinstance(values, dict):
        if name in values:
            values[name] = value
            return True
        return False
    for index, (widget_name, _spec) in enumerate(widget_layout(node_def)):
        if widget_name == name and values is not None and index < len(values):
            values[index] = value
            return True
    return False


def tiny_overrides(class_type: str, current: dict) -> dict:
    """Widget values that make a node of a shipped workflow run in seconds with the tiny models.

    `current` holds the node's present widget values; only values that exist are changed.
    """
    changes: dict[str, Any] = {}
    if class_type == "BlendedDiffusion_LoadGuidedDiffusion":
        changes["model_name"] = GD_TINY_NAME
    elif class_type == "BlendedDiffusion_LoadCLIP":
        changes["clip_name"] = CLIP_TINY_NAME
    elif class_type == SAMPLER:
        changes["respacing"] = "4"
        changes["skip_timesteps"] = min(int(current.get("skip_timesteps", 0)), 1)
        changes["num_results"] = min(int(current.get("num_results", 1)), 2)
        if int(current.get("capture_every", 0)) > 0:
            changes["capture_every"] = 1
    if isinstance(current.get("num_views"), int):
        changes["num_views"] = min(current["num_views"], 2)
    return {name: value for name, value in changes.items() if name in current}


def shrink_prompt(prompt: dict) -> dict:
    """An API prompt with every node's tiny_overrides applied (a copy)."""
    shrunk = json.loads(json.dumps(prompt))
    for entry in shrunk.values():
        widget_values = {k: v for k, v in entry["inputs"].items() if not isinstance(v, list)}
        entry["inputs"].update(tiny_overrides(entry["class_type"], widget_values))
    return shrunk


def shrink_ui_workflow(workflow: dict, node_defs: dict) -> dict:
    """A UI workflow with every node's tiny_overrides applied to its widgets_values (a copy)."""
    shrunk = json.loads(json.dumps(workflow))
    for node in shrunk.get("nodes", []):
        node_def = node_defs.get(node["type"])
        if node_def is None or node.get("widgets_values") is None:
            continue
        values = node["widgets_values"]
        if isinstance(values, dict):
            current = dict(values)
        else:
            current = {name: value for (name, _s), value in zip(widget_layout(node_def), values) if name}
        for name, value in tiny_overrides(node["type"], current).items():
            set_widget_value(node, node_def, name, value)
    return shrunk
