"""Conversions between ComfyUI-style IMAGE/MASK tensors and the tensors the library works on.

ComfyUI hands nodes an IMAGE as ``[B,H,W,C]`` floats in 0..1 (C is usually 3, sometimes 1 or 4) and a MASK as
``[B,H,W]`` or ``[H,W]`` floats in 0..1, of any size and batch. The library works in NCHW. These helpers do
the boundary work once, so that every later stage can assume clean, finite, channel-first tensors with
matching batches.

Large images: ``to_rgb_nchw`` returns a view of its input whenever it can (no copy unless values must be
clamped), so later stages that only look at a crop box never touch the full-resolution pixels.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .errors import BlendedInputError

logger = logging.getLogger(__name__)

_FINITE_CHECK_ELEMENTS = 1 << 22

EMPTY_MASK_MESSAGE = (
    "the mask is empty: nothing to edit. Paint the region to change in white (mask = 1) or enable invert_mask. "
    "(Load Image's MASK output is empty for a picture without a painted or transparent area: paint the region "
    "in its MaskEditor.)"
)
EMPTY_INVERTED_MASK_MESSAGE = (
    "the inverted mask is empty: nothing to edit. invert_mask edits where the mask is black (0), and this mask "
    "has no black pixel; turn invert_mask off, or leave the region to change black"
)


def _require_finite(tensor: torch.Tensor, what: str) -> tuple[float, float]:
    """Return (min, max), raising when any value is NaN or infinite.

    ``aminmax`` propagates NaN and inf into its result, so one reduction both validates and gives the range,
    without a full-size boolean tensor. It runs over slabs of rows because on a non-contiguous input (a
    broadcast or channel-sliced IMAGE) torch would otherwise make a full contiguous copy, 1.2 GB for 10k x 10k.
    """
    tensor = tensor.detach()
    rows = tensor.shape[-3] if tensor.dim() >= 3 else 1
    per_row = max(tensor.numel() // max(rows, 1), 1)
    slab = max(_FINITE_CHECK_ELEMENTS // per_row, 1)
    low = high = None
    for start in range(0, rows, slab):
        part = tensor[..., start : start + slab, :, :] if tensor.dim() >= 3 else tensor
        part_low, part_high = torch.aminmax(part)
        low = part_low if low is None else torch.minimum(low, part_low)
        high = part_high if high is None else torch.maximum(high, part_high)
    if not (torch.isfinite(low) and torch.isfinite(high)):
        raise BlendedInputError(
            f"the {what} contains NaN or infinite values; check the node that produced it "
            "(for example a failed decode or a division by zero upstream)"
        )
    return float(low), float(high)


def _clamp_if_needed(tensor: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Clamp to 0..1 only when something is out of range, so in-range inputs stay zero-copy views."""
    if low < 0.0 or high > 1.0:
        return tensor.clamp(0.0, 1.0)
    return tensor


def _refuse_empty_image(image: torch.Tensor, what: str = "image") -> None:
    if any(size == 0 for size in image.shape):
        raise BlendedInputError(
            f"the {what} has an empty dimension (shape {tuple(image.shape)}); feed at least one 1x1 image"
        )


def to_rgb_nchw(image_bhwc: torch.Tensor, what: str = "image") -> torch.Tensor:
    """Turn a ComfyUI IMAGE ``[B,H,W,C]`` (or one ``[H,W,C]`` image) into ``[B,3,H,W]`` float32 in 0..1.

    Grayscale is repeated to three channels and an alpha channel is dropped, because the diffusion model and
    CLIP only understand RGB. The result may share memory with the input; callers must not write into it.
    Out-of-range values (from upstream bicubic resizes, say) are clamped rather than rejected. ``what`` names the
    input in the errors (a node with two IMAGE inputs says which one is wrong).
    """
    if not isinstance(image_bhwc, torch.Tensor):
        raise BlendedInputError(
            f"the {what} must be a tensor, got {type(image_bhwc).__name__}; connect an IMAGE output to this input"
        )
    if image_bhwc.dim() == 3:
        image_bhwc = image_bhwc.unsqueeze(0)
    if image_bhwc.dim() != 4:
        raise BlendedInputError(
            f"the {what} has shape {tuple(image_bhwc.shape)}, expected [batch, height, width, channels]; "
            "connect a ComfyUI IMAGE"
        )
    _refuse_empty_image(image_bhwc, what)
    channels = image_bhwc.shape[-1]
    if channels not in (1, 3, 4):
        raise BlendedInputError(
            f"the {what} has {channels} channels, expected 1 (gray), 3 (RGB) or 4 (RGBA); "
            "convert it to RGB first"
        )
    if not image_bhwc.is_floating_point():
        raise BlendedInputError(
            f"the {what} has dtype {image_bhwc.dtype}, expected floats in 0..1 as ComfyUI IMAGEs are; "
            "convert it (divide 8-bit values by 255)"
        )
    image = image_bhwc.to(torch.float32)
    if channels == 4:
        image = image[..., :3]
    low, high = _require_finite(image, what)
    image = image.movedim(-1, 1)
    if channels == 1:
        image = image.expand(-1, 3, -1, -1)
    return _clamp_if_needed(image, low, high)


def to_comfy_image(image_nchw: torch.Tensor) -> torch.Tensor:
    """Turn ``[B,C,H,W]`` 0..1 back into a contiguous ComfyUI IMAGE ``[B,H,W,C]`` (clamped to 0..1)."""
    return image_nchw.clamp(0.0, 1.0).movedim(1, -1).contiguous()


def to_model_range(image_0_1: torch.Tensor) -> torch.Tensor:
    """Map 0..1 pixels to the [-1,1] range the guided-diffusion model was trained on."""
    return image_0_1 * 2.0 - 1.0


def from_model_range(image_m1_1: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """Map [-1,1] model output back to 0..1.

    Clamped by default, because pred_xstart is not clamped while sampling; ``clamp=False`` keeps values (and
    gradients) outside the range, as the guidance needs for what CLIP sees.
    """
    image_0_1 = (image_m1_1 + 1.0) * 0.5
    return image_0_1.clamp(0.0, 1.0) if clamp else image_0_1


def repeat_to_batch_size(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """Fit a tensor's batch to ``batch`` the way core ComfyUI does: keep the first ``batch`` if longer, tile if shorter.

    Matching core means a workflow that mixes our nodes with core mask nodes pairs the same masks with the
    same images.
    """
    current = tensor.shape[0]
    if current == batch:
        return tensor
    if current > batch:
        return tensor[:batch]
    repeats = -(-batch // current)
    return tensor.repeat((repeats,) + (1,) * (tensor.dim() - 1))[:batch]


def mask_as_b1hw(mask: torch.Tensor) -> torch.Tensor:
    """A ComfyUI MASK ``[H,W]`` or ``[B,H,W]`` (or an NCHW ``[B,1,H,W]``) as ``[B,1,H,W]``, a view."""
    if mask.dim() == 2:
        return mask.unsqueeze(0).unsqueeze(0)
    if mask.dim() == 3:
        return mask.unsqueeze(1)
    if mask.dim() == 4 and mask.shape[1] == 1:
        return mask
    raise BlendedInputError(
        f"the mask has shape {tuple(mask.shape)}, expected [height, width], [batch, height, width] or "
        "[batch, 1, height, width]; connect a ComfyUI MASK (use 'Convert Image to Mask' for an image)"
    )


def _resize_mask_axis(mask: torch.Tensor, size: int, axis: int) -> torch.Tensor:
    """One axis of a ``[B,1,H,W]`` mask to ``size``: antialiased bilinear when shrinking, nearest-exact when growing."""
    extent = mask.shape[axis]
    if extent == size:
        return mask
    target = (mask.shape[-2], size) if axis == -1 else (size, mask.shape[-1])
    if size > extent:
        return F.interpolate(mask, size=target, mode="nearest-exact")
    return antialiased_resize(mask, target, "bilinear").clamp(0.0, 1.0)


def antialiased_resize(tensor: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """``F.interpolate`` with antialiasing, right for a single column too.

    torch's antialiased kernels give wrong values when the rows of a one-column result are resized (torch 2.14
    on the CPU), so the columns are resized first, alone, and the one column then beside a copy of itself.
    """
    if size[1] == 1 and tensor.shape[-2] != size[0]:
        if tensor.shape[-1] != 1:
            tensor = F.interpolate(tensor, size=(tensor.shape[-2], 1), mode=mode, align_corners=False, antialias=True)
        pair = tensor.expand(*tensor.shape[:-1], 2)
        return F.interpolate(pair, size=(size[0], 2), mode=mode, align_corners=False, antialias=True)[..., :1]
    return F.interpolate(tensor, size=size, mode=mode, align_corners=False, antialias=True)


def mask_batch_size(mask: torch.Tensor) -> int:
    """Items in a MASK batch: ``[B,H,W]`` and ``[B,1,H,W]`` hold B, ``[H,W]`` one."""
    return mask.shape[0] if mask.dim() >= 3 else 1


def prepare_mask(
    mask: torch.Tensor | None,
    height: int,
    width: int,
    batch: int,
    invert: bool = False,
) -> torch.Tensor:
    """Bring any ComfyUI MASK to ``[batch,1,height,width]`` float32 in 0..1 (1 = edit).

    ``None`` means "edit everything", which is what the original does when run without ``--mask``.

    A mask of a different size is resized to the image one axis at a time. A shrinking axis uses antialiased
    bilinear, so a thin stroke leaves a faint trace instead of vanishing between samples, and soft values
    survive for compositing; the edit region widens by at most a pixel, since every value > 0 edits (the
    original's rule). A growing axis uses nearest-exact: bilinear would spread faint values half a mask pixel
    outward (8 image pixels at 16x) and edit all of them, and a 0/1 mask stays 0/1.
    The batch is fitted with core's ``repeat_to_batch_size`` rule. ``invert`` binarises (``> 0``) after
    resizing and then flips, like the original's ``--invert_mask`` (``255 - binarized``): the inverted mask
    edits exactly the pixels the plain one keeps, so a soft (feathered) edge is edited in one mode only. An
    all-zero mask is not rejected here: see ``check_mask_not_empty``.
    """
    if mask is not None:
        _check_mask_tensor(mask)  # before the sizes: a mask batch of 0 is the user's to fix, not ours
    if height <= 0 or width <= 0 or batch <= 0:
        raise ValueError(f"height, width and batch must be positive, got {height}, {width}, {batch}")
    if mask is None:
        return torch.full((batch, 1, height, width), 0.0 if invert else 1.0, dtype=torch.float32)
    prepared = mask_as_b1hw(mask)
    # 8-bit masks (from nodes that skip ComfyUI's float convention) are read as 8-bit images are: 255 = 1, so
    # grey levels keep their meaning for soft masks and CLIP Rank; other integers and bools are taken as they are.
    prepared = prepared.to(torch.float32) / 255.0 if prepared.dtype == torch.uint8 else prepared.to(torch.float32)
    low, high = _require_finite(prepared, "mask")
    prepared = _clamp_if_needed(prepared, low, high)
    if prepared.shape[-2:] != (height, width):
        logger.debug("resizing mask %s to %dx%d", tuple(prepared.shape[-2:]), height, width)
        prepared = _resize_mask_axis(_resize_mask_axis(prepared, width, -1), height, -2)
    prepared = repeat_to_batch_size(prepared, batch)
    if invert:
        prepared = _inverted(prepared)
    return prepared.contiguous()


def _check_mask_tensor(mask) -> None:
    """Refuse what is not a MASK at all: no tensor, or one with an empty dimension."""
    if not isinstance(mask, torch.Tensor):
        raise BlendedInputError(
            f"the mask must be a tensor, got {type(mask).__name__}; connect a ComfyUI MASK to this input"
        )
    if any(size == 0 for size in mask.shape):
        raise BlendedInputError(
            f"the mask has an empty dimension (shape {tuple(mask.shape)}); feed a mask of at least 1x1 pixel"
        )


def _inverted(mask: torch.Tensor) -> torch.Tensor:
    """invert_mask's rule: binarised (every value > 0 edits) and flipped, as the original's ``--invert_mask``."""
    return (mask <= 0).to(torch.float32)


def mask_for_images(images: torch.Tensor, mask: torch.Tensor | None, invert: bool = False) -> torch.Tensor:
    """A MASK (or ``None``) for NCHW ``images``: ``prepare_mask`` at their size, keeping the mask's own batch.

    ``None`` gives one full mask per image. Fitting the batches is left to the caller: ``match_batches`` for an
    edit, ``fit_batch`` for finished results.
    """
    batch = images.shape[0] if mask is None else mask_batch_size(mask)
    return prepare_mask(mask, images.shape[-2], images.shape[-1], batch, invert=invert)


def prepare_edit_masks(images: torch.Tensor, mask: torch.Tensor | None,
                       invert: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, masks)`` of an edit: the mask at the images' size, both fitted to one batch (``match_batches``)
    and refused where some item edits nothing (``check_mask_not_empty``). ``images`` are NCHW (``to_rgb_nchw``);
    ``mask`` a MASK or ``None`` (edit everything)."""
    image_batch = images.shape[0]
    images, masks = match_batches(images, mask_for_images(images, mask, invert=invert))
    empty = empty_mask_items(masks)
    if empty and mask is not None and tuple(mask.shape[-2:]) != tuple(masks.shape[-2:]):
        used = masks_in_use(mask, image_batch)
        if not empty_mask_items(_inverted(used) if invert else used):
            raise BlendedInputError(_vanished_message(mask, masks, empty, invert))
    check_mask_not_empty(masks, inverted=invert)
    return images, masks


def _vanished_message(mask: torch.Tensor, masks: torch.Tensor, empty: list[int], inverted: bool) -> str:
    """What to say when a mask that edits somewhere at its own size edits nothing once shrunk to the image's:
    ``check_mask_not_empty``'s words ("no black pixel") would be wrong about it."""
    sizes = (f"the {mask.shape[-1]}x{mask.shape[-2]} mask is shrunk to the image's "
             f"{masks.shape[-1]}x{masks.shape[-2]}")
    if inverted:
        message = ("the inverted mask is empty at the image's size: invert_mask edits where the mask is black (0), "
                   f"and its black area vanishes when {sizes} (a thin black area blurs into grey, which counts as "
                   "painted). Paint a wider black area, or give a mask at the image's size")
    else:
        message = (f"the mask is empty at the image's size: its painted area vanishes when {sizes}. Paint a larger "
                   "area with a brighter value, or give a mask at the image's size")
    return message if mask_batch_size(masks) == 1 else f"{message} (empty in batch item(s) {empty})"


def check_edit_mask(image: torch.Tensor, mask: torch.Tensor | None, invert: bool = False) -> None:
    """``prepare_edit_masks``' refusal of an empty mask, early and cheap: on the mask as given (not resized),
    for the items an edit of ``image`` (an IMAGE ``[B,H,W,C]`` or ``[H,W,C]``) uses, before any model is loaded.
    A mask that only empties once resized to the image (a few kept pixels of a larger inverted mask) is refused
    later, by ``prepare_edit_masks``."""
    if isinstance(image, torch.Tensor):
        _refuse_empty_image(image)
    if mask is None:
        return
    _check_mask_tensor(mask)
    if mask.is_floating_point():
        _require_finite(mask, "mask")  # NaN is neither > 0 nor <= 0: it would read as "empty"
    image_batch = image.shape[0] if image.dim() == 4 else 1
    warn_of_unused_masks(image_batch, mask)
    used = masks_in_use(mask, image_batch)
    check_mask_not_empty(_inverted(used) if invert else used, inverted=invert)


def check_mask_not_empty(mask: torch.Tensor, inverted: bool = False) -> None:
    """Raise when some batch item of a mask edits nothing (no value > 0).

    Kept separate from ``prepare_mask`` so that callers decide: the sampler must refuse, because ComfyUI's
    LoadImage gives an all-zero 64x64 mask when the image has no painted region, and silently returning the
    input would look like a broken node; a preview node may just want to show the mask. ``inverted``: the mask
    was flipped by invert_mask, so the advice is about that switch.
    """
    empty = empty_mask_items(mask)
    if not empty:
        return
    message = EMPTY_INVERTED_MASK_MESSAGE if inverted else EMPTY_MASK_MESSAGE
    if mask_batch_size(mask) == 1:
        raise BlendedInputError(message)
    raise BlendedInputError(f"{message} (empty in batch item(s) {empty})")


def empty_mask_items(mask: torch.Tensor) -> list[int]:
    """The batch items of a mask ([B,H,W] or [B,1,H,W]; [H,W] is one item) with no value > 0, read in one go."""
    flat = mask.reshape(mask_batch_size(mask), -1)
    return [index for index, has_edit in enumerate((flat > 0).any(dim=1).tolist()) if not has_edit]


def warn_of_unused_masks(image_batch: int, mask: torch.Tensor, images: str = "images",
                         advice: str = "give one image with several masks to edit it in several places") -> None:
    """Core's rule drops the masks beyond the image batch (``masks_in_use``); a mask painted for nothing should
    not vanish without a word. Called once a run, where the inputs are first checked."""
    unused = mask_batch_size(mask) - image_batch
    if image_batch > 1 and unused > 0:
        logger.warning("Blended Diffusion: %d masks for %d %s: the last %d mask(s) are not used (the %s decide; "
                       "%s)", mask_batch_size(mask), image_batch, images, unused, images, advice)


def masks_in_use(mask: torch.Tensor, image_batch: int) -> torch.Tensor:
    """The items of a MASK batch that an edit of ``image_batch`` images uses (``match_batches``' rule): all of
    them for one image or a shorter mask batch, else the first ``image_batch``."""
    if mask.dim() < 3 or image_batch == 1:
        return mask
    return mask[:image_batch]


def fit_batch(tensor: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """Give ``tensor`` (leading batch dim) ``batch`` items: as is, or each item repeated for a contiguous group.

    The sampler outputs its results input by input (all results of input 0, then of input 1, ...), so one
    input image or mask per group of results pairs each result with the input it came from.
    """
    group = results_per_item(tensor.shape[0], batch, what)
    return tensor if group == 1 else tensor.repeat_interleave(group, dim=0)


def results_per_item(count: int, batch: int, what: str, of: str = "results") -> int:
    """How many consecutive results of ``batch`` each of ``count`` items (``what``: input images, masks) serves,
    as :func:`fit_batch` pairs them: result ``i`` goes with item ``i // results_per_item(...)``. ``of`` names
    the batch in the message as the node's input calls it (CLIP Rank ranks ``images``)."""
    if count == 0 or batch % count:
        one = of[:-1] if of.endswith("s") else of
        raise BlendedInputError(f"{what} has a batch of {count} but there are {batch} {of}: give one {what}, "
                                f"one per {one}, or one per group of {of} ({batch} must be a multiple of {count})")
    return batch // count


def match_batches(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(image, mask)`` (both NCHW) fitted to one common batch.

    The image batch decides, as in core (the latent/destination batch sets the output batch and the mask is
    fitted with ``repeat_to_batch_size``). One exception: a single image with several masks is repeated, so
    one picture can be edited in several places in one run instead of silently dropping masks.
    """
    image_batch = image.shape[0]
    mask = masks_in_use(mask, image_batch)
    if image_batch == 1 and mask.shape[0] > 1:
        return image.expand(mask.shape[0], *image.shape[1:]), mask
    return image, repeat_to_batch_size(mask, image_batch)
