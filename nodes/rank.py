"""CLIP Rank: order any batch of images by how well (the masked part of) each matches a prompt."""

from __future__ import annotations

import torch

from ..blended.rank import rank_by_clip
from . import comfy_bridge as bridge


class CLIPRank:
    DESCRIPTION = ("Sorts a batch of images, best first, by CLIP similarity of each image (or of its masked "
                   "region) to the prompt, as the original ranks its results. Works on any IMAGE batch: ours or "
                   "another inpainting node's.")
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
                           "The text the images should match."}),
                "top_k": ("INT", {"default": 1, "min": 1, "max": 4096, "tooltip": "How many to keep in top_k."}),
                "normalized": ("BOOLEAN", {"default": True, "tooltip":
                               "On: CLIP sees the masked region on grey, properly normalised (consistent with "
                               "guidance). Off: the original's ranking (un-normalised pixels on black)."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Score only this region (1 = scored). Without it, whole images."}),
            },
        }

    def rank(self, images, clip, prompt, top_k, normalized=True, mask=None):
        if images.shape[0] == 0:
            raise ValueError("CLIP Rank got an empty image batch: connect a node that outputs images")
        prompt = " ".join(str(prompt).split())
        with bridge.autograd_enabled():
            bridge.load_for_sampling([clip.patcher], 0)
            device = clip.patcher.load_device
            pixels = images.clone().movedim(-1, 1)[:, :3].to(device, torch.float32)
            mask_in = None
            if mask is not None:
                from ..blended.image_io import prepare_mask
                mask_in = prepare_mask(mask.clone(), pixels.shape[2], pixels.shape[3], pixels.shape[0]).to(device)
            with torch.no_grad():
                order, distances = rank_by_clip(clip.clip, pixels, prompt, mask=mask_in, normalized=normalized)
        order = order.cpu()
        distances = distances.float().cpu()
        ranked = images[order]
        lines = [f"{rank + 1}. image {int(i)}: {float(distances[i]):.4f}" for rank, i in enumerate(order)]
        return (bridge.to_output(ranked), bridge.to_output(ranked[:top_k]), "\n".join(lines))
