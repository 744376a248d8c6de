"""Soft masks as a per-step schedule (the Differential Diffusion rule, Levin & Fried 2023).

The original binarises the mask: every pixel is either regenerated for the whole run or kept. A feathered or
painted grey mask then has one hard edge wherever the binarisation cuts it. Differential Diffusion reads a
grey value as *how long* a pixel may change instead: at step n of L the blend uses the binary mask
``soft > threshold_n``, with ``threshold_n = 1 - (n + 1) / L`` falling from almost 1 to 0. A pixel of value m
is therefore edited during the last ~m·L steps only, starting from the noised original: white pixels are
regenerated from the start, light grey ones join late and change little, black ones never change.
"""

from __future__ import annotations

import torch

from . import regions

# Pixels inside the binary model mask never fall below this, so every pixel the original would edit (any value
# > 0) is still edited at the last step, however faint.
MIN_VALUE = 1e-3


def threshold(step: int, total: int) -> float:
    """The grey level a pixel must exceed to be edited at step ``step`` (0-based) of ``total``."""
    return 1.0 - (step + 1) / total


def step_mask(soft: torch.Tensor, step: int, total: int) -> torch.Tensor:
    """Binary float mask of step ``step``: where the soft mask exceeds that step's threshold."""
    return (soft > threshold(step, total)).to(soft.dtype)


def steps_edited(value: float, total: int) -> int:
    """How many of ``total`` steps edit a pixel of grey level ``value`` (for tests and documentation)."""
    return sum(value > threshold(n, total) for n in range(total))


def model_soft_mask(mask: torch.Tensor, plan: regions.CropPlan, binary: torch.Tensor) -> torch.Tensor:
    """The grey levels of ``mask`` [1,1,H,W] in the plan's box at model size, within ``binary``'s support.

    Resized by the binary mask's own rule (``regions.crop_mask_levels``: each model pixel's maximum when
    shrinking, nearest-exact when enlarging), so a 0/1 mask stays 0/1 at any size and the edit is the same
    with the schedule on or off, and a pixel is > 0 exactly where the binary mask edits.
    """
    soft = regions.crop_mask_levels(mask, plan)
    binary = binary.to(soft.device)
    return torch.where(binary > 0, soft.clamp(MIN_VALUE, 1.0), torch.zeros_like(soft))
