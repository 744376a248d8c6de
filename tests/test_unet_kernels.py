"""Kernel choices inside the UNet that must not change a bit: the down ResBlocks' 2x2 average pooling backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blended.unet import Downsample, _HalvingAvgPool

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _pool_grads(pool, x: torch.Tensor, grad: torch.Tensor):
    leaf = x.clone().requires_grad_(True)
    out = pool(leaf)
    out.backward(grad)
    return out.detach(), leaf.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "nhwc"))
def test_halving_pool_gives_avg_pool_bits_forward_and_backward(dtype, channels_last):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 16, 12, generator=gen).to(dtype)
    grad = torch.randn(2, 8, 8, 6, generator=gen)
    # values whose quarter is subnormal, huge, zero or non-finite round the same way in both
    tiny = torch.finfo(dtype).tiny
    grad.view(-1)[:6] = torch.tensor([tiny, 3 * tiny, torch.finfo(dtype).max, 0.0, float("inf"), float("nan")])
    grad = grad.to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        grad = grad.to(memory_format=torch.channels_last)
    expected_out, expected_grad = _pool_grads(lambda t: F.avg_pool2d(t, 2, 2), x, grad)
    out, got_grad = _pool_grads(_HalvingAvgPool.apply, x, grad)
    assert torch.equal(out, expected_out)
    assert torch.equal(got_grad.nan_to_num(), expected_grad.nan_to_num())
    assert torch.equal(got_grad.isnan(), expected_grad.isnan())
    assert got_grad.stride() == expected_grad.stride()


def test_downsample_pools_odd_sizes_as_before():
    """Odd maps floor as nn.AvgPool2d does (the last row and column get no gradient); even ones take the fast
    backward."""
    down = Downsample(4, use_conv=False)
    for size in ((9, 7), (8, 6)):
        x = torch.randn(1, 4, *size)
        expected_out, expected_grad = _pool_grads(down.op, x, torch.ones(1, 4, size[0] // 2, size[1] // 2))
        out, got_grad = _pool_grads(down, x, torch.ones(1, 4, size[0] // 2, size[1] // 2))
        assert torch.equal(out, expected_out) and torch.equal(got_grad, expected_grad)


def test_unet_input_gradient_unchanged_by_the_pool_backward(unet, monkeypatch):
    """The whole UNet's gradient w.r.t. its input, with the down ResBlocks' pooling through autograd's own
    avg_pool2d backward and through the fast one, is the same bits."""
    assert any(isinstance(m, Downsample) and isinstance(m.op, torch.nn.AvgPool2d) for m in unet.modules())
    size = unet.config.image_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 90])

    def input_grad():
        leaf = x.clone().requires_grad_(True)
        unet(leaf, t).square().sum().backward()
        return leaf.grad

    fast = input_grad()
    monkeypatch.setattr(Downsample, "forward", lambda self, h: self.op(h))
    assert torch.equal(fast, input_grad())
