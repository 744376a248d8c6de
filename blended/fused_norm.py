"""GroupNorm, the timestep scale-shift and SiLU as one compiled function: the ``fused_norm`` fast path.

On a GPU, a ResBlock's norm-and-activation costs more than its arithmetic: eager mode writes the normalised map,
then the scale-shifted map, then the activated map, and reads each back, in the forward and again in the
backward, where GroupNorm's own backward makes two more passes. Those passes took about a fifth of the guided
step's kernel time on an H100, and eager GroupNorm also forces an NCHW copy of channels_last activations.

:func:`group_norm_act` is the whole chain written once in plain torch, with float32 statistics and arithmetic
and one rounding at the end. :func:`fused_group_norm_act` is the same function through ``torch.compile`` with
dynamic shapes, so every resolution, channel count and batch size of the UNet shares one compiled forward and
backward (a batch of one and each dtype/memory format get their own) instead of compiling per block; inductor
keeps the result in its on-disk cache, so a later start reuses it.

Measured on an H100 (torch 2.11, bf16, channels_last, batch 8): the compile is short (about 10 s cold for the
whole UNet) and the convolutions lose their layout copies (49 ms instead of 76 ms of kernels per step), but the
generated dynamic-shape reductions over NHWC groups are slower than eager GroupNorm (68 ms against about 55 ms
with SiLU) and the step needs more memory (27.8 GiB peak at batch 4, out of memory at 16). So it is an option,
not part of any preset: the place where a hand-written NHWC GroupNorm kernel would plug in. The faithful path
never calls this module: the UNet uses it only when its ``norm_kernel`` is ``"compile"``.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import torch
import torch.nn.functional as F

__all__ = ["group_norm_act", "fused_group_norm_act", "set_compile_backend"]

log = logging.getLogger(__name__)

_lock = threading.Lock()
_compiled: dict = {}
_backend = "inductor"


def group_norm_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, group_size: int, eps: float,
                   scale_shift: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(group_norm(x) * (1 + scale) + shift)`` in float32, returned in ``x``'s dtype (the reference path).

    ``x`` is ``[B, C, H, W]`` in either memory format; ``group_size`` is C / groups (an argument rather than the
    group count, so that C stays a free size when compiled); ``scale_shift`` is the ResBlock's ``[B, 2C, 1, 1]``
    timestep output (scale first), or None for plain GroupNorm + SiLU. Grouping the channels and merging H and
    W are views in both memory formats, so no layout copy is asked for.
    """
    batch, channels, height, width = x.shape
    grouped = x.view(batch, channels // group_size, group_size, height * width).float()
    var, mean = torch.var_mean(grouped, dim=(2, 3), correction=0, keepdim=True)
    y = ((grouped - mean) * torch.rsqrt(var + eps)).view(batch, channels, height, width)
    y = y * weight.float().view(1, channels, 1, 1) + bias.float().view(1, channels, 1, 1)
    if scale_shift is not None:
        scale, shift = scale_shift.float().chunk(2, dim=1)
        y = y * (1 + scale) + shift
    return F.silu(y).to(x.dtype)


def _norm_silu(x, weight, bias, group_size: int, eps: float):
    return group_norm_act(x, weight, bias, group_size, eps)


def _norm_scale_shift_silu(x, weight, bias, scale_shift, group_size: int, eps: float):
    return group_norm_act(x, weight, bias, group_size, eps, scale_shift)


def set_compile_backend(backend: str) -> None:
    """Choose the ``torch.compile`` backend ("inductor" by default; "eager"/"aot_eager" check the plumbing)."""
    global _backend
    with _lock:
        if backend != _backend:
            _backend = backend
            _compiled.clear()


def _compiled_function(function):
    # One compiled wrapper per Python function: dynamo keeps its compiled variants (dtype, memory format, batch
    # of one) per code object, so the two chains do not count against each other's recompile limit. Not
    # fullgraph: should a variant ever exceed the limit, that variant runs eagerly instead of failing the run.
    with _lock:
        compiled = _compiled.get(function)
        if compiled is None:
            log.debug("fused_norm: compiling %s with torch.compile (%s, dynamic shapes)", function.__name__, _backend)
            compiled = _compiled[function] = torch.compile(function, backend=_backend, dynamic=True)
        return compiled


# Variants a chain may compile (dtype x memory format x batch of one x backend-specific size classes) before
# dynamo gives up on it and runs it eagerly; dynamo's default of 8 is meant for whole models.
RECOMPILE_LIMIT = 32


def recompile_limit(limit: int):
    """Dynamo's per-code-object recompile limit set to ``limit`` inside the context (its name in this torch)."""
    dynamo_config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            return dynamo_config.patch(**{name: limit})
    return contextlib.nullcontext()


def _compile_config():
    """Settings for our calls only: no duck sizing (sizes that happen to be equal on the first call, a batch of 8
    and 8 channels per group, are not tied together, which would recompile on the next shape) and our own
    recompile limit. Settings this torch does not have are left alone."""
    stack = contextlib.ExitStack()
    shape_config = getattr(getattr(torch.fx, "experimental", None), "_config", None)
    if shape_config is not None and hasattr(shape_config, "use_duck_shape"):
        stack.enter_context(shape_config.patch(use_duck_shape=False))
    stack.enter_context(recompile_limit(RECOMPILE_LIMIT))
    return stack


def fused_group_norm_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, group_size: int, eps: float,
                         scale_shift: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`group_norm_act`, compiled once per process for all shapes.

    Called with autocast off, so that the UNet's autocast blocks and its float32 ``out`` share compiled code
    (the function does its own casts).
    """
    with _compile_config(), torch.autocast(x.device.type, enabled=False):
        if scale_shift is None:
            return _compiled_function(_norm_silu)(x, weight, bias, group_size, eps)
        return _compiled_function(_norm_scale_shift_silu)(x, weight, bias, scale_shift, group_size, eps)
