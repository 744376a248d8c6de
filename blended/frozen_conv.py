"""A Conv2d that keeps only its weight for the backward when its weight is frozen.

CLIP guidance differentiates the UNet w.r.t. its input, never its weights. Autograd's convolution node still
saves its input for a weight gradient nobody asks for: in every ResBlock that is the SiLU output before each
conv, two of the six full-size maps a ResBlock keeps, and the float32 map before the ``out`` conv. The gradient
w.r.t. the input needs only the weight (and the input's shape), so this conv saves just that. It computes the
gradient with the same ``convolution_backward`` call autograd makes (only the input-gradient output asked for),
given an uninitialised stand-in with the input's shape and strides, so the results are the same bits and only
the memory changes: the stand-in lives only during that conv's backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FrozenWeightConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state-dict keys) that saves no activation when its weight is frozen."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._convolve(x, self.bias)

    def without_bias(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution without its bias, for a caller that adds the bias inside a kernel of its own (on CUDA
        a convolution adds its bias in a pass of its own over the output)."""
        return self._convolve(x, None)

    def _convolve(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (self.weight.requires_grad or self.padding_mode != "zeros" or not x.requires_grad
                or not torch.is_grad_enabled()):
            return self._conv_forward(x, self.weight, bias)
        weight = self.weight
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # The casts autocast would make for conv2d, made here so that the Function sees the dtypes it runs in.
            dtype = torch.get_autocast_dtype(device_type)
            x, weight = _cast(x, dtype), _cast(weight, dtype)
            bias = None if bias is None else _cast(bias, dtype)
            with torch.autocast(device_type, enabled=False):
                return _WeightOnlyConv.apply(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return _WeightOnlyConv.apply(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # autocast casts floating tensors other than float64, and leaves everything else alone
    if tensor.dtype == dtype or not tensor.is_floating_point() or tensor.dtype == torch.float64:
        return tensor
    return tensor.to(dtype)


class _WeightOnlyConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.geometry = (x.shape, x.stride(), x.dtype, stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, strides, dtype, stride, padding, dilation, groups = ctx.geometry
        # Only the input's metadata is read. An uninitialised tensor with the input's exact strides (no kernel
        # runs to make it) gives the backends the same layout choices as the real input; an expanded one-element
        # tensor, as torch.nn.grad.conv2d_input uses, would be copied into a contiguous map first.
        stand_in = torch.empty_strided(shape, strides, dtype=dtype, device=grad.device)
        grad_input = torch.ops.aten.convolution_backward(
            grad, stand_in, weight, None, stride, padding, dilation, False, [0, 0], groups, (True, False, False))[0]
        return grad_input, None, None, None, None, None, None


def pointwise_conv_of_pair(conv: nn.Conv2d, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``conv(torch.cat([a, b], 1))`` for a 1x1 convolution, without the concatenation. In channels_last a 1x1
    convolution is a matrix product over the channels, so the two parts are two products, the second accumulating
    into the first (``addmm``, beta 1), and their gradients come back as two dense maps. A frozen weight gets no
    gradient and the parts are views of the maps, so nothing beyond them is kept. The output is channels_last."""
    batch, split, height, width = a.shape
    weight = conv.weight.reshape(conv.out_channels, -1)

    def rows(t: torch.Tensor) -> torch.Tensor:  # [B*H*W, C]: a view of a channels_last map
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])

    first = rows(a) @ weight[:, :split].t() if conv.bias is None else torch.addmm(conv.bias, rows(a),
                                                                                 weight[:, :split].t())
    out = torch.addmm(first, rows(b), weight[:, split:].t())
    return out.view(batch, height, width, conv.out_channels).permute(0, 3, 1, 2)
