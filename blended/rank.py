"""Rank finished edits by how well CLIP thinks they match the prompt (the original's ``output/ranked``).

The original generates many results and sorts them by an un-augmented CLIP distance, because guided
diffusion often fails and picking the best of many is cheaper than tuning. Lower distance = better.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .errors import BlendedInputError
from .image_io import from_model_range, mask_as_b1hw, to_model_range
from .losses import spherical_distance
from .prompts import WeightedPrompt


def _text_embeds(clip, prompt_or_embed, batch: int) -> torch.Tensor:
    """[1,D] or [B,D] float32 text embeddings from a prompt, a prompt per image, or ready embeddings."""
    if isinstance(prompt_or_embed, str):
        return clip.text_embedding(prompt_or_embed)
    if isinstance(prompt_or_embed, torch.Tensor):
        embeds = prompt_or_embed.float()
        if embeds.dim() == 1:
            embeds = embeds.unsqueeze(0)
    elif isinstance(prompt_or_embed, Sequence) and all(isinstance(p, str) for p in prompt_or_embed):
        embeds = torch.cat([clip.text_embedding(p) for p in prompt_or_embed])
    else:
        raise BlendedInputError("give the ranking a prompt, a list of prompts (one per image) or text "
                                f"embeddings, not {type(prompt_or_embed).__name__}.")
    if embeds.dim() != 2 or embeds.shape[0] not in (1, batch):
        raise BlendedInputError(f"text embeddings of shape {tuple(embeds.shape)} do not fit {batch} images; "
                                "give one prompt for all images or one per image.")
    return embeds


def _as_masks(mask: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(``[M,1,H,W]`` mask, images per mask item): one mask, one per image, or one per consecutive group of
    images (the Sampler's order: an input's results together); ``[H,W]`` and ``[M,H,W]`` are accepted too."""
    mask = mask_as_b1hw(mask)
    batch = images.shape[0]
    if mask.shape[-2:] != images.shape[-2:] or mask.shape[0] == 0 or batch % mask.shape[0]:
        raise BlendedInputError(f"mask {tuple(mask.shape)} does not match images {tuple(images.shape)}; "
                                "resize the mask to the image size and give one mask, one per image or one per "
                                "equal group of images.")
    return mask, batch // mask.shape[0]


RANK_MODES = ("original", "guidance view")


def _check_mode(mode: str) -> str:
    """``mode``, refused unless it is one of :data:`RANK_MODES`."""
    if mode not in RANK_MODES:
        raise BlendedInputError(f"unknown ranking mode {mode!r}: use 'original' (the original's ranking) or "
                                "'guidance view' (the view the guidance optimises)")
    return mode


def clip_scores(clip, images: torch.Tensor, prompt_or_embed, mask: torch.Tensor | None = None,
                mode: str = "original", progress: Optional[Progress] = None) -> torch.Tensor:
    """Un-augmented spherical CLIP distance of each image to its prompt, float32 [B]; lower is better.

    The prompt is a string, a string per image, text embeddings, or a :class:`~blended.prompts.WeightedPrompt`
    (the weighted sum of its parts' distances; a plain single part is the string's distance).

    ``images`` are [B,3,H,W] in [0,1]. With a mask (1 = edited) CLIP sees only the edited region:
    - ``mode="original"`` (default): exactly the original's ranking (``unaugmented_clip_distance``): black
      outside the mask, values in [0,1] NOT CLIP-normalised, resized to CLIP's size bilinearly without
      antialiasing (the 2022 torchvision tensor resize did not antialias);
    - ``mode="guidance view"``: the view the guidance optimises: outside the mask is mid-grey (0 in [-1,1]),
      the image is resized with antialiasing and CLIP-normalised, so results are ranked by the quantity the
      guidance pulled on.
    Pixels outside the mask cannot affect the score in either mode. ``progress`` is told of each chunk embedded
    (see :func:`image_embeddings`).
    """
    mode = _check_mode(mode)
    if images.dim() != 4 or images.shape[1] != 3:
        raise BlendedInputError(f"images must be [B,3,H,W] in [0,1], got shape {tuple(images.shape)}.")
    with torch.no_grad():
        if isinstance(prompt_or_embed, WeightedPrompt):
            if prompt_or_embed.is_empty:
                raise BlendedInputError("ranking needs a prompt: type the text the images should match")
            texts = [(part.weight, _text_embeds(clip, part.text, 1)) for part in prompt_or_embed.parts]
        else:
            texts = [(1.0, _text_embeds(clip, prompt_or_embed, images.shape[0]))]
        image_embeds = image_embeddings(clip, images, mask, mode=mode, progress=progress)
        # A weighted prompt's distance is the weighted sum of its parts', as the guidance's loss of that line.
        distances = [weight * spherical_distance(image_embeds, text.to(image_embeds.device)) for weight, text in texts]
        return (distances[0] if len(distances) == 1 else sum(distances)).float()


def image_embeddings(clip, images: torch.Tensor, mask: torch.Tensor | None = None,
                     mode: str = "guidance view", progress: Optional[Progress] = None) -> torch.Tensor:
    """[B,D] float32 CLIP embeddings of [B,3,H,W] images in [0,1], as :func:`clip_scores` sees them in ``mode``:
    its guidance view (the default) or the original's view.

    Shared by ranking and by image targets, so a result is scored against a reference picture with exactly
    the view the target was embedded with. Differentiable when called with grad enabled.

    ``progress(done, total)`` is called after each chunk of images, so a caller can move a progress bar and
    stop a long ranking between chunks (by raising from it).
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise BlendedInputError(f"images must be [B,3,H,W] in [0,1], got shape {tuple(images.shape)}.")
    normalized = _check_mode(mode) == "guidance view"
    masks, per_mask = _as_masks(mask, images) if mask is not None else (None, 1)
    embeds = []
    # A few images at a time, each chunk moved to CLIP's device only now: 64 results of a 4096x4096 photo never
    # sit on the device (or in float32 copies) all at once; CLIP sees them at its own size anyway.
    for chunk in chunks(images.shape[0], chunk_size(*images.shape[-2:])):
        embeds.append(_embed_chunk(clip, images, masks, per_mask, chunk, normalized))
        if progress is not None:
            progress(chunk.stop, images.shape[0])
    return embeds[0] if len(embeds) == 1 else torch.cat(embeds)


def _embed_chunk(clip, images: torch.Tensor, masks: torch.Tensor | None, per_mask: int, chunk: range,
                 normalized: bool) -> torch.Tensor:
    """Embeddings of ``images[chunk]``: only this chunk's pixels (and its masks) are on CLIP's device at once."""
    size = clip.image_size
    x = images[chunk.start:chunk.stop].to(device=clip.device, dtype=torch.float32)
    if masks is not None:
        m = masks[torch.arange(chunk.start, chunk.stop) // per_mask].to(device=clip.device, dtype=torch.float32)
        # grey outside in the guidance convention (masking happens in [-1,1]); black in the original's
        x = from_model_range(to_model_range(x) * m, clamp=False) if normalized else x * m
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=normalized)
    if normalized:
        x = clip.normalize(x)
    return clip.encode_image(x)


# ``progress(done, total)``: called as work finishes; it may raise to stop the work (ComfyUI's Cancel).
Progress = Callable[[int, int], None]

# Images embedded at a time: enough to keep CLIP busy, few enough that their full-size pixels stay small.
EMBED_CHUNK = 16
# Full-size pixels (per channel) moved to CLIP's device at a time: 16 images of 1024x1024 (192 MiB in float32,
# its masked and resized copies a few times that). Larger images go fewer at a time, down to one: 16 results
# of 4096x4096 at once would be 3 GiB for each copy.
EMBED_PIXELS = 16 * 1024 * 1024


def chunk_size(height: int, width: int, most: Optional[int] = None, pixels: Optional[int] = None) -> int:
    """How many [3,height,width] images to process at a time: at most ``most`` (:data:`EMBED_CHUNK`), and no
    more than fit in ``pixels`` (:data:`EMBED_PIXELS`), but always at least one (one image is what it is)."""
    most = EMBED_CHUNK if most is None else most
    pixels = EMBED_PIXELS if pixels is None else pixels
    return max(1, min(most, pixels // max(1, height * width)))


def chunks(count: int, size: int) -> list[range]:
    """``range(count)`` cut into consecutive ranges of ``size`` items (the last may be shorter)."""
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def rank_by_clip(clip, images: torch.Tensor, prompt_or_embed, mask: torch.Tensor | None = None,
                 mode: str = "original", progress: Optional[Progress] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices best first, distances [B]); ties keep the input order so ranking is reproducible."""
    distances = clip_scores(clip, images, prompt_or_embed, mask=mask, mode=mode, progress=progress)
    order = torch.argsort(distances.cpu(), stable=True)
    return order, distances
