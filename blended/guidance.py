"""CLIP guidance: the loss whose gradient steers the masked region toward the prompt.

This is the original's ``cond_fn`` split in two: :class:`GuidanceObjective` holds what stays fixed during an
edit (text embeddings, mask, init image, weights, augmentations) and computes the loss of one guided
prediction; :func:`guidance_gradient` differentiates it w.r.t. x_t through the UNet. The sampler decides how
the gradient is applied (DDPM mean or DDIM score).

The CLIP loss composes weighted terms: one :class:`ClipTerm` per CLIP model (its weight, its views at its
own input size), each pulling every sample toward its :class:`TargetSet` (weighted text or image
embeddings; a negative weight pushes away). One CLIP with one target of weight 1 is the original's loss, and
the weights of 1 multiply exactly, so its numbers are unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from . import seeds
from .augment import AugmentationSettings, ImageAugmentations
from .errors import BlendedInputError
from .image_io import from_model_range
from .losses import background_l2, range_loss, spherical_distance
from .noise import ORIGINAL_GROUP_SIZE
from .schedule import GuidanceSchedule

log = logging.getLogger(__name__)


@dataclass
class GuidanceSettings:
    """Loss weights. Defaults are the original's (``optimization/arguments.py``)."""

    clip_lambda: float = 1000.0
    range_lambda: float = 50.0
    # Background preservation (the original's --background_preservation_loss): L2 weight 10000 there, but the
    # loss is off unless that flag is given, so 0 here. Meant for the "local" (no blending) baseline.
    background_l2_lambda: float = 0.0
    # LPIPS is used only when the optional ``lpips`` package and its weights are installed.
    background_lpips_lambda: float = 0.0
    augmentations: AugmentationSettings = field(default_factory=AugmentationSettings)
    # CLIP weight per step and gradient guard; None = constant weight, no guard (the original).
    schedule: Optional[GuidanceSchedule] = None

    def validate(self) -> None:
        """Refuse weights that would turn every result into NaN (or reward what the loss should punish) after
        the models have loaded; a linked value skips the node widgets' ranges."""
        for name in ("clip_lambda", "range_lambda", "background_l2_lambda", "background_lpips_lambda"):
            check_weight(getattr(self, name), name, negative_advice=(
                "to steer away from something, give a prompt part a negative weight ('blurry:-0.5')"
                if name == "clip_lambda" else "0 turns the loss off"))
        self.augmentations.validate()


def check_weight(value, name: str, negative_advice: Optional[str] = None) -> float:
    """``value`` as a float if it is a finite weight that float32 holds (and >= 0 unless ``negative_advice`` is
    None); otherwise a :class:`BlendedInputError` naming ``name``."""
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise BlendedInputError(f"{name} must be a number, got {value!r}.") from None
    if weight != weight:
        raise BlendedInputError(f"{name} is NaN (not a number): give it a number; if it comes from another node, "
                                "check that node (a division by zero?).")
    if abs(weight) > torch.finfo(torch.float32).max:
        raise BlendedInputError(f"{name} is too large ({weight}): in 32-bit floats it would be infinite (the limit "
                                "is about 3.4e38), and every result NaN. Give it a smaller value.")
    if negative_advice is not None and weight < 0:
        raise BlendedInputError(f"{name} must be >= 0, got {weight}: {negative_advice}.")
    return weight


@dataclass
class TargetSet:
    """K weighted CLIP targets per sample: ``embeds`` [N,K,D], ``weights`` [N,K], N = 1 (every sample) or B.

    Samples of one batch may have different numbers of targets: unused slots have weight 0.
    """

    embeds: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def single(cls, embeds: torch.Tensor) -> "TargetSet":
        """[N,D] embeddings, one target of weight 1 each: the original's one prompt."""
        if embeds.dim() != 2:
            raise BlendedInputError(f"text embeddings must be [1,D] or [B,D], got shape {tuple(embeds.shape)}; "
                                    "pass one embedding per prompt.")
        embeds = embeds.float()
        return cls(embeds.unsqueeze(1), torch.ones(embeds.shape[0], 1, device=embeds.device))


@dataclass
class ClipTerm:
    """One CLIP of the guidance: its targets, its weight and its views (None = the objective's settings)."""

    clip: object
    targets: TargetSet
    weight: float = 1.0
    augmentations: Optional[AugmentationSettings] = None


class GuidanceObjective:
    """The guidance loss of one edit.

    ``text_embeds`` is [1,D] (one prompt for every sample) or [B,D] (a prompt per sample); or give ``terms``
    (then ``clip`` and ``text_embeds`` may be None) for weighted targets and several CLIPs. ``mask`` is
    [1|B,1,S,S] with 1 = edit; ``init_image`` [1,3,S,S] in [-1,1] (used by the background losses).
    ``num_steps`` (steps the edit runs) places each step on a non-constant schedule. ``prompt_is_empty`` ([1]
    or [B] bools) marks samples whose prompt line is empty: their gradient is zero, as the original's.
    """

    def __init__(self, clip, text_embeds: Optional[torch.Tensor], mask: torch.Tensor, init_image: torch.Tensor,
                 settings: GuidanceSettings, seed: int = 0, lpips_model=None,
                 group_size: int = ORIGINAL_GROUP_SIZE, terms: Optional[Sequence[ClipTerm]] = None,
                 num_steps: Optional[int] = None, prompt_is_empty=None):
        if terms is None:
            terms = [ClipTerm(clip, TargetSet.single(text_embeds))]
        self.terms = list(terms)
        self.clip = self.terms[0].clip
        self.mask = mask
        self.init_image = init_image
        self.settings = settings
        self.seed = seed
        self.num_steps = num_steps
        self.augments = [ImageAugmentations(t.clip.image_size, t.augmentations or settings.augmentations)
                         for t in self.terms]
        self.lpips_model = lpips_model
        # The original's background L2 is a mean over its whole batch of ``group_size`` (4) results: each result
        # weighs lambda / group_size, whatever batch it is computed in here.
        self.group_size = max(1, int(group_size))
        # The original returns a zero gradient (no CLIP, no range loss) for an empty prompt; a per-sample flag
        # ([1] or [B] bools) keeps that rule when several prompts are mixed in one batch.
        self.prompt_is_empty = prompt_is_empty

    @property
    def prompt_is_empty(self):
        return self._prompt_is_empty

    @prompt_is_empty.setter
    def prompt_is_empty(self, flags) -> None:
        # Decided here, once per edit, so the step itself never reads a flag back from a tensor.
        flags = None if flags is None else torch.as_tensor(flags, dtype=torch.bool).cpu()
        self._prompt_is_empty = flags if flags is not None and bool(flags.any()) else None
        self._prompt_keep = {}

    def gradient_keep(self, like: torch.Tensor):
        """[B,1,1,1] 1/0 factors zeroing the gradient of empty-prompt samples, on ``like``'s device; None if none."""
        if self._prompt_is_empty is None:
            return None
        key = (like.device, like.dtype)
        if key not in self._prompt_keep:
            self._prompt_keep[key] = (~self._prompt_is_empty).to(like.dtype).to(like.device).view(-1, 1, 1, 1)
        return self._prompt_keep[key]

    @property
    def needs_gradient(self) -> bool:
        s = self.settings
        return any(w != 0 for w in (s.clip_lambda, s.range_lambda, s.background_l2_lambda,
                                    s.background_lpips_lambda))

    @staticmethod
    def _targets_for(targets: TargetSet, batch: int):
        embeds, weights = targets.embeds, targets.weights
        if embeds.dim() != 3 or weights.shape != embeds.shape[:2]:
            raise BlendedInputError(
                f"target embeddings must be [N,K,D] with weights [N,K], got {tuple(embeds.shape)} and "
                f"{tuple(weights.shape)}; pass one embedding per prompt (part).")
        if embeds.shape[0] == 1:
            return embeds.expand(batch, -1, -1), weights.expand(batch, -1)
        if embeds.shape[0] != batch:
            raise BlendedInputError(
                f"{embeds.shape[0]} text embeddings for a batch of {batch}; give one prompt for the whole "
                "batch or exactly one per sample.")
        return embeds, weights

    def _views(self, masked: torch.Tensor, result_ids, step: int, augment, stream=(), repeat: int = 0) -> torch.Tensor:
        """Augmented CLIP views of the whole batch, [V*B,3,s,s] in the original's view-major order.

        Each sample's warps come from its own stream (seed, augmentation, result id, step), so a result does
        not depend on the other results in its batch; all views are then warped in one batched call.
        ``augment`` and ``stream`` are the CLIP's (its size and views, its own random stream); a harmonising
        resampling ``repeat`` of the step gets fresh warps, as the original's global generator would give.
        """
        if augment.num_views <= 1:
            return augment(masked)
        generators = [seeds.generator_for(self.seed, seeds.STREAM_AUGMENTATION, rid, step, *stream,
                                          *seeds.repeat_key(repeat))
                      for rid in result_ids]
        return augment(masked, generators)

    def _term_distances(self, index: int, masked: torch.Tensor, result_ids, step: int,
                        repeat: int = 0) -> torch.Tensor:
        """One CLIP's weighted sum over its targets of the mean spherical distance over the views, [B]."""
        term, batch = self.terms[index], masked.shape[0]
        # the first CLIP keeps the original's augmentation stream; the others get their own
        views = self._views(masked, result_ids, step, self.augments[index], (index,) if index else (), repeat)
        num_views = views.shape[0] // batch  # view-major: view v of sample i at v*B+i
        clip_in = term.clip.normalize(from_model_range(views, clamp=False))
        image_embeds = term.clip.encode_image(clip_in).float()
        embeds, weights = self._targets_for(term.targets, batch)
        weights = weights.to(image_embeds.device)
        total = None
        for k in range(embeds.shape[1]):
            text = embeds[:, k].to(image_embeds.device).repeat(num_views, 1)
            dists = spherical_distance(image_embeds, text).view(num_views, batch).mean(dim=0) * weights[:, k]
            total = dists if total is None else total + dists
        return total if total is not None else image_embeds.new_zeros(batch)

    def clip_distances(self, x_in: torch.Tensor, result_ids, step: int, repeat: int = 0) -> torch.Tensor:
        """Per-sample CLIP loss before clip_lambda, [B]: the weighted sum of the CLIP terms' distances."""
        masked = x_in * self.mask
        total = None
        for index, term in enumerate(self.terms):
            if term.weight == 0:
                continue
            dists = self._term_distances(index, masked, result_ids, step, repeat) * term.weight
            total = dists if total is None else total + dists
        return total if total is not None else x_in.new_zeros(x_in.shape[0])

    def clip_weight(self, step: int) -> float:
        """clip_lambda at diffusion index ``step`` (counting down to 0), after the schedule."""
        schedule = self.settings.schedule
        if schedule is None or schedule.is_constant:
            return self.settings.clip_lambda
        if self.num_steps is None:
            raise ValueError("a non-constant guidance schedule needs the objective's num_steps")
        return self.settings.clip_lambda * schedule.factor(self.num_steps - 1 - int(step), self.num_steps)

    def loss(self, x_t: torch.Tensor, pred_xstart: torch.Tensor, fac: float, result_ids, step: int,
             repeat: int = 0):
        """The original's loss for x_in = pred_xstart*fac + x_t*(1-fac), summed over the batch.

        ``repeat`` > 0 for a harmonising resampling pass of the step (fresh augmentation draws)."""
        s = self.settings
        x_in = pred_xstart * fac + x_t * (1 - fac)
        total = x_t.new_zeros(())
        clip_lambda = self.clip_weight(step) if s.clip_lambda != 0 else 0.0
        if clip_lambda != 0:
            dists = self.clip_distances(x_in, result_ids, step, repeat)
            total = total + dists.sum() * clip_lambda
        if s.range_lambda != 0:
            total = total + range_loss(pred_xstart).sum() * s.range_lambda
        if s.background_l2_lambda != 0:
            l2 = background_l2(x_in, self.init_image, self.mask)
            total = total + l2.sum() * (s.background_l2_lambda / self.group_size)
        if s.background_lpips_lambda != 0 and self.lpips_model is not None:
            masked_background = x_in * (1 - self.mask)
            total = total + self.lpips_model(masked_background, self.init_image).sum() * s.background_lpips_lambda
        return total


def guidance_gradient(objective: GuidanceObjective, diffusion, model, x_t: torch.Tensor, index: int, result_ids,
                      model_kwargs=None, repeat: int = 0):
    """-d(loss)/d(x_t), through a grad-enabled UNet forward, plus that forward's p_mean_variance.

    ``index`` is the spaced step index, a Python int, so nothing is read back from the device. Returning the
    forward's outputs (detached) lets the sampler skip its own unguided forward: with dropout 0 the model is
    deterministic, so both forwards give the same prediction (the "reuse forward" fast path).
    """
    index = int(index)
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        out = diffusion.p_mean_variance(model, x, index, model_kwargs=model_kwargs, clip_denoised=False)
        fac = float(diffusion.sqrt_one_minus_alphas_cumprod[index])
        loss = objective.loss(x, out["pred_xstart"], fac, result_ids, index, repeat)
        if loss.requires_grad:
            grad = -torch.autograd.grad(loss, x)[0]
        else:
            grad = torch.zeros_like(x)
    if objective.settings.schedule is not None:
        grad = objective.settings.schedule.guard_gradient(grad)
    keep = objective.gradient_keep(grad)
    if keep is not None:
        grad = grad * keep
    detached = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in out.items()}
    return grad.float(), detached
