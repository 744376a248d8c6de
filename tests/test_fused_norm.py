"""The fused_norm fast path: GroupNorm (+ scale-shift) + SiLU as one function, eager reference and compiled."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blended import fast_paths, fused_norm
from blended import unet as unet_module
from blended.fast_paths import FastPathOptions
from conftest import tiny_unet


def unfused(x, weight, bias, groups, eps, scale_shift=None):
    """What the UNet computes without the option: GroupNorm, then shift + h * (1 + scale), then SiLU."""
    h = F.group_norm(x.float(), groups, weight.float(), bias.float(), eps)
    if scale_shift is not None:
        scale, shift = scale_shift.float().chunk(2, dim=1)
        h = torch.addcmul(shift, h, 1 + scale)
    return F.silu(h)


def case(batch, channels, size, channels_last, scale_shift, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=gen) * 3 + 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight, bias = torch.randn(channels, generator=gen), torch.randn(channels, generator=gen)
    ss = torch.randn(batch, 2 * channels, 1, 1, generator=gen) if scale_shift else None
    return x.requires_grad_(True), weight, bias, ss


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("scale_shift", [False, True])
def test_reference_equals_groupnorm_scale_shift_silu_forward_and_backward(channels_last, scale_shift):
    x, weight, bias, ss = case(3, 64, 8, channels_last, scale_shift)
    y = fused_norm.group_norm_act(x, weight, bias, 64 // 32, 1e-5, ss)
    expected = unfused(x, weight, bias, 32, 1e-5, ss)
    assert rel(y, expected) < 1e-6
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    grad_out = torch.randn_like(expected)
    (gx,) = torch.autograd.grad(y, x, grad_out)
    (gx_expected,) = torch.autograd.grad(expected, x, grad_out)
    assert rel(gx, gx_expected) < 1e-5


def test_low_precision_input_is_normalised_in_float32_and_rounded_once():
    x, weight, bias, ss = case(2, 64, 8, True, True)
    y = fused_norm.group_norm_act(x.detach().bfloat16(), weight, bias, 2, 1e-5, ss.bfloat16())
    assert y.dtype == torch.bfloat16
    # Only the input's and the output's bf16 rounding: about 2**-8 relative, not the drift of bf16 statistics.
    assert rel(y, unfused(x.detach().bfloat16(), weight, bias, 32, 1e-5, ss.bfloat16())) < 5e-3


def test_compiled_function_matches_the_reference_and_shares_code_across_shapes():
    """The inductor path on the CPU: the same numbers as the reference, and a second shape (another batch,
    channel count and size) runs on the first compile's code instead of compiling again."""
    torch._dynamo.reset()
    fused_norm.set_compile_backend("inductor")
    compiled_frames = []
    for batch, channels, size in ((2, 64, 8), (3, 128, 4)):
        x, weight, bias, ss = case(batch, channels, size, True, True, seed=batch)
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        y = fused_norm.fused_group_norm_act(x, weight, bias, channels // 32, 1e-5, ss)
        compiled_frames.append(torch._dynamo.utils.counters["stats"]["unique_graphs"] - before)
        expected = fused_norm.group_norm_act(x, weight, bias, channels // 32, 1e-5, ss)
        assert rel(y, expected) < 1e-5
        assert y.is_contiguous(memory_format=torch.channels_last)
        grad_out = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, x, grad_out)
        (gx_expected,) = torch.autograd.grad(expected, x, grad_out)
        assert rel(gx, gx_expected) < 1e-5
    assert compiled_frames == [1, 0]


def test_unet_with_fused_norm_matches_the_unet_without(unet, clip, monkeypatch):
    """The whole tiny UNet, forward and input gradient, with the option on (compiled through aot_eager here:
    the same graphs and autograd as inductor, without C++ builds) against the faithful path. The eager
    reference gives the same numbers, so the compiled function's calls are counted too: one per norm of every
    ResBlock (in and out) and one for the UNet's out head."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return fused_norm.fused_group_norm_act(*args, **kwargs)

    monkeypatch.setattr(unet_module, "fused_group_norm_act", counted)
    resblocks = sum(isinstance(module, unet_module.ResBlock) for module in unet.modules())
    assert resblocks > 0
    fused_norm.set_compile_backend("aot_eager")
    try:
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(2, 3, 64, 64, generator=gen, requires_grad=True)
        t = torch.tensor([10.0, 500.0])
        expected = unet(x, t)
        (g_expected,) = torch.autograd.grad(expected.square().sum(), x)
        with fast_paths.run_clones(unet, clip, FastPathOptions(fused_norm=True)) as (fused, _):
            assert fused.norm_kernel == "compile" and unet.norm_kernel is None
            out = fused(x, t)
            assert len(calls) == 2 * resblocks + 1
            (g,) = torch.autograd.grad(out.square().sum(), x)
        assert unet.norm_kernel is None
        assert rel(out, expected) < 1e-5
        assert rel(g, g_expected) < 1e-4
    finally:
        fused_norm.set_compile_backend("inductor")


def test_norm_kernels_are_option_tokens_and_only_the_measured_one_is_in_a_preset():
    for token in ("fused_norm", "triton_norm"):
        assert getattr(fast_paths.parse_preset(f"bf16+{token}"), token)
        assert token in fast_paths.parse_preset(f"bf16+{token}").describe()
    # fused_norm measured slower on an H100; triton_norm faster, in the Sampler's CUDA default only
    assert not any(preset.fused_norm for preset in fast_paths.PRESETS.values())
    assert [name for name, preset in fast_paths.PRESETS.items() if preset.triton_norm] == ["fastest-gpu"]


def test_a_fresh_unet_runs_its_norm_modules_and_refuses_unknown_kernels():
    model = tiny_unet()
    assert model.norm_kernel is None
    assert not any(getattr(m, "norm_kernel", None) for m in model.modules())
    with pytest.raises(ValueError, match="compile, triton"):
        model.norm_kernel = "cuda"
