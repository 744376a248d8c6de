"""The Blended Diffusion Sampler node: a thin adapter from ComfyUI's types to ``blended.sampler``."""

from __future__ import annotations

import contextlib
import dataclasses
import logging

from ..blended import fast_paths, image_io
from ..blended.colour_match import SPACES as COLOUR_MATCH
from ..blended.devices import raised_in_triton
from ..blended.errors import BlendedInputError
from ..blended.lpips_loss import load_lpips
from ..blended.memory import GIB, auto_batch_size, guiding_clips, per_result_bytes, run_with_smaller_batches
from ..blended.sampler import SamplerSettings, check_composite_masks, check_settings, diffusion_for, edit_image
from ..blended.targets import GuidanceClip, ImageTarget
from . import comfy_bridge as bridge
from .speed import DEFAULT_SPEED, default_speed_options, default_without_triton_kernels, for_clip

log = logging.getLogger(__name__)

SETTING_NAMES = frozenset(f.name for f in dataclasses.fields(SamplerSettings))


class BlendedDiffusionSampler:
    DESCRIPTION = ("Text-driven local editing (Blended Diffusion, CVPR 2022): regenerates the masked region "
                   "(mask = 1) of the image with the guided-diffusion model, steered by CLIP toward the prompt, "
                   "while the noised original is blended back outside the mask at every step. Returns "
                   "num_results edits per prompt at the input's size; with enforce_background on (blended mode), "
                   "pixels outside the mask (after grow/feather) are the input's, unchanged. "
                   "Rank them with CLIP Rank. The defaults reproduce the original code, but for speed: without a "
                   f"Speed node the sampler runs {DEFAULT_SPEED}. A Speed node left at its defaults gives the "
                   "original's numerics on the GPU too.")
    CATEGORY = "BlendedDiffusion"
    RETURN_TYPES = ("IMAGE", "MASK", "IMAGE")
    RETURN_NAMES = ("images", "mask", "frames")
    OUTPUT_TOOLTIPS = ("The edited images, num_results per prompt, at the input's size: input by input, then "
                       "prompt by prompt, then result by result.",
                       "The mask the final composite used (after invert/grow/feather); with enforce_background "
                       "off or mode local, the pasted box (all ones for region full).",
                       "The process: the model's x0 prediction every capture_every steps and at the last, at "
                       "model resolution, all frames of one result together (feed SaveAnimatedWEBP). The final "
                       "images when capture_every is 0.")
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        d = SamplerSettings()
        return {
            "required": {
                "model": ("GUIDED_DIFFUSION_MODEL", {"tooltip": "From Load Guided Diffusion Model."}),
                "guidance": ("CLIP_GUIDANCE", {"tooltip": "From CLIP Guidance: prompt(s) and weights."}),
                "image": ("IMAGE", {"tooltip": "The image(s) to edit, any size."}),
                "mask": ("MASK", {"tooltip": "Where to edit: 1 (white / painted) = regenerate, 0 = keep. "
                                             "Resized to the image if sizes differ."}),
                "seed": ("INT", {"default": 404, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Random seed. Result i of an input image depends only on the seed, i and "
                                            "the image's place in the IMAGE batch, not on how many results are "
                                            "made or how they are batched."}),
                "num_results": ("INT", {"default": 4, "min": 1, "max": 256, "tooltip":
                                "Edits per prompt and input image (the original makes 32 and ranks them; "
                                "its authors recommend 64)."}),
                "respacing": ("STRING", {"default": "100", "tooltip":
                              "Timestep respacing of the model's training schedule (1000 steps for the released "
                              "models): '100' (original), '50', "
                              "'ddim50', or sections like '10,15,20'."}),
                "skip_timesteps": ("INT", {"default": d.skip_timesteps, "min": 0, "max": 999, "tooltip":
                                   "Spaced steps skipped at the start: more = closer to the original image "
                                   "(original: 25 of 100; paper: 33 for backgrounds, 40 for scribbles)."}),
                "method": (["ddpm", "ddim"], {"default": d.method, "tooltip":
                           "ddpm: guidance shifts the posterior mean (original default). ddim: guidance "
                           "shifts the score, deterministic steps (better below ~50 steps)."}),
                "mode": (["blended", "local"], {"default": d.mode, "tooltip":
                         "blended: Blended Diffusion. local: the paper's 'local CLIP-guided diffusion' "
                         "baseline, no blending (pair it with a background L2 loss)."}),
                "enforce_background": ("BOOLEAN", {"default": d.enforce_background, "tooltip":
                                       "Paste the untouched original outside the mask at the end (original: on; "
                                       "blended mode only)."}),
                "invert_mask": ("BOOLEAN", {"default": False, "tooltip":
                                "Edit where the mask is 0 instead (e.g. background replacement)."}),
                "batch_size": ("INT", {"default": d.batch_size, "min": 0, "max": 256, "tooltip":
                               "Results denoised together. Lower it if you run out of memory; results do not "
                               "depend on it (beyond float rounding). 0 = auto: as many as fit in the memory that is "
                               "free once the models are loaded, started again at about half that batch if it "
                               "still runs out."}),
            },
            "optional": {
                "region": (["full", "mask_crop"], {"default": d.region, "tooltip":
                           "full: the whole image squashed to the model's square size (original). mask_crop: a "
                           "square crop around the mask at model resolution, aspect kept, pasted back at full "
                           "resolution: far more detail on big photos."}),
                "context": ("FLOAT", {"default": d.context, "min": 0.0, "max": 4.0, "step": 0.05, "tooltip":
                            "mask_crop: margin around the mask's bounding box, as a fraction of its size."}),
                "grow_mask": ("INT", {"default": d.grow_mask, "min": 0, "max": 512, "tooltip":
                              "Grow the final composite mask by this many pixels (0 = original hard mask)."}),
                "feather": ("INT", {"default": d.feather, "min": 0, "max": 512, "tooltip":
                            "Soften the final composite's edge over this many pixels (0 = hard edge)."}),
                "resample_count": ("INT", {"default": d.resample_count, "min": 0, "max": 20, "tooltip":
                                   "Harmonising resampling (RePaint): after every resample_jump_length steps, add "
                                   "their noise back and denoise them again this many extra times, so the edit and "
                                   "the background agree at the border. 0 = off (original). Costs "
                                   "resample_count x the steps on top; the progress bar counts them."}),
                "resample_jump_length": ("INT", {"default": d.resample_jump_length, "min": 1, "max": 250,
                                         "tooltip": "Resampling: steps per chunk that is jumped back over and "
                                                    "redone (RePaint's jump length; used when resample_count > 0)."}),
                "soft_mask": ("BOOLEAN", {"default": d.soft_mask, "tooltip":
                              "Grey mask values as a schedule (Differential Diffusion): a pixel of value m "
                              "is edited only during the last m of the steps, so feathered or painted grey "
                              "masks fade the edit out. Off = binary mask, any value > 0 edits (original)."}),
                "colour_match": (list(COLOUR_MATCH), {"default": d.colour_match, "tooltip":
                                 "Before pasting back, shift the edit's colours so the pixels just inside the "
                                 "mask border have the original's per-channel mean and spread there: removes a "
                                 "tinted outline. off = the original; rgb or lab = the colour space it works in."}),
                "background_noise_step": (["current", "previous"], {"default": d.background_noise_step,
                                          "tooltip": "Noise level of the blended-in background: 'current' step "
                                                     "(original, one step too noisy) or the 'previous' "
                                                     "(corrected) one."}),
                "capture_every": ("INT", {"default": d.capture_every, "min": 0, "max": 1000, "tooltip":
                                  "Keep the model's prediction every N steps as the frames output (0 = off)."}),
                "ddim_eta": ("FLOAT", {"default": d.ddim_eta, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                             "DDIM noise (0 = deterministic, as the original)."}),
                "speed": ("FAST_PATH_OPTIONS", {"tooltip":
                          "From the Speed node: its speed and memory options, for this run only. Unconnected = "
                          f"{DEFAULT_SPEED}."}),
                "preview": ("BOOLEAN", {"default": True, "tooltip": "Show the prediction in the progress bar."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def sample(self, model, guidance, image, mask, seed, num_results, respacing, invert_mask, speed=None,
               preview=True, unique_id=None, **widgets):
        # The other widgets are named like SamplerSettings' fields; absent ones take the dataclass's defaults.
        unknown = set(widgets) - SETTING_NAMES
        if unknown:
            raise TypeError(f"unexpected sampler inputs {sorted(unknown)}")
        try:
            # The model's own training schedule (config.json's noise_schedule), respaced as asked.
            diffusion = diffusion_for(model.unet, str(respacing).strip())
        except BlendedInputError:
            raise  # says what is wrong with it and what to write instead
        except (ValueError, KeyError) as exc:
            raise BlendedInputError(f"respacing {respacing!r} is not valid: use a step count like '100', 'ddim50' "
                                    f"or sections like '10,15,20' ({exc})") from exc
        # What the widgets and the mask alone can refuse is refused before the models are loaded and copied.
        settings = SamplerSettings(**widgets)
        check_settings(settings, diffusion, num_results)
        image_io.to_rgb_nchw(image)  # its channels, dtype and finite values; the edit converts it again
        image_io.check_edit_mask(image, mask, invert_mask)
        _check_shrunk_mask(image, mask, invert_mask, settings)
        run = dict(model=model, guidance=guidance, diffusion=diffusion, image=image, mask=mask, seed=seed,
                   num_results=num_results, invert_mask=invert_mask, widgets=widgets,
                   callback=bridge.progress_callback(node_id=unique_id, preview=preview))
        options = for_clip(speed if speed is not None else default_speed_options(), guidance.clip.clip)
        fallback = None
        try:
            result = _edit(options, **run)
        except Exception as exc:
            # An OOM is re-raised as it is (ComfyUI frees its models as for any OOM; blended.memory's retry has
            # put the advice in its text), and ComfyUI's interrupt (an Exception in older releases, a
            # BaseException in newer ones) passes through unchanged.
            # A failure inside Triton with the Triton kernels on means a GPU or Triton release they cannot be
            # compiled for. Asked for on a Speed node, it becomes an input error that names the option to turn
            # off; chosen by the pack's own default, the run starts again with PyTorch's kernels.
            if (bridge.is_out_of_memory(exc)
                    or not ((options.triton_norm or options.triton_clip) and raised_in_triton(exc))):
                raise
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]
            if speed is not None:
                raise BlendedInputError(
                    f"the pack's Triton kernels failed on this GPU ({type(exc).__name__}: {first_line}). Turn "
                    "triton_kernels off on the Speed node: the usual kernels give the same results within "
                    "rounding.") from exc
            log.warning("Blended Diffusion: the pack's Triton kernels failed on this GPU (%s: %s); running again "
                        "with PyTorch's own kernels, as every run without a Speed node will until ComfyUI "
                        "restarts. The results are the same within rounding.", type(exc).__name__, first_line)
            fallback = default_without_triton_kernels(model.patcher.load_device, first_line)
        if fallback is not None:
            # Outside the except block, so the failed run's traceback (and the activations its frames hold) is
            # freed before the second run allocates its own.
            bridge.release_failed_attempt()
            result = _edit(for_clip(fallback, guidance.clip.clip), **run)
        frames = result.frames if result.frames is not None else result.images
        return (bridge.to_output(result.images), bridge.to_output(result.mask), bridge.to_output(frames))


def _check_shrunk_mask(image, mask, invert_mask: bool, settings: SamplerSettings) -> None:
    """The edit's refusal of a negative grow_mask (a linked value: the widget stops at 0) that shrinks some item's
    composite away, made before the models load, on the masks at the image's size as the edit makes them."""
    if settings.grow_mask >= 0:
        return
    images = image_io.to_rgb_nchw(image.cpu())
    _, masks = image_io.prepare_edit_masks(images, None if mask is None else mask.cpu(), invert_mask)
    check_composite_masks(masks, settings)


def _edit(options: fast_paths.FastPathOptions, *, model, guidance, diffusion, image, mask, seed, num_results,
          invert_mask, widgets, callback):
    """One edit with ``options``: the models loaded for it and cloned with the options applied, the batch size
    chosen if it is auto, the inputs cloned out of ComfyUI's inference mode. Every choice that depends on the
    options is made here, so a run started again with other options makes them afresh."""
    settings = fast_paths.sampler_settings_with(SamplerSettings(**widgets), options)
    guidance_settings = fast_paths.guidance_settings_with(guidance.settings, options)
    batch_size = settings.batch_size
    num_prompts = len(guidance.prompts)
    extra = list(guidance.extra_clips)
    # What a batch adds beyond the weights, for ComfyUI to free before loading (the auto batch counts on 1): every
    # guiding CLIP on its views, in its precision and options, and LPIPS where it is on. The Triton kernels keep
    # less, but only where they run (CUDA); elsewhere their options run plain torch, and are counted so.
    counted = options if model.patcher.load_device.type == "cuda" else dataclasses.replace(
        options, triton_norm=False, triton_clip=False)
    clips = guiding_clips(guidance.clip.clip, guidance.settings.augmentations.num_views,
                          [(e.model.clip, e.num_views) for e in extra], counted)
    per_result = per_result_bytes(model.unet.config.image_size, counted, clips,
                                  lpips=bool(guidance.settings.background_lpips_lambda))
    memory = min(batch_size or 1, num_prompts * num_results) * per_result + GIB
    with bridge.autograd_enabled():
        lpips_model = None
        if guidance.settings.background_lpips_lambda:
            lpips_model = load_lpips()
        memory += fast_paths.clone_bytes(model.unet, guidance.clip.clip, options)
        clip_patchers = [guidance.clip.patcher] + [e.model.patcher for e in extra
                                                   if e.model.patcher is not guidance.clip.patcher]
        bridge.load_for_sampling([model.patcher] + clip_patchers, memory)
        device = model.patcher.load_device
        auto = batch_size == 0
        if auto:
            batch_size = _auto_batch_size(model, device, num_prompts * num_results, options, per_result)
        if lpips_model is not None:
            lpips_model = lpips_model.to(device)
        batches = []

        def attempt(batch_size: int):
            batches.append(batch_size)
            # Inputs from upstream nodes are inference tensors: clone them before they enter autograd.
            image_targets = [ImageTarget(t.image.clone(), None if t.mask is None else t.mask.clone(), t.weight)
                             for t in guidance.image_targets]
            # The speed options apply to clones: the loader's cached models stay as loaded.
            with fast_paths.run_clones(model.unet, guidance.clip.clip, options) as (unet, clip), \
                    contextlib.ExitStack() as stack:
                extra_clips = [GuidanceClip(_ensemble_clip(stack, e.model.clip, guidance.clip.clip, clip, options),
                                            e.weight, e.num_views) for e in extra]
                return edit_image(image.clone(), mask.clone() if mask is not None else None, unet, diffusion,
                                  clip, guidance.prompts, seed=seed, num_results=num_results,
                                  settings=dataclasses.replace(settings, batch_size=batch_size),
                                  guidance_settings=guidance_settings, invert_mask=invert_mask,
                                  callback=callback, device=device, lpips_model=lpips_model,
                                  extra_clips=extra_clips, image_targets=image_targets)

        # An out-of-memory error at an auto batch starts the edit again at a smaller one; otherwise it is
        # re-raised with the advice (ComfyUI frees its models as for any OOM).
        result = run_with_smaller_batches(attempt, batch_size, num_prompts * num_results, auto=auto,
                                          is_oom=bridge.is_out_of_memory, free_memory=bridge.release_failed_attempt)
    # One line a run: what came out, and how it ran.
    log.info("Blended Diffusion: %d image(s) for %d prompt(s), in batches of %d%s; speed: %s",
             result.images.shape[0], num_prompts, min(batches[-1], num_prompts * num_results),
             " (auto)" if auto else "", options.describe())
    return result


def _ensemble_clip(stack: contextlib.ExitStack, extra_clip, main_clip, main_run_clip, options):
    """A further CLIP of the ensemble, with the Speed options the main CLIP runs with (else it would run as loaded,
    without the checkpointing, kernels or graphs the user asked for). The main CLIP's model listed again is the
    main run clone; another is cloned for the run at its own loader's precision."""
    if extra_clip.model is main_clip.model:
        return main_run_clip
    return stack.enter_context(fast_paths.run_clip_clone(extra_clip, for_clip(options, extra_clip)))


def _auto_batch_size(model, device, num_results: int, options: fast_paths.FastPathOptions,
                     per_result: int | None = None) -> int:
    """batch_size 0: as many results as ComfyUI's free memory on ``device`` holds (models already loaded), at
    ``per_result`` bytes each (``_edit`` counts the run's CLIPs and LPIPS; None: the measured figure alone)."""
    if per_result is None:
        per_result = per_result_bytes(model.unet.config.image_size, options)
    free = bridge.mm.get_free_memory(device)
    batch = auto_batch_size(free, per_result, num_results)
    log.debug("Blended Diffusion: batch_size auto = %d (%.2f GiB free, %.2f GiB per result)", batch, free / GIB,
              per_result / GIB)
    return batch
