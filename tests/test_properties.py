"""Property tests (hypothesis) for IMAGE/MASK preparation and crop-edit-stitch geometry on arbitrary sizes.

Example counts are kept small, so the suite stays quick on a small machine.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blended import mask_morphology, regions
from blended.image_io import check_mask_not_empty, match_batches, prepare_mask, to_rgb_nchw

MODEL_SIZES = st.sampled_from([8, 64, 256])
PROPERTY_SETTINGS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


@st.composite
def image_sizes(draw):
    """Mostly small sizes, plus extreme aspect ratios and a few large ones (up to 3000 x 700)."""
    kind = draw(st.sampled_from(["small", "thin", "large"]))
    if kind == "small":
        return draw(st.integers(1, 64)), draw(st.integers(1, 64))
    if kind == "thin":
        long_side = draw(st.integers(64, 1500))
        short_side = draw(st.integers(1, 8))
        return (long_side, short_side) if draw(st.booleans()) else (short_side, long_side)
    height, width = draw(st.integers(300, 3000)), draw(st.integers(300, 700))
    return (height, width) if draw(st.booleans()) else (width, height)


@st.composite
def rectangles(draw, height, width):
    """1-3 boxes anywhere, often snapped to a border so border handling is exercised."""
    boxes = []
    for _ in range(draw(st.integers(1, 3))):
        row0 = draw(st.sampled_from([0, draw(st.integers(0, height - 1))]))
        col0 = draw(st.sampled_from([0, draw(st.integers(0, width - 1))]))
        row1 = draw(st.sampled_from([height, draw(st.integers(row0 + 1, height))]))
        col1 = draw(st.sampled_from([width, draw(st.integers(col0 + 1, width))]))
        boxes.append((row0, row1, col0, col1))
    return boxes


def _mask_from(boxes, height, width, value=1.0):
    mask = torch.zeros(height, width)
    for row0, row1, col0, col1 in boxes:
        mask[row0:row1, col0:col1] = value
    return mask


@st.composite
def region_cases(draw):
    height, width = draw(image_sizes())
    boxes = draw(rectangles(height, width))
    return height, width, boxes


@PROPERTY_SETTINGS
@given(
    case=region_cases(),
    model_size=MODEL_SIZES,
    context=st.sampled_from([0.0, 0.1, 0.25, 1.0]),
    min_crop=st.sampled_from([None, 0, 100, 5000]),
)
def test_plan_is_square_and_contains_the_mask(case, model_size, context, min_crop):
    height, width, boxes = case
    mask = _mask_from(boxes, height, width)
    plan = regions.plan_mask_crop(mask, model_size, context=context, min_crop=min_crop)
    row0, row1, col0, col1 = regions.mask_bounding_box(mask)
    assert plan.is_square and plan.model_size == model_size
    assert plan.top <= row0 and plan.bottom >= row1 and plan.left <= col0 and plan.right >= col1
    assert max(row1 - row0, col1 - col0) <= plan.height <= max(height, width)
    pad_top, pad_bottom, pad_left, pad_right = plan.padding()
    # padding only appears along an axis the box is longer than
    if plan.height <= height:
        assert pad_top == pad_bottom == 0
    if plan.width <= width:
        assert pad_left == pad_right == 0


@PROPERTY_SETTINGS
@given(case=region_cases(), model_size=MODEL_SIZES, full=st.booleans(), batch=st.integers(1, 2))
def test_crop_shapes_ranges_and_mask_survival(case, model_size, full, batch):
    height, width, boxes = case
    mask = _mask_from(boxes, height, width, value=0.3)[None, None].expand(batch, 1, -1, -1)
    image = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(height * 7 + width))
    plan = regions.plan_full_image(height, width, model_size) if full else regions.plan_mask_crop(mask, model_size)
    crop = regions.crop_image(image, plan)
    assert crop.shape == (batch, 3, model_size, model_size)
    assert torch.isfinite(crop).all() and crop.min() >= 0 and crop.max() <= 1
    model_mask = regions.crop_mask(mask, plan)
    assert model_mask.shape == (batch, 1, model_size, model_size)
    assert set(model_mask.unique().tolist()) <= {0.0, 1.0}
    # every region keeps at least one model pixel near where it maps, however thin it is
    for row0, row1, col0, col1 in boxes:
        centre_row = ((row0 + row1 - 1) / 2 - plan.top + 0.5) * model_size / plan.height
        centre_col = ((col0 + col1 - 1) / 2 - plan.left + 0.5) * model_size / plan.width
        r, c = int(centre_row), int(centre_col)
        window = model_mask[0, 0, max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2]
        assert window.sum() > 0


@PROPERTY_SETTINGS
@given(
    case=region_cases(),
    model_size=MODEL_SIZES,
    grow=st.integers(-2, 6),
    feather=st.integers(0, 5),
    shape=st.sampled_from(["circle", "square"]),
    seed=st.integers(0, 2**16),
)
def test_paste_back_keeps_everything_outside_the_composite_mask(case, model_size, grow, feather, shape, seed):
    height, width, boxes = case
    generator = torch.Generator().manual_seed(seed)
    mask = _mask_from(boxes, height, width)[None, None]
    grown = mask_morphology.grow_mask(mask, grow + feather, shape=shape)
    composite = mask_morphology.feather_mask(grown, feather, shape=shape)
    assert composite.shape == mask.shape
    assert composite.min() >= 0 and composite.max() <= 1
    if grow >= 0:
        assert (composite[mask > 0] == 1).all(), "grow + feather must keep the painted region fully edited"
    if composite.amax() == 0:  # eroded away entirely: nothing to plan
        return
    image = torch.rand(1, 3, height, width, generator=generator)
    plan = regions.plan_mask_crop(composite, model_size)
    edited = torch.rand(1, 3, model_size, model_size, generator=generator)
    out = regions.paste_back(image, edited, plan, composite)
    assert out.shape == image.shape
    keep = (composite == 0).expand_as(image)
    assert torch.equal(out[keep], image[keep])
    assert out.min() >= 0 and out.max() <= 1


@PROPERTY_SETTINGS
@given(
    size=image_sizes(),
    image_batch=st.integers(1, 3),
    mask_batch=st.integers(1, 3),
    channels=st.sampled_from([1, 3, 4]),
    mask_layout=st.sampled_from(["hw", "bhw", "b1hw"]),
    mask_size=st.sampled_from(["same", "other"]),
    invert=st.booleans(),
)
def test_any_image_and_mask_layout_prepares_cleanly(
    size, image_batch, mask_batch, channels, mask_layout, mask_size, invert
):
    height, width = size
    if height * width > 400_000:  # keep the layout test cheap; geometry at large sizes is tested above
        height, width = max(height // 10, 1), max(width // 10, 1)
    generator = torch.Generator().manual_seed(height + 31 * width)
    image = torch.rand(image_batch, height, width, channels, generator=generator)
    mask_hw = (height, width) if mask_size == "same" else (max(height // 2, 1) + 3, width + 5)
    raw_mask = torch.rand(mask_batch, *mask_hw, generator=generator)
    if mask_layout == "hw":
        raw_mask, mask_batch = raw_mask[0], 1
    elif mask_layout == "b1hw":
        raw_mask = raw_mask[:, None]

    nchw = to_rgb_nchw(image)
    assert nchw.shape == (image_batch, 3, height, width)
    mask = prepare_mask(raw_mask, height, width, mask_batch, invert=invert)
    assert mask.shape == (mask_batch, 1, height, width)
    assert mask.min() >= 0 and mask.max() <= 1
    matched_image, matched_mask = match_batches(nchw, mask)
    assert matched_image.shape[0] == matched_mask.shape[0]
    expected_batch = mask_batch if image_batch == 1 else image_batch
    assert matched_image.shape == (expected_batch, 3, height, width)
    if matched_mask.amax() > 0:
        plan = regions.plan_mask_crop(matched_mask, 64)
        assert regions.crop_image(matched_image, plan).shape == (expected_batch, 3, 64, 64)
    try:
        check_mask_not_empty(matched_mask)
        assert all(item.amax() > 0 for item in matched_mask)
    except ValueError:
        assert any(item.amax() == 0 for item in matched_mask)
