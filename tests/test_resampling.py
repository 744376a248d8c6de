"""Harmonising resampling (RePaint): the step plan, the jump back, and the sampler with it on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blended import metrics, resampling
from blended.augment import AugmentationSettings
from blended.checkpoint import load_guided_diffusion
from blended.clip_model import load_guidance_clip
from blended.diffusion import create_diffusion
from blended.errors import BlendedInputError
from blended.guidance import GuidanceSettings
from blended.sampler import SamplerSettings, edit_image

REF = Path(__file__).parent / "fixtures" / "reference"


def test_without_resampling_every_step_runs_once_in_order():
    steps = resampling.plan([5, 4, 3, 2, 1, 0])
    assert [s.index for s in steps] == [5, 4, 3, 2, 1, 0]
    assert all(s.repeat == 0 and s.jump_from is None for s in steps)


def test_each_complete_chunk_is_redone_count_times_after_a_jump_back():
    steps = resampling.plan([6, 5, 4, 3, 2, 1, 0], jump_length=3, count=2)
    assert [(s.index, s.repeat, s.jump_from) for s in steps] == [
        (6, 0, None), (5, 0, None), (4, 0, None),
        (6, 1, 3), (5, 1, None), (4, 1, None),      # after step 4, x is at level 3: jump back to level 6
        (6, 2, 3), (5, 2, None), (4, 2, None),
        (3, 0, None), (2, 0, None), (1, 0, None),
        (3, 1, 0), (2, 1, None), (1, 1, None),
        (3, 2, 0), (2, 2, None), (1, 2, None),
        (0, 0, None),                                # the short last chunk runs once
    ]
    assert resampling.total_steps(7, 3, 2) == len(steps) == 7 + 2 * 3 * 2
    assert resampling.total_steps(75, 5, 0) == 75
    with pytest.raises(BlendedInputError, match="jump_length"):
        resampling.plan([1, 0], jump_length=0, count=1)
    with pytest.raises(BlendedInputError, match="resample_count"):
        resampling.plan([1, 0], jump_length=2, count=-1)


def test_jump_back_is_the_forward_process_between_two_levels():
    diffusion = create_diffusion(timestep_respacing="10")
    clean = torch.rand(1, 3, 8, 8)
    noise = torch.randn(1, 3, 8, 8)
    # from the clean image it is exactly q(x_t | x_0)
    torch.testing.assert_close(resampling.jump_back(diffusion, clean, -1, 6, noise),
                               diffusion.q_sample(clean, 6, noise))
    # between two noisy levels: mean scale sqrt(a_to / a_from) and variance 1 - a_to / a_from
    x = torch.full((20000,), 0.7)
    jumped = resampling.jump_back(diffusion, x, 2, 7, torch.randn(20000, generator=torch.Generator().manual_seed(0)))
    ratio = diffusion.alphas_cumprod[7] / diffusion.alphas_cumprod[2]
    assert float(jumped.mean()) == pytest.approx(0.7 * ratio ** 0.5, abs=0.02)
    assert float(jumped.var()) == pytest.approx(1 - ratio, rel=0.05)
    with pytest.raises(ValueError):
        resampling.jump_back(diffusion, x, 5, 5, x)


@pytest.fixture(scope="module")
def tiny():
    unet = load_guided_diffusion(path=REF / "gd_tiny" / "model.safetensors")[0]
    clip = load_guidance_clip(path=REF / "clip_tiny" / "model.safetensors")
    return unet, clip, create_diffusion(timestep_respacing="6")


@pytest.fixture(scope="module")
def synthetic():
    """A smooth photo-like image with a box to regenerate."""
    image = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(3)),
                                            size=(64, 64), mode="bicubic").clamp(0, 1).movedim(1, -1)
    mask = torch.zeros(1, 64, 64)
    mask[:, 18:46, 14:50] = 1
    return image, mask


def _edit(tiny, image, mask, num_results=1, callback=None, guided=False, **settings):
    unet, clip, diffusion = tiny
    guidance = GuidanceSettings(augmentations=AugmentationSettings(num_views=2)) if guided else \
        GuidanceSettings(clip_lambda=0.0, range_lambda=0.0)
    return edit_image(image, mask, unet, diffusion, clip, ["a red rock"], seed=2, num_results=num_results,
                      settings=SamplerSettings(skip_timesteps=2, batch_size=num_results, **settings),
                      guidance_settings=guidance, callback=callback).images


def test_resampling_lowers_the_seam_score(tiny, synthetic):
    image, mask = synthetic
    plain = _edit(tiny, image, mask, num_results=2)
    resampled = _edit(tiny, image, mask, num_results=2, resample_count=2, resample_jump_length=2)
    seam_plain = metrics.score_edits(plain.movedim(-1, 1), image.movedim(-1, 1), mask).seam_gradient
    seam_resampled = metrics.score_edits(resampled.movedim(-1, 1), image.movedim(-1, 1), mask).seam_gradient
    assert all(r < p for r, p in zip(seam_resampled, seam_plain, strict=True)), (seam_resampled, seam_plain)
    keep = mask[0] == 0
    assert torch.equal(resampled[:, keep], image.expand(2, -1, -1, -1)[:, keep])


def test_resampled_results_keep_per_result_seeds_and_count_every_step(tiny, synthetic):
    image, mask = synthetic
    calls = []
    two = _edit(tiny, image, mask, num_results=2, guided=True, resample_count=1, resample_jump_length=2,
                callback=lambda done, total, pred: calls.append((done, total)))
    one = _edit(tiny, image, mask, num_results=1, guided=True, resample_count=1, resample_jump_length=2)
    torch.testing.assert_close(two[0], one[0], atol=1 / 255, rtol=0)
    assert not torch.allclose(two[0], two[1])
    total = resampling.total_steps(4, 2, 1)  # 4 steps + 1 repeat of each of the 2 chunks
    assert total == 8
    assert calls == [(n, total) for n in range(1, total + 1)]


def test_cancelling_during_a_resampled_chunk_stops_the_run(tiny, synthetic):
    image, mask = synthetic
    calls = []

    class Cancelled(Exception):
        pass

    def cancel_at_five(done, total, pred):
        calls.append(done)
        if done == 5:  # inside the first chunk's repeat
            raise Cancelled

    with pytest.raises(Cancelled):
        _edit(tiny, image, mask, resample_count=2, resample_jump_length=2, callback=cancel_at_five)
    assert calls == [1, 2, 3, 4, 5]


@pytest.mark.comfy
def test_the_node_progress_bar_counts_the_resampled_steps(comfy_inprocess):
    import harness

    # seed 3: the random tiny models' guidance stays finite through the repeats (with some seeds it diverges)
    prompt = harness.tiny_edit_prompt(comfy_inprocess.node_defs(), seed=3, respacing="6", skip_timesteps=1,
                                      resample_count=1, resample_jump_length=2)
    result = comfy_inprocess.run(prompt)
    progress = [data for event, data in result.messages if event == "progress" and data["node"] == "6"]
    total = resampling.total_steps(5, 2, 1)  # 5 steps, chunks [4,3] and [2,1] redone once
    assert total == 9
    assert [p["value"] for p in progress] == list(range(1, total + 1))
    assert {p["max"] for p in progress} == {total}
    assert all(p["preview"] for p in progress)  # on the CPU each step's preview is on the host at once


def test_each_resampling_pass_of_a_step_draws_its_own_clip_views_and_classes(tiny, synthetic, monkeypatch):
    from blended import guidance, seeds
    from blended.noise import SeededNoise

    keys = []
    real = seeds.generator_for

    def recording(seed, *parts):
        if parts and parts[0] == seeds.STREAM_AUGMENTATION:
            keys.append(parts)
        return real(seed, *parts)
    monkeypatch.setattr(guidance.seeds, "generator_for", recording)
    image, mask = synthetic
    _edit(tiny, image, mask, num_results=1, guided=True, resample_count=1, resample_jump_length=2)
    runs = resampling.total_steps(4, 2, 1)
    assert len(keys) == runs and len(set(keys)) == runs, "a repeated step must not reuse its first pass's views"
    first_pass = [k for k in keys if len(k) == 3]  # (stream, result, step): the keys a run without resampling uses
    assert sorted(k[2] for k in first_pass) == [0, 1, 2, 3]
    noise = SeededNoise(2, torch.device("cpu"))
    ids = list(range(16))
    assert not torch.equal(noise.labels(3, ids, 1000), noise.labels(3, ids, 1000, repeat=1))
    assert torch.equal(noise.labels(3, ids, 1000), noise.labels(3, ids, 1000, repeat=0))
