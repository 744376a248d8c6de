"""Per-channel partial statistics that the kernel writing a map leaves on it, for the GroupNorm that reads it next.

Why: the Triton GroupNorm reads its input twice forward, once for each group's mean and variance and once to
normalise it. Most of the UNet's norms read a map that a Triton kernel has just written: a ResBlock's output
(:func:`blended.triton_residual.residual_sum`), which the next block's first norm, an attention block's norm or
the output head's norm reads. That kernel has every value in registers as it writes it, so it also keeps each
channel's running mean and M2 (Welford's update, as the statistics pass would) and leaves those partial sums,
[B, C, splits, 3] float32 numbers, on the map; the norm then merges them instead of reading the map again: a
third of those norms' forward traffic.

The partial sums ride on the map as a Python attribute, so that they follow it through the UNet's skip stack to
the output blocks without changing what the blocks pass each other. They describe the map only while it is
unchanged: :func:`carried` checks the map's version counter, which every in-place op bumps (and which a view
shares with its base), and gives nothing once it has moved, or for a tensor without one (made under
``torch.inference_mode``), or inside a ``torch.compile`` trace, where attributes do not survive; the norm then
reads the map for its statistics as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ChannelPartials", "attach", "carried", "hand_on"]

_ATTRIBUTE = "_blended_channel_partials"


@dataclass(frozen=True)
class ChannelPartials:
    """``sums``: [B, C, splits, 3] float32 (count, mean, M2 of each channel over each split of the pixels),
    flattened; ``version``: the map's version counter when they were written."""

    sums: torch.Tensor
    splits: int
    version: int


def _version(tensor: torch.Tensor) -> int | None:
    try:
        return tensor._version
    except RuntimeError:  # an inference tensor tracks no version
        return None


def attach(tensor: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """Leave ``sums``, the partial statistics of ``tensor`` ([B, C, H, W]) as it is now, on it; returns
    ``tensor``. The split count follows from their sizes."""
    version = _version(tensor)
    if version is not None and not torch.compiler.is_compiling():
        splits = sums.numel() // (3 * tensor.shape[0] * tensor.shape[1])
        setattr(tensor, _ATTRIBUTE, ChannelPartials(sums, splits, version))
    return tensor


def carried(tensor: torch.Tensor) -> ChannelPartials | None:
    """The partial statistics left on ``tensor``, if it has not changed since."""
    if torch.compiler.is_compiling():
        return None
    partials = getattr(tensor, _ATTRIBUTE, None)
    if partials is None or _version(tensor) != partials.version:
        return None
    return partials


def hand_on(source: torch.Tensor, alias: torch.Tensor) -> torch.Tensor:
    """Give ``alias``, a view of ``source`` with all of its elements (the norm kernels hand their input on so),
    the partial statistics ``source`` carries; returns ``alias``."""
    partials = carried(source)
    if partials is not None and alias is not source and alias.shape == source.shape:
        attach(alias, partials.sums)
    return alias
