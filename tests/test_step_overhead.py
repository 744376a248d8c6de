"""The guided step's host work: nothing read back from the device, and a cost that does not grow per result.

On a GPU, every value read back (``.item()``, ``float(tensor)``, ``bool(tensor)``, ``nonzero``) stalls the host
until the GPU has drained its queue, and every small op is a kernel launch. Both are visible on the CPU:
reads go through ``aten._local_scalar_dense`` (or a data-dependent op), and ops can be counted.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from blended.augment import AugmentationSettings
from blended.checkpoint import load_guided_diffusion
from blended.clip_model import load_guidance_clip
from blended.diffusion import create_diffusion
from blended.guidance import GuidanceObjective, GuidanceSettings
from blended.sampler import SamplerSettings, guided_step

REF = Path(__file__).parent / "fixtures" / "reference"

# Ops that need a device value on the host (they synchronize a CUDA stream).
_READBACK = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "unique", "_unique2"}


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(func._overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def models():
    unet = load_guided_diffusion(path=REF / "gd_tiny" / "model.safetensors")[0]
    clip = load_guidance_clip(path=REF / "clip_tiny" / "model.safetensors")
    return unet, clip, create_diffusion(timestep_respacing="100")


def _step(models, batch: int, views: int, **settings):
    unet, clip, diffusion = models
    size = unet.config.image_size
    gen = torch.Generator().manual_seed(0)
    init = torch.rand(1, 3, size, size, generator=gen) * 2 - 1
    mask = torch.zeros(1, 1, size, size)
    mask[..., 16:48, 16:48] = 1
    objective = GuidanceObjective(clip, clip.text_embedding("a red rock"), mask, init,
                                  GuidanceSettings(augmentations=AugmentationSettings(num_views=views)), seed=3)
    objective.prompt_is_empty = torch.tensor([False] * batch)
    x = torch.randn(batch, 3, size, size, generator=gen)
    noise, background = torch.randn(batch, 3, size, size, generator=gen), torch.randn(1, 3, size, size, generator=gen)
    sampler = SamplerSettings(**settings)

    def run():
        return guided_step(unet, diffusion, objective, x, 40, init, mask, noise, background, sampler,
                           list(range(batch)))
    return run


@pytest.mark.parametrize("settings", [dict(), dict(reuse_guided_forward=True), dict(method="ddim"),
                                      dict(background_noise_step="previous")])
def test_guided_step_reads_nothing_back(models, settings):
    run = _step(models, batch=2, views=4, **settings)
    run()  # first call builds the device tables
    rng = torch.random.get_rng_state()
    with _Recorder() as recorder:
        run()
    assert len(recorder.calls) > 100  # the recorder saw the step
    assert sorted(set(recorder.calls) & _READBACK) == []
    assert torch.equal(torch.random.get_rng_state(), rng)  # per-result generators only, never the global RNG


def test_step_op_count_hardly_grows_with_the_batch(models):
    """All views of all results share one augmentation: 8 results cost little more host work than 1."""
    counts = {}
    for batch in (1, 8):
        run = _step(models, batch=batch, views=8, reuse_guided_forward=True)
        run()
        with _Recorder() as recorder:
            run()
        counts[batch] = len(recorder.calls)
    assert counts[8] < counts[1] * 1.15, counts


def test_the_views_warps_add_few_ops(models):
    """Seven warped views per result cost a few dozen ops in all (kornia.geometry's warps took about 600): their
    matrices are host arithmetic, one matmul makes every sampling grid, and each warp is one grid_sample."""
    counts = {}
    for views in (1, 8):
        run = _step(models, batch=1, views=views, reuse_guided_forward=True)
        run()
        with _Recorder() as recorder:
            run()
        counts[views] = len(recorder.calls)
    assert counts[8] - counts[1] < 100, counts


def test_previews_are_handed_out_once_on_the_host_without_waiting(monkeypatch):
    """The node's progress previews: on the CPU each at once; from a GPU, the newest copy that has arrived (the
    host never waits for one), older ones dropped, and at most ``keep`` in flight when the device falls behind."""
    from blended import devices

    copies = devices.HostCopies()
    pixels = torch.arange(6, dtype=torch.uint8).view(2, 3)
    copies.add(pixels)
    assert torch.equal(copies.newest_arrived(), pixels) and copies.newest_arrived() is None

    class CopyEvent:  # a CUDA event's query(): whether the copy has arrived
        def __init__(self):
            self.arrived = False

        def query(self):
            return self.arrived

    events = []

    def copy_in_flight(tensor):
        events.append(CopyEvent())
        return events[-1], tensor.clone()

    monkeypatch.setattr(devices, "_copy_to_host", copy_in_flight)
    copies = devices.HostCopies(keep=3)
    for step in range(2):
        copies.add(torch.tensor([step]))
    assert copies.newest_arrived() is None
    events[0].arrived = True
    assert copies.newest_arrived().tolist() == [0] and copies.newest_arrived() is None
    copies.add(torch.tensor([2]))
    events[1].arrived = events[2].arrived = True
    assert copies.newest_arrived().tolist() == [2] and copies.newest_arrived() is None
    for step in range(3, 7):
        copies.add(torch.tensor([step]))
    events[3].arrived = True  # step 3's copy arrived, but it was dropped for newer ones
    assert copies.newest_arrived() is None
    events[4].arrived = events[5].arrived = True
    assert copies.newest_arrived().tolist() == [5]
    events[6].arrived = True
    assert copies.newest_arrived().tolist() == [6] and copies.newest_arrived() is None
    # the last step's copy is waited for, so the bar ends on the result
    waited = []
    CopyEvent.synchronize = lambda event: waited.append(event)
    for step in (7, 8):
        copies.add(torch.tensor([step]))
    assert copies.newest().tolist() == [8] and waited == [events[8]] and copies.newest() is None


@pytest.mark.comfy
def test_the_progress_bar_ends_on_the_last_steps_preview(comfy_inprocess, monkeypatch):
    """Previews lag a step on a GPU (their copies are not waited for), except the last, which is."""
    import sys

    import comfy.utils

    bridge = comfy_inprocess.pack_module("comfy_bridge")
    devices = sys.modules[bridge.HostCopies.__module__]  # the pack's own copy of blended.devices

    class NeverArrives:  # a copy still in flight until waited for
        def query(self):
            return False

        def synchronize(self):
            pass

    monkeypatch.setattr(devices, "_copy_to_host", lambda tensor: (NeverArrives(), tensor.clone()))
    shown = []
    monkeypatch.setattr(comfy.utils.ProgressBar, "update_absolute",
                        lambda self, value, total=None, preview=None: shown.append((value, preview)))
    callback = bridge.progress_callback()
    for step in (1, 2, 3):
        callback(step, 3, torch.full((1, 3, 4, 4), step / 3.0))
    assert [value for value, _ in shown] == [1, 2, 3]
    assert shown[0][1] is None and shown[1][1] is None
    kind, picture, _ = shown[2][1]
    assert kind == "JPEG" and picture.getpixel((0, 0)) == (255, 255, 255)
