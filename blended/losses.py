"""The original's loss terms (``optimization/losses.py`` and ``image_editor.py``), as plain functions.

They are kept separate from the guidance code so that each term can be checked against its formula alone,
and so that the ranking code measures results with exactly the distance the guidance minimised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import BlendedInputError


def spherical_distance(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Squared great-circle distance / 2 between L2-normalised embeddings, [N].

    The original uses this rather than the cosine distance the paper describes; its gradient does not vanish
    as the embeddings get close, which is why guidance keeps pulling. Inputs broadcast along the first axis
    ([N,D] with [1,D] or [N,D]).
    """
    x = F.normalize(image_embeds, dim=-1)
    y = F.normalize(text_embeds, dim=-1)
    return (x - y).norm(dim=-1).div(2).arcsin().pow(2).mul(2)


def cosine_distance(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity, [N]: the original's ``use_cosine=True`` option (the paper's wording)."""
    x = F.normalize(image_embeds, dim=-1)
    y = F.normalize(text_embeds, dim=-1)
    return 1 - (x * y).sum(dim=-1)


def range_loss(x: torch.Tensor) -> torch.Tensor:
    """Mean squared excess outside [-1,1] per sample, [B]; keeps pred_xstart from drifting out of range."""
    return (x - x.clamp(-1, 1)).pow(2).mean(dim=[1, 2, 3])


def background_l2(x_in: torch.Tensor, init_image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The original's background-preservation MSE, a scalar.

    The masked background ``x_in*(1-mask)`` is compared with the UN-masked init image (broadcast over the
    batch) and averaged over every element, exactly as the original does; so inside the mask the target is
    the init image too, but no gradient reaches those pixels because they are multiplied by 0.
    """
    masked_background = x_in * (1 - mask)
    target = init_image.expand_as(masked_background)
    return F.mse_loss(masked_background, target)


def _text_per_view(text_embed: torch.Tensor, batch_size: int, num_views: int) -> torch.Tensor:
    """Repeat the text embeddings to the augmentations' tile order [I1..IB, I1..IB, ...]."""
    if text_embed.dim() != 2:
        raise BlendedInputError(
            f"text embeddings must be [1,D] or [B,D], got shape {tuple(text_embed.shape)}; "
            "pass one embedding per prompt.")
    if text_embed.shape[0] == 1:
        return text_embed
    if text_embed.shape[0] != batch_size:
        raise BlendedInputError(
            f"{text_embed.shape[0]} text embeddings for a batch of {batch_size}; give one prompt for the whole "
            "batch or exactly one per sample.")
    return text_embed.repeat(num_views, 1)


def clip_guidance_loss(clip, x_in: torch.Tensor, mask: torch.Tensor, text_embed: torch.Tensor,
                       augment, batch_size: int | None = None) -> torch.Tensor:
    """The original's CLIP loss, a scalar: sum over the batch of the mean spherical distance over the views.

    Order as in ``image_editor.py``: mask in [-1,1] (outside becomes 0, i.e. grey), augment (which pools to
    CLIP's size), map to [0,1], CLIP-normalise, encode, distance, then ``dists[i::B].mean()`` summed over i.
    ``text_embed`` is [1,D] (one prompt for every sample) or [B,D] (a prompt per sample). Not multiplied by
    the CLIP lambda.
    """
    batch = x_in.shape[0] if batch_size is None else batch_size
    if batch != x_in.shape[0]:
        raise BlendedInputError(f"batch_size {batch} does not match the {x_in.shape[0]} images given.")
    views = augment(x_in * mask).add(1).div(2)
    num_views = views.shape[0] // batch
    image_embeds = clip.encode_image(clip.normalize(views)).float()
    text = _text_per_view(text_embed.float(), batch, num_views)
    dists = spherical_distance(image_embeds, text)
    loss = dists.new_zeros(())
    for i in range(batch):
        loss = loss + dists[i::batch].mean()
    return loss
