"""Parity of the whole edit loop and of the ranking with the original (tests/fixtures/reference/edit_loop).

The fixture is a 5-step edit run by the original's own ``p_sample_loop_progressive``, with every random draw
recorded. The pack's real loop (``sample_results`` and ``edit_image``) replays those draws through the
noise-source hook and must reproduce every step, the final image and the ranking distances.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blended import seeds
from blended.augment import AugmentationSettings
from blended.checkpoint import load_guided_diffusion
from blended.clip_model import load_guidance_clip
from blended.diffusion import create_diffusion
from blended.guidance import GuidanceObjective, GuidanceSettings
from blended.noise import SeededNoise
from blended.rank import clip_scores
from blended.sampler import SamplerSettings, edit_image, sample_results

REF = Path(__file__).parent / "fixtures" / "reference"
PROMPT = "a red rock"


def assert_close(actual, expected, rel=1e-4, name=""):
    expected = expected.to(actual.dtype)
    tol = rel * (1 + expected.abs().max().item())
    diff = (actual - expected).abs().max().item()
    assert diff <= tol, f"{name}: max|diff| {diff:.3g} > {tol:.3g}"


@pytest.fixture(scope="module")
def reference():
    return load_file(str(REF / "edit_loop.safetensors"))


@pytest.fixture(scope="module")
def unet():
    return load_guided_diffusion(path=REF / "gd_tiny" / "model.pt")[0]


@pytest.fixture(scope="module")
def clip():
    return load_guidance_clip(path=REF / "clip_tiny" / "model.pt")


@pytest.fixture(scope="module")
def diffusion():
    return create_diffusion(timestep_respacing="100")


class RecordedNoise:
    """Replays the original's recorded draws, and records which draws the loop asked for."""

    def __init__(self, reference):
        self.ref = reference
        self.step_of = {int(index): k for k, index in enumerate(reference["indices"])}
        self.calls = []

    def initial(self, index, shape, result_ids):
        self.calls.append(("initial", index, tuple(result_ids)))
        return self.ref["initial_noise"]

    def step(self, index, shape, result_ids):
        self.calls.append(("step", index, tuple(result_ids)))
        return self.ref[f"step{self.step_of[index]}_noise"]

    def background(self, index, shape, result_ids):
        self.calls.append(("background", index, tuple(result_ids)))
        return self.ref[f"step{self.step_of[index]}_background_noise"]

    def labels(self, index, result_ids, num_classes):  # gd_tiny is unconditional: never asked
        raise AssertionError("an unconditional model needs no labels")


def guidance_settings(reference):
    return GuidanceSettings(clip_lambda=float(reference["clip_guidance_lambda"]),
                            range_lambda=float(reference["range_lambda"]),
                            augmentations=AugmentationSettings(num_views=1))


def sampler_settings(reference):
    return SamplerSettings(skip_timesteps=int(reference["skip_timesteps"]), batch_size=2)


def test_sample_results_reproduces_every_step_of_the_original_loop(unet, clip, diffusion, reference):
    objective = GuidanceObjective(clip, reference["text_embed"], reference["mask"], reference["init_image"],
                                  guidance_settings(reference))
    source = RecordedNoise(reference)
    trace = []
    pred, _ = sample_results(unet, diffusion, objective, reference["init_image"], reference["mask"],
                             result_ids=[0, 1], seed=0, settings=sampler_settings(reference),
                             noise_source=source, on_step=lambda index, out: trace.append((index, out)))
    expected_indices = reference["indices"].tolist()
    assert source.calls[0] == ("initial", expected_indices[0], (0, 1))   # the start index
    assert [index for index, _ in trace] == expected_indices              # the number and order of steps
    for k, (_, out) in enumerate(trace):
        assert_close(out["blended"], reference[f"step{k}_sample"], name=f"step{k}_sample")
        assert_close(out["pred_xstart"], reference[f"step{k}_pred_xstart"], name=f"step{k}_pred_xstart")
    final = (reference["init_image"] * (1 - reference["mask"]) + pred * reference["mask"]).add(1).div(2).clamp(0, 1)
    assert_close(final, reference["final_image"], name="final_image")


def test_edit_image_reproduces_the_final_image_and_the_ranking(unet, clip, diffusion, reference):
    image = reference["init_image"].add(1).div(2).movedim(1, -1)   # IMAGE [1,64,64,3] in [0,1]
    mask = reference["mask"][:, 0]                                  # MASK [1,64,64]
    source = RecordedNoise(reference)
    result = edit_image(image, mask, unet, diffusion, clip, [PROMPT], seed=0, num_results=2,
                        settings=sampler_settings(reference), guidance_settings=guidance_settings(reference),
                        noise_source=source)
    steps = [call for call in source.calls if call[0] == "step"]
    assert [index for _, index, _ in steps] == reference["indices"].tolist()
    assert {ids for _, _, ids in source.calls} == {(seeds.result_id(0, 0), seeds.result_id(0, 1))}
    final = result.images.movedim(-1, 1)
    assert_close(final, reference["final_image"], name="final_image")
    distances = clip_scores(clip, final, reference["text_embed"], mask=reference["mask"], mode="original")
    torch.testing.assert_close(distances, reference["rank_distance"], atol=1e-5, rtol=0)


def test_original_ranking_reproduces_the_fixture_distances(clip, reference):
    distances = clip_scores(clip, reference["final_image"], reference["text_embed"], mask=reference["mask"],
                            mode="original")
    torch.testing.assert_close(distances, reference["rank_distance"], atol=1e-5, rtol=0)


def test_default_noise_is_the_seeded_per_result_streams(unet, clip, diffusion, reference):
    """Without a hook, the loop draws from SeededNoise(seed, group_size): same images as passing it."""
    image = reference["init_image"].add(1).div(2).movedim(1, -1)
    mask = reference["mask"][:, 0]
    settings = SamplerSettings(skip_timesteps=97, batch_size=2)
    kwargs = dict(seed=11, num_results=2, settings=settings, guidance_settings=guidance_settings(reference))
    default = edit_image(image, mask, unet, diffusion, clip, [PROMPT], **kwargs)
    explicit = edit_image(image, mask, unet, diffusion, clip, [PROMPT], noise_source=SeededNoise(11), **kwargs)
    assert torch.equal(default.images, explicit.images)
