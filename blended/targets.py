"""What each CLIP pulls the edit toward: a prompt line's weighted parts plus optional reference pictures.

Embeddings are computed per CLIP (each has its own text and image space and input size), once per edit, and
arranged as :class:`~blended.guidance.TargetSet` rows, one per result, for the guidance objective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch

from .augment import AugmentationSettings
from .cuda_graphs import eager_tower
from .errors import BlendedInputError
from .guidance import TargetSet, check_weight
from .image_io import empty_mask_items, mask_as_b1hw
from .prompts import WeightedPrompt
from .rank import image_embeddings


@dataclass
class ImageTarget:
    """A reference picture whose CLIP image embedding is a target like a prompt part.

    ``image`` [N,3,H,W] in [0,1]; ``mask`` [N|1,1,H,W] (1 = the part that counts) or None for the whole
    picture. A batch of N pictures counts as N targets of weight ``weight / N`` each.
    """

    image: torch.Tensor
    mask: Optional[torch.Tensor] = None
    weight: float = 1.0


@dataclass
class GuidanceClip:
    """One more CLIP of an ensemble: its weight relative to the main CLIP's 1, and its number of views."""

    clip: object
    weight: float = 1.0
    num_views: Optional[int] = None  # None = the main CLIP's augmentation settings

    def __post_init__(self):
        self.weight = check_weight(self.weight, "a CLIP's ensemble weight")


def member_augmentations(member: GuidanceClip, base: AugmentationSettings) -> AugmentationSettings:
    if member.num_views is None:
        return base
    import dataclasses

    return dataclasses.replace(base, num_views=int(member.num_views))


def image_target_embeddings(clip, targets: Sequence[ImageTarget], device) -> list:
    """[(embeds [N,D], weight per picture)] of every image target, in this CLIP's space."""
    out = []
    for target in targets:
        image = target.image
        weight = check_weight(target.weight, "the image target's weight")
        if image.dim() != 4 or image.shape[1] != 3 or image.shape[0] == 0:
            raise BlendedInputError(f"an image target must be one or more RGB pictures, got shape "
                                    f"{tuple(image.shape)}.")
        mask = target.mask
        if mask is not None:
            mask = mask_as_b1hw(mask)
            empty = empty_mask_items(mask)
            if empty:
                which = f" (for picture(s) {empty} of {mask.shape[0]})" if mask.shape[0] > 1 else ""
                raise BlendedInputError(f"the image target's mask is empty{which}: paint the part of the reference "
                                        "picture that should count, or leave the mask unconnected.")
        with torch.inference_mode(False), torch.no_grad(), eager_tower(clip):
            clip_device = clip.device
            embeds = image_embeddings(clip, image.to(clip_device),
                                      None if mask is None else mask.to(clip_device)).float()
        out.append((embeds.detach().clone().to(device), weight / image.shape[0]))
    return out


class LineTargets(NamedTuple):
    """One prompt line's targets in one CLIP's embedding space."""

    embeds: torch.Tensor   # [K,D]
    weights: torch.Tensor  # [K]
    is_empty: bool         # no part and no image: a placeholder target whose gradient the sampler zeroes


def line_targets(clip, prompt: WeightedPrompt, images: list, device) -> LineTargets:
    """The targets of one prompt line (its weighted parts, then the image targets) for one CLIP.

    ``is_empty`` marks a line with no part and no image: it gets the empty text as a placeholder target of
    weight 1, which is what the original computes for an empty prompt before it zeroes the gradient.
    """
    embeds, weights = [], []
    for part in prompt.parts:
        embeds.append(clip.text_embedding(part.text).to(device))
        weights.append(float(part.weight))
    for image_embeds, weight in images:
        embeds.extend(image_embeds[i:i + 1] for i in range(image_embeds.shape[0]))
        weights.extend([weight] * image_embeds.shape[0])
    empty = not embeds
    if empty:
        embeds, weights = [clip.text_embedding("").to(device)], [1.0]
    return LineTargets(torch.cat(embeds).float(), torch.tensor(weights, dtype=torch.float32, device=device), empty)


def stack_targets(lines: Sequence[LineTargets]) -> TargetSet:
    """One row per sample from its line's targets; short rows padded with weight 0."""
    k = max(line.embeds.shape[0] for line in lines)
    embeds, weights = [], []
    for line_embeds, line_weights, _ in lines:
        pad = k - line_embeds.shape[0]
        embeds.append(torch.cat([line_embeds, line_embeds[:1].expand(pad, -1)]) if pad else line_embeds)
        weights.append(torch.cat([line_weights, line_weights.new_zeros(pad)]) if pad else line_weights)
    return TargetSet(torch.stack(embeds), torch.stack(weights))
