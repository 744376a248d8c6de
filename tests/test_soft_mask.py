"""Soft masks as a per-step schedule: the Differential Diffusion rule, and its effect on a tiny edit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blended import regions, soft_mask
from blended.checkpoint import load_guided_diffusion
from blended.clip_model import load_guidance_clip
from blended.diffusion import create_diffusion
from blended.guidance import GuidanceSettings
from blended.sampler import SamplerSettings, edit_image

REF = Path(__file__).parent / "fixtures" / "reference"


@pytest.mark.parametrize("total", [1, 4, 10, 75])
def test_a_pixel_of_value_m_is_edited_during_the_last_m_of_the_steps(total):
    assert soft_mask.steps_edited(1.0, total) == total        # white: every step
    assert soft_mask.steps_edited(0.0, total) == 0            # black: never
    for value in (0.05, 0.25, 0.5, 0.8, 0.999):
        edited = [value > soft_mask.threshold(n, total) for n in range(total)]
        count = sum(edited)
        assert count == soft_mask.steps_edited(value, total)
        assert abs(count - value * total) <= 1                 # about m·L steps ...
        assert edited == [False] * (total - count) + [True] * count   # ... and they are the last ones
    grey = torch.tensor([0.0, 0.3, 1.0])
    assert soft_mask.step_mask(grey, 0, 10).tolist() == [0.0, 0.0, 1.0]
    assert soft_mask.step_mask(grey, 9, 10).tolist() == [0.0, 1.0, 1.0]


def test_the_model_mask_keeps_grey_levels_and_the_binary_support():
    mask = torch.zeros(1, 1, 128, 128)
    mask[..., 32:96, 32:96] = torch.linspace(0, 1, 64)         # a left-to-right ramp
    mask[..., 10, 10] = 0.2                                     # a single grey pixel: averaged away by resizing
    plan = regions.plan_full_image(128, 128, 64)
    binary = regions.crop_mask(mask, plan)
    soft = soft_mask.model_soft_mask(mask, plan, binary)
    assert torch.equal(soft > 0, binary > 0)
    assert soft[0, 0, 32, 17] < soft[0, 0, 32, 30] < soft[0, 0, 32, 46]
    assert soft.max() <= 1 and 0.4 < float(soft[0, 0, 32, 32]) < 0.6


@pytest.fixture(scope="module")
def tiny():
    unet = load_guided_diffusion(path=REF / "gd_tiny" / "model.safetensors")[0]
    clip = load_guidance_clip(path=REF / "clip_tiny" / "model.safetensors")
    return unet, clip, create_diffusion(timestep_respacing="6")


def _edit(tiny, image, mask, **settings):
    unet, clip, diffusion = tiny
    return edit_image(image, mask, unet, diffusion, clip, ["a red rock"], seed=4, num_results=1,
                      settings=SamplerSettings(skip_timesteps=0, **settings),
                      guidance_settings=GuidanceSettings(clip_lambda=0.0, range_lambda=0.0)).images


def test_a_binary_mask_gives_the_same_edit_with_the_option_on(tiny):
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1
    assert torch.equal(_edit(tiny, image, mask), _edit(tiny, image, mask, soft_mask=True))


@pytest.mark.parametrize("side", [48, 100])
def test_a_binary_mask_resized_to_the_model_gives_the_same_edit_with_the_option_on(tiny, side):
    """Enlarged (48 -> 64) or shrunk (100 -> 64), a 0/1 mask stays 0/1 at the model's size."""
    image = torch.rand(1, side, side, 3, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, side, side)
    mask[:, side // 4:side * 3 // 4 + 1, side // 5:side // 2] = 1
    plan = regions.plan_full_image(side, side, 64)
    binary = regions.crop_mask(mask[:, None], plan)
    assert torch.equal(soft_mask.model_soft_mask(mask[:, None], plan, binary), binary)
    assert torch.equal(_edit(tiny, image, mask), _edit(tiny, image, mask, soft_mask=True))


def test_a_grey_stroke_keeps_its_value_when_only_one_axis_shrinks():
    mask = torch.zeros(1, 1, 200, 3000)
    mask[..., 50:150, 1000:1006] = 0.8      # a 6-pixel stroke, 12x narrower than a model pixel
    plan = regions.plan_full_image(200, 3000, 64)
    soft = soft_mask.model_soft_mask(mask, plan, regions.crop_mask(mask, plan))
    assert torch.allclose(soft[soft > 0], torch.tensor(0.8))


def test_grey_pixels_change_less_than_white_ones(tiny):
    image = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2)),
                                            size=(64, 64), mode="bicubic").clamp(0, 1).movedim(1, -1)
    mask = torch.zeros(1, 64, 64)
    mask[:, 8:56, 8:24] = 1.0     # white
    mask[:, 8:56, 24:40] = 0.5    # mid grey
    mask[:, 8:56, 40:56] = 0.15   # light grey
    binary = _edit(tiny, image, mask)
    soft = _edit(tiny, image, mask, soft_mask=True)
    change = (soft - image).abs().mean(-1)[0]
    white, mid, light = (float(change[8:56, c0:c1].mean()) for c0, c1 in ((8, 24), (24, 40), (40, 56)))
    assert white > mid > light > 0, (white, mid, light)
    # the binary edit changes the grey bands as much as the white one; the background is exact in both
    binary_change = (binary - image).abs().mean(-1)[0]
    assert float(binary_change[8:56, 40:56].mean()) > 2 * light
    keep = mask[0] == 0
    assert torch.equal(soft[0][keep], image[0][keep]) and torch.equal(binary[0][keep], image[0][keep])
