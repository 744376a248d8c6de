"""Kernel choices inside the UNet that must not change a bit: the down ResBlocks' 2x2 average pooling backward, the
convolutions that keep only their weight for the backward, and the attention's q, k and v views."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from blended.frozen_conv import FrozenWeightConv2d, pointwise_conv_of_pair
from blended.unet import AttentionBlock, Downsample, _HalvingAvgPool

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


def _saved_shapes(fn):
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return out, shapes


CONVS = [dict(in_channels=8, out_channels=16, kernel_size=3, padding=1),
         dict(in_channels=8, out_channels=8, kernel_size=3, stride=2, padding=1),
         dict(in_channels=8, out_channels=16, kernel_size=1)]


@pytest.mark.parametrize("conv_args", CONVS, ids=("3x3", "3x3-stride2", "1x1"))
@pytest.mark.parametrize("precision", ("fp32", "bf16-autocast"))
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "nhwc"))
def test_frozen_weight_conv_gives_conv2d_bits_and_keeps_only_its_weight(conv_args, precision, channels_last):
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(**conv_args).requires_grad_(False)
    frozen = FrozenWeightConv2d(**conv_args).requires_grad_(False)
    frozen.load_state_dict(plain.state_dict())
    x = torch.randn(2, 8, 12, 12)
    if channels_last:
        x, plain, frozen = (t.to(memory_format=torch.channels_last) for t in (x, plain, frozen))
    results = []
    for conv in (plain, frozen):
        leaf = x.clone().requires_grad_(True)
        with torch.autocast("cpu", torch.bfloat16, enabled=precision != "fp32"):
            out, saved = _saved_shapes(lambda conv=conv, leaf=leaf: conv(leaf.sin()))  # the conv input is not the leaf
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
        out.backward(grad)
        results.append((out, leaf.grad, saved))
    (out, grad, saved), (frozen_out, frozen_grad, frozen_saved) = results
    assert torch.equal(frozen_out, out) and frozen_out.stride() == out.stride()
    assert torch.equal(frozen_grad, grad) and frozen_grad.stride() == grad.stride()
    conv_input = tuple(x.shape)
    assert saved.count(conv_input) == 2  # sin's input and the conv's
    assert frozen_saved.count(conv_input) == 1 and tuple(plain.weight.shape) in frozen_saved


def test_frozen_weight_conv_is_a_plain_conv_when_its_weight_learns():
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(4, 4, 3, padding=1)
    conv = FrozenWeightConv2d(4, 4, 3, padding=1)
    conv.load_state_dict(plain.state_dict())
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    plain(x).square().sum().backward()
    conv(x).square().sum().backward()
    assert torch.equal(conv.weight.grad, plain.weight.grad) and torch.equal(conv.bias.grad, plain.bias.grad)


@pytest.mark.parametrize("autocast", (None, torch.bfloat16), ids=("fp32", "bf16-autocast"))
def test_unet_keeps_less_for_the_backward_with_the_same_gradient(unet, monkeypatch, autocast):
    """The tiny UNet's input gradient is the same bits with its convs keeping their inputs (plain Conv2d) or
    not, and it keeps less for the backward."""
    assert all(type(m) is FrozenWeightConv2d for m in unet.modules() if isinstance(m, torch.nn.Conv2d))
    size = unet.config.image_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([10, 90])
    previous = unet.autocast_dtype
    unet.autocast_dtype = autocast

    def run():
        leaf = x.clone().requires_grad_(True)
        out, saved = _saved_shapes(lambda: unet(leaf, t))
        out.square().sum().backward()
        return leaf.grad, sum(torch.Size(shape).numel() for shape in saved)

    try:
        grad, kept = run()
        with monkeypatch.context() as patch:
            patch.setattr(FrozenWeightConv2d, "forward", torch.nn.Conv2d.forward)
            plain_grad, plain_kept = run()
    finally:
        unet.autocast_dtype = previous
    assert torch.equal(grad, plain_grad)
    assert kept < 0.8 * plain_kept


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_a_1x1_conv_of_two_parts_is_the_conv_of_their_concatenation(autocast):
    """An output block's skip conv on the running map and the encoder's skip without concatenating them: the
    same output (float32 to rounding; under bf16 autocast within the rounding of the first product, which the
    second reads back), in channels_last, and each part's gradient a dense channels_last map of its own, where
    the concatenation's gradient would be sliced into strided views. The frozen weight gets no gradient."""
    torch.manual_seed(0)
    conv = FrozenWeightConv2d(96, 40, 1).requires_grad_(False)
    a, b = (torch.randn(2, c, 5, 6).to(memory_format=torch.channels_last).requires_grad_(True) for c in (64, 32))
    grad = torch.randn(2, 40, 5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        expected = conv(torch.cat([a, b], 1))
        out = pointwise_conv_of_pair(conv, a, b)
    ga, gb = torch.autograd.grad(out, (a, b), grad)
    ga_expected, gb_expected = torch.autograd.grad(expected, (a, b), grad)
    tolerance = 2e-2 if autocast else 1e-6
    assert out.dtype == expected.dtype and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.float(), expected.float(), atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(ga, ga_expected, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(gb, gb_expected, atol=tolerance, rtol=tolerance)
    assert all(g.is_contiguous(memory_format=torch.channels_last) for g in (ga, gb))
    assert conv.weight.grad is None


class _BackwardCopies(TorchDispatchMode):
    """Records the copies (``clone``, ``copy_``) autograd's backward makes inside it."""

    def __init__(self):
        super().__init__()
        self.copies: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch._C._current_graph_task_id() != -1 and func.__name__.split(".")[0] in ("clone", "copy_"):
            node = torch._C._current_autograd_node()
            self.copies.append(f"{func.__name__} in {node.name() if node is not None else '?'}")
        return func(*args, **(kwargs or {}))


def test_attention_backward_stacks_the_qkv_gradient_in_the_projections_layout():
    """q, k and v are views of the packed projection unbound along its packed dimension, so the backward stacks
    their gradients straight into the projection's layout; unbound after a permute (the same views), the stacked
    gradient was copied once more before the projection's backward. The same values either way."""
    gen = torch.Generator().manual_seed(3)
    block = AttentionBlock(64, 4, legacy_order=True).to(torch.bfloat16)
    x = torch.randn(2, 64, 8, 8, generator=gen).to(torch.bfloat16, memory_format=torch.channels_last)
    grad = torch.randn(2, 64, 8, 8, generator=gen).to(torch.bfloat16, memory_format=torch.channels_last)
    x.requires_grad_(True)
    out = block(x)
    with _BackwardCopies() as recorded:
        (got,) = torch.autograd.grad(out, x, grad)
    assert _outside_the_norm(recorded.copies) == []

    def permuted_forward(x):  # the earlier unbinding, for the values
        batch, channels, height, width = x.shape
        tokens = x.reshape(batch, channels, height * width)
        qkv = F.linear(block.norm(tokens).transpose(1, 2), block.qkv.weight.squeeze(-1), block.qkv.bias)
        q, k, v = qkv.view(batch, height * width, 3, 4, 16).permute(2, 0, 3, 1, 4).unbind(0)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, height * width, channels)
        projected = F.linear(attended, block.proj_out.weight.squeeze(-1), block.proj_out.bias)
        return (tokens + projected.transpose(1, 2)).reshape(x.shape)

    expected = permuted_forward(x)
    with _BackwardCopies() as recorded_permuted:
        (want,) = torch.autograd.grad(expected, x, grad)
    assert torch.equal(out, expected) and torch.equal(got, want)
    assert _outside_the_norm(recorded_permuted.copies), "the permuted unbinding's copy is what this test looks for"


def _outside_the_norm(copies: list[str]) -> list[str]:
    # torch's own CPU GroupNorm backward copies a channels_last bf16 input to its layout in some releases (2.11),
    # not in others (2.14): not the attention's doing.
    return [copy for copy in copies if "GroupNormBackward" not in copy]
