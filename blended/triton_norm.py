"""GroupNorm (+ the timestep scale-shift) + SiLU as hand-written Triton kernels: the ``triton_norm`` fast path.

Why: the H100 profile of a guided step (``benchmarks/gpu-notes.md``) spends about a fifth of its kernel time in
GroupNorm and SiLU, and eager GroupNorm cannot read channels_last activations without an NCHW copy, so the
convolutions must stay NCHW and pay their own layout copies (12% of the step). ``torch.compile`` with dynamic
shapes fuses the chain but its NHWC group reductions ran slower than eager (``blended.fused_norm``). These kernels
do the chain in the passes it needs, reading either memory format in place:

* forward: one split reduction (each group's mean and M2: every lane of a tile keeps its own by Welford's update
  and the lanes and splits are merged by Chan's parallel formula, so a large mean does not cost precision; the
  splits keep every SM busy even at batch 1; a small kernel merges the splits, where torch ops took 13 launches
  per norm), then one pass writing
  ``silu((x - mean) * rstd * w + b) * (1 + scale) + shift``-order output (scale-shift before SiLU, as the UNet);
* backward (input gradient only, which is all CLIP guidance needs; the frozen weights get theirs from the
  reference path if anyone asks): one split reduction of the two group sums GroupNorm's backward needs,
  recomputing the activation from ``x`` (its splits merged by a small kernel too), then one pass writing ``dx``.

The host launches these kernels and nothing else (``scripts/kernel_report.py --launches``): at small batches a
step's pace on a GPU is its launches'.

Only ``x`` (in its own dtype) and two float32 numbers per group are kept for the backward. Each kernel is also
run by Triton's CPU interpreter in the tests (``TRITON_INTERPRET=1``), against :func:`blended.fused_norm
.group_norm_act`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused_norm import group_norm_act

__all__ = ["group_norm_silu", "group_norm_silu_and_input", "group_norm_silu_of_pair"]

_TARGET_PROGRAMS = 1024  # split reductions until about this many programs run (an H100 has 132 SMs)
# (pixels, channels) per program of the passes that write a map. The forward's tile is the larger: each program
# first gathers its columns' statistics and affine terms, and over 32 pixels that setup made the pass execute more
# instructions per byte than an H100 can issue at full bandwidth (``scripts/kernel_report.py``). The backward,
# with more registers per element, stays at 32 pixels to keep more programs resident.
FORWARD_TILE = (64, 64)
BACKWARD_TILE = (32, 64)
# Integers the JIT is told not to specialise on. By default it compiles a kernel anew for every argument that is 1
# or a multiple of 16, and these vary with the block and the batch for no gain: the group size's alignment
# reaches the kernels as GROUP_ALIGN, and the split count only places each program's partial sums. Specialising
# on them cost a 256x256 step 39 compiles at batch 1 and more at other batches (45 over batches 1, 4 and 16);
# 24 now serve every batch size (``scripts/kernel_report.py --cold-start``).
_NOT_SPECIALISED = ("Cg", "num_splits")  # the passes that write a map take no split count
_MERGE_NOT_SPECIALISED = ("rows", "num_splits")  # both follow the batch


@triton.jit(do_not_specialize=_NOT_SPECIALISED)
def _stats_kernel(x_ptr, partial_ptr, HW, C, Cg, stride_b, stride_hw, stride_c, rows_per_split, num_splits,
                  GROUP_ALIGN: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)  # batch * groups + group
    split = tl.program_id(1)
    groups = C // Cg
    b = (row // groups).to(tl.int64)  # 64-bit offsets: a batch of 64 at 256x256x512 passes 2**31 elements
    g = row % groups
    c = tl.arange(0, BLOCK_C)
    c_mask = c < Cg
    base = x_ptr + b * stride_b + (tl.multiple_of(g * Cg, GROUP_ALIGN) + c) * stride_c
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, HW)
    # Each lane of the tile keeps its own running count, mean and M2 (Welford's update), and the lanes are merged
    # once after the loop: no reduction across the program (shared memory and barriers) per tile.
    count = tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float32)
    mean = tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_HW):
        rows = r0 + tl.arange(0, BLOCK_HW)
        mask = (rows < end)[:, None] & c_mask[None, :]
        v = tl.load(base[None, :] + rows[:, None] * stride_hw, mask=mask, other=0.0).to(tl.float32)
        # Only the last tile can be partial, so every lane this tile updates has seen one value per tile so far:
        # one reciprocal per tile serves them all.
        tiles = ((r0 - start) // BLOCK_HW + 1).to(tl.float32)
        delta = v - mean
        mean_next = mean + delta * (1.0 / tiles)
        m2 = tl.where(mask, m2 + delta * (v - mean_next), m2)
        mean = tl.where(mask, mean_next, mean)
        count = tl.where(mask, tiles, count)
    # The lanes merged as the splits are on the host: the parts' M2s plus each part's count times its mean's
    # squared distance from the whole's mean (Chan's formula for many parts).
    total = tl.sum(tl.sum(count, axis=1), axis=0)
    total_mean = tl.sum(tl.sum(count * mean, axis=1), axis=0) / tl.maximum(total, 1.0)
    spread = mean - total_mean
    total_m2 = tl.sum(tl.sum(m2 + count * spread * spread, axis=1), axis=0)
    out = partial_ptr + (row * num_splits + split) * 3
    tl.store(out, total)
    tl.store(out + 1, total_mean)
    tl.store(out + 2, total_m2)


# Rows (sample, group) and splits per program of the merges below: a step's norms have at most 64 x 32 rows and
# 32 splits, so one or a few programs merge them all.
MERGE_TILE = (64, 32)


@triton.jit
def _merge_rows(rows, BLOCK_R: tl.constexpr):
    # This program's rows of partial sums, and which exist.
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    return r, r < rows


@triton.jit
def _split_tile(partial_ptr, r, r_mask, s0, num_splits, WIDTH: tl.constexpr, BLOCK_S: tl.constexpr):
    # The [rows, splits] tile of partial sums from split s0 on: the address of each split's first of WIDTH
    # numbers, and the mask of those that exist.
    s = s0 + tl.arange(0, BLOCK_S)
    return partial_ptr + (r[:, None] * num_splits + s[None, :]) * WIDTH, r_mask[:, None] & (s < num_splits)[None, :]


@triton.jit
def _split_sums(partial_ptr, r, r_mask, num_splits, WIDTH: tl.constexpr, PRODUCT: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    # Over each row's splits: the sum of their first numbers, and of their second (times the first, if PRODUCT).
    # Tiles are added lane by lane and summed across the lanes once, after the loop, so that no compiler puts a
    # cross-lane reduction (and its barriers) inside the loop.
    first = tl.zeros((BLOCK_R, BLOCK_S), dtype=tl.float32)
    second = tl.zeros((BLOCK_R, BLOCK_S), dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        part, mask = _split_tile(partial_ptr, r, r_mask, s0, num_splits, WIDTH, BLOCK_S)
        a = tl.load(part, mask=mask, other=0.0)
        b = tl.load(part + 1, mask=mask, other=0.0)
        first += a
        second += a * b if PRODUCT else b
    return tl.sum(first, axis=1), tl.sum(second, axis=1)


@triton.jit(do_not_specialize=_MERGE_NOT_SPECIALISED)
def _stats_merge_kernel(partial_ptr, mean_ptr, rstd_ptr, rows, num_splits, eps, BLOCK_R: tl.constexpr,
                        BLOCK_S: tl.constexpr):
    # Each row's splits merged by Chan's formula, as the lanes were: the whole count and mean first, then the
    # splits' M2s plus each split's count times its mean's squared distance from the whole's.
    r, r_mask = _merge_rows(rows, BLOCK_R)
    total, weighted = _split_sums(partial_ptr, r, r_mask, num_splits, 3, True, BLOCK_R, BLOCK_S)
    mean = weighted / tl.maximum(total, 1.0)
    m2 = tl.zeros((BLOCK_R, BLOCK_S), dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        part, mask = _split_tile(partial_ptr, r, r_mask, s0, num_splits, 3, BLOCK_S)
        spread = tl.load(part + 1, mask=mask, other=0.0) - mean[:, None]
        m2 += tl.load(part + 2, mask=mask, other=0.0) + tl.load(part, mask=mask, other=0.0) * spread * spread
    tl.store(mean_ptr + r, mean, mask=r_mask)
    tl.store(rstd_ptr + r, 1.0 / tl.sqrt(tl.sum(m2, axis=1) / tl.maximum(total, 1.0) + eps), mask=r_mask)


@triton.jit(do_not_specialize=_MERGE_NOT_SPECIALISED)
def _backward_stats_merge_kernel(partial_ptr, c1_ptr, c2_ptr, rows, num_splits, count, BLOCK_R: tl.constexpr,
                                 BLOCK_S: tl.constexpr):
    # Each row's two gradient sums over its splits, as means over the group's elements.
    r, r_mask = _merge_rows(rows, BLOCK_R)
    sum_dxhat, sum_dxhat_xhat = _split_sums(partial_ptr, r, r_mask, num_splits, 2, False, BLOCK_R, BLOCK_S)
    tl.store(c1_ptr + r, sum_dxhat / count, mask=r_mask)
    tl.store(c2_ptr + r, sum_dxhat_xhat / count, mask=r_mask)


@triton.jit
def _load_scale_shift(ss_ptr, b, C, cols, c_mask, HAS_SCALE_SHIFT: tl.constexpr, BLOCK_C: tl.constexpr):
    if HAS_SCALE_SHIFT:
        scale = tl.load(ss_ptr + b * 2 * C + cols, mask=c_mask, other=0.0).to(tl.float32)
        shift = tl.load(ss_ptr + b * 2 * C + C + cols, mask=c_mask, other=0.0).to(tl.float32)
    else:
        scale = tl.zeros([BLOCK_C], dtype=tl.float32)
        shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    return scale, shift


@triton.jit
def _activation(v, mean, rstd, w, bias, scale, shift, HAS_SCALE_SHIFT: tl.constexpr):
    xhat = (v - mean) * rstd
    z = xhat * w + bias
    if HAS_SCALE_SHIFT:
        z = z * (1.0 + scale) + shift
    return xhat, z


@triton.jit
def _pixel_tile(HW, C, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    # This program's batch index, pixel rows and channel columns, and their masks.
    b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: a batch of 64 at 256x256x512 passes 2**31 elements
    rows = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cols < C
    return b, rows, cols, c_mask, (rows < HW)[:, None] & c_mask[None, :]


@triton.jit
def _channel_terms(mean_ptr, rstd_ptr, w_ptr, b_ptr, ss_ptr, b, C, Cg, cols, c_mask,
                   HAS_SCALE_SHIFT: tl.constexpr, BLOCK_C: tl.constexpr):
    # Per-column group statistics, affine and timestep terms as [1, BLOCK_C] rows (and the stats' index).
    stat = b * (C // Cg) + cols // Cg
    mean = tl.load(mean_ptr + stat, mask=c_mask, other=0.0)[None, :]
    rstd = tl.load(rstd_ptr + stat, mask=c_mask, other=0.0)[None, :]
    w = tl.load(w_ptr + cols, mask=c_mask, other=0.0)[None, :]
    bias = tl.load(b_ptr + cols, mask=c_mask, other=0.0)[None, :]
    scale, shift = _load_scale_shift(ss_ptr, b, C, cols, c_mask, HAS_SCALE_SHIFT, BLOCK_C)
    return stat, mean, rstd, w, bias, scale[None, :], shift[None, :]


@triton.jit(do_not_specialize=_NOT_SPECIALISED[:1])
def _forward_kernel(x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, ss_ptr, HW, C, Cg,
                    sx_b, sx_hw, sx_c, sy_b, sy_hw, sy_c,
                    HAS_SCALE_SHIFT: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    b, rows, cols, c_mask, mask = _pixel_tile(HW, C, BLOCK_HW, BLOCK_C)
    v = tl.load(x_ptr + b * sx_b + rows[:, None] * sx_hw + cols[None, :] * sx_c, mask=mask, other=0.0)
    _, mean, rstd, w, bias, scale, shift = _channel_terms(mean_ptr, rstd_ptr, w_ptr, b_ptr, ss_ptr, b, C, Cg, cols,
                                                          c_mask, HAS_SCALE_SHIFT, BLOCK_C)
    _, z = _activation(v.to(tl.float32), mean, rstd, w, bias, scale, shift, HAS_SCALE_SHIFT)
    y = z * tl.sigmoid(z)
    tl.store(y_ptr + b * sy_b + rows[:, None] * sy_hw + cols[None, :] * sy_c, y.to(y_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _input_gradient_terms(v, dy, mean, rstd, w, bias, scale, shift, HAS_SCALE_SHIFT: tl.constexpr):
    # d/dxhat of silu(z): dy * silu'(z) * (1 + scale) * w, with silu'(z) = s(z) * (1 + z * (1 - s(z))).
    xhat, z = _activation(v, mean, rstd, w, bias, scale, shift, HAS_SCALE_SHIFT)
    sig = tl.sigmoid(z)
    dz = dy * sig * (1.0 + z * (1.0 - sig))
    if HAS_SCALE_SHIFT:
        dz = dz * (1.0 + scale)
    return xhat, dz * w


@triton.jit(do_not_specialize=_NOT_SPECIALISED)
def _backward_stats_kernel(x_ptr, dy_ptr, partial_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, ss_ptr, HW, C, Cg,
                           sx_b, sx_hw, sx_c, sd_b, sd_hw, sd_c, rows_per_split, num_splits,
                           HAS_SCALE_SHIFT: tl.constexpr, GROUP_ALIGN: tl.constexpr, BLOCK_HW: tl.constexpr,
                           BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    split = tl.program_id(1)
    groups = C // Cg
    b = (row // groups).to(tl.int64)
    g = row % groups
    c = tl.arange(0, BLOCK_C)
    c_mask = c < Cg
    cols = tl.multiple_of(g * Cg, GROUP_ALIGN) + c
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    w = tl.load(w_ptr + cols, mask=c_mask, other=0.0)[None, :]
    bias = tl.load(b_ptr + cols, mask=c_mask, other=0.0)[None, :]
    scale, shift = _load_scale_shift(ss_ptr, b, C, cols, c_mask, HAS_SCALE_SHIFT, BLOCK_C)
    scale, shift = scale[None, :], shift[None, :]
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, HW)
    sum_dxhat = tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float32)  # per lane, summed once after the loop
    sum_dxhat_xhat = tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_HW):
        rows = r0 + tl.arange(0, BLOCK_HW)
        mask = (rows < end)[:, None] & c_mask[None, :]
        v = tl.load(x_ptr + b * sx_b + rows[:, None] * sx_hw + cols[None, :] * sx_c, mask=mask, other=0.0)
        dy = tl.load(dy_ptr + b * sd_b + rows[:, None] * sd_hw + cols[None, :] * sd_c, mask=mask, other=0.0)
        xhat, dxhat = _input_gradient_terms(v.to(tl.float32), dy.to(tl.float32), mean, rstd, w, bias, scale, shift,
                                            HAS_SCALE_SHIFT)
        dxhat = tl.where(mask, dxhat, 0.0)
        sum_dxhat += dxhat
        sum_dxhat_xhat += dxhat * xhat
    out = partial_ptr + (row * num_splits + split) * 2
    tl.store(out, tl.sum(tl.sum(sum_dxhat, axis=1), axis=0))
    tl.store(out + 1, tl.sum(tl.sum(sum_dxhat_xhat, axis=1), axis=0))


@triton.jit(do_not_specialize=_NOT_SPECIALISED[:1])
def _backward_kernel(x_ptr, dy_ptr, dx_ptr, mean_ptr, rstd_ptr, c1_ptr, c2_ptr, w_ptr, b_ptr, ss_ptr, r_ptr,
                     HW, C, Cg, sx_b, sx_hw, sx_c, sd_b, sd_hw, sd_c, so_b, so_hw, so_c, sr_b, sr_hw, sr_c,
                     HAS_SCALE_SHIFT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_HW: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    b, rows, cols, c_mask, mask = _pixel_tile(HW, C, BLOCK_HW, BLOCK_C)
    v = tl.load(x_ptr + b * sx_b + rows[:, None] * sx_hw + cols[None, :] * sx_c, mask=mask, other=0.0)
    dy = tl.load(dy_ptr + b * sd_b + rows[:, None] * sd_hw + cols[None, :] * sd_c, mask=mask, other=0.0)
    stat, mean, rstd, w, bias, scale, shift = _channel_terms(mean_ptr, rstd_ptr, w_ptr, b_ptr, ss_ptr, b, C, Cg,
                                                             cols, c_mask, HAS_SCALE_SHIFT, BLOCK_C)
    c1 = tl.load(c1_ptr + stat, mask=c_mask, other=0.0)[None, :]
    c2 = tl.load(c2_ptr + stat, mask=c_mask, other=0.0)[None, :]
    xhat, dxhat = _input_gradient_terms(v.to(tl.float32), dy.to(tl.float32), mean, rstd, w, bias, scale, shift,
                                        HAS_SCALE_SHIFT)
    dx = rstd * (dxhat - c1 - xhat * c2)
    if HAS_RESIDUAL:  # x's gradient along its other path (the skip connection), added before the one rounding
        r = tl.load(r_ptr + b * sr_b + rows[:, None] * sr_hw + cols[None, :] * sr_c, mask=mask, other=0.0)
        dx = dx + r.to(tl.float32)
    tl.store(dx_ptr + b * so_b + rows[:, None] * so_hw + cols[None, :] * so_c, dx.to(dx_ptr.dtype.element_ty),
             mask=mask)


def _flat_strides(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(tensor, (batch, pixel, channel) strides): H and W merge into one pixel stride in NCHW and NHWC alike."""
    if t.shape[2] > 1 and t.shape[3] > 1 and t.stride(2) != t.shape[3] * t.stride(3):
        t = t.contiguous()
    return t, (t.stride(0), t.stride(3) if t.shape[3] > 1 else t.stride(2), t.stride(1))


def _channel_arguments(weight, bias, scale_shift, batch: int, channels: int):
    """Float32 affine parameters and the [B, 2C] timestep terms as the kernels read them (in their own dtype: a
    cast here would be one more launch per norm and per backward). Without scale-shift the weight stands in as a
    valid pointer that HAS_SCALE_SHIFT=False never reads."""
    weight32, bias32 = weight.float().contiguous(), bias.float().contiguous()
    ss = scale_shift.reshape(batch, 2 * channels).contiguous() if scale_shift is not None else weight32
    return weight32, bias32, ss


def _reduction_grid(batch: int, groups: int, hw: int, block_hw: int) -> tuple[int, int]:
    splits = max(1, min(triton.cdiv(_TARGET_PROGRAMS, batch * groups), triton.cdiv(hw, block_hw)))
    rows_per_split = triton.cdiv(triton.cdiv(hw, splits), block_hw) * block_hw
    return triton.cdiv(hw, rows_per_split), rows_per_split


def reduction_tile(group_size: int) -> tuple[int, int]:
    """(pixels, channels) per loop iteration of the split reductions: one group's channels, 2048 elements."""
    block_c = triton.next_power_of_2(group_size)
    return max(16, 2048 // block_c), block_c


def group_alignment(group_size: int) -> int:
    """The largest power of two (up to 16) dividing the group size: where a group's channels start, so that the
    reductions load a pixel's channels of one group as vectors in channels_last (Triton's JIT cannot see that
    ``group * group_size`` is aligned when the group size is not itself a multiple of 16, and then loads them
    one by one)."""
    return min(16, group_size & -group_size)


def _statistics(x, group_size: int, eps: float):
    """Each (sample, group)'s mean and 1/std over ``x``: float32, [B * groups]."""
    batch, channels, height, width = x.shape
    num_groups, hw = channels // group_size, height * width
    x, sx = _flat_strides(x)
    block_hw, block_c = reduction_tile(group_size)
    splits, rows_per_split = _reduction_grid(batch, num_groups, hw, block_hw)
    rows = batch * num_groups
    partial = torch.empty(rows, splits, 3, device=x.device, dtype=torch.float32)
    _stats_kernel[(rows, splits)](x, partial, hw, channels, group_size, *sx, rows_per_split, splits,
                                  GROUP_ALIGN=group_alignment(group_size), BLOCK_HW=block_hw, BLOCK_C=block_c)
    mean, rstd = (torch.empty(rows, device=x.device, dtype=torch.float32) for _ in range(2))
    _stats_merge_kernel[(triton.cdiv(rows, MERGE_TILE[0]),)](partial, mean, rstd, rows, splits, eps,
                                                             BLOCK_R=MERGE_TILE[0], BLOCK_S=MERGE_TILE[1])
    return mean, rstd


def _normalise_into(y, x, weight, bias, scale_shift, mean, rstd, group_size: int) -> None:
    """Write ``silu`` of the normalised, affine (and scale-shifted) ``x`` into ``y``, which may be a channel
    slice of a larger map (its strides are read as they are)."""
    batch, channels, height, width = x.shape
    hw = height * width
    x, sx = _flat_strides(x)
    y_flat, sy = _flat_strides(y)
    if y_flat is not y:
        raise ValueError("the output must merge H and W into one pixel stride (NCHW, NHWC or a channel slice)")
    weight32, bias32, ss = _channel_arguments(weight, bias, scale_shift, batch, channels)
    block_hw, block_c = FORWARD_TILE
    grid = (batch, triton.cdiv(hw, block_hw), triton.cdiv(channels, block_c))
    _forward_kernel[grid](x, y, mean, rstd, weight32, bias32, ss, hw, channels, group_size, *sx, *sy,
                          HAS_SCALE_SHIFT=scale_shift is not None, BLOCK_HW=block_hw, BLOCK_C=block_c)


def _forward(ctx, x, weight, bias, scale_shift, num_groups, eps, out_dtype=None):
    group_size = x.shape[1] // num_groups
    x, _ = _flat_strides(x)
    mean, rstd = _statistics(x, group_size, eps)
    y = torch.empty_like(x, dtype=out_dtype or x.dtype)
    _normalise_into(y, x, weight, bias, scale_shift, mean, rstd, group_size)
    ctx.save_for_backward(x, weight, bias, scale_shift, mean, rstd)
    ctx.num_groups, ctx.eps, ctx.out_dtype = num_groups, eps, out_dtype
    return y


def _backward(ctx, dy, residual=None):
    x, weight, bias, scale_shift, mean, rstd = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = _input_gradient(x, dy, weight, bias, scale_shift, mean, rstd, ctx.num_groups, residual)
    if not any(ctx.needs_input_grad[1:4]):
        return grad_x, None, None, None, None, None
    x_in = x.detach() if ctx.out_dtype is None else x.detach().to(ctx.out_dtype)
    rest = _reference_parameter_gradients(x_in, dy, (weight, bias, scale_shift), ctx.needs_input_grad[1:4],
                                          x.shape[1] // ctx.num_groups, ctx.eps)
    return (grad_x, *rest, None, None)


def _reference_parameter_gradients(x, dy, parameters, needed, group_size: int, eps: float) -> list:
    """Gradients for weights or timestep terms: nothing in CLIP guidance asks for them (frozen weights, a
    timestep embedding without grad), so the plain reference computes them when someone does."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(need) if t is not None else None
                  for t, need in zip(parameters, needed, strict=True)]
        y = group_norm_act(x, leaves[0], leaves[1], group_size, eps, *leaves[2:])
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(y, wanted, dy))
    return [next(grads) if t is not None and t.requires_grad else None for t in leaves]


class _GroupNormSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, scale_shift, num_groups, eps, out_dtype):
        return _forward(ctx, x, weight, bias, scale_shift, num_groups, eps, out_dtype)

    @staticmethod
    def backward(ctx, dy):
        return *_backward(ctx, dy), None


class _GroupNormSiLUAndInput(torch.autograd.Function):
    """``(group_norm_silu(x), x)``: the second output is ``x`` itself, to be used in its place (the skip
    connection), so that both of ``x``'s gradients arrive here and the backward kernel adds them as it writes
    ``dx``, where autograd would write ``dx`` and then read it back with the other gradient to sum them."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale_shift, num_groups, eps):
        return _forward(ctx, x, weight, bias, scale_shift, num_groups, eps), x.view_as(x)

    @staticmethod
    def backward(ctx, dy, d_input):
        return _backward(ctx, dy, d_input)


class _GroupNormSiLUOfPair(torch.autograd.Function):
    """``_GroupNormSiLUAndInput`` of ``torch.cat([a, b], 1)`` without the concatenation (a UNet output block's
    input: its running map and the encoder's skip). Each part's channels are whole groups, so each part's groups
    are normalised from the part itself into its channels of one output, and each part's gradient is written as a
    map of its own, its skip-path gradient added. Slicing a concatenation's gradient gave the convolutions
    strided maps, which they copied first. The second and third outputs are ``a`` and ``b`` themselves, for the
    skip path; what is kept for the backward is the two parts (the encoder's map is kept anyway) and two float32
    numbers per group."""

    @staticmethod
    def forward(ctx, a, b, weight, bias, num_groups, eps):
        split, channels = a.shape[1], a.shape[1] + b.shape[1]
        group_size = channels // num_groups
        if split % group_size or b.shape[0] != a.shape[0] or b.shape[2:] != a.shape[2:]:
            raise ValueError(f"a pair of {split} and {b.shape[1]} channels cannot be normalised in groups of "
                             f"{group_size} as parts: a group would straddle them (or their shapes differ)")
        a, _ = _flat_strides(a)
        b, _ = _flat_strides(b)
        channels_last = a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last) and a.shape[1] > 1
        y = torch.empty((a.shape[0], channels, *a.shape[2:]), device=a.device, dtype=a.dtype,
                        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        statistics = []
        for part, channel in ((a, slice(0, split)), (b, slice(split, channels))):
            mean, rstd = _statistics(part, group_size, eps)
            _normalise_into(y[:, channel], part, weight[channel], bias[channel], None, mean, rstd, group_size)
            statistics += [mean, rstd]
        ctx.save_for_backward(a, b, weight, bias, *statistics)
        ctx.group_size, ctx.eps = group_size, eps
        return y, a.view_as(a), b.view_as(b)

    @staticmethod
    def backward(ctx, dy, d_a, d_b):
        a, b, weight, bias, mean_a, rstd_a, mean_b, rstd_b = ctx.saved_tensors
        split, group_size = a.shape[1], ctx.group_size
        grads = [None, None]
        for i, (part, channel, mean, rstd, residual) in enumerate((
                (a, slice(0, split), mean_a, rstd_a, d_a), (b, slice(split, None), mean_b, rstd_b, d_b))):
            if ctx.needs_input_grad[i]:
                grads[i] = _input_gradient(part, dy[:, channel], weight[channel], bias[channel], None, mean, rstd,
                                           part.shape[1] // group_size, residual)
        rest = [None, None]
        if any(ctx.needs_input_grad[2:4]):
            rest = _reference_parameter_gradients(torch.cat([a.detach(), b.detach()], 1), dy, (weight, bias),
                                                  ctx.needs_input_grad[2:4], group_size, ctx.eps)
        return (*grads, *rest, None, None)


def _input_gradient(x, dy, weight, bias, scale_shift, mean, rstd, num_groups, residual=None):
    batch, channels, height, width = x.shape
    group_size, hw = channels // num_groups, height * width
    x, sx = _flat_strides(x)
    dy, sd = _flat_strides(dy)
    weight32, bias32, ss = _channel_arguments(weight, bias, scale_shift, batch, channels)
    block_hw, block_c = reduction_tile(group_size)
    splits, rows_per_split = _reduction_grid(batch, num_groups, hw, block_hw)
    rows = batch * num_groups
    partial = torch.empty(rows, splits, 2, device=x.device, dtype=torch.float32)
    _backward_stats_kernel[(rows, splits)](
        x, dy, partial, mean, rstd, weight32, bias32, ss, hw, channels, group_size, *sx, *sd, rows_per_split, splits,
        HAS_SCALE_SHIFT=scale_shift is not None, GROUP_ALIGN=group_alignment(group_size), BLOCK_HW=block_hw,
        BLOCK_C=block_c)
    c1, c2 = (torch.empty(rows, device=x.device, dtype=torch.float32) for _ in range(2))
    _backward_stats_merge_kernel[(triton.cdiv(rows, MERGE_TILE[0]),)](
        partial, c1, c2, rows, splits, float(group_size * hw), BLOCK_R=MERGE_TILE[0], BLOCK_S=MERGE_TILE[1])
    dx = torch.empty_like(x)
    _, so = _flat_strides(dx)
    residual, sr = _flat_strides(residual) if residual is not None else (dx, so)  # dx: a pointer never read
    block_hw, block_c = BACKWARD_TILE
    grid = (batch, triton.cdiv(hw, block_hw), triton.cdiv(channels, block_c))
    _backward_kernel[grid](x, dy, dx, mean, rstd, c1, c2, weight32, bias32, ss, residual, hw, channels, group_size,
                           *sx, *sd, *so, *sr, HAS_SCALE_SHIFT=scale_shift is not None,
                           HAS_RESIDUAL=residual is not dx, BLOCK_HW=block_hw, BLOCK_C=block_c)
    return dx


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, group_size: int, eps: float,
                    scale_shift: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`blended.fused_norm.group_norm_act` by the Triton kernels (same arguments, same result).

    ``out_dtype`` (default: ``x``'s) is the output's dtype: the function of ``x.to(out_dtype)`` without that
    copy, since the kernels compute in float32 whatever they read (the UNet's float32 ``out`` head on a bf16
    block output). The input's gradient comes back in ``x``'s dtype.
    """
    return _GroupNormSiLU.apply(x, weight, bias, scale_shift, x.shape[1] // group_size, eps, out_dtype)


def group_norm_silu_of_pair(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            group_size: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(group_norm_silu(torch.cat([a, b], 1), ...), a, b)`` without making the concatenation: use the returned
    ``a`` and ``b`` for the skip path, and their gradients are added inside the backward kernels. ``a``'s
    channels must be whole groups."""
    return _GroupNormSiLUOfPair.apply(a, b, weight, bias, (a.shape[1] + b.shape[1]) // group_size, eps)


def group_norm_silu_and_input(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, group_size: int,
                              eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(group_norm_silu(x, ...), x)``, for a block that also uses ``x`` itself (a ResBlock's skip path): use
    the returned ``x`` there, and its gradient is added to the norm's inside the backward kernel."""
    return _GroupNormSiLUAndInput.apply(x, weight, bias, None, x.shape[1] // group_size, eps)
