"""The speed options together with the features: each option keeps its documented tolerance to the plain float32
edit when soft masks, resampling, crops, DDIM, local mode, image targets, schedules and CLIP ensembles are on, and
the options that keep state over a run (CUDA graphs, through ``tests/test_cuda_graphs.py``'s replay emulator) give
eager's bits without capturing more than a run's few input signatures (tiny fixtures, CPU)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from test_cuda_graphs import emulate_graphs

from blended import cuda_graphs, fast_paths, targets
from blended.augment import AugmentationSettings
from blended.fast_paths import parse_preset
from blended.guidance import GuidanceSettings
from blended.sampler import SamplerSettings, edit_image
from blended.schedule import GuidanceSchedule
from conftest import tiny_clip

STEPS = 3


def _picture(batch: int = 1, grey: bool = False):
    """A 72x96 IMAGE batch and its MASK (grey on the left of the region when ``grey``): not the model's square,
    so the full-image squash and the crop both resize."""
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(batch, 72, 96, 3, generator=generator)
    mask = torch.zeros(batch, 72, 96)
    mask[:, 20:50, 30:70] = 1
    if grey:
        mask[:, 20:50, 30:42] = 0.4
    return image, mask


def _guidance(**changes) -> GuidanceSettings:
    settings = dict(range_lambda=50.0, augmentations=AugmentationSettings(num_views=3))
    return GuidanceSettings(**{**settings, **changes})


def _edit(unet, clip, diffusion, preset: str, *, batch: int = 1, grey: bool = False, num_results: int = 2,
          batch_size: int = 2, guidance: GuidanceSettings | None = None, extra_clips=(), image_targets=(),
          lpips_model=None, **sampler):
    """One ``edit_image`` run with ``preset`` applied as the Sampler node applies it (run clones, the sampler's
    and the augmentations' options; ``extra_clips`` as (CLIP, weight, views), each through its own run clone).
    Returns the images and the run's graphed calls as (name, captures, replays, why eager)."""
    options = parse_preset(preset)
    settings = fast_paths.sampler_settings_with(
        SamplerSettings(skip_timesteps=diffusion.num_timesteps - STEPS, batch_size=batch_size, **sampler), options)
    guidance = fast_paths.guidance_settings_with(guidance or _guidance(), options)
    image, mask = _picture(batch, grey)
    with fast_paths.run_clones(unet, clip, options) as (unet_run, clip_run), contextlib.ExitStack() as stack:
        members = [stack.enter_context(fast_paths.run_clip_clone(extra, options)) for extra, _, _ in extra_clips]
        ensemble = [targets.GuidanceClip(member, weight, views)
                    for member, (_, weight, views) in zip(members, extra_clips, strict=True)]
        result = edit_image(image, mask, unet_run, diffusion, clip_run, ["a red rock"], seed=3,
                            num_results=num_results, settings=settings, guidance_settings=guidance,
                            extra_clips=ensemble, image_targets=image_targets, lpips_model=lpips_model)
        graphed = cuda_graphs.graphed_calls(unet_run, clip_run) + [m.graphed_tower for m in members
                                                                    if m.graphed_tower is not None]
        calls = [(c.name, c.captures, c.replays, c.disabled) for c in graphed]
    return result.images, calls


def _squared_difference(a, b):
    """A stand-in for LPIPS (the package is optional): a per-sample distance with a gradient."""
    return (a - b).square().mean(dim=(1, 2, 3))


# The features, each with what it needs beyond the defaults.
FEATURES = {
    "soft mask + resampling": dict(grey=True, soft_mask=True, resample_count=1, resample_jump_length=2),
    "crop + ddim + colour match": dict(region="mask_crop", method="ddim", colour_match="rgb", feather=3,
                                       num_results=3),
    "local + background losses": dict(mode="local", guidance=_guidance(background_l2_lambda=100.0,
                                                                       background_lpips_lambda=10.0),
                                      lpips_model=_squared_difference),
    "image target + schedule": dict(guidance=_guidance(schedule=GuidanceSchedule("values", (1.0, 0.0, 1.0))),
                                    image_targets=[targets.ImageTarget(torch.rand(1, 3, 40, 40))]),
}

# Each option with the largest max|difference| of the edited images to the plain float32 edit that its
# documentation allows: README "Speed and memory" (bf16 states a gradient cosine; 2e-2 of the images is loose
# for it but far below what a dropped guidance term or a wrong blend gives, about 0.5 on these pictures).
TOLERANCES = {
    "reuse": 1e-5,
    "channels_last": 1e-4,
    "ckpt+clip_ckpt": 1e-7,
    "triton_norm+triton_clip+channels_last": 1e-5,
    "single_resample": None,  # other views on purpose: only checked to run
    "bf16+reuse": 2e-2,
    "fp16-torso+ckpt+channels_last": 2e-2,
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_each_option_keeps_its_tolerance_with_each_feature(unet, clip, diffusion, feature):
    plain, _ = _edit(unet, clip, diffusion, "fp32", **FEATURES[feature])
    for preset, tolerance in TOLERANCES.items():
        images, _ = _edit(unet, clip, diffusion, preset, **FEATURES[feature])
        assert images.shape == plain.shape and bool(torch.isfinite(images).all()), preset
        if tolerance is not None:
            difference = (images - plain).abs().max().item()
            assert difference <= tolerance, f"{preset} with {feature}: max|diff| {difference:.3g} > {tolerance}"


@pytest.mark.parametrize("preset, feature, unet_captures", [
    ("fp32+reuse", dict(grey=True, soft_mask=True, resample_count=1, resample_jump_length=2), 1),
    ("fp32+reuse+channels_last", dict(grey=True, soft_mask=True, region="mask_crop"), 1),
    # the schedule turns CLIP off for a step: the UNet's graph still replays, CLIP's waits
    ("fp32", dict(guidance=_guidance(range_lambda=0.0, schedule=GuidanceSchedule("values", (1.0, 0.0, 1.0)))), 2),
])
def test_graphs_give_eagers_bits_with_the_features_that_change_a_runs_steps(unet, clip, diffusion, monkeypatch,
                                                                            preset, feature, unet_captures):
    eager, eager_calls = _edit(unet, clip, diffusion, preset, **feature)
    emulate_graphs(monkeypatch)
    graphed, calls = _edit(unet, clip, diffusion, preset + "+cuda_graphs", **feature)
    assert eager_calls == []
    assert calls[0][:2] == ("UNet", unet_captures) and calls[0][2] > 0 and calls[1][2] > 0
    assert all(why is None for *_, why in calls)
    assert torch.equal(graphed, eager)


def test_graphs_keep_every_signature_of_an_image_batch_with_a_short_last_chunk(unet, clip, diffusion, monkeypatch):
    """fp32 without reuse: the UNet is called with and without autograd, at the batch and at the last chunk's
    smaller one: four signatures, again for every input image. With three graphs kept, the oldest dropped, each
    image captured all four again, and the third image's ninth capture turned the graphs off for the run with a
    warning about "8 input shapes"."""
    feature = dict(batch=3, num_results=3, batch_size=2)
    eager, _ = _edit(unet, clip, diffusion, "fp32", **feature)
    captured = emulate_graphs(monkeypatch)
    graphed, calls = _edit(unet, clip, diffusion, "fp32+cuda_graphs", **feature)
    assert calls[0][0] == "UNet" and calls[0][1] == 4 and calls[0][3] is None, calls
    assert calls[1][0] == "CLIP image tower" and calls[1][1] == 2 and calls[1][3] is None, calls
    assert len(captured) == 6
    assert torch.equal(graphed, eager)


def test_graphed_calls_drop_the_least_recently_used_graph(monkeypatch):
    emulate_graphs(monkeypatch)
    calls = cuda_graphs.GraphedCalls(lambda x: x * 2, "net", keep=2)

    def call(size):
        return calls(torch.ones(size, requires_grad=True))
    for size in (1, 1, 2, 2):
        call(size)  # graphs of sizes 1 and 2, captured in that order
    call(1)  # size 1 used last: size 2 is the one to drop
    call(3)
    call(3)
    call(1)
    assert calls.captures == 3 and calls.replays == 5


def test_an_ensemble_clip_runs_with_the_clip_options_on_a_clone(clip, monkeypatch):
    """More CLIPs of an ensemble took no speed option (they ran as loaded, beside the run clones): CLIP
    checkpointing, the Triton kernels, channels_last, CUDA graphs and CLIP precision were silently dropped for
    them. ``run_clip_clone`` gives them the main CLIP's configuration on a clone."""
    emulate_graphs(monkeypatch)
    extra = tiny_clip()
    before = {k: v.clone() for k, v in extra.model.state_dict().items()}
    options = parse_preset("bf16+channels_last+clip_ckpt+triton_clip+cuda_graphs")
    with fast_paths.run_clip_clone(extra, options) as clone:
        assert clone.model is not extra.model and clone.dtype == torch.bfloat16
        assert clone.model.visual.transformer.grad_checkpointing and clone.kernels == "triton"
        assert isinstance(clone.graphed_tower, cuda_graphs.GraphedCalls)
        conv = clone.model.visual.conv1.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
        assert clone.model.visual.class_embedding.dtype == torch.bfloat16  # precast, as the main clone
    assert clone.graphed_tower is None and all(p.numel() == 0 for p in clone.model.parameters())
    assert extra.dtype == torch.float32 and extra.graphed_tower is None and extra.kernels is None
    assert not extra.model.visual.transformer.grad_checkpointing
    assert all(torch.equal(v, before[k]) for k, v in extra.model.state_dict().items())


def test_an_ensemble_run_through_graphs_and_checkpointing_gives_eagers_bits(unet, clip, diffusion, monkeypatch):
    extra = tiny_clip()
    feature = dict(extra_clips=[(extra, 0.5, 2)], num_results=1, batch_size=1)
    eager, _ = _edit(unet, clip, diffusion, "fp32+reuse", **feature)
    emulate_graphs(monkeypatch)
    graphed, calls = _edit(unet, clip, diffusion, "fp32+reuse+clip_ckpt+cuda_graphs", **feature)
    assert [name for name, *_ in calls] == ["UNet", "CLIP image tower", "CLIP image tower"]
    assert all(captures == 1 and replays == STEPS - 1 and why is None for _, captures, replays, why in calls)
    assert torch.equal(graphed, eager)


def test_image_targets_are_embedded_without_a_graph_of_their_own(unet, clip, diffusion, monkeypatch):
    """Two image targets of one shape embed through the same tower call twice before the run's first step: that
    captured a forward-only graph, replayed never again, whose memory pool and slot lasted the whole run."""
    pictures = [targets.ImageTarget(torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(s)))
                for s in (1, 2)]
    feature = dict(image_targets=pictures, num_results=1, batch_size=1)
    eager, _ = _edit(unet, clip, diffusion, "fp32+reuse", **feature)
    captured = emulate_graphs(monkeypatch)
    graphed, calls = _edit(unet, clip, diffusion, "fp32+reuse+cuda_graphs", **feature)
    assert [kind for kind, _ in captured] == ["autograd", "autograd"], captured  # the UNet and CLIP, no more
    assert torch.equal(graphed, eager)
