"""GroupNorm (+ the timestep scale-shift) + SiLU as hand-written Triton kernels: the ``triton_norm`` fast path.

Why: the H100 profile of a guided step (``benchmarks/gpu-notes.md``) spends about a fifth of its kernel time in
GroupNorm and SiLU, and eager GroupNorm cannot read channels_last activations without an NCHW copy, so the
convolutions must stay NCHW and pay their own layout copies (12% of the step). ``torch.compile`` with dynamic
shapes fuses the chain but its NHWC group reductions ran slower than eager (``blended.fused_norm``). These kernels
do the chain in the passes it needs, reading either memory format in place:

* forward: one split reduction, then one pass writing ``silu(((x - mean) * rstd * w + b) * (1 + scale) + shift)``
  (scale-shift before SiLU, as the UNet; the statistics, ``w``, ``b``, ``scale`` and ``shift`` folded into one
  multiply-add per element, as torch's own GroupNorm kernels fold theirs). The reduction's programs each take a
  block of 64 channels over a split of the pixels, so that in channels_last every pixel's load is 128 contiguous
  bytes. Reducing one group per program read a group's 8 channels (16 bytes of bf16) per pixel, strided by the
  whole row: on an H100 the statistics ran at about a quarter of the bandwidth of the pass that writes the map
  (``benchmarks/h100-2026-11-27-profile-triton-batch8.txt``). Each lane keeps its own running mean and M2
  (Welford's update), each channel's lanes are merged at the end, and a small kernel merges each group's channels
  and splits (Chan's parallel formula: a large mean costs no precision), where torch ops took 13 launches per
  norm. The splits keep every SM busy even at batch 1. Where the map was written by a ResBlock's residual sum,
  that kernel left these very partial sums on it (:mod:`blended.carried_statistics`) and the reduction is skipped:
  the merge reads them instead of the map;
* backward (input gradient only, which is all CLIP guidance needs; the frozen weights get theirs from the
  reference path if anyone asks): one split reduction of the two group sums GroupNorm's backward needs,
  recomputing the activation from ``x`` and laid out as the forward's (its parts merged by a small kernel too),
  then one pass writing ``dx`` (again one multiply-add for the terms of each column).

* a down ResBlock's first norm (``group_norm_silu_halving``): the forward pass writes its output and its input
  2x2-pooled, and the backward reads both poolings' half-size gradients in place, where ``avg_pool2d`` and its
  backward moved full-size maps of their own.

The passes that write a map loop over several tiles per program (``TILES_PER_PROGRAM``), so that gathering a
column's statistics and terms, as much work as a tile's own, is done once for all of them.

The host launches these kernels and nothing else (``scripts/kernel_report.py --launches``): at small batches a
step's pace on a GPU is its launches'.

Only ``x`` (in its own dtype) and two float32 numbers per group are kept for the backward. Each kernel is also
run by Triton's CPU interpreter in the tests (``TRITON_INTERPRET=1``), against :func:`blended.fused_norm
.group_norm_act`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import carried_statistics
from .fused_norm import group_norm_act

__all__ = ["group_norm_and_input", "group_norm_silu", "group_norm_silu_and_input", "group_norm_silu_halving",
           "group_norm_silu_of_pair"]

_TARGET_PROGRAMS = 2048  # split reductions until about this many programs run (an H100 has 132 SMs)
# Tiles per program at least: fewer, and the merges' partial sums would outgrow the work they save.
_MIN_TILES_PER_SPLIT = 8
# (pixels, channels) per loop iteration of the passes that write a map. The backward, with more registers per
# element, takes 16 pixels at a time: at 32 its variant adding two other gradients spilled on Blackwell.
FORWARD_TILE = (64, 64)
BACKWARD_TILE = (16, 64)
# An attention block's norm (no SiLU) keeps fewer terms and takes 32: at 16, Blackwell's compiler held it to 64
# registers and spilled.
AFFINE_BACKWARD_TILE = (32, 64)
# Tiles each program of those passes loops over, at most. A program first gathers its columns' statistics and
# terms: for a single 32-pixel tile of the backward that setup was as many instructions as the tile's own work,
# and the pass executed more instructions per byte than an H100 can issue at full bandwidth
# (``scripts/kernel_report.py``); over 8 tiles it is spread 8 times thinner.
TILES_PER_PROGRAM = 8
# A down block's halving forward reads four pixels of x for each it writes, which spreads the setup already, and
# keeps two running sums per element: at 64 pixels it needed 200 registers a thread.
HALVING_TILE = (32, 64)
# (pixels, channels) per loop iteration of the split reductions, by whether the channels are the contiguous axis
# (channels_last) or the pixels are (NCHW): 128 contiguous bytes of bf16 along that axis either way.
REDUCTION_TILE = {True: (32, 64), False: (64, 32)}
# Integers the JIT is told not to specialise on. By default it compiles a kernel anew for every argument that is 1
# or a multiple of 16, and these vary with the block and the batch for no gain: the group size, and the split
# count, which only places each program's partial sums. Specialising on them cost a 256x256 step 39 compiles at
# batch 1 and more at other batches (45 over batches 1, 4 and 16); the same few now serve every batch size
# (``scripts/kernel_report.py --cold-start``).
# x's width, which only the halving passes read, would specialise the 8-px blocks apart, and a part's first channel
# (0 but for the second of two parts) the parts apart. The passes that write a map take no split count.
_NOT_SPECIALISED = ("Cg", "W", "c0", "num_splits")
# The merges' integers: the rows and parts follow the batch. The statistics' merge takes each part's channels and
# splits (and the groups and group size) instead of a count of parts; those follow the block, the splits the batch.
_MERGE_NOT_SPECIALISED = ("rows", "num_parts")
_STATS_MERGE_NOT_SPECIALISED = ("rows", "G", "Cg", "C1", "splits1", "C2", "splits2")


@triton.jit
def program_pixels(HW, C, rows_per_program, BLOCK_C: tl.constexpr):
    # This program's batch index, its index along the pixels, its pixel range and its channel columns (and their
    # mask): each program takes ``rows_per_program`` pixels (whole tiles, the last program what is left) of one
    # sample's block of channels, and loops over them a tile at a time.
    b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: a batch of 64 at 256x256x512 passes 2**31 elements
    index = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    start = index * rows_per_program
    return b, index, cols, cols < C, start, tl.minimum(start + rows_per_program, HW)


@triton.jit
def _column_partial(partial_ptr, b, C, cols, split, num_splits, WIDTH: tl.constexpr):
    # Where each column's WIDTH partial numbers for this split go: [batch, channel, split, WIDTH], so that one
    # (sample, group)'s parts (its channels' splits) lie together, as the merges read them.
    return partial_ptr + ((b * C + cols) * num_splits + split) * WIDTH


@triton.jit
def welford_lanes(BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    # Each lane's running count (one per pixel row), mean and M2, before any tile.
    return (tl.zeros((BLOCK_HW,), dtype=tl.float32), tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float32),
            tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float32))


@triton.jit
def welford_tile(v, valid, r0, start, count, mean, m2, BLOCK_HW: tl.constexpr):
    # One tile of float32 values ``v`` (its rows ``valid``) into each lane's running count, mean and M2 (Welford's
    # update): no reduction across the program (shared memory and barriers) per tile. Every lane of a pixel row
    # has seen the same number of values, so the counts are kept per row. Only the last tile can be partial, so
    # every lane this tile updates has seen one value per tile so far: one reciprocal per tile serves them all.
    tiles = ((r0 - start) // BLOCK_HW + 1).to(tl.float32)
    delta = v - mean
    mean_next = mean + delta * (1.0 / tiles)
    m2 = tl.where(valid[:, None], m2 + delta * (v - mean_next), m2)
    mean = tl.where(valid[:, None], mean_next, mean)
    return tl.where(valid, tiles, count), mean, m2


@triton.jit
def store_channel_partials(partial_ptr, b, C, cols, c_mask, split, num_splits, count, mean, m2, ib_ptr,
                           HAS_INPUT_BIAS: tl.constexpr):
    # Each column's lanes merged as the merge kernel merges the columns' splits: the parts' M2s plus each part's
    # count times its mean's squared distance from the whole's mean (Chan's formula for many parts); then the
    # column's count, mean and M2 stored for this split.
    total = tl.sum(count, axis=0)
    column_mean = tl.sum(count[:, None] * mean, axis=0) / tl.maximum(total, 1.0)
    spread = mean - column_mean[None, :]
    column_m2 = tl.sum(m2 + count[:, None] * spread * spread, axis=0)
    if HAS_INPUT_BIAS:  # the norm is of x + bias[c]: a constant per channel moves its mean, not its M2
        column_mean += tl.load(ib_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)
    out = _column_partial(partial_ptr, b, C, cols, split, num_splits, 3)
    tl.store(out, tl.zeros_like(column_mean) + total, mask=c_mask)
    tl.store(out + 1, column_mean, mask=c_mask)
    tl.store(out + 2, column_m2, mask=c_mask)


@triton.jit(do_not_specialize=_NOT_SPECIALISED[3:])
def _stats_kernel(x_ptr, partial_ptr, ib_ptr, HW, C, stride_b, stride_hw, stride_c, rows_per_split, num_splits,
                  HAS_INPUT_BIAS: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    b, split, cols, c_mask, start, end = program_pixels(HW, C, rows_per_split, BLOCK_C)
    base = x_ptr + b * stride_b + cols * stride_c
    count, mean, m2 = welford_lanes(BLOCK_HW, BLOCK_C)
    for r0 in range(start, end, BLOCK_HW):
        pixels = r0 + tl.arange(0, BLOCK_HW)
        valid = pixels < end
        v = tl.load(base[None, :] + pixels[:, None] * stride_hw, mask=valid[:, None] & c_mask[None, :],
                    other=0.0).to(tl.float32)
        count, mean, m2 = welford_tile(v, valid, r0, start, count, mean, m2, BLOCK_HW)
    store_channel_partials(partial_ptr, b, C, cols, c_mask, split, num_splits, count, mean, m2, ib_ptr,
                           HAS_INPUT_BIAS)


# Rows (sample, group) and parts per program of the merges below. A row's parts are its channels' splits (up to a
# few thousand at batch 1), so a program takes few rows and many parts at a time.
MERGE_TILE = (8, 256)


@triton.jit
def _merge_rows(rows, BLOCK_R: tl.constexpr):
    # This program's rows of partial sums, and which exist.
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    return r, r < rows


@triton.jit
def _part_tile(partial_ptr, r, r_mask, s0, num_parts, WIDTH: tl.constexpr, BLOCK_S: tl.constexpr):
    # The [rows, parts] tile of partial sums from part s0 on: the address of each part's first of WIDTH numbers,
    # and the mask of those that exist.
    s = s0 + tl.arange(0, BLOCK_S)
    return partial_ptr + (r[:, None] * num_parts + s[None, :]) * WIDTH, r_mask[:, None] & (s < num_parts)[None, :]


@triton.jit
def _merge_part(partial_ptr, r, r_mask, G, Cg, first, C, num_splits, n, mean, m2, BLOCK_S: tl.constexpr):
    # The partial sums a part of the map's channels holds for each row (sample, group), merged into each lane's
    # running count, mean and M2 by Chan's formula. The part has C channels from channel ``first`` on, each with
    # ``num_splits`` splits laid out [sample, channel, split]: a row's channels in this part, and so its parts
    # here, lie together (none where the group lies wholly in the other part).
    sample = r // G
    group_first = (r - sample * G) * Cg - first
    lo = tl.minimum(tl.maximum(group_first, 0), C)
    hi = tl.minimum(tl.maximum(group_first + Cg, 0), C)
    row_start = (sample.to(tl.int64) * C + lo) * num_splits
    row_parts = (hi - lo) * num_splits
    for s0 in range(0, Cg * num_splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = r_mask[:, None] & (s[None, :] < row_parts[:, None])
        part = partial_ptr + (row_start[:, None] + s[None, :]) * 3
        n_part = tl.load(part, mask=mask, other=0.0)
        delta = tl.load(part + 1, mask=mask, other=0.0) - mean
        n_next = n + n_part
        share = n_part / tl.maximum(n_next, 1.0)
        mean += delta * share
        m2 += tl.load(part + 2, mask=mask, other=0.0) + delta * delta * n * share
        n = n_next
    return n, mean, m2


@triton.jit(do_not_specialize=_STATS_MERGE_NOT_SPECIALISED)
def _stats_merge_kernel(first_ptr, second_ptr, mean_ptr, rstd_ptr, rows, G, Cg, C1, splits1, C2, splits2, eps,
                        TWO_PARTS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    # Each row's parts merged in one pass: each lane merges the parts it meets into its own count, mean and M2,
    # and the lanes are merged once after the loops, as the reductions merge theirs (no cross-lane reduction,
    # nor its barriers, inside a loop). With TWO_PARTS the map's channels come as two parts (a concatenation not
    # made), each with its own partial sums and splits: C1 channels, then C2.
    r, r_mask = _merge_rows(rows, BLOCK_R)
    n = tl.zeros((BLOCK_R, BLOCK_S), dtype=tl.float32)
    mean = tl.zeros((BLOCK_R, BLOCK_S), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_R, BLOCK_S), dtype=tl.float32)
    n, mean, m2 = _merge_part(first_ptr, r, r_mask, G, Cg, 0, C1, splits1, n, mean, m2, BLOCK_S)
    if TWO_PARTS:
        n, mean, m2 = _merge_part(second_ptr, r, r_mask, G, Cg, C1, C2, splits2, n, mean, m2, BLOCK_S)
    total = tl.sum(n, axis=1)
    row_mean = tl.sum(n * mean, axis=1) / tl.maximum(total, 1.0)
    spread = mean - row_mean[:, None]
    row_m2 = tl.sum(m2 + n * spread * spread, axis=1)
    tl.store(mean_ptr + r, row_mean, mask=r_mask)
    tl.store(rstd_ptr + r, 1.0 / tl.sqrt(row_m2 / tl.maximum(total, 1.0) + eps), mask=r_mask)


@triton.jit(do_not_specialize=_MERGE_NOT_SPECIALISED)
def _backward_stats_merge_kernel(partial_ptr, c1_ptr, c2_ptr, rows, num_parts, count, BLOCK_R: tl.constexpr,
                                 BLOCK_S: tl.constexpr):
    # Each row's two gradient sums over its parts, as means over the group's elements. Tiles are added lane by
    # lane and summed across the lanes once, after the loop.
    r, r_mask = _merge_rows(rows, BLOCK_R)
    sum_dxhat = tl.zeros((BLOCK_R, BLOCK_S), dtype=tl.float32)
    sum_dxhat_xhat = tl.zeros((BLOCK_R, BLOCK_S), dtype=tl.float32)
    for s0 in range(0, num_parts, BLOCK_S):
        part, mask = _part_tile(partial_ptr, r, r_mask, s0, num_parts, 2, BLOCK_S)
        sum_dxhat += tl.load(part, mask=mask, other=0.0)
        sum_dxhat_xhat += tl.load(part + 1, mask=mask, other=0.0)
    tl.store(c1_ptr + r, tl.sum(sum_dxhat, axis=1) / count, mask=r_mask)
    tl.store(c2_ptr + r, tl.sum(sum_dxhat_xhat, axis=1) / count, mask=r_mask)


@triton.jit
def _channel_terms(mean_ptr, rstd_ptr, w_ptr, b_ptr, ss_ptr, ib_ptr, b, C, Cg, G, c0, cols, c_mask,
                   HAS_SCALE_SHIFT: tl.constexpr, HAS_INPUT_BIAS: tl.constexpr):
    # Per-column group statistics and the affine and timestep terms folded into one gain and one offset, as
    # [1, BLOCK_C] rows (and the statistics' index): two terms fewer for every element, and two fewer registers per
    # column, than the four kept apart. With an input bias (the norm of x + bias[c]) the column's mean is moved
    # by it instead, so that x is read as it is: (x + bias - mean) = (x - (mean - bias)).
    # G groups per sample; c0: the first channel's index in the map whose groups these are (x may be one part of
    # a wider map, whose groups may lie across two parts).
    stat = b * G + (c0 + cols) // Cg
    mean = tl.load(mean_ptr + stat, mask=c_mask, other=0.0)
    if HAS_INPUT_BIAS:
        mean -= tl.load(ib_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)
    mean = mean[None, :]
    rstd = tl.load(rstd_ptr + stat, mask=c_mask, other=0.0)[None, :]
    gain = tl.load(w_ptr + cols, mask=c_mask, other=0.0)
    offset = tl.load(b_ptr + cols, mask=c_mask, other=0.0)
    if HAS_SCALE_SHIFT:
        scale = 1.0 + tl.load(ss_ptr + b * 2 * C + cols, mask=c_mask, other=0.0).to(tl.float32)
        shift = tl.load(ss_ptr + b * 2 * C + C + cols, mask=c_mask, other=0.0).to(tl.float32)
        gain, offset = gain * scale, offset * scale + shift
    return stat, mean, rstd, gain[None, :], offset[None, :]


@triton.jit
def _folded_channel_terms(mean_ptr, rstd_ptr, w_ptr, b_ptr, ss_ptr, ib_ptr, b, C, Cg, G, c0, cols, c_mask,
                          HAS_SCALE_SHIFT: tl.constexpr, HAS_INPUT_BIAS: tl.constexpr):
    # :func:`_channel_terms` and the pre-SiLU activation z = ((x - mean) * rstd) * gain + offset as
    # x * scale + shift per column, the way torch's own GroupNorm kernels fold it: one multiply-add per element
    # where the terms apart took three.
    stat, mean, rstd, gain, offset = _channel_terms(mean_ptr, rstd_ptr, w_ptr, b_ptr, ss_ptr, ib_ptr, b, C, Cg, G,
                                                    c0, cols, c_mask, HAS_SCALE_SHIFT, HAS_INPUT_BIAS)
    scale = rstd * gain
    return stat, mean, rstd, gain, scale, offset - mean * scale


@triton.jit
def _activation(z, AFFINE_ONLY: tl.constexpr):
    # SiLU, or nothing for a plain GroupNorm (an attention block's).
    if AFFINE_ONLY:
        out = z
    else:
        out = z * tl.sigmoid(z)
    return out


@triton.jit
def _through_activation(dy, z, AFFINE_ONLY: tl.constexpr):
    # The gradient at z: dy * silu'(z), with silu'(z) = s(z) * (1 + z * (1 - s(z))); or dy itself.
    if AFFINE_ONLY:
        t = dy
    else:
        sig = tl.sigmoid(z)
        t = dy * (sig * (1.0 + z * (1.0 - sig)))
    return t


@triton.jit(do_not_specialize=_NOT_SPECIALISED[:3])
def _forward_kernel(x_ptr, y_ptr, xh_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, ss_ptr, ib_ptr, HW, W, C, Cg, G, c0,
                    rows_per_program, sx_b, sx_hw, sx_c, sy_b, sy_hw, sy_c, sh_b, sh_hw, sh_c,
                    HAS_SCALE_SHIFT: tl.constexpr, HAS_INPUT_BIAS: tl.constexpr, HALVING: tl.constexpr,
                    AFFINE_ONLY: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    # With HALVING the pixels are the output's, ``HW`` and ``W`` its pixel count and width (half x's): each is
    # the 2x2 average of the activation over x's window, and ``xh`` gets the same average of x itself.
    b, _, cols, c_mask, start, end = program_pixels(HW, C, rows_per_program, BLOCK_C)
    _, _, _, _, scale, shift = _folded_channel_terms(mean_ptr, rstd_ptr, w_ptr, b_ptr, ss_ptr, ib_ptr, b, C, Cg, G,
                                                     c0, cols, c_mask, HAS_SCALE_SHIFT, HAS_INPUT_BIAS)
    x_base = x_ptr + b * sx_b + cols[None, :] * sx_c
    y_base = y_ptr + b * sy_b + cols[None, :] * sy_c
    for r0 in range(start, end, BLOCK_HW):
        rows = r0 + tl.arange(0, BLOCK_HW)
        mask = (rows < end)[:, None] & c_mask[None, :]
        if HALVING:
            # Output pixel (i, j) = rows is x's (2i, 2j) = 2i * 2W + 2j, and its window's other three follow.
            # One tile of pointers to the windows' top left pixels; each tap is a scalar offset from it.
            window = x_base + (2 * (rows + rows // W * W))[:, None] * sx_hw
            y = tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float32)
            x_sum = tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float32)
            for tap in tl.static_range(4):
                v = tl.load(window + ((tap // 2) * 2 * W + tap % 2) * sx_hw, mask=mask, other=0.0).to(tl.float32)
                # Each activation rounded to the output's dtype before the sum, in the window's row order, as the
                # norm's map was and as avg_pool2d sums it: the same sums as the two ops apart.
                y += _activation(v * scale + shift, AFFINE_ONLY).to(y_ptr.dtype.element_ty).to(tl.float32)
                x_sum += v
            y = y * 0.25
            tl.store(xh_ptr + b * sh_b + rows[:, None] * sh_hw + cols[None, :] * sh_c,
                     (x_sum * 0.25).to(xh_ptr.dtype.element_ty), mask=mask)
        else:
            v = tl.load(x_base + rows[:, None] * sx_hw, mask=mask, other=0.0)
            y = _activation(v.to(tl.float32) * scale + shift, AFFINE_ONLY)
        tl.store(y_base + rows[:, None] * sy_hw, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def half_size_pixels(pixels, W, HALF: tl.constexpr):
    # The pixels of a map of width ``W`` as indices into a map of half its height and width (each 2x2 window's
    # one pixel: the 2x2 pooling's output, or the map a nearest 2x upsampling read), or, without HALF, themselves.
    if HALF:
        row = pixels // W
        return row // 2 * (W // 2) + (pixels - row * W) // 2
    return pixels


@triton.jit(do_not_specialize=_NOT_SPECIALISED)
def _backward_stats_kernel(x_ptr, dy_ptr, partial_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, ss_ptr, ib_ptr, HW, W, C,
                           PC, Cg, G, c0, sx_b, sx_hw, sx_c, sd_b, sd_hw, sd_c, rows_per_split, num_splits,
                           HAS_SCALE_SHIFT: tl.constexpr, HAS_INPUT_BIAS: tl.constexpr, HALVING: tl.constexpr,
                           AFFINE_ONLY: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    # The sums of dxhat = dy * silu'(z) * gain (dy * gain with AFFINE_ONLY) and of dxhat * xhat.
    b, split, cols, c_mask, start, end = program_pixels(HW, C, rows_per_split, BLOCK_C)
    _, mean, rstd, gain, scale, shift = _folded_channel_terms(mean_ptr, rstd_ptr, w_ptr, b_ptr, ss_ptr, ib_ptr, b, C,
                                                              Cg, G, c0, cols, c_mask, HAS_SCALE_SHIFT, HAS_INPUT_BIAS)
    centre = -mean * rstd  # xhat = x * rstd + centre
    x_base = x_ptr + b * sx_b + cols * sx_c
    dy_base = dy_ptr + b * sd_b + cols * sd_c
    sum_dxhat = tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float32)  # per lane, summed once after the loop
    sum_dxhat_xhat = tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_HW):
        pixels = r0 + tl.arange(0, BLOCK_HW)
        mask = (pixels < end)[:, None] & c_mask[None, :]
        v = tl.load(x_base[None, :] + pixels[:, None] * sx_hw, mask=mask, other=0.0).to(tl.float32)
        # A masked lane reads a zero gradient, so its dxhat is zero and adds nothing.
        dy = tl.load(dy_base[None, :] + half_size_pixels(pixels, W, HALVING)[:, None] * sd_hw, mask=mask,
                     other=0.0).to(tl.float32)
        if HALVING:
            dy = dy * 0.25
        dxhat = _through_activation(dy, v * scale + shift, AFFINE_ONLY) * gain
        sum_dxhat += dxhat
        sum_dxhat_xhat += dxhat * (v * rstd + centre)
    out = _column_partial(partial_ptr, b, PC, cols, split, num_splits, 2)
    tl.store(out, tl.sum(sum_dxhat, axis=0), mask=c_mask)
    tl.store(out + 1, tl.sum(sum_dxhat_xhat, axis=0), mask=c_mask)


@triton.jit(do_not_specialize=_NOT_SPECIALISED[:3])
def _backward_kernel(x_ptr, dy_ptr, dx_ptr, mean_ptr, rstd_ptr, c1_ptr, c2_ptr, w_ptr, b_ptr, ss_ptr, ib_ptr, r_ptr,
                     r2_ptr, HW, W, C, Cg, G, c0, rows_per_program, sx_b, sx_hw, sx_c, sd_b, sd_hw, sd_c, so_b, so_hw,
                     so_c, sr_b, sr_hw, sr_c, sr2_b, sr2_hw, sr2_c, HAS_SCALE_SHIFT: tl.constexpr,
                     HAS_INPUT_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_SECOND_RESIDUAL: tl.constexpr,
                     HALVING: tl.constexpr, AFFINE_ONLY: tl.constexpr, BLOCK_HW: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    # With HALVING the output's gradient and the first residual's come at half size (2x2 average poolings of the
    # norm's output and of x: a quarter of each window's gradient to each of its pixels, read where
    # half_size_pixels says).
    b, _, cols, c_mask, start, end = program_pixels(HW, C, rows_per_program, BLOCK_C)
    stat, mean, rstd, _, scale, shift = _folded_channel_terms(mean_ptr, rstd_ptr, w_ptr, b_ptr, ss_ptr, ib_ptr, b, C,
                                                              Cg, G, c0, cols, c_mask, HAS_SCALE_SHIFT, HAS_INPUT_BIAS)
    c1 = tl.load(c1_ptr + stat, mask=c_mask, other=0.0)[None, :]
    c2 = tl.load(c2_ptr + stat, mask=c_mask, other=0.0)[None, :]
    # dx = rstd * (dxhat - c1 - xhat * c2), with dxhat = t * gain, t = dy * silu'(z) and xhat = (x - mean) * rstd:
    # t * scale + (x * slope + intercept), the way torch's GroupNorm backward folds it.
    slope = -(rstd * rstd * c2)
    intercept = -(slope * mean) - rstd * c1
    for r0 in range(start, end, BLOCK_HW):
        rows = r0 + tl.arange(0, BLOCK_HW)
        mask = (rows < end)[:, None] & c_mask[None, :]
        v = tl.load(x_ptr + b * sx_b + rows[:, None] * sx_hw + cols[None, :] * sx_c, mask=mask,
                    other=0.0).to(tl.float32)
        halved = half_size_pixels(rows, W, HALVING)
        dy = tl.load(dy_ptr + b * sd_b + halved[:, None] * sd_hw + cols[None, :] * sd_c, mask=mask,
                     other=0.0).to(tl.float32)
        if HALVING:
            dy = dy * 0.25
        t = _through_activation(dy, v * scale + shift, AFFINE_ONLY)
        dx = t * scale + (v * slope + intercept)
        if HAS_RESIDUAL:  # x's gradient along its other path (the skip connection), added before the one rounding
            r = tl.load(r_ptr + b * sr_b + halved[:, None] * sr_hw + cols[None, :] * sr_c, mask=mask,
                        other=0.0).to(tl.float32)
            if HALVING:
                r = r * 0.25
            dx = dx + r
        if HAS_SECOND_RESIDUAL:  # and along a third (the UNet's skip stack, for an encoder block's input)
            r2 = tl.load(r2_ptr + b * sr2_b + rows[:, None] * sr2_hw + cols[None, :] * sr2_c, mask=mask, other=0.0)
            dx = dx + r2.to(tl.float32)
        tl.store(dx_ptr + b * so_b + rows[:, None] * so_hw + cols[None, :] * so_c, dx.to(dx_ptr.dtype.element_ty),
                 mask=mask)


def flat_strides(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(tensor, (batch, pixel, channel) strides): H and W merge into one pixel stride in NCHW and NHWC alike."""
    if t.shape[2] > 1 and t.shape[3] > 1 and t.stride(2) != t.shape[3] * t.stride(3):
        t = t.contiguous()
    return t, (t.stride(0), t.stride(3) if t.shape[3] > 1 else t.stride(2), t.stride(1))


def _channel_arguments(weight, bias, scale_shift, input_bias, batch: int, channels: int):
    """Float32 affine parameters, and the [B, 2C] timestep terms and the input bias as the kernels read them (in
    their own dtype: a cast here would be one more launch per norm and per backward). Without scale-shift or input
    bias the weight stands in as a valid pointer that HAS_SCALE_SHIFT=False or HAS_INPUT_BIAS=False never reads."""
    weight32, bias32 = weight.float().contiguous(), bias.float().contiguous()
    ss = scale_shift.reshape(batch, 2 * channels).contiguous() if scale_shift is not None else weight32
    return weight32, bias32, ss, _input_bias_argument(input_bias, weight32)


def _input_bias_argument(input_bias, placeholder):
    return input_bias.contiguous() if input_bias is not None else placeholder


@dataclass(frozen=True)
class ReductionGrid:
    """How a split reduction over a [B, C, H, W] map is launched: programs over (sample, split of the pixels,
    block of channels), each looping over its pixels in tiles and leaving one partial result per channel. A
    (sample, group)'s parts are then its channels' splits, ``parts`` of them, which the merge kernels reduce."""

    batch: int
    channels: int
    splits: int
    rows_per_split: int
    tile: tuple[int, int]
    parts: int

    @property
    def launch(self) -> tuple[int, int, int]:
        return self.launch_for(self.channels)

    def launch_for(self, channels: int) -> tuple[int, int, int]:
        """The launch over a part of the map of ``channels`` channels (all of them, or one of two parts)."""
        return self.batch, self.splits, triton.cdiv(channels, self.tile[1])

    def partial_sums(self, width: int, device) -> torch.Tensor:
        return torch.empty(self.batch * self.channels * self.splits * width, device=device, dtype=torch.float32)

    def partial_sums_from(self, partial: torch.Tensor, first_channel: int, width: int) -> torch.Tensor:
        """Where the partial sums of the part whose channels start at ``first_channel`` begin."""
        return partial[first_channel * self.splits * width:]


def pass_launch(batch: int, channels: int, hw: int, tile: tuple[int, int],
                target: int = _TARGET_PROGRAMS) -> tuple[tuple[int, int, int], int]:
    """The grid of a pass that writes a map, and the pixels each program takes: up to ``TILES_PER_PROGRAM`` tiles,
    fewer where the map is small, so that about ``target`` programs still run."""
    column_blocks = triton.cdiv(channels, tile[1])
    tiles = triton.cdiv(hw, tile[0])
    per_program = max(1, min(TILES_PER_PROGRAM, tiles * batch * column_blocks // target))
    rows_per_program = per_program * tile[0]
    return (batch, triton.cdiv(hw, rows_per_program), column_blocks), rows_per_program


def reduction_grid(batch: int, channels: int, hw: int, group_size: int, channels_contiguous: bool) -> ReductionGrid:
    """Enough splits of the pixels that about ``_TARGET_PROGRAMS`` programs run (so even batch 1 fills the
    card), but no fewer than ``_MIN_TILES_PER_SPLIT`` tiles each."""
    tile = REDUCTION_TILE[channels_contiguous]
    programs_per_split = batch * triton.cdiv(channels, tile[1])
    splits = max(1, min(triton.cdiv(_TARGET_PROGRAMS, programs_per_split),
                        triton.cdiv(hw, _MIN_TILES_PER_SPLIT * tile[0])))
    rows_per_split = triton.cdiv(triton.cdiv(hw, splits), tile[0]) * tile[0]
    splits = triton.cdiv(hw, rows_per_split)
    return ReductionGrid(batch, channels, splits, rows_per_split, tile, group_size * splits)


def _reduction_grid_of(parts, group_size: int) -> ReductionGrid:
    """One grid for ``parts`` side by side (their channels together): their splits' partial sums then lie as one
    map's, and a group across two parts is merged like any other."""
    batch, _, height, width = parts[0].shape
    _, strides = flat_strides(parts[0])
    channels = sum(part.shape[1] for part in parts)
    return reduction_grid(batch, channels, height * width, group_size, strides[2] == 1 and channels > 1)


def _first_channels(parts) -> list[int]:
    return [sum(part.shape[1] for part in parts[:i]) for i in range(len(parts))]


def _merge_launch(rows: int) -> tuple[int]:
    return (triton.cdiv(rows, MERGE_TILE[0]),)


def _statistics(x, group_size: int, eps: float, input_bias=None):
    """Each (sample, group)'s mean and 1/std over ``x`` (plus ``input_bias`` per channel): float32, [B * groups]."""
    return _statistics_of_parts((x,), group_size, eps, input_bias)


def _statistics_of_parts(parts, group_size: int, eps: float, input_bias=None):
    """:func:`_statistics` of ``parts`` (one or two) side by side, as of their concatenation along the channels,
    which is not made (a group may lie across two parts). ``input_bias`` is for a single part. A part that carries
    the partial sums the kernel that wrote it left (:mod:`blended.carried_statistics`) is not read again."""
    if len(parts) > 2:
        raise ValueError(f"the statistics merge one or two parts of a map, not {len(parts)}")
    sources = [(*_channel_partials(part, input_bias), part.shape[1]) for part in parts]
    (first, splits1, channels1), (second, splits2, channels2) = sources + [(sources[0][0], 1, 0)] * (2 - len(parts))
    batch = parts[0].shape[0]
    groups = (channels1 + channels2) // group_size
    rows = batch * groups
    mean, rstd = (torch.empty(rows, device=parts[0].device, dtype=torch.float32) for _ in range(2))
    _stats_merge_kernel[_merge_launch(rows)](first, second, mean, rstd, rows, groups, group_size, channels1, splits1,
                                             channels2, splits2, eps, TWO_PARTS=len(parts) == 2,
                                             BLOCK_R=MERGE_TILE[0], BLOCK_S=MERGE_TILE[1])
    return mean, rstd


def statistics_grid(x: torch.Tensor) -> ReductionGrid:
    """How the statistics pass splits a map of its own (and how :mod:`blended.triton_residual` splits the map it
    writes, so that the partial sums it leaves are the bits this pass would have written)."""
    return _reduction_grid_of((x,), 1)


def _channel_partials(x, input_bias=None) -> tuple[torch.Tensor, int]:
    """``x``'s partial sums ([B, C, splits, 3] float32, flattened) and their splits: those ``x`` carries, or the
    statistics pass's (of ``x`` plus ``input_bias`` per channel)."""
    batch, channels, height, width = x.shape
    partials = carried_statistics.carried(x) if input_bias is None else None
    if partials is not None and partials.sums.numel() == batch * channels * partials.splits * 3:
        return partials.sums, partials.splits
    grid = statistics_grid(x)
    x, sx = flat_strides(x)
    sums = grid.partial_sums(3, x.device)
    _stats_kernel[grid.launch](x, sums, _input_bias_argument(input_bias, sums), height * width, channels, *sx,
                               grid.rows_per_split, grid.splits, HAS_INPUT_BIAS=input_bias is not None,
                               BLOCK_HW=grid.tile[0], BLOCK_C=grid.tile[1])
    return sums, grid.splits


def _normalise_into(y, x, weight, bias, scale_shift, mean, rstd, group_size: int, input_bias=None,
                    halved_input=None, place: tuple[int, int] | None = None, affine_only: bool = False) -> None:
    """Write ``silu`` of the normalised, affine (and scale-shifted) ``x`` into ``y``, which may be a channel
    slice of a larger map (its strides are read as they are). With ``halved_input`` (a map of half ``x``'s height
    and width, as ``y`` is then) both are 2x2 average poolings: of the activation and of ``x``. ``place``: ``x``
    is the part from this channel on of a map of that many, whose groups ``mean`` and ``rstd`` hold.
    ``affine_only``: no SiLU (a plain GroupNorm)."""
    batch, channels, height, width = y.shape
    x, sx = flat_strides(x)
    y_flat, sy = flat_strides(y)
    if y_flat is not y:
        raise ValueError("the output must merge H and W into one pixel stride (NCHW, NHWC or a channel slice)")
    xh, sh = flat_strides(halved_input) if halved_input is not None else (y, sy)  # y: a pointer never written
    weight32, bias32, ss, ib = _channel_arguments(weight, bias, scale_shift, input_bias, batch, channels)
    first, total = place or (0, channels)
    tile = FORWARD_TILE if halved_input is None else HALVING_TILE
    grid, rows_per_program = pass_launch(batch, channels, height * width, tile)
    _forward_kernel[grid](x, y, xh, mean, rstd, weight32, bias32, ss, ib, height * width, width, channels, group_size,
                          total // group_size, first, rows_per_program, *sx, *sy, *sh,
                          HAS_SCALE_SHIFT=scale_shift is not None, HAS_INPUT_BIAS=input_bias is not None,
                          HALVING=halved_input is not None, AFFINE_ONLY=affine_only, BLOCK_HW=tile[0],
                          BLOCK_C=tile[1])


def _forward(ctx, x, weight, bias, scale_shift, num_groups, eps, out_dtype=None, input_bias=None,
             affine_only: bool = False):
    group_size = x.shape[1] // num_groups
    x, _ = flat_strides(x)
    mean, rstd = _statistics(x, group_size, eps, input_bias)
    y = torch.empty_like(x, dtype=out_dtype or x.dtype)
    _normalise_into(y, x, weight, bias, scale_shift, mean, rstd, group_size, input_bias, affine_only=affine_only)
    _keep_for_backward(ctx, x, weight, bias, scale_shift, input_bias, mean, rstd, num_groups, eps, out_dtype,
                       affine_only)
    return y


def _keep_for_backward(ctx, x, weight, bias, scale_shift, input_bias, mean, rstd, num_groups, eps, out_dtype=None,
                       affine_only: bool = False):
    ctx.save_for_backward(x, weight, bias, scale_shift, input_bias, mean, rstd)
    ctx.num_groups, ctx.eps, ctx.out_dtype, ctx.affine_only = num_groups, eps, out_dtype, affine_only


def _half_size_like(x: torch.Tensor) -> torch.Tensor:
    batch, channels, height, width = x.shape
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and channels > 1
    return torch.empty((batch, channels, height // 2, width // 2), device=x.device, dtype=x.dtype,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _backward(ctx, saved: tuple, dy, needed: tuple, residuals=(), halving: bool = False):
    """``x``'s gradient and, where ``needed`` says, those of the weight, bias, timestep terms and input bias.
    ``saved``: ``ctx.saved_tensors``, which a backward must read only once (activation checkpointing's hooks
    refuse a second unpacking). ``halving``: ``dy`` and the first residual are the gradients of 2x2 average
    poolings (:func:`group_norm_silu_halving`)."""
    x, weight, bias, scale_shift, input_bias, mean, rstd = saved
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = _input_gradient(x, dy, weight, bias, scale_shift, mean, rstd, ctx.num_groups, residuals, input_bias,
                                 halving, ctx.affine_only)
    if not any(needed):
        return grad_x, [None] * 4
    x_in = x.detach() if ctx.out_dtype is None else x.detach().to(ctx.out_dtype)
    if halving:  # the pooling's gradient: a quarter of each window's to each of its pixels
        dy = torch.nn.functional.interpolate(dy * 0.25, scale_factor=2, mode="nearest")
    return grad_x, _reference_parameter_gradients(x_in, dy, (weight, bias, scale_shift, input_bias), needed,
                                                  x.shape[1] // ctx.num_groups, ctx.eps, ctx.affine_only)


def reference(x, weight, bias, group_size: int, eps: float, scale_shift=None, affine_only: bool = False):
    """What the kernels compute, by plain torch ops in float32: :func:`blended.fused_norm.group_norm_act`, or
    with ``affine_only`` the GroupNorm alone."""
    if affine_only:
        return F.group_norm(x.float(), x.shape[1] // group_size, weight.float(), bias.float(), eps).to(x.dtype)
    return group_norm_act(x, weight, bias, group_size, eps, scale_shift)


def _reference_parameter_gradients(x, dy, parameters, needed, group_size: int, eps: float,
                                   affine_only: bool = False) -> list:
    """Gradients for the weight, bias, timestep terms or input bias: nothing in CLIP guidance asks for them
    (frozen weights, a timestep embedding without grad), so the plain reference computes them when someone
    does. In NCHW: torch 2.11's CPU GroupNorm backward crashes the process on a channels_last input when only
    the affine parameters want gradients (2.14's does not), and this rare path can afford the copy."""
    x, dy = x.contiguous(), dy.contiguous()
    with torch.enable_grad():
        weight, bias, scale_shift, input_bias = leaves = [
            t.detach().requires_grad_(need) if t is not None else None
            for t, need in zip(parameters, needed, strict=True)]
        if input_bias is not None:
            x = x + input_bias.view(1, -1, 1, 1).to(x.dtype)
        y = reference(x, weight, bias, group_size, eps, scale_shift, affine_only)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(y, wanted, dy))
    return [next(grads) if t is not None and t.requires_grad else None for t in leaves]


class _GroupNormSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, scale_shift, num_groups, eps, out_dtype, input_bias):
        return _forward(ctx, x, weight, bias, scale_shift, num_groups, eps, out_dtype, input_bias)

    @staticmethod
    def backward(ctx, dy):
        grad_x, (weight, bias, scale_shift, input_bias) = _backward(
            ctx, ctx.saved_tensors, dy, ctx.needs_input_grad[1:4] + ctx.needs_input_grad[7:8])
        return grad_x, weight, bias, scale_shift, None, None, None, input_bias


class _GroupNormSiLUAndInput(torch.autograd.Function):
    """``(group_norm_silu(x), x)`` or, with ``aliases=2``, ``(group_norm_silu(x), x, x)``: the outputs after the
    first are ``x`` itself, each to be used in its place (the skip connection; the UNet's skip stack), so that all
    of ``x``'s gradients arrive here and the backward kernel adds them as it writes ``dx``, where autograd would
    write ``dx`` and then read it back with each other gradient to sum them. ``affine_only``: the GroupNorm
    without SiLU (an attention block's, whose residual sum uses ``x``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale_shift, num_groups, eps, aliases, affine_only=False):
        ctx.set_materialize_grads(False)  # an alias nobody used sends no gradient, and adds none
        y = _forward(ctx, x, weight, bias, scale_shift, num_groups, eps, affine_only=affine_only)
        return (y, *(x.view_as(x) for _ in range(aliases)))

    @staticmethod
    def backward(ctx, dy, *d_aliases):
        saved = ctx.saved_tensors
        dy = torch.zeros_like(saved[0]) if dy is None else dy
        residuals = tuple(d for d in d_aliases if d is not None)
        grad_x, (weight, bias, scale_shift, _) = _backward(ctx, saved, dy, (*ctx.needs_input_grad[1:4], False),
                                                           residuals)
        return grad_x, weight, bias, scale_shift, None, None, None, None


class _GroupNormSiLUHalving(torch.autograd.Function):
    """``(avg_pool2d(group_norm_silu(x), 2), avg_pool2d(x, 2))`` and, with ``aliases=1``, ``x`` too: a down
    ResBlock's input norm, whose output and skip input are both pooled before use. The pass that writes the
    activation writes it pooled and pools ``x`` as it reads it, and the backward kernels read the poolings'
    half-size gradients in place, where the poolings read and wrote full-size maps of their own both ways. The
    third output is ``x`` itself, for the UNet's skip stack, whose gradient the backward kernel adds."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, aliases):
        ctx.set_materialize_grads(False)
        if x.shape[2] % 2 or x.shape[3] % 2:
            raise ValueError(f"a 2x2 pooling needs an even height and width, not {x.shape[2]}x{x.shape[3]}")
        x, _ = flat_strides(x)
        group_size = x.shape[1] // num_groups
        mean, rstd = _statistics(x, group_size, eps)
        y, x_half = _half_size_like(x), _half_size_like(x)
        _normalise_into(y, x, weight, bias, None, mean, rstd, group_size, halved_input=x_half)
        _keep_for_backward(ctx, x, weight, bias, None, None, mean, rstd, num_groups, eps)
        return (y, x_half, *(x.view_as(x) for _ in range(aliases)))

    @staticmethod
    def backward(ctx, dy, d_half, *d_aliases):
        saved = ctx.saved_tensors
        # Nobody leaves either pooling unused; a zero gradient keeps the kernel's first residual the half-size one.
        dy, d_half = (_half_size_like(saved[0]).zero_() if d is None else d for d in (dy, d_half))
        residuals = (d_half, *(d for d in d_aliases if d is not None))
        grad_x, (weight, bias, _, _) = _backward(ctx, saved, dy, (*ctx.needs_input_grad[1:3], False, False),
                                                 residuals, halving=True)
        return grad_x, weight, bias, None, None, None


class _GroupNormSiLUOfPair(torch.autograd.Function):
    """``_GroupNormSiLUAndInput`` of ``torch.cat([a, b], 1)`` without the concatenation (a UNet output block's
    input: its running map and the encoder's skip). The statistics' and gradient sums' passes read each part in
    place into one set of partial sums laid out as the concatenation's, so a group lying across the two parts is
    reduced like any other; each part is then normalised into its channels of one output, and each part's
    gradient is written as a map of its own, its skip-path gradient added. Slicing a concatenation's gradient
    gave the convolutions strided maps, which they copied first. The second and third outputs are ``a`` and ``b``
    themselves, for the skip path; what is kept for the backward is the two parts (the encoder's map is kept
    anyway) and two float32 numbers per group."""

    @staticmethod
    def forward(ctx, a, b, weight, bias, num_groups, eps):
        split, channels = a.shape[1], a.shape[1] + b.shape[1]
        group_size = channels // num_groups
        if b.shape[0] != a.shape[0] or b.shape[2:] != a.shape[2:] or channels % num_groups:
            raise ValueError(f"maps of {tuple(a.shape)} and {tuple(b.shape)} cannot be normalised as the two parts of "
                             f"one map in {num_groups} groups")
        a, _ = flat_strides(a)
        b, _ = flat_strides(b)
        channels_last = a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last) and a.shape[1] > 1
        y = torch.empty((a.shape[0], channels, *a.shape[2:]), device=a.device, dtype=a.dtype,
                        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        mean, rstd = _statistics_of_parts((a, b), group_size, eps)
        for part, first in ((a, 0), (b, split)):
            channel = slice(first, first + part.shape[1])
            _normalise_into(y[:, channel], part, weight[channel], bias[channel], None, mean, rstd, group_size,
                            place=(first, channels))
        ctx.save_for_backward(a, b, weight, bias, mean, rstd)
        ctx.group_size, ctx.eps = group_size, eps
        return y, a.view_as(a), b.view_as(b)

    @staticmethod
    def backward(ctx, dy, d_a, d_b):
        a, b, weight, bias, mean, rstd = ctx.saved_tensors
        split, group_size = a.shape[1], ctx.group_size
        channels = split + b.shape[1]
        parts = [(part, dy[:, first:first + part.shape[1]], weight[first:first + part.shape[1]],
                  bias[first:first + part.shape[1]]) for part, first in ((a, 0), (b, split))]
        grads = [None, None]
        if any(ctx.needs_input_grad[:2]):
            c1, c2 = _gradient_sums(parts, None, None, mean, rstd, group_size)
            for i, ((part, d_part, w, bb), first, residual) in enumerate(zip(parts, (0, split), (d_a, d_b),
                                                                             strict=True)):
                if ctx.needs_input_grad[i]:
                    grads[i] = _write_input_gradient(part, d_part, w, bb, None, None, mean, rstd, c1, c2, group_size,
                                                     () if residual is None else (residual,),
                                                     place=(first, channels))
        rest = [None, None]
        if any(ctx.needs_input_grad[2:4]):
            rest = _reference_parameter_gradients(torch.cat([a.detach(), b.detach()], 1), dy,
                                                  (weight, bias, None, None), (*ctx.needs_input_grad[2:4], False,
                                                                               False), group_size, ctx.eps)[:2]
        return (*grads, *rest, None, None)


def _input_gradient(x, dy, weight, bias, scale_shift, mean, rstd, num_groups, residuals=(), input_bias=None,
                    halving: bool = False, affine_only: bool = False):
    """``x``'s gradient, with ``residuals`` (up to two: its gradients along other paths) added before the one
    rounding. ``halving``: ``dy`` and the first residual are at half ``x``'s height and width, the gradients of
    2x2 average poolings of the norm's output and of ``x``. ``affine_only``: of the GroupNorm without SiLU."""
    group_size = x.shape[1] // num_groups
    c1, c2 = _gradient_sums(((x, dy, weight, bias),), scale_shift, input_bias, mean, rstd, group_size, halving,
                            affine_only)
    return _write_input_gradient(x, dy, weight, bias, scale_shift, input_bias, mean, rstd, c1, c2, group_size,
                                 residuals, halving, affine_only=affine_only)


def _gradient_sums(parts, scale_shift, input_bias, mean, rstd, group_size: int, halving: bool = False,
                   affine_only: bool = False):
    """The two per-group means GroupNorm's input gradient needs (of dxhat and of dxhat * xhat), over ``parts``,
    each ``(x, dy, weight, bias)`` with ``x`` one part of a map's channels, side by side as in
    :func:`_statistics_of_parts` (scale-shift and input bias for a single part)."""
    grid = _reduction_grid_of([x for x, *_ in parts], group_size)
    batch, _, height, width = parts[0][0].shape
    hw, groups = height * width, grid.channels // group_size
    partial = grid.partial_sums(2, parts[0][0].device)
    for (x, dy, weight, bias), first in zip(parts, _first_channels([x for x, *_ in parts]), strict=True):
        x, sx = flat_strides(x)
        dy, sd = flat_strides(dy)
        weight32, bias32, ss, ib = _channel_arguments(weight, bias, scale_shift, input_bias, batch, x.shape[1])
        _backward_stats_kernel[grid.launch_for(x.shape[1])](
            x, dy, grid.partial_sums_from(partial, first, 2), mean, rstd, weight32, bias32, ss, ib, hw, width,
            x.shape[1], grid.channels, group_size, groups, first, *sx, *sd, grid.rows_per_split, grid.splits,
            HAS_SCALE_SHIFT=scale_shift is not None, HAS_INPUT_BIAS=input_bias is not None, HALVING=halving,
            AFFINE_ONLY=affine_only, BLOCK_HW=grid.tile[0], BLOCK_C=grid.tile[1])
    rows = batch * groups
    c1, c2 = (torch.empty(rows, device=partial.device, dtype=torch.float32) for _ in range(2))
    _backward_stats_merge_kernel[_merge_launch(rows)](
        partial, c1, c2, rows, grid.parts, float(group_size * hw), BLOCK_R=MERGE_TILE[0], BLOCK_S=MERGE_TILE[1])
    return c1, c2


def _write_input_gradient(x, dy, weight, bias, scale_shift, input_bias, mean, rstd, c1, c2, group_size: int,
                          residuals=(), halving: bool = False, place: tuple[int, int] | None = None,
                          affine_only: bool = False):
    """The pass that writes ``x``'s gradient from the group sums (``place`` as for :func:`_normalise_into`)."""
    batch, channels, height, width = x.shape
    hw = height * width
    first, total = place or (0, channels)
    x, sx = flat_strides(x)
    dy, sd = flat_strides(dy)
    weight32, bias32, ss, ib = _channel_arguments(weight, bias, scale_shift, input_bias, batch, channels)
    dx = torch.empty_like(x)
    _, so = flat_strides(dx)
    if len(residuals) > 2:
        raise ValueError(f"the backward kernel adds at most two other gradients, not {len(residuals)}")
    # dx stands in for the residuals not given: a pointer never read.
    (r, sr), (r2, sr2) = [flat_strides(t) for t in residuals] + [(dx, so)] * (2 - len(residuals))
    tile = AFFINE_BACKWARD_TILE if affine_only else BACKWARD_TILE
    grid, rows_per_program = pass_launch(batch, channels, hw, tile)
    _backward_kernel[grid](x, dy, dx, mean, rstd, c1, c2, weight32, bias32, ss, ib, r, r2, hw, width, channels,
                           group_size, total // group_size, first, rows_per_program, *sx, *sd, *so, *sr, *sr2,
                           HAS_SCALE_SHIFT=scale_shift is not None, HAS_INPUT_BIAS=input_bias is not None,
                           HAS_RESIDUAL=len(residuals) > 0, HAS_SECOND_RESIDUAL=len(residuals) > 1, HALVING=halving,
                           AFFINE_ONLY=affine_only, BLOCK_HW=tile[0], BLOCK_C=tile[1])
    return dx


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, group_size: int, eps: float,
                    scale_shift: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                    input_bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`blended.fused_norm.group_norm_act` by the Triton kernels (same arguments, same result).

    ``out_dtype`` (default: ``x``'s) is the output's dtype: the function of ``x.to(out_dtype)`` without that
    copy, since the kernels compute in float32 whatever they read (the UNet's float32 ``out`` head on a bf16
    block output). The input's gradient comes back in ``x``'s dtype.

    ``input_bias`` ([C]): the function of ``x + input_bias`` per channel, in float32, without that sum's map: a
    convolution's bias, so that the convolution before the norm need not add it in a pass of its own over its
    output (CUDA convolutions add their bias that way). ``x``'s gradient is the sum's.
    """
    return _GroupNormSiLU.apply(x, weight, bias, scale_shift, x.shape[1] // group_size, eps, out_dtype, input_bias)


def group_norm_silu_of_pair(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            group_size: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(group_norm_silu(torch.cat([a, b], 1), ...), a, b)`` without making the concatenation: use the returned
    ``a`` and ``b`` for the skip path, and their gradients are added inside the backward kernels. A group may
    lie across the two."""
    return _GroupNormSiLUOfPair.apply(a, b, weight, bias, (a.shape[1] + b.shape[1]) // group_size, eps)


def group_norm_silu_and_input(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, group_size: int,
                              eps: float, aliases: int = 1) -> tuple[torch.Tensor, ...]:
    """``(group_norm_silu(x, ...), x)``, for a block that also uses ``x`` itself (a ResBlock's skip path): use
    the returned ``x`` there, and its gradient is added to the norm's inside the backward kernel. With
    ``aliases=2``, ``(group_norm_silu(x, ...), x, x)``: ``x`` has a third use (an encoder block's input, which
    the UNet's skip stack also keeps), whose gradient is added in the same pass."""
    if aliases not in (1, 2):
        raise ValueError(f"the norm hands its input on once or twice, not {aliases} times")
    return _GroupNormSiLUAndInput.apply(x, weight, bias, None, x.shape[1] // group_size, eps, aliases)


def group_norm_and_input(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, group_size: int,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(group_norm(x), x)``: GroupNorm alone (no SiLU) by the same kernels, for an attention block, whose
    residual sum uses ``x`` too: use the returned ``x`` there, and its gradient is added inside the backward
    kernel. Its output is in ``x``'s memory format, so channels_last tokens come out in the layout the qkv
    projection reads as one matrix product with its bias."""
    return _GroupNormSiLUAndInput.apply(x, weight, bias, None, x.shape[1] // group_size, eps, 1, True)


def group_norm_silu_halving(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, group_size: int, eps: float,
                            aliases: int = 0) -> tuple[torch.Tensor, ...]:
    """``(avg_pool2d(group_norm_silu(x, ...), 2), avg_pool2d(x, 2))``, the same bits, without either full-size
    map in between: a down ResBlock's norm and its skip input (even height and width). With ``aliases=1``, ``x``
    too, for a third use (the UNet's skip stack), whose gradient is added inside the backward kernel."""
    if aliases not in (0, 1):
        raise ValueError(f"the halving norm hands its input on at most once, not {aliases} times")
    return _GroupNormSiLUHalving.apply(x, weight, bias, x.shape[1] // group_size, eps, aliases)
