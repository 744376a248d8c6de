"""CLIP views of the guided image: the original's ``ImageAugmentations`` (``utils/augmentations.py``).

Guiding CLIP with several randomly warped copies, rather than one, keeps the sampler from finding
adversarial pixel patterns that satisfy CLIP without looking like the prompt.

The original runs kornia's ``RandomAffine`` then ``RandomPerspective`` on its batch. Here the random
parameters are drawn by this module, from the same distributions and in the same order as kornia 0.9 draws
them, but from explicit ``torch.Generator`` streams (one per result when the sampler asks), and all views of
all results are then warped together, one resampling per warp (:mod:`blended.view_warps`, kornia 0.9's
geometry). That keeps a result independent of its batch, leaves torch's global RNG alone, and makes the step's
cost independent of the number of results (the per-result kornia pipelines were most of the step's host work
on a GPU).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import view_warps
from .devices import to_device
from .errors import BlendedInputError

log = logging.getLogger(__name__)

_PADDING_MODES = ("border", "zeros", "reflection")
# Views per sample beyond any use (the original takes 8, the paper 16, the node's widget stops at 64): each is a CLIP
# forward and backward pass in every step, so a linked 100000 would run for hours or fail to allocate its draws.
MAX_VIEWS = 1024

# Corner directions of kornia's "basic" perspective sampling: each corner moves inward by up to
# distortion * size / 2 along both axes.
_CORNER_DIRECTIONS = np.array([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]], dtype=np.float32)


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
        if self.num_views > MAX_VIEWS:
            raise BlendedInputError(f"num_views must be at most {MAX_VIEWS}, got {self.num_views}: every view is a "
                                    "CLIP pass in every step (the original uses 8, the paper 16).")
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


def _uniform(low: float, high: float, u: np.ndarray) -> np.ndarray:
    """``torch.distributions.Uniform(low, high).rsample`` given its U[0,1) draw, in the same float32 operations."""
    low32, high32 = np.float32(low), np.float32(high)
    return low32 + u * (high32 - low32)


def _gate(p: float, u: Optional[np.ndarray], n: int) -> np.ndarray:
    if u is None:
        return np.full(n, 1.0 if p >= 1.0 else 0.0, dtype=np.float32)
    return (u < np.float32(p)).astype(np.float32)


def draw_view_params(settings: AugmentationSettings, size: int, views: int,
                     generators: Sequence[Optional[torch.Generator]]) -> dict:
    """The parameters of ``views`` warped views per stream, [S*views] stream-major: float32 numpy arrays.

    Each stream makes one ``torch.rand`` call and slices it the way kornia 0.9 consumes its global RNG
    (affine coin, angle, x shift, y shift, perspective coin, corner offsets; a coin only when 0 < p < 1),
    so a generator seeded like the global RNG gives kornia's very parameters. ``None`` draws from torch's
    global RNG, as kornia does. The arithmetic after the draws is kornia's, in float32, on host arrays: a
    step's few hundred tiny values are not worth a tensor op each.
    """
    s = settings
    per_view = _draws_per_view(s)
    u = np.stack([torch.rand(views * per_view, generator=g).numpy() for g in generators])  # [S, views*per_view]
    cursor = 0

    def take(count: int) -> np.ndarray:
        nonlocal cursor
        part = u[:, cursor * views:(cursor + count) * views]
        cursor += count
        return part.reshape(len(generators) * views, *((count,) if count > 1 else ()))

    n = len(generators) * views
    size32 = np.float32(size)
    affine_u = take(1) if _gated(s.p_affine) else None
    angle = _uniform(-s.degrees, s.degrees, take(1))
    tx_max, ty_max = s.translate_range()
    tx = _uniform(-tx_max, tx_max, take(1)) * size32
    ty = _uniform(-ty_max, ty_max, take(1)) * size32
    perspective_u = take(1) if _gated(s.p_perspective) else None
    corner_u = take(8).reshape(n, 4, 2)

    last = np.float32(size - 1)
    start = np.array([[0.0, 0.0], [last, 0.0], [last, last], [0.0, last]], dtype=np.float32)
    reach = np.float32(s.distortion) * size32 / np.float32(2)
    end = start + np.array([reach, reach], dtype=np.float32).reshape(1, 1, 2) * corner_u * _CORNER_DIRECTIONS
    return {"angle": angle, "translations": np.stack([tx, ty], axis=-1),
            "center": np.full((n, 2), size32 / np.float32(2) - np.float32(0.5), dtype=np.float32),
            "apply_affine": _gate(s.p_affine, affine_u, n),
            "start_points": np.repeat(start[None], n, axis=0), "end_points": end,
            "apply_perspective": _gate(s.p_perspective, perspective_u, n)}


def interleave_streams(params: dict, streams: int) -> dict:
    """Reorder stream-major parameters [S*V] to the original's view-major order [V*S] (I1..IS, I1..IS...)."""
    def reorder(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a.reshape(streams, -1, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape))

    return {key: reorder(value) for key, value in params.items()}


def kornia_params(params: dict) -> dict:
    """The parameters as kornia's RandomAffine and RandomPerspective take them (``params=``): CPU tensors."""
    n = params["angle"].shape[0]
    t = {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in params.items()}
    return {
        "affine": {"translations": t["translations"], "center": t["center"], "scale": torch.ones(n, 2),
                   "angle": t["angle"], "shear_x": torch.zeros(n), "shear_y": torch.zeros(n),
                   "batch_prob": t["apply_affine"]},
        "perspective": {"start_points": t["start_points"], "end_points": t["end_points"],
                        "batch_prob": t["apply_perspective"]},
    }


def _from_kornia_params(params: dict) -> dict:
    a, p = params["affine"], params["perspective"]
    host = {"angle": a["angle"], "translations": a["translations"], "center": a["center"],
            "apply_affine": a["batch_prob"], "start_points": p["start_points"], "end_points": p["end_points"],
            "apply_perspective": p["batch_prob"]}
    return {key: value.detach().cpu().numpy() for key, value in host.items()}


# Devices whose adaptive average pooling needs the input size to be a multiple of the output's (Apple's MPS:
# 256 -> 224 is refused there).
POOL_BY_MATMUL = ("mps",)


class AveragePool(nn.Module):
    """``nn.AdaptiveAvgPool2d`` to ``size`` x ``size``, or the same averages as two matrix products on devices
    whose pooling cannot take every size (:data:`POOL_BY_MATMUL`)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = int(size)
        self._weights: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type not in POOL_BY_MATMUL:
            return F.adaptive_avg_pool2d(x, (self.size, self.size))
        rows = self._averaging(x.shape[-2], x.device, x.dtype)
        columns = self._averaging(x.shape[-1], x.device, x.dtype)
        return rows @ x @ columns.T

    def _averaging(self, extent: int, device, dtype) -> torch.Tensor:
        """[size, extent]: row i averages adaptive pooling's bin i, [floor(i*n/s), ceil((i+1)*n/s))."""
        key = (extent, device, dtype)
        if key not in self._weights:
            weights = torch.zeros(self.size, extent, dtype=torch.float64)
            for i in range(self.size):
                start, stop = (i * extent) // self.size, -(-((i + 1) * extent) // self.size)
                weights[i, start:stop] = 1.0 / (stop - start)
            self._weights[key] = weights.to(dtype).to(device)
        return self._weights[key]


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
        self.pool = AveragePool(self.output_size)
        self._grid_base_cache: tuple = (None, None)  # the output pixels' positions, kept per size/device/dtype

    @property
    def num_views(self) -> int:
        return int(self.settings.num_views)

    def sample(self, batch: int, generators: Sequence[torch.Generator] | None = None) -> dict:
        """kornia-format parameters of the batch's warped views, view-major [(V-1)*B], as CPU tensors."""
        return kornia_params(self._draw(batch, generators))

    def _draw(self, batch: int, generators: Sequence[torch.Generator] | None) -> dict:
        warped = self.num_views - 1
        if generators is None:
            return draw_view_params(self.settings, self.output_size, warped * batch, [None])
        if len(generators) != batch:
            raise ValueError(f"{len(generators)} generators for a batch of {batch}")
        return interleave_streams(draw_view_params(self.settings, self.output_size, warped, generators), batch)

    def forward(self, x: torch.Tensor, generators: Sequence[torch.Generator] | None = None,
                params: dict | None = None) -> torch.Tensor:
        """``params`` (kornia's format, as :meth:`sample` gives) replaces the draws."""
        if x.dim() != 4:
            raise BlendedInputError(f"expected images [B,C,H,W], got shape {tuple(x.shape)}.")
        pooled = self.pool(x)
        if self.num_views == 1:
            return pooled
        batch = pooled.shape[0]
        host = self._draw(batch, generators) if params is None else _from_kornia_params(params)
        tiled = pooled.repeat(self.num_views - 1, 1, 1, 1)
        return torch.cat([pooled, self.warp(tiled, host)], dim=0)

    def warp(self, images: torch.Tensor, params: dict) -> torch.Tensor:
        """Warp [N,C,H,W] by the N views' parameters (:func:`draw_view_params`' host arrays): one matmul makes the
        sampling grids, then one resampling per warp."""
        n, _, height, width = images.shape
        inverses, gates = view_warps.inverse_view_matrices(params, self.settings.single_resample)
        matrices = view_warps.sampling_matrices(inverses, height, width)  # [2n,3,3]
        # One host-to-device copy for all of the step's warp parameters. Warps run in float32 at least (as
        # kornia's): grid positions in bf16 would be off by up to a pixel.
        dtype = torch.promote_types(images.dtype, torch.float32)
        host_dtype = np.float64 if dtype == torch.float64 else np.float32
        packed = np.concatenate([matrices.reshape(-1), gates]).astype(host_dtype)
        packed = to_device(torch.from_numpy(packed), images.device)
        base = self._grid_base(height, width, images.device, dtype)
        grids = view_warps.sampling_grids(packed[:18 * n].view(2 * n, 3, 3), base, height, width)
        first, second = grids[:n], grids[n:]
        gate_affine = (packed[18 * n:19 * n] > 0.5).view(n, 1, 1, 1)
        gate_perspective = (packed[19 * n:] > 0.5).view(n, 1, 1, 1)
        return self._resample(images.to(dtype), first, second, gate_affine, gate_perspective).to(images.dtype)

    def _resample(self, images, first, second, gate_affine, gate_perspective) -> torch.Tensor:
        padding = self.settings.padding_mode
        if self.settings.single_resample:
            out = view_warps.resample(images, first, padding)
            if padding != "zeros":
                # What the perspective warp would have padded with zeros is zero here too.
                inside = view_warps.resample(torch.ones_like(images[:, :1]), second, "zeros")
                out = out * torch.where(gate_perspective, inside, torch.ones_like(inside))
            return torch.where(gate_affine | gate_perspective, out, images)
        # The original's two resamplings: rotation/shift with its padding, then perspective with zeros.
        out = torch.where(gate_affine, view_warps.resample(images, first, padding), images)
        return torch.where(gate_perspective, view_warps.resample(out, second, "zeros"), out)

    def _grid_base(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (height, width, device, dtype)
        if self._grid_base_cache[0] != key:
            self._grid_base_cache = (key, view_warps.grid_base(height, width, device, dtype))
        return self._grid_base_cache[1]
