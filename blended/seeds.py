"""Deterministic random streams for the sampler.

Every random draw of the sampler comes from a CPU ``torch.Generator`` derived from (seed, stream, index),
so that:
- the same seed gives the same images on the same device, whatever the GPU kernels' RNG does;
- result ``i`` does not depend on how many results are asked for, nor on how they are split into batches
  (each result has its own streams);
- noise is drawn on the CPU and moved to the device, as core ComfyUI does, so CPU and GPU runs start from the
  same noise.

The draws are only the random inputs: at another batch size the batched convolutions and matmuls of the models
round a sample differently (about 1e-4 after 75 steps on the CPU), so result ``i`` agrees across batch sizes
to rounding, and bit for bit at the same batch size on the CPU (see the README for CUDA).

torch's CPU generator (mt19937) keeps only the low 32 bits of the seed it is given, so each stream has one of
2**32 starting points: two of a run's many streams can, rarely, coincide (an unnoticeable repeat of one noise).
Mixing the user's 64-bit seed with the stream's key first (:func:`derive_seed`) is what keeps seeds 2**32 apart
from aliasing. The numbers are pinned by ``tests/test_reproducibility.py``: a user's saved seed must keep
giving the same images, so widening the streams would be a deliberate, announced change.
"""

from __future__ import annotations

import torch

from .devices import to_device

_MASK64 = (1 << 64) - 1

# Stream names keep unrelated draws apart: changing how many augmentation draws happen must not shift the
# diffusion noise, and vice versa.
STREAM_INITIAL_NOISE = 1
STREAM_STEP_NOISE = 2
STREAM_BACKGROUND_NOISE = 3
STREAM_AUGMENTATION = 4
STREAM_CLASS_LABEL = 5
STREAM_RESAMPLE_NOISE = 6

# Result identities: result r of input image b. The stride keeps images apart for any sensible result count.
_RESULTS_PER_IMAGE = 1_000_003


def result_id(image_index: int, result_index: int) -> int:
    """The identity of result ``result_index`` of input ``image_index``: its streams' key (prompts share it)."""
    return int(image_index) * _RESULTS_PER_IMAGE + int(result_index)


def result_group(rid: int, group_size: int) -> int:
    """The group of ``group_size`` consecutive results (of the same input image) that ``rid`` belongs to."""
    image_index, result_index = divmod(int(rid), _RESULTS_PER_IMAGE)
    return image_index * _RESULTS_PER_IMAGE + result_index // max(1, int(group_size))


def repeat_key(repeat: int) -> tuple:
    """Extra stream key of a harmonising resampling repeat of a step: none for the first pass, so a run
    without resampling draws exactly what it always did; a marker keeps it apart from other trailing keys."""
    return (_REPEAT_MARK, int(repeat)) if repeat else ()


_REPEAT_MARK = 0x52455045  # "REPE"


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def derive_seed(seed: int, *parts: int) -> int:
    """Mix a user seed (any of the widget's 64 bits) with stream/result/step indices into a 63-bit seed, which
    ``torch.Generator.manual_seed`` takes on every version (it then uses the low 32 bits, see the module)."""
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
    return to_device(noise, device, dtype)


def randn_per_result(shape, seed: int, stream: int, result_ids, step: int, *extra: int, device=None,
                     dtype=torch.float32) -> torch.Tensor:
    """[len(result_ids), ...] noise, result ``r`` from the stream (seed, stream, r, step, *extra), in one copy.

    ``shape`` is one result's shape with a leading 1. The values are those of :func:`randn` per result; they are
    drawn on the CPU and cross to the device together, so a step costs one copy however many results it has.
    """
    noise = torch.cat([torch.randn(shape, generator=generator_for(seed, stream, rid, step, *extra), dtype=torch.float32)
                       for rid in result_ids])
    return to_device(noise, device, dtype)
