"""The Blended Diffusion sampler: image + mask + prompt in, edited images out.

Read top to bottom, :func:`edit_image` is the whole data path:

1. the image and mask arrive as ComfyUI-style tensors (IMAGE [B,H,W,C] 0..1, MASK [B,H,W]) of any size;
2. a crop plan picks the part of the image the model sees (the whole image squashed to the model's square
   size, as the original; or a square context crop around the mask, keeping the aspect ratio);
3. :func:`sample_results` runs the guided, blended diffusion for a batch of results at model resolution:
   the init image is noised to the start step; at every step the UNet predicts x0, CLIP guidance turns the
   loss of the masked prediction into a gradient w.r.t. x_t, the gradient shifts the DDPM mean (or the DDIM
   score), and the noised original is blended back outside the mask;
4. the last x0 prediction is pasted back at full resolution and composited with the untouched original
   outside the mask, so background pixels are bit-identical to the input.

Faithful defaults follow the original code (omriav/blended-diffusion); improvements are named options.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from . import colour_match, image_io, mask_morphology, regions, resampling, seeds, soft_mask, targets
from .devices import made_current, to_device
from .diffusion import GaussianDiffusion, create_diffusion
from .errors import BlendedInputError
from .frames import frames_to_image_batch
from .guidance import ClipTerm, GuidanceObjective, GuidanceSettings, guidance_gradient
from .noise import ORIGINAL_GROUP_SIZE, NoiseSource, SeededNoise
from .prompts import as_weighted

log = logging.getLogger(__name__)

# callback(step_done, total_steps, pred_xstart [k,3,S,S] in [-1,1]); it may raise to cancel.
StepCallback = Callable[[int, int, torch.Tensor], None]
# on_step(spaced index, the step's tensors as guided_step returns them): a trace of the loop, for inspection.
StepTrace = Callable[[int, dict], None]


DIVERGED_MESSAGE = ("the edit diverged: its results hold NaN or infinite values, which would show as black. The "
                    "guidance is too strong for this model: lower clip_lambda, the prompt weights or the Guidance "
                    "Schedule's values, or turn on the schedule's gradient clamp.")


@dataclass
class SamplerSettings:
    """How to sample. Defaults reproduce the original's command-line defaults."""

    skip_timesteps: int = 25           # spaced steps skipped: 75 of 100 steps run, from t=74
    method: str = "ddpm"                # "ddpm" (guided mean, the default) or "ddim" (guided score)
    ddim_eta: float = 0.0
    mode: str = "blended"               # "blended" (Algorithm 2) or "local" (local CLIP-guided baseline)
    enforce_background: bool = True     # hard-composite the original outside the mask at the end
    # The original blends the background noised to the CURRENT step t after producing x_{t-1} (one step too
    # noisy). "previous" noises it to t-1 instead (clean at the last step).
    background_noise_step: str = "current"
    # Fast path: reuse the grad-enabled UNet forward for the mean/variance instead of running a second,
    # identical forward without grad (saves a third of the UNet work; same numbers in float32).
    reuse_guided_forward: bool = False
    batch_size: int = 4                 # results denoised together (memory vs speed)
    # The original's batch (its --batch_size, 4): results 0-3, 4-7, ... of an input share one background noise
    # per step, and the background L2 weighs each result by lambda / group_size, as the original's batch mean.
    # Grouping goes by result index, so nothing depends on batch_size.
    group_size: int = ORIGINAL_GROUP_SIZE
    capture_every: int = 0              # keep pred_xstart every N steps as process frames (0 = off)
    # Where the model looks: "full" = the whole image squashed to the model size (the original);
    # "mask_crop" = a square context crop around the mask, aspect ratio kept, pasted back at full resolution.
    region: str = "full"
    context: float = 0.25               # mask_crop: margin around the mask's bounding box, fraction of its size
    grow_mask: int = 0                  # pixels to grow the final composite mask by (soft seams; 0 = off)
    feather: int = 0                    # pixels of feathering of the final composite mask (0 = hard, original)
    # Colour match at paste-back (blended.colour_match): "off" (original), "rgb" or "lab".
    colour_match: str = "off"
    # Grey mask values as a per-step schedule (blended.soft_mask, Differential Diffusion); off = binary (original).
    soft_mask: bool = False
    # Harmonising resampling (blended.resampling, RePaint): every chunk of resample_jump_length steps is
    # re-noised and denoised again resample_count extra times (0 = off, the original).
    resample_count: int = 0
    resample_jump_length: int = 5


@dataclass
class EditResult:
    images: torch.Tensor                 # [N,H,W,3] 0..1, N = inputs x prompts x results
    mask: torch.Tensor                   # [N,H,W] the composite mask used
    frames: Optional[torch.Tensor] = None   # [F,S,S,3] 0..1 process frames (pred_xstart), result-major
    prompts: list = field(default_factory=list)  # prompt of each output image


def diffusion_for(unet, timestep_respacing: str = "100") -> GaussianDiffusion:
    """The respaced diffusion a loaded UNet samples with: its own training schedule (the loader's
    ``noise_schedule``, from config.json; linear 1000 steps without one) and its variance kind."""
    return create_diffusion(timestep_respacing=timestep_respacing, learn_sigma=unet.config.learn_sigma,
                            schedule=getattr(unet, "noise_schedule", None))


def check_settings(settings: SamplerSettings, diffusion, num_results: int = 1) -> None:
    """Refuse settings that cannot run, with what to change: before any model work (the node calls it before
    loading the models), and again by ``edit_image``."""
    if num_results < 1:
        raise BlendedInputError("num_results must be at least 1")
    if settings.method not in ("ddpm", "ddim"):
        raise BlendedInputError(f"unknown method {settings.method!r}: use 'ddpm' or 'ddim'")
    if settings.mode not in ("blended", "local"):
        raise BlendedInputError(f"unknown mode {settings.mode!r}: use 'blended' or 'local'")
    if settings.background_noise_step not in ("current", "previous"):
        raise BlendedInputError("background_noise_step must be 'current' (original) or 'previous'")
    if not 0 <= settings.skip_timesteps < diffusion.num_timesteps:
        raise BlendedInputError(
            f"skip_timesteps={settings.skip_timesteps} but the schedule has {diffusion.num_timesteps} steps: "
            f"skip fewer steps than there are (at most {diffusion.num_timesteps - 1}), or respace to more steps")
    if int(settings.group_size) != settings.group_size or settings.group_size < 1:
        raise BlendedInputError(f"group_size must be a whole number >= 1 (the original's 4), got {settings.group_size}")
    if settings.batch_size < 0:  # a linked value can go below the widget's 0 (auto)
        raise BlendedInputError(f"batch_size must be 0 (auto: as many results as fit) or more, got "
                                f"{settings.batch_size}")
    if settings.capture_every < 0:
        raise BlendedInputError(f"capture_every must be 0 (no frames) or more (a frame every so many steps), got "
                                f"{settings.capture_every}")
    if settings.region not in ("full", "mask_crop"):
        raise BlendedInputError(f"unknown region {settings.region!r}: use 'full' or 'mask_crop'")
    resampling.validate(settings.resample_jump_length, settings.resample_count)
    if not 0.0 <= settings.ddim_eta <= 1.0:  # NaN fails too
        raise BlendedInputError(f"ddim_eta must be between 0 (deterministic, the original) and 1 (as much noise as "
                                f"DDPM), got {settings.ddim_eta}")
    if settings.colour_match not in colour_match.SPACES:
        raise BlendedInputError(f"unknown colour_match {settings.colour_match!r}: use one of "
                                f"{', '.join(colour_match.SPACES)}")


def composite_mask(mask: torch.Tensor, settings: SamplerSettings) -> torch.Tensor:
    """One item's final composite mask ``[1,1,H,W]``: where the user's mask is above 0, grown (or, negative, shrunk)
    and feathered as set. It decides which pixels of the result come from the edit."""
    composite = (mask > 0).float()
    if settings.grow_mask or settings.feather:
        composite = mask_morphology.grown_and_feathered(composite, settings.grow_mask, settings.feather)
    return composite


def check_composite_masks(masks: torch.Tensor, settings: SamplerSettings) -> None:
    """Refuse a negative grow_mask that shrinks some item's composite away entirely: that input would come back
    unchanged, as if edited, without a word. ``masks`` as :func:`~blended.image_io.prepare_edit_masks` gives them
    (each item edits somewhere); only a shrink can empty one. Cheap enough to run before any model is loaded."""
    if settings.grow_mask >= 0:
        return
    gone = [item for item in range(masks.shape[0])
            if not bool((composite_mask(masks[item:item + 1], settings) > 0).any())]
    if gone:
        where = f" (in batch item(s) {gone[:8]})" if masks.shape[0] > 1 else ""
        raise BlendedInputError(
            f"grow_mask {settings.grow_mask} shrinks the mask away entirely{where}: nothing would be edited. Shrink "
            "it less (a grow_mask closer to 0) or paint a larger region.")


def guided_step(unet, diffusion, objective: Optional[GuidanceObjective], x: torch.Tensor, index: int,
                init_image: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor, background_noise: torch.Tensor,
                settings: SamplerSettings, result_ids: Sequence[int], model_kwargs=None, repeat: int = 0) -> dict:
    """One step from x_t (spaced index ``index``) to x_{t-1}, guided and blended, as the original.

    ``repeat`` > 0 for a harmonising resampling pass of the step: its CLIP views are drawn afresh.

    Returns the step's tensors (``sample`` is the next x, already blended) so tests can compare each against
    the reference computed by the original code.
    """
    # The step index stays a Python int: the diffusion gathers its coefficients from float32 copies of its
    # tables kept on the device, and nothing in the step reads a value back from the device.
    t = int(index)
    guided = objective is not None and objective.needs_gradient
    grad = None
    if guided and settings.reuse_guided_forward:
        grad, out = guidance_gradient(objective, diffusion, unet, x, t, result_ids, model_kwargs, repeat)
    else:
        with torch.no_grad():
            out = diffusion.p_mean_variance(unet, x, t, model_kwargs=model_kwargs, clip_denoised=False)
        if guided:
            grad, _ = guidance_gradient(objective, diffusion, unet, x, t, result_ids, model_kwargs, repeat)

    with torch.no_grad():
        if settings.method == "ddpm":
            mean = diffusion.condition_mean(out, grad) if grad is not None else out["mean"]
            sample = diffusion.ddpm_step(out, t, noise, mean=mean)
        else:
            if grad is not None:
                out = diffusion.condition_score(out, x, t, grad)
            mean = out["mean"]
            sample = diffusion.ddim_step(out, x, t, settings.ddim_eta, noise)

        blended = sample
        if settings.mode == "blended":
            if settings.background_noise_step == "current":
                background = diffusion.q_sample(init_image, t, noise=background_noise)
            elif index > 0:
                background = diffusion.q_sample(init_image, t - 1, noise=background_noise)
            else:
                background = init_image
            background = background.expand(x.shape[0], -1, -1, -1)
            blended = sample * mask + background * (1 - mask)
    return {"grad": grad, "guided_mean": mean, "sample": sample, "blended": blended,
            "pred_xstart": out["pred_xstart"]}


def sample_results(unet, diffusion, objective: Optional[GuidanceObjective], init_image: torch.Tensor,
                   mask: torch.Tensor, result_ids: Sequence[int], seed: int, settings: SamplerSettings,
                   callback: Optional[StepCallback] = None, num_classes: Optional[int] = None,
                   noise_source: Optional[NoiseSource] = None, on_step: Optional[StepTrace] = None):
    """Denoise len(result_ids) results of one init image at model resolution: the original's
    ``p_sample_loop_progressive`` with its blending ``postprocess_fn``.

    ``init_image`` [1,3,S,S] in [-1,1]; ``mask`` [1,1,S,S] (1 = edit; grey levels with ``settings.soft_mask``,
    then each step blends with that step's binary mask). Every random draw comes from ``noise_source``
    (default: :class:`~blended.noise.SeededNoise` of ``seed``, grouped by ``settings.group_size``).
    ``on_step`` sees each step's tensors. Returns (pred_xstart of the last step
    [k,3,S,S], captured frames as a list of [k,3,S,S] CPU tensors).
    """
    device = init_image.device
    k = len(result_ids)
    shape = (k,) + tuple(init_image.shape[1:])
    indices = list(range(diffusion.num_timesteps - settings.skip_timesteps))[::-1]
    noise = noise_source if noise_source is not None else SeededNoise(seed, device, settings.group_size)

    x = diffusion.q_sample(init_image.expand(k, -1, -1, -1), indices[0],
                           noise=to_device(noise.initial(indices[0], shape, result_ids), device))
    frames = []
    pred_xstart = None
    planned = resampling.plan(indices, settings.resample_jump_length, settings.resample_count)
    for n, step in enumerate(planned):
        index = step.index
        if step.jump_from is not None:
            x = resampling.jump_back(diffusion, x, step.jump_from, index,
                                     to_device(noise.resample(index, shape, result_ids, step.repeat), device))
        # Resampled steps draw fresh noise, classes and CLIP views (the original's global generator would).
        repeat = {"repeat": step.repeat} if step.repeat else {}
        model_kwargs = None
        if num_classes:
            model_kwargs = {"y": to_device(noise.labels(index, result_ids, num_classes, **repeat), device)}
        step_noise = to_device(noise.step(index, shape, result_ids, **repeat), device)
        background_noise = to_device(noise.background(index, shape, result_ids, **repeat), device)
        position = len(indices) - 1 - index  # of this step in the run (resampled steps keep theirs)
        blend_mask = soft_mask.step_mask(mask, position, len(indices)) if settings.soft_mask else mask
        out = guided_step(unet, diffusion, objective, x, index, init_image, blend_mask, step_noise,
                          background_noise, settings, result_ids, model_kwargs, step.repeat)
        x = out["blended"]
        pred_xstart = out["pred_xstart"]
        if on_step is not None:
            on_step(index, out)
        last = n == len(planned) - 1
        if settings.capture_every and (n % settings.capture_every == 0 or last):
            frames.append(pred_xstart.detach().float().cpu())
        if callback is not None:
            callback(n + 1, len(planned), pred_xstart)
    return pred_xstart, frames


def _progress_from(callback: Optional[StepCallback], steps_before: int, total_steps: int):
    """A chunk's step callback that reports to ``callback`` in steps of the whole edit."""
    if callback is None:
        return None
    return lambda done, _total, pred: callback(steps_before + done, total_steps, pred)


def edit_image(image: torch.Tensor, mask: Optional[torch.Tensor], unet, diffusion, clip,
               prompts: Sequence, seed: int, num_results: int = 1,
               settings: Optional[SamplerSettings] = None, guidance_settings=None, invert_mask: bool = False,
               callback: Optional[StepCallback] = None, device=None, lpips_model=None,
               noise_source: Optional[NoiseSource] = None,
               extra_clips: Sequence[targets.GuidanceClip] = (),
               image_targets: Sequence[targets.ImageTarget] = ()) -> EditResult:
    """Edit ``image`` where ``mask`` is 1, steering toward each prompt; ``num_results`` per prompt and input.

    ``image`` IMAGE [B,H,W,C] 0..1; ``mask`` MASK [B|1,H,W] or None (edit everything, as the original
    without --mask). Every output keeps the input's size. ``noise_source`` replaces the seeded random draws
    (see :mod:`blended.noise`); result r of input b has the result id ``seeds.result_id(b, r)``. A prompt is a
    string (taken literally) or a :class:`~blended.prompts.WeightedPrompt`; ``image_targets`` join every
    prompt's targets; ``extra_clips`` guide alongside ``clip`` (weight 1), each at its own input size.
    """
    settings = settings or SamplerSettings()
    guidance_settings = guidance_settings or GuidanceSettings()
    check_settings(settings, diffusion, num_results)
    prompts = [as_weighted(p) for p in (list(prompts) or [""])]
    device = torch.device(device) if device is not None else next(unet.parameters()).device
    model_size = unet.config.image_size
    num_classes = unet.config.num_classes

    # 1. ComfyUI tensors -> NCHW on the host, where the crops are planned and the results pasted back (ComfyUI's
    #    --gpu-only keeps IMAGEs on the GPU), the mask at the image's size and batch (1 = edit).
    images = image_io.to_rgb_nchw(image.cpu())
    _, _, height, width = images.shape
    images, masks = image_io.prepare_edit_masks(images, None if mask is None else mask.cpu(), invert_mask)
    check_composite_masks(masks, settings)
    batch = images.shape[0]

    # CUDA's current device is where Triton launches its kernels and CUDA graphs capture: the model's, which
    # a setup that runs the pack on a second GPU need not have made current.
    with made_current(device):
        # Per CLIP: its augmentations, and each prompt line's targets in its own embedding space.
        members = [targets.GuidanceClip(clip, 1.0, None)] + list(extra_clips)
        member_targets = []
        for member in members:
            pictures = targets.image_target_embeddings(member.clip, image_targets, device)
            member_targets.append([targets.line_targets(member.clip, p, pictures, device) for p in prompts])
        line_is_empty = [line.is_empty for line in member_targets[0]]
        num_steps = diffusion.num_timesteps - settings.skip_timesteps
        # The runs of one input: (prompt line, result index) pairs, ``batch_size`` at a time.
        per_prompt = [(p_idx, r) for p_idx in range(len(prompts)) for r in range(num_results)]
        size = max(1, settings.batch_size)
        chunks = [per_prompt[start:start + size] for start in range(0, len(per_prompt), size)]
        run_steps = resampling.total_steps(num_steps,
                                           settings.resample_jump_length, settings.resample_count)
        total_steps = run_steps * batch * len(chunks)
        steps_done = 0

        # The outputs, filled in place: N full-resolution results are the run's largest tensors on the host.
        per_input = len(per_prompt)
        output_images = torch.empty(batch * per_input, height, width, images.shape[1])
        output_masks = torch.empty(batch * per_input, height, width)
        frames, output_prompts = [], []
        enforce = settings.enforce_background and settings.mode == "blended"
        for b in range(batch):
            # 2. The final composite mask (the user's, optionally grown and feathered) and what the model sees:
            #    a square crop covering it, at model resolution, in [-1,1]. The model edits the user's mask.
            composite = composite_mask(masks[b:b + 1], settings)
            if settings.region == "full":
                plan = regions.plan_full_image(height, width, model_size)
            else:
                plan = regions.plan_mask_crop(composite[0, 0], model_size, context=settings.context)
            init = image_io.to_model_range(regions.crop_image(images[b:b + 1], plan).to(device))
            model_mask = regions.crop_mask(masks[b:b + 1], plan).to(device)
            if not bool((model_mask > 0).any()):
                raise BlendedInputError("the mask vanishes at the model's resolution: paint a larger region or use "
                                        "region 'mask_crop'")

            blend_mask = model_mask
            if settings.soft_mask:
                blend_mask = soft_mask.model_soft_mask(masks[b:b + 1], plan, model_mask).to(device)

            # 3. Guided, blended diffusion, a batch of results at a time.
            edited = []
            for chunk in chunks:
                result_ids = [seeds.result_id(b, r) for _, r in chunk]  # same noise for result r of every prompt
                terms = [ClipTerm(member.clip, targets.stack_targets([lines[p] for p, _ in chunk]), member.weight,
                                  targets.member_augmentations(member, guidance_settings.augmentations))
                         for member, lines in zip(members, member_targets, strict=True)]
                objective = GuidanceObjective(None, None, model_mask, init, guidance_settings, seed=seed,
                                              lpips_model=lpips_model, group_size=settings.group_size, terms=terms,
                                              num_steps=num_steps,
                                              prompt_is_empty=[line_is_empty[p] for p, _ in chunk])

                pred, chunk_frames = sample_results(unet, diffusion, objective, init, blend_mask, result_ids, seed,
                                                    settings, _progress_from(callback, steps_done, total_steps),
                                                    num_classes, noise_source)
                steps_done += run_steps
                edited.append(pred.detach().float().cpu())
                if not bool(torch.isfinite(edited[-1]).all()):  # on the host already: no wait for the device
                    raise BlendedInputError(DIVERGED_MESSAGE)
                if chunk_frames:
                    frames.append(frames_to_image_batch(chunk_frames))  # result-major [k*T,S,S,3]
                output_prompts.extend(prompts[p].source for p, _ in chunk)
            edited = image_io.from_model_range(torch.cat(edited))
            if settings.colour_match != "off":
                edited = colour_match.match_border(edited, image_io.from_model_range(init.detach().float().cpu()),
                                                   model_mask.cpu(), space=settings.colour_match)

            # 4. Back at full resolution: outside the composite mask, the input's own pixels (bit-identical).
            if not enforce:
                composite = regions.box_mask(plan)
            results = slice(b * per_input, (b + 1) * per_input)
            regions.paste_back(images[b:b + 1], edited, plan, composite, out=output_images[results].movedim(-1, 1))
            output_masks[results] = composite[:, 0]

    result = EditResult(images=output_images, mask=output_masks, prompts=output_prompts)
    if frames:
        result.frames = torch.cat(frames)
    return result
