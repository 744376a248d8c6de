"""A real ComfyUI `main.py` subprocess, started on a free port against a workspace and stopped afterwards."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from .errors import HarnessError, custom_node_import_failures, tail
from .workspace import ComfyWorkspace


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


# Run in ComfyUI's directory: its argument parser, as `main.py` will build it (no argv is parsed on import).
_LIST_FLAGS = "import json, comfy.cli_args as c; print(json.dumps(sorted(c.parser._option_string_actions)))"
# Flags only some ComfyUI versions know, passed where the parser has them. Newer servers start an assets
# system (a database scan of every model folder, outputs registered as assets) unless told not to.
OPTIONAL_FLAGS = ("--disable-assets",)


@functools.lru_cache(maxsize=None)
def server_flags(comfy_dir: Path) -> frozenset[str]:
    """Every command-line flag this ComfyUI's `main.py` accepts, asked of its own argument parser in a
    separate process (so this one imports nothing of that ComfyUI)."""
    done = subprocess.run([sys.executable, "-c", _LIST_FLAGS], cwd=str(comfy_dir), capture_output=True,
                          text=True, timeout=120)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise HarnessError(f"could not read ComfyUI's command-line flags in {comfy_dir} "
                           f"(exit {done.returncode}):\n{tail(done.stderr)}")
    return frozenset(json.loads(lines[-1]))


def server_supports(comfy_dir: Path, flag: str) -> bool:
    """Whether this ComfyUI's `main.py` accepts a command-line flag."""
    return flag in server_flags(Path(comfy_dir))


def server_command(comfy_dir: Path, workspace: ComfyWorkspace, port: int, extra_args=()) -> list[str]:
    optional = [flag for flag in OPTIONAL_FLAGS if server_supports(comfy_dir, flag)]
    return [sys.executable, "-u", str(comfy_dir / "main.py"), "--cpu", "--listen", "127.0.0.1",
            "--port", str(port), "--extra-model-paths-config", str(workspace.extra_model_paths),
            "--output-directory", str(workspace.output_dir), "--input-directory", str(workspace.input_dir),
            "--temp-directory", str(workspace.temp_dir), "--user-directory", str(workspace.user_dir),
            "--database-url", "sqlite:///:memory:", "--disable-api-nodes", "--disable-auto-launch",
            *optional, *extra_args]


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
                                   f"{tail(server.log_text())}")
            try:
                with urllib.request.urlopen(server.base_url + "/system_stats", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise HarnessError(f"ComfyUI did not serve within {timeout:.0f} s:\n{tail(server.log_text())}")
            time.sleep(0.5)
        failures = server.import_failures()
        if failures and require_clean_imports:
            raise HarnessError("ComfyUI failed to import a custom node package:\n" + "\n".join(failures)
                               + "\n" + tail(server.log_text()))
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=20)
