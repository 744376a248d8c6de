"""The pack and its test harness on older and newer ComfyUI alike, decided by what ComfyUI has, never by its
version number.

Each compatibility shim is tested twice: against a small fake shaped like ComfyUI 0.38's API (an executor
that reads more cache settings, an asynchronous output cache, a `--disable-assets` flag, `is_oom` that knows
torch's AcceleratorError, an interrupt that is a BaseException) and against the ComfyUI under test.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import re
import types
from pathlib import Path

import pytest
import torch

import harness
from harness.inprocess import cached_output, executor_cache_args
from harness.server import server_command, server_flags, server_supports


def _module_from(path, source: str):
    """A real module from source written to `path`, so `inspect.getsource` can read it back."""
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the executor's cache settings --------------------------------------------------------------------------

# Shaped like ComfyUI 0.38's PromptExecutor: every prompt indexes cache_args whatever the cache type.
NEWER_EXECUTOR = '''
import asyncio


class PromptExecutor:
    def __init__(self, server, cache_type=False, cache_args=None):
        self.cache_args = cache_args

    def execute(self):
        return asyncio.run(self.execute_async())

    async def execute_async(self):
        ram_headroom = int(self.cache_args["ram"] * (1024 ** 3))
        ram_inactive_headroom = int(self.cache_args["ram_inactive"] * (1024 ** 3))
        spill = self.cache_args[ 'spill' ]
        return ram_headroom, ram_inactive_headroom, spill
'''


def test_cache_args_hold_every_key_a_newer_executor_indexes(tmp_path):
    execution = _module_from(tmp_path / "newer_execution.py", NEWER_EXECUTOR)
    args = executor_cache_args(execution)
    assert execution.PromptExecutor(None, cache_args=args).execute() == (0, 0, 0)
    with pytest.raises(KeyError):  # what the harness passed before it read the executor
        execution.PromptExecutor(None, cache_args={"lru": 0, "ram": 0}).execute()


def test_cache_args_without_source_are_the_known_keys():
    compiled_only = types.ModuleType("compiled_execution")  # no file: inspect.getsource raises
    assert executor_cache_args(compiled_only) == {"lru": 0, "ram": 0, "ram_inactive": 0}


# -- the output cache ---------------------------------------------------------------------------------------

class _NewerCache:
    """Shaped like 0.38's HierarchicalCache: `get` is a coroutine, `get_local` the synchronous read."""

    def __init__(self, entries):
        self.entries, self.calls = entries, []

    async def get(self, node_id):
        self.calls.append("get")
        return self.entries.get(node_id)

    def get_local(self, node_id):
        self.calls.append("get_local")
        return self.entries.get(node_id)


class _AsyncOnlyCache:
    def __init__(self, entries):
        self.entries = entries

    async def get(self, node_id):
        await asyncio.sleep(0)
        return self.entries.get(node_id)


class _OlderCache:
    """Shaped like 0.3.x's caches: a synchronous `get` only."""

    def __init__(self, entries):
        self.entries = entries

    def get(self, node_id):
        return self.entries.get(node_id)


@pytest.mark.parametrize("cache_class", [_NewerCache, _AsyncOnlyCache, _OlderCache])
def test_cached_output_reads_sync_and_async_caches(cache_class):
    entry = types.SimpleNamespace(outputs=[[torch.ones(1)]], ui=None)
    cache = cache_class({"6": entry})
    assert cached_output(cache, "6") is entry
    assert cached_output(cache, "7") is None


def test_cached_output_prefers_the_synchronous_read():
    cache = _NewerCache({"6": "entry"})
    cached_output(cache, "6")
    assert cache.calls == ["get_local"]  # the coroutine `get` was never created, so never left un-awaited


# -- the server's command line ------------------------------------------------------------------------------

def _fake_comfyui(root, flags, help_text=""):
    """A ComfyUI tree with nothing but its argument parser, as `comfy/cli_args.py` builds it."""
    (root / "comfy").mkdir(parents=True)
    (root / "comfy" / "options.py").write_text("args_parsing = False\n", encoding="utf-8")
    lines = ["import argparse", "import comfy.options", "", "parser = argparse.ArgumentParser()"]
    lines += [f'parser.add_argument("{flag}", action="store_true", help="{help_text}")' for flag in flags]
    lines += ["args = parser.parse_args() if comfy.options.args_parsing else parser.parse_args([])", ""]
    (root / "comfy" / "cli_args.py").write_text("\n".join(lines), encoding="utf-8")
    return root


def _workspace(root: Path) -> harness.ComfyWorkspace:
    """Workspace paths for a command line (nothing is created)."""
    return harness.ComfyWorkspace(root, *(root / name for name in ("models", "input", "output", "temp", "user",
                                                                   "extra_model_paths.yaml")))


def test_disable_assets_is_passed_where_the_parser_has_it(tmp_path):
    newer = _fake_comfyui(tmp_path / "newer", ["--cpu", "--database-url", "--disable-assets"])
    assert server_flags(newer) == {"-h", "--help", "--cpu", "--database-url", "--disable-assets"}
    workspace = _workspace(tmp_path / "ws")
    assert "--disable-assets" in server_command(newer, workspace, 8188)


def test_a_flag_only_named_in_help_text_is_not_passed(tmp_path):
    # Mentioned, not defined: a text search of cli_args.py would pass it, and that server would refuse to start.
    older = _fake_comfyui(tmp_path / "older", ["--cpu"], help_text="unlike --disable-assets, this is real")
    assert not server_supports(older, "--disable-assets")
    assert "--disable-assets" not in server_command(older, _workspace(tmp_path / "ws"), 8188)


def test_a_tree_without_a_parser_is_a_clear_harness_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(harness.HarnessError, match="command-line flags"):
        server_flags(tmp_path / "empty")


@pytest.mark.comfy
def test_every_flag_of_the_server_command_exists_in_the_comfyui_under_test(comfy_dir, tmp_path):
    command = server_command(comfy_dir, _workspace(tmp_path / "ws"), 8188)
    flags = {arg for arg in command if arg.startswith("--")}
    assert flags <= server_flags(comfy_dir), flags - server_flags(comfy_dir)
    assert ("--disable-assets" in flags) == ("--disable-assets" in server_flags(comfy_dir))


# -- the in-process executor of the ComfyUI under test ------------------------------------------------------

@pytest.mark.comfy
def test_the_installed_executor_gets_its_cache_keys_and_its_cache_is_read(comfy_inprocess):
    import execution

    source = Path(execution.__file__).read_text(encoding="utf-8")
    indexed = set(re.findall(r"""cache_args\[\s*["'](\w+)["']\s*\]""", source))
    assert indexed <= set(comfy_inprocess.executor.cache_args)
    g = harness.graph_builder()
    image = g.node("EmptyImage", id="image", width=8, height=8, batch_size=1, color=0xFF0000)
    g.node("PreviewImage", id="preview", images=image.out(0))
    comfy_inprocess.run(g.finalize())
    entry = cached_output(comfy_inprocess.executor.caches.outputs, "image")
    assert not asyncio.iscoroutine(entry)
    outputs = entry.outputs if hasattr(entry, "outputs") else entry
    assert torch.equal(outputs[0][0][0, 0, 0], torch.tensor([1.0, 0.0, 0.0]))


# -- the pack: out-of-memory advice -------------------------------------------------------------------------

def _accelerator_error(message: str, error_code: int) -> BaseException:
    """torch's AcceleratorError where this torch has it (a RuntimeError with the CUDA error code), else a
    RuntimeError of the same shape."""
    error = getattr(torch, "AcceleratorError", RuntimeError)(message)
    error.error_code = error_code
    return error


@pytest.mark.comfy
def test_out_of_memory_is_decided_by_comfyuis_is_oom_where_it_has_one(comfy_inprocess, monkeypatch):
    bridge = comfy_inprocess.pack_module("comfy_bridge")
    asked = []

    def is_oom(exc):  # 0.38's rule: OOM_EXCEPTION, or an AcceleratorError with code 2 / an OOM message
        asked.append(exc)
        return isinstance(exc, torch.cuda.OutOfMemoryError) or (
            isinstance(exc, getattr(torch, "AcceleratorError", RuntimeError))
            and (getattr(exc, "error_code", None) == 2 or "out of memory" in str(exc).lower()))

    monkeypatch.setattr(bridge, "mm", types.SimpleNamespace(is_oom=is_oom, OOM_EXCEPTION=Exception))
    coded = _accelerator_error("CUDA error: an illegal memory access was encountered", error_code=2)
    assert bridge.is_out_of_memory(coded)  # no OOM in its message: only is_oom knows
    assert not bridge.is_out_of_memory(_accelerator_error("CUDA error: device-side assert", error_code=710))
    assert asked[0] is coded and len(asked) == 2

    monkeypatch.setattr(bridge, "mm", types.SimpleNamespace(OOM_EXCEPTION=Exception))  # no is_oom: older
    assert not bridge.is_out_of_memory(coded)
    assert bridge.is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not bridge.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    # Apple's MPS and DirectML say it in a plain RuntimeError of their own words, with either ComfyUI
    for mm in (types.SimpleNamespace(OOM_EXCEPTION=torch.cuda.OutOfMemoryError),
               types.SimpleNamespace(is_oom=is_oom, OOM_EXCEPTION=Exception)):
        monkeypatch.setattr(bridge, "mm", mm)
        assert bridge.is_out_of_memory(RuntimeError(
            "MPS backend out of memory (MPS allocated: 17.81 GB, other allocations: 1.20 GB, max allowed: 18.13 GB)."))
        assert bridge.is_out_of_memory(RuntimeError("Could not allocate tensor with 603979776 bytes. There is not "
                                                    "enough GPU video memory available!"))
        assert not bridge.is_out_of_memory(RuntimeError("MPS: Unsupported Border padding mode"))


@pytest.mark.comfy
def test_out_of_memory_with_the_comfyui_under_test(comfy_inprocess):
    bridge = comfy_inprocess.pack_module("comfy_bridge")
    oom = _accelerator_error("CUDA error: out of memory", error_code=2)
    assert bridge.is_out_of_memory(oom)
    assert bridge.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    if hasattr(bridge.mm, "is_oom"):
        assert bridge.is_out_of_memory(oom) == bridge.mm.is_oom(oom)


# -- the pack: cancelling -----------------------------------------------------------------------------------

class _BaseInterrupt(BaseException):
    """Shaped like 0.38's InterruptProcessingException: not an Exception, so `except Exception` misses it."""


def _interrupting_mm(real_mm, exception_class, after_calls: int):
    """ComfyUI's model management as the pack sees it, whose interruption check fires on its Nth call."""
    fake = types.SimpleNamespace(**{name: getattr(real_mm, name) for name in dir(real_mm)
                                    if not name.startswith("__")})
    fake.InterruptProcessingException = exception_class
    fake.checks = 0

    def throw_exception_if_processing_interrupted():
        fake.checks += 1
        if fake.checks >= after_calls:
            raise exception_class()

    fake.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    return fake


def _tiny_sampler_inputs(mappings) -> dict:
    (model,) = mappings["BlendedDiffusion_LoadGuidedDiffusion"]().load(harness.GD_TINY_NAME)
    (clip,) = mappings["BlendedDiffusion_LoadCLIP"]().load(harness.CLIP_TINY_NAME, "float32")
    (guidance,) = mappings["BlendedDiffusion_CLIPGuidance"]().build(clip, "a red rock", 1000.0, 50.0, 1)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1.0
    return {"model": model, "guidance": guidance, "image": torch.full((1, 64, 64, 3), 0.5), "mask": mask,
            "seed": 1, "num_results": 1, "respacing": "6", "invert_mask": False, "skip_timesteps": 1,
            "batch_size": 1}


@pytest.mark.comfy
@pytest.mark.parametrize("shape", ["BaseException (0.38)", "installed ComfyUI's"])
def test_cancel_leaves_the_sampler_as_comfyuis_own_exception(comfy_inprocess, monkeypatch, caplog, shape):
    bridge = comfy_inprocess.pack_module("comfy_bridge")
    interrupt = _BaseInterrupt if shape.startswith("Base") else bridge.mm.InterruptProcessingException
    fake = _interrupting_mm(bridge.mm, interrupt, after_calls=2)
    monkeypatch.setattr(bridge, "mm", fake)
    sampler = comfy_inprocess.node_class_mappings[harness.SAMPLER]()
    with caplog.at_level(logging.INFO), pytest.raises(interrupt) as raised:
        sampler.sample(**_tiny_sampler_inputs(comfy_inprocess.node_class_mappings))
    assert type(raised.value) is interrupt and fake.checks == 2  # stopped at the check that fired, unwrapped
    assert "out of memory" not in caplog.text
