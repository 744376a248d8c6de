"""The whole sampler on the tiny fixtures: guidance works, the background is exact, seeds repeat."""

import pytest
import torch

from blended.augment import AugmentationSettings
from blended.diffusion import create_diffusion
from blended.errors import BlendedInputError
from blended.guidance import GuidanceObjective, GuidanceSettings
from blended.rank import clip_scores
from blended.sampler import SamplerSettings, check_settings, edit_image, sample_results
from blended.unet import GuidedDiffusionUNet, UNetConfig

PROMPT = "a red rock"


@pytest.fixture(scope="module")
def diffusion():
    """Ten steps: the whole sampler runs many times here."""
    return create_diffusion(timestep_respacing="10")


def run(unet, diffusion, clip, image, mask, seed=1, num_results=2, clip_lambda=1000.0, views=2, prompts=(PROMPT,),
        callback=None, **settings):
    defaults = dict(skip_timesteps=3, batch_size=num_results)
    defaults.update(settings)
    return edit_image(image, mask, unet, diffusion, clip, list(prompts), seed=seed, num_results=num_results,
                      settings=SamplerSettings(**defaults), callback=callback,
                      guidance_settings=GuidanceSettings(clip_lambda=clip_lambda,
                                                         augmentations=AugmentationSettings(num_views=views)))


def outside(images, mask):
    keep = mask[0] == 0
    return images[:, keep]


def test_guidance_lowers_clip_distance(unet, diffusion, clip, image_and_mask):
    image, mask = image_and_mask
    unguided = run(unet, diffusion, clip, image, mask, clip_lambda=0.0)
    guided = run(unet, diffusion, clip, image, mask, clip_lambda=1e5)
    d_unguided = clip_scores(clip, unguided.images.movedim(-1, 1), PROMPT, mask=mask[:, None])
    d_guided = clip_scores(clip, guided.images.movedim(-1, 1), PROMPT, mask=mask[:, None])
    assert (d_guided < d_unguided).all(), (d_guided, d_unguided)


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_background_is_bit_exact_and_inside_changes(unet, diffusion, clip, image_and_mask, method):
    image, mask = image_and_mask
    result = run(unet, diffusion, clip, image, mask, method=method)
    assert result.images.shape == (2, 64, 64, 3)
    assert torch.equal(outside(result.images, mask), outside(image.expand(2, -1, -1, -1), mask))
    inside = mask[0] > 0
    assert not torch.allclose(result.images[:, inside], image.expand(2, -1, -1, -1)[:, inside])


def test_same_seed_same_images_other_seed_other_images(unet, diffusion, clip, image_and_mask):
    image, mask = image_and_mask
    a = run(unet, diffusion, clip, image, mask, seed=7)
    b = run(unet, diffusion, clip, image, mask, seed=7)
    c = run(unet, diffusion, clip, image, mask, seed=8)
    assert torch.equal(a.images, b.images)
    assert not torch.allclose(a.images, c.images)
    assert not torch.allclose(a.images[0], a.images[1])  # results of one run differ from each other


def test_result_does_not_depend_on_how_many_results(unet, diffusion, clip, image_and_mask):
    image, mask = image_and_mask
    one = run(unet, diffusion, clip, image, mask, seed=3, num_results=1)
    three = run(unet, diffusion, clip, image, mask, seed=3, num_results=3, batch_size=2)
    # Same noise, augmentations and seeds; only float32 batch effects of the conv kernels remain, far below one
    # 8-bit grey level.
    torch.testing.assert_close(three.images[0], one.images[0], atol=1 / 255, rtol=0)


def test_reuse_guided_forward_gives_the_same_images(unet, diffusion, clip, image_and_mask):
    image, mask = image_and_mask
    a = run(unet, diffusion, clip, image, mask, seed=5)
    b = run(unet, diffusion, clip, image, mask, seed=5, reuse_guided_forward=True)
    torch.testing.assert_close(a.images, b.images, atol=1e-5, rtol=0)


def test_several_prompts_each_get_their_results(unet, diffusion, clip, image_and_mask):
    image, mask = image_and_mask
    result = run(unet, diffusion, clip, image, mask, num_results=2, prompts=("a red rock", "a blue sky"),
                 batch_size=4)
    assert result.images.shape[0] == 4
    assert result.prompts == ["a red rock", "a red rock", "a blue sky", "a blue sky"]
    assert not torch.allclose(result.images[0], result.images[2])


def test_empty_prompt_means_no_guidance(unet, diffusion, clip, image_and_mask):
    image, mask = image_and_mask
    empty = edit_image(image, mask, unet, diffusion, clip, [""], seed=2, num_results=1,
                       settings=SamplerSettings(skip_timesteps=3),
                       guidance_settings=GuidanceSettings(augmentations=AugmentationSettings(num_views=1)))
    none = edit_image(image, mask, unet, diffusion, clip, ["x"], seed=2, num_results=1,
                      settings=SamplerSettings(skip_timesteps=3),
                      guidance_settings=GuidanceSettings(clip_lambda=0, range_lambda=0))
    torch.testing.assert_close(empty.images, none.images, atol=1e-6, rtol=0)


def test_local_mode_changes_the_whole_frame_and_capture_frames(unet, diffusion, clip, image_and_mask):
    """The frames are the steps' pred_xstart (as the step callback sees it) every capture_every steps and at the
    last, mapped to 0..1."""
    image, mask = image_and_mask
    preds = []
    result = run(unet, diffusion, clip, image, mask, mode="local", capture_every=2, num_results=1,
                 callback=lambda step, total, pred: preds.append(pred.detach().float().cpu().clone()))
    assert not torch.equal(outside(result.images, mask), outside(image, mask))
    steps = 10 - 3
    assert len(preds) == steps
    captured = [n for n in range(steps) if n % 2 == 0 or n == steps - 1]
    assert result.frames.shape == (len(captured), 64, 64, 3)
    expected = torch.stack([((preds[n][0] + 1) / 2).clamp(0, 1).movedim(0, -1) for n in captured])
    torch.testing.assert_close(result.frames, expected, atol=0, rtol=0)
    assert result.frames.std() > 0.01  # a picture, not a constant


def test_bad_settings_are_refused(unet, diffusion, clip, image_and_mask):
    image, mask = image_and_mask
    with pytest.raises(BlendedInputError, match="skip"):
        run(unet, diffusion, clip, image, mask, skip_timesteps=10)
    with pytest.raises(BlendedInputError, match="empty"):
        run(unet, diffusion, clip, image, torch.zeros_like(mask))
    # A negative grow_mask that shrinks the mask away would give the input back as if edited (the node checks it
    # before loading the models, through the same check_composite_masks).
    with pytest.raises(BlendedInputError, match=r"grow_mask -1000 shrinks the mask away entirely"):
        run(unet, diffusion, clip, image, mask, grow_mask=-1000)


def test_any_size_crop_edit_stitch_two_regions(unet, diffusion, clip):
    """A 1000x600 photo with two small regions comes back 1000x600, only the regions changed."""
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(1, 600, 1000, 3, generator=gen)
    mask = torch.zeros(1, 600, 1000)
    mask[:, 200:240, 300:350] = 1
    mask[:, 330:360, 520:560] = 1
    result = run(unet, diffusion, clip, image, mask, num_results=1, region="mask_crop", grow_mask=3, feather=2)
    assert result.images.shape == (1, 600, 1000, 3)
    composite = result.mask[0]
    assert torch.equal(result.images[0][composite == 0], image[0][composite == 0])
    for rows, cols in ((slice(200, 240), slice(300, 350)), (slice(330, 360), slice(520, 560))):
        assert (result.images[0, rows, cols] - image[0, rows, cols]).abs().mean() > 0.02
    assert (composite >= (mask[0] > 0).float()).all()  # grown/feathered mask still covers the edit


def test_class_conditional_model_runs_with_random_classes(clip):
    """The 512 model's path: a class-conditional UNet gets a random class per sample and step."""
    config = UNetConfig(image_size=32, model_channels=32, num_res_blocks=1, attention_resolutions=(2,),
                        channel_mult=(1, 2), num_classes=1000, num_head_channels=32)
    torch.manual_seed(0)
    model = GuidedDiffusionUNet(config).eval().requires_grad_(False)
    seen = []
    original_forward = model.forward

    def recording_forward(x, timesteps, y=None):
        seen.append(y.clone())
        return original_forward(x, timesteps, y)

    model.forward = recording_forward
    image = torch.rand(1, 32, 32, 3)
    mask = torch.ones(1, 32, 32)
    result = edit_image(image, mask, model, create_diffusion(timestep_respacing="5"), clip, [PROMPT], seed=0,
                        num_results=2, settings=SamplerSettings(skip_timesteps=1),
                        guidance_settings=GuidanceSettings(augmentations=AugmentationSettings(num_views=1)))
    assert result.images.shape == (2, 32, 32, 3)
    labels = torch.stack(seen)
    assert labels.shape[1] == 2 and labels.min() >= 0 and labels.max() < 1000
    assert len(set(labels.flatten().tolist())) > 2


def test_ten_thousand_pixel_photo_is_edited_on_a_crop(unet, diffusion, clip):
    """A 10000x10000 image (1.2 GB as float32) with a small mask: edited on a crop, returned full size with the
    background exact; peak memory stays a few copies of the image (about 6 GB here), not per-pixel model work."""
    image = torch.full((1, 10000, 10000, 3), 0.5)
    mask = torch.zeros(1, 10000, 10000)
    mask[:, 5000:5100, 7000:7120] = 1
    result = run(unet, diffusion, clip, image, mask, num_results=1, views=1, region="mask_crop")
    assert result.images.shape == (1, 10000, 10000, 3)
    assert bool((result.images[0][result.mask[0] == 0] == 0.5).all())
    assert (result.images[0, 5000:5100, 7000:7120] != 0.5).any()


def _outside_per_step(unet, diffusion, clip, result_ids, seed=4):
    """Each step's blended sample outside the mask: the noised background, a function of its noise only."""
    gen = torch.Generator().manual_seed(2)
    init = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    settings = SamplerSettings(skip_timesteps=7)
    objective = GuidanceObjective(clip, clip.text_embedding(PROMPT), mask, init,
                                  GuidanceSettings(clip_lambda=0.0, range_lambda=0.0))
    trace = []
    sample_results(unet, diffusion, objective, init, mask, result_ids, seed, settings,
                   on_step=lambda index, out: trace.append(out["blended"][:, :, :16].clone()))
    return torch.stack(trace, dim=1)  # [k, steps, 3, 16, 64]


def test_background_noise_is_drawn_per_group_of_four_results(unet, diffusion, clip):
    """As the original's batches of 4: results 0-3 share one background noise per step, 4-5 get another;
    by result index, so running result 4 alone (another chunk) gives the same background."""
    from blended import seeds

    six = _outside_per_step(unet, diffusion, clip, [seeds.result_id(0, r) for r in range(6)])
    for r in (1, 2, 3):
        assert torch.equal(six[r], six[0])
    assert torch.equal(six[5], six[4])
    assert (six[4] - six[0]).abs().mean() > 0.1  # a fresh draw, not the first group's
    alone = _outside_per_step(unet, diffusion, clip, [seeds.result_id(0, 4)])
    torch.testing.assert_close(alone[0], six[4], atol=1e-6, rtol=0)
    other_image = _outside_per_step(unet, diffusion, clip, [seeds.result_id(1, 0)])
    assert (other_image[0] - six[0]).abs().mean() > 0.1  # another input image is another batch
    other_seed = _outside_per_step(unet, diffusion, clip, [seeds.result_id(0, 0)], seed=5)
    assert (other_seed[0] - six[0]).abs().mean() > 0.1


def test_sampler_leaves_every_global_random_state_alone(unet, diffusion, clip, image_and_mask, monkeypatch):
    """Augmented views use seeded streams, but must not reseed (or queue a lazy reseed of) CUDA's generators,
    which fork_rng(devices=[]) would not restore: ComfyUI's GPU random state belongs to ComfyUI."""
    cuda_seeds = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: cuda_seeds.append(("all", seed)))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: cuda_seeds.append(("one", seed)))
    queued = len(getattr(torch.cuda, "_queued_calls", []))
    cpu_state = torch.get_rng_state()
    image, mask = image_and_mask
    a = run(unet, diffusion, clip, image, mask, seed=9, num_results=2, views=3)
    assert cuda_seeds == []
    assert len(getattr(torch.cuda, "_queued_calls", [])) == queued
    assert torch.equal(torch.get_rng_state(), cpu_state)
    b = run(unet, diffusion, clip, image, mask, seed=9, num_results=2, views=3)
    assert torch.equal(a.images, b.images)  # the augmentations stay repeatable


class _OnAnotherDevice(torch.Tensor):
    """An IMAGE or MASK as ComfyUI's --gpu-only hands it over, on the GPU: any computation with it before it is
    brought to the host fails, as mixing it with the host's tensors would; its shape can be read."""

    _METADATA = {"dim", "size", "shape", "ndim", "dtype", "device", "__get__", "__len__"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name == "cpu":
            return args[0].as_subclass(torch.Tensor).clone()
        if name not in cls._METADATA:
            raise RuntimeError(f"Expected all tensors to be on the same device ({name} of a tensor on the GPU)")
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("settings", [{}, {"region": "mask_crop", "grow_mask": 2, "feather": 2},
                                      {"enforce_background": False, "colour_match": "rgb"}])
def test_inputs_on_the_gpu_are_brought_to_the_host_first(unet, diffusion, clip, image_and_mask, settings):
    # The crops are planned and the results pasted back on the host; an input left on the GPU used to meet the
    # host's edited crop there.
    image, mask = image_and_mask
    expected = run(unet, diffusion, clip, image, mask, num_results=1, **settings)
    elsewhere = run(unet, diffusion, clip, image.as_subclass(_OnAnotherDevice),
                    mask.as_subclass(_OnAnotherDevice), num_results=1, **settings)
    assert type(elsewhere.images) is torch.Tensor
    assert torch.equal(elsewhere.images, expected.images) and torch.equal(elsewhere.mask, expected.mask)
    with pytest.raises(RuntimeError, match="same device"):
        image.as_subclass(_OnAnotherDevice) * 2


def test_guidance_too_strong_to_stay_finite_is_an_error_not_black_images(unet, diffusion, clip, image_and_mask):
    # Weights beyond float32's range are refused as they are parsed; finite ones that still overflow the step make
    # NaN results, which are refused when they reach the host instead of coming out as black images.
    from blended.prompts import parse_prompt
    from blended.schedule import parse_values

    with pytest.raises(BlendedInputError, match="too large"):
        parse_prompt("a red rock:1e39")
    with pytest.raises(BlendedInputError, match="too large"):
        parse_values("1e39, 1")
    image, mask = image_and_mask
    with pytest.raises(BlendedInputError, match="the edit diverged"):
        run(unet, diffusion, clip, image, mask, prompts=(parse_prompt("a red rock:1e30"),), num_results=1)


@pytest.mark.parametrize("eta", [-0.1, 1.5, float("nan")])
def test_a_ddim_eta_outside_0_to_1_is_refused(eta):
    with pytest.raises(BlendedInputError, match="ddim_eta must be between 0"):
        check_settings(SamplerSettings(method="ddim", ddim_eta=eta, skip_timesteps=0),
                       create_diffusion(timestep_respacing="4"))
