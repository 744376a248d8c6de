"""CLIP views (augment.py) and the loss terms (losses.py), checked against their definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blended import view_warps
from blended.augment import AugmentationSettings, ImageAugmentations, draw_view_params, kornia_params
from blended.clip_model import CLIP_MEAN, CLIP_STD, load_guidance_clip
from blended.errors import BlendedInputError
from blended.guidance import GuidanceObjective, GuidanceSettings
from blended.losses import background_l2, range_loss, spherical_distance
from conftest import REF

CLIP_DIR = REF / "clip_tiny"


@pytest.fixture(scope="module")
def clip():
    return load_guidance_clip(CLIP_DIR / "model.pt")


def _images(batch=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


# ------------------------------------------------------------------------------------------- augmentations

def test_single_view_is_exactly_the_pooled_input():
    x = _images()
    views = ImageAugmentations(32, AugmentationSettings(num_views=1))(x)
    assert torch.equal(views, F.avg_pool2d(x, 2))


def test_view_order_is_tiled_and_first_block_is_clean():
    x = _images(batch=3)
    pooled = F.adaptive_avg_pool2d(x, 16)
    never_warp = AugmentationSettings(num_views=4, p_affine=0.0, p_perspective=0.0)
    views = ImageAugmentations(16, never_warp)(x)
    assert torch.equal(views, torch.tile(pooled, (4, 1, 1, 1)))

    torch.manual_seed(1)
    views = ImageAugmentations(16, AugmentationSettings(num_views=4, p_affine=1.0, p_perspective=1.0))(x)
    assert views.shape == (12, 3, 16, 16)
    assert torch.equal(views[:3], pooled)
    for k in range(3, 12):  # every warped view differs from its source sample (k % B)
        assert not torch.allclose(views[k], pooled[k % 3])


def _stream(seed):
    return torch.Generator().manual_seed(seed)


def _affine_translations(settings: AugmentationSettings, n=256, seed=0):
    return kornia_params(draw_view_params(settings, 32, n, [_stream(seed)]))["affine"]["translations"]


def test_default_reproduces_kornia_vertical_only_translation():
    shifts = _affine_translations(AugmentationSettings(p_affine=1.0))
    assert torch.all(shifts[:, 0] == 0)
    assert shifts[:, 1].abs().max() > 0.05 * 32
    assert shifts[:, 1].abs().max() <= 0.1 * 32 + 1e-6


@pytest.mark.parametrize("settings", [AugmentationSettings(),
                                      AugmentationSettings(p_affine=1.0, p_perspective=0.0, degrees=30.0),
                                      AugmentationSettings(fix_translate=True, distortion=0.3, p_perspective=1.0)])
def test_parameters_are_kornias_own_draws(settings):
    """Our sampler draws what the original's kornia modules draw from a global RNG seeded alike."""
    import kornia.augmentation as K

    shape = torch.Size((64, 3, 32, 32))
    translate = settings.translate if not settings.fix_translate else (settings.translate, settings.translate)
    torch.manual_seed(5)
    affine = K.RandomAffine(degrees=settings.degrees, translate=translate, p=settings.p_affine,
                            padding_mode="border").forward_parameters(shape)
    perspective = K.RandomPerspective(settings.distortion, p=settings.p_perspective).forward_parameters(shape)
    ours = kornia_params(draw_view_params(settings, 32, 64, [_stream(5)]))
    for key in ("translations", "center", "scale", "angle", "shear_x", "shear_y", "batch_prob"):
        torch.testing.assert_close(ours["affine"][key], affine[key].float(), rtol=0, atol=0)
    for key in ("start_points", "end_points", "batch_prob"):
        torch.testing.assert_close(ours["perspective"][key], perspective[key].float(), rtol=0, atol=0)


def test_fix_translate_shifts_both_axes():
    shifts = _affine_translations(AugmentationSettings(p_affine=1.0, fix_translate=True))
    assert shifts[:, 0].abs().max() > 0.05 * 32
    assert shifts[:, 1].abs().max() > 0.05 * 32
    assert shifts.abs().max() <= 0.1 * 32 + 1e-6


def _slice_params(group: dict, k: int) -> dict:
    return {key: value[k:k + 1] for key, value in group.items()}


@pytest.mark.parametrize("padding_mode", ["border", "zeros", "reflection"])
def test_batched_warp_equals_kornias_per_view_warps(padding_mode):
    """All views warped in one call = each view through kornia's RandomAffine then RandomPerspective."""
    import kornia.augmentation as K

    settings = AugmentationSettings(num_views=6, padding_mode=padding_mode)
    augment = ImageAugmentations(32, settings)
    x = _images(batch=3)
    streams = [_stream(10 + i) for i in range(3)]
    params = augment.sample(3, streams)
    views = augment(x, params=params)
    assert views.shape == (18, 3, 32, 32)
    pooled = F.adaptive_avg_pool2d(x, 32)
    torch.testing.assert_close(views[:3], pooled, rtol=0, atol=0)
    affine = K.RandomAffine(degrees=15, translate=0.1, p=0.7, padding_mode=padding_mode)
    perspective = K.RandomPerspective(0.7, p=0.7)
    applied = 0
    for k in range(15):  # warped view k is view k // 3 + 1 of sample k % 3
        one = affine(pooled[k % 3:k % 3 + 1], params=_slice_params(params["affine"], k))
        one = perspective(one, params=_slice_params(params["perspective"], k))
        torch.testing.assert_close(views[3 + k:4 + k], one, atol=2e-5, rtol=0)
        applied += int(not torch.equal(one, pooled[k % 3:k % 3 + 1]))
    assert applied >= 10  # most views really are warped (p = 0.7 for each warp)


def test_view_matrices_are_kornias_inverted():
    """The host-side matrices invert kornia's own: its get_affine_matrix2d and get_perspective_transform."""
    from kornia.geometry.transform import get_affine_matrix2d, get_perspective_transform

    settings = AugmentationSettings(num_views=9, p_affine=1.0, p_perspective=1.0, fix_translate=True)
    params = draw_view_params(settings, 224, 8, [_stream(7), _stream(8)])
    k = kornia_params(params)
    a, p = k["affine"], k["perspective"]
    affine = get_affine_matrix2d(a["translations"], a["center"], a["scale"], a["angle"], a["shear_x"], a["shear_y"])
    perspective = get_perspective_transform(p["start_points"], p["end_points"])
    inverses, gates = view_warps.inverse_view_matrices(params)
    assert gates.all() and inverses.shape == (32, 3, 3)
    eye = np.broadcast_to(np.eye(3), (16, 3, 3))
    np.testing.assert_allclose(inverses[:16] @ affine.double().numpy(), eye, atol=2e-5)
    product = inverses[16:] @ perspective.double().numpy()
    np.testing.assert_allclose(product / product[:, 2:, 2:], eye, atol=2e-5)  # a homography up to its scale


def test_a_view_that_skips_both_warps_is_the_pooled_image_exactly():
    settings = AugmentationSettings(num_views=4, p_affine=0.0, p_perspective=0.0)
    x = _images(batch=2)
    views = ImageAugmentations(32, settings)(x, [_stream(1), _stream(2)])
    torch.testing.assert_close(views, F.adaptive_avg_pool2d(x, 32).repeat(4, 1, 1, 1), rtol=0, atol=0)


def test_low_precision_views_are_warped_in_float32():
    """A bf16 batch is warped on float32 grids (bf16 positions would be off by up to a pixel), as kornia does."""
    augment = ImageAugmentations(32, AugmentationSettings(num_views=5, p_affine=1.0, p_perspective=1.0))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1  # pooling leaves it alone
    params = augment.sample(2, [_stream(3), _stream(4)])
    low = augment(x.bfloat16(), params=params)
    assert low.dtype == torch.bfloat16
    reference = augment(x.bfloat16().float(), params=params).bfloat16()
    torch.testing.assert_close(low, reference, rtol=0, atol=0)


def test_a_samples_views_do_not_depend_on_its_batch():
    settings = AugmentationSettings(num_views=5)
    augment = ImageAugmentations(32, settings)
    x = _images(batch=4)
    together = augment(x, [_stream(i) for i in range(4)]).view(5, 4, 3, 32, 32)
    for i in range(4):
        alone = augment(x[i:i + 1], [_stream(i)]).view(5, 1, 3, 32, 32)
        torch.testing.assert_close(together[:, i], alone[:, 0], rtol=0, atol=1e-6)


def test_per_sample_streams_leave_the_global_rng_alone():
    augment = ImageAugmentations(32, AugmentationSettings(num_views=4))
    state = torch.random.get_rng_state()
    augment(_images(batch=2), [_stream(1), _stream(2)])
    assert torch.equal(torch.random.get_rng_state(), state)


def test_single_resample_keeps_the_geometry_and_blurs_less():
    g = torch.Generator().manual_seed(3)
    smooth = F.interpolate(torch.rand(2, 3, 8, 8, generator=g) * 2 - 1, size=64, mode="bicubic",
                           align_corners=False)
    streams = lambda: [_stream(20), _stream(21)]  # noqa: E731
    # With only the rotation/shift, one homography warp is the affine warp itself.
    only_affine = dict(num_views=4, p_affine=1.0, p_perspective=0.0)
    two = ImageAugmentations(64, AugmentationSettings(**only_affine))(smooth, streams())
    one = ImageAugmentations(64, AugmentationSettings(**only_affine, single_resample=True))(smooth, streams())
    torch.testing.assert_close(one, two, atol=1e-4, rtol=0)
    # Both warps: the same picture (same parameters) up to the second resampling's blur ...
    both = dict(num_views=4, p_affine=1.0, p_perspective=1.0)
    two = ImageAugmentations(64, AugmentationSettings(**both))(smooth, streams())
    one = ImageAugmentations(64, AugmentationSettings(**both, single_resample=True))(smooth, streams())
    assert (one - two).abs().mean() < 0.02
    assert not torch.allclose(one[2:], two[2:], atol=1e-4)
    # ... which shows on fine detail: one resampling keeps more of a noise image's variance.
    noise = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    two = ImageAugmentations(64, AugmentationSettings(**both, padding_mode="zeros"))(noise, streams())
    one = ImageAugmentations(64, AugmentationSettings(**both, padding_mode="zeros",
                                                      single_resample=True))(noise, streams())
    center = (slice(None), slice(None), slice(24, 40), slice(24, 40))
    assert one[2:][center].std() > two[2:][center].std() * 1.05


def test_gradient_flows_through_warped_views():
    torch.manual_seed(0)
    x = _images(batch=2).requires_grad_(True)
    views = ImageAugmentations(32, AugmentationSettings(num_views=3, p_affine=1.0, p_perspective=1.0))(x)
    (grad,) = torch.autograd.grad(views[2:].pow(2).sum(), x)  # only warped views
    assert grad.abs().sum() > 0 and torch.isfinite(grad).all()


@pytest.mark.parametrize("bad", [dict(num_views=0), dict(translate=1.5), dict(p_affine=-0.1),
                                 dict(padding_mode="wrap"), dict(degrees=-1.0)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(BlendedInputError):
        ImageAugmentations(32, AugmentationSettings(**bad))


# ------------------------------------------------------------------------------------------------- losses

def test_spherical_distance_is_half_squared_angle():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g) * 3
    angle = torch.arccos(F.cosine_similarity(a.double(), b.double()))
    torch.testing.assert_close(spherical_distance(a, b).double(), angle.pow(2) / 2, atol=1e-5, rtol=1e-5)
    # broadcasting one text embedding to many images
    torch.testing.assert_close(spherical_distance(a, b[:1]), spherical_distance(a, b[:1].expand(5, -1)))
    assert spherical_distance(a[:1], -a[:1]).item() == pytest.approx(math.pi ** 2 / 2, rel=1e-5)


def test_range_loss_counts_only_the_excess():
    x = torch.zeros(2, 3, 4, 4)
    x[0, 0, 0, 0] = 3.0   # excess 2 -> 4 / 48
    x[1, 1, 1, 1] = -0.9  # inside the range
    torch.testing.assert_close(range_loss(x), torch.tensor([4.0 / 48, 0.0]))


def test_background_l2_broadcasts_init_over_the_batch():
    x_in = _images(batch=2, size=8)
    init = _images(batch=1, size=8, seed=1)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    per_sample = torch.stack([((x_in[i] * (1 - mask[0]) - init[0]) ** 2).mean() for i in range(2)])
    torch.testing.assert_close(background_l2(x_in, init, mask), per_sample)
    # the original's batch mean, mse_loss(x_in*(1-mask), init), is their mean over the batch
    expected = sum(((x_in[i] * (1 - mask[0]) - init[0]) ** 2).sum() for i in range(2)) / x_in.numel()
    torch.testing.assert_close(background_l2(x_in, init, mask).sum() / 2, expected)


def _background_l2_gradient(clip, x_t, pred_xstart, init, mask, result_ids, **objective_kwargs):
    from blended.guidance import GuidanceObjective, GuidanceSettings

    settings = GuidanceSettings(clip_lambda=0.0, range_lambda=0.0, background_l2_lambda=10000.0)
    objective = GuidanceObjective(clip, torch.zeros(1, 32), mask, init, settings, **objective_kwargs)
    x = x_t.clone().requires_grad_(True)
    loss = objective.loss(x, pred_xstart, 0.8, result_ids, step=3)
    return -torch.autograd.grad(loss, x)[0]


def test_background_l2_weighs_each_result_lambda_over_four_whatever_the_chunk(clip):
    """The original's mse over its batch of 4 gives each result lambda/4; chunks of 1, 2 or 3 must too."""
    x_t, pred = _images(batch=4, size=8, seed=2), _images(batch=4, size=8, seed=3)
    init = _images(batch=1, size=8, seed=4)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 1:5] = 1
    x = x_t.clone().requires_grad_(True)
    original = 10000.0 * F.mse_loss((pred * 0.8 + x * 0.2) * (1 - mask), init.expand(4, -1, -1, -1))
    expected = -torch.autograd.grad(original, x)[0]
    for chunks in ([[0, 1, 2, 3]], [[0, 1], [2, 3]], [[0], [1, 2, 3]]):
        grads = torch.cat([_background_l2_gradient(clip, x_t[c], pred[c], init, mask, c) for c in chunks])
        torch.testing.assert_close(grads, expected)
    # the fixture's original ran a batch of 2: group_size 2 reproduces its weight lambda/2
    two = _background_l2_gradient(clip, x_t[:2], pred[:2], init, mask, [0, 1], group_size=2)
    torch.testing.assert_close(two, expected[:2] * 2)


def _readme_formula(clip, x_in, mask, text):
    """blended_step README: spherical distance of normalise(avgpool_to_32((x_in*mask+1)/2)), summed."""
    pooled = F.avg_pool2d((x_in * mask + 1) / 2, kernel_size=2)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    embeds = clip.model.encode_image((pooled - mean) / std)
    cos = F.cosine_similarity(embeds.double(), text.double().expand_as(embeds))
    return (torch.arccos(cos).pow(2) / 2).sum()


def clip_loss(clip, x_in, mask, text, augmentations):
    """The original's CLIP loss, a scalar: the guidance's per-sample mean distance over the views, summed
    over the batch (not multiplied by the CLIP lambda)."""
    objective = GuidanceObjective(clip, text, mask, torch.zeros_like(x_in[:1]),
                                  GuidanceSettings(augmentations=augmentations))
    return objective.clip_distances(x_in, result_ids=range(x_in.shape[0]), step=0).sum()


def _box_mask():
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 20:52, 16:48] = 1
    return mask


def test_clip_loss_single_view_equals_readme_formula(clip):
    x_in, mask = _images(), _box_mask()
    text = clip.text_embedding("a red rock")
    loss = clip_loss(clip, x_in, mask, text, AugmentationSettings(num_views=1))
    assert loss.dim() == 0
    torch.testing.assert_close(loss.double(), _readme_formula(clip, x_in, mask, text), atol=1e-5, rtol=1e-5)


def test_clip_loss_with_a_prompt_per_sample(clip):
    x_in, mask = _images(), _box_mask()
    texts = torch.cat([clip.text_embedding("a red rock"), clip.text_embedding("a blue sky")])
    one_view = AugmentationSettings(num_views=1)
    loss = clip_loss(clip, x_in, mask, texts, one_view)
    expected = sum(_readme_formula(clip, x_in[i:i + 1], mask, texts[i:i + 1]) for i in range(2))
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)
    # identical (un-warped) views: the mean over views must pair each view with its own sample's prompt
    clean_views = AugmentationSettings(num_views=3, p_affine=0.0, p_perspective=0.0)
    torch.testing.assert_close(clip_loss(clip, x_in, mask, texts, clean_views), loss, atol=1e-5, rtol=1e-5)
    with pytest.raises(BlendedInputError):
        clip_loss(clip, x_in, mask, texts[:1].expand(3, -1), one_view)


def test_clip_loss_gradient_reaches_only_the_masked_region(clip):
    torch.manual_seed(0)
    x_in = _images().requires_grad_(True)
    mask = _box_mask()
    loss = clip_loss(clip, x_in, mask, clip.text_embedding("a red rock"), AugmentationSettings(num_views=4))
    (grad,) = torch.autograd.grad(loss, x_in)
    assert grad[..., 20:52, 16:48].abs().sum() > 0
    assert torch.all(grad * (1 - mask) == 0)


def test_on_devices_without_border_padding_or_any_pooling_size_the_views_are_the_same(monkeypatch):
    """Apple's MPS refuses grid_sample's border padding and a 256 -> 224 adaptive pooling: there the views come
    from positions clamped onto the edge pixels and from two averaging matrix products, with the same values and
    gradients (checked here by sending the CPU down those paths)."""
    from blended import augment as augment_module

    settings = AugmentationSettings(num_views=6, padding_mode="border")
    x = (torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(4)) * 2 - 1).requires_grad_(True)
    augment = ImageAugmentations(28, settings)  # 40 -> 28: not a multiple, as 256 -> 224
    params = augment.sample(3, [_stream(20 + i) for i in range(3)])
    plain = augment(x, params=params)
    plain_grad, = torch.autograd.grad(plain.square().sum(), x)
    monkeypatch.setattr(view_warps, "BORDER_BY_CLAMPING", ("cpu",))
    monkeypatch.setattr(augment_module, "POOL_BY_MATMUL", ("cpu",))
    other = ImageAugmentations(28, settings)(x, params=params)
    other_grad, = torch.autograd.grad(other.square().sum(), x)
    torch.testing.assert_close(other, plain, atol=2e-5, rtol=0)
    torch.testing.assert_close(other_grad, plain_grad, atol=1e-4, rtol=1e-4)
