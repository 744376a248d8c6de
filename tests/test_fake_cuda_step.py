"""A whole guided step on a CUDA device copies nothing from the host but the views' parameters.

A plain ``tensor.to("cuda")`` from host memory makes the host wait for every kernel queued before it, so one
such copy per step idles the GPU once per step. The step is run here on fake CUDA tensors (torch's
``FakeTensorMode``): every device-dependent branch takes its CUDA path, and a copy from a CPU tensor to the
device is seen as the op that makes a CUDA tensor from a CPU one. The models are placed as ComfyUI's model
manager places them: it moves the UNet and ``GuidanceCLIP.model`` only, so whatever else the CLIP wrapper keeps
(its normalisation's mean and std) stays on the host.

The first step may copy what later steps reuse (the schedule's tables, the warp grid, CLIP's normalisation
constants on the device); every later step copies only the views' parameters, which are drawn on the host, and
copies them from pinned memory without blocking.

Autograd's engine cannot run a backward on fake CUDA tensors without a CUDA driver, so the guidance gradient
(``torch.autograd.grad`` of the loss) is replaced by zeros here: the step's forward parts are covered (the
UNet's forwards, the views, CLIP's normalisation and image tower, the losses, the posterior and the blend), its
backward is not (tests/test_cuda_graphs.py checks the networks' backward for host traffic on the CPU). CUDA
graphs are left off: a capture needs a real device.
"""

from __future__ import annotations

import dataclasses
import traceback
from unittest import mock

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from blended import augment, benchmark, fast_paths, memory_trace
from blended.diffusion import create_diffusion
from blended.kernel_specialisations import recording_launches
from blended.sampler import SamplerSettings
from conftest import tiny_clip

STEPS = 3


@dataclasses.dataclass
class HostCopy:
    op: str
    non_blocking: bool
    shape: tuple
    site: str  # the innermost lines of the pack's code that issued it

    def __str__(self):
        return f"{self.op} of {list(self.shape)}{' (non-blocking)' if self.non_blocking else ''} at {self.site}"


class _HostToDevice(TorchDispatchMode):
    """Records every op that makes a CUDA tensor from a CPU tensor (a copy from the host), by step."""

    def __init__(self):
        super().__init__()
        self.steps: list[list[HostCopy]] = [[]]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        outputs = [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        copy = func._overloadpacket.__name__ in ("_to_copy", "copy_", "to")
        from_host = [a for a in inputs if a.device.type == "cpu" and (a.dim() > 0 or copy)]
        if from_host and any(o.device.type == "cuda" for o in outputs):
            frames = [f for f in traceback.extract_stack() if "/blended/" in f.filename.replace("\\", "/")]
            site = " <- ".join(f"{f.filename.replace(chr(92), '/').rsplit('/blended/', 1)[-1]}:{f.lineno}"
                               for f in reversed(frames[-3:]))
            self.steps[-1].append(HostCopy(str(func), bool(kwargs.get("non_blocking")), tuple(from_host[0].shape),
                                           site))
        return out


def _zero_guidance_gradient(outputs, inputs, *args, **kwargs):
    """``torch.autograd.grad``'s shape of result, zeros: the backward cannot run on fake CUDA tensors."""
    single = isinstance(inputs, torch.Tensor)
    outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    assert all(o.device.type == "cuda" for o in outputs), "the guidance loss must be computed on the device"
    return tuple(torch.zeros_like(i) for i in ([inputs] if single else inputs))


def host_copies_per_step(preset: str, monkeypatch, steps: int = STEPS, batch: int = 2,
                         views: int = 4, launches: dict | None = None) -> list[list[HostCopy]]:
    """Run ``steps`` guided steps of the tiny fixture models with ``preset`` (CUDA graphs off) on fake CUDA
    tensors, placed as ComfyUI places them; the host-to-device copies of each step. The Triton kernels a preset
    asks for record their launches into ``launches`` instead of running."""
    options = dataclasses.replace(fast_paths.parse_preset(preset), cuda_graphs=False)
    # CUDA's autocast and bf16 are there, as on the GPUs the CUDA presets are made for.
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    # Pinning needs a driver; a pinned host tensor is still a host tensor, so the copy stays visible.
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *args, **kwargs: self)
    monkeypatch.setattr(torch.autograd, "grad", _zero_guidance_gradient)
    draw_view_params = augment.draw_view_params

    def draw_for_real(*args, **kwargs):  # host-side numpy arrays from CPU generators: real numbers even here
        with unset_fake_temporarily():
            return draw_view_params(*args, **kwargs)

    clip = tiny_clip()
    unet = memory_trace.unet_for_trace("tiny", device="meta")
    # Configured as a run's clones are (fast_paths.run_clones), before the weights turn fake: changing a fake
    # parameter's dtype in place is not possible.
    fast_paths.apply_fast_paths(unet, clip, options)
    diffusion = create_diffusion(timestep_respacing=str(benchmark.SCHEDULE_STEPS))
    settings = fast_paths.sampler_settings_with(SamplerSettings(skip_timesteps=25), options)
    text = torch.randn(1, clip.model.text_projection.shape[1])
    size = unet.config.image_size
    detector = _HostToDevice()
    with FakeTensorMode(allow_non_fake_inputs=True), mock.patch.object(augment, "draw_view_params", draw_for_real), \
            recording_launches({} if launches is None else launches):
        # ComfyUI's model manager moves the UNet and the CLIP wrapper's model, nothing else of the wrapper.
        memory_trace._fake_weights(unet, clip.model, device="cuda")
        assert clip.device.type == "cuda" and clip.mean.device.type == "cpu"
        mask = torch.zeros(1, 1, size, size)
        mask[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
        inputs = benchmark.EditInputs((torch.rand(1, 3, size, size) * 2 - 1).to("cuda"), mask.to("cuda"),
                                      text.to("cuda"))
        fast_paths.precast_run_weights(unet, clip, options)
        runner = benchmark.StepRunner(unet, diffusion, clip, inputs, batch, views, settings, options)
        with detector:
            for step in range(steps):
                if step:
                    detector.steps.append([])
                out = runner()
                assert out["blended"].device.type == "cuda" and out["blended"].shape[0] == batch
    return detector.steps


@pytest.mark.parametrize("preset", ["faithful", "fast-gpu", "fastest-gpu"])
def test_a_guided_step_on_cuda_copies_from_the_host_only_the_views_parameters(preset, monkeypatch):
    launches: dict = {}
    steps = host_copies_per_step(preset, monkeypatch, launches=launches)
    assert len(steps) == STEPS and bool(launches) == ("triton" in fast_paths.parse_preset(preset).describe())
    for index, copies in enumerate(steps[1:], start=1):
        blocking = [str(c) for c in copies if not c.non_blocking]
        assert blocking == [], f"step {index} copies from the host, waiting for the device:\n" + "\n".join(blocking)
        # the views' parameters, all in one copy
        assert len(copies) == 1 and "augment.py" in copies[0].site, "\n".join(map(str, copies))


def test_clips_normalisation_is_copied_to_the_device_once_when_only_its_model_was_moved(monkeypatch):
    """CLIP's mean and std live with the wrapper, which ComfyUI does not move: normalising each step's views must
    not copy them to the device again (two blocking copies a step)."""
    steps = host_copies_per_step("faithful", monkeypatch)
    normalisation = [[str(c) for c in copies if "clip_model.py" in c.site] for copies in steps]
    assert len(normalisation[0]) <= 2 and normalisation[1:] == [[]] * (STEPS - 1), normalisation
