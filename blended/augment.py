"""CLIP views of the guided image: the original's ``ImageAugmentations`` (``utils/augmentations.py``).

Guiding CLIP with several randomly warped copies, rather than one, keeps the sampler from finding
adversarial pixel patterns that satisfy CLIP without looking like the prompt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from .errors import BlendedInputError

log = logging.getLogger(__name__)

_PADDING_MODES = ("border", "zeros", "reflection")


@dataclass
class AugmentationSettings:
    """How the CLIP views are made. Defaults reproduce the original (``aug_num=8``).

    num_views: copies CLIP sees per sample; the first is always the clean pooled image, the others are
        warped. 1 means only the clean view (deterministic, as in the reference fixtures).
    degrees: maximum rotation of a warped view, in degrees (uniform in [-degrees, degrees]).
    translate: maximum shift as a fraction of the image size.
    p_affine: probability that a warped view gets the rotation/shift.
    distortion: kornia's perspective ``distortion_scale`` (0..1): how far each corner may move inward.
    p_perspective: probability that a warped view gets the perspective warp.
    padding_mode: how the rotation/shift fills uncovered pixels ("border", as the original, "zeros" or
        "reflection"). The perspective warp always pads with zeros (grey once mapped to [0,1]).
    fix_translate: False reproduces the original's kornia quirk, where a scalar ``translate`` shifts only
        vertically; True shifts in both axes (what the paper evidently intended).
    """

    num_views: int = 8
    degrees: float = 15.0
    translate: float = 0.1
    p_affine: float = 0.7
    distortion: float = 0.7
    p_perspective: float = 0.7
    padding_mode: str = "border"
    fix_translate: bool = False

    def validate(self) -> None:
        """Refuse settings kornia would reject later with a less helpful message."""
        if int(self.num_views) != self.num_views or self.num_views < 1:
            raise BlendedInputError(f"num_views must be a whole number >= 1, got {self.num_views}.")
        for name in ("translate", "p_affine", "distortion", "p_perspective"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise BlendedInputError(f"{name} must be between 0 and 1, got {value}.")
        if self.degrees < 0:
            raise BlendedInputError(f"degrees must be >= 0, got {self.degrees}.")
        if self.padding_mode not in _PADDING_MODES:
            raise BlendedInputError(
                f"padding_mode must be one of {', '.join(_PADDING_MODES)}, got {self.padding_mode!r}.")

    def translate_range(self) -> tuple[float, float]:
        """kornia's (horizontal, vertical) translate fractions.

        kornia (checked in 0.6.3 and 0.9.0) expands the original's scalar 0.1 to [-0.1, 0.1], clamps it to
        [0, 0.1] and reads element 0 as the horizontal and element 1 as the vertical bound, so the original
        never shifts horizontally. The explicit tuple gives the same sampling on any kornia version.
        """
        if self.fix_translate:
            return (float(self.translate), float(self.translate))
        return (0.0, float(self.translate))


class ImageAugmentations(nn.Module):
    """[B,3,H,W] in [-1,1] -> [B*num_views,3,S,S] in the original's order [I1..IB, I1..IB, ...].

    The first B views are the clean average-pooled images; the rest are warped. Random parameters come from
    torch's global RNG, so the caller controls reproducibility by seeding or forking it.
    """

    def __init__(self, output_size: int, settings: AugmentationSettings | None = None):
        super().__init__()
        self.settings = settings if settings is not None else AugmentationSettings()
        self.settings.validate()
        self.output_size = int(output_size)
        self.pool = nn.AdaptiveAvgPool2d((self.output_size, self.output_size))
        self.warp = self._build_warp() if self.settings.num_views > 1 else None

    def _build_warp(self) -> nn.Module:
        import kornia.augmentation as K  # imported here: kornia is slow to import and only needed for views

        s = self.settings
        return nn.Sequential(
            K.RandomAffine(degrees=s.degrees, translate=s.translate_range(), p=s.p_affine,
                           padding_mode=s.padding_mode),
            K.RandomPerspective(distortion_scale=s.distortion, p=s.p_perspective),
        )

    @property
    def num_views(self) -> int:
        return int(self.settings.num_views)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise BlendedInputError(f"expected images [B,C,H,W], got shape {tuple(x.shape)}.")
        pooled = self.pool(x)
        if self.warp is None:
            return pooled
        batch = pooled.shape[0]
        tiled = torch.tile(pooled, (self.num_views, 1, 1, 1))
        warped = self.warp(tiled[batch:])
        return torch.cat([tiled[:batch], warped], dim=0)
