"""Where the sampler's random draws come from: the noise-source hook.

The sampling loop asks a :class:`NoiseSource` for every random tensor it uses, in the same roles as the
original's ``p_sample_loop_progressive``: the noise that starts the loop, each step's DDPM noise, each step's
background noise (the blend's ``q_sample``) and, for class-conditional models, each step's random labels.

:class:`SeededNoise` is the default: every draw comes from its own seeded stream (see :mod:`blended.seeds`),
so result ``i`` depends only on the seed and its result id (``seeds.result_id``: the input's place in the
batch and ``i``). Anything with the same five methods can replace it,
e.g. to replay noises recorded from another implementation and compare the loops step by step.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from . import seeds
from .devices import to_device

# The original edits ``--batch_size`` (4) results at a time and draws one background noise per step for each
# such batch, and its background L2 averages over that batch. Results are grouped the same way, by index.
ORIGINAL_GROUP_SIZE = 4


class NoiseSource(Protocol):
    """The random draws of one chunk of results (``result_ids``, one per sample of the batch)."""

    def initial(self, index: int, shape: Sequence[int], result_ids: Sequence[int]) -> torch.Tensor:
        """[k,C,S,S] noise of the ``q_sample`` that starts the loop at spaced index ``index``."""

    def step(self, index: int, shape: Sequence[int], result_ids: Sequence[int], repeat: int = 0) -> torch.Tensor:
        """[k,C,S,S] DDPM (or DDIM eta) noise of the step at spaced index ``index``.

        ``repeat`` > 0 only for harmonising resampling, whose repeated steps need fresh draws.
        """

    def background(self, index: int, shape: Sequence[int], result_ids: Sequence[int],
                   repeat: int = 0) -> torch.Tensor:
        """[k|1,C,S,S] noise of the background blended in at ``index`` (results of one group share it)."""

    def resample(self, index: int, shape: Sequence[int], result_ids: Sequence[int], repeat: int) -> torch.Tensor:
        """[k,C,S,S] noise that re-noises x back to a later step before a resampling ``repeat``."""

    def labels(self, index: int, result_ids: Sequence[int], num_classes: int, repeat: int = 0) -> torch.Tensor:
        """[k] random class labels of a class-conditional model at ``index`` (the original's randomize_class);
        a resampling ``repeat`` draws its own."""


class SeededNoise:
    """The default source: per-result seeded CPU streams, moved to ``device``.

    ``group_size`` results (by result index) share one background noise per step, as the original's batch of
    4 does; the other draws are per result. Nothing depends on how results are split into batches.
    """

    def __init__(self, seed: int, device=None, group_size: int = ORIGINAL_GROUP_SIZE):
        self.seed = int(seed)
        self.device = device
        self.group_size = max(1, int(group_size))

    def _per_result(self, stream: int, step: int, shape, result_ids, *extra: int) -> torch.Tensor:
        one = (1,) + tuple(shape[1:])
        return seeds.randn_per_result(one, self.seed, stream, result_ids, step, *extra, device=self.device)

    def initial(self, index, shape, result_ids) -> torch.Tensor:
        return self._per_result(seeds.STREAM_INITIAL_NOISE, 0, shape, result_ids)

    def step(self, index, shape, result_ids, repeat=0) -> torch.Tensor:
        return self._per_result(seeds.STREAM_STEP_NOISE, index, shape, result_ids, *seeds.repeat_key(repeat))

    def resample(self, index, shape, result_ids, repeat) -> torch.Tensor:
        return self._per_result(seeds.STREAM_RESAMPLE_NOISE, index, shape, result_ids, *seeds.repeat_key(repeat))

    def background(self, index, shape, result_ids, repeat=0) -> torch.Tensor:
        one = (1,) + tuple(shape[1:])
        groups = [seeds.result_group(rid, self.group_size) for rid in result_ids]
        drawn = {g: seeds.randn(one, self.seed, seeds.STREAM_BACKGROUND_NOISE, g, index, *seeds.repeat_key(repeat))
                 for g in dict.fromkeys(groups)}
        return to_device(torch.cat([drawn[g] for g in groups]), self.device)

    def labels(self, index, result_ids, num_classes, repeat=0) -> torch.Tensor:
        # The original draws a random class for every sample at every step (randomize_class=True).
        drawn = [torch.randint(0, num_classes, (1,), generator=seeds.generator_for(
            self.seed, seeds.STREAM_CLASS_LABEL, rid, index, *seeds.repeat_key(repeat))) for rid in result_ids]
        return to_device(torch.cat(drawn), self.device)

