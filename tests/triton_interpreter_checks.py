"""Checks of the triton_norm kernels in Triton's CPU interpreter, run by tests/test_triton_norm.py in a fresh
process: the interpreter must be chosen before Triton builds the kernels, and a process where Triton or
inductor already ran cannot switch reliably.

    TRITON_INTERPRET=1 python tests/triton_interpreter_checks.py [check ...]
"""

from __future__ import annotations

import os
import sys
import traceback

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from blended import fast_paths  # noqa: E402
from blended import triton_norm as kernels  # noqa: E402
from blended.fast_paths import FastPathOptions  # noqa: E402
from blended.fused_norm import group_norm_act  # noqa: E402
from conftest import tiny_clip, tiny_unet  # noqa: E402


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def case(shape, dtype, channels_last, scale_shift, seed):
    gen = torch.Generator().manual_seed(seed)
    batch, channels = shape[:2]
    x = (torch.randn(*shape, generator=gen) * 3 + 2).to(dtype)  # a mean well off zero: the statistics' test
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight, bias = torch.randn(channels, generator=gen), torch.randn(channels, generator=gen)
    ss = torch.randn(batch, 2 * channels, 1, 1, generator=gen).to(dtype) if scale_shift else None
    return x.requires_grad_(True), weight, bias, ss


def _float32_case(shape, channels_last, scale_shift):
    x, weight, bias, ss = case(shape, torch.float32, channels_last, scale_shift, seed=sum(shape))
    y = kernels.group_norm_silu(x, weight, bias, shape[1] // 32, 1e-5, ss)
    expected = group_norm_act(x, weight, bias, shape[1] // 32, 1e-5, ss)
    assert rel(y, expected) < 1e-6
    assert y.stride() == x.stride()  # written in the input's memory format
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
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
    unet, clip = tiny_unet(), tiny_clip()
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 64, 64, generator=gen).to(memory_format=torch.channels_last).requires_grad_(True)
    t = torch.tensor([20.0, 600.0])
    expected = unet(x, t)
    (g_expected,) = torch.autograd.grad(expected.square().sum(), x)
    options = FastPathOptions(triton_norm=True, channels_last=True)
    with fast_paths.run_clones(unet, clip, options) as (fast, _):
        assert fast.norm_kernel == "triton"
        out = fast(x, t)
        (g,) = torch.autograd.grad(out.square().sum(), x)
    assert rel(out, expected) < 1e-5 and rel(g, g_expected) < 1e-4


def check_float32_forward_and_input_gradient_match_the_reference():
    # Shapes: one group per program and many splits, a group size that is not a power of two (96 / 32 = 3) on a
    # non-square map, and the pixel count not a multiple of the tile; both memory formats, with and without
    # the timestep scale-shift.
    for shape in ((2, 64, 8, 8), (1, 96, 4, 6), (3, 256, 12, 12)):
        for channels_last in (True, False):
            for scale_shift in (True, False):
                _float32_case(shape, channels_last, scale_shift)


CHECKS = {name[len("check_"):]: fn for name, fn in sorted(globals().items()) if name.startswith("check_")}


def main(names: list[str]) -> int:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    failed = 0
    for name in names or list(CHECKS):
        try:
            CHECKS[name]()
            print(f"ok {name}", flush=True)
        except Exception:  # report every check, then fail
            failed += 1
            print(f"FAILED {name}\n{traceback.format_exc()}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
