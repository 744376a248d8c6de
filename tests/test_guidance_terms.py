"""What steers the edit beyond one prompt, on the tiny models over short edits: weighted and negative prompt
parts, image targets, an ensemble of two CLIPs of different sizes, and the guidance schedule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blended.augment import AugmentationSettings
from blended.checkpoint import load_guided_diffusion
from blended.clip_model import load_guidance_clip
from blended.diffusion import create_diffusion
from blended.guidance import ClipTerm, GuidanceObjective, GuidanceSettings, TargetSet
from blended.prompts import parse_prompt, parse_prompt_lines
from blended.rank import clip_scores, image_embeddings
from blended.sampler import SamplerSettings, edit_image, guided_step
from blended.schedule import GuidanceSchedule
from blended.targets import GuidanceClip, ImageTarget

REF = Path(__file__).parent / "fixtures" / "reference"
PROMPT = "a red rock"


@pytest.fixture(scope="module")
def unet():
    return load_guided_diffusion(path=REF / "gd_tiny" / "model.safetensors")[0]


@pytest.fixture(scope="module")
def clip():
    return load_guidance_clip(path=REF / "clip_tiny" / "model.safetensors")


def make_second_clip():
    """A second tiny CLIP built from the fixture's config with other dimensions and random weights: other
    input size (48 px, 16 px patches), other widths and embedding size."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    config = json.loads((REF / "clip_tiny" / "config.json").read_text())
    config.update(embed_dim=48, image_resolution=48, vision_patch_size=16, vision_width=128,
                  transformer_width=128, transformer_heads=2)
    torch.manual_seed(1234)
    model = CLIP(config["embed_dim"],
                 CLIPVisionCfg(layers=config["vision_layers"], width=config["vision_width"],
                               patch_size=config["vision_patch_size"], image_size=config["image_resolution"]),
                 CLIPTextCfg(context_length=config["context_length"], vocab_size=config["vocab_size"],
                             width=config["transformer_width"], heads=config["transformer_heads"],
                             layers=config["transformer_layers"]),
                 quick_gelu=True)
    return load_guidance_clip(state_dict=model.state_dict())


@pytest.fixture(scope="module")
def clip2():
    return make_second_clip()


@pytest.fixture(scope="module")
def diffusion():
    return create_diffusion(timestep_respacing="6")


def run(unet, diffusion, clip, image, mask, prompts=(PROMPT,), clip_lambda=1e5, views=1, seed=1, schedule=None,
        range_lambda=50.0, **kwargs):
    """A short edit: 4 steps, 2 results."""
    return edit_image(image, mask, unet, diffusion, clip, list(prompts), seed=seed, num_results=2,
                      settings=SamplerSettings(skip_timesteps=2, batch_size=2),
                      guidance_settings=GuidanceSettings(clip_lambda=clip_lambda, range_lambda=range_lambda,
                                                         augmentations=AugmentationSettings(num_views=views),
                                                         schedule=schedule),
                      **kwargs)


def distances(clip, result, target, mask):
    """CLIP distances as the guidance measures them (masked region on grey, CLIP-normalised)."""
    return clip_scores(clip, result.images.movedim(-1, 1), target, mask=mask[:, None], mode="guidance view")


@pytest.fixture(scope="module")
def plain(unet, diffusion, clip, image_and_mask):
    """The edit with one plain prompt, which several tests compare against."""
    return run(unet, diffusion, clip, *image_and_mask)


@pytest.fixture(scope="module")
def no_clip(unet, diffusion, clip, image_and_mask):
    """The same edit without CLIP guidance (range loss only)."""
    return run(unet, diffusion, clip, *image_and_mask, clip_lambda=0.0)


# ------------------------------------------------------------------------------------------ weighted prompts

def test_a_parsed_plain_prompt_gives_the_same_images(unet, diffusion, clip, image_and_mask, plain):
    image, mask = image_and_mask
    parsed = run(unet, diffusion, clip, image, mask, prompts=parse_prompt_lines(PROMPT))
    assert torch.equal(plain.images, parsed.images)
    assert parsed.prompts == [PROMPT, PROMPT]


def objective_loss(clip, prompt, clip_lambda, x, mask, init):
    line = parse_prompt(prompt)
    embeds = torch.cat([clip.text_embedding(p.text) for p in line.parts])
    targets = TargetSet(embeds[None], torch.tensor([[p.weight for p in line.parts]]))
    settings = GuidanceSettings(clip_lambda=clip_lambda, range_lambda=0.0,
                                augmentations=AugmentationSettings(num_views=1))
    objective = GuidanceObjective(None, None, mask, init, settings, terms=[ClipTerm(clip, targets)])
    return objective.loss(x, x, 0.0, [0, 1], 5)


def test_the_loss_is_the_weighted_sum_of_the_parts(clip):
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
    init, mask = torch.zeros(1, 3, 64, 64), torch.ones(1, 1, 64, 64)

    def loss(prompt, clip_lambda=1000.0):
        return float(objective_loss(clip, prompt, clip_lambda, x, mask, init))

    assert loss("a red rock:2") == pytest.approx(loss("a red rock", 2000.0), rel=1e-6)
    assert loss("a red rock | moss:0.5 | blurry:-0.5") == pytest.approx(
        loss("a red rock") + 0.5 * loss("moss") - 0.5 * loss("blurry"), rel=1e-5)


def test_a_negative_part_pushes_the_edit_away_from_its_text(unet, diffusion, clip, image_and_mask, plain):
    image, mask = image_and_mask
    negative = "a blue sky"
    pushed = run(unet, diffusion, clip, image, mask, prompts=[parse_prompt(f"{PROMPT} | {negative}:-1")])
    before, after = distances(clip, plain, negative, mask), distances(clip, pushed, negative, mask)
    assert (after > before).all(), (before, after)


# --------------------------------------------------------------------------------------------- image targets

def test_an_image_target_pulls_the_edit_toward_the_picture(unet, diffusion, clip, image_and_mask):
    image, mask = image_and_mask
    reference = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(7))
    target_embed = image_embeddings(clip, reference)
    unguided = run(unet, diffusion, clip, image, mask, prompts=[""])
    # the tiny random CLIP maps all pictures close together: its image distances need a strong weight
    guided = run(unet, diffusion, clip, image, mask, prompts=[""], image_targets=[ImageTarget(reference)],
                 clip_lambda=1e7)
    before, after = distances(clip, unguided, target_embed, mask), distances(clip, guided, target_embed, mask)
    assert (after < before).all(), (before, after)


def test_an_image_target_under_a_mask_counts_only_the_masked_part(clip):
    from blended.targets import image_target_embeddings

    gen = torch.Generator().manual_seed(8)
    reference = torch.rand(1, 3, 48, 48, generator=gen)
    region = torch.zeros(1, 1, 48, 48)
    region[..., 8:30, 10:40] = 1
    changed = reference * region + torch.rand(1, 3, 48, 48, generator=gen) * (1 - region)
    (a, wa), = image_target_embeddings(clip, [ImageTarget(reference, region, 2.0)], "cpu")
    (b, _), = image_target_embeddings(clip, [ImageTarget(changed, region, 2.0)], "cpu")
    (c, _), = image_target_embeddings(clip, [ImageTarget(reference)], "cpu")
    assert torch.equal(a, b) and not torch.allclose(a, c) and wa == 2.0


# ------------------------------------------------------------------------------------------ CLIP ensemble

def test_the_second_clip_has_other_dimensions(clip, clip2):
    assert (clip.image_size, clip2.image_size) == (32, 48)
    assert clip.text_embedding(PROMPT).shape[1] == 32 and clip2.text_embedding(PROMPT).shape[1] == 48


def test_the_ensemble_loss_is_the_weighted_sum_of_each_clips_loss(clip, clip2):
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1
    init, mask = torch.zeros(1, 3, 64, 64), torch.ones(1, 1, 64, 64)
    settings = GuidanceSettings(range_lambda=0.0, augmentations=AugmentationSettings(num_views=1))

    def loss(*weights):
        clips = (clip, clip2)[:len(weights)]
        terms = [ClipTerm(c, TargetSet.single(c.text_embedding(PROMPT)), w)
                 for c, w in zip(clips, weights, strict=True)]
        return GuidanceObjective(None, None, mask, init, settings, terms=terms).loss(x, x, 0.0, [0, 1], 3)

    assert torch.equal(loss(1.0, 0.0), loss(1.0))
    torch.testing.assert_close(loss(1.0, 0.5), loss(1.0) + 0.5 * loss(0.0, 1.0), rtol=1e-6, atol=0)


def test_an_ensemble_guides_with_both_clips_at_their_own_sizes(unet, diffusion, clip, clip2, image_and_mask,
                                                              plain):
    image, mask = image_and_mask
    seen = []
    encode = clip2.encode_image
    clip2.encode_image = lambda images: (seen.append(tuple(images.shape)), encode(images))[1]
    try:
        both = run(unet, diffusion, clip, image, mask, extra_clips=[GuidanceClip(clip2, 1.0, 3)])
    finally:
        del clip2.encode_image
    alone = plain
    assert seen == [(2 * 3, 3, 48, 48)] * 4  # 2 results x 3 views at 48 px, at each of the 4 steps
    # CLIP Rank and metrics may use either CLIP: the second one scores the ensemble's results closer.
    before, after = distances(clip2, alone, PROMPT, mask), distances(clip2, both, PROMPT, mask)
    assert (after < before).all(), (before, after)


# -------------------------------------------------------------------------------------- guidance schedule

def test_schedule_scales_the_clip_weight_per_step(clip):
    settings = GuidanceSettings(schedule=GuidanceSchedule("linear", (0.0, 2.0)))
    objective = GuidanceObjective(clip, clip.text_embedding(PROMPT), torch.ones(1, 1, 8, 8),
                                  torch.zeros(1, 3, 8, 8), settings, num_steps=5)
    # indices count down: 4 is the first step run, 0 the last
    assert [objective.clip_weight(i) for i in (4, 3, 2, 1, 0)] == [0.0, 500.0, 1000.0, 1500.0, 2000.0]
    constant = GuidanceObjective(clip, clip.text_embedding(PROMPT), torch.ones(1, 1, 8, 8),
                                 torch.zeros(1, 3, 8, 8), GuidanceSettings(schedule=GuidanceSchedule()))
    assert constant.clip_weight(3) == 1000.0


def test_schedules_over_a_short_edit(unet, diffusion, clip, image_and_mask, plain, no_clip):
    image, mask = image_and_mask
    off = run(unet, diffusion, clip, image, mask, schedule=GuidanceSchedule("values", (0.0,)))
    assert torch.equal(off.images, no_clip.images)
    # a ramp from 0 to 1 guides less than the constant weight: its results end farther from the prompt
    ramp = run(unet, diffusion, clip, image, mask, schedule=GuidanceSchedule("linear", (0, 1)))
    d_constant, d_ramp, d_off = (distances(clip, r, PROMPT, mask) for r in (plain, ramp, off))
    assert (d_constant < d_ramp).all() and (d_ramp < d_off).all(), (d_constant, d_ramp, d_off)


@pytest.mark.parametrize("guard", ["clamp", "normalize"])
def test_gradient_guard_bounds_each_step(unet, diffusion, clip, image_and_mask, guard):
    image, mask = image_and_mask
    init = image.movedim(-1, 1) * 2 - 1
    model_mask = mask[:, None]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    noise = torch.zeros_like(x)

    def grad_with(schedule):
        settings = GuidanceSettings(clip_lambda=1e5, augmentations=AugmentationSettings(num_views=1),
                                    schedule=schedule)
        objective = GuidanceObjective(clip, clip.text_embedding(PROMPT), model_mask, init, settings, num_steps=4)
        return guided_step(unet, diffusion, objective, x, 3, init, model_mask, noise, noise[:1],
                           SamplerSettings(), [0, 1])["grad"]

    free = grad_with(None)
    limit = 0.25 * float(free.abs().max()) if guard == "clamp" else 0.25 * float(free.pow(2).mean().sqrt())
    guarded = grad_with(GuidanceSchedule(guard=guard, limit=limit))
    if guard == "clamp":
        assert float(free.abs().max()) > limit and float(guarded.abs().max()) <= limit
    else:
        rms = guarded.pow(2).mean(dim=(1, 2, 3)).sqrt()
        assert (rms <= limit * (1 + 1e-5)).all() and float(free.pow(2).mean(dim=(1, 2, 3)).sqrt().max()) > limit
    # the direction is kept (normalize) or mostly kept (clamp)
    cosine = torch.nn.functional.cosine_similarity(guarded.flatten(1), free.flatten(1))
    assert (cosine > (0.999 if guard == "normalize" else 0.5)).all()


def test_gradient_guard_over_a_short_edit(unet, diffusion, clip, image_and_mask, no_clip):
    """With a huge CLIP weight, the guard keeps the edit closer to what the model alone would make."""
    image, mask = image_and_mask
    unguided = no_clip
    wild = run(unet, diffusion, clip, image, mask, clip_lambda=1e7)
    guarded = run(unet, diffusion, clip, image, mask, clip_lambda=1e7,
                  schedule=GuidanceSchedule(guard="normalize", limit=1e-3))
    change = {name: (r.images - unguided.images).abs().mean() for name, r in (("wild", wild), ("guarded", guarded))}
    assert change["guarded"] < change["wild"], change
