"""The warps of the CLIP views: matrices from the sampled parameters, then one resampling per warp for all views.

Why not kornia.geometry's ``warp_affine``/``warp_perspective``: each call builds its grid from dozens of small
tensor ops (normalisation matrices, closed-form inverses, a base grid, the projective map), and with the matrix
building they were a third of the guided step's aten ops at batch 1 (1,706 of 5,285 with 8 views, counted on
the CPU); on a GPU each is host time or a kernel launch. Here the 3x3 algebra of all views is a few batched
float64 numpy operations on the host, the result crosses to the device in one copy, one matmul makes the
sampling grids of every warp, and each warp is one ``grid_sample``. A second gain: the views no longer depend on
the installed kornia, whose releases normalise coordinates differently (before 0.9 the matrices were normalised
corner-aligned while resampling used pixel centres, a sub-pixel scale and shift).

Conventions are kornia 0.9's, which the tests hold these warps to (its RandomAffine and RandomPerspective):
a pixel matrix maps a source pixel ``(x, y, 1)`` to its destination; resampling is bilinear with
``align_corners=False``, so normalised coordinates put pixel centres at ``(2x + 1) / W - 1``; an output pixel
samples the source at the inverse map of its own position.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["inverse_view_matrices", "inverse_rotation_shift_matrices", "perspective_matrices",
           "sampling_matrices", "grid_base", "sampling_grids", "resample"]



def inverse_rotation_shift_matrices(angle: np.ndarray, center: np.ndarray, translations: np.ndarray) -> np.ndarray:
    """[n,3,3] float64 inverses of the pixel matrices "rotate by ``angle`` degrees about ``center``, then shift".

    The forward matrix is kornia's ``get_affine_matrix2d`` at scale 1 and no shear (what the views' sampler
    draws): OpenCV's ``getRotationMatrix2D`` of ``-angle`` (with y pointing down, a positive angle turns
    clockwise) followed by the shift. Its inverse is closed-form: undo the shift, rotate back about the centre.
    """
    radians = -np.asarray(angle, dtype=np.float64) * (math.pi / 180.0)
    cos, sin = np.cos(radians), np.sin(radians)
    cx, cy = np.moveaxis(np.asarray(center, dtype=np.float64), -1, 0)
    tx, ty = np.moveaxis(np.asarray(translations, dtype=np.float64), -1, 0)
    # p = R (q - c) + c + t  =>  q = R^T (p - c - t) + c, with R = [[cos, sin], [-sin, cos]].
    dx, dy = -(cx + tx), -(cy + ty)
    zero, one = np.zeros_like(cos), np.ones_like(cos)
    rows = [cos, -sin, cos * dx - sin * dy + cx,
            sin, cos, sin * dx + cos * dy + cy,
            zero, zero, one]
    return np.stack(rows, axis=-1).reshape(-1, 3, 3)


def perspective_matrices(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """[n,3,3] float64 homographies taking the four ``start`` corners [n,4,2] to the ``end`` corners.

    The standard direct linear transform with the bottom-right entry fixed to 1: two equations per corner,
    one batched 8x8 solve for all views. Swapping the corners gives the inverse map (up to its scale, which
    the projective divide removes).
    """
    x, y = np.moveaxis(np.asarray(start, dtype=np.float64), -1, 0)
    u, v = np.moveaxis(np.asarray(end, dtype=np.float64), -1, 0)
    one, zero = np.ones_like(x), np.zeros_like(x)
    rows_u = np.stack([x, y, one, zero, zero, zero, -u * x, -u * y], axis=-1)  # [n,4,8]
    rows_v = np.stack([zero, zero, zero, x, y, one, -v * x, -v * y], axis=-1)
    system = np.concatenate([rows_u, rows_v], axis=1)  # [n,8,8]
    target = np.concatenate([u, v], axis=1)[..., None]  # [n,8,1]
    solution = np.linalg.solve(system, target)[..., 0]
    return np.concatenate([solution, np.ones_like(solution[:, :1])], axis=1).reshape(-1, 3, 3)


def inverse_view_matrices(params: dict, single_resample: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The inverse pixel matrices [2n,3,3] (float64) of the n views' two resamplings, and their gates [2n] (bool).

    From the views' parameters (:func:`blended.augment.draw_view_params`): first the n rotation/shift inverses,
    then the n perspective inverses; with ``single_resample`` the first n are the inverses of the composed warp
    (perspective after rotation/shift). A view that skips a warp gets the identity for it, and gate False.
    """
    affine = inverse_rotation_shift_matrices(params["angle"], params["center"], params["translations"])
    perspective = perspective_matrices(params["end_points"], params["start_points"])
    apply_affine = np.asarray(params["apply_affine"]) > 0.5
    apply_perspective = np.asarray(params["apply_perspective"]) > 0.5
    eye = np.eye(3)
    affine = np.where(apply_affine[:, None, None], affine, eye)
    perspective = np.where(apply_perspective[:, None, None], perspective, eye)
    if single_resample:
        affine = affine @ perspective  # inverse(P @ A) = inverse(A) @ inverse(P)
    return np.concatenate([affine, perspective]), np.concatenate([apply_affine, apply_perspective])


def sampling_matrices(inverse_pixel_matrices: np.ndarray, height: int, width: int) -> np.ndarray:
    """Maps from an output pixel's normalised position to the normalised source position it samples,
    ``N @ inverse(M) @ inverse(N)`` [n,3,3] float64, where N takes pixel centres to grid_sample's
    ``align_corners=False`` coordinates: ``(2x + 1) / W - 1``."""
    normalise = np.array([[2.0 / width, 0.0, 1.0 / width - 1.0],
                          [0.0, 2.0 / height, 1.0 / height - 1.0],
                          [0.0, 0.0, 1.0]])
    denormalise = np.array([[width / 2.0, 0.0, (width - 1) / 2.0],
                            [0.0, height / 2.0, (height - 1) / 2.0],
                            [0.0, 0.0, 1.0]])
    return normalise @ inverse_pixel_matrices @ denormalise


def grid_base(height: int, width: int, device, dtype) -> torch.Tensor:
    """[H*W,3] homogeneous normalised positions of the output pixels' centres, row-major."""
    ys = (torch.arange(height, dtype=torch.float64) * 2 + 1) / height - 1
    xs = (torch.arange(width, dtype=torch.float64) * 2 + 1) / width - 1
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    base = torch.stack([grid_x, grid_y, torch.ones_like(grid_x)], dim=-1).view(-1, 3)
    return base.to(device=device, dtype=dtype)


def sampling_grids(matrices: torch.Tensor, base: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """grid_sample grids [k,H,W,2] of k sampling matrices [k,3,3] (on the device), in one matmul.

    The projective divide is exact for affine matrices (their third coordinate is exactly 1), so rotations
    and perspectives share the call.
    """
    points = base @ matrices.transpose(1, 2)  # [k,H*W,3]
    return (points[..., :2] / points[..., 2:]).view(-1, height, width, 2)


# Devices whose grid_sample has no "border" padding (Apple's MPS refuses it).
BORDER_BY_CLAMPING = ("mps",)


def resample(images: torch.Tensor, grid: torch.Tensor, padding_mode: str) -> torch.Tensor:
    if padding_mode == "border" and images.device.type in BORDER_BY_CLAMPING:
        # Border padding reads every position outside as the nearest edge pixel: the same as moving the position
        # onto the outer pixels' centres and sampling with zeros (the taps beyond the edge then weigh 0).
        height, width = images.shape[-2:]
        limits = torch.tensor([1 - 1 / width, 1 - 1 / height], dtype=grid.dtype, device=grid.device)
        grid = torch.maximum(torch.minimum(grid, limits), -limits)
        padding_mode = "zeros"
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)
