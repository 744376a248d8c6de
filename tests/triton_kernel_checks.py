"""Checks of the triton_norm and triton_clip kernels against the plain-torch reference.

On the CPU they run in Triton's interpreter, each in a fresh process started by tests/test_triton_norm.py: the
interpreter must be chosen before Triton builds the kernels, and a process where Triton or inductor already ran
cannot switch reliably. On a CUDA GPU (``--device cuda``: the kernel-checks stage of scripts/gpu_compare.py) the
same checks run the compiled kernels as the JIT specialises them for real tensors, which neither the interpreter
nor the sm_90 compile test sees, with TF32 off so that the references are plain float32.

    TRITON_INTERPRET=1 python tests/triton_kernel_checks.py [check ...]
    python tests/triton_kernel_checks.py --device cuda [--json rows.json] [check ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path


def _device_asked(argv: list[str]) -> str:
    # Read before torch and Triton are imported: on the CPU the interpreter must be chosen first.
    return argv[argv.index("--device") + 1] if "--device" in argv[:-1] else "cpu"


DEVICE = _device_asked(sys.argv)
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from blended import fast_paths, triton_clip, triton_residual  # noqa: E402
from blended import triton_norm as kernels  # noqa: E402
from blended.benchmark import write_json_atomically  # noqa: E402
from blended.fast_paths import FastPathOptions  # noqa: E402
from blended.fused_norm import group_norm_act  # noqa: E402
from conftest import tiny_clip, tiny_unet  # noqa: E402


def on_device(*tensors):
    moved = tuple(t.to(DEVICE) if t is not None else None for t in tensors)
    return moved if len(moved) > 1 else moved[0]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def within_one_bf16_step(got, want, atol=0.0):
    """``got`` is one rounding of ``want`` to bf16 (2**-8 relative; the interpreter truncates where a GPU rounds
    to nearest, so a full step is allowed)."""
    got, want = got.double(), want.double()
    return bool(((got - want).abs() <= want.abs() * 2 ** -7 + atol).all())


def bf16_input_gradient_error(fn, reference, x, grad_out, dtype):
    """Relative error of ``fn``'s bf16 input gradient against ``reference``'s computed in ``dtype``."""
    (gx,) = torch.autograd.grad(fn(x), x, grad_out)
    assert gx.dtype == torch.bfloat16
    x_exact = x.detach().to(dtype).requires_grad_(True)
    (gx_exact,) = torch.autograd.grad(reference(x_exact), x_exact, grad_out.to(dtype))
    return rel(gx, gx_exact)


def case(shape, dtype, channels_last, scale_shift, seed):
    gen = torch.Generator().manual_seed(seed)
    batch, channels = shape[:2]
    # A mean well off zero: the statistics' test.
    x = on_device((torch.randn(*shape, generator=gen) * 3 + 2).to(dtype))
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight, bias = on_device(torch.randn(channels, generator=gen), torch.randn(channels, generator=gen))
    ss = on_device(torch.randn(batch, 2 * channels, 1, 1, generator=gen).to(dtype)) if scale_shift else None
    return x.requires_grad_(True), weight, bias, ss


def _float32_case(shape, channels_last, scale_shift):
    x, weight, bias, ss = case(shape, torch.float32, channels_last, scale_shift, seed=sum(shape))
    y = kernels.group_norm_silu(x, weight, bias, shape[1] // 32, 1e-5, ss)
    expected = group_norm_act(x, weight, bias, shape[1] // 32, 1e-5, ss)
    assert rel(y, expected) < 1e-6
    assert y.stride() == x.stride()  # written in the input's memory format
    grad_out = on_device(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
    (gx,) = torch.autograd.grad(y, x, grad_out)
    (gx_expected,) = torch.autograd.grad(expected, x, grad_out)
    assert rel(gx, gx_expected) < 1e-6 and gx.stride() == x.stride()


def check_bfloat16_input_is_computed_in_float32_and_rounded_once():
    x, weight, bias, ss = case((2, 64, 8, 8), torch.bfloat16, True, True, seed=3)
    y = kernels.group_norm_silu(x, weight, bias, 2, 1e-5, ss)
    expected = group_norm_act(x.detach().float(), weight, bias, 2, 1e-5, ss)
    assert y.dtype == torch.bfloat16
    # One rounding of the float32 result (the interpreter truncates where a GPU rounds to nearest: < 2**-8).
    assert rel(y, expected) < 4e-3
    (gx,) = torch.autograd.grad(y.float().square().sum(), x)
    assert gx.dtype == torch.bfloat16 and torch.isfinite(gx.float()).all()


def check_weight_and_timestep_gradients_come_from_the_reference_when_asked():
    x, weight, bias, ss = case((2, 64, 4, 4), torch.float32, True, True, seed=4)
    leaves = [t.clone().requires_grad_(True) for t in (weight, bias, ss)]
    y = kernels.group_norm_silu(x, *leaves[:2], 2, 1e-5, leaves[2])
    grads = torch.autograd.grad(y.square().sum(), [x, *leaves])
    ref_leaves = [t.clone().requires_grad_(True) for t in (weight, bias, ss)]
    expected = torch.autograd.grad(group_norm_act(x, *ref_leaves[:2], 2, 1e-5, ref_leaves[2]).square().sum(),
                                   [x, *ref_leaves])
    for got, want in zip(grads, expected, strict=True):
        assert rel(got, want) < 1e-5


def check_unet_with_triton_norm_matches_the_unet_without():
    unet, clip = tiny_unet().to(DEVICE), tiny_clip().to(DEVICE)
    gen = torch.Generator().manual_seed(6)
    x = on_device(torch.randn(2, 3, 64, 64, generator=gen)).to(memory_format=torch.channels_last).requires_grad_(True)
    t = on_device(torch.tensor([20.0, 600.0]))
    expected = unet(x, t)
    (g_expected,) = torch.autograd.grad(expected.square().sum(), x)
    options = FastPathOptions(triton_norm=True, channels_last=True)
    pairs, of_pair = [], kernels.group_norm_silu_of_pair
    sums, residual_sum = [], triton_residual.residual_sum
    handed, and_input, halving = [], kernels.group_norm_silu_and_input, kernels.group_norm_silu_halving
    halved, attention_norms, alone = [], [], kernels.group_norm_and_input
    kernels.group_norm_silu_of_pair = lambda a, b, *rest: pairs.append((a.shape[1], b.shape[1])) or of_pair(a, b, *rest)
    upsampled = []
    triton_residual.residual_sum = lambda skip, h, bias, up=False: (sums.append(h.shape[1]) or upsampled.append(up)
                                                                    or residual_sum(skip, h, bias, up))
    kernels.group_norm_silu_and_input = lambda *args, aliases=1: (handed.append(aliases == 2)
                                                                  or and_input(*args, aliases=aliases))
    kernels.group_norm_silu_halving = lambda *args, aliases=0: (halved.append(aliases == 1) or handed.append(
        aliases == 1) or halving(*args, aliases=aliases))
    kernels.group_norm_and_input = lambda x, *args: attention_norms.append(x.shape) or alone(x, *args)
    from blended import carried_statistics

    read, partials_of = [], kernels._channel_partials
    kernels._channel_partials = lambda part, *rest: (read.append(carried_statistics.carried(part) is None)
                                                     or partials_of(part, *rest))
    try:
        with fast_paths.run_clones(unet, clip, options) as (fast, _):
            assert fast.norm_kernel == "triton"
            out = fast(x, t)
            (g,) = torch.autograd.grad(out.square().sum(), x)
    finally:
        kernels._channel_partials = partials_of
        kernels.group_norm_silu_of_pair = of_pair
        triton_residual.residual_sum = residual_sum
        kernels.group_norm_silu_and_input = and_input
        kernels.group_norm_silu_halving = halving
        kernels.group_norm_and_input = alone
    assert rel(out, expected) < 1e-5 and rel(g, g_expected) < 1e-4
    # Every attention block's GroupNorm by the kernels too.
    attention = [m for m in unet.modules() if type(m).__name__ == "AttentionBlock"]
    assert len(attention_norms) == len(attention) > 0, (attention_norms, len(attention))
    # Every up ResBlock (upsampling, no conv) left its skip input's upsampling to the residual sum.
    ups = [m for m in unet.modules() if type(m).__name__ == "ResBlock" and type(m.resample).__name__ == "Upsample"]
    assert upsampled.count(True) == len(ups) > 0, (upsampled, len(ups))
    # Every down ResBlock (pooling, no conv) made its two poolings in its norm.
    downs = [m for m in unet.modules() if type(m).__name__ == "ResBlock" and type(m.resample).__name__ == "Downsample"]
    assert len(halved) == len(downs) > 0, (halved, len(downs))
    # Every input block after the first that begins with a ResBlock, and the middle block, took the decoder's
    # gradient for its input into its first norm's backward.
    taking = [type(block[0]).__name__ == "ResBlock" for block in [*unet.input_blocks[1:], unet.middle_block]]
    assert handed.count(True) == sum(taking) > 0, (handed, taking)
    # Every ResBlock left its convolutions' biases to the kernels: its output is one residual sum.
    resblocks = [m for m in unet.modules() if type(m).__name__ == "ResBlock"]
    assert len(sums) == len(resblocks) > 0, (len(sums), len(resblocks))
    # Every output block took its running map and the encoder's skip as two parts, those with a group across the
    # two (there are some) too.
    expected, straddling, running = [], 0, unet.middle_block[-1].out_layers[3].out_channels
    for block in unet.output_blocks:
        norm = block[0].in_layers[0]
        expected.append((running, norm.num_channels - running))
        straddling += running % (norm.num_channels // norm.num_groups) != 0
        running = block[0].out_layers[3].out_channels
    assert pairs == expected and straddling > 0, (pairs, expected, straddling)
    # No norm read a ResBlock's output for its statistics: each output's next norm (a ResBlock's, an attention
    # block's, the head's) took those its residual sum left, and so did the output block that reads it again as
    # its skip (an input block that ends with a ResBlock), through the skip stack.
    skips = sum(type(block[-1]).__name__ == "ResBlock" for block in unet.input_blocks[1:])
    assert read.count(False) == len(sums) + skips and skips > 0, (read, len(sums), skips)


def check_input_bias_is_the_norm_of_the_sum():
    # A convolution's bias handed to the norm: the norm of x + bias, and x's gradient the sum's; in float32 and
    # bf16 (a bf16 bias, as a run clone stores it), both memory formats, with the timestep terms; the bias's own
    # gradient from the reference when asked.
    for channels_last in (True, False):
        x, weight, bias, ss = case((2, 64, 6, 5), torch.float32, channels_last, True, seed=31)
        conv_bias = on_device(torch.randn(64, generator=torch.Generator().manual_seed(32)) * 4)
        y = kernels.group_norm_silu(x, weight, bias, 2, 1e-5, ss, input_bias=conv_bias)
        expected = group_norm_act(x + conv_bias.view(1, -1, 1, 1), weight, bias, 2, 1e-5, ss)
        assert rel(y, expected) < 1e-6 and y.stride() == x.stride()
        grad_out = on_device(torch.randn(y.shape, generator=torch.Generator().manual_seed(33)))
        (gx,) = torch.autograd.grad(y, x, grad_out)
        (gx_expected,) = torch.autograd.grad(expected, x, grad_out)
        assert rel(gx, gx_expected) < 1e-6
        leaf = conv_bias.clone().requires_grad_(True)
        (gb,) = torch.autograd.grad(kernels.group_norm_silu(x.detach(), weight, bias, 2, 1e-5, ss, input_bias=leaf),
                                    leaf, grad_out)
        leaf_expected = conv_bias.clone().requires_grad_(True)
        (gb_expected,) = torch.autograd.grad(
            group_norm_act(x.detach() + leaf_expected.view(1, -1, 1, 1), weight, bias, 2, 1e-5, ss), leaf_expected,
            grad_out)
        assert rel(gb, gb_expected) < 1e-5
        xb, _, _, ssb = case((2, 64, 6, 5), torch.bfloat16, channels_last, True, seed=34)
        yb = kernels.group_norm_silu(xb, weight, bias, 2, 1e-5, ssb, input_bias=conv_bias.to(torch.bfloat16))
        expected = group_norm_act(xb.detach().float() + conv_bias.to(torch.bfloat16).float().view(1, -1, 1, 1),
                                  weight, bias, 2, 1e-5, ssb.float())
        assert yb.dtype == torch.bfloat16 and rel(yb, expected) < 4e-3


def check_residual_sum_is_the_plain_sum_rounded_once():
    # skip + h + bias in one pass: in float32 the plain sum (within one float32 rounding: the kernel adds the
    # three in one expression); in bf16 the float32 sum rounded once; h's memory format whatever skip's; the
    # gradient handed to both maps as it is, and the bias's when asked; mismatched shapes refused.
    gen = torch.Generator().manual_seed(41)
    for skip_channels_last, h_channels_last in ((True, True), (False, True), (True, False)):
        skip, h = (on_device(torch.randn(2, 96, 5, 7, generator=gen)) for _ in range(2))
        if skip_channels_last:
            skip = skip.contiguous(memory_format=torch.channels_last)
        if h_channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        bias = on_device(torch.randn(96, generator=gen)).requires_grad_(True)
        skip.requires_grad_(True)
        h.requires_grad_(True)
        out = triton_residual.residual_sum(skip, h, bias)
        expected = skip + h + bias.view(1, -1, 1, 1)
        assert out.stride() == h.stride() and rel(out, expected) < 1e-7
        grad = on_device(torch.randn(out.shape, generator=gen))
        for got, want in zip(torch.autograd.grad(out, (skip, h, bias), grad),
                             torch.autograd.grad(expected, (skip, h, bias), grad), strict=True):
            assert rel(got, want) < 1e-6
    skip, h = (on_device(torch.randn(2, 64, 6, 6, generator=gen) * 3).to(torch.bfloat16)
               .contiguous(memory_format=torch.channels_last) for _ in range(2))
    bias = on_device(torch.randn(64, generator=gen)).to(torch.bfloat16)
    out = triton_residual.residual_sum(skip, h, bias)
    exact = skip.double() + h.double() + bias.double().view(1, -1, 1, 1)
    assert out.dtype == torch.bfloat16 and within_one_bf16_step(out, exact, atol=2 ** -126)
    try:
        triton_residual.residual_sum(skip, h[:, :32], bias)
    except ValueError as error:
        assert "one [B, C, H, W] shape" in str(error)
    else:
        raise AssertionError("maps of two shapes were summed")


def check_float32_forward_and_input_gradient_match_the_reference():
    # Shapes: one group per program and many splits, a group size that is not a power of two (96 / 32 = 3) on a
    # non-square map, and the pixel count not a multiple of the tile; both memory formats, with and without
    # the timestep scale-shift.
    for shape in ((2, 64, 8, 8), (1, 96, 4, 6), (3, 256, 12, 12)):
        for channels_last in (True, False):
            for scale_shift in (True, False):
                _float32_case(shape, channels_last, scale_shift)


def check_many_splits_are_merged_like_one_reduction():
    # Two groups of 32 channels over a 96x96 map: each channel's reductions split many ways, so each group has
    # more parts (its channels' splits) than one program of the merge kernels takes at a time (their loop, with a
    # ragged last tile), and fewer rows than the merge's tile (its mask), in both memory formats.
    shape, group_size = (1, 64, 96, 96), 32
    for channels_last in (True, False):
        grid = kernels.reduction_grid(1, 64, 96 * 96, group_size, channels_last)
        assert grid.parts > kernels.MERGE_TILE[1] and grid.parts % kernels.MERGE_TILE[1], grid
        assert 2 < kernels.MERGE_TILE[0]
        x, weight, bias, ss = case(shape, torch.float32, channels_last, True, seed=5)
        y = kernels.group_norm_silu(x, weight, bias, group_size, 1e-5, ss)
        expected = group_norm_act(x, weight, bias, group_size, 1e-5, ss)
        assert rel(y, expected) < 1e-6
        grad_out = on_device(torch.randn(shape, generator=torch.Generator().manual_seed(6)))
        (gx,) = torch.autograd.grad(y, x, grad_out)
        (gx_expected,) = torch.autograd.grad(expected, x, grad_out)
        assert rel(gx, gx_expected) < 1e-6
        # A mean a thousand times the spread, different in every channel: the splits' and the channels' means
        # merged by Chan's formula keep the variance that a sum of squares would lose to cancellation.
        gen = torch.Generator().manual_seed(7)
        far = on_device(1000 + torch.randn(1, 64, 1, 1, generator=gen) * 0.01 + torch.randn(shape, generator=gen))
        if channels_last:
            far = far.contiguous(memory_format=torch.channels_last)
        mean, rstd = kernels._statistics(far, group_size, 1e-5)
        groups = far.double().reshape(2, -1)
        assert torch.allclose(mean.double().cpu(), groups.mean(1).cpu(), rtol=1e-6)  # a float32 ulp is 6e-8
        assert torch.allclose(rstd.double().cpu(), (groups.var(1, unbiased=False) + 1e-5).rsqrt().cpu(), rtol=1e-5)


def check_passes_taking_many_tiles_write_what_one_tile_does():
    # The passes that write a map loop over several tiles per program where the map is large (the test maps are
    # small enough for one each): with every program taking as many tiles as it may (a target of one program),
    # the last of them ragged, every output and gradient is the same bits as with one tile per program. The plain
    # norm with timestep terms and an input bias, both memory formats; a block input's two other gradients added,
    # an attention block's norm, a down block's halving norm and an output block's pair of parts, in bf16.
    one_tile_each, launches = kernels.pass_launch, []

    def many_tiles_each(batch, channels, hw, tile):
        grid, rows = one_tile_each(batch, channels, hw, tile, target=1)
        launches.append((hw, tile[0], rows))
        return grid, rows

    def outputs_and_gradients(run, inputs):
        outputs = [t for t in run(*inputs) if t.requires_grad]
        gen = torch.Generator().manual_seed(71)
        grads = [on_device(torch.randn(t.shape, generator=gen)).to(t.dtype) for t in outputs]
        return [t.detach() for t in outputs] + list(torch.autograd.grad(outputs, inputs, grads))

    runs = []
    for channels_last in (True, False):
        x, weight, bias, ss = case((2, 64, 10, 13), torch.float32, channels_last, True, seed=72)
        conv_bias = on_device(torch.randn(64, generator=torch.Generator().manual_seed(73)))
        runs.append((lambda x, w=weight, b=bias, ss=ss, cb=conv_bias: (
            kernels.group_norm_silu(x, w, b, 2, 1e-5, ss, input_bias=cb),), (x,)))
    xb, weight, bias, _ = case((2, 64, 10, 13), torch.bfloat16, True, False, seed=74)
    runs.append((lambda x: kernels.group_norm_silu_and_input(x, weight, bias, 2, 1e-5, aliases=2), (xb,)))
    runs.append((lambda x: kernels.group_norm_and_input(x, weight, bias, 2, 1e-5), (xb.detach().clone()
                                                                                    .requires_grad_(True),)))
    xh, _, _, _ = case((2, 64, 12, 20), torch.bfloat16, True, False, seed=75)
    runs.append((lambda x: kernels.group_norm_silu_halving(x, weight, bias, 2, 1e-5, aliases=1), (xh,)))
    whole, pair_weight, pair_bias, _ = case((2, 96, 10, 13), torch.bfloat16, True, False, seed=76)
    a, b = (t.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
            for t in (whole[:, :40], whole[:, 40:]))
    runs.append((lambda a, b: kernels.group_norm_silu_of_pair(a, b, pair_weight, pair_bias, 3, 1e-5), (a, b)))
    for run, inputs in runs:
        expected = outputs_and_gradients(run, inputs)
        kernels.pass_launch = many_tiles_each
        try:
            got = outputs_and_gradients(run, inputs)
        finally:
            kernels.pass_launch = one_tile_each
        assert len(got) == len(expected) and all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
    # The loops ran: programs of several tiles, some ending in a part of one, some programs a part of the others'.
    assert all(rows >= 2 * tile for _, tile, rows in launches), launches
    assert any(hw % tile for hw, tile, _ in launches) and any(hw % rows for hw, _, rows in launches), launches


def check_attention_norm_is_group_norm_alone():
    # An attention block's norm: GroupNorm without SiLU, x handed on for the residual sum and that gradient added
    # in the backward kernel. Against F.group_norm in float32, both memory formats; in bf16 within one rounding of
    # the float32 norm; the affine parameters' gradients from the reference when asked.
    for channels_last in (True, False):
        x, weight, bias, _ = case((2, 64, 6, 5), torch.float32, channels_last, False, seed=81)
        gen = torch.Generator().manual_seed(82)
        grad_y, residual_scale = on_device(torch.randn(x.shape, generator=gen), torch.randn(x.shape, generator=gen))
        y, x_residual = kernels.group_norm_and_input(x, weight, bias, 2, 1e-5)
        expected = torch.nn.functional.group_norm(x, 32, weight, bias, 1e-5)
        assert torch.equal(x_residual, x) and y.stride() == x.stride() and rel(y, expected) < 1e-6
        (gx,) = torch.autograd.grad((y * grad_y).sum() + (x_residual * residual_scale).square().sum(), x)
        (gx_expected,) = torch.autograd.grad((expected * grad_y).sum() + (x * residual_scale).square().sum(), x)
        assert rel(gx, gx_expected) < 1e-6 and gx.stride() == x.stride()
    x, weight, bias, _ = case((2, 64, 8, 8), torch.bfloat16, True, False, seed=83)
    y, x_residual = kernels.group_norm_and_input(x, weight, bias, 2, 1e-5)
    x32 = x.detach().float().requires_grad_(True)
    expected = torch.nn.functional.group_norm(x32, 32, weight, bias, 1e-5)
    assert y.dtype == torch.bfloat16 and within_one_bf16_step(y, expected, atol=1e-6)
    grad_y = on_device(torch.randn(x.shape, generator=torch.Generator().manual_seed(85))).to(torch.bfloat16)
    (gx,) = torch.autograd.grad((y.float() * grad_y).sum() + x_residual.float().sum(), x)
    (gx_expected,) = torch.autograd.grad((expected * grad_y).sum() + x32.sum(), x32)
    assert gx.dtype == torch.bfloat16 and rel(gx, gx_expected) < 4e-3, rel(gx, gx_expected)
    x, weight, bias, _ = case((2, 64, 4, 4), torch.float32, True, False, seed=84)
    leaves = [t.clone().requires_grad_(True) for t in (weight, bias)]
    got = torch.autograd.grad(kernels.group_norm_and_input(x, *leaves, 2, 1e-5)[0].square().sum(), [x, *leaves])
    ref_leaves = [t.clone().requires_grad_(True) for t in (weight, bias)]
    want = torch.autograd.grad(torch.nn.functional.group_norm(x, 32, *ref_leaves, 1e-5).square().sum(),
                               [x, *ref_leaves])
    assert all(rel(g, w) < 1e-5 for g, w in zip(got, want, strict=True))


def check_float32_output_of_a_bfloat16_input_needs_no_converted_copy():
    # The UNet's float32 out head on the bf16 block output: the same values as on x.float(), the gradient
    # back in bf16 (within one rounding of the float32 one). On a GPU the statistics' lane sums follow a
    # register layout Triton picks by the input's dtype, so bf16 and float32 inputs add them in different
    # orders: equal there within float32 rounding, bit for bit only under the interpreter.
    x, weight, bias, _ = case((2, 64, 6, 6), torch.bfloat16, True, False, seed=17)
    y = kernels.group_norm_silu(x, weight, bias, 2, 1e-5, out_dtype=torch.float32)
    x32 = x.detach().float().requires_grad_(True)
    y_expected = kernels.group_norm_silu(x32, weight, bias, 2, 1e-5)
    assert y.dtype == torch.float32 and y.stride() == x.stride()
    assert torch.equal(y, y_expected) if DEVICE == "cpu" else rel(y, y_expected) < 1e-6
    grad_out = on_device(torch.randn(y.shape, generator=torch.Generator().manual_seed(18)))
    (gx,) = torch.autograd.grad(y, x, grad_out)
    (gx32,) = torch.autograd.grad(y_expected, x32, grad_out)
    assert gx.dtype == torch.bfloat16 and within_one_bf16_step(gx, gx32)
    # The weights' gradients, when asked, are those of the float32 function too.
    w = weight.clone().requires_grad_(True)
    (gw,) = torch.autograd.grad(kernels.group_norm_silu(x.detach(), w, bias, 2, 1e-5, out_dtype=torch.float32)
                                .square().sum(), w)
    w_ref = weight.clone().requires_grad_(True)
    (gw_expected,) = torch.autograd.grad(group_norm_act(x.detach().float(), w_ref, bias, 2, 1e-5).square().sum(),
                                         w_ref)
    assert rel(gw, gw_expected) < 1e-5


def check_skip_path_gradient_is_added_inside_the_backward_kernel():
    # A ResBlock's use: the norm's output goes one way, x itself (the second output) the skip way; both
    # gradients come back to x. In float32 the sum is autograd's to the bit (the kernel adds the same two
    # float32 numbers) in the interpreter; a GPU compiler may fuse the kernel's last multiply with that add (one
    # rounding instead of two), so there it is within a float32 rounding. The skip gradient may come in another
    # memory format than x.
    for channels_last, skip_channels_last in ((True, True), (True, False), (False, True)):
        x, weight, bias, _ = case((2, 64, 6, 6), torch.float32, channels_last, False, seed=11)
        gen = torch.Generator().manual_seed(12)
        grad_y, skip_scale = on_device(torch.randn(x.shape, generator=gen), torch.randn(x.shape, generator=gen))
        if skip_channels_last:
            skip_scale = skip_scale.to(memory_format=torch.channels_last)
        y, x_skip = kernels.group_norm_silu_and_input(x, weight, bias, 2, 1e-5)
        assert torch.equal(x_skip, x)
        (gx,) = torch.autograd.grad((y * grad_y).sum() + (x_skip * skip_scale).square().sum(), x)
        y_plain = kernels.group_norm_silu(x, weight, bias, 2, 1e-5)
        (gx_plain,) = torch.autograd.grad((y_plain * grad_y).sum() + (x * skip_scale).square().sum(), x)
        assert (torch.equal(gx, gx_plain) if DEVICE == "cpu" else rel(gx, gx_plain) < 1e-6)
        assert gx.stride() == x.stride()
        expected = group_norm_act(x, weight, bias, 2, 1e-5)
        (gx_expected,) = torch.autograd.grad((expected * grad_y).sum() + (x * skip_scale).square().sum(), x)
        assert rel(gx, gx_expected) < 1e-6
    x, weight, bias, _ = case((2, 64, 6, 6), torch.bfloat16, True, False, seed=13)
    y, x_skip = kernels.group_norm_silu_and_input(x, weight, bias, 2, 1e-5)
    (gx,) = torch.autograd.grad(y.float().sum() + x_skip.float().square().sum(), x)
    x32 = x.detach().float().requires_grad_(True)
    (gx_expected,) = torch.autograd.grad(group_norm_act(x32, weight, bias, 2, 1e-5).sum() + x32.square().sum(), x32)
    assert gx.dtype == torch.bfloat16 and rel(gx, gx_expected) < 4e-3


def check_skip_stack_gradient_is_added_in_the_same_pass():
    # An encoder block's input: its norm, its skip path and the UNet's skip stack (aliases=2). The stack's
    # gradient may come as a channel slice of a concatenation's (an output block that concatenates), and an alias
    # nobody used sends none.
    x, weight, bias, _ = case((2, 64, 6, 6), torch.float32, True, False, seed=21)
    gen = torch.Generator().manual_seed(22)
    grad_y, skip_scale, other = on_device(*(torch.randn(x.shape, generator=gen) for _ in range(3)))
    expected = group_norm_act(x, weight, bias, 2, 1e-5)

    def stacked(t):  # the stack's use: concatenated after another map, as an output block does
        return torch.cat([other, t], 1).to(memory_format=torch.channels_last)[:, 64:].square()

    (gx_expected,) = torch.autograd.grad((expected * grad_y).sum() + (x * skip_scale).square().sum()
                                         + stacked(x).sum(), x)
    y, x_skip, x_stack = kernels.group_norm_silu_and_input(x, weight, bias, 2, 1e-5, aliases=2)
    assert torch.equal(x_skip, x) and torch.equal(x_stack, x)
    (gx,) = torch.autograd.grad((y * grad_y).sum() + (x_skip * skip_scale).square().sum() + stacked(x_stack).sum(), x)
    assert rel(gx, gx_expected) < 1e-6 and gx.stride() == x.stride()
    y, x_skip, _ = kernels.group_norm_silu_and_input(x, weight, bias, 2, 1e-5, aliases=2)
    (gx,) = torch.autograd.grad((y * grad_y).sum() + (x_skip * skip_scale).square().sum(), x)
    expected = group_norm_act(x, weight, bias, 2, 1e-5)
    (gx_expected,) = torch.autograd.grad((expected * grad_y).sum() + (x * skip_scale).square().sum(), x)
    assert rel(gx, gx_expected) < 1e-6


class _CountingLaunches:
    """Stands in for a kernel object: counts its launches, then launches it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


class _OpNames(TorchDispatchMode):
    """The aten ops run inside, by name."""

    def __enter__(self):
        self.names = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def check_residual_sum_leaves_the_statistics_the_norm_would_read():
    # A ResBlock's output carries each channel's partial statistics: the very bits the statistics pass computes
    # from the stored map (the same tiles and updates), in both memory formats, bf16 and float32, with ragged tiles
    # and an upsampled skip. A norm of the map merges them without a statistics pass and writes the same bits as
    # of a copy that carries none; a view handed on keeps them; an in-place change drops them (from the view too).
    from blended import carried_statistics

    counting = _CountingLaunches(kernels._stats_kernel)
    kernels._stats_kernel, target = counting, kernels._TARGET_PROGRAMS
    kernels._TARGET_PROGRAMS = 8  # several splits of small maps, and splits of two sizes below
    gen = torch.Generator().manual_seed(61)
    try:
        for (batch, channels, height, width), dtype, channels_last, up in (
                ((2, 96, 34, 30), torch.bfloat16, True, False), ((1, 40, 22, 26), torch.float32, False, False),
                ((2, 64, 34, 30), torch.bfloat16, True, True), ((1, 72, 20, 24), torch.float32, True, True)):
            layout = torch.channels_last if channels_last else torch.contiguous_format
            skip_size = (height // 2, width // 2) if up else (height, width)
            skip = on_device(torch.randn(batch, channels, *skip_size, generator=gen)).to(dtype)
            h = on_device(torch.randn(batch, channels, height, width, generator=gen) * 2 + 1).to(dtype)
            skip, h = (t.contiguous(memory_format=layout) for t in (skip, h))
            bias = on_device(torch.randn(channels, generator=gen))
            out = triton_residual.residual_sum(skip, h, bias, up)
            partials = carried_statistics.carried(out)
            copy = out.clone()
            assert partials is not None and carried_statistics.carried(copy) is None
            counting.launches = 0
            sums, splits = kernels._channel_partials(copy)
            assert counting.launches == 1 and splits == partials.splits > 1 and torch.equal(sums, partials.sums)
            weight, norm_bias = (on_device(torch.randn(channels, generator=gen)) for _ in range(2))
            counting.launches = 0
            y = kernels.group_norm_silu(out, weight, norm_bias, 8, 1e-5)
            assert counting.launches == 0 and torch.equal(y, kernels.group_norm_silu(copy, weight, norm_bias, 8, 1e-5))
            if not up:  # the gradient goes to both maps as it is: no op, not even a zero gradient for the sums
                skip.requires_grad_(True)
                summed, ones = triton_residual.residual_sum(skip, h, bias), torch.ones_like(out)
                with _OpNames() as ops:
                    (grad_skip,) = torch.autograd.grad(summed, skip, ones)
                assert not ops.names and grad_skip is ones, ops.names
                skip.requires_grad_(False)
            handed = carried_statistics.hand_on(out, out.view_as(out))
            assert carried_statistics.carried(handed).sums is partials.sums
            out.add_(1.0)
            assert carried_statistics.carried(out) is None and carried_statistics.carried(handed) is None
            counting.launches = 0
            y = kernels.group_norm_silu(out, weight, norm_bias, 8, 1e-5)
            assert counting.launches == 1 and torch.equal(y, kernels.group_norm_silu(out.clone(), weight, norm_bias,
                                                                                       8, 1e-5))
        # An output block's pair whose running map (42 channels: 4 splits), skip (98 channels: 2 splits) or both
        # carry their statistics, in groups of 4, one across the two parts: the concatenation's norm.
        for carrying in ("a", "b", "both"):
            a, b = (on_device(torch.randn(2, c, 32, 32, generator=gen) + 3) for c in (42, 98))
            a, b = (t.contiguous(memory_format=torch.channels_last) for t in (a, b))
            if carrying in ("a", "both"):
                a = triton_residual.residual_sum(a, torch.zeros_like(a), on_device(torch.zeros(42)))
            if carrying in ("b", "both"):
                b = triton_residual.residual_sum(b, torch.zeros_like(b), on_device(torch.zeros(98)))
            weight, norm_bias = (on_device(torch.randn(140, generator=gen)) for _ in range(2))
            counting.launches = 0
            y, _, _ = kernels.group_norm_silu_of_pair(a, b, weight, norm_bias, 4, 1e-5)
            assert counting.launches == (0 if carrying == "both" else 1)
            expected = group_norm_act(torch.cat([a, b], 1), weight, norm_bias, 4, 1e-5)
            assert rel(y, expected) < 1e-6, (carrying, rel(y, expected))
        assert kernels.statistics_grid(a).splits == 4 and kernels.statistics_grid(b).splits == 2
    finally:
        kernels._stats_kernel, kernels._TARGET_PROGRAMS = counting.kernel, target


def check_residual_sum_reads_an_upsampled_skip_at_half_size():
    # An up block's output: its half-size input read as its nearest 2x upsampling, which is not made; the skip's
    # gradient each 2x2 window's sum, as the upsampling's backward gives it. Both memory formats, non-square maps,
    # float32 and bf16; a skip of any other size, or an odd output, refused.
    gen = torch.Generator().manual_seed(51)
    upsample = torch.nn.functional.interpolate
    for dtype in (torch.float32, torch.bfloat16):
        for channels_last in (True, False):
            layout = torch.channels_last if channels_last else torch.contiguous_format
            skip = on_device(torch.randn(2, 96, 3, 5, generator=gen)).to(dtype).contiguous(memory_format=layout)
            h = on_device(torch.randn(2, 96, 6, 10, generator=gen)).to(dtype).contiguous(memory_format=layout)
            bias = on_device(torch.randn(96, generator=gen))
            skip.requires_grad_(True)
            h.requires_grad_(True)
            out = triton_residual.residual_sum(skip, h, bias, upsampled_skip=True)
            expected = upsample(skip, scale_factor=2, mode="nearest") + h + bias.view(1, -1, 1, 1).to(dtype)
            assert out.stride() == h.stride() and out.dtype == dtype
            exact = upsample(skip.double(), scale_factor=2, mode="nearest") + h.double() + bias.double().view(
                1, -1, 1, 1)
            assert rel(out, expected) < 1e-7 if dtype == torch.float32 else within_one_bf16_step(out, exact, 2 ** -126)
            grad = on_device(torch.randn(out.shape, generator=gen)).to(dtype)
            got, want = (torch.autograd.grad(y, (skip, h), grad) for y in (out, expected))
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for skip_shape, h_shape in (((2, 96, 3, 4), (2, 96, 6, 10)), ((2, 96, 3, 5), (2, 96, 7, 10))):
        try:
            triton_residual.residual_sum(on_device(torch.zeros(skip_shape)), on_device(torch.zeros(h_shape)),
                                         bias.detach(), upsampled_skip=True)
        except ValueError as error:
            assert "half the height and width" in str(error)
        else:
            raise AssertionError(f"an upsampled skip of {skip_shape} was summed with {h_shape}")


def check_down_blocks_poolings_are_made_by_the_norm():
    # A down ResBlock's input norm: its output and its skip input 2x2-pooled by the pass that writes the output,
    # and both poolings' half-size gradients read in place by the backward kernels, with the skip stack's
    # gradient (aliases=1) added. Against the reference in float32 and both memory formats; in bf16 against the
    # norm kernels and avg_pool2d apart (each activation rounded before the pooling, as that map was).
    avg_pool = torch.nn.functional.avg_pool2d
    for channels_last in (True, False):
        x, weight, bias, _ = case((2, 64, 6, 10), torch.float32, channels_last, False, seed=41)
        gen = torch.Generator().manual_seed(42)
        grad_y, grad_half = on_device(*(torch.randn(2, 64, 3, 5, generator=gen) for _ in range(2)))
        grad_stack = on_device(torch.randn(x.shape, generator=gen))
        y, x_half, x_stack = kernels.group_norm_silu_halving(x, weight, bias, 2, 1e-5, aliases=1)
        expected, expected_half = avg_pool(group_norm_act(x, weight, bias, 2, 1e-5), 2), avg_pool(x, 2)
        assert rel(y, expected) < 1e-6 and rel(x_half, expected_half) < 1e-6 and torch.equal(x_stack, x)
        assert y.stride() == x_half.stride() == expected_half.contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format).stride()
        (gx,) = torch.autograd.grad((y * grad_y).sum() + (x_half * grad_half).sum() + (x_stack * grad_stack).sum(), x)
        (gx_expected,) = torch.autograd.grad((expected * grad_y).sum() + (expected_half * grad_half).sum()
                                             + (x * grad_stack).sum(), x)
        assert rel(gx, gx_expected) < 1e-6 and gx.stride() == x.stride()
    x, weight, bias, _ = case((2, 64, 8, 8), torch.bfloat16, True, False, seed=43)
    gen = torch.Generator().manual_seed(44)
    grad_y, grad_half = on_device(*(torch.randn(2, 64, 4, 4, generator=gen).to(torch.bfloat16) for _ in range(2)))
    y, x_half = kernels.group_norm_silu_halving(x, weight, bias, 2, 1e-5)
    (gx,) = torch.autograd.grad((y.float() * grad_y).sum() + (x_half.float() * grad_half).sum(), x)
    apart, x_skip = kernels.group_norm_silu_and_input(x, weight, bias, 2, 1e-5)
    y_apart, half_apart = avg_pool(apart, 2), avg_pool(x_skip, 2)
    (gx_apart,) = torch.autograd.grad((y_apart.float() * grad_y).sum() + (half_apart.float() * grad_half).sum(), x)
    assert y.dtype == x_half.dtype == torch.bfloat16
    assert within_one_bf16_step(y, y_apart, 1e-6) and within_one_bf16_step(x_half, half_apart, 1e-6)
    # The same float32 terms either way (a quarter of each window's gradient is exact in both): the same bits in
    # the interpreter; compiled, the two kernels' code may contract a product into a sum apart.
    assert torch.equal(gx, gx_apart) if DEVICE == "cpu" else within_one_bf16_step(gx, gx_apart, 1e-6)
    try:
        kernels.group_norm_silu_halving(x[:, :, :7], weight, bias, 2, 1e-5)
    except ValueError as error:
        assert "even height and width" in str(error)
    else:
        raise AssertionError("an odd height was pooled")


def check_pair_of_maps_is_normalised_as_their_concatenation():
    # A UNet output block's input, its running map and the encoder's skip, taken as two parts: the output and
    # each part's gradient (with its skip-path gradient added) as for the concatenation, within float32
    # rounding (its statistics are reduced in other splits); the output in the parts' layout, the gradients
    # dense maps of their own. Parts of unequal widths, a group size of 2 and 3, groups across the two parts in
    # both memory formats (as the 256x256 model's 1024 + 512 channels in groups of 48), and bf16.
    for (ca, cb, groups), channels_last in (((64, 32, 48), True), ((96, 96, 64), True), ((64, 64, 32), False),
                                            ((40, 56, 32), True), ((20, 28, 16), False), ((97, 95, 64), True)):
        a, weight, bias, _ = case((2, ca + cb, 6, 5), torch.float32, channels_last, False, seed=ca + cb)
        a, b = (t.detach().contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
                .requires_grad_(True) for t in (a[:, :ca], a[:, ca:]))
        gen = torch.Generator().manual_seed(21)
        grad_y = on_device(torch.randn(2, ca + cb, 6, 5, generator=gen))
        skip_a, skip_b = on_device(torch.randn(a.shape, generator=gen), torch.randn(b.shape, generator=gen))
        group_size = (ca + cb) // groups
        y, a_skip, b_skip = kernels.group_norm_silu_of_pair(a, b, weight, bias, group_size, 1e-5)
        assert torch.equal(a_skip, a) and torch.equal(b_skip, b) and y.stride() == torch.cat([a, b], 1).stride()
        ga, gb = torch.autograd.grad((y * grad_y).sum() + (a_skip * skip_a).sum() + (b_skip * skip_b).sum(), (a, b))
        expected = group_norm_act(torch.cat([a, b], 1), weight, bias, group_size, 1e-5)
        ga_expected, gb_expected = torch.autograd.grad(
            (expected * grad_y).sum() + (a * skip_a).sum() + (b * skip_b).sum(), (a, b))
        assert rel(y, expected) < 1e-6 and rel(ga, ga_expected) < 1e-6 and rel(gb, gb_expected) < 1e-6
        assert ga.stride() == a.stride() and gb.stride() == b.stride()
    x, weight, bias, _ = case((2, 64, 6, 6), torch.bfloat16, True, False, seed=22)
    a, b = (t.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
            for t in (x[:, :32], x[:, 32:]))
    for first in (a, x[:, :31].detach().contiguous(memory_format=torch.channels_last)):  # the second: a group across
        second = x[:, first.shape[1]:].detach().contiguous(memory_format=torch.channels_last)
        y, _, _ = kernels.group_norm_silu_of_pair(first, second, weight, bias, 2, 1e-5)
        expected = group_norm_act(x.detach().float(), weight, bias, 2, 1e-5)
        assert y.dtype == torch.bfloat16 and rel(y, expected) < 4e-3
    try:
        kernels.group_norm_silu_of_pair(a, b[:, :, :5], weight, bias, 2, 1e-5)
    except ValueError as error:
        assert "cannot be normalised as the two parts" in str(error)
    else:
        raise AssertionError("parts of two sizes were normalised together")


def check_the_256px_models_group_sizes_match_the_reference():
    # The released 256x256 UNet's GroupNorms: 32 groups of 8, 16, 24, 32 and 48 channels (the decoder's skip
    # concatenations give the odd ones), which the reductions read as columns of any group size; in
    # float32 and bf16, both memory formats. Small maps in the interpreter, larger ones on a GPU.
    size = 4 if DEVICE == "cpu" else 32
    for channels in (256, 512, 768, 1024, 1536):
        shape = (2, channels, size, size)
        for channels_last in (True, False):
            _float32_case(shape, channels_last, scale_shift=True)
            x, weight, bias, ss = case(shape, torch.bfloat16, channels_last, True, seed=channels)
            y = kernels.group_norm_silu(x, weight, bias, channels // 32, 1e-5, ss)
            x32 = x.detach().float().requires_grad_(True)
            expected = group_norm_act(x32, weight, bias, channels // 32, 1e-5, ss.float())
            assert y.stride() == x.stride() and rel(y, expected) < 4e-3
            grad_out = on_device(torch.randn(shape, generator=torch.Generator().manual_seed(channels)))
            (gx,) = torch.autograd.grad(y, x, grad_out.to(torch.bfloat16))
            (gx_expected,) = torch.autograd.grad(expected, x32, grad_out)
            assert gx.stride() == x.stride() and rel(gx, gx_expected) < 1e-2


def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)  # open_clip's QuickGELU


def check_quick_gelu_float32_forward_and_input_gradient_match_the_formula():
    gen = torch.Generator().manual_seed(7)
    # Several programs with a ragged last one; a transposed (non-contiguous) input; an empty one.
    for x in (torch.randn(3, 197, 37, generator=gen) * 4, torch.randn(40, 70, generator=gen).t(), torch.empty(0, 5)):
        x = on_device(x).requires_grad_(True)
        y = triton_clip.quick_gelu(x)
        expected = _quick_gelu(x)
        assert y.shape == x.shape and torch.allclose(y, expected, rtol=1e-6, atol=1e-7)
        if x.numel():
            grad_out = on_device(torch.randn(y.shape, generator=gen))
            (gx,) = torch.autograd.grad(y, x, grad_out)
            (gx_expected,) = torch.autograd.grad(expected, x, grad_out)
            assert gx.shape == x.shape and torch.allclose(gx, gx_expected, rtol=1e-5, atol=1e-6)


def check_quick_gelu_bfloat16_is_computed_in_float32_and_rounded_once():
    gen = torch.Generator().manual_seed(8)
    x = on_device((torch.randn(4, 50, 96, generator=gen) * 3).to(torch.bfloat16)).requires_grad_(True)
    y = triton_clip.quick_gelu(x)
    exact = _quick_gelu(x.detach().double())
    assert y.dtype == torch.bfloat16
    # One rounding of the float32 value: within a bf16 step of the exact function and of the torch reference.
    assert within_one_bf16_step(y, exact)
    reference = triton_clip.quick_gelu_reference(x.detach())
    assert reference.dtype == torch.bfloat16 and within_one_bf16_step(y, reference)
    grad_out = on_device(torch.randn(y.shape, generator=gen).to(torch.bfloat16))
    assert bf16_input_gradient_error(triton_clip.quick_gelu, _quick_gelu, x, grad_out, torch.float64) < 4e-3


def check_layer_norm_float32_forward_and_input_gradient_match_torch():
    gen = torch.Generator().manual_seed(14)
    # A width that is not a power of two (the tokens' 768 is not), a mean well off zero, a non-contiguous input.
    for x in (torch.randn(3, 7, 96, generator=gen) * 2 + 5, torch.randn(80, 6, generator=gen).t(), torch.empty(0, 8)):
        width = x.shape[-1]
        weight, bias = on_device(torch.randn(width, generator=gen), torch.randn(width, generator=gen))
        x = on_device(x).requires_grad_(True)
        y = triton_clip.layer_norm(x, weight, bias, 1e-5)
        expected = torch.nn.functional.layer_norm(x, (width,), weight, bias, 1e-5)
        assert y.shape == x.shape and torch.allclose(y, expected, rtol=1e-5, atol=1e-5)
        if x.numel():
            grad_out = on_device(torch.randn(y.shape, generator=gen))
            (gx,) = torch.autograd.grad(y, x, grad_out)
            (gx_expected,) = torch.autograd.grad(expected, x, grad_out)
            assert rel(gx, gx_expected) < 1e-5


def _openai_layer_norm(width: int, gen: torch.Generator):
    """open_clip's LayerNormFp32 (OpenAI's: float32 statistics and affine, cast back) with random weights."""
    from open_clip.transformer import LayerNormFp32

    norm = LayerNormFp32(width)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(width, generator=gen))
        norm.bias.copy_(torch.randn(width, generator=gen))
    return norm.to(DEVICE)


def check_layer_norm_bfloat16_is_openais_float32_norm_rounded_once():
    gen = torch.Generator().manual_seed(15)
    norm = _openai_layer_norm(96, gen)
    x = on_device((torch.randn(4, 9, 96, generator=gen) * 3 + 1).to(torch.bfloat16)).requires_grad_(True)
    y = triton_clip.layer_norm(x, norm.weight, norm.bias, norm.eps)
    expected = norm(x)  # float32 statistics and affine, cast back
    assert y.dtype == torch.bfloat16
    assert torch.equal(triton_clip.layer_norm_reference(x, norm.weight, norm.bias, norm.eps), expected)
    assert within_one_bf16_step(y, expected, atol=1e-6)
    grad_out = on_device(torch.randn(y.shape, generator=gen).to(torch.bfloat16))
    assert bf16_input_gradient_error(lambda t: triton_clip.layer_norm(t, norm.weight, norm.bias, norm.eps), norm, x,
                                     grad_out, torch.float32) < 4e-3


def check_layer_norm_weight_gradients_come_from_the_reference_when_asked():
    gen = torch.Generator().manual_seed(16)
    x, weight, bias = (on_device(t).requires_grad_(True) for t in (torch.randn(5, 40, generator=gen),
                                                                    torch.randn(40, generator=gen),
                                                                    torch.randn(40, generator=gen)))
    grads = torch.autograd.grad(triton_clip.layer_norm(x, weight, bias, 1e-5).square().sum(), [x, weight, bias])
    expected = torch.autograd.grad(torch.nn.functional.layer_norm(x, (40,), weight, bias, 1e-5).square().sum(),
                                   [x, weight, bias])
    for got, want in zip(grads, expected, strict=True):
        assert rel(got, want) < 1e-5


def check_residual_layer_norm_is_the_sum_rounded_then_normalised():
    gen = torch.Generator().manual_seed(17)
    norm = _openai_layer_norm(96, gen)
    for dtype in (torch.float32, torch.bfloat16):
        x, delta = (on_device((torch.randn(4, 9, 96, generator=gen) * 3 + 1).to(dtype)).requires_grad_(True)
                    for _ in range(2))
        total, y = triton_clip.residual_layer_norm(x, delta, norm.weight, norm.bias, norm.eps)
        # The sum is torch's, to the bit (the interpreter truncates to bf16 where a GPU rounds to nearest, as
        # torch does); the norm is the kernel's own norm of it.
        assert total.dtype == dtype
        if dtype == torch.float32 or DEVICE == "cuda":
            assert torch.equal(total, x + delta)
        else:
            assert within_one_bf16_step(total, x.detach().double() + delta.detach().double())
        alone = triton_clip.layer_norm(total.detach(), norm.weight, norm.bias, norm.eps)
        # Compiled, the two specialisations may order their sums apart.
        assert torch.equal(y, alone) if DEVICE == "cpu" else within_one_bf16_step(y, alone, atol=1e-6)
        # Both terms get the sum's gradient: the norm's plus the residual stream's, rounded once.
        grad_total, grad_y = (on_device(torch.randn(y.shape, generator=gen).to(dtype)) for _ in range(2))
        gx, gd = torch.autograd.grad((total, y), (x, delta), (grad_total, grad_y))
        s = (x.detach().float() + delta.detach().float()).to(dtype).float().requires_grad_(True)
        (expected,) = torch.autograd.grad(norm(s), s, grad_y.float())
        expected = expected + grad_total.float()
        assert torch.equal(gx, gd) and gx.dtype == dtype
        assert rel(gx, expected) < (1e-5 if dtype == torch.float32 else 4e-3)


def check_clip_with_triton_kernels_matches_the_clip_without():
    from unittest import mock

    unet, clip = tiny_unet().to(DEVICE), tiny_clip().to(DEVICE)
    gen = torch.Generator().manual_seed(9)
    images = on_device(torch.randn(3, 3, clip.image_size, clip.image_size, generator=gen)).requires_grad_(True)
    expected = clip.encode_image(images)
    (g_expected,) = torch.autograd.grad(expected.square().sum(), images)
    calls = []
    gelu = mock.patch.object(triton_clip, "quick_gelu",
                             side_effect=lambda x: calls.append("gelu") or triton_clip._QuickGELU.apply(x))
    norm = mock.patch.object(triton_clip, "layer_norm",
                             side_effect=lambda *args: calls.append("norm") or triton_clip._LayerNorm.apply(*args))
    residual_norm = mock.patch.object(triton_clip, "residual_layer_norm", side_effect=lambda *args: calls.append(
        "residual+norm") or triton_clip._ResidualLayerNorm.apply(*args))
    with fast_paths.run_clones(unet, clip, FastPathOptions(triton_clip=True)) as (_, fast), gelu, norm, residual_norm:
        assert fast.kernels == "triton" and clip.kernels is None
        out = fast.encode_image(images)
        (g,) = torch.autograd.grad(out.square().sum(), images)
    # Every block's two norms and its MLP by the kernels: the first block's first norm alone, every other norm
    # with the residual sum before it.
    blocks = len(clip.model.visual.transformer.resblocks)
    assert calls.count("gelu") == blocks and calls.count("norm") == 1
    assert calls.count("residual+norm") == 2 * blocks - 1
    assert rel(out, expected) < 1e-6 and rel(g, g_expected) < 1e-5


def check_checkpointed_networks_with_the_kernels_match_the_plain_ones():
    # Activation checkpointing (the Speed node's options for smaller cards) with the Triton kernels: its hooks let
    # a backward read each saved tensor once only (a second read raised CheckpointError), and its recomputation
    # runs the kernels again, carried statistics and all. The UNet with gradient_checkpointing and the Triton
    # norm, and CLIP's tower with clip_checkpointing and the Triton CLIP kernels, give the plain networks' output
    # and input gradient.
    unet, clip = tiny_unet().to(DEVICE), tiny_clip().to(DEVICE)
    gen = torch.Generator().manual_seed(12)
    x = on_device(torch.randn(1, 3, 32, 32, generator=gen)).to(memory_format=torch.channels_last).requires_grad_(True)
    t = on_device(torch.tensor([300.0]))
    images = on_device(torch.randn(2, 3, clip.image_size, clip.image_size, generator=gen)).requires_grad_(True)
    expected, clip_expected = unet(x, t), clip.encode_image(images)
    (g_expected,) = torch.autograd.grad(expected.square().sum(), x)
    (clip_g_expected,) = torch.autograd.grad(clip_expected.square().sum(), images)
    options = FastPathOptions(triton_norm=True, channels_last=True, gradient_checkpointing=True, triton_clip=True,
                              clip_checkpointing=True)
    with fast_paths.run_clones(unet, clip, options) as (fast, fast_clip):
        assert fast.norm_kernel == "triton" and fast.gradient_checkpointing and fast_clip.kernels == "triton"
        assert fast_clip.model.visual.transformer.grad_checkpointing
        out, clip_out = fast(x, t), fast_clip.encode_image(images)
        (g,) = torch.autograd.grad(out.square().sum(), x)
        (clip_g,) = torch.autograd.grad(clip_out.square().sum(), images)
    assert rel(out, expected) < 1e-5 and rel(g, g_expected) < 1e-4
    assert rel(clip_out, clip_expected) < 1e-6 and rel(clip_g, clip_g_expected) < 1e-5


CHECKS = {name[len("check_"):]: fn for name, fn in sorted(globals().items()) if name.startswith("check_")}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checks", nargs="*", help=f"the checks to run (default: all): {', '.join(CHECKS)}")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cpu: Triton's interpreter (TRITON_INTERPRET=1); cuda: the compiled kernels")
    parser.add_argument("--json", type=Path, help="also write one row per check to this JSON file")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.checks) - set(CHECKS))
    if unknown:
        parser.error(f"no such check: {', '.join(unknown)}")
    if args.device == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    else:  # plain float32 references: no TF32 in the convolutions and matmuls
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for name in args.checks or list(CHECKS):
        start = time.perf_counter()
        try:
            CHECKS[name]()
            rows.append({"check": name, "ok": True})
            print(f"ok {name}", flush=True)
        except Exception:  # report every check, then fail
            rows.append({"check": name, "ok": False, "error": traceback.format_exc(limit=-3)})
            print(f"FAILED {name}\n{traceback.format_exc()}", flush=True)
        rows[-1].update(device=args.device, wall_s=round(time.perf_counter() - start, 2))
        if args.json:  # whole or not at all: a run stopped mid-write keeps the previous checks' rows
            write_json_atomically(args.json, rows)
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
