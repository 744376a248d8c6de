"""Parity of one CLIP-guided, blended step with the original code (tests/fixtures/reference/blended_step)."""

import pytest
import torch
from safetensors.torch import load_file

from blended import regions
from blended.augment import AugmentationSettings
from blended.guidance import GuidanceObjective, GuidanceSettings
from blended.sampler import SamplerSettings, guided_step
from conftest import REF, assert_close, tiny_clip, tiny_unet

STEPS = (99, 60, 3)


@pytest.fixture(scope="module")
def reference():
    return load_file(str(REF / "blended_step.safetensors"))


@pytest.fixture(scope="module")
def unet():
    """The original's own file format."""
    return tiny_unet("model.pt")


@pytest.fixture(scope="module", params=["model.pt", "model.safetensors"])
def clip(request):
    return tiny_clip(request.param)


def objective_for(clip, reference, l2):
    settings = GuidanceSettings(
        clip_lambda=float(reference["clip_guidance_lambda"]), range_lambda=float(reference["range_lambda"]),
        background_l2_lambda=float(reference["l2_sim_lambda"]) if l2 else 0.0,
        augmentations=AugmentationSettings(num_views=1))
    text = clip.text_embedding("a red rock")
    # The fixture's original ran a batch of 2: its background L2 weighs each result lambda / 2.
    return GuidanceObjective(clip, text, reference["mask"], reference["init_image"], settings, group_size=2)


def test_text_embedding_matches_reference(clip, reference):
    assert_close(clip.text_embedding("a red rock"), reference["text_embed"], rel=1e-3, name="text_embed")


@pytest.mark.parametrize("index", STEPS)
@pytest.mark.parametrize("reuse_forward", [False, True])
def test_guided_blended_step(unet, clip, diffusion, reference, index, reuse_forward):
    settings = SamplerSettings(reuse_guided_forward=reuse_forward)
    out = guided_step(unet, diffusion, objective_for(clip, reference, l2=False), reference[f"t{index}_x"], index,
                      reference["init_image"], reference["mask"], reference[f"t{index}_noise"],
                      reference[f"t{index}_background_noise"], settings, result_ids=[0, 1])
    assert_close(out["grad"], reference[f"t{index}_grad"], rel=1e-3, name="grad")
    for key in ("guided_mean", "sample", "blended", "pred_xstart"):
        assert_close(out[key], reference[f"t{index}_{key}"], name=key)


@pytest.mark.parametrize("index", STEPS)
def test_gradient_with_background_l2(unet, clip, diffusion, reference, index):
    out = guided_step(unet, diffusion, objective_for(clip, reference, l2=True), reference[f"t{index}_x"], index,
                      reference["init_image"], reference["mask"], reference[f"t{index}_noise"],
                      reference[f"t{index}_background_noise"], SamplerSettings(), result_ids=[0, 1])
    assert_close(out["grad"], reference[f"t{index}_grad_with_l2"], rel=1e-3, name="grad_with_l2")


@pytest.mark.parametrize("index", STEPS)
def test_enforced_background_composite(reference, index):
    """The full-resolution composite of the pack equals the original's enforce_background at model size."""
    init01 = reference["init_image"].add(1).div(2)
    pred01 = reference[f"t{index}_pred_xstart"].add(1).div(2).clamp(0, 1)
    mask = reference["mask"]
    plan = regions.plan_full_image(64, 64, 64)
    pasted = regions.paste_back(init01.expand(2, -1, -1, -1), pred01, plan, mask.expand(2, -1, -1, -1))
    expected = reference[f"t{index}_enforced"].add(1).div(2).clamp(0, 1)
    assert_close(pasted, expected, name="enforced")
    assert torch.equal(pasted * (1 - mask), init01.expand(2, -1, -1, -1) * (1 - mask))
