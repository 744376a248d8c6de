"""A ResBlock's output, ``skip + h + bias``, in one pass: part of the ``triton_norm`` fast path.

Why: on CUDA a convolution with a bias is cuDNN's convolution and then an in-place add of the bias over its whole
output (``aten::add_``: 14 calls of 0.4 ms on the 256-px maps of a batch of 8 on an H100, about 4% of a guided
step's kernel time, ``benchmarks/h100-2026-11-27-profile-triton-batch8.txt``), and the ResBlock's residual sum
is one more pass. With the Triton norm the block's last convolution runs without its bias, and this kernel adds
the skip path, that convolution's output and the bias as it writes the block's output: one pass reading two maps
where there were two passes reading three. (The block's first convolution gives its bias to the norm after it,
:func:`blended.triton_norm.group_norm_silu`'s ``input_bias``.) The output's gradient goes to both maps as it
is, so the backward launches nothing.

The sum is computed in float32 and rounded once; torch rounds the biased convolution output and then the sum.
The tests run the kernel in Triton's CPU interpreter against that plain sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_norm import FORWARD_TILE, flat_strides, pixel_tile

__all__ = ["residual_sum"]


@triton.jit
def _residual_sum_kernel(s_ptr, h_ptr, bias_ptr, out_ptr, HW, C, ss_b, ss_hw, ss_c, sh_b, sh_hw, sh_c,
                         so_b, so_hw, so_c, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    b, pixels, cols, c_mask, mask = pixel_tile(HW, C, BLOCK_HW, BLOCK_C)
    s = tl.load(s_ptr + b * ss_b + pixels[:, None] * ss_hw + cols[None, :] * ss_c, mask=mask, other=0.0)
    h = tl.load(h_ptr + b * sh_b + pixels[:, None] * sh_hw + cols[None, :] * sh_c, mask=mask, other=0.0)
    bias = tl.load(bias_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    out = s.to(tl.float32) + h.to(tl.float32) + bias
    tl.store(out_ptr + b * so_b + pixels[:, None] * so_hw + cols[None, :] * so_c, out.to(out_ptr.dtype.element_ty),
             mask=mask)


class _ResidualSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, skip, h, bias):
        batch, channels, height, width = h.shape
        skip, s_strides = flat_strides(skip)
        h, h_strides = flat_strides(h)
        out = torch.empty_like(h, dtype=torch.result_type(skip, h))
        _, o_strides = flat_strides(out)
        block_hw, block_c = FORWARD_TILE
        grid = (batch, triton.cdiv(height * width, block_hw), triton.cdiv(channels, block_c))
        _residual_sum_kernel[grid](skip, h, bias.contiguous(), out, height * width, channels, *s_strides,
                                   *h_strides, *o_strides, BLOCK_HW=block_hw, BLOCK_C=block_c)
        ctx.dtypes = skip.dtype, h.dtype, bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        skip_dtype, h_dtype, bias_dtype = ctx.dtypes
        grad_bias = grad.sum((0, 2, 3), dtype=torch.float32).to(bias_dtype) if ctx.needs_input_grad[2] else None
        return grad.to(skip_dtype), grad.to(h_dtype), grad_bias


def residual_sum(skip: torch.Tensor, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``skip + h + bias[None, :, None, None]`` for two [B, C, H, W] maps of one shape, in ``h``'s memory format
    and the two maps' promoted dtype (the bias is added in float32 and not promoted to)."""
    if skip.shape != h.shape or h.dim() != 4 or bias.shape != (h.shape[1],):
        raise ValueError(f"a residual sum takes two maps of one [B, C, H, W] shape and a [C] bias, not "
                         f"{tuple(skip.shape)}, {tuple(h.shape)} and {tuple(bias.shape)}")
    return _ResidualSum.apply(skip, h, bias)
