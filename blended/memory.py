"""How many results fit in one batch: the guided step's memory grows linearly with the batch.

Each result of a guided step keeps the activations of its grad-enabled UNet forward and of CLIP on all its
views until the backward: at 256x256 with 8 views that is 3.8 GiB per result with the original's fp16 torso
(measured on an H100 with ``scripts/bench.py``'s saved-tensor count) and 5.4 GiB in fp32. The weights and
ComfyUI's own needs come on top, so a batch is sized from the memory that is free once the models are loaded.

Those measured figures hold the UNet and one ViT-B/16 CLIP on 8 views. The guiding CLIPs as a run has them (each
one's architecture, views, precision and options, an ensemble's members too) and the LPIPS network are counted
by :func:`per_result_bytes` in place of that CLIP: bytes per view from the tower's shape, with coefficients fitted
to fake-tensor traces (:func:`blended.memory_trace.trace_clip_backward`), not measured on a card.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Callable, Iterable, Sequence, TypeVar

import torch

from . import clip_vision

if TYPE_CHECKING:
    from .fast_paths import FastPathOptions

log = logging.getLogger(__name__)

GIB = 1 << 30
MIB = 1 << 20

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


def per_result_bytes(image_size: int, options: FastPathOptions, clips: Sequence[GuidingClip] | None = None,
                     lpips: bool = False) -> int:
    """The peak memory one result adds to a guided step of a ``image_size`` model run with ``options``
    (:func:`activation_bytes_per_result`'s estimate, with the options that have a measured peak of their own).

    ``clips``: the run's guiding CLIPs (:func:`guiding_clips`), counted in place of the ViT-B/16 on 8 views that
    the measured figure holds; None keeps that one. ``lpips``: the background LPIPS loss is on. The parts are
    logged at DEBUG."""
    parts = per_result_parts(image_size, options, clips, lpips)
    log.debug("Blended Diffusion: per-result estimate %.2f GiB = %s", sum(parts.values()) / GIB,
              ", ".join(f"{name} {value / MIB:+.0f} MiB" for name, value in parts.items()))
    return sum(parts.values())


def per_result_parts(image_size: int, options: FastPathOptions, clips: Sequence[GuidingClip] | None = None,
                     lpips: bool = False) -> dict[str, int]:
    """:func:`per_result_bytes`'s parts, named: the measured (or saved-tensor) figure, less its own CLIP, plus each
    guiding CLIP and LPIPS. The figure's CLIP is taken off at the figure's scale (the figure scales with the
    model's area), each guiding CLIP's views are added at the CLIP's own resolution, which the model's size does
    not change: with ViT-B/16 on 8 views and the figure's options a 256 px model's estimate is the figure's."""
    low, checkpointing = options.unet_dtype != torch.float32, options.gradient_checkpointing
    triton = options.triton_norm and options.channels_last
    one_forward = (options.precision_scheme == "autocast" and options.reuse_guided_forward
                   and not options.channels_last)
    parts = {"measured": activation_bytes_per_result(image_size, low, checkpointing, triton_kernels=triton,
                                                     autocast_one_forward=one_forward)}
    if clips is None and not lpips:
        return parts
    if clips is not None:
        included = _measured_clip(low, checkpointing, triton).bytes_per_result
        # Checkpointing's figure is the saved set, CLIP's share included, times _CHECKPOINT_FACTOR.
        scale = _CHECKPOINT_FACTOR if checkpointing else 1.0
        parts["measured CLIP (ViT-B/16, 8 views)"] = -int(included * scale * (image_size / 256) ** 2)
        for number, clip in enumerate(clips):
            parts[f"CLIP {number} ({clip.describe()})"] = clip.bytes_per_result
    if lpips:
        parts["LPIPS"] = lpips_bytes_per_result(image_size)
    return parts


# ------------------------------------------------------------------------------------------ the guiding CLIPs

@dataclasses.dataclass(frozen=True)
class ClipTower:
    """The shape that sizes a CLIP image tower's activations: ``tokens`` per view (patches and the class token),
    ``width``, ``layers`` (transformer blocks), ``mlp_width`` (the blocks' hidden width) and ``image_size``
    (each view's side). Attention heads do not count: scaled_dot_product_attention keeps no token-by-token map."""

    tokens: int
    width: int
    layers: int
    mlp_width: int
    image_size: int


VIT_B16 = ClipTower(tokens=197, width=768, layers=12, mlp_width=3072, image_size=224)


@dataclasses.dataclass(frozen=True)
class _ViewCoefficients:
    """Bytes one view keeps per token and channel: ``layer_*`` in every block (the activations the backward
    needs), ``once_*`` once (the peak's temporaries: one block recomputed under checkpointing, its gradients),
    each per channel of the width and of the MLP; ``pixel`` per value of the view (its cast copy)."""

    layer_width: float
    layer_mlp: float
    once_width: float
    once_mlp: float
    pixel: float

    def view_bytes(self, tower: ClipTower) -> int:
        per_token = ((self.layer_width * tower.width + self.layer_mlp * tower.mlp_width) * tower.layers
                     + self.once_width * tower.width + self.once_mlp * tower.mlp_width)
        return int(per_token * tower.tokens + self.pixel * 3 * tower.image_size ** 2)


# Keyed by (low precision, triton_clip, clip_checkpointing). Least-squares fits of the per-view slope of the traced
# peak (blended.memory_trace.trace_clip_backward, CUDA's rules, 2 and 4 views) over eight open_clip ViTs (B/16,
# B/32, B/16-plus-240, M/16, L/14, L/14-336, H/14, bigG/14): within 0.2% of each trace. Traced, not measured on
# a card. Per view, ViT-B/16 / ViT-L/14: fp32 105.2 / 351.8 MiB, bf16 60.2 / 201.0, bf16 with the Triton
# kernels 38.2 / 126.7; checkpointed 22.5 / 51.2 (fp32), 12.7 / 27.9 (bf16), 9.5 / 22.4 (bf16, Triton).
# channels_last changes only the patch embedding's weight: the same figures.
_CLIP_VIEW_COEFFICIENTS = {
    (False, False, False): _ViewCoefficients(24.0, 8.0, 3.76, 13.19, 0.0),
    (False, True, False): _ViewCoefficients(24.0, 4.0, 2.83, 9.40, 0.0),
    (True, False, False): _ViewCoefficients(16.0, 4.0, 2.09, 7.11, 2.0),
    (True, True, False): _ViewCoefficients(12.0, 2.0, 1.55, 5.22, 2.0),
    (False, False, True): _ViewCoefficients(4.0, 0.0, 28.11, 20.0, 0.0),
    (False, True, True): _ViewCoefficients(4.0, 0.0, 28.10, 12.0, 0.0),
    (True, False, True): _ViewCoefficients(2.0, 0.0, 22.11, 10.0, 2.0),
    (True, True, True): _ViewCoefficients(2.0, 0.0, 16.10, 6.0, 2.0),
}


def clip_view_bytes(tower: ClipTower, low_precision: bool, checkpointing: bool = False, triton: bool = False) -> int:
    """The peak bytes one view adds to a guided step in a CLIP image tower of shape ``tower`` (forward kept for
    the backward, and the backward's temporaries): every result sends ``num_views`` views through each CLIP."""
    return _CLIP_VIEW_COEFFICIENTS[bool(low_precision), bool(triton), bool(checkpointing)].view_bytes(tower)


@dataclasses.dataclass(frozen=True)
class GuidingClip:
    """One CLIP as a run guides with it: its tower, views per result, and the options its activations follow."""

    tower: ClipTower
    num_views: int
    low_precision: bool
    checkpointing: bool = False
    triton: bool = False

    @property
    def bytes_per_result(self) -> int:
        return self.num_views * clip_view_bytes(self.tower, self.low_precision, self.checkpointing, self.triton)

    def describe(self) -> str:
        tower = self.tower
        flags = "".join(f"+{name}" for name, on in (("ckpt", self.checkpointing), ("triton", self.triton)) if on)
        return (f"{tower.layers}x{tower.width} {tower.tokens} tokens, {self.num_views} views, "
                f"{'low precision' if self.low_precision else 'fp32'}{flags}")


def _measured_clip(low_precision: bool, gradient_checkpointing: bool, triton_kernels: bool) -> GuidingClip:
    """The CLIP :func:`activation_bytes_per_result`'s figure for these settings holds: the benchmark's ViT-B/16 on
    8 views, in the UNet's precision, with the Triton kernels where the Triton figure was measured."""
    measured_triton = low_precision and triton_kernels and not gradient_checkpointing
    return GuidingClip(VIT_B16, 8, low_precision, triton=measured_triton)


def clip_tower(model) -> ClipTower | None:
    """The :class:`ClipTower` of an open_clip CLIP (``model.visual`` a VisionTransformer); None for another tower
    (a ResNet CLIP), which :func:`guiding_clips` counts as ViT-B/16."""
    visual = getattr(model, "visual", None)
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    grid, size = getattr(visual, "grid_size", None), getattr(visual, "image_size", None)
    if not blocks or grid is None or size is None:
        return None
    mlp = getattr(blocks[0], "mlp", None)
    hidden = getattr(getattr(mlp, "c_fc", None), "out_features", None)
    if hidden is None:
        return None
    size = size[0] if isinstance(size, (tuple, list)) else size
    return ClipTower(tokens=int(grid[0] * grid[1]) + 1, width=int(visual.transformer.width), layers=len(blocks),
                     mlp_width=int(hidden), image_size=int(size))


def guiding_clip(clip, num_views: int, options: FastPathOptions, dtype: torch.dtype | None = None) -> GuidingClip:
    """``clip`` (a :class:`~blended.clip_model.GuidanceCLIP`) as a run guides with it: ``num_views`` per result,
    ``options``' CLIP checkpointing and Triton kernels, in ``dtype`` (default: ``options.clip_dtype``)."""
    tower = clip_tower(clip.model)
    # The Triton kernels run only in the towers clip_vision reproduces; open_clip's own forward keeps more.
    triton = options.triton_clip and tower is not None and clip_vision.supports(clip.model.visual)
    if tower is None:
        log.debug("Blended Diffusion: a CLIP without a ViT image tower is counted as ViT-B/16 for the batch size")
        tower = VIT_B16
    dtype = options.clip_dtype if dtype is None else dtype
    return GuidingClip(tower, int(num_views), dtype != torch.float32, options.clip_checkpointing, triton)


def guiding_clips(main_clip, num_views: int, members: Iterable[tuple[object, int | None]],
                  options: FastPathOptions) -> list[GuidingClip]:
    """The main CLIP (``num_views`` per result, ``options``) and an ensemble's further CLIPs: ``(clip, views)``
    pairs, views None for the main CLIP's. All CLIPs' views are held together until the step's backward. A member
    runs with the main CLIP's options at its own loader's precision, as its run clone does; the main CLIP's model
    listed again runs as the main CLIP does."""
    clips = [guiding_clip(main_clip, num_views, options)]
    for clip, views in members:
        dtype = options.clip_dtype if clip.model is main_clip.model else clip.dtype
        clips.append(guiding_clip(clip, num_views if views is None else views, options, dtype))
    return clips


# The background LPIPS loss (the lpips package's VGG16, float32) on each result at the model's size. Its VGG16
# trunk, traced at 256 px (torchvision's vgg16 features to relu5_3, forward and backward on fake tensors): 91.5 MiB
# per result. Its head, counted from the structure: at each of the 5 taps (8.0M values at 256 px) the normalised
# features, their difference, its square and the 1x1 layer's input, float32: 122.0 MiB. Neither measured on a card.
_LPIPS_TRUNK_PER_RESULT_256 = int(91.5 * MIB)
_LPIPS_HEAD_PER_RESULT_256 = 4 * 4 * (64 * 256 ** 2 + 128 * 128 ** 2 + 256 * 64 ** 2 + 512 * 32 ** 2 + 512 * 16 ** 2)


def lpips_bytes_per_result(image_size: int) -> int:
    """The peak bytes the background LPIPS loss adds per result (its network runs on the model-size image)."""
    return int((_LPIPS_TRUNK_PER_RESULT_256 + _LPIPS_HEAD_PER_RESULT_256) * (image_size / 256) ** 2)


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
