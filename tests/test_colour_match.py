"""Colour match at paste-back: the colour step across the mask border drops; defaults are untouched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blended import colour_match, metrics
from blended.checkpoint import load_guided_diffusion
from blended.clip_model import load_guidance_clip
from blended.diffusion import create_diffusion
from blended.errors import BlendedInputError
from blended.guidance import GuidanceSettings
from blended.sampler import SamplerSettings, edit_image

FIXTURES = Path(__file__).parent / "fixtures"
REF = FIXTURES / "reference"


def _example(name):
    return torch.from_numpy(np.asarray(Image.open(FIXTURES / "examples" / name).convert("RGB"),
                                       dtype=np.float32) / 255).permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def photo_and_mask():
    image = _example("img.png")
    mask = torch.from_numpy((np.asarray(Image.open(FIXTURES / "examples" / "mask.png").convert("L")) > 0)
                            .astype(np.float32))[None, None]
    return image, mask


def _composite(image, edit, mask):
    return image * (1 - mask) + edit * mask


@pytest.mark.parametrize("space", ["rgb", "lab"])
def test_a_tinted_paste_loses_its_colour_seam(photo_and_mask, space):
    image, mask = photo_and_mask
    # the original content, tinted and darkened: what a drifting model prediction looks like
    drifted = (image * 0.8 + torch.tensor([0.12, 0.02, -0.05]).view(1, 3, 1, 1)).clamp(0, 1)
    before = metrics.seam_scores(*metrics.prepare(_composite(image, drifted, mask), image, mask))[1].item()
    matched = colour_match.match_border(drifted, image, mask, space=space)
    after = metrics.seam_scores(*metrics.prepare(_composite(image, matched, mask), image, mask))[1].item()
    assert before > 0.05
    assert after < 0.2 * before, (space, before, after)
    assert matched.min() >= 0 and matched.max() <= 1


def test_other_content_keeps_its_own_colours_but_its_border_agrees(photo_and_mask):
    image, mask = photo_and_mask
    other = _example("img2.png")
    pasted = _composite(image, other, mask)
    matched = _composite(image, colour_match.match_border(other, image, mask, space="rgb"), mask)
    ring = colour_match.inner_ring(mask, colour_match.ring_width_for(256))
    def ring_error(x):
        return (metrics.ring_mean(x, ring) - metrics.ring_mean(image, ring)).abs().mean().item()
    assert ring_error(matched) < 0.01 < ring_error(pasted)
    # outside the mask nothing changes; inside, the content is still the other photo (high correlation)
    assert torch.equal(matched * (1 - mask), image * (1 - mask))
    inside = mask[0, 0] > 0
    corr = np.corrcoef(matched[0, 1][inside].numpy(), other[0, 1][inside].numpy())[0, 1]
    assert corr > 0.9


def _smooth(seed, size=64):
    """A smooth random image (low-frequency noise) in 0..1."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 6, 6, generator=gen)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def test_lab_matches_the_rings_lab_statistics_and_rgb_its_rgb_statistics():
    """Each space matches the ring's per-channel mean and standard deviation in its own coordinates: exactly there
    (no gain clamped, no pixel clipped in this case), and not in the other space, since RGB -> Lab is not affine.
    So "lab" cannot silently run the RGB match."""
    import kornia

    original = 0.3 + 0.4 * _smooth(0)
    edited = (0.3 + 0.4 * _smooth(1)) * torch.tensor([1.0, 0.9, 0.8]).view(1, 3, 1, 1)  # other content, tinted
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 12:52] = 1
    ring = colour_match.inner_ring(mask, 4)

    def ring_stats(images, space):
        return colour_match._stats(kornia.color.rgb_to_lab(images) if space == "lab" else images, ring)

    matched = {space: colour_match.match_border(edited, original, mask, space=space, width=4)
               for space in ("rgb", "lab")}
    assert (matched["lab"] - matched["rgb"]).abs().max().item() > 0.05
    tolerance = {"rgb": 1e-4, "lab": 1e-2}  # RGB is 0..1, Lab's L 0..100
    for space, other in (("rgb", "lab"), ("lab", "rgb")):
        assert 0 < matched[space].min() and matched[space].max() < 1  # nothing clipped
        for got, want in zip(ring_stats(matched[space], space), ring_stats(original, space), strict=True):
            torch.testing.assert_close(got, want, atol=tolerance[space], rtol=0)
        _, std_in_other = ring_stats(matched[space], other)
        _, std_wanted = ring_stats(original, other)
        assert (std_in_other - std_wanted).abs().max().item() > 100 * tolerance[other], space


def test_off_is_the_identity_and_bad_names_are_refused(photo_and_mask):
    image, mask = photo_and_mask
    assert colour_match.match_border(image, image, mask, space="off") is image
    with pytest.raises(BlendedInputError, match="colour match"):
        colour_match.match_border(image, image, mask, space="hsv")


@pytest.fixture(scope="module")
def tiny():
    unet = load_guided_diffusion(path=REF / "gd_tiny" / "model.safetensors")[0]
    clip = load_guidance_clip(path=REF / "clip_tiny" / "model.safetensors")
    return unet, clip, create_diffusion(timestep_respacing="4")


def test_sampler_option_lowers_the_colour_seam_and_keeps_the_background(tiny):
    unet, clip, diffusion = tiny
    gen = torch.Generator().manual_seed(3)
    image = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=gen), size=(64, 64),
                                            mode="bicubic").clamp(0, 1).movedim(1, -1)
    mask = torch.zeros(1, 64, 64)
    mask[:, 18:46, 14:50] = 1
    runs = {}
    for space in ("off", "rgb", "lab"):
        runs[space] = edit_image(image, mask, unet, diffusion, clip, ["a red rock"], seed=2, num_results=2,
                                 settings=SamplerSettings(skip_timesteps=1, colour_match=space),
                                 # unguided: only the paste-back differs between the runs
                                 guidance_settings=GuidanceSettings(clip_lambda=0.0, range_lambda=0.0))
    keep = mask[0] == 0
    seams = {}
    for space, result in runs.items():
        assert torch.equal(result.images[:, keep], image.expand(2, -1, -1, -1)[:, keep])
        scores = metrics.score_edits(result.images.movedim(-1, 1), image.movedim(-1, 1), mask)
        seams[space] = scores.seam_colour
    for space in ("rgb", "lab"):
        assert all(a < b for a, b in zip(seams[space], seams["off"], strict=True)), seams
    with pytest.raises(BlendedInputError, match="colour_match"):
        edit_image(image, mask, unet, diffusion, clip, ["x"], seed=2,
                   settings=SamplerSettings(skip_timesteps=1, colour_match="x"))
