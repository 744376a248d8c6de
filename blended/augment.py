"""CLIP views of the guided image: the original's ``ImageAugmentations`` (``utils/augmentations.py``).

Guiding CLIP with several randomly warped copies, rather than one, keeps the sampler from finding
adversarial pixel patterns that satisfy CLIP without looking like the prompt.

The original runs kornia's ``RandomAffine`` then ``RandomPerspective`` on its batch. Here the random
parameters are drawn by this module, from the same distributions and in the same order as kornia 0.9 draws
them, but from explicit ``torch.Generator`` streams (one per result when the sampler asks), and all views of
all results are then warped together, one batched kornia.geometry call per warp. That keeps a result
independent of its batch, leaves torch's global RNG alone, and makes the step's cost independent of the
number of results (the per-result kornia pipelines were most of the step's host work on a GPU).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from .devices import to_device
from .errors import BlendedInputError

log = logging.getLogger(__name__)

_PADDING_MODES = ("border", "zeros", "reflection")

# Corner directions of kornia's "basic" perspective sampling: each corner moves inward by up to
# distortion * size / 2 along both axes.
_CORNER_DIRECTIONS = ((1.0, 1.0), (-1.0, 1.0), (-1.0, -1.0), (1.0, -1.0))


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
    single_resample: False (the original) resamples twice, the rotation/shift then the perspective. True
        composes both into one homography and resamples once: the same geometry and padding, less blur,
        and one warp fewer per step. Changes the numbers slightly, so it is off by default.
    """

    num_views: int = 8
    degrees: float = 15.0
    translate: float = 0.1
    p_affine: float = 0.7
    distortion: float = 0.7
    p_perspective: float = 0.7
    padding_mode: str = "border"
    fix_translate: bool = False
    single_resample: bool = False

    def validate(self) -> None:
        """Refuse settings kornia would reject later with a less helpful message."""
        if int(self.num_views) != self.num_views or self.num_views < 1:
            raise BlendedInputError(f"num_views must be a whole number >= 1, got {self.num_views}.")
        for name in ("translate", "p_affine", "distortion", "p_perspective"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise BlendedInputError(f"{name} must be between 0 and 1, got {value}.")
        if not 0 <= self.degrees <= 360:
            raise BlendedInputError(f"degrees must be between 0 and 360, got {self.degrees}.")
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


def _gated(p: float) -> bool:
    """kornia draws a per-view coin only when the probability is strictly between 0 and 1."""
    return 0.0 < p < 1.0


def _draws_per_view(settings: AugmentationSettings) -> int:
    return int(_gated(settings.p_affine)) + 3 + int(_gated(settings.p_perspective)) + 8


def _uniform(low: float, high: float, u: torch.Tensor) -> torch.Tensor:
    """``torch.distributions.Uniform(low, high).rsample`` given its U[0,1) draw, in the same float32 ops."""
    low_t, high_t = torch.tensor(low, dtype=torch.float32), torch.tensor(high, dtype=torch.float32)
    return low_t + u * (high_t - low_t)


def _gate(p: float, u: Optional[torch.Tensor], shape) -> torch.Tensor:
    if u is None:
        return torch.full(shape, 1.0 if p >= 1.0 else 0.0)
    return (u < p).float()


def sample_view_params(settings: AugmentationSettings, size: int, views: int,
                       generators: Sequence[Optional[torch.Generator]]) -> dict:
    """kornia-format parameters of ``views`` warped views per stream, [S*views] stream-major, on the CPU.

    Each stream makes one ``torch.rand`` call and slices it the way kornia 0.9 consumes its global RNG
    (affine coin, angle, x shift, y shift, perspective coin, corner offsets; a coin only when 0 < p < 1),
    so a generator seeded like the global RNG gives kornia's very parameters. ``None`` draws from torch's
    global RNG, as kornia does.
    """
    s = settings
    per_view = _draws_per_view(s)
    u = torch.stack([torch.rand(views * per_view, generator=g) for g in generators])  # [S, views*per_view]
    cursor = 0

    def take(count: int) -> torch.Tensor:
        nonlocal cursor
        part = u[:, cursor * views:(cursor + count) * views]
        cursor += count
        return part.reshape(len(generators) * views, *((count,) if count > 1 else ()))

    n = len(generators) * views
    affine_u = take(1) if _gated(s.p_affine) else None
    angle = _uniform(-s.degrees, s.degrees, take(1))
    tx_max, ty_max = s.translate_range()
    tx = _uniform(-tx_max, tx_max, take(1)) * size
    ty = _uniform(-ty_max, ty_max, take(1)) * size
    perspective_u = take(1) if _gated(s.p_perspective) else None
    corner_u = take(8).view(n, 4, 2)

    last = float(size - 1)
    start = torch.tensor([[[0.0, 0.0], [last, 0.0], [last, last], [0.0, last]]]).expand(n, -1, -1)
    reach = torch.tensor(s.distortion, dtype=torch.float32) * size / 2
    factor = torch.stack([reach, reach]).view(-1, 1, 2)
    end = start + factor * corner_u * torch.tensor([_CORNER_DIRECTIONS])
    center = (torch.tensor([size, size], dtype=torch.float32).view(1, 2) / 2.0 - 0.5).expand(n, -1)
    return {
        "affine": {"translations": torch.stack([tx, ty], dim=-1), "center": center,
                   "scale": torch.ones(n, 2), "angle": angle, "shear_x": torch.zeros(n),
                   "shear_y": torch.zeros(n), "batch_prob": _gate(s.p_affine, affine_u, (n,))},
        "perspective": {"start_points": start, "end_points": end,
                        "batch_prob": _gate(s.p_perspective, perspective_u, (n,))},
    }


def interleave_streams(params: dict, streams: int) -> dict:
    """Reorder stream-major parameters [S*V] to the original's view-major order [V*S] (I1..IS, I1..IS...)."""
    def reorder(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(streams, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)

    return {warp: {k: reorder(v) for k, v in group.items()} for warp, group in params.items()}


def view_matrices(params: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(affine [N,3,3], perspective [N,3,3], apply_affine [N], apply_perspective [N]) from kornia params.

    Built with kornia's own matrix functions, on the CPU (small 3x3 algebra; the perspective solve would
    wait for the GPU there). A view that skips a warp gets the identity for it.
    """
    from kornia.geometry.transform import get_affine_matrix2d, get_perspective_transform

    a, p = params["affine"], params["perspective"]
    deg2rad = math.pi / 180.0
    affine = get_affine_matrix2d(a["translations"], a["center"], a["scale"], a["angle"],
                                 a["shear_x"] * deg2rad, a["shear_y"] * deg2rad)
    perspective = get_perspective_transform(p["start_points"], p["end_points"])
    apply_affine, apply_perspective = a["batch_prob"] > 0.5, p["batch_prob"] > 0.5
    eye = torch.eye(3).expand_as(affine)
    affine = torch.where(apply_affine.view(-1, 1, 1), affine, eye)
    perspective = torch.where(apply_perspective.view(-1, 1, 1), perspective, eye)
    return affine, perspective, apply_affine, apply_perspective


class ImageAugmentations(nn.Module):
    """[B,3,H,W] in [-1,1] -> [B*num_views,3,S,S] in the original's order [I1..IB, I1..IB, ...].

    The first B views are the clean average-pooled images; the rest are warped. ``generators`` gives each
    sample its own random stream (a sample's views then do not depend on the rest of the batch); without it
    the batch draws from torch's global RNG, as kornia does.
    """

    def __init__(self, output_size: int, settings: AugmentationSettings | None = None):
        super().__init__()
        self.settings = settings if settings is not None else AugmentationSettings()
        self.settings.validate()
        self.output_size = int(output_size)
        self.pool = nn.AdaptiveAvgPool2d((self.output_size, self.output_size))

    @property
    def num_views(self) -> int:
        return int(self.settings.num_views)

    def sample(self, batch: int, generators: Sequence[torch.Generator] | None = None) -> dict:
        """kornia-format parameters of the batch's warped views, view-major [(V-1)*B], on the CPU."""
        warped = self.num_views - 1
        if generators is None:
            return sample_view_params(self.settings, self.output_size, warped * batch, [None])
        if len(generators) != batch:
            raise ValueError(f"{len(generators)} generators for a batch of {batch}")
        params = sample_view_params(self.settings, self.output_size, warped, generators)
        return interleave_streams(params, batch)

    def forward(self, x: torch.Tensor, generators: Sequence[torch.Generator] | None = None,
                params: dict | None = None) -> torch.Tensor:
        if x.dim() != 4:
            raise BlendedInputError(f"expected images [B,C,H,W], got shape {tuple(x.shape)}.")
        pooled = self.pool(x)
        if self.num_views == 1:
            return pooled
        batch = pooled.shape[0]
        if params is None:
            params = self.sample(batch, generators)
        tiled = pooled.repeat(self.num_views - 1, 1, 1, 1)
        return torch.cat([pooled, self.warp(tiled, params)], dim=0)

    def warp(self, images: torch.Tensor, params: dict) -> torch.Tensor:
        """Warp [N,C,S,S] by the N views' parameters: one batched kornia.geometry call per warp."""
        from kornia.geometry.transform import warp_affine, warp_perspective

        n = images.shape[0]
        affine, perspective, apply_affine, apply_perspective = view_matrices(params)
        # One host-to-device copy for all of the step's warp parameters.
        packed = torch.cat([affine.reshape(n, 9), perspective.reshape(n, 9),
                            apply_affine.float().view(n, 1), apply_perspective.float().view(n, 1)], dim=1)
        packed = to_device(packed, images.device, images.dtype)
        affine, perspective = packed[:, :9].view(n, 3, 3), packed[:, 9:18].view(n, 3, 3)
        gate_affine = (packed[:, 18] > 0.5).view(n, 1, 1, 1)
        gate_perspective = (packed[:, 19] > 0.5).view(n, 1, 1, 1)
        size = tuple(images.shape[-2:])
        padding = self.settings.padding_mode
        if self.settings.single_resample:
            out = warp_perspective(images, perspective @ affine, size, mode="bilinear", padding_mode=padding,
                                   align_corners=False)
            if padding != "zeros":
                # What the perspective warp would have padded with zeros is zero here too.
                inside = warp_perspective(torch.ones_like(images[:, :1]), perspective, size, mode="bilinear",
                                          padding_mode="zeros", align_corners=False)
                out = out * torch.where(gate_perspective, inside, torch.ones_like(inside))
            return torch.where(gate_affine | gate_perspective, out, images)
        # The original's two resamplings: rotation/shift with its padding, then perspective with zeros.
        out = warp_affine(images, affine[:, :2, :], size, mode="bilinear", padding_mode=padding,
                          align_corners=False)
        out = torch.where(gate_affine, out, images)
        warped = warp_perspective(out, perspective, size, mode="bilinear", padding_mode="zeros",
                                  align_corners=False)
        return torch.where(gate_perspective, warped, out)
