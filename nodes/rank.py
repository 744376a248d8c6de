"""CLIP Rank: order any batch of images by how well (the masked part of) each matches a prompt."""

from __future__ import annotations

import torch

from ..blended import image_io
from ..blended.errors import BlendedInputError
from ..blended.prompts import parse_prompt
from ..blended.rank import RANK_MODES, rank_by_clip
from . import comfy_bridge as bridge

# Workflows saved before the mode choice hold the old "normalized" switch's value in this widget's slot.
_LEGACY_SWITCH = {True: "guidance view", False: "original"}


def _mode_of(value) -> str:
    """The ranking mode, mapping an old workflow's saved switch (true/false) to the mode it meant."""
    if isinstance(value, bool):
        return _LEGACY_SWITCH[value]
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return _LEGACY_SWITCH[value.strip().lower() == "true"]
    return value


class CLIPRank:
    DESCRIPTION = ("Sorts a batch of images, best first, by the un-augmented CLIP distance of each image (or of "
                   "its masked region) to the prompt. mode 'original' (default) computes exactly the original's "
                   "ranking distance; 'guidance view' scores the view the guidance optimised. Works on any IMAGE "
                   "batch: ours or another inpainting node's.")
    CATEGORY = "BlendedDiffusion"
    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("sorted", "top_k", "scores")
    OUTPUT_TOOLTIPS = ("All images, best first.", "The best top_k images.",
                       "One line per image, best first: rank, input index and CLIP distance (lower = closer).")
    FUNCTION = "rank"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The candidates (any batch size)."}),
                "clip": ("GUIDANCE_CLIP", {"tooltip": "CLIP from Load CLIP (guidance)."}),
                "prompt": ("STRING", {"multiline": True, "default": "a red rock", "tooltip":
                           "The text the images should match: one prompt (line breaks count as spaces). "
                           "Weighted parts as in CLIP Guidance ('a red rock:1.0 | blurry:-0.5') rank by the "
                           "weighted sum of the parts' distances."}),
                "top_k": ("INT", {"default": 1, "min": 1, "max": 4096, "tooltip": "How many to keep in top_k."}),
                "mode": (list(RANK_MODES), {"default": "original", "tooltip":
                         "original: exactly the original's ranking distance (the masked region on black, "
                         "pixels not CLIP-normalised, resized without antialiasing). guidance view: the masked "
                         "region on grey, CLIP-normalised, antialiased resize: the view the guidance optimised "
                         "(what the former 'normalized' switch did when on)."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Score only this region (1 = scored). Without it, whole images. One "
                                  "mask, one per image, or one per input the Sampler edited (each with its group "
                                  "of results, in the Sampler's order); the Sampler's mask output fits always."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, mode=None):
        # Also accepts the true/false an older workflow stored in this slot (the former "normalized" switch).
        # A linked mode is not known yet at validation (None): rank() checks it then.
        if mode is None or _mode_of(mode) in RANK_MODES:
            return True
        return f"mode must be one of {', '.join(RANK_MODES)}, got {mode!r}"

    def rank(self, images, clip, prompt, top_k, mode="original", mask=None, unique_id=None):
        if isinstance(images, torch.Tensor) and images.dim() == 3:
            images = images.unsqueeze(0)  # one [H,W,C] image, as the Sampler takes it: sorted as a batch of one
        if images.shape[0] == 0:
            raise BlendedInputError("CLIP Rank got an empty image batch: connect a node that outputs images")
        if int(top_k) < 1:  # a linked value skips the widget's minimum
            raise BlendedInputError(f"CLIP Rank's top_k must be at least 1, got {top_k}: it is how many of the best "
                                    "images the top_k output keeps (the sorted output holds them all)")
        # One prompt: line breaks count as spaces; weighted parts rank by the weighted sum of their distances.
        prompt = parse_prompt(" ".join(str(prompt).split()))
        with bridge.autograd_enabled():
            bridge.load_for_sampling([clip.patcher], 0)
            # Gray and RGBA too. Left where they are: the ranking moves a few at a time to CLIP's device.
            pixels = image_io.to_rgb_nchw(images)
            mask_in = None
            if mask is not None:
                # One mask per result, or one per input with its group of results, in the Sampler's order.
                mask_in = image_io.mask_for_images(pixels, mask)
                per_mask = image_io.results_per_item(mask_in.shape[0], pixels.shape[0], "mask", of="images")
                empty = [i for item in image_io.empty_mask_items(mask_in)
                         for i in range(item * per_mask, (item + 1) * per_mask)]
                if empty:
                    raise BlendedInputError(
                        f"CLIP Rank's mask is empty (all 0) for image(s) {empty[:8]}: those would all score the "
                        "same. Connect the mask the edit used (the Sampler's mask output), or leave mask "
                        "unconnected to score whole images.")
            with torch.no_grad():
                order, distances = rank_by_clip(clip.clip, pixels, prompt, mask=mask_in, mode=_mode_of(mode),
                                                progress=bridge.progress_steps(unique_id))
        order = order.cpu()
        distances = distances.float().cpu()
        ranked = images[order]
        lines = [f"{rank + 1}. image {int(i)}: {float(distances[i]):.4f}" for rank, i in enumerate(order)]
        return (bridge.to_output(ranked), bridge.to_output(ranked[:top_k]), "\n".join(lines))
