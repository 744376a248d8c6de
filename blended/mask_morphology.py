"""Growing, shrinking and feathering masks: the Sampler's ``grow_mask`` and ``feather`` composite.

The kernels are the ones a user can picture: a square, or an octagon that stands in for a circle. The octagon
is what alternating 3x3 square and 3x3 cross steps grow (within about 8% of a disc), and grow, shrink and
feather all use that same step sequence, so a feather never eats into the region it was grown around.

Speed matters here because the widgets reach 512 pixels on photos of several megapixels: stepping a 3x3 kernel
512 times over a 3000x3000 canvas took minutes. So:

* growing and shrinking by more than ``STEPPED_UP_TO`` pixels take the maximum (minimum) over the whole kernel
  at once (a few pixels still step, which is cheaper there). ``n`` alternating steps
  cover exactly the octagon ``square(ceil(n/2)) + diamond(floor(n/2))`` (Minkowski sum), and each part is a
  sum of line segments: rows and columns for the square, the two diagonals (plus a one-pixel shift when the
  diamond's radius is odd) for the diamond. A running maximum over a segment costs a few passes whatever its
  length (``_running_max``, van Herk/Gil-Werman), so a grow of 512 costs what a grow of 8 does;
* feathering needs every step's erosion (its value is how many steps a pixel survives), so it still steps, but
  each step is a handful of elementwise minima over shifted copies instead of pooling calls, in bytes for a 0/1
  mask.

Both give exactly the values that stepping the 3x3 kernels one at a time gives (maxima and minima only select
values); ``tests/test_mask_morphology.py`` checks that against the step-by-step definition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import BlendedInputError
from .image_io import mask_as_b1hw
from .regions import mask_bounding_box

MASK_SHAPES = ("circle", "square")


def _check_shape(shape: str) -> None:
    if shape not in MASK_SHAPES:
        raise BlendedInputError(f"mask kernel shape must be one of {MASK_SHAPES}, got {shape!r}")


# --- whole-kernel maxima -------------------------------------------------------------------------------------

def _running_max(x: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """``out[..., i] = max(x[..., i + low : i + high + 1])`` along the last axis; positions outside are ignored.

    van Herk/Gil-Werman: cut the (padded) row into blocks as long as the window; every window then spans at most
    two blocks and is the maximum of one block's suffix maximum and the next block's prefix maximum.
    """
    width = high - low + 1
    if width == 1:
        return x if low == 0 else _shifted(x, low)
    length = x.shape[-1]
    blocks = -(-(length + width - 1) // width)
    padded = F.pad(x, (-low, blocks * width - length + low), value=float("-inf"))
    cut = padded.reshape(*x.shape[:-1], blocks, width)
    prefix = cut.cummax(dim=-1).values.reshape(padded.shape)
    suffix = cut.flip(-1).cummax(dim=-1).values.flip(-1).reshape(padded.shape)
    return torch.maximum(suffix[..., :length], prefix[..., width - 1:width - 1 + length])


def _shifted(x: torch.Tensor, offset: int) -> torch.Tensor:
    """``out[..., i] = x[..., i + offset]``, -inf where that falls outside."""
    if offset > 0:
        return F.pad(x[..., offset:], (0, offset), value=float("-inf"))
    return F.pad(x[..., :offset], (-offset, 0), value=float("-inf"))


def _running_max_rows(x: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """The running maximum down each column (along the row index)."""
    return _running_max(x.transpose(-1, -2), low, high).transpose(-1, -2)


def _running_max_diagonal(x: torch.Tensor, low: int, high: int, anti: bool) -> torch.Tensor:
    """``out[i, j] = max over k in [low, high] of x[i + k, j + k]`` (``anti``: ``x[i + k, j - k]``).

    Sheared so that each diagonal becomes a column of a [H, H + W - 1] canvas, then a running maximum down it;
    a tall region is transposed first, so the canvas is (H + W - 1) times the shorter side.
    """
    height, width = x.shape[-2:]
    if height > width:
        # Transposed, a diagonal stays a diagonal and an anti-diagonal runs the other way.
        flipped = (-high, -low) if anti else (low, high)
        return _running_max_diagonal(x.transpose(-1, -2), *flipped, anti=anti).transpose(-1, -2)
    rows = torch.arange(height, device=x.device).unsqueeze(1)
    cols = torch.arange(width, device=x.device).unsqueeze(0)
    index = (cols + rows) if anti else (cols - rows + height - 1)
    index = index.expand(*x.shape[:-2], height, width)
    sheared = torch.full((*x.shape[:-1], height + width - 1), float("-inf"), dtype=x.dtype, device=x.device)
    sheared.scatter_(-1, index, x)
    return torch.gather(_running_max_rows(sheared, low, high), -1, index)


def _kernel_max(x: torch.Tensor, steps: int, shape: str) -> torch.Tensor:
    """The maximum over the kernel that ``steps`` 3x3 steps grow (square, or the octagon), outside ignored.

    The caller pads ``x`` so no part of the kernel's decomposition needs values beyond it (:func:`_dilated`).
    """
    squares, crosses = (steps, 0) if shape == "square" else ((steps + 1) // 2, steps // 2)
    x = _running_max(_running_max_rows(x, -squares, squares), -squares, squares)
    if crosses:
        # The diamond of radius c: {(a + b, a - b)} for a, b in [-c/2, c/2] when c is even; when c is odd the
        # points have odd coordinate sums, {(a + b + 1, a - b)} for a, b in [-(c + 1)/2, (c - 1)/2].
        low, high = (-(crosses // 2), crosses // 2) if crosses % 2 == 0 else (-(crosses + 1) // 2, (crosses - 1) // 2)
        x = _running_max_diagonal(x, low, high, anti=False)
        x = _running_max_diagonal(x, low, high, anti=True)
        if crosses % 2:
            x = _running_max_rows(x, 1, 1)
    return x


def _dilated(region: torch.Tensor, steps: int, shape: str) -> torch.Tensor:
    """``region`` dilated by ``steps`` steps, nothing (``-inf``) beyond it.

    The kernel's decomposition passes through points up to ``steps + 1`` beyond the region, so it works on the
    region padded by that much.
    """
    room = steps + 1
    out = _kernel_max(F.pad(region, (room, room, room, room), value=float("-inf")), steps, shape)
    return out[..., room:out.shape[-2] - room, room:out.shape[-1] - room]


# --- one 3x3 step at a time (feathering) --------------------------------------------------------------------

def _step_is_square(step: int, shape: str) -> bool:
    """The k-th 3x3 step of a growing kernel: square steps only, or square/cross alternating."""
    return shape == "square" or step % 2 == 0


def _neighbour_extreme(x: torch.Tensor, dim: int, pick) -> torch.Tensor:
    """Each pixel's ``pick`` (``torch.minimum`` or ``torch.maximum``) with its two neighbours along ``dim``; a
    missing neighbour does not count (the pixel stands in for it). Built without in-place writes, so it is
    differentiable."""
    size = x.shape[dim]
    if size == 1:
        return x
    before = torch.cat([x.narrow(dim, 0, 1), x.narrow(dim, 0, size - 1)], dim=dim)
    after = torch.cat([x.narrow(dim, 1, size - 1), x.narrow(dim, size - 1, 1)], dim=dim)
    return pick(x, pick(before, after))


def _step(mask: torch.Tensor, square: bool, pick) -> torch.Tensor:
    """One 3x3 square or cross step of ``pick`` over the neighbourhood; pixels outside the canvas do not count."""
    if square:
        return _neighbour_extreme(_neighbour_extreme(mask, -2, pick), -1, pick)
    return pick(_neighbour_extreme(mask, -2, pick), _neighbour_extreme(mask, -1, pick))


def _erode_step(mask: torch.Tensor, square: bool) -> torch.Tensor:
    # Pixels outside the canvas do not count, which is the same as counting them as mask: an edit touching the
    # border must not shrink away from it.
    return _step(mask, square, torch.minimum)


# --- the operations ------------------------------------------------------------------------------------------

# Grows and shrinks up to this many pixels step the 3x3 kernel (a few cheap passes each); wider ones take the
# whole kernel at once, whose passes cost more than a few steps but the same for any width.
STEPPED_UP_TO = 12


def _working_box(mask: torch.Tensor, reach: int) -> tuple[int, int, int, int] | None:
    box = mask_bounding_box(mask)
    if box is None:
        return None
    row0, row1, col0, col1 = box
    height, width = mask.shape[-2:]
    return max(row0 - reach, 0), min(row1 + reach, height), max(col0 - reach, 0), min(col1 + reach, width)


def grow_mask(mask: torch.Tensor, pixels: int, shape: str = "circle") -> torch.Tensor:
    """Dilate (``pixels`` > 0) or erode (< 0) a mask by ``pixels``; 0 returns it unchanged.

    Works on soft masks too (grey-level max/min, like core's GrowMask). Only the mask's bounding box plus
    ``|pixels|`` is processed, so a small mask on a huge image is cheap. Erosion treats the outside of the
    image as masked, so a region touching the border stays attached to it. Returns the input's shape, float32.
    """
    _check_shape(shape)
    pixels = int(pixels)
    if pixels == 0:
        return mask.to(torch.float32)
    work, original_shape = mask_as_b1hw(mask).to(torch.float32), mask.shape
    box = _working_box(work, abs(pixels))
    if box is None:
        return work.reshape(original_shape)
    row0, row1, col0, col1 = box
    region = work[..., row0:row1, col0:col1]
    if abs(pixels) <= STEPPED_UP_TO:
        pick = torch.maximum if pixels > 0 else torch.minimum
        for step in range(abs(pixels)):
            region = _step(region, _step_is_square(step, shape), pick)
    elif pixels > 0:
        region = _dilated(region, pixels, shape)
    else:
        region = -_dilated(-region, -pixels, shape)
    out = work.clone()
    out[..., row0:row1, col0:col1] = region
    return out.reshape(original_shape)


def feather_mask(mask: torch.Tensor, pixels: int, shape: str = "circle") -> torch.Tensor:
    """Soften a mask's edge *inward* over ``pixels`` pixels; 0 returns it unchanged.

    The result is never larger than the input: pixel value = min(depth, pixels) / pixels, where depth is how
    many erosion steps the pixel survives. Feathering inward keeps a hard promise: to blend an edit of region R
    smoothly while still replacing all of R, grow R by ``pixels`` first and feather the grown mask by the same
    ``pixels`` with the same ``shape``; R stays exactly 1 and the ramp lies in the grown band. Every nonzero
    pixel of the input stays nonzero, so binarising with ``> 0`` recovers the input's support.
    """
    _check_shape(shape)
    pixels = int(pixels)
    if pixels < 0:
        raise BlendedInputError(f"feather must be >= 0 pixels, got {pixels}; use grow with a negative value to shrink")
    if pixels == 0:
        return mask.to(torch.float32)
    work, original_shape = mask_as_b1hw(mask).to(torch.float32), mask.shape
    box = _working_box(work, pixels)
    if box is None:
        return work.reshape(original_shape)
    row0, row1, col0, col1 = box
    region = work[..., row0:row1, col0:col1]
    # A 0/1 mask (the Sampler's composite always is) steps as bytes and counts in integers: the same sums,
    # ten times faster than stepping floats.
    binary = bool(((region == 0) | (region == 1)).all())
    eroded = region.to(torch.uint8) if binary else region
    total = region.to(torch.int32) if binary else region.clone()
    for step in range(pixels - 1):
        eroded = _erode_step(eroded, _step_is_square(step, shape))
        total += eroded
    total = total.to(torch.float32)
    out = work.clone()
    out[..., row0:row1, col0:col1] = total / pixels
    return out.reshape(original_shape)


def grown_and_feathered(mask: torch.Tensor, grow: int, feather: int, shape: str = "circle") -> torch.Tensor:
    """``mask`` grown by ``grow + feather``, then feathered inward by ``feather``: the region stays 1 and the ramp
    lies in the band around it (the Sampler's composite for ``grow_mask`` and ``feather``).

    Both run on the mask's box plus the band, padded where that box meets the image's edge with the edge's
    pixels repeated outward. A region that touches the image's edge thus goes on past it (no ramp along the
    edge), while a band that the edge merely cuts keeps its ramp; feathering the cut band on its own would
    count the outside as mask and make the pixels along the edge 1, replacing them wholly.
    """
    work, original_shape = mask_as_b1hw(mask).to(torch.float32), mask.shape
    reach = int(grow) + int(feather)
    box = mask_bounding_box(work)
    if box is None or (reach == 0 and not feather):
        return work.reshape(original_shape)
    # One pixel more than the band, so a row of the background lies between the band and the canvas's side.
    margin = abs(reach) + 1
    height, width = work.shape[-2:]
    row0, row1 = max(box[0] - margin, 0), min(box[1] + margin, height)
    col0, col1 = max(box[2] - margin, 0), min(box[3] + margin, width)
    pads = (margin if col0 == 0 else 0, margin if col1 == width else 0,
            margin if row0 == 0 else 0, margin if row1 == height else 0)
    canvas = F.pad(work[..., row0:row1, col0:col1], pads, mode="replicate")
    canvas = grow_mask(canvas, reach, shape)
    if feather:
        canvas = feather_mask(canvas, feather, shape)
    out = torch.zeros_like(work)
    out[..., row0:row1, col0:col1] = canvas[..., pads[2]:canvas.shape[-2] - pads[3],
                                            pads[0]:canvas.shape[-1] - pads[1]]
    return out.reshape(original_shape)
