"""Harmonising resampling (RePaint, Lugmayr et al., CVPR 2022): go back a few steps and denoise them again.

Blending pastes the noised original next to the generated region at every step, but the model only ever sees
that combination once per step, so the two sides can disagree at the border. RePaint's remedy: after
denoising a chunk of ``jump_length`` steps, add the noise of those steps back (one forward jump with
q(x_{t+j} | x_t)) and denoise the chunk again, ``count`` extra times. Each pass lets the generated region
adapt to the blended background, which is what removes seams. It costs ``count`` times the chunk's steps.

The plan is a flat list of steps, so the sampler loop stays one loop: each entry is one ordinary guided step,
some preceded by a jump back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .errors import BlendedInputError


@dataclass(frozen=True)
class PlannedStep:
    index: int                     # spaced timestep index of the step (x at level index -> level index-1)
    repeat: int = 0                # 0 = first pass; k = k-th resampling pass of this chunk
    jump_from: Optional[int] = None  # when set: first re-noise x from this level (-1 = clean) to level ``index``


def validate(jump_length: int, count: int) -> None:
    if count < 0:
        raise BlendedInputError(f"resample_count must be >= 0 (0 = off), got {count}")
    if count and jump_length < 1:
        raise BlendedInputError(f"resample_jump_length must be >= 1 step when resampling, got {jump_length}")


def plan(indices: Sequence[int], jump_length: int = 0, count: int = 0) -> list[PlannedStep]:
    """The steps to run. Without resampling (``count`` 0): each index once, as the original.

    With it: ``indices`` are cut into chunks of ``jump_length`` steps from the start; every complete chunk is
    denoised, then ``count`` times re-noised back to its first level and denoised again. A shorter final chunk
    is run once.
    """
    validate(jump_length, count)
    indices = list(indices)
    if not count:
        return [PlannedStep(i) for i in indices]
    steps = []
    for start in range(0, len(indices), jump_length):
        chunk = indices[start:start + jump_length]
        passes = 1 + (count if len(chunk) == jump_length else 0)
        for repeat in range(passes):
            for position, index in enumerate(chunk):
                jump = chunk[-1] - 1 if repeat and position == 0 else None
                steps.append(PlannedStep(index, repeat, jump))
    return steps


def total_steps(num_steps: int, jump_length: int = 0, count: int = 0) -> int:
    """How many guided steps a run of ``num_steps`` spaced steps takes with resampling (progress bars)."""
    return len(plan(range(num_steps), jump_length, count))


def jump_back(diffusion, x: torch.Tensor, from_level: int, to_level: int, noise: torch.Tensor) -> torch.Tensor:
    """Sample q(x_to | x_from): add the noise of the steps between two levels (level -1 = clean image)."""
    if to_level <= from_level:
        raise ValueError(f"a jump back must go to a noisier level: {from_level} -> {to_level}")
    cumprod = np.append(1.0, diffusion.alphas_cumprod)  # shifted: entry level+1
    ratio = float(cumprod[to_level + 1] / cumprod[from_level + 1])
    return x * ratio ** 0.5 + noise * (1.0 - ratio) ** 0.5
