"""Shared fixtures: the tiny reference models for the library tests, and the pack inside a real ComfyUI
(in-process and as a server).

ComfyUI is only imported inside fixtures, so the pure-library unit tests never pay for it.
When ComfyUI is missing, ComfyUI tests are skipped on a developer machine but FAIL under CI=true: a CI run
that silently skipped them would look green while testing nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import harness

REPO_ROOT = Path(__file__).resolve().parent.parent
# Reference fixtures computed by the original code (tests/fixtures/reference/README.md).
REF = REPO_ROOT / "tests" / "fixtures" / "reference"


def assert_close(actual, expected, rel=1e-4, name=""):
    """The reference README's tolerance: max|diff| <= rel * (1 + max|expected|)."""
    expected = expected.to(actual.dtype)
    tol = rel * (1 + expected.abs().max().item())
    diff = (actual - expected).abs().max().item()
    assert diff <= tol, f"{name}: max|diff| {diff:.3g} > {tol:.3g}"


def tiny_unet(file_name: str = "model.safetensors"):
    """The tiny guided-diffusion UNet of the reference fixtures, freshly loaded."""
    from blended.checkpoint import load_guided_diffusion

    return load_guided_diffusion(path=REF / "gd_tiny" / file_name)[0]


def tiny_clip(file_name: str = "model.safetensors"):
    """The tiny guidance CLIP of the reference fixtures, freshly loaded."""
    from blended.clip_model import load_guidance_clip

    return load_guidance_clip(path=REF / "clip_tiny" / file_name)


def parameter_casts():
    """A dispatch mode that records the shape of every parameter cast (``aten._to_copy`` of an ``nn.Parameter``)
    made inside it, in its ``shapes`` list: what a run that stores its weights in the compute dtype avoids."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class ParameterCasts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes: list[tuple[int, ...]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten._to_copy and isinstance(args[0], torch.nn.Parameter):
                self.shapes.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    return ParameterCasts()


class _RepoRootIsNotATestPackage:
    """Keep pytest from importing the repo root's __init__.py, ComfyUI's entry point for the pack.

    pytest >= 8 turns every directory holding an __init__.py, up to the rootdir, into a Package and imports
    that __init__.py; ours does relative imports of ComfyUI-only code, which fails outside ComfyUI.
    """

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if Path(path).resolve() == REPO_ROOT:
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config):
    # Registered as a plugin (not a plain conftest hook) so it also applies to the repo root, above tests/.
    config.pluginmanager.register(_RepoRootIsNotATestPackage(), "blended-repo-root-is-not-a-package")


@pytest.fixture(scope="module")
def unet():
    """Shared by a module's tests: a test that changes the model in place loads its own `tiny_unet()`."""
    return tiny_unet()


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


@pytest.fixture(scope="module")
def diffusion():
    """The reference fixtures' schedule: 100 respaced steps."""
    from blended.diffusion import create_diffusion

    return create_diffusion(timestep_respacing="100")


def _unavailable(reason: str):
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: ComfyUI tests must run, not skip)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    path = harness.ARTIFACTS
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def comfy_dir() -> Path:
    found = harness.find_comfyui()
    if found is None:
        _unavailable("ComfyUI not found: run `bash scripts/setup_env.sh --test` or set COMFYUI_PATH")
    return found


@pytest.fixture(scope="session")
def comfy_workspace(tmp_path_factory, comfy_dir) -> harness.ComfyWorkspace:
    """Models (tiny fixtures), input photos and output dirs for the in-process executor."""
    return harness.build_workspace(tmp_path_factory.mktemp("comfy-inprocess"), comfy_dir)


@pytest.fixture(scope="session")
def comfy_models_dir(comfy_workspace) -> Path:
    return comfy_workspace.models_dir


@pytest.fixture(scope="session")
def comfy_inprocess(comfy_dir, comfy_workspace) -> harness.InProcessComfy:
    """ComfyUI's PromptExecutor in this process; `.run(api_prompt)` -> InProcessResult(outputs, tensors, ...)."""
    runner = harness.InProcessComfy(comfy_dir, comfy_workspace)
    assert not runner.import_failures, f"custom node packages failed to import: {runner.import_failures}"
    return runner


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, comfy_dir, artifacts_dir):
    """One `main.py --cpu` subprocess for the whole session (its startup takes seconds)."""
    workspace = harness.build_workspace(tmp_path_factory.mktemp("comfy-server"), comfy_dir)
    with harness.start_server(comfy_dir, workspace, artifacts_dir / "logs" / "comfy-server.log") as server:
        yield server


@pytest.fixture
def comfy_client(comfy_server):
    client = harness.ComfyClient(comfy_server.base_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def image_and_mask():
    """A random 64x64 IMAGE and a box MASK (1 = edit), for short edits on the tiny models."""
    import torch

    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 64, 64, 3, generator=gen)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 20:44] = 1
    return image, mask
