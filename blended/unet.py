"""The guided-diffusion ("ADM", Dhariwal & Nichol 2021) UNet, written to load OpenAI's released checkpoints.

Blended Diffusion guides OpenAI's ``256x256_diffusion_uncond.pt``; to load that file strictly, every parameter
name and shape here follows the original module tree (``time_embed.0``, ``input_blocks.N.M.*``, ResBlock
``in_layers.0/.2``, ``emb_layers.1``, ``out_layers.0/.3``, AttentionBlock ``norm/qkv/proj_out`` with Conv1d
k=1, ``out.0/.2``). Everything else (how attention is computed, how low precision is handled, activation
checkpointing) is free, and is chosen for speed:

* attention runs through :func:`torch.nn.functional.scaled_dot_product_attention`. The released weights use
  the "legacy" qkv channel order (heads split before q/k/v); a load pre-hook permutes them into the
  ``[q | k | v]`` order SDPA wants, and a state-dict post-hook permutes them back, so results equal the
  original and a save/load round trip is lossless;
* :meth:`GuidedDiffusionUNet.to_compute_dtype` reproduces the original's fp16 scheme (only the convs of the
  three block stacks in low precision; GroupNorm, timestep embedding, ``emb_layers`` and ``out`` in fp32);
* ``gradient_checkpointing`` trades compute for memory in the grad-enabled forward of CLIP guidance;
* ``autocast_dtype`` (bf16/fp16) runs the block stacks under autocast instead, keeping fp32 weights; the
  timestep embedding and ``out`` stay fp32 as in :meth:`GuidedDiffusionUNet.to_compute_dtype`;
* ``norm_kernel`` runs each GroupNorm (+ scale-shift) + SiLU of the ResBlocks and ``out`` as one function:
  "compile" (:mod:`blended.fused_norm`) or "triton" (:mod:`blended.triton_norm`, which also runs the attention
  blocks' GroupNorms);
* the convolutions keep only their (frozen) weight for the backward, not their input
  (:mod:`blended.frozen_conv`): guidance needs the gradient w.r.t. the image, never the weights'.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import carried_statistics
from .cuda_graphs import CHECKPOINT_ARGS
from .devices import runs_triton_kernels
from .frozen_conv import FrozenWeightConv2d, pointwise_conv_of_pair
from .fused_norm import fused_group_norm_act, group_norm_act

__all__ = ["UNetConfig", "GuidedDiffusionUNet", "timestep_embedding"]

GROUP_NORM_GROUPS = 32
GROUP_NORM_EPS = 1e-5
TIMESTEP_MAX_PERIOD = 10000
# Device types whose GroupNorm takes the float32 path for non-contiguous (channels_last) low-precision input:
# on CPU the native bf16 kernel's backward is ~20x slower for channels_last input (torch 2.14).
STRIDED_NORM_FP32_DEVICES = frozenset({"cpu"})


@dataclass(frozen=True)
class UNetConfig:
    """The architecture of one guided-diffusion UNet.

    ``attention_resolutions`` holds downsample rates (``ds = image_size // resolution``), not resolutions:
    the network only knows rates, and rates make the config independent of the working image size.
    ``image_size`` is the resolution the weights were trained at; the network itself runs at any size
    divisible by ``2 ** (len(channel_mult) - 1)``.
    """

    image_size: int = 256
    in_channels: int = 3
    model_channels: int = 256
    out_channels: int = 6
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (8, 16, 32)
    channel_mult: tuple[float, ...] = (1, 1, 2, 2, 4, 4)
    num_classes: int | None = None
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    num_heads: int = 4
    num_head_channels: int = 64
    num_heads_upsample: int = -1
    use_new_attention_order: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        # Normalise containers so that configs from JSON, detection and code compare equal.
        object.__setattr__(self, "attention_resolutions", tuple(sorted(int(d) for d in self.attention_resolutions)))
        object.__setattr__(self, "channel_mult", tuple(_plain_number(m) for m in self.channel_mult))

    @property
    def learn_sigma(self) -> bool:
        """The model predicts variance interpolation values next to eps (LEARNED_RANGE)."""
        return self.out_channels == 2 * self.in_channels

    @property
    def class_cond(self) -> bool:
        return self.num_classes is not None

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    @property
    def downsample_factor(self) -> int:
        """Input height and width must be multiples of this."""
        return 2 ** (len(self.channel_mult) - 1)

    def heads_for(self, channels: int, upsample_path: bool = False) -> int:
        """Head count of an attention block, by the original's rule (head width wins over head count)."""
        if self.num_head_channels != -1:
            if channels % self.num_head_channels:
                raise ValueError(f"{channels} channels are not divisible by num_head_channels={self.num_head_channels}")
            return channels // self.num_head_channels
        if upsample_path and self.num_heads_upsample != -1:
            return self.num_heads_upsample
        return self.num_heads

    def to_dict(self) -> dict:
        data = asdict(self)
        data["attention_resolutions"] = list(self.attention_resolutions)
        data["channel_mult"] = list(self.channel_mult)
        return data


def _plain_number(value: float) -> float | int:
    value = float(value)
    return int(value) if value.is_integer() else value


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = TIMESTEP_MAX_PERIOD) -> torch.Tensor:
    """Sinusoidal embedding with the cos half first, as the checkpoints were trained with (float32)."""
    half = dim // 2
    # Same operation order as the training code, so the float32 frequencies match bit for bit.
    steps = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(-math.log(max_period) * steps / half)
    args = timesteps.reshape(-1, 1).float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back: fp16 statistics over large maps are not accurate enough."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 and torch.is_autocast_enabled(x.device.type) and not (
                x.device.type in STRIDED_NORM_FP32_DEVICES and not x.is_contiguous()):
            return self._low_precision_forward(x)
        normed = F.group_norm(_in_dtype(x, torch.float32), self.num_groups, _in_dtype(self.weight, torch.float32),
                              _in_dtype(self.bias, torch.float32), self.eps)
        return _in_dtype(normed, x.dtype)

    def _low_precision_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The autocast fast path: the native kernel on the low-precision input, outside autocast.

        The kernel accumulates the statistics in float32 itself, so the result matches the fp32-cast path up to
        the output's rounding and bf16/fp16-rounded affine parameters; but the tensor saved for the backward
        stays bf16/fp16 instead of an fp32 copy, which is most of the saved activations of a ResBlock. Only
        reached under autocast: the faithful (fp32) and torso paths are unchanged.
        """
        weight, bias = _in_dtype(self.weight, x.dtype), _in_dtype(self.bias, x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)


def _in_dtype(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``tensor`` in ``dtype``, without dispatching an ``aten::to`` when it already is (a no-op that still costs
    host time per call: four per GroupNorm in float32, two under autocast once its weights are pre-cast)."""
    return tensor if tensor is None or tensor.dtype == dtype else tensor.to(dtype)


def _norm(channels: int) -> GroupNorm32:
    return GroupNorm32(GROUP_NORM_GROUPS, channels, eps=GROUP_NORM_EPS)


class Downsample(nn.Module):
    """2x downsampling: strided 3x3 conv (key ``op``) or, without a conv, 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op = FrozenWeightConv2d(channels, out_channels, 3, stride=2, padding=1)
        else:
            if out_channels != channels:
                raise ValueError("pooling cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.op, nn.AvgPool2d) and x.shape[-2] % 2 == 0 and x.shape[-1] % 2 == 0:
            return _HalvingAvgPool.apply(x)
        return self.op(x)


class _HalvingAvgPool(torch.autograd.Function):
    """2x2 average pooling (stride 2, even sizes) whose backward spreads each gradient over its window by a
    nearest-neighbour upsampling of the gradient times 1/4.

    On CUDA ``avg_pool2d_backward`` is a slow generic kernel: about 0.7 ms per call on 256-px maps of a batch of
    8 on an H100, 3% of a guided step's kernel time for the ten calls of the down ResBlocks. The windows do not
    overlap, so each input position gets exactly one gradient divided by four, and multiplying by 1/4 (a power
    of two) rounds the same way: the gradients are the same bits, by a plain copy kernel.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, kernel_size=2, stride=2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return upsample_nearest_2x(grad * 0.25)


class Upsample(nn.Module):
    """2x nearest upsampling, optionally followed by a 3x3 conv (key ``conv``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.conv = FrozenWeightConv2d(channels, out_channels, 3, padding=1)
        elif out_channels != channels:
            raise ValueError("upsampling without a conv cannot change the channel count")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = upsample_nearest_2x(x)
        conv = getattr(self, "conv", None)
        return x if conv is None else conv(x)


def upsample_nearest_2x(x: torch.Tensor) -> torch.Tensor:
    """2x nearest upsampling in ``x``'s own dtype, autocast or not.

    CUDA's autocast runs ``upsample_nearest2d`` in float32 (CPU's does not): a bf16 map was cast up, upsampled
    into a float32 map twice its size and cast back by the next convolution, both ways again in the backward.
    In an up ResBlock the float32 skip path then made the block's output, the next block's concatenation and
    its norm float32 too. Copying a value is exact in any dtype, so the result is the same values; only the
    sums after it now stay in the blocks' dtype, as on the CPU, where the fast paths' tolerances are tested.
    """
    if x.dtype == torch.float32 or not torch.is_autocast_enabled(x.device.type):
        return F.interpolate(x, scale_factor=2, mode="nearest")
    with torch.autocast(x.device.type, enabled=False):
        return F.interpolate(x, scale_factor=2, mode="nearest")


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding, optionally resampling (``resblock_updown``)."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = True,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(_norm(channels), nn.SiLU(),
                                       FrozenWeightConv2d(channels, out_channels, 3, padding=1))
        self.resample: nn.Module | None
        if up:
            self.resample = Upsample(channels, use_conv=False)
        elif down:
            self.resample = Downsample(channels, use_conv=False)
        else:
            self.resample = None
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            _norm(out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            FrozenWeightConv2d(out_channels, out_channels, 3, padding=1),
        )
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = FrozenWeightConv2d(channels, out_channels, 1)

    # Set on every ResBlock by GuidedDiffusionUNet.norm_kernel; a class default keeps old pickles working.
    norm_kernel: str | None = None

    def forward(self, x: torch.Tensor, activated_emb: torch.Tensor) -> torch.Tensor:
        """``activated_emb`` is SiLU of the timestep embedding, ``emb_layers[0]`` applied once by the UNet for
        every block (as autocast would cast it, in the blocks' dtype); this block applies ``emb_layers[1]``."""
        return self._forward(x, activated_emb, hand_input_on=False)[0]

    def forward_handing_input(self, x: torch.Tensor, activated_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(forward(x, activated_emb), x)``, for an input the UNet's skip stack keeps too: with the Triton norm
        the returned ``x`` carries the decoder's gradient into this block's norm backward, which adds it with the
        block's own gradients as it writes ``x``'s, where autograd would read that gradient back to sum them."""
        return self._forward(x, activated_emb, hand_input_on=True)

    def _forward(self, x: torch.Tensor, activated_emb: torch.Tensor,
                 hand_input_on: bool) -> tuple[torch.Tensor, torch.Tensor]:
        norm_in, act_in, _ = self.in_layers
        handed = x
        if self._halves_in_the_norm(x):
            h, x, *rest = _fused_norm_silu_halving(norm_in, x, hand_input_on)
            return self._after_input_norm(h, x, activated_emb, resampled=True), rest[0] if rest else handed
        if self.norm_kernel:
            h, x, *rest = _fused_norm_silu_keeping_input(self.norm_kernel, norm_in, x, hand_input_on)
            handed = rest[0] if rest else handed
        else:
            h = act_in(norm_in(x))
        return self._after_input_norm(h, x, activated_emb), handed

    def _halves_in_the_norm(self, x: torch.Tensor) -> bool:
        """Whether the Triton norm makes this down block's two 2x2 poolings itself (its output's and the skip
        input's; see :func:`blended.triton_norm.group_norm_silu_halving`)."""
        resample = self.resample
        return (self.norm_kernel == "triton" and isinstance(resample, Downsample)
                and isinstance(resample.op, nn.AvgPool2d) and self.in_layers[0].affine
                and x.shape[-2] % 2 == 0 and x.shape[-1] % 2 == 0 and runs_triton_kernels(x))

    def _after_input_norm(self, h: torch.Tensor, x: torch.Tensor, activated_emb: torch.Tensor,
                          resampled: bool = False) -> torch.Tensor:
        conv_in = self.in_layers[2]
        upsampled_skip = self._upsamples_skip_in_the_sum(h)
        if self.resample is not None and not resampled:
            # The original resamples after norm+SiLU and before the conv, and resamples the skip input too.
            h = self.resample(h)
            x = x if upsampled_skip else self.resample(x)
        norm_out, act_out, _, conv_out = self.out_layers
        if self._folds_biases(h):
            h = conv_in.without_bias(h)
            h = self._fused_out_norm(h, self._timestep_terms(activated_emb, h.dtype), conv_in.bias)
            return _residual_sum(self.skip_connection(x), conv_out.without_bias(self._dropout(h)), conv_out.bias,
                                 upsampled_skip)
        h = conv_in(h)
        emb_out = self._timestep_terms(activated_emb, h.dtype)
        if self.norm_kernel:
            h = self._fused_out_norm(h, emb_out)
            return self.skip_connection(x) + conv_out(self._dropout(h))
        if self.use_scale_shift_norm:
            scale, shift = emb_out.view(emb_out.shape[0], 2, -1, 1, 1).unbind(1)
            h = torch.addcmul(shift, norm_out(h), 1 + scale)
        else:
            h = norm_out(h + emb_out)
        h = conv_out(self._dropout(act_out(h)))
        return self.skip_connection(x) + h

    def takes_pair(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        """Whether :meth:`forward_pair` can take ``torch.cat([a, b], 1)`` as its parts: with the Triton norm, on
        channels_last maps of one dtype, no resampling and a 1x1 skip conv."""
        norm, skip = self.in_layers[0], self.skip_connection
        return (self.norm_kernel == "triton" and self.resample is None and runs_triton_kernels(a)
                and isinstance(skip, nn.Conv2d) and skip.kernel_size == (1, 1) and skip.stride == (1, 1)
                and skip.padding == (0, 0) and skip.groups == 1 and norm.affine and a.dtype == b.dtype
                and a.shape[1] + b.shape[1] == norm.num_channels
                and all(t.is_contiguous(memory_format=torch.channels_last) for t in (a, b)))

    def forward_pair(self, a: torch.Tensor, b: torch.Tensor, activated_emb: torch.Tensor) -> torch.Tensor:
        """``forward(torch.cat([a, b], 1), activated_emb)`` without making the concatenation (a UNet output
        block's running map and the encoder's skip; see :meth:`takes_pair`): the Triton norm reads the two parts
        and writes each part's gradient as its own map, and the 1x1 skip conv is two matrix products. The
        concatenation moved both maps once more, was kept for the backward beside the encoder's own copy, and its
        gradient's channel slices were copied again before the convolutions' backward could read them."""
        h, a, b = _fused_norm_silu_of_pair(self.in_layers[0], a, b)
        conv_in, conv_out = self.in_layers[2], self.out_layers[3]
        folds = self._folds_biases(h)
        h = conv_in.without_bias(h) if folds else conv_in(h)
        h = self._fused_out_norm(h, self._timestep_terms(activated_emb, h.dtype), conv_in.bias if folds else None)
        skip = pointwise_conv_of_pair(self.skip_connection, a, b)
        if folds:
            return _residual_sum(skip, conv_out.without_bias(self._dropout(h)), conv_out.bias)
        return skip + conv_out(self._dropout(h))

    def _upsamples_skip_in_the_sum(self, h: torch.Tensor) -> bool:
        """Whether this up block's skip input goes to the residual sum's kernel at its own size, which reads it as
        its nearest 2x upsampling (:func:`blended.triton_residual.residual_sum`'s ``upsampled_skip``)."""
        resample = self.resample
        return (isinstance(resample, Upsample) and getattr(resample, "conv", None) is None
                and isinstance(self.skip_connection, nn.Identity) and self._folds_biases(h))

    def _folds_biases(self, h: torch.Tensor) -> bool:
        """Whether the two convolutions leave their biases to the Triton kernels: the first's to the norm after
        it, the second's to the residual sum (on CUDA a convolution adds its bias in a pass of its own)."""
        conv_in, conv_out = self.in_layers[2], self.out_layers[3]
        return (self.norm_kernel == "triton" and runs_triton_kernels(h)
                and all(isinstance(conv, FrozenWeightConv2d) and conv.bias is not None for conv in (conv_in, conv_out)))

    def _timestep_terms(self, activated_emb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        emb_out = _in_dtype(self.emb_layers[1](activated_emb), dtype)
        # Views broadcast the projection over H and W: fewer dispatches than indexing with None and chunk().
        return emb_out.view(*emb_out.shape, 1, 1)

    def _fused_out_norm(self, h: torch.Tensor, emb_out: torch.Tensor,
                        input_bias: torch.Tensor | None = None) -> torch.Tensor:
        norm_out = self.out_layers[0]
        if self.use_scale_shift_norm:
            return _fused_norm_silu(self.norm_kernel, norm_out, h, emb_out, input_bias=input_bias)
        return _fused_norm_silu(self.norm_kernel, norm_out, h + emb_out, input_bias=input_bias)

    def _dropout(self, h: torch.Tensor) -> torch.Tensor:
        # Dropout only acts in training with p > 0; otherwise calling it is one more op per block for nothing.
        dropout = self.out_layers[2]
        return dropout(h) if self.training and dropout.p > 0 else h


NORM_KERNELS = ("compile", "triton")


def _fused_norm_silu(kernel: str, norm: nn.GroupNorm, x: torch.Tensor, scale_shift: torch.Tensor | None = None,
                     out_dtype: torch.dtype | None = None, input_bias: torch.Tensor | None = None) -> torch.Tensor:
    """``out_dtype``: compute on ``x`` converted to it (the float32 ``out`` head); the Triton kernels read ``x``
    as it is and write that dtype, which gives the same values without the converted copy. ``input_bias``: the
    norm of ``x`` plus this per channel (a convolution's bias, which the Triton kernels add as they read ``x``)."""
    group_size = norm.num_channels // norm.num_groups
    # Where the Triton kernels cannot run, the same function in plain torch. Imported only here: Triton is
    # needed only on this path.
    if kernel == "triton" and runs_triton_kernels(x):
        from .triton_norm import group_norm_silu

        return group_norm_silu(x, norm.weight, norm.bias, group_size, norm.eps, scale_shift, out_dtype=out_dtype,
                               input_bias=input_bias)
    if input_bias is not None:
        x = x + input_bias.view(1, -1, 1, 1)
    x = x if out_dtype is None else _in_dtype(x, out_dtype)
    if kernel == "compile":
        return fused_group_norm_act(x, norm.weight, norm.bias, group_size, norm.eps, scale_shift)
    return group_norm_act(x, norm.weight, norm.bias, group_size, norm.eps, scale_shift)


def _fused_norm_silu_keeping_input(kernel: str, norm: nn.GroupNorm, x: torch.Tensor,
                                   hand_on: bool = False) -> tuple[torch.Tensor, ...]:
    """``(_fused_norm_silu(kernel, norm, x), x)``, for a ResBlock whose skip path uses ``x`` too, and with
    ``hand_on`` ``x`` once more, for the UNet's skip stack. With the Triton kernels each returned ``x`` carries
    its gradient into the norm's backward kernel, which adds them as it writes ``x``'s gradient (one pass where
    autograd's sums would read that gradient back); otherwise ``x`` is returned as it is."""
    if kernel == "triton" and runs_triton_kernels(x):
        from .triton_norm import group_norm_silu_and_input

        return group_norm_silu_and_input(x, norm.weight, norm.bias, norm.num_channels // norm.num_groups, norm.eps,
                                         aliases=2 if hand_on else 1)
    return (_fused_norm_silu(kernel, norm, x), x, x) if hand_on else (_fused_norm_silu(kernel, norm, x), x)


def _norm_keeping_input(norm: nn.GroupNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(x), x)`` by the Triton kernels, GroupNorm alone: an attention block's, whose residual sum uses
    the returned ``x``, so that its gradient is added inside the norm's backward kernel."""
    from .triton_norm import group_norm_and_input

    return group_norm_and_input(x, norm.weight, norm.bias, norm.num_channels // norm.num_groups, norm.eps)


def _fused_norm_silu_halving(norm: nn.GroupNorm, x: torch.Tensor, hand_on: bool = False) -> tuple[torch.Tensor, ...]:
    """``(avg_pool(_fused_norm_silu("triton", norm, x)), avg_pool(x))`` (2x2), and with ``hand_on`` ``x`` itself
    for the UNet's skip stack, by the Triton kernels: the same sums, without the poolings' full-size maps."""
    from .triton_norm import group_norm_silu_halving

    return group_norm_silu_halving(x, norm.weight, norm.bias, norm.num_channels // norm.num_groups, norm.eps,
                                   aliases=1 if hand_on else 0)


def _residual_sum(skip: torch.Tensor, h: torch.Tensor, bias: torch.Tensor,
                  upsampled_skip: bool = False) -> torch.Tensor:
    """``skip + h + bias`` per channel, by one Triton kernel (a ResBlock's output; see
    :mod:`blended.triton_residual`); with ``upsampled_skip``, ``skip`` upsampled 2x (nearest) without making it."""
    from .triton_residual import residual_sum

    return residual_sum(skip, h, bias, upsampled_skip)


def _fused_norm_silu_of_pair(norm: nn.GroupNorm, a: torch.Tensor,
                             b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(_fused_norm_silu("triton", norm, torch.cat([a, b], 1)), a, b)`` by the Triton kernels, without the
    concatenation; the returned ``a`` and ``b`` carry their skip-path gradients into the norm's backward."""
    from .triton_norm import group_norm_silu_of_pair

    return group_norm_silu_of_pair(a, b, norm.weight, norm.bias, norm.num_channels // norm.num_groups, norm.eps)


class AttentionBlock(nn.Module):
    """Spatial self-attention; the qkv weights are held in ``[q | k | v]`` order whatever the file's order."""

    def __init__(self, channels: int, num_heads: int, legacy_order: bool):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels cannot be split into {num_heads} heads")
        self.channels = channels
        self.num_heads = num_heads
        self.legacy_order = legacy_order
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        if legacy_order:
            self.register_load_state_dict_pre_hook(_legacy_qkv_to_split_order)
            self.register_state_dict_post_hook(_split_qkv_to_legacy_order)

    # Set on every AttentionBlock by GuidedDiffusionUNet.norm_kernel: "triton" runs its GroupNorm by the Triton
    # kernels (the other kernels fuse SiLU, which this norm has not, and leave it to the module).
    norm_kernel: str | None = None

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        batch, channels, height, width = x.shape
        length = height * width
        if self.norm_kernel == "triton" and runs_triton_kernels(x):
            # In x's memory format: channels_last tokens are then [B, T, C] rows as the qkv projection reads
            # them, one matrix product with its bias (the module's NCHW output cost a product, then a pass adding
            # the bias, and layout copies both ways). The returned x carries the residual's gradient into the
            # norm's backward kernel.
            normed, x = _norm_keeping_input(self.norm, x)
            normed = normed.reshape(batch, channels, length).transpose(1, 2)
            tokens = x.reshape(batch, channels, length)
        else:
            tokens = x.reshape(batch, channels, length)  # a view for both NCHW and channels_last input
            normed = self.norm(tokens).transpose(1, 2)
        # The k=1 Conv1d layers are applied as Linear on [B, T, C] so that q, k and v come out with a
        # contiguous head dimension, the layout the fused SDPA kernels need (no copies before attention).
        qkv = F.linear(normed, self.qkv.weight.squeeze(-1), self.qkv.bias)
        head_dim = channels // self.num_heads
        # Unbound along the packed dimension itself (the same views as unbinding after a permute), so that the
        # backward stacks the three gradients straight into the projection's layout; stacked along a leading
        # dimension, they were copied once more to get there.
        q, k, v = (t.transpose(1, 2) for t in qkv.view(batch, length, 3, self.num_heads, head_dim).unbind(2))
        attended = F.scaled_dot_product_attention(q, k, v)  # softmax accumulates in float32 for fp16/bf16
        attended = attended.transpose(1, 2).reshape(batch, length, channels)
        projected = F.linear(attended, self.proj_out.weight.squeeze(-1), self.proj_out.bias)
        return (tokens + projected.transpose(1, 2)).reshape(batch, channels, height, width)


def _qkv_permutation_shapes(module: AttentionBlock) -> tuple[int, int, int]:
    return module.num_heads, module.channels // module.num_heads, module.channels


def _legacy_to_split(tensor: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    # Legacy rows are [h0: q k v | h1: q k v | ...]; SDPA wants [q: h0 h1 .. | k: .. | v: ..].
    rest = tensor.shape[1:]
    return tensor.reshape(heads, 3, head_dim, *rest).transpose(0, 1).reshape(3 * heads * head_dim, *rest)


def _split_to_legacy(tensor: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    rest = tensor.shape[1:]
    return tensor.reshape(3, heads, head_dim, *rest).transpose(0, 1).reshape(3 * heads * head_dim, *rest)


def _legacy_qkv_to_split_order(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    heads, head_dim, channels = _qkv_permutation_shapes(module)
    for name in ("weight", "bias"):
        key = f"{prefix}qkv.{name}"
        tensor = state_dict.get(key)
        # A wrongly shaped tensor is left alone so that load_state_dict reports the size mismatch itself.
        if isinstance(tensor, torch.Tensor) and tensor.shape[:1] == (3 * channels,):
            state_dict[key] = _legacy_to_split(tensor, heads, head_dim)


def _split_qkv_to_legacy_order(module, state_dict, prefix, local_metadata):
    heads, head_dim, _ = _qkv_permutation_shapes(module)
    for name in ("weight", "bias"):
        key = f"{prefix}qkv.{name}"
        if key in state_dict:
            state_dict[key] = _split_to_legacy(state_dict[key].detach(), heads, head_dim)


class TimestepBlock(nn.Sequential):
    """A block of the UNet: layers that take the timestep embedding get it, the others only see x."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.run_from(0, x, emb)

    def forward_handing_input(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(forward(x, emb), x)``, ``x`` as a first ResBlock hands it on (:meth:`ResBlock.forward_handing_input`)
        for the UNet's skip stack, which keeps this block's input too."""
        first = self[0]
        if isinstance(first, ResBlock):
            h, handed = first.forward_handing_input(x, emb)
            return self.run_from(1, h, emb), handed
        return self(x, emb), x

    def run_from(self, start: int, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in itertools.islice(self, start, None):
            x = layer(x, emb) if isinstance(layer, (ResBlock, AttentionBlock)) else layer(x)
        return x


def _concat_and_run(block: TimestepBlock, h: torch.Tensor, skip: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    first = block[0]
    if isinstance(first, ResBlock) and first.takes_pair(h, skip):
        return block.run_from(1, first.forward_pair(h, skip, emb), emb)
    return block(torch.cat([h, skip], dim=1), emb)


class GuidedDiffusionUNet(nn.Module):
    """OpenAI's guided-diffusion UNet: ``forward(x, timesteps, y=None) -> [B, out_channels, H, W]``.

    ``timesteps`` are float timesteps on the original training scale (0..999), as the spaced diffusion
    hands them over. ``y`` holds class labels for class-conditional checkpoints.
    """

    def __init__(self, config: UNetConfig, gradient_checkpointing: bool = False):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = gradient_checkpointing
        # None = faithful (no autocast). A plain attribute, not a buffer: it is a run-time choice, not a weight.
        self.autocast_dtype: torch.dtype | None = None
        mc = config.model_channels
        emb_dim = config.time_embed_dim
        legacy = not config.use_new_attention_order

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if config.num_classes is not None:
            self.label_emb = nn.Embedding(config.num_classes, emb_dim)

        def res_block(ch_in: int, ch_out: int, **resample) -> ResBlock:
            return ResBlock(ch_in, emb_dim, config.dropout, ch_out, config.use_scale_shift_norm, **resample)

        ch = input_ch = int(config.channel_mult[0] * mc)
        self.input_blocks = nn.ModuleList([TimestepBlock(FrozenWeightConv2d(config.in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        ds = 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, int(mult * mc))]
                ch = int(mult * mc)
                if ds in config.attention_resolutions:
                    layers.append(AttentionBlock(ch, config.heads_for(ch), legacy))
                self.input_blocks.append(TimestepBlock(*layers))
                skip_channels.append(ch)
            if level != len(config.channel_mult) - 1:
                if config.resblock_updown:
                    self.input_blocks.append(TimestepBlock(res_block(ch, ch, down=True)))
                else:
                    self.input_blocks.append(TimestepBlock(Downsample(ch, use_conv=True)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepBlock(
            res_block(ch, ch), AttentionBlock(ch, config.heads_for(ch), legacy), res_block(ch, ch)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), int(mc * mult))]
                ch = int(mc * mult)
                if ds in config.attention_resolutions:
                    layers.append(AttentionBlock(ch, config.heads_for(ch, upsample_path=True), legacy))
                if level and i == config.num_res_blocks:
                    if config.resblock_updown:
                        layers.append(res_block(ch, ch, up=True))
                    else:
                        layers.append(Upsample(ch, use_conv=True))
                    ds //= 2
                self.output_blocks.append(TimestepBlock(*layers))

        self.out = nn.Sequential(_norm(ch), nn.SiLU(), FrozenWeightConv2d(input_ch, config.out_channels, 3, padding=1))

    @property
    def norm_kernel(self) -> str | None:
        """How every ResBlock and ``out`` run GroupNorm (+ scale-shift) + SiLU: None (the modules, eagerly),
        "compile" (one torch.compile'd function) or "triton" (the pack's Triton kernels, the attention blocks'
        GroupNorms too)."""
        return getattr(self, "_norm_kernel", None)

    @norm_kernel.setter
    def norm_kernel(self, kernel: str | None) -> None:
        if kernel is not None and kernel not in NORM_KERNELS:
            raise ValueError(f"unknown norm kernel {kernel!r}: use None or one of {', '.join(NORM_KERNELS)}")
        self._norm_kernel = kernel
        for module in self.modules():
            if isinstance(module, (ResBlock, AttentionBlock)):
                module.norm_kernel = kernel

    @property
    def compute_dtype(self) -> torch.dtype:
        """Dtype the block stacks run in (that of their convs, as :meth:`to_compute_dtype` set it)."""
        return self.input_blocks[0][0].weight.dtype

    def to_compute_dtype(self, dtype: torch.dtype) -> GuidedDiffusionUNet:
        """Run the block stacks' convs in ``dtype``, keeping the original's fp32 islands.

        Exactly the Conv1d/Conv2d weights of ``input_blocks``, ``middle_block`` and ``output_blocks`` are
        converted (what guided-diffusion's ``convert_to_fp16`` does); GroupNorm affine parameters, the time
        embedding, ``emb_layers`` and the final ``out`` stay float32. ``torch.float32`` undoes it.
        """
        for module in self.block_layers((nn.Conv1d, nn.Conv2d)):
            module.to(dtype)
        return self

    def block_layers(self, kinds: tuple[type, ...]):
        """The modules of ``kinds`` inside the three block stacks (not the time embedding, not ``out``): the
        layers a low-precision scheme converts."""
        for stack in (self.input_blocks, self.middle_block, self.output_blocks):
            for module in stack.modules():
                if isinstance(module, kinds):
                    yield module

    def _run_block(self, block: nn.Module, h: torch.Tensor, emb: torch.Tensor,
                   skip: torch.Tensor | None = None) -> torch.Tensor:
        """``block`` on ``h`` (concatenated with the output stack's ``skip``), checkpointed if enabled.

        The concatenation happens inside the checkpoint: checkpoint saves its inputs, and ``skip`` is kept
        anyway (it is the next input block's saved input), so saving ``h`` and ``skip`` instead of their
        concatenation spares one copy of every skip (at 256 px and batch 64, 2 GiB per top-level block in bf16).
        """
        if self.gradient_checkpointing and torch.is_grad_enabled():
            if skip is None:
                return checkpoint(block, h, emb, **CHECKPOINT_ARGS)
            return checkpoint(_concat_and_run, block, h, skip, emb, **CHECKPOINT_ARGS)
        return block(h, emb) if skip is None else _concat_and_run(block, h, skip, emb)

    def _run_block_handing_input(self, block: TimestepBlock, h: torch.Tensor,
                                 emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(block(h), h)``, ``h`` as the block hands it on for the skip stack (see
        :meth:`TimestepBlock.forward_handing_input`): only the Triton norm's backward takes the skip stack's
        gradient, so elsewhere (and without gradients, or in a checkpointed block) ``h`` goes on as it is. The
        handed ``h`` keeps the statistics ``h`` carries, for the output block's norm that reads it as its skip."""
        if (self.norm_kernel == "triton" and runs_triton_kernels(h) and torch.is_grad_enabled()
                and not self.gradient_checkpointing):
            out, handed = block.forward_handing_input(h, emb)
            return out, carried_statistics.hand_on(h, handed)
        return self._run_block(block, h, emb), h

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if (y is None) != (self.config.num_classes is None):
            raise ValueError("class labels y must be given exactly when the model is class-conditional")
        time_weight = self.time_embed[0].weight
        t_emb = timestep_embedding(timesteps, self.config.model_channels).to(time_weight.device, time_weight.dtype)
        emb = self.time_embed(t_emb)
        if y is not None:
            emb = emb + self.label_emb(y)
        # Every ResBlock's emb_layers begins with SiLU of this same embedding: it is applied once here, and cast
        # once to the autocast dtype, which autocast would otherwise do before each block's Linear.
        emb = F.silu(emb)
        if self.autocast_dtype is not None and self.autocast_dtype != torch.float32:
            emb = emb.to(self.autocast_dtype)

        h = x.to(self.compute_dtype)
        with self._block_precision(h.device):
            skips = []
            for block in self.input_blocks:
                h, handed = self._run_block_handing_input(block, h, emb)
                if skips:  # the previous block's output, which is this block's input, as this block handed it on
                    skips[-1] = handed
                skips.append(h)
            h, skips[-1] = self._run_block_handing_input(self.middle_block, h, emb)
            for block in self.output_blocks:
                h = self._run_block(block, h, emb, skip=skips.pop())
        if self.gradient_checkpointing and torch.is_grad_enabled():
            # The head saves three float32 maps of the block output's size (its input copy, the norm's and the
            # SiLU's outputs: 12 GiB at 256 px and batch 64); recomputed, only the block output is kept.
            return checkpoint(self._out_head, h, **CHECKPOINT_ARGS).to(x.dtype)
        return self._out_head(h).to(x.dtype)

    def _out_head(self, h: torch.Tensor) -> torch.Tensor:
        """``out`` (GroupNorm, SiLU, conv) in the dtype of its conv: float32 (no precision scheme converts it)."""
        norm, act, conv = self.out
        if self.norm_kernel:
            return conv(_fused_norm_silu(self.norm_kernel, norm, h, out_dtype=conv.weight.dtype))
        return conv(act(norm(h.to(conv.weight.dtype))))

    def _block_precision(self, device: torch.device):
        if self.autocast_dtype is None or self.autocast_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)
