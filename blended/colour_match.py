"""Colour match at paste-back: remove the colour shift that makes an edit's border visible.

The diffusion model's prediction of the edited region can come out slightly tinted or brighter than the photo
around it (the most common complaint about inpainting seams). Pasted back with a hard mask, that shift shows
as an outline. Matching the per-channel mean and standard deviation of the edit's *border ring* (the pixels just
inside the mask) to the original's pixels in the same ring shifts the whole edit so that its border agrees
with what was there, while the edit's own content (relative colours, texture) is kept.

The correction is one affine map per channel and image: ``x' = (x - mean_edit) * gain + mean_original`` with
``gain = std_original / std_edit`` clamped to [1/MAX_GAIN, MAX_GAIN], so a flat original ring cannot wipe out
the edit's contrast. It works in plain RGB or in CIE Lab (kornia's conversion); the README reports which
measured better.
"""

from __future__ import annotations

import torch

from . import mask_morphology
from .errors import BlendedInputError

SPACES = ("off", "rgb", "lab")
MAX_GAIN = 2.0


def ring_width_for(size: int) -> int:
    """Default ring width at model resolution: 4 pixels at 256 (the ring must hold enough pixels to average)."""
    return max(2, int(size) // 64)


def inner_ring(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Bool [B,1,H,W]: the mask's pixels within ``width`` of its border (the whole mask if it is thinner)."""
    edited = mask > 0
    ring = edited & ~(mask_morphology.grow_mask(edited.float(), -int(width)) > 0)
    return ring if bool(ring.any()) else edited


def _stats(pixels: torch.Tensor, ring: torch.Tensor):
    weight = ring.float()
    count = weight.sum(dim=(2, 3)).clamp(min=1)
    mean = (pixels * weight).sum(dim=(2, 3)) / count
    var = (((pixels - mean[..., None, None]) ** 2) * weight).sum(dim=(2, 3)) / count
    return mean, var.sqrt()


def _to_space(images: torch.Tensor, space: str) -> torch.Tensor:
    if space == "lab":
        import kornia

        return kornia.color.rgb_to_lab(images.clamp(0, 1))
    return images


def _from_space(images: torch.Tensor, space: str) -> torch.Tensor:
    if space == "lab":
        import kornia

        return kornia.color.lab_to_rgb(images, clip=True)
    return images


def match_border(edited: torch.Tensor, original: torch.Tensor, mask: torch.Tensor, space: str = "rgb",
                 width: int | None = None) -> torch.Tensor:
    """``edited`` [B,3,H,W] 0..1 with its border-ring colour statistics matched to ``original``'s [1|B,3,H,W].

    ``mask`` [1|B,1,H,W] (> 0 = edited). Returns a new tensor in 0..1; ``space="off"`` returns ``edited``.
    """
    if space not in SPACES:
        raise BlendedInputError(f"unknown colour match {space!r}: use one of {', '.join(SPACES)}")
    if space == "off":
        return edited
    width = ring_width_for(edited.shape[-1]) if width is None else int(width)
    ring = inner_ring(mask, width).expand(edited.shape[0], -1, -1, -1)
    source = _to_space(edited.float(), space)
    target = _to_space(original.float(), space).expand_as(source)
    mean_s, std_s = _stats(source, ring)
    mean_t, std_t = _stats(target, ring)
    gain = (std_t / std_s.clamp(min=1e-6)).clamp(1 / MAX_GAIN, MAX_GAIN)
    matched = (source - mean_s[..., None, None]) * gain[..., None, None] + mean_t[..., None, None]
    return _from_space(matched, space).clamp(0, 1)
