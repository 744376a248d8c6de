"""The edit's mask rules in one place (blended/image_io.py): sizing, batch pairing, invert_mask and the refusal of an
empty mask, as the Sampler, CLIP Guidance, CLIP Rank and Edit Metrics use them."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch

from blended.errors import BlendedInputError
from blended.image_io import (
    EMPTY_INVERTED_MASK_MESSAGE,
    EMPTY_MASK_MESSAGE,
    check_edit_mask,
    check_mask_not_empty,
    mask_batch_size,
    mask_for_images,
    match_batches,
    prepare_edit_masks,
    prepare_mask,
    repeat_to_batch_size,
    to_rgb_nchw,
)


def _old_match_batches(image, mask):
    """match_batches as it was written before it shared masks_in_use."""
    image_batch, mask_batch = image.shape[0], mask.shape[0]
    if image_batch == 1 and mask_batch > 1:
        return image.expand(mask_batch, *image.shape[1:]), mask
    return image, repeat_to_batch_size(mask, image_batch)


def _old_edit_masks(image, mask, invert):
    """blended.sampler.edit_image's mask preparation as it was written before prepare_edit_masks."""
    images = to_rgb_nchw(image)
    _, _, height, width = images.shape
    mask_batch = images.shape[0] if mask is None else mask_batch_size(mask)
    masks = prepare_mask(mask, height, width, mask_batch, invert=invert)
    images, masks = _old_match_batches(images, masks)
    check_mask_not_empty(masks, inverted=invert)
    return images, masks


def _old_pre_check(image, mask, invert):
    """The Sampler node's early check as it was written in the node."""
    if mask is not None:
        image_batch = image.shape[0] if image.dim() == 4 else 1
        used = mask if mask.dim() < 3 or image_batch == 1 else mask[:image_batch]
        check_mask_not_empty(used <= 0 if invert else used, inverted=invert)


def _outcome(function, *args):
    try:
        return function(*args)
    except BlendedInputError as exc:
        return str(exc)


def _masks(batch, height=6, width=5, seed=0):
    """A MASK batch of grey values, item 1 all 0 and item 2 all 1 where the batch has them."""
    masks = torch.rand(batch, height, width, generator=torch.Generator().manual_seed(seed))
    masks[masks < 0.4] = 0
    if batch > 1:
        masks[1] = 0
    if batch > 2:
        masks[2] = 1
    return masks


@pytest.mark.parametrize("image_batch, mask_batch", list(itertools.product((1, 2, 3, 5), (1, 2, 3, 5))))
def test_match_batches_pairs_as_before(image_batch, mask_batch):
    images = torch.rand(image_batch, 3, 4, 4)
    masks = torch.rand(mask_batch, 1, 4, 4)
    for new, old in zip(match_batches(images, masks), _old_match_batches(images, masks), strict=True):
        assert torch.equal(new, old)


@pytest.mark.parametrize("invert", [False, True])
@pytest.mark.parametrize("image_shape, mask_shape", [
    ((1, 6, 5, 3), (1, 6, 5)), ((2, 6, 5, 3), (2, 6, 5)), ((1, 6, 5, 3), (3, 6, 5)), ((3, 6, 5, 3), (1, 6, 5)),
    ((3, 6, 5, 3), (4, 3, 7)), ((4, 12, 10, 1), (2, 6, 5)), ((6, 5, 4), (6, 5)), ((2, 6, 5, 3), None),
])
def test_prepare_edit_masks_is_the_sampler_s_former_preparation(image_shape, mask_shape, invert):
    image = torch.rand(*image_shape)
    for seed in range(3):
        mask = None if mask_shape is None else _masks(mask_shape[0] if len(mask_shape) == 3 else 1,
                                                      *mask_shape[-2:], seed=seed).reshape(mask_shape)
        new = _outcome(prepare_edit_masks, to_rgb_nchw(image), mask, invert)
        old = _outcome(_old_edit_masks, image, mask, invert)
        if isinstance(old, str):
            assert new == old
        else:
            assert torch.equal(new[0], old[0]) and torch.equal(new[1], old[1])


def test_an_empty_mask_is_refused_with_the_switch_in_the_advice():
    images = torch.rand(2, 3, 4, 4)
    with pytest.raises(BlendedInputError) as err:
        prepare_edit_masks(images, torch.zeros(1, 4, 4))
    assert str(err.value).startswith(EMPTY_MASK_MESSAGE)
    with pytest.raises(BlendedInputError) as err:
        prepare_edit_masks(images, torch.ones(1, 4, 4), invert=True)
    assert str(err.value).startswith(EMPTY_INVERTED_MASK_MESSAGE)
    with pytest.raises(BlendedInputError, match=r"empty in batch item\(s\) \[1\]"):
        prepare_edit_masks(images, _masks(2, 4, 4))
    # invert_mask binarises: a grey mask that covers everything leaves nothing to edit inverted
    with pytest.raises(BlendedInputError, match="inverted mask is empty"):
        prepare_edit_masks(images, torch.full((1, 4, 4), 0.1), invert=True)
    images, masks = prepare_edit_masks(images, None)
    assert torch.equal(masks, torch.ones(2, 1, 4, 4))


@pytest.mark.parametrize("invert", [False, True])
def test_the_early_check_is_the_sampler_node_s_former_one(invert):
    for image_shape, mask_shape in [((1, 6, 5, 3), (3, 6, 5)), ((3, 6, 5, 3), (5, 6, 5)), ((2, 6, 5, 3), (1, 6, 5)),
                                    ((6, 5, 3), (6, 5)), ((4, 6, 5, 3), (2, 6, 5)), ((1, 6, 5, 3), (1, 6, 5))]:
        image = torch.rand(*image_shape)
        for seed in range(3):
            mask = _masks(mask_shape[0] if len(mask_shape) == 3 else 1, *mask_shape[-2:], seed=seed).reshape(
                mask_shape)
            assert _outcome(check_edit_mask, image, mask, invert) == _outcome(_old_pre_check, image, mask, invert)
    check_edit_mask(torch.rand(1, 4, 4, 3), None, invert)


def test_the_early_check_refuses_what_the_edit_refuses_at_the_image_s_size():
    """Masks at the image's size: the check on the mask as given and the edit's own agree, message included."""
    for image_batch, mask_batch, invert, seed in itertools.product((1, 2, 3), (1, 2, 4), (False, True), range(3)):
        image = torch.rand(image_batch, 6, 5, 3)
        mask = _masks(mask_batch, seed=seed)
        early = _outcome(check_edit_mask, image, mask, invert)
        full = _outcome(prepare_edit_masks, to_rgb_nchw(image), mask, invert)
        assert early is None if not isinstance(full, str) else early == full


def test_mask_for_images_keeps_the_mask_s_batch_at_the_images_size():
    images = torch.rand(4, 3, 12, 10)
    masks = mask_for_images(images, _masks(2, 6, 5))
    assert masks.shape == (2, 1, 12, 10)
    assert torch.equal(masks, prepare_mask(_masks(2, 6, 5), 12, 10, 2))
    assert torch.equal(mask_for_images(images, None), torch.ones(4, 1, 12, 10))
    assert torch.equal(mask_for_images(images, None, invert=True), torch.zeros(4, 1, 12, 10))
    assert mask_for_images(images, torch.ones(6, 5)).shape == (1, 1, 12, 10)


def test_masks_beyond_the_image_batch_are_named_in_a_warning(caplog):
    """Core drops masks beyond the image batch; the pack follows it but says so, once, where the Sampler first
    checks its inputs. Fewer masks, or one image with several masks (each its own edit), use every mask and say
    nothing."""
    images = torch.rand(2, 8, 8, 3)
    with caplog.at_level(logging.WARNING, logger="blended.image_io"):
        check_edit_mask(images, torch.ones(3, 8, 8))
        _, masks = match_batches(images.movedim(-1, 1), torch.ones(3, 1, 8, 8))  # an edit's own pairing: quiet
    assert masks.shape[0] == 2
    assert [r.getMessage() for r in caplog.records] == [
        "Blended Diffusion: 3 masks for 2 images: the last 1 mask(s) are not used (the images decide; give one "
        "image with several masks to edit it in several places)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="blended.image_io"):
        check_edit_mask(images, torch.ones(1, 8, 8))
        check_edit_mask(images[:1], torch.ones(3, 8, 8))
        check_edit_mask(images, torch.ones(2, 8, 8))
    assert caplog.text == ""


@pytest.mark.parametrize("image_shape, mask_shape", [((0, 8, 8, 3), (1, 8, 8)), ((1, 8, 8, 3), (0, 8, 8)),
                                                     ((2, 8, 8, 3), (0, 8, 8)), ((1, 8, 8, 3), (1, 0, 8))])
def test_an_empty_batch_is_refused_as_the_users_to_fix(image_shape, mask_shape):
    """The Sampler's first check and the other nodes' mask preparation name the empty input (not a reshape
    error, or an internal "batch must be positive")."""
    image, mask = torch.rand(image_shape), torch.ones(mask_shape)
    which = "image" if 0 in image_shape else "mask"
    with pytest.raises(BlendedInputError, match=f"the {which} has an empty dimension"):
        check_edit_mask(image, mask)
    if which == "mask":
        with pytest.raises(BlendedInputError, match="the mask has an empty dimension"):
            mask_for_images(torch.rand(1, 3, 8, 8), mask)


def test_an_8_bit_mask_is_read_as_8_bit_images_are():
    """255 = 1 and grey levels keep their meaning (soft masks, CLIP Rank); other dtypes are read as values."""
    grey = torch.full((1, 4, 4), 128, dtype=torch.uint8)
    assert torch.allclose(prepare_mask(grey, 4, 4, 1), torch.full((1, 1, 4, 4), 128 / 255))
    assert torch.equal(prepare_mask(grey * 0 + 255, 4, 4, 1), torch.ones(1, 1, 4, 4))
    assert torch.equal(prepare_mask(torch.ones(1, 4, 4, dtype=torch.int64), 4, 4, 1), torch.ones(1, 1, 4, 4))
    assert torch.equal(prepare_mask(torch.ones(1, 4, 4, dtype=torch.bool), 4, 4, 1), torch.ones(1, 1, 4, 4))


@pytest.mark.parametrize("invert", [False, True])
def test_a_nan_mask_is_named_as_nan_not_as_empty(invert):
    """NaN is neither > 0 nor <= 0, so the emptiness check alone would call an all-NaN mask empty."""
    mask = torch.full((1, 8, 8), float("nan"))
    mask[0, :4] = 1.0
    with pytest.raises(BlendedInputError, match="mask contains NaN"):
        check_edit_mask(torch.rand(1, 8, 8, 3), mask if invert else torch.full((1, 8, 8), float("nan")),
                        invert=invert)
