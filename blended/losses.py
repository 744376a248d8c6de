"""The original's loss terms (``optimization/losses.py`` and ``image_editor.py``), as plain functions.

They are kept separate from the guidance code so that each term can be checked against its formula alone,
and so that the ranking code measures results with exactly the distance the guidance minimised. The CLIP
term itself, views and all, is ``guidance.GuidanceObjective.clip_distances``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def spherical_distance(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Squared great-circle distance / 2 between L2-normalised embeddings, [N].

    The original uses this rather than the cosine distance the paper describes; its gradient does not vanish
    as the embeddings get close, which is why guidance keeps pulling. Inputs broadcast along the first axis
    ([N,D] with [1,D] or [N,D]).
    """
    x = F.normalize(image_embeds, dim=-1)
    y = F.normalize(text_embeds, dim=-1)
    return (x - y).norm(dim=-1).div(2).arcsin().pow(2).mul(2)


def range_loss(x: torch.Tensor) -> torch.Tensor:
    """Mean squared excess outside [-1,1] per sample, [B]; keeps pred_xstart from drifting out of range."""
    return (x - x.clamp(-1, 1)).pow(2).mean(dim=[1, 2, 3])


def background_l2(x_in: torch.Tensor, init_image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The original's background-preservation MSE of each sample, [B].

    The masked background ``x_in*(1-mask)`` is compared with the UN-masked init image (broadcast over the
    batch) and averaged over each sample's elements; so inside the mask the target is the init image too, but
    no gradient reaches those pixels because they are multiplied by 0. The original's
    ``mse_loss(x_in*(1-mask), init)`` is the mean of these over its batch of B: ``background_l2(...).sum() / B``.
    """
    masked_background = x_in * (1 - mask)
    target = init_image.expand_as(masked_background)
    return F.mse_loss(masked_background, target, reduction="none").flatten(1).mean(dim=1)
