"""CLIP's vision blocks' LayerNorms and QuickGELU as Triton kernels, one each way: the ``triton_clip`` fast path.

Why: every guided step sends all views of all results through CLIP's tower and back. Between its matmuls, the
tower's elementwise work is bound by memory bandwidth, and eager PyTorch spends passes on it:

* QuickGELU (``x * sigmoid(1.702 * x)``, on the MLP's hidden activations, four times the tokens' width): three
  kernels forward (a scale, a sigmoid, a product) and five backward (two products, the sigmoid's backward, a
  scale and a sum);
* the LayerNorms before attention and MLP compute in float32, as OpenAI's do: a cast to float32, the norm, and
  a cast back, forward and backward.

At batch 8 with 8 views that is about 25 GB of a step's memory traffic (``scripts/memory_trace.py --traffic``).
One kernel each way reads its tensors once and writes once: about 6 GB. Each residual sum is read next by a
LayerNorm (the block's second, the next block's first), so the LayerNorm's kernels also make the sum, and add
the residual stream's gradient in the backward, where autograd read the norm's gradient back to add it.

Both compute in float32 and round once to the tower's dtype. The LayerNorm gives the float32 norm's values (up
to the order of its sums); QuickGELU rounds once where eager bf16/fp16 rounds after each of its three ops.
Only the input (and a LayerNorm's two float32 statistics per token) are kept for the backward. The backward
gives the input's gradient (all guidance needs); a frozen LayerNorm's weights get theirs from the plain float32
reference if anyone asks. The tests run every kernel in Triton's CPU interpreter against the float32 formulas.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

__all__ = ["layer_norm", "layer_norm_reference", "quick_gelu", "quick_gelu_reference", "residual_layer_norm"]

GELU_BLOCK = 1024  # elements per program of the QuickGELU passes


# ----------------------------------------------------------------------------------------------- QuickGELU

@triton.jit
def _gelu_forward_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y = x * tl.sigmoid(1.702 * x)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_backward_kernel(x_ptr, dy_ptr, dx_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(1.702 * x)
    dx = dy * (s + 1.702 * x * s * (1.0 - s))
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


class _QuickGELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()  # a Linear's output already is
        y = torch.empty_like(x)
        if x.numel():
            _gelu_forward_kernel[(triton.cdiv(x.numel(), GELU_BLOCK),)](x, y, x.numel(), BLOCK=GELU_BLOCK)
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        if x.numel():
            _gelu_backward_kernel[(triton.cdiv(x.numel(), GELU_BLOCK),)](x, dy, dx, x.numel(), BLOCK=GELU_BLOCK)
        return dx


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(1.702 * x)`` by the Triton kernels (CUDA, or Triton's interpreter), computed in float32."""
    return _QuickGELU.apply(x)


def quick_gelu_reference(x: torch.Tensor) -> torch.Tensor:
    """The kernels' function in plain torch: float32 arithmetic, one rounding to ``x``'s dtype."""
    x32 = x.float()
    return (x32 * torch.sigmoid(1.702 * x32)).to(x.dtype)


# ----------------------------------------------------------------------------------------------- LayerNorm

@triton.jit
def _norm_forward_kernel(x_ptr, r_ptr, s_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, D, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one token
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:  # the norm of the residual sum x + r, which is written too, rounded as torch's sum rounds
        total = (x.to(tl.float32) + tl.load(r_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32))
        x = total.to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + row * D + cols, x, mask=mask)
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    centred = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / D + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = centred * rstd * w + b
    tl.store(y_ptr + row * D + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _norm_backward_kernel(x_ptr, dy_ptr, w_ptr, mean_ptr, rstd_ptr, r_ptr, dx_ptr, D, HAS_RESIDUAL: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    g = dy * w  # zero past D: dy and w load as zero there
    c1 = tl.sum(g, axis=0) / D
    c2 = tl.sum(g * xhat, axis=0) / D
    dx = rstd * (g - c1 - xhat * c2)
    if HAS_RESIDUAL:  # the normalised sum's gradient along the residual stream, added before the one rounding
        dx += tl.load(r_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + row * D + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _normalise_rows(x, weight, bias, eps, residual=None):
    """(LayerNorm of ``x``, or of ``x + residual``; what was normalised; its float32 mean and 1/std per row)."""
    x = x.contiguous()
    width = x.shape[-1]
    rows = x.numel() // width if width else 0
    y = torch.empty_like(x)
    normalised = x if residual is None else torch.empty_like(x)
    mean = torch.empty(rows, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if rows:
        # Without a residual, x stands in for the pointers HAS_RESIDUAL=False never touches.
        _norm_forward_kernel[(rows,)](x, x if residual is None else residual.contiguous(), normalised, weight, bias,
                                      y, mean, rstd, width, eps, HAS_RESIDUAL=residual is not None,
                                      BLOCK_D=triton.next_power_of_2(width))
    return y, normalised, mean, rstd


def _input_gradient_rows(x, dy, weight, mean, rstd, residual=None):
    dy = dy.contiguous()
    grad = torch.empty_like(x)
    if mean.numel():
        _norm_backward_kernel[(mean.numel(),)](x, dy, weight, mean, rstd, dy if residual is None else
                                               residual.contiguous(), grad, x.shape[-1],
                                               HAS_RESIDUAL=residual is not None,
                                               BLOCK_D=triton.next_power_of_2(x.shape[-1]))
    return grad


def _reference_weight_gradients(x, dy, weight, bias, eps, needed) -> list:
    """The weights' gradients (a frozen tower asks for none) from the float32 reference."""
    if not any(needed):
        return [None, None]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(need) for t, need in zip((weight, bias), needed, strict=True)]
        y = layer_norm_reference(x.detach(), leaves[0], leaves[1], eps)
        wanted = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(y, wanted, dy))
    return [next(grads) if t.requires_grad else None for t in leaves]


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, x, mean, rstd = _normalise_rows(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        grad_x = _input_gradient_rows(x, dy, weight, mean, rstd) if ctx.needs_input_grad[0] else None
        return grad_x, *_reference_weight_gradients(x, dy, weight, bias, ctx.eps, ctx.needs_input_grad[1:3]), None


class _ResidualLayerNorm(torch.autograd.Function):
    """``(x + delta, layer_norm(x + delta))``: a transformer block's residual sum and the LayerNorm that reads it
    next, in one kernel each way. Apart, the sum read two tensors and wrote one that the norm read back, and in
    the backward the norm wrote its input's gradient and autograd read it back to add the residual stream's.
    Only the sum (which the residual stream needs anyway) and two float32 numbers per row are kept."""

    @staticmethod
    def forward(ctx, x, delta, weight, bias, eps):
        y, total, mean, rstd = _normalise_rows(x, weight, bias, eps, residual=delta)
        ctx.save_for_backward(total, weight, bias, mean, rstd)
        ctx.eps = eps
        return total, y

    @staticmethod
    def backward(ctx, d_total, dy):
        total, weight, bias, mean, rstd = ctx.saved_tensors
        grad = None
        if any(ctx.needs_input_grad[:2]):  # the sum's gradient is both terms'
            grad = _input_gradient_rows(total, dy, weight, mean, rstd, residual=d_total)
        weights = _reference_weight_gradients(total, dy, weight, bias, ctx.eps, ctx.needs_input_grad[2:4])
        return (grad if ctx.needs_input_grad[0] else None, grad if ctx.needs_input_grad[1] else None, *weights,
                None)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension by the Triton kernels (CUDA, or Triton's interpreter): float32
    statistics and affine whatever ``x``'s dtype, one rounding to it."""
    return _LayerNorm.apply(x, weight, bias, eps)


def residual_layer_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, layer_norm(s, ...))`` with ``s = x + delta`` (rounded to their dtype, as torch's sum) by the Triton
    kernels. ``x`` and ``delta`` must share shape and dtype."""
    if x.shape != delta.shape or x.dtype != delta.dtype:
        raise ValueError(f"a residual sum takes two tensors of one shape and dtype, not {tuple(x.shape)} "
                         f"{x.dtype} and {tuple(delta.shape)} {delta.dtype}")
    return _ResidualLayerNorm.apply(x, delta, weight, bias, eps)


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """The kernels' function in plain torch: OpenAI's float32 LayerNorm, cast back to ``x``'s dtype."""
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).to(x.dtype)
