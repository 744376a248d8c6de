"""How many results fit in one batch: the guided step's memory grows linearly with the batch.

Each result of a guided step keeps the activations of its grad-enabled UNet forward and of CLIP on all its
views until the backward: at 256x256 with 8 views that is 3.8 GiB per result with the original's fp16 torso
(measured on an H100 with ``scripts/bench.py``'s saved-tensor count) and 5.4 GiB in fp32. The weights and
ComfyUI's own needs come on top, so a batch is sized from the memory that is free once the models are loaded.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, TypeVar

import torch

if TYPE_CHECKING:
    from .fast_paths import FastPathOptions

log = logging.getLogger(__name__)

GIB = 1 << 30

# Activations saved for the backward per result at 256x256, 8 views (H100 measurements, bench `saved_gib`).
_SAVED_PER_RESULT_256 = {"fp32": 5.4 * GIB, "low": 3.84 * GIB}
# Only each block's input is kept with checkpointing (CPU measurement of the tiny layout: about a quarter).
_CHECKPOINT_FACTOR = 0.25
# The backward's own temporaries (gradients of the largest activations, conv workspaces) above the saved set.
_TRANSIENT_FACTOR = 1.25
# With the Triton kernels in channels_last (the Sampler's default on CUDA), peak memory grows by 1.09 GiB per result
# (H100, bf16, 8 views, CUDA graphs: 19.6 GiB at batch 16, 37.1 at 32; batch 64 did not fit in 80 GB), counted
# whole, temporaries included. 1.25 leaves room, and keeps an 80 GB card's batch at 32 or below. That slope was
# measured while CUDA's autocast still upsampled in float32 (traced: 1.11 GiB per result then, 0.98 since): to be
# measured again before the estimate comes down.
_PEAK_PER_RESULT_256_TRITON = 1.25 * GIB
# bf16/fp16 autocast with one UNet forward per step in PyTorch's kernels, NCHW (`fast-gpu`; the Sampler's default on
# CUDA without the triton package, or once Triton failed there): peak memory grows by 2.27 GiB per result (H100,
# 8 views: 10.5 GiB at batch 4 and 37.7 at 16; with CUDA graphs 10.7 and 38.0), temporaries included; traced
# since, 2.07. Counted with the Triton figure's margin. The older estimate below (the original's fp16 torso,
# saved tensors plus a quarter) counted 4.8, which held an 80 GB card to batch 15 and a 24 GB one to 4.
_PEAK_PER_RESULT_256_AUTOCAST_ONE_FORWARD = 2.6 * GIB


def activation_bytes_per_result(image_size: int = 256, low_precision: bool = False,
                                gradient_checkpointing: bool = False, triton_kernels: bool = False,
                                autocast_one_forward: bool = False) -> int:
    """Estimated peak bytes one result adds to a guided step (saved activations and backward temporaries).

    ``triton_kernels``: the Triton kernels in channels_last. ``autocast_one_forward``: low precision by autocast
    with ``reuse_guided_forward``, in NCHW. Each has its own measured peak; other settings are estimated from
    the saved tensors."""
    if low_precision and not gradient_checkpointing:
        if triton_kernels:
            return int(_PEAK_PER_RESULT_256_TRITON * (image_size / 256) ** 2)
        if autocast_one_forward:
            return int(_PEAK_PER_RESULT_256_AUTOCAST_ONE_FORWARD * (image_size / 256) ** 2)
    saved = _SAVED_PER_RESULT_256["low" if low_precision else "fp32"] * (image_size / 256) ** 2
    if gradient_checkpointing:
        saved *= _CHECKPOINT_FACTOR
    return int(saved * _TRANSIENT_FACTOR)


def auto_batch_size(free_bytes: int, per_result_bytes: int, num_results: int, reserve_bytes: int = GIB,
                    max_batch: int = 64) -> int:
    """The largest batch (1 .. min(num_results, max_batch)) whose activations fit in ``free_bytes``.

    ``reserve_bytes`` stays free for the allocator's fragmentation and other nodes. The batch is then evened
    out over the results (64 results with room for 24 run as 3 batches of 22, not 24+24+16), which costs
    nothing and keeps the last batch from being a small, poorly used one. Never below 1: a result that does
    not fit even alone is for the out-of-memory advice to explain.
    """
    if per_result_bytes <= 0:
        raise ValueError("per_result_bytes must be positive")
    limit = max(1, min(int(num_results), int(max_batch)))
    fits = int(max(0, free_bytes - reserve_bytes) // per_result_bytes)
    return evened_batch(int(num_results), max(1, min(limit, fits)))


def evened_batch(num_results: int, batch: int) -> int:
    """The smallest batch that runs ``num_results`` in as few batches as ``batch`` does (24 for 64 -> 22)."""
    batches = -(-num_results // max(1, batch))
    return max(1, -(-num_results // batches))


def per_result_bytes(image_size: int, options: FastPathOptions) -> int:
    """The peak memory one result adds to a guided step of a ``image_size`` model run with ``options``
    (:func:`activation_bytes_per_result`'s estimate, with the options that have a measured peak of their own)."""
    return activation_bytes_per_result(
        image_size, options.unet_dtype != torch.float32, options.gradient_checkpointing,
        triton_kernels=options.triton_norm and options.channels_last,
        autocast_one_forward=(options.precision_scheme == "autocast" and options.reuse_guided_forward
                              and not options.channels_last))


def smaller_batch_size(batch_size: int, num_results: int) -> int:
    """The auto batch to try after ``batch_size`` ran out of memory: about half, evened out over the results as
    ``auto_batch_size`` does (64 results after 22 run as 6 batches of 11)."""
    return evened_batch(num_results, max(1, batch_size // 2))


T = TypeVar("T")


def _add_advice(exc: BaseException, advice: str) -> None:
    """Put ``advice`` after the error's text, which is what ComfyUI's error dialog shows (not the console's log).
    The error itself is kept, re-raised as it is: its type and attributes (ComfyUI's out-of-memory checks read
    them, and then free its models) and its traceback (the layer that ran out)."""
    exc.args = (f"{exc}\n{advice}",) + tuple(exc.args[1:])


def run_with_smaller_batches(attempt: Callable[[int], T], batch_size: int, num_results: int, *, auto: bool,
                             is_oom: Callable[[BaseException], bool], free_memory: Callable[[], None]) -> T:
    """``attempt(batch_size)``, started again at a smaller batch where an auto batch ran out of memory.

    ``auto``: the batch was chosen by :func:`auto_batch_size`, which promised one that fits. Where the estimate
    was short (other programs on the device, the allocator's fragments) the attempt starts again at about half the
    batch (:func:`smaller_batch_size`), down to 1. Results do not depend on the batch, and the step that ran out is
    almost always the first one's backward, so little is redone. A batch chosen by hand, or a batch of 1 that still
    does not fit, re-raises the error after logging the advice. ``is_oom`` tells an out-of-memory error from any
    other (which passes through unchanged); ``free_memory`` runs before each new attempt, once the failed one's
    traceback (and the tensors its frames hold) is gone. ``num_results`` is the count the batches share.
    """
    while True:
        try:
            return attempt(batch_size)
        except Exception as exc:
            if not is_oom(exc):
                raise
            if not auto or batch_size == 1:
                advice = (f"Blended Diffusion ran out of memory with batch_size={batch_size}: lower batch_size "
                          "(results do not depend on it), or connect a Speed node with gradient_checkpointing on "
                          "or precision 'bf16 autocast'.")
                log.error(advice)
                _add_advice(exc, advice)
                raise
        # Here, outside the except block, the failed attempt's traceback is already gone.
        smaller = smaller_batch_size(batch_size, num_results)
        log.warning("Blended Diffusion: out of memory at batch_size=%d (auto); running again at %d",
                    batch_size, smaller)
        batch_size = smaller
        free_memory()
