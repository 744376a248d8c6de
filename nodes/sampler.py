"""The Blended Diffusion Sampler node: a thin adapter from ComfyUI's types to ``blended.sampler``."""

from __future__ import annotations

import dataclasses
import logging

import torch

from ..blended import fast_paths
from ..blended.colour_match import SPACES as COLOUR_MATCH
from ..blended.errors import BlendedInputError
from ..blended.lpips_loss import load_lpips
from ..blended.memory import activation_bytes_per_result, auto_batch_size
from ..blended.sampler import SamplerSettings, diffusion_for, edit_image
from ..blended.targets import GuidanceClip, ImageTarget
from . import comfy_bridge as bridge

log = logging.getLogger(__name__)

# autocast dtype per choice; None keeps the loader's dtype (the faithful path)
PRECISIONS = {"model dtype": None, "bf16 autocast": torch.bfloat16, "fp16 autocast": torch.float16}


class BlendedDiffusionSampler:
    DESCRIPTION = ("Text-driven local editing (Blended Diffusion, CVPR 2022): regenerates the masked region "
                   "(mask = 1) of the image with the guided-diffusion model, steered by CLIP toward the prompt, "
                   "while the noised original is blended back outside the mask at every step. Returns "
                   "num_results edits per prompt at the input's size; pixels outside the mask are unchanged. "
                   "Rank them with CLIP Rank. Defaults reproduce the original code.")
    CATEGORY = "BlendedDiffusion"
    RETURN_TYPES = ("IMAGE", "MASK", "IMAGE")
    RETURN_NAMES = ("images", "mask", "frames")
    OUTPUT_TOOLTIPS = ("The edited images, num_results per prompt, at the input's size.",
                       "The mask the final composite used (after invert/grow/feather).",
                       "The process: the model's x0 prediction every capture_every steps, at model resolution "
                       "(feed SaveAnimatedWEBP). The final images when capture_every is 0.")
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
                                 "tooltip": "Random seed. Result i depends only on the seed and i, not on how "
                                            "many results are made."}),
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
                                       "Paste the untouched original outside the mask at the end (original: on)."}),
                "invert_mask": ("BOOLEAN", {"default": False, "tooltip":
                                "Edit where the mask is 0 instead (e.g. background replacement)."}),
                "batch_size": ("INT", {"default": d.batch_size, "min": 0, "max": 256, "tooltip":
                               "Results denoised together. Lower it if you run out of memory; results do not "
                               "depend on it. 0 = auto: as many as fit in the memory that is free once the "
                               "models are loaded."}),
            },
            "optional": {
                "region": (["full", "mask_crop"], {"default": d.region, "tooltip":
                           "full: the whole image squashed to the model's square size (original). mask_crop: a "
                           "square crop around the mask at model resolution, aspect kept, pasted back at full "
                           "resolution: far more detail on big photos."}),
                "context": ("FLOAT", {"default": d.context, "min": 0.0, "max": 4.0, "step": 0.05, "tooltip":
                            "mask_crop: margin around the mask's bounding box, as a fraction of its size."}),
                "grow_mask": ("INT", {"default": 0, "min": 0, "max": 512, "tooltip":
                              "Grow the final composite mask by this many pixels (0 = original hard mask)."}),
                "feather": ("INT", {"default": 0, "min": 0, "max": 512, "tooltip":
                            "Soften the final composite's edge over this many pixels (0 = hard edge)."}),
                "resample_count": ("INT", {"default": d.resample_count, "min": 0, "max": 20, "tooltip":
                                   "Harmonising resampling (RePaint): after every resample_jump_length steps, add "
                                   "their noise back and denoise them again this many extra times, so the edit and "
                                   "the background agree at the border. 0 = off (original). Costs "
                                   "resample_count x the steps; the progress bar counts them."}),
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
                "reuse_guided_forward": ("BOOLEAN", {"default": d.reuse_guided_forward, "tooltip":
                                         "Fast path: one UNet forward per step instead of two (same result in "
                                         "float32; ~1/3 less UNet work)."}),
                "capture_every": ("INT", {"default": 0, "min": 0, "max": 1000, "tooltip":
                                  "Keep the model's prediction every N steps as the frames output (0 = off)."}),
                "ddim_eta": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                             "DDIM noise (0 = deterministic, as the original)."}),
                "precision": (list(PRECISIONS), {"default": "model dtype", "tooltip":
                              "Compute precision of the UNet for this run. 'model dtype' = what the loader chose "
                              "(faithful). bf16/fp16 autocast keep the weights untouched and run the kernels in "
                              "low precision (about 2x faster, half the activation memory); best with the loader "
                              "at float32."}),
                "channels_last": ("BOOLEAN", {"default": False, "tooltip":
                                  "NHWC memory layout for the convolutions (faster on recent GPUs; same numbers)."}),
                "compile": ("BOOLEAN", {"default": False, "tooltip":
                            "torch.compile the UNet: the first steps pay the compile time (a minute or more), "
                            "later steps run faster. Worth it for many results on a GPU."}),
                "preview": ("BOOLEAN", {"default": True, "tooltip": "Show the prediction in the progress bar."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def sample(self, model, guidance, image, mask, seed, num_results, respacing, skip_timesteps, method, mode,
               enforce_background, invert_mask, batch_size, region="full", context=0.25, grow_mask=0, feather=0,
               resample_count=0, resample_jump_length=5, soft_mask=False, colour_match="off",
               background_noise_step="current", reuse_guided_forward=False, capture_every=0, ddim_eta=0.0,
               precision="model dtype", channels_last=False, compile=False, preview=True, unique_id=None):
        settings = SamplerSettings(
            skip_timesteps=skip_timesteps, method=method, ddim_eta=ddim_eta, mode=mode,
            enforce_background=enforce_background, background_noise_step=background_noise_step,
            reuse_guided_forward=reuse_guided_forward, batch_size=batch_size, capture_every=capture_every,
            region=region, context=context, grow_mask=grow_mask, feather=feather,
            colour_match=colour_match, soft_mask=soft_mask, resample_count=resample_count,
            resample_jump_length=resample_jump_length)
        try:
            # The model's own training schedule (config.json's noise_schedule), respaced as asked.
            diffusion = diffusion_for(model.unet, str(respacing).strip())
        except (ValueError, KeyError) as exc:
            raise BlendedInputError(f"respacing {respacing!r} is not valid ({exc}): use a step count like "
                                    "'100', 'ddim50' or sections like '10,15,20'") from exc
        num_prompts = len(guidance.prompts)
        # The library reports the real total with every step (it knows the final batch after broadcasting).
        callback = bridge.progress_callback(1, node_id=unique_id, preview=preview)
        memory = bridge.activation_bytes(min(batch_size or 1, num_prompts * num_results), model.unet.config.image_size,
                                         model.compute_dtype, getattr(model.unet, "gradient_checkpointing", False))
        with bridge.autograd_enabled():
            lpips_model = None
            if guidance.settings.background_lpips_lambda:
                lpips_model = load_lpips()
            extra = getattr(guidance, "extra_clips", [])
            clip_patchers = [guidance.clip.patcher] + [e.model.patcher for e in extra
                                                       if e.model.patcher is not guidance.clip.patcher]
            bridge.load_for_sampling([model.patcher] + clip_patchers, memory)
            device = model.patcher.load_device
            if batch_size == 0:
                settings = dataclasses.replace(settings, batch_size=_auto_batch_size(
                    model, device, num_prompts * num_results, PRECISIONS[precision]))
            # Per-run speed options, applied to the shared model without changing its stored weights.
            model.unet.autocast_dtype = PRECISIONS[precision]
            fast_paths.apply_channels_last(model.unet, guidance.clip.clip, enabled=channels_last)
            if compile and not fast_paths.is_compiled(model.unet):
                fast_paths.compile_unet(model.unet)
            elif not compile and fast_paths.is_compiled(model.unet):
                fast_paths.uncompile_unet(model.unet)
            if lpips_model is not None:
                lpips_model = lpips_model.to(device)
            # Inputs from upstream nodes are inference tensors: clone them before they enter autograd.
            image_in = image.clone()
            mask_in = mask.clone() if mask is not None else None
            extra_clips = [GuidanceClip(e.model.clip, e.weight, e.num_views) for e in extra]
            image_targets = [ImageTarget(t.image.clone(), None if t.mask is None else t.mask.clone(), t.weight)
                             for t in getattr(guidance, "image_targets", [])]
            try:
                result = edit_image(image_in, mask_in, model.unet, diffusion, guidance.clip.clip,
                                    guidance.prompts, seed=seed, num_results=num_results, settings=settings,
                                    guidance_settings=guidance.settings, invert_mask=invert_mask,
                                    callback=callback, device=device, lpips_model=lpips_model,
                                    extra_clips=extra_clips, image_targets=image_targets)
            except Exception as exc:
                # Re-raised unchanged so ComfyUI frees its models as for any OOM; the advice is ours, and only
                # for real OOMs.
                if bridge.is_out_of_memory(exc):
                    log.error("Blended Diffusion ran out of memory with batch_size=%d: lower batch_size (results "
                              "do not depend on it), turn on gradient_checkpointing in the loader, or use "
                              "precision 'bf16 autocast'.", batch_size)
                raise
        frames = result.frames if result.frames is not None else result.images
        log.info("Blended Diffusion: %d image(s) for %d prompt(s)", result.images.shape[0], num_prompts)
        return (bridge.to_output(result.images), bridge.to_output(result.mask), bridge.to_output(frames))


def _auto_batch_size(model, device, num_results: int, autocast_dtype) -> int:
    """batch_size 0: as many results as ComfyUI's free memory on ``device`` holds (models already loaded)."""
    low_precision = autocast_dtype is not None or model.compute_dtype in (torch.float16, torch.bfloat16)
    per_result = activation_bytes_per_result(model.unet.config.image_size, low_precision,
                                             getattr(model.unet, "gradient_checkpointing", False))
    batch = auto_batch_size(bridge.mm.get_free_memory(device), per_result, num_results)
    log.info("Blended Diffusion: batch_size auto = %d", batch)
    return batch
