"""Grow, shrink and feather: the kernels users picture, and the fast whole-kernel passes giving exactly what
stepping a 3x3 kernel one step at a time gives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from blended.errors import BlendedInputError
from blended.mask_morphology import STEPPED_UP_TO, feather_mask, grow_mask, grown_and_feathered


def _step(mask: torch.Tensor, square: bool, erode: bool) -> torch.Tensor:
    """One 3x3 step the slow, obvious way: pooling, outside the image ignored."""
    x = -mask if erode else mask
    if square:
        x = F.max_pool2d(x, 3, stride=1, padding=1)
    else:
        x = torch.maximum(F.max_pool2d(x, (3, 1), stride=1, padding=(1, 0)),
                          F.max_pool2d(x, (1, 3), stride=1, padding=(0, 1)))
    return -x if erode else x


def _stepped_grow(mask: torch.Tensor, pixels: int, shape: str) -> torch.Tensor:
    for step in range(abs(pixels)):
        mask = _step(mask, shape == "square" or step % 2 == 0, erode=pixels < 0)
    return mask


def _stepped_feather(mask: torch.Tensor, pixels: int, shape: str) -> torch.Tensor:
    total, eroded = mask.clone(), mask
    for step in range(pixels - 1):
        eroded = _step(eroded, shape == "square" or step % 2 == 0, erode=True)
        total = total + eroded
    return total / pixels


def _random_masks(count: int):
    generator = torch.Generator().manual_seed(7)
    for index in range(count):
        height, width = (int(v) for v in torch.randint(1, 28, (2,), generator=generator))
        density = (0.5, 0.9, 0.97)[index % 3]
        mask = (torch.rand(1, 1, height, width, generator=generator) > density).float()
        if index % 2:
            mask = mask * torch.rand(1, 1, height, width, generator=generator)  # grey levels
        yield index, mask


def test_grow_and_shrink_give_exactly_what_stepping_the_3x3_kernel_gives():
    for index, mask in _random_masks(160):
        shape = ("circle", "square")[index % 2 == 0 and index % 4 == 0]
        wide = STEPPED_UP_TO + 1 + index % 17  # taken over the whole kernel at once
        for pixels in (index % 15 + 1, -(index % 13 + 1), wide, -wide):
            got = grow_mask(mask, pixels, shape)
            assert torch.equal(got, _stepped_grow(mask, pixels, shape)), (mask.shape, pixels, shape)


def test_feather_gives_exactly_what_stepping_gives_for_hard_and_grey_masks():
    for index, mask in _random_masks(120):
        shape = ("circle", "square")[index % 4 == 1]
        pixels = index % 11 + 1
        expected = _stepped_feather(mask, pixels, shape)
        got = feather_mask(mask, pixels, shape)
        if index % 2:
            assert torch.allclose(got, expected, atol=1e-6), (mask.shape, pixels, shape)
        else:
            assert torch.equal(got, expected), (mask.shape, pixels, shape)


def test_a_wide_grow_costs_as_many_operations_as_a_narrow_one():
    mask = torch.zeros(1, 1, 96, 96)
    mask[..., 40:50, 30:60] = 1.0

    def operations(pixels: int) -> int:
        with profile() as trace:
            grow_mask(mask, pixels)
        return len(trace.events())

    narrow, wide = operations(STEPPED_UP_TO + 2), operations(120)
    assert wide < 1.2 * narrow, f"a grow of 120 ran {wide} operations, one of {STEPPED_UP_TO + 2} ran {narrow}"


def test_a_tall_thin_region_grows_on_a_canvas_as_thin_as_it():
    mask = torch.zeros(1, 1, 3000, 40)
    mask[..., 100:2900, 15:25] = 1.0
    grown = grow_mask(mask, 20)
    assert torch.equal(grown, _stepped_grow(mask, 20, "circle"))


def test_feathering_is_differentiable():
    mask = torch.zeros(1, 1, 12, 12)
    mask[..., 3:9, 2:10] = 0.8
    mask.requires_grad_(True)
    feather_mask(mask, 3).sum().backward()
    assert mask.grad is not None and torch.isfinite(mask.grad).all() and mask.grad.abs().sum() > 0


def test_grow_and_erode_square_and_circle():
    mask = torch.zeros(1, 1, 21, 21)
    mask[0, 0, 10, 10] = 1.0
    square = grow_mask(mask, 3, shape="square")
    assert square.sum() == 49 and square[0, 0, 7:14, 7:14].sum() == 49
    circle = grow_mask(mask, 3, shape="circle")
    assert circle[0, 0, 10, 7] == 1 and circle[0, 0, 10, 13] == 1 and circle[0, 0, 7, 10] == 1
    assert circle[0, 0, 7, 7] == 0, "a circle-ish kernel must not reach the square's corner"
    assert 25 < circle.sum() < 49
    assert torch.equal(grow_mask(square, -3, shape="square"), mask)
    assert torch.equal(grow_mask(mask, 0), mask)
    assert grow_mask(mask, -1).sum() == 0


def test_erosion_keeps_regions_touching_the_border():
    mask = torch.zeros(10, 10)
    mask[:, :4] = 1.0
    eroded = grow_mask(mask, -2, shape="square")
    assert eroded.shape == (10, 10)
    assert eroded[:, :2].sum() == 20 and eroded[:, 2:].sum() == 0


def test_feather_is_inward_and_covers_the_grown_region():
    mask = torch.zeros(1, 40, 40)
    mask[0, 15:25, 12:20] = 1.0
    for shape in ("circle", "square"):
        grown = grow_mask(mask, 5, shape=shape)
        soft = feather_mask(grown, 5, shape=shape)
        assert soft.shape == mask.shape
        assert (soft <= grown).all()
        assert torch.equal((soft > 0), (grown > 0)), "feathering must not change the edit support"
        assert (soft[mask > 0] == 1).all(), "the original region must stay fully edited"
        assert ((soft > 0) & (soft < 1)).any()
    assert torch.equal(feather_mask(mask, 0), mask)
    with pytest.raises(BlendedInputError):
        feather_mask(mask, -1)
    with pytest.raises(BlendedInputError):
        grow_mask(mask, 1, shape="star")


def test_a_band_the_image_edge_cuts_keeps_its_ramp_and_a_region_on_the_edge_stays_whole():
    mask = torch.zeros(1, 64, 64)
    mask[0, 52:60, 24:40] = 1.0  # 4 rows above the bottom edge
    composite = grown_and_feathered(mask, 0, 8)  # the band: 8 rows around the region, 4 of them on the image
    column = composite[0, :, 32]
    assert (column[52:60] == 1).all(), "the region itself is fully edited"
    assert torch.allclose(column[60:64], torch.flip(column[48:52], [0])), "below ramps as above does"
    assert 0 < column[63] < column[62] < column[61] < 1, "the pixels along the edge are blended, not replaced"
    # away from the edges, exactly grow then feather
    inner = torch.zeros(1, 64, 64)
    inner[0, 24:40, 24:40] = 1.0
    assert torch.equal(grown_and_feathered(inner, 6, 8), feather_mask(grow_mask(inner, 14), 8))
    # a region painted up to the edge goes on past it: no ramp along the edge
    touching = torch.zeros(1, 64, 64)
    touching[0, 40:64, 24:40] = 1.0
    assert (grown_and_feathered(touching, 4, 8)[0, 40:64, 24:40] == 1).all()
