"""Crop-edit-stitch: run the square, fixed-size diffusion model on images of any size and aspect.

The released models only work at a square size S (256 or 512). The original squashes the whole picture to
S x S, which distorts non-square photos and wastes resolution on a small edit. Here a ``CropPlan`` describes a
box in full-resolution pixels that is resized to S x S for the model and back again afterwards:

* ``plan_full_image``: the original's behaviour (whole image, aspect not kept).
* ``plan_mask_crop``: a square box around the edit region plus some context, so the aspect ratio survives and a
  small edit gets the model's full resolution.

``paste_back`` composites the edited box into a copy of the original so that every pixel outside the composite
mask is bit-identical to the input: nothing outside the edit is ever resampled.

Memory: ``crop_image`` and ``crop_mask`` only read the part of the box inside the image (a 10000x10000 input
costs nothing beyond it when it is a view), and ``paste_back`` needs one full-resolution copy of the original
(the output) plus one result's edit at the size of that part. The box's padding is never made at full
resolution: resizes go one axis at a time, in chunks (``_resize_axis``), so a thin panorama's square box costs
what the panorama does, not its square.

The composite's grow and feather are in ``mask_morphology``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import BlendedInputError
from .image_io import EMPTY_MASK_MESSAGE, antialiased_resize, mask_as_b1hw

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT = 0.25
DEFAULT_MIN_MARGIN = 16


@dataclass(frozen=True)
class CropPlan:
    """A box in full-resolution pixel coordinates that maps to a ``model_size`` x ``model_size`` model input.

    The box may extend past the image (only when it is bigger than the image along that axis); the outside
    part is filled by padding when cropping and simply dropped when pasting back.
    """

    top: int
    left: int
    height: int
    width: int
    model_size: int
    image_height: int
    image_width: int

    def __post_init__(self) -> None:
        if min(self.height, self.width, self.model_size, self.image_height, self.image_width) <= 0:
            raise ValueError(f"a crop plan needs positive sizes, got {self}")

    @property
    def bottom(self) -> int:
        """One past the last row of the box."""
        return self.top + self.height

    @property
    def right(self) -> int:
        """One past the last column of the box."""
        return self.left + self.width

    @property
    def is_square(self) -> bool:
        return self.height == self.width

    def visible_box(self) -> tuple[int, int, int, int]:
        """``(row0, row1, col0, col1)``: the part of the box that lies inside the image (end exclusive)."""
        return (
            max(self.top, 0),
            min(self.bottom, self.image_height),
            max(self.left, 0),
            min(self.right, self.image_width),
        )

    def padding(self) -> tuple[int, int, int, int]:
        """``(top, bottom, left, right)`` pixels of the box that lie outside the image."""
        return (
            max(-self.top, 0),
            max(self.bottom - self.image_height, 0),
            max(-self.left, 0),
            max(self.right - self.image_width, 0),
        )


def plan_full_image(height: int, width: int, model_size: int) -> CropPlan:
    """The original's behaviour: the whole image squashed to ``model_size`` x ``model_size``."""
    return CropPlan(0, 0, height, width, model_size, height, width)


def mask_bounding_box(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    """``(row0, row1, col0, col1)`` (end exclusive) of every value > 0, over all leading dims; None if empty.

    Several disjoint regions give the box around their union, so one crop holds all of them.
    """
    # A bool mask is used as is: comparing it with 0 would first promote it to int64 (8 bytes a pixel).
    nonzero = mask if mask.dtype == torch.bool else mask > 0
    if nonzero.dim() > 2:
        nonzero = nonzero.reshape(-1, *nonzero.shape[-2:]).any(dim=0)
    rows = torch.nonzero(nonzero.any(dim=1)).flatten()
    if rows.numel() == 0:
        return None
    cols = torch.nonzero(nonzero.any(dim=0)).flatten()
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _place_axis(start: int, end: int, side: int, image_extent: int) -> int:
    """Where a box of ``side`` pixels starts so it contains [start, end) and stays inside the image if it fits."""
    if side >= image_extent:
        # Bigger than the image: centre it, so the padding is split evenly and the whole image is inside.
        return -((side - image_extent) // 2)
    origin = start - (side - (end - start)) // 2
    return min(max(origin, 0), image_extent - side)


def plan_mask_crop(
    mask_hw: torch.Tensor,
    model_size: int,
    context: float = DEFAULT_CONTEXT,
    min_crop: int | None = None,
    min_margin: int = DEFAULT_MIN_MARGIN,
) -> CropPlan:
    """A square box around the mask's nonzero pixels plus context, so the model sees the edit undistorted.

    The margin on each side is ``max(context * longer bbox side, min_margin)`` pixels: the model and CLIP need
    surroundings to produce something that fits in. ``min_crop`` forces a bigger box (more context, less
    detail). The side is capped at the image's longer side, since beyond that there is no more context to add.
    A box smaller than ``model_size`` is still resized *up* to ``model_size``: a small edit then gets the
    model's full resolution, and the paste back downsamples it again.

    The box is shifted inside the image when it fits; when it is bigger than the image along an axis it is
    centred and the outside part is padded by ``crop_image``. A mask with leading batch dims is reduced to the
    union of all items, since one model batch runs at one size.
    """
    if model_size <= 0:
        raise ValueError(f"model_size must be positive, got {model_size}")
    if context < 0 or not math.isfinite(context):
        raise BlendedInputError(f"crop context must be a finite number >= 0, got {context}; try 0.25")
    if min_crop is not None and min_crop < 0:
        raise BlendedInputError(f"min_crop must be >= 0 pixels, got {min_crop}; use 0 to disable it")
    if mask_hw.dim() < 2:
        raise ValueError(f"mask must have at least 2 dims [..., H, W], got shape {tuple(mask_hw.shape)}")
    height, width = int(mask_hw.shape[-2]), int(mask_hw.shape[-1])
    box = mask_bounding_box(mask_hw)
    if box is None:
        raise BlendedInputError(EMPTY_MASK_MESSAGE)
    row0, row1, col0, col1 = box
    longer = max(row1 - row0, col1 - col0)
    margin = max(math.ceil(context * longer), max(min_margin, 0))
    side = longer + 2 * margin
    if min_crop:
        side = max(side, int(min_crop))
    side = max(min(side, max(height, width)), longer)
    top = _place_axis(row0, row1, side, height)
    left = _place_axis(col0, col1, side, width)
    plan = CropPlan(top, left, side, side, model_size, height, width)
    logger.debug("mask bbox %s -> crop plan %s", box, plan)
    return plan


def _check_plan_matches(tensor: torch.Tensor, plan: CropPlan, what: str) -> None:
    if tuple(tensor.shape[-2:]) != (plan.image_height, plan.image_width):
        raise ValueError(
            f"{what} is {tuple(tensor.shape[-2:])} but the crop plan was made for "
            f"{(plan.image_height, plan.image_width)}"
        )


def _pad_axis(tensor: torch.Tensor, before: int, after: int, axis: int) -> torch.Tensor:
    """Pad one spatial axis by reflection (natural-looking context), or replication when the image is too thin."""
    if before == 0 and after == 0:
        return tensor
    extent = tensor.shape[axis]
    mode = "reflect" if before < extent and after < extent else "replicate"
    pad = (0, 0, before, after) if axis == -2 else (before, after, 0, 0)
    return F.pad(tensor, pad, mode=mode)


# Elements (batch x channels x rows x columns) one chunk of a one-axis resize may hold.
_CHUNK_ELEMENTS = 1 << 22


def _resize_axis(
    tensor: torch.Tensor,
    axis: int,
    resize,
    keep: slice = slice(None),
) -> torch.Tensor:
    """Apply ``resize`` (a function of a ``[B,C,H,W]`` chunk) along ``axis`` in chunks across the other axis.

    ``resize`` changes only ``axis`` (pads, resizes), so every row (axis -1) or column (axis -2) is
    independent: the chunks give the same bits as one call, and only ``keep`` of each chunk's output is held.
    """
    other = -1 if axis == -2 else -2
    extent = tensor.shape[other]
    probe = resize(tensor.narrow(other, 0, 1))
    chunk = max(_CHUNK_ELEMENTS // max(probe.numel(), 1), 1)
    pieces = []
    for start in range(0, extent, chunk):
        part = resize(tensor.narrow(other, start, min(chunk, extent - start)))
        pieces.append(part[..., keep, :] if axis == -2 else part[..., keep])
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=other)


def _resize_box(tensor: torch.Tensor, columns, rows, keep_cols: slice = slice(None),
                keep_rows: slice = slice(None), rows_first: bool = False) -> torch.Tensor:
    """Both axes through ``_resize_axis``: columns, then rows (torch's own order, so the same bits as one 2-D
    resize), or rows first where that axis has far more to pad or cut away (a thin panorama's square box)."""
    if rows_first:
        return _resize_axis(_resize_axis(tensor, -2, rows, keep_rows), -1, columns, keep_cols)
    return _resize_axis(_resize_axis(tensor, -1, columns, keep_cols), -2, rows, keep_rows)


def _padded_more(plan: CropPlan) -> str | None:
    """"rows" or "columns": the axis with the smaller share of the box inside the image; None if equal."""
    row0, row1, col0, col1 = plan.visible_box()
    rows_share, columns_share = (row1 - row0) * plan.width, (col1 - col0) * plan.height
    return None if rows_share == columns_share else "rows" if rows_share < columns_share else "columns"


def _bicubic(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bicubic resize (callers clamp the result: bicubic overshoots at sharp edges)."""
    if tuple(tensor.shape[-2:]) == size:
        return tensor
    return antialiased_resize(tensor, size, "bicubic")


def crop_image(image_nchw_0_1: torch.Tensor, plan: CropPlan) -> torch.Tensor:
    """Cut the plan's box out of ``[B,C,H,W]`` 0..1 pixels and resize it to ``[B,C,S,S]``.

    The same bits as padding the whole box by reflection and resizing it in one call (torch resizes columns,
    then rows, as here), but the box is padded one axis at a time just before that axis is resized. A box
    padded more along its columns (a tall, thin image) goes rows first instead, which only rounds differently.
    """
    _check_plan_matches(image_nchw_0_1, plan, "the image")
    row0, row1, col0, col1 = plan.visible_box()
    pad_top, pad_bottom, pad_left, pad_right = plan.padding()
    size = plan.model_size
    visible = image_nchw_0_1[..., row0:row1, col0:col1].to(torch.float32)

    def columns(part: torch.Tensor) -> torch.Tensor:
        return _bicubic(_pad_axis(part, pad_left, pad_right, axis=-1), (part.shape[-2], size))

    def rows(part: torch.Tensor) -> torch.Tensor:
        return _bicubic(_pad_axis(part, pad_top, pad_bottom, axis=-2), (size, part.shape[-1]))

    # The more-padded axis goes last, so its padding is made at model size along the other axis.
    return _resize_box(visible, columns, rows, rows_first=_padded_more(plan) == "columns").clamp(0.0, 1.0)


def crop_mask_levels(mask: torch.Tensor, plan: CropPlan) -> torch.Tensor:
    """The mask's values (grey levels) in the plan's box at model size, ``[B,1,S,S]``.

    Shrinking takes each model pixel's maximum rather than the original's NEAREST, so that a thin stroke cannot
    fall between samples and vanish; enlarging uses nearest-exact, which is NEAREST without its half-pixel shift.
    Outside the image the mask is 0: padded context is never edited. Both rules are exact per axis, so the box
    is padded and resized one axis at a time, and a model pixel is > 0 exactly where ``crop_mask`` edits.
    """
    _check_plan_matches(mask, plan, "the mask")
    row0, row1, col0, col1 = plan.visible_box()
    pad_top, pad_bottom, pad_left, pad_right = plan.padding()
    size = plan.model_size
    visible = mask_as_b1hw(mask)[..., row0:row1, col0:col1].to(torch.float32)

    def columns(part: torch.Tensor) -> torch.Tensor:
        padded = F.pad(part, (pad_left, pad_right, 0, 0)) if pad_left or pad_right else part
        return _fit_levels(padded, (part.shape[-2], size))

    def rows(part: torch.Tensor) -> torch.Tensor:
        padded = F.pad(part, (0, 0, pad_top, pad_bottom)) if pad_top or pad_bottom else part
        return _fit_levels(padded, (size, part.shape[-1]))

    return _resize_box(visible, columns, rows, rows_first=_padded_more(plan) == "columns")


def crop_mask(mask: torch.Tensor, plan: CropPlan) -> torch.Tensor:
    """Cut the plan's box out of a ``[B,1,H,W]`` mask and return a binary ``[B,1,S,S]`` model mask (1 = edit).

    Binarised with ``> 0`` as the original does (any nonzero pixel edits), resized as ``crop_mask_levels``.
    """
    # A model pixel's maximum is > 0 exactly where any of its pixels is, so binarising after resizing is the
    # same as before, and only the box is ever converted.
    return (crop_mask_levels(mask, plan) > 0).to(torch.float32)


def _fit_levels(box: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A mask at ``size``: max-pooled where it shrinks, nearest-exact where it grows."""
    shrunk = (min(size[0], box.shape[-2]), min(size[1], box.shape[-1]))
    if shrunk != tuple(box.shape[-2:]):
        box = F.adaptive_max_pool2d(box, shrunk)
    if shrunk != size:
        box = F.interpolate(box, size=size, mode="nearest-exact")
    return box


def paste_back(
    original_nchw_0_1: torch.Tensor,
    edited_model_size_0_1: torch.Tensor,
    plan: CropPlan,
    composite_mask: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Put the edited model-size crop back into a full-resolution copy of the original.

    ``out = original * (1 - m) + pasted * m`` inside the box, where ``m`` is the composite mask; outside the
    box and wherever ``m == 0`` the original's bits are kept exactly (``torch.where``, not arithmetic, so no
    rounding). The composite mask is only used inside the box: plan the crop from the composite mask (after
    growing/feathering) so the box covers all of it. An original or mask batch of 1 is broadcast to the
    edited batch (one picture, several samples).

    ``out``: a float32 ``[N,C,H,W]`` tensor (or view, e.g. of the node's ``[N,H,W,C]`` output) to write into,
    so many full-resolution results are not assembled from copies. Only the mask's own bounding box is resized
    and blended: a small edit of a large photo costs what the edit's size does.
    """
    _check_plan_matches(original_nchw_0_1, plan, "the original image")
    composite_mask = mask_as_b1hw(composite_mask)
    _check_plan_matches(composite_mask, plan, "the composite mask")
    batch = edited_model_size_0_1.shape[0]
    for name, tensor in (("original image", original_nchw_0_1), ("composite mask", composite_mask)):
        if tensor.shape[0] not in (1, batch):
            raise ValueError(f"the {name} has batch {tensor.shape[0]}, expected 1 or {batch}")
    row0, row1, col0, col1 = plan.visible_box()
    outside = (
        composite_mask[..., :row0, :],
        composite_mask[..., row1:, :],
        composite_mask[..., row0:row1, :col0],
        composite_mask[..., row0:row1, col1:],
    )
    if any(bool((strip > 0).any()) for strip in outside if strip.numel()):
        logger.warning(
            "Blended Diffusion: the composite mask reaches outside the crop box; that part is ignored (plan the "
            "crop from the grown/feathered mask)"
        )
    inside = composite_mask[..., row0:row1, col0:col1].to(torch.float32)
    pad_top, _, pad_left, _ = plan.padding()
    keep_rows = slice(pad_top, pad_top + (row1 - row0))
    keep_cols = slice(pad_left, pad_left + (col1 - col0))

    def columns(part: torch.Tensor) -> torch.Tensor:
        return _bicubic(part, (part.shape[-2], plan.width))

    def rows(part: torch.Tensor) -> torch.Tensor:
        return _bicubic(part, (plan.height, part.shape[-1]))

    # The axis with more to cut away goes first, so the other is never resized at the full box size.
    rows_first = _padded_more(plan) == "rows"
    full = original_nchw_0_1.to(torch.float32).expand(batch, -1, -1, -1)
    if out is None:
        out = full.clone()
    else:
        if tuple(out.shape) != tuple(full.shape):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(full.shape)}")
        out.copy_(full)
    used = mask_bounding_box(inside)
    if used is None:
        return out
    # The resizes give every output pixel independently of the others, so resizing only the mask's box (the
    # kept rows and columns) gives the same bits as resizing the whole crop.
    top, bottom, left, right = used
    keep_rows = slice(keep_rows.start + top, keep_rows.start + bottom)
    keep_cols = slice(keep_cols.start + left, keep_cols.start + right)
    inside = inside[..., top:bottom, left:right]
    # One result at a time, so the blend's temporaries are one result's, not the batch's.
    for index in range(batch):
        edited = edited_model_size_0_1[index : index + 1].to(torch.float32)
        pasted = _resize_box(edited, columns, rows, keep_cols, keep_rows, rows_first).clamp(0.0, 1.0)
        region = out[index : index + 1, :, row0 + top:row0 + bottom, col0 + left:col0 + right]
        weight = inside[index : index + 1] if inside.shape[0] == batch else inside
        blended = region * (1.0 - weight) + pasted * weight
        region.copy_(torch.where(weight > 0, blended, region))
    return out


def box_mask(plan: CropPlan, batch: int = 1) -> torch.Tensor:
    """[batch,1,H,W] ones inside the plan's visible box: the composite when the whole crop is kept
    (no enforced background), so nothing outside the box the model saw can change."""
    row0, row1, col0, col1 = plan.visible_box()
    mask = torch.zeros(batch, 1, plan.image_height, plan.image_width)
    mask[:, :, row0:row1, col0:col1] = 1.0
    return mask
