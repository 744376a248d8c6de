"""Blended Edit Metrics: scores a batch of edits (ours or any inpainting node's) against the input and mask."""

from __future__ import annotations

import logging

import torch

from ..blended import metrics
from ..blended.errors import BlendedInputError
from ..blended.image_io import mask_for_images, to_rgb_nchw
from ..blended.lpips_loss import load_lpips
from . import comfy_bridge as bridge

log = logging.getLogger(__name__)

LPIPS_CHOICES = ["if available", "off"]


# What LPIPS's forward holds per pixel of one of its chunks (VGG16's five taps for the result and the input,
# normalised, their difference and its square; no gradients): traced on fake tensors, 7.9 GiB at 2048x2048.
LPIPS_BYTES_PER_PIXEL = 2000


def _lpips_memory(pixels: torch.Tensor) -> int:
    """The memory to make room for where LPIPS runs on ComfyUI's device: its largest chunk's activations."""
    height, width = pixels.shape[-2:]
    chunk = metrics.chunk_size(height, width, most=metrics.LPIPS_CHUNK, pixels=metrics.LPIPS_PIXELS)
    return min(chunk, pixels.shape[0]) * height * width * LPIPS_BYTES_PER_PIXEL


class EditMetrics:
    DESCRIPTION = ("Measures edits instead of eyeballing them: CLIP similarity of the edited region to the prompt, "
                   "background preservation outside the mask (PSNR, MSE, LPIPS when installed), a seam score on a "
                   "thin ring across the mask border compared with the input, and batch diversity. Scores any "
                   "IMAGE batch: this pack's results or another inpainting node's (e.g. core ImageCompositeMasked "
                   "or a KSampler with SetLatentNoiseMask). Use a CLIP other than the guiding one for a fair "
                   "similarity score.")
    CATEGORY = "BlendedDiffusion/evaluate"
    RETURN_TYPES = ("STRING", "FLOAT", "FLOAT", "FLOAT", "FLOAT", "FLOAT")
    RETURN_NAMES = ("table", "clip_similarity", "background_psnr", "seam_gradient", "seam_colour", "diversity")
    OUTPUT_IS_LIST = (False, True, True, True, True, False)
    OUTPUT_TOOLTIPS = (
        "A text table: one row per image, the mean, and the batch diversity; (+) higher is better, (-) lower "
        "is better. Wire it to Preview Any.",
        "Per image: cosine similarity of the masked crop to the prompt (higher = better; a weighted sum for "
        "weighted parts; NaN without a CLIP or a prompt).",
        "Per image: PSNR of the background outside the mask in dB (higher = better; inf = untouched).",
        "Per image: RMS gradient on the border ring minus the input's (lower = better; 0 = as smooth as the "
        "input; positive = a visible seam).",
        "Per image: colour step across the border minus the input's, 0..2 (lower = better; 0 = no tint).",
        "Mean pairwise CLIP distance of the edited regions, 0..2 (higher = more varied; 0 = all the same).",
    )
    FUNCTION = "score"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "results": ("IMAGE", {"tooltip": "The edits to score (any batch), e.g. the Sampler's images."}),
                "image": ("IMAGE", {"tooltip": "The input the edits were made from, same size: one image, one per "
                                               "result, or one per group of results (the Sampler's order)."}),
                "mask": ("MASK", {"tooltip": "The edited region (> 0 = edited, 0 = background), e.g. the "
                                             "Sampler's mask output. Resized to the image if sizes differ. For one "
                                             "picture edited with several masks and several prompt lines, connect "
                                             "those masks: they pair the lines with the results."}),
                "ring_width": ("INT", {"default": metrics.DEFAULT_RING_WIDTH, "min": 1, "max": 64, "tooltip":
                               "Seam scores: pixels on each side of the mask border that make up the ring."}),
                "lpips": (LPIPS_CHOICES, {"default": "if available", "tooltip":
                          "Background LPIPS (lower = better) when the 'lpips' package and torchvision's VGG16 "
                          "weights are installed; skipped (n/a) otherwise. Nothing is downloaded."}),
            },
            "optional": {
                "clip": ("GUIDANCE_CLIP", {"tooltip": "CLIP for similarity and diversity (from Load CLIP "
                                                      "(guidance)). A different CLIP from the guiding one is the "
                                                      "fair judge. Without it those columns are n/a."}),
                "prompt": ("STRING", {"multiline": True, "default": "", "tooltip":
                           "The text the edited region should match (higher CLIP similarity = better): one line, "
                           "one line per image, or the Sampler's prompt lines (each input's results hold an equal "
                           "group per line, in order). Weighted parts (a | b:-0.5) score the weighted sum of "
                           "their similarities."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def score(self, results, image, mask, ring_width=metrics.DEFAULT_RING_WIDTH, lpips="if available", clip=None,
              prompt="", unique_id=None):
        if results.shape[0] == 0:
            raise BlendedInputError("Blended Edit Metrics got an empty image batch: connect the edits to score")
        # Gray and RGBA too, as CLIP Rank takes them; read, never written. Named, so an error says which input.
        pixels = to_rgb_nchw(results.cpu(), what="results input")
        reference = to_rgb_nchw(image.cpu(), what="image input")
        mask_in = mask_for_images(pixels, mask.cpu())
        lpips_model = None
        if lpips == "if available":
            try:
                lpips_model = load_lpips(way_out="set Edit Metrics' lpips to 'off'")
            except BlendedInputError as exc:
                bridge.say_once(log, f"Blended Edit Metrics: no LPIPS column ({exc})")
        # LPIPS runs on ComfyUI's device as a model of its own (VGG16 at full size on the CPU takes seconds a
        # result), loaded with CLIP in one call, so that making room for one cannot move the other off the device.
        # Its patcher lives while it scores: ComfyUI counts a model whose patcher is gone as leaked.
        patchers = [] if clip is None else [clip.patcher]
        lpips_patcher = None if lpips_model is None else bridge.make_patcher(lpips_model)
        if lpips_patcher is not None:
            patchers.append(lpips_patcher)
        if patchers:
            bridge.load_for_sampling(patchers, 0 if lpips_patcher is None else _lpips_memory(pixels))
        run = dict(clip=None if clip is None else clip.clip, prompt=prompt if clip is not None else None,
                   ring_width=ring_width)
        try:
            scores = self._score(pixels, reference, mask_in, lpips_model, unique_id, run)
        except Exception as exc:
            if lpips_patcher is None or not bridge.is_out_of_memory(exc):
                raise
            # A picture too large for LPIPS beside what else the device holds: scored again with LPIPS on the CPU
            # (slower, but it finishes), outside this block, so the failed attempt's tensors are freed first.
            log.warning("Blended Edit Metrics: LPIPS ran out of memory on %s; scoring again with LPIPS on the CPU",
                        lpips_patcher.load_device)
            scores = None
        if scores is None:
            bridge.release_failed_attempt()
            scores = self._score(pixels, reference, mask_in, load_lpips(), unique_id, run)
        table = scores.table()
        log.debug("Blended Edit Metrics:\n%s", table)  # the node shows it, and its output carries it
        return {"ui": {"text": [table]},
                "result": (table, scores.clip_similarity, scores.background_psnr, scores.seam_gradient,
                           scores.seam_colour, scores.batch_diversity)}

    @staticmethod
    def _score(pixels, reference, mask_in, lpips_model, unique_id, run: dict):
        with torch.no_grad():
            return metrics.score_edits(pixels, reference, mask_in, lpips_model=lpips_model,
                                       progress=bridge.progress_steps(unique_id), **run)
