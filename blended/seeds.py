"""Deterministic random streams for the sampler.

Every random draw of the sampler comes from a CPU ``torch.Generator`` derived from (seed, stream, index),
so that:
- the same seed gives the same images on the same device, whatever the GPU kernels' RNG does;
- result ``i`` does not depend on how many results are asked for, nor on how they are split into batches
  (each result has its own streams);
- noise is drawn on the CPU and moved to the device, as core ComfyUI does, so CPU and GPU runs start from the
  same noise.
"""

from __future__ import annotations

import contextlib

import torch

_MASK64 = (1 << 64) - 1

# Stream names keep unrelated draws apart: changing how many augmentation draws happen must not shift the
# diffusion noise, and vice versa.
STREAM_INITIAL_NOISE = 1
STREAM_STEP_NOISE = 2
STREAM_BACKGROUND_NOISE = 3
STREAM_AUGMENTATION = 4
STREAM_CLASS_LABEL = 5
STREAM_RESAMPLE_NOISE = 6


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def derive_seed(seed: int, *parts: int) -> int:
    """Mix a user seed with stream/result/step indices into an independent 63-bit seed."""
    value = int(seed) & _MASK64
    for part in parts:
        value = _splitmix64(value ^ _splitmix64(int(part) & _MASK64))
    return value & ((1 << 63) - 1)


def generator_for(seed: int, *parts: int) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(derive_seed(seed, *parts))
    return gen


def randn(shape, seed: int, *parts: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise drawn on the CPU from the stream (seed, *parts), then moved to ``device``."""
    noise = torch.randn(shape, generator=generator_for(seed, *parts), dtype=torch.float32)
    return noise.to(device=device, dtype=dtype)


@contextlib.contextmanager
def seeded_global_rng(seed: int, *parts: int):
    """Run code that draws from torch's global CPU RNG (kornia's augmentations) repeatably, then restore it.

    Forking keeps the caller's (and ComfyUI's) global RNG state untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, *parts))
        yield
