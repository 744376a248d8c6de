"""Per-result seeds: result i of an input is the same whatever the batch, the split, the company and the run.

Two kinds of checks. With the real tiny models a batched convolution or matmul rounds a sample differently at
another batch size (measured: about 2e-5 after 4 steps, 1.3e-4 after 75), so across batch sizes only closeness
can be asked for; at one batch size, two runs (and a run restarted after an out-of-memory error) are bit-identical.
With "batch-invariant" wrappers of the same models (the UNet and CLIP's image tower run sample by sample) every
remaining operation of the sampler is per sample, so every feature that draws random numbers or groups results
must give bit-identical results however they are batched: that holds the bookkeeping (result ids, background
groups, augmentation streams, resampling repeats, frames, prompt and image grouping) exactly.
"""

from __future__ import annotations

import copy

import pytest
import torch

from blended import memory, seeds
from blended.augment import AugmentationSettings
from blended.diffusion import create_diffusion
from blended.guidance import GuidanceSettings
from blended.noise import SeededNoise
from blended.sampler import SamplerSettings, edit_image
from blended.schedule import GuidanceSchedule
from blended.targets import GuidanceClip, ImageTarget
from blended.unet import GuidedDiffusionUNet, UNetConfig

PROMPT = "a red rock"


class PerSampleUNet(torch.nn.Module):
    """The UNet run one sample at a time: its output for a sample cannot depend on the rest of the batch."""

    def __init__(self, unet):
        super().__init__()
        self.inner = unet
        self.config = unet.config
        self.noise_schedule = getattr(unet, "noise_schedule", None)

    def forward(self, x, timesteps, **kwargs):
        return torch.cat([self.inner(x[i:i + 1], timesteps[i:i + 1], **{k: v[i:i + 1] for k, v in kwargs.items()})
                          for i in range(x.shape[0])])


def per_sample_clip(clip):
    """A copy of ``clip`` whose image tower sees one view at a time (text and weights shared)."""
    wrapped = copy.copy(clip)
    encode = clip.encode_image
    wrapped.encode_image = lambda images: torch.cat([encode(images[i:i + 1]) for i in range(images.shape[0])])
    return wrapped


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: a sample-by-sample model is many small ops, which two threads only slow down on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def invariant(unet, clip):
    return PerSampleUNet(unet), per_sample_clip(clip)


def edit(unet, clip, image, mask, num_results, batch_size, prompts=(PROMPT,), seed=3, views=3, guidance=None,
         respacing="10", skip=6, extra_clips=(), image_targets=(), **settings):
    """A short edit (4 steps of 10 by default) with CLIP views on."""
    guidance = guidance or GuidanceSettings(augmentations=AugmentationSettings(num_views=views))
    return edit_image(image, mask, unet, create_diffusion(timestep_respacing=respacing), clip, list(prompts),
                      seed=seed, num_results=num_results,
                      settings=SamplerSettings(skip_timesteps=skip, batch_size=batch_size, **settings),
                      guidance_settings=guidance, extra_clips=extra_clips, image_targets=image_targets)


def common(result, num_results: int, num_prompts: int, keep: int, frames: bool = False) -> torch.Tensor:
    """The first ``keep`` results of every (input, prompt) group, [inputs, prompts, keep, ...] (their frames)."""
    images = result.images
    if frames:
        per_result = result.frames.shape[0] // images.shape[0]
        images = result.frames.view(images.shape[0], per_result, *result.frames.shape[1:])
    inputs = images.shape[0] // (num_prompts * num_results)
    return images.view(inputs, num_prompts, num_results, *images.shape[1:])[:, :, :keep]


def assert_batch_invariant(make, num_prompts: int = 1, small=(2, 1), large=(3, 2)):
    """``make(num_results, batch_size)``: the results both runs share are bit-identical, frames too. By default
    results 0 and 1 each made alone against the three made in batches of 2 (result 1 then second in its batch)."""
    a, b = make(*small), make(*large)
    keep = min(small[0], large[0])
    assert torch.equal(common(a, small[0], num_prompts, keep), common(b, large[0], num_prompts, keep))
    assert a.prompts[:keep] == b.prompts[:keep]
    if a.frames is not None:
        assert torch.equal(common(a, small[0], num_prompts, keep, True), common(b, large[0], num_prompts, keep, True))


SCHEDULE = GuidanceSchedule("linear", (1.0, 0.2), "normalize", 0.01)

# Every feature that draws random numbers or depends on the batch, each alone or in the company it meets.
CASES = {
    "defaults": {},
    "harmonising resampling": dict(resample_count=2, resample_jump_length=2),
    "ddim eta": dict(method="ddim", ddim_eta=0.5),
    "ddim respacing, previous background": dict(respacing="ddim10", method="ddim", background_noise_step="previous"),
    "local mode and frames": dict(mode="local", capture_every=2),
    "crop, soft mask, grow and feather": dict(region="mask_crop", soft_mask=True, grow_mask=2, feather=3),
    "prompt lines, one empty": dict(prompts=("", PROMPT)),
    "schedule and gradient guard, warps": dict(guidance=GuidanceSettings(schedule=SCHEDULE, augmentations=(
        AugmentationSettings(num_views=4, single_resample=True, fix_translate=True, padding_mode="reflection")))),
    "background l2 (lambda / group)": dict(guidance=GuidanceSettings(
        background_l2_lambda=1000.0, augmentations=AugmentationSettings(num_views=3))),
    "everything at once": dict(prompts=(PROMPT, "a blue sky"), resample_count=1, resample_jump_length=2,
                               soft_mask=True, method="ddim", ddim_eta=0.3, capture_every=3, region="mask_crop"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_each_feature_gives_a_result_the_same_bits_whatever_its_batch(invariant, image_and_mask, case):
    """Results 0 and 1 made alone (batches of 1) and beside each other and result 2 (batches of 2, so the chunks
    split differently per prompt line) are the same bits: nothing in the sampler outside the models depends on the
    batch."""
    unet, clip = invariant
    image, mask = image_and_mask
    options = dict(CASES[case])
    soft = options.get("soft_mask")
    if soft:
        mask = mask * 0.6
        mask[:, 20:30, 25:35] = 1.0
    prompts = options.get("prompts", (PROMPT,))
    assert_batch_invariant(lambda n, size: edit(unet, clip, image, mask, n, size, **options), len(prompts))


def test_groups_of_four_across_chunk_boundaries(invariant, image_and_mask):
    """Results 0..4 (two background groups) made in one batch of 5 and in batches of 4 + 2 of six results."""
    unet, clip = invariant
    image, mask = image_and_mask
    assert_batch_invariant(lambda n, size: edit(unet, clip, image, mask, n, size), small=(5, 5), large=(6, 4))
    assert_batch_invariant(lambda n, size: edit(unet, clip, image, mask, n, size, group_size=3),
                           small=(4, 4), large=(5, 2))


def test_several_images_and_one_image_with_several_masks(invariant, image_and_mask):
    """Each input has its own results (the result id holds its place in the batch), however the results of each
    are batched; one image with three masks is three inputs."""
    unet, clip = invariant
    image, mask = image_and_mask
    images, masks = torch.cat([image, image.flip(1)]), torch.cat([mask, mask.flip(2)])
    assert_batch_invariant(lambda n, size: edit(unet, clip, images, masks, n, size))
    three = torch.cat([mask, mask.flip(1), mask.flip(2)])
    assert_batch_invariant(lambda n, size: edit(unet, clip, image, three, n, size, region="mask_crop"))
    both = edit(unet, clip, images, masks, 1, 1)
    assert not torch.equal(both.images[0], both.images[1].flip(0))  # the second input is not the first's mirror


def test_several_clips_and_an_image_target(invariant, unet, clip, image_and_mask):
    """An extra CLIP (its own views and stream) and an image target, batch-invariant."""
    unet_i, clip_i = invariant
    image, mask = image_and_mask
    gen = torch.Generator().manual_seed(5)
    target = [ImageTarget(torch.rand(1, 3, 40, 40, generator=gen), None, 0.7)]
    extra = [GuidanceClip(per_sample_clip(clip), 0.5, 2)]
    assert_batch_invariant(lambda n, size: edit(unet_i, clip_i, image, mask, n, size, extra_clips=extra,
                                                image_targets=target))


def test_class_conditional_labels_with_resampling(clip):
    """A class-conditional model draws a random class per result, step and resampling pass: batch-invariant."""
    config = UNetConfig(image_size=32, model_channels=32, num_res_blocks=1, attention_resolutions=(2,),
                        channel_mult=(1, 2), num_classes=1000, num_head_channels=32)
    torch.manual_seed(0)
    unet = PerSampleUNet(GuidedDiffusionUNet(config).eval().requires_grad_(False))
    image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(1, 32, 32)
    assert_batch_invariant(lambda n, size: edit(unet, per_sample_clip(clip), image, mask, n, size, views=2,
                                                resample_count=1, resample_jump_length=2))


def test_with_the_real_models_two_runs_are_bit_identical_and_batches_agree_to_rounding(unet, clip, image_and_mask):
    """The same seed and batch twice: the same bits (and the inputs untouched). Another batch size: only the
    batched kernels' rounding differs, far below one 8-bit level (a wrong stream would differ by tenths)."""
    image, mask = image_and_mask
    image_before, mask_before = image.clone(), mask.clone()
    options = dict(resample_count=1, resample_jump_length=2, soft_mask=True, capture_every=2)
    first = edit(unet, clip, image, mask, 3, 3, **options)
    again = edit(unet, clip, image, mask, 3, 3, **options)
    assert torch.equal(first.images, again.images) and torch.equal(first.frames, again.frames)
    assert torch.equal(image, image_before) and torch.equal(mask, mask_before)
    split = edit(unet, clip, image, mask, 3, 2, **options)
    torch.testing.assert_close(split.images, first.images, atol=2e-4, rtol=0)
    other_seed = edit(unet, clip, image, mask, 1, 1, seed=4, **options)
    assert (other_seed.images[0] - first.images[0]).abs().max() > 0.05


def test_an_auto_batch_restarted_smaller_after_out_of_memory_gives_the_smaller_batchs_bits(unet, clip, image_and_mask):
    """An out-of-memory error in the middle of an auto batch's edit (after some steps of it ran): the edit starts
    again at a smaller batch and gives exactly what that batch gives when run directly, nothing left over."""
    image, mask = image_and_mask
    forward = unet.forward
    calls = {"n": 0}

    def running_out(x, timesteps, **kwargs):
        calls["n"] += 1
        if x.shape[0] > 2 and calls["n"] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(x, timesteps, **kwargs)

    sizes = []

    def attempt(size):
        sizes.append(size)
        return edit(unet, clip, image, mask, 4, size, resample_count=1, resample_jump_length=2)

    unet.forward = running_out
    try:
        restarted = memory.run_with_smaller_batches(attempt, 4, 4, auto=True, free_memory=lambda: None,
                                                    is_oom=lambda exc: isinstance(exc, torch.OutOfMemoryError))
    finally:
        del unet.forward
    assert sizes[0] == 4 and sizes[-1] <= 2
    direct = edit(unet, clip, image, mask, 4, sizes[-1], resample_count=1, resample_jump_length=2)
    assert torch.equal(restarted.images, direct.images)


def test_the_seeded_streams_keep_their_numbers():
    """The numbers each stream gives for seed 404: users' saved seeds must give the same images after an update,
    so a change to the key mixing, the stream names, the result ids, the repeat key or the background groups
    fails here (the parity tests replay recorded noises and would not see it). The normal draws are compared to
    1e-5: torch's CPU randn rounds their last bits differently with and without AVX2 (an ARM Mac, an older CPU),
    where a wrong stream differs by about 1; seeds, labels and uniform draws are exact everywhere."""
    noise = SeededNoise(404)
    ids = [seeds.result_id(0, 0), seeds.result_id(1, 5)]
    shape = (2, 3, 4, 4)

    def head(t):
        return [row.flatten()[:3].tolist() for row in t]

    def assert_draws(t, expected):
        torch.testing.assert_close(torch.tensor(head(t)), torch.tensor(expected), atol=1e-5, rtol=0)

    assert seeds.derive_seed(404, seeds.STREAM_STEP_NOISE, ids[1], 7) == 161817472688961527
    assert_draws(noise.initial(9, shape, ids), [[-1.2302747964859009, -0.5308480858802795, 0.1675230860710144],
                                                [-1.31304931640625, 0.42548009753227234, -0.8045096397399902]])
    assert_draws(noise.step(9, shape, ids), [[-1.1786119937896729, -0.04419630765914917, 0.2710072100162506],
                                             [-0.8833602070808411, 0.7825814485549927, -0.9227678775787354]])
    assert_draws(noise.step(9, shape, ids, repeat=1), [[0.08452755212783813, -0.1871705800294876, 1.6236648559570312],
                                                       [-0.03270603343844414, 1.5523567199707031, -0.607774555683136]])
    assert_draws(noise.background(9, shape, ids), [[0.9962854385375977, 2.7361645698547363, -0.2575257420539856],
                                                   [0.126144140958786, 1.0830854177474976, -0.008633381687104702]])
    assert_draws(noise.resample(9, shape, ids, 1), [[1.0424683094024658, -0.4703083336353302, 1.1868318319320679],
                                                    [0.4717310667037964, -0.35927653312683105, 0.34777262806892395]])
    assert noise.labels(9, ids, 1000).tolist() == [631, 871]
    assert noise.labels(9, ids, 1000, repeat=2).tolist() == [758, 29]
    views = torch.rand(3, generator=seeds.generator_for(404, seeds.STREAM_AUGMENTATION, ids[1], 9))
    assert views.tolist() == [0.6069077849388123, 0.7610862255096436, 0.2586027979850769]


@pytest.mark.parametrize("seed", [0, 2**32, 2**63, 2**64 - 1])
def test_every_seed_the_widget_allows_has_its_own_streams(seed):
    """The Sampler's seed runs from 0 to 2**64 - 1. torch's CPU generator keeps only the low 32 bits of the seed it
    is given, so the user's seed must be mixed before it meets one: seeds 2**32 apart would otherwise alias."""
    shape, ids = (1, 3, 4, 4), [0]
    drawn = SeededNoise(seed).step(5, shape, ids)
    assert torch.isfinite(drawn).all()
    for other in (seed ^ 1, (seed + 2**32) % 2**64, (seed + 2**63) % 2**64):
        assert not torch.equal(drawn, SeededNoise(other).step(5, shape, ids)), other
    assert seeds.derive_seed(seed, 2) < 2**63  # what torch.Generator.manual_seed takes on every version
