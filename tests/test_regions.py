"""Example-based tests for image/mask preparation, crop-edit-stitch, mask morphology and frame batching."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from blended.errors import BlendedInputError
from blended.frames import frames_to_image_batch
from blended.image_io import (
    antialiased_resize,
    check_mask_not_empty,
    from_model_range,
    masks_in_use,
    match_batches,
    prepare_mask,
    repeat_to_batch_size,
    to_comfy_image,
    to_model_range,
    to_rgb_nchw,
)
from blended.mask_morphology import feather_mask, grow_mask
from blended.regions import (
    CropPlan,
    crop_image,
    crop_mask,
    mask_bounding_box,
    paste_back,
    plan_full_image,
    plan_mask_crop,
)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- image_io


def test_to_rgb_nchw_converts_gray_rgb_and_rgba():
    rgb = torch.rand(2, 5, 7, 3, generator=_generator())
    out = to_rgb_nchw(rgb)
    assert out.shape == (2, 3, 5, 7) and out.dtype == torch.float32
    assert torch.equal(out, rgb.permute(0, 3, 1, 2))

    gray = torch.rand(1, 4, 6, 1, generator=_generator(1))
    out = to_rgb_nchw(gray)
    assert out.shape == (1, 3, 4, 6)
    for channel in range(3):
        assert torch.equal(out[:, channel], gray[..., 0])

    rgba = torch.rand(1, 4, 6, 4, generator=_generator(2))
    assert torch.equal(to_rgb_nchw(rgba), rgba[..., :3].permute(0, 3, 1, 2))


def test_to_rgb_nchw_accepts_single_image_and_clamps():
    image = torch.tensor([[[-0.5, 0.5, 1.5]]])  # [H=1, W=1, C=3]
    out = to_rgb_nchw(image)
    assert out.shape == (1, 3, 1, 1)
    assert out.flatten().tolist() == [0.0, 0.5, 1.0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_to_rgb_nchw_rejects_non_finite(bad):
    image = torch.rand(1, 8, 8, 3, generator=_generator())
    image[0, 3, 4, 1] = bad
    with pytest.raises(BlendedInputError, match="NaN or infinite"):
        to_rgb_nchw(image)


@pytest.mark.parametrize("shape", [(1, 8, 8, 2), (1, 8, 8, 5), (1, 0, 8, 3), (0, 8, 8, 3), (8, 8), (1, 1, 8, 8, 3)])
def test_to_rgb_nchw_rejects_bad_shapes(shape):
    with pytest.raises(BlendedInputError):
        to_rgb_nchw(torch.zeros(shape))


def test_model_range_round_trip():
    image = torch.rand(1, 3, 4, 4, generator=_generator())
    assert torch.allclose(from_model_range(to_model_range(image)), image, atol=1e-6)
    assert from_model_range(torch.tensor([-3.0, 3.0])).tolist() == [0.0, 1.0]


def test_to_comfy_image_layout():
    image = torch.rand(2, 3, 5, 6, generator=_generator())
    out = to_comfy_image(image)
    assert out.shape == (2, 5, 6, 3) and out.is_contiguous()
    assert torch.equal(out.movedim(-1, 1), image)


@pytest.mark.parametrize("shape", [(6, 9), (1, 6, 9), (1, 1, 6, 9)])
def test_prepare_mask_accepts_all_layouts(shape):
    mask = torch.zeros(shape)
    mask[..., 2:4, 3:5] = 1.0
    out = prepare_mask(mask, 6, 9, batch=3)
    assert out.shape == (3, 1, 6, 9) and out.dtype == torch.float32
    for item in out:
        assert torch.equal(item[0], mask.reshape(6, 9))


def test_prepare_mask_none_means_edit_everything_and_invert_flips():
    assert torch.equal(prepare_mask(None, 4, 5, 2), torch.ones(2, 1, 4, 5))
    mask = torch.tensor([[0.0, 0.25], [1.0, 0.5]])
    # As the original: binarise (any value > 0 edits), then invert. A soft value is edited in one mode only.
    assert torch.equal(prepare_mask(mask, 2, 2, 1, invert=True)[0, 0], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(prepare_mask(None, 4, 5, 2, invert=True), torch.zeros(2, 1, 4, 5))


def test_inverted_soft_mask_edits_exactly_what_the_plain_one_keeps():
    """A feathered mask resized to the image: the two modes' edit regions are complements, pixel for pixel."""
    ramp = torch.linspace(0, 1, 16).repeat(16, 1)
    ramp[:, :4] = 0
    plain = prepare_mask(ramp, 40, 40, 1) > 0
    inverted = prepare_mask(ramp, 40, 40, 1, invert=True) > 0
    assert plain.any() and inverted.any()
    assert torch.equal(plain, ~inverted)


def test_prepare_mask_resizes_to_image_keeping_thin_strokes():
    mask = torch.zeros(1, 400, 400)
    mask[0, :, 201] = 1.0  # a 1-pixel vertical stroke, shrunk 8x
    out = prepare_mask(mask, 50, 50, 1)
    assert out.shape == (1, 1, 50, 50)
    assert (out[0, 0].amax(dim=0) > 0).sum() >= 1, "a thin stroke must not vanish when the mask is shrunk"
    assert out.min() >= 0 and out.max() <= 1

    small = torch.ones(1, 64, 64)
    assert torch.equal(prepare_mask(small, 300, 200, 1), torch.ones(1, 1, 300, 200))


def test_an_enlarged_mask_edits_exactly_its_own_pixels():
    """Growing a mask 16x must not spread faint values (every value > 0 edits) half a mask pixel outward."""
    mask = torch.zeros(1, 64, 64)
    mask[0, 16:32, 16:32] = 1.0
    mask[0, 40:48, 40:44] = 0.5
    out = prepare_mask(mask, 1024, 1024, 1)[0, 0]
    expected = mask[0].repeat_interleave(16, 0).repeat_interleave(16, 1)
    assert torch.equal(out, expected)
    # one axis grows, the other shrinks: the growing one is exact, the shrinking one still keeps a thin stroke
    stroke = torch.zeros(1, 64, 800)
    stroke[0, 10:20, 401] = 1.0
    out = prepare_mask(stroke, 256, 100, 1)[0, 0]
    edited_rows = torch.nonzero((out > 0).any(dim=1)).flatten()
    assert edited_rows.tolist() == list(range(40, 80))  # mask rows 10..19, 4x
    assert (out.amax(dim=0) > 0).sum() >= 1


def test_the_masks_in_use_are_the_ones_the_edit_pairs_with_its_images():
    masks = torch.arange(1.0, 5.0)[:, None, None].expand(4, 2, 2)  # item k holds the value k + 1
    for image_batch in (1, 2, 3, 4, 6):
        pictures = torch.zeros(image_batch, 3, 2, 2)
        _, paired = match_batches(pictures, masks[:, None])
        assert set(masks_in_use(masks, image_batch).unique().tolist()) == set(paired.unique().tolist())


def test_a_resize_to_one_column_matches_the_transposed_resize():
    """torch's antialiased resize is wrong for a one-column result whose rows change; the pack's is not."""
    picture = torch.rand(2, 3, 9, 13, generator=_generator(4))
    for mode in ("bilinear", "bicubic"):
        column = antialiased_resize(picture, (5, 1), mode)
        row = antialiased_resize(picture.transpose(-1, -2), (1, 5), mode).transpose(-1, -2)
        torch.testing.assert_close(column, row, atol=1e-6, rtol=0)


def test_a_one_pixel_wide_mask_is_resized_as_a_wider_one():
    """torch's antialiased resize of a single column along its rows alone is wrong; the pack's is not."""
    column = torch.rand(1, 400, 1, generator=_generator(3))
    wide = column.expand(1, 400, 3)
    assert torch.allclose(prepare_mask(column, 50, 1, 1)[..., 0], prepare_mask(wide, 50, 3, 1)[..., 0], atol=1e-6)


def test_prepare_mask_batch_rules_follow_core():
    masks = torch.stack([torch.full((3, 3), float(value)) for value in (0.1, 0.2, 0.3)])
    longer = prepare_mask(masks, 3, 3, batch=2)
    assert longer[:, 0, 0, 0].tolist() == pytest.approx([0.1, 0.2])
    shorter = prepare_mask(masks[:2], 3, 3, batch=5)
    assert shorter[:, 0, 0, 0].tolist() == pytest.approx([0.1, 0.2, 0.1, 0.2, 0.1])
    assert torch.equal(repeat_to_batch_size(masks, 3), masks)


def test_prepare_mask_rejects_bad_input():
    with pytest.raises(BlendedInputError, match="NaN"):
        prepare_mask(torch.full((4, 4), float("nan")), 4, 4, 1)
    with pytest.raises(BlendedInputError, match="mask has shape"):
        prepare_mask(torch.zeros(1, 3, 4, 4), 4, 4, 1)
    with pytest.raises(BlendedInputError):
        prepare_mask(torch.zeros(0, 4), 4, 4, 1)


def test_check_mask_not_empty():
    check_mask_not_empty(torch.tensor([[0.0, 0.01]]))
    with pytest.raises(BlendedInputError, match="the mask is empty: nothing to edit"):
        check_mask_not_empty(torch.zeros(64, 64))
    batch = torch.zeros(3, 1, 4, 4)
    batch[0, 0, 1, 1] = 1.0
    batch[2, 0, 2, 2] = 0.5
    with pytest.raises(BlendedInputError, match=r"batch item\(s\) \[1\]"):
        check_mask_not_empty(batch)


def test_an_empty_inverted_mask_says_to_turn_invert_mask_off():
    with pytest.raises(BlendedInputError, match="the inverted mask is empty") as raised:
        check_mask_not_empty(prepare_mask(torch.ones(1, 8, 8), 8, 8, 1, invert=True), inverted=True)
    assert "turn invert_mask off" in str(raised.value) and "enable invert_mask" not in str(raised.value)


def test_match_batches():
    image = torch.rand(1, 3, 4, 4, generator=_generator())
    masks = torch.rand(3, 1, 4, 4, generator=_generator(1))
    out_image, out_mask = match_batches(image, masks)
    assert out_image.shape[0] == 3 and torch.equal(out_mask, masks)
    assert all(torch.equal(item, image[0]) for item in out_image)

    images = torch.rand(4, 3, 4, 4, generator=_generator(2))
    out_image, out_mask = match_batches(images, masks[:2])
    assert torch.equal(out_image, images)
    assert [bool(torch.equal(out_mask[i], masks[i % 2])) for i in range(4)] == [True] * 4
    out_image, out_mask = match_batches(images[:2], masks)
    assert out_mask.shape[0] == 2 and torch.equal(out_mask, masks[:2])


# ---------------------------------------------------------------------------------------------- planning


def test_plan_full_image_is_the_original_squash():
    plan = plan_full_image(600, 1000, 256)
    assert (plan.top, plan.left, plan.height, plan.width) == (0, 0, 600, 1000)
    image = torch.rand(1, 3, 600, 1000, generator=_generator())
    assert crop_image(image, plan).shape == (1, 3, 256, 256)


def test_plan_mask_crop_small_mask_on_wide_image():
    mask = torch.zeros(600, 1000)
    mask[300:340, 700:760] = 1.0
    plan = plan_mask_crop(mask, 256)
    assert plan.is_square
    assert plan.top <= 300 and plan.bottom >= 340 and plan.left <= 700 and plan.right >= 760
    # margin = max(0.25 * 60, 16) = 16 on each side of the longer (60 px) side
    assert plan.height == 60 + 2 * 16
    assert plan.padding() == (0, 0, 0, 0)


def test_plan_mask_crop_two_regions_are_both_inside():
    mask = torch.zeros(600, 1000)
    mask[50:80, 100:150] = 1.0
    mask[400:450, 800:830] = 1.0
    plan = plan_mask_crop(mask, 256)
    assert plan.is_square
    for row0, row1, col0, col1 in ((50, 80, 100, 150), (400, 450, 800, 830)):
        assert plan.top <= row0 and plan.bottom >= row1 and plan.left <= col0 and plan.right >= col1
    model_mask = crop_mask(mask[None, None], plan)
    assert model_mask.sum() > 0
    # both regions survive at model size: two separate connected blobs in the two halves of the crop
    rows_with_edit = model_mask[0, 0].amax(dim=1).nonzero().flatten()
    assert rows_with_edit.min() < 128 and rows_with_edit.max() > 128


def test_plan_mask_crop_shifts_inside_at_borders():
    mask = torch.zeros(600, 1000)
    mask[0:20, 985:1000] = 1.0  # top-right corner
    plan = plan_mask_crop(mask, 256)
    assert plan.top == 0 and plan.right == 1000
    assert plan.padding() == (0, 0, 0, 0)


def test_plan_mask_crop_large_mask_pads_beyond_narrow_axis():
    mask = torch.zeros(600, 1000)
    mask[10:590, 20:980] = 1.0
    plan = plan_mask_crop(mask, 256)
    assert plan.height == 1000 and plan.left == 0
    assert plan.padding() == (200, 200, 0, 0)
    image = torch.rand(1, 3, 600, 1000, generator=_generator())
    crop = crop_image(image, plan)
    assert crop.shape == (1, 3, 256, 256)
    assert crop.min() >= 0 and crop.max() <= 1


def test_plan_mask_crop_min_crop_and_context():
    mask = torch.zeros(600, 1000)
    mask[300:310, 500:510] = 1.0
    assert plan_mask_crop(mask, 64, min_crop=300).height == 300
    assert plan_mask_crop(mask, 64, context=0.0, min_margin=0).height == 10
    assert plan_mask_crop(mask, 64, min_crop=5000).height == 1000  # capped at the image's longer side
    with pytest.raises(BlendedInputError):
        plan_mask_crop(mask, 64, context=-1.0)
    with pytest.raises(BlendedInputError, match="the mask is empty"):
        plan_mask_crop(torch.zeros(10, 10), 64)


def test_plan_uses_union_over_batch():
    mask = torch.zeros(2, 1, 100, 100)
    mask[0, 0, 5:10, 5:10] = 1.0
    mask[1, 0, 80:90, 70:95] = 1.0
    assert mask_bounding_box(mask) == (5, 90, 5, 95)
    plan = plan_mask_crop(mask, 64, context=0.0, min_margin=0)
    assert plan.top <= 5 and plan.bottom >= 90 and plan.left <= 5 and plan.right >= 95


# ---------------------------------------------------------------------------------------------- crop / paste


def test_crop_image_pads_by_reflection_outside_the_image():
    image = torch.arange(4.0).reshape(1, 1, 1, 4).expand(1, 3, 4, 4) / 3.0  # columns 0, 1/3, 2/3, 1
    # model_size equals the box, so no resampling blurs the padding under test
    plan = CropPlan(top=-2, left=-2, height=8, width=8, model_size=8, image_height=4, image_width=4)
    crop = crop_image(image, plan)
    expected_row = torch.tensor([2.0, 1.0, 0.0, 1.0, 2.0, 3.0, 2.0, 1.0]) / 3.0
    assert torch.allclose(crop[0, 0, 3], expected_row)


def test_crop_image_replicates_when_reflection_is_impossible():
    image = torch.full((1, 3, 1, 1), 0.3)
    plan = CropPlan(top=-3, left=-3, height=7, width=7, model_size=7, image_height=1, image_width=1)
    assert torch.allclose(crop_image(image, plan), torch.full((1, 3, 7, 7), 0.3))


def test_crop_mask_is_binary_and_keeps_thin_strokes():
    mask = torch.zeros(1, 1, 1000, 1000)
    mask[0, 0, 500, 100:900] = 0.01  # a faint 1-pixel line, shrunk ~4x
    plan = plan_full_image(1000, 1000, 256)
    model_mask = crop_mask(mask, plan)
    assert model_mask.shape == (1, 1, 256, 256)
    assert set(model_mask.unique().tolist()) == {0.0, 1.0}
    assert model_mask[0, 0].amax(dim=1).sum() == 1, "the stroke must survive as exactly one model row"

    tiny = torch.zeros(1, 1, 8, 8)
    tiny[0, 0, 2, 3] = 1.0
    up = crop_mask(tiny, plan_full_image(8, 8, 64))
    assert up.sum() == 64 and up[0, 0, 16:24, 24:32].sum() == 64


def test_crop_mask_is_zero_outside_the_image():
    mask = torch.ones(1, 1, 4, 4)
    plan = CropPlan(top=-2, left=-2, height=8, width=8, model_size=8, image_height=4, image_width=4)
    model_mask = crop_mask(mask, plan)
    assert model_mask.sum() == 16 and model_mask[0, 0, 2:6, 2:6].sum() == 16


def test_paste_back_1000x600_keeps_background_bit_identical():
    image = torch.rand(1, 3, 600, 1000, generator=_generator())
    mask = torch.zeros(1, 1, 600, 1000)
    mask[0, 0, 200:260, 400:430] = 1.0
    composite = feather_mask(grow_mask(mask, 6), 6)
    assert torch.equal(composite[mask > 0], torch.ones(int(mask.sum())))
    plan = plan_mask_crop(composite, 64)
    edited = torch.rand(1, 3, 64, 64, generator=_generator(5))
    out = paste_back(image, edited, plan, composite)
    assert out.shape == image.shape
    keep = (composite == 0).expand_as(image)
    assert torch.equal(out[keep], image[keep])
    assert not torch.equal(out[~keep], image[~keep])


def test_paste_back_full_edit_value_and_broadcast():
    image = torch.zeros(1, 3, 50, 80)
    mask = torch.zeros(1, 1, 50, 80)
    mask[0, 0, 10:20, 10:30] = 1.0
    mask[0, 0, 30:32, 60:62] = 0.5
    plan = plan_full_image(50, 80, 32)
    edited = torch.full((3, 3, 32, 32), 0.8)
    out = paste_back(image, edited, plan, mask)
    assert out.shape == (3, 3, 50, 80)
    assert torch.allclose(out[:, :, 10:20, 10:30], torch.full((3, 3, 10, 20), 0.8), atol=1e-5)
    assert torch.allclose(out[:, :, 30:32, 60:62], torch.full((3, 3, 2, 2), 0.4), atol=1e-5)
    keep = (mask == 0).expand_as(out)
    assert (out[keep] == 0).all()


def test_paste_back_warns_only_when_the_composite_reaches_outside_the_box(caplog):
    image = torch.rand(1, 3, 1000, 1000, generator=_generator())
    mask = torch.zeros(1, 1, 1000, 1000)
    mask[..., 970:990, 970:990] = 1.0
    composite = feather_mask(grow_mask(mask, 5), 3)  # float sums over the box and the whole differ by rounding
    plan = plan_mask_crop(composite, 64)
    with caplog.at_level("WARNING", logger="blended.regions"):
        paste_back(image, torch.rand(1, 3, 64, 64, generator=_generator(1)), plan, composite)
    assert "reaches outside" not in caplog.text
    composite[..., 0, 0] = 0.5
    with caplog.at_level("WARNING", logger="blended.regions"):
        paste_back(image, torch.rand(1, 3, 64, 64, generator=_generator(1)), plan, composite)
    assert "reaches outside" in caplog.text


def test_a_one_pixel_wide_image_is_pasted_back_as_a_wider_one():
    edited = torch.rand(1, 3, 16, 1, generator=_generator(2)).expand(1, 3, 16, 16)  # the same in every column
    narrow, wide = torch.zeros(1, 3, 202, 1), torch.zeros(1, 3, 202, 3)
    out_narrow = paste_back(narrow, edited, plan_full_image(202, 1, 16), torch.ones(1, 1, 202, 1))
    out_wide = paste_back(wide, edited, plan_full_image(202, 3, 16), torch.ones(1, 1, 202, 3))
    assert torch.allclose(out_narrow[..., 0], out_wide[..., 1], atol=1e-5)


def test_paste_back_rejects_mismatched_sizes():
    plan = plan_full_image(10, 10, 8)
    with pytest.raises(ValueError):
        paste_back(torch.zeros(1, 3, 12, 10), torch.zeros(1, 3, 8, 8), plan, torch.ones(1, 1, 10, 10))
    with pytest.raises(ValueError):
        paste_back(torch.zeros(2, 3, 10, 10), torch.zeros(3, 3, 8, 8), plan, torch.ones(1, 1, 10, 10))


def _peak_allocation_bytes(function) -> tuple[object, int]:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = function()
    sizes = [event.cpu_memory_usage for event in prof.events() if event.cpu_memory_usage > 0]
    return result, max(sizes, default=0)


def test_huge_image_plan_and_crop_only_touch_the_box():
    """A 10000x10000 IMAGE costs nothing beyond the box in to_rgb_nchw, plan and crop.

    The image is a broadcast view (no 1.2 GB behind it): any full-size copy would show up as a >= 400 MB
    allocation in the profiler. paste_back, by design, allocates one full-size output, tested at a smaller size.
    """
    size = 10_000
    image = torch.tensor([0.2, 0.5, 0.7]).expand(1, size, size, 3)
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[5000:5100, 7000:7050] = True
    limit = 64 * 1024 * 1024

    nchw, peak = _peak_allocation_bytes(lambda: to_rgb_nchw(image))
    assert peak < limit
    plan, peak = _peak_allocation_bytes(lambda: plan_mask_crop(mask, 256))
    assert peak < limit
    assert plan.is_square and plan.top <= 5000 and plan.bottom >= 5100 and plan.left <= 7000 and plan.right >= 7050
    crop, peak = _peak_allocation_bytes(lambda: crop_image(nchw, plan))
    assert peak < limit
    assert crop.shape == (1, 3, 256, 256)
    assert torch.allclose(crop[0, :, 0, 0], torch.tensor([0.2, 0.5, 0.7]), atol=1e-5)
    model_mask, peak = _peak_allocation_bytes(lambda: crop_mask(mask[None, None], plan))
    assert peak < limit and model_mask.sum() > 0


def test_a_thin_panoramas_square_box_is_never_made_at_full_size():
    """A 100x10000 strip with a wide mask has a 10000x10000 box: 1.2 GB a result if it were made whole."""
    image = torch.rand(1, 3, 100, 10_000, generator=_generator())
    mask = torch.zeros(1, 1, 100, 10_000)
    mask[..., 30:70, 1000:9000] = 1.0
    plan = plan_mask_crop(mask, 256)
    assert (plan.height, plan.width) == (10_000, 10_000)
    limit = 64 * 1024 * 1024
    crop, peak = _peak_allocation_bytes(lambda: crop_image(image, plan))
    assert peak < limit and crop.shape == (1, 3, 256, 256)
    model_mask, peak = _peak_allocation_bytes(lambda: crop_mask(mask, plan))
    assert peak < limit and model_mask.sum() > 0
    out, peak = _peak_allocation_bytes(lambda: paste_back(image, torch.rand(2, 3, 256, 256), plan, mask))
    assert peak < limit and out.shape == (2, 3, 100, 10_000)
    assert torch.equal(out[:, :, :30], image.expand(2, -1, -1, -1)[:, :, :30])
    # the same pixels a tall strip gets (the transposed case takes its axes in the other order)
    tall = crop_image(image.transpose(-1, -2), plan_mask_crop(mask.transpose(-1, -2), 256))
    assert torch.allclose(tall, crop.transpose(-1, -2), atol=1e-5)


def test_paste_back_large_image_writes_only_the_box():
    image = torch.rand(1, 3, 2000, 3000, generator=_generator())
    mask = torch.zeros(1, 1, 2000, 3000)
    mask[0, 0, 1900:2000, 2900:3000] = 1.0  # touching the bottom-right corner
    plan = plan_mask_crop(mask, 64)
    out = paste_back(image, torch.zeros(1, 3, 64, 64), plan, mask)
    assert torch.equal(out[..., :1900, :], image[..., :1900, :])
    assert torch.equal(out[..., :, :2900], image[..., :, :2900])
    assert (out[..., 1900:, 2900:] == 0).all()


# ---------------------------------------------------------------------------------------------- frames


def test_frames_to_image_batch_is_sample_major():
    steps = [torch.full((2, 3, 4, 4), value) for value in (-1.0, 0.0, 1.0)]
    steps[1][1] = 0.5  # sample 1 at time 1
    batch = frames_to_image_batch(steps)
    assert batch.shape == (6, 4, 4, 3)
    firsts = batch[:, 0, 0, 0].tolist()
    assert firsts == pytest.approx([0.0, 0.5, 1.0, 0.0, 0.75, 1.0])
    with pytest.raises(BlendedInputError):
        frames_to_image_batch([])
    with pytest.raises(ValueError):
        frames_to_image_batch([torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 8, 8)])


def test_paste_back_resizes_only_the_masks_box_with_the_same_bits_as_the_whole_crop():
    generator = _generator(4)
    image = torch.rand(1, 3, 300, 500, generator=generator)
    edited = torch.rand(3, 3, 64, 64, generator=generator)
    composite = torch.zeros(3, 1, 300, 500)
    composite[0, :, 40:90, 100:180] = 1.0
    composite[1, :, 60:70, 130:131] = 0.5  # one column: the resize's one-column case
    composite[2, :, 50:120, 150:260] = torch.rand(70, 110, generator=generator)
    plan = plan_full_image(300, 500, 64)
    # The plain definition: the whole crop resized in one call, blended where the composite is > 0.
    whole = antialiased_resize(edited, (300, 500), "bicubic").clamp(0, 1)
    expected = torch.where(composite > 0, image * (1 - composite) + whole * composite, image)
    assert torch.equal(paste_back(image, edited, plan, composite), expected)
    # into a given output, e.g. a view of the node's [N,H,W,C] batch
    out = torch.full((3, 300, 500, 3), 7.0)
    paste_back(image, edited, plan, composite, out=out.movedim(-1, 1))
    assert torch.equal(out.movedim(-1, 1), expected)


def test_paste_back_of_a_small_edit_never_resizes_to_the_whole_photo(monkeypatch):
    from blended import regions

    sizes = []
    real = regions._bicubic

    def recording(tensor, size):
        out = real(tensor, size)
        sizes.append(out.shape[-2] * out.shape[-1])
        return out
    monkeypatch.setattr(regions, "_bicubic", recording)
    image = torch.rand(1, 3, 600, 800, generator=_generator(2))
    composite = torch.zeros(1, 1, 600, 800)
    composite[..., 100:140, 200:260] = 1.0
    paste_back(image, torch.rand(1, 3, 64, 64, generator=_generator(3)), plan_full_image(600, 800, 64), composite)
    assert sizes and max(sizes) <= 64 * 800, f"resized {max(sizes)} pixels for a 40x60 edit"
