"""A ResBlock's output, ``skip + h + bias``, in one pass: part of the ``triton_norm`` fast path.

Why: on CUDA a convolution with a bias is cuDNN's convolution and then an in-place add of the bias over its whole
output (``aten::add_``: 14 calls of 0.4 ms on the 256-px maps of a batch of 8 on an H100, about 4% of a guided
step's kernel time, ``benchmarks/h100-2026-11-27-profile-triton-batch8.txt``), and the ResBlock's residual sum
is one more pass. With the Triton norm the block's last convolution runs without its bias, and this kernel adds
the skip path, that convolution's output and the bias as it writes the block's output: one pass reading two maps
where there were two passes reading three. (The block's first convolution gives its bias to the norm after it,
:func:`blended.triton_norm.group_norm_silu`'s ``input_bias``.) The output's gradient goes to both maps as it
is, so the backward launches nothing.

An up ResBlock's skip path is its input upsampled 2x (nearest): the kernel reads the input at half size where
the upsampling wrote a map four times its size for this pass to read back (``upsampled_skip``); the backward
sums each 2x2 window's gradient for it, as the upsampling's backward did.

The kernel also leaves each channel's partial statistics of the output on it (:mod:`blended
.carried_statistics`), the very numbers the next GroupNorm's statistics pass would compute, so that norm need not
read the map for them: the block's output is read once forward where it was read twice.

The sum is computed in float32 and rounded once; torch rounds the biased convolution output and then the sum.
The tests run the kernel in Triton's CPU interpreter against that plain sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import carried_statistics
from .triton_norm import (
    flat_strides,
    half_size_pixels,
    program_pixels,
    statistics_grid,
    store_channel_partials,
    welford_lanes,
    welford_tile,
)

__all__ = ["residual_sum"]


@triton.jit(do_not_specialize=("W", "num_splits"))
def _residual_sum_kernel(s_ptr, h_ptr, bias_ptr, out_ptr, partial_ptr, HW, W, C, ss_b, ss_hw, ss_c, sh_b, sh_hw, sh_c,
                         so_b, so_hw, so_c, rows_per_split, num_splits, UPSAMPLED_SKIP: tl.constexpr,
                         BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    # UPSAMPLED_SKIP: the skip map is at half the output's height and width (``W``: the output's), each of its
    # pixels read for its 2x2 window, as a nearest 2x upsampling would have copied it. Each program writes its
    # split of the output's pixels, for a block of channels, and leaves those channels' partial statistics of
    # what it wrote, as the norm's statistics pass would have read them (the same tiles, the same updates).
    b, split, cols, c_mask, start, end = program_pixels(HW, C, rows_per_split, BLOCK_C)
    bias = tl.load(bias_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    count, mean, m2 = welford_lanes(BLOCK_HW, BLOCK_C)
    for r0 in range(start, end, BLOCK_HW):
        pixels = r0 + tl.arange(0, BLOCK_HW)
        valid = pixels < end
        mask = valid[:, None] & c_mask[None, :]
        s = tl.load(s_ptr + b * ss_b + half_size_pixels(pixels, W, UPSAMPLED_SKIP)[:, None] * ss_hw
                    + cols[None, :] * ss_c, mask=mask, other=0.0)
        h = tl.load(h_ptr + b * sh_b + pixels[:, None] * sh_hw + cols[None, :] * sh_c, mask=mask, other=0.0)
        out = (s.to(tl.float32) + h.to(tl.float32) + bias).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + b * so_b + pixels[:, None] * so_hw + cols[None, :] * so_c, out, mask=mask)
        # The statistics of the stored values (a masked lane holds 0, as the statistics pass reads it).
        count, mean, m2 = welford_tile(out.to(tl.float32), valid, r0, start, count, mean, m2, BLOCK_HW)
    store_channel_partials(partial_ptr, b, C, cols, c_mask, split, num_splits, count, mean, m2, bias_ptr, False)


class _ResidualSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, skip, h, bias, upsampled_skip):
        batch, channels, height, width = h.shape
        skip, s_strides = flat_strides(skip)
        h, h_strides = flat_strides(h)
        out = torch.empty_like(h, dtype=torch.result_type(skip, h))
        _, o_strides = flat_strides(out)
        grid = statistics_grid(out)
        sums = grid.partial_sums(3, out.device)
        _residual_sum_kernel[grid.launch](skip, h, bias.contiguous(), out, sums, height * width, width, channels,
                                          *s_strides, *h_strides, *o_strides, grid.rows_per_split, grid.splits,
                                          UPSAMPLED_SKIP=upsampled_skip, BLOCK_HW=grid.tile[0], BLOCK_C=grid.tile[1])
        # The partial sums take no gradient: without this autograd would make a zero one for them each backward.
        ctx.mark_non_differentiable(sums)
        ctx.set_materialize_grads(False)
        ctx.dtypes = skip.dtype, h.dtype, bias.dtype
        ctx.skip_shape = tuple(skip.shape) if upsampled_skip else None
        return out, sums

    @staticmethod
    def backward(ctx, grad, _sums):
        if grad is None:
            return None, None, None, None
        skip_dtype, h_dtype, bias_dtype = ctx.dtypes
        grad_bias = grad.sum((0, 2, 3), dtype=torch.float32).to(bias_dtype) if ctx.needs_input_grad[2] else None
        grad_skip = grad
        if ctx.skip_shape is not None and ctx.needs_input_grad[0]:
            grad_skip = upsampling_gradient(grad, ctx.skip_shape)
        return grad_skip.to(skip_dtype), grad.to(h_dtype), grad_bias, None


def upsampling_gradient(grad: torch.Tensor, input_shape: tuple) -> torch.Tensor:
    """The gradient of a nearest 2x upsampling of a map of ``input_shape``: each 2x2 window's sum, by the op that
    upsampling's own backward runs (in ``grad``'s dtype, as :func:`blended.unet.upsample_nearest_2x` upsamples in
    the map's)."""
    return torch.ops.aten.upsample_nearest2d_backward(grad, list(grad.shape[2:]), list(input_shape), 2.0, 2.0)


def residual_sum(skip: torch.Tensor, h: torch.Tensor, bias: torch.Tensor, upsampled_skip: bool = False) -> torch.Tensor:
    """``skip + h + bias[None, :, None, None]`` for two [B, C, H, W] maps of one shape, in ``h``'s memory format
    and the two maps' promoted dtype (the bias is added in float32 and not promoted to). With ``upsampled_skip``
    ``skip`` is [B, C, H / 2, W / 2] and stands for its nearest 2x upsampling, which is not made. The sum
    carries its partial statistics for the Triton GroupNorm that reads it next (:mod:`blended.carried_statistics`)."""
    expected = tuple(h.shape)
    if upsampled_skip and h.dim() == 4:
        expected = (*h.shape[:2], h.shape[2] // 2, h.shape[3] // 2) if h.shape[2] % 2 == h.shape[3] % 2 == 0 else None
    if tuple(skip.shape) != expected or h.dim() != 4 or bias.shape != (h.shape[1],):
        raise ValueError(f"a residual sum takes two maps of one [B, C, H, W] shape (with an upsampled skip, the skip "
                         f"at half the height and width) and a [C] bias, not {tuple(skip.shape)}, {tuple(h.shape)} "
                         f"and {tuple(bias.shape)}")
    out, sums = _ResidualSum.apply(skip, h, bias, upsampled_skip)
    return carried_statistics.attach(out, sums)
