"""Guidance nodes: the prompt(s) and loss weights, the CLIP augmentations, the CLIP ensemble, the schedule.

They only parse widget values and pass them on; what the values mean lives in the library
(``blended.prompts``, ``blended.schedule``, ``blended.targets``).
"""

from __future__ import annotations

from ..blended import image_io
from ..blended import schedule as guidance_schedule
from ..blended.augment import AugmentationSettings
from ..blended.errors import BlendedInputError
from ..blended.guidance import GuidanceSettings, check_weight
from ..blended.lpips_loss import check_lpips_available
from ..blended.prompts import parse_prompt_lines
from . import comfy_bridge as bridge

CATEGORY = "BlendedDiffusion/guidance"


class Augmentations:
    DESCRIPTION = ("Settings of the random views CLIP judges each guided prediction through (1 clean view + "
                   "the rest randomly rotated, shifted and perspective-warped as kornia's RandomAffine and "
                   "RandomPerspective do), which keep CLIP "
                   "from being fooled by adversarial pixels. Defaults are the original's.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CLIP_AUGMENTATIONS",)
    RETURN_NAMES = ("augmentations",)
    OUTPUT_TOOLTIPS = ("Augmentation settings for the CLIP Guidance node.",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        d = AugmentationSettings()
        return {
            "required": {
                "num_views": ("INT", {"default": d.num_views, "min": 1, "max": 64, "tooltip":
                              "CLIP views per sample per step: 1 clean + (num_views-1) augmented. Original: 8; "
                              "the paper: 16. More views = steadier guidance, more compute."}),
                "degrees": ("FLOAT", {"default": d.degrees, "min": 0.0, "max": 180.0, "step": 0.5, "tooltip":
                            "Random rotation range in degrees (RandomAffine)."}),
                "translate": ("FLOAT", {"default": d.translate, "min": 0.0, "max": 0.5, "step": 0.01, "tooltip":
                              "Random translation as a fraction of the size (RandomAffine)."}),
                "p_affine": ("FLOAT", {"default": d.p_affine, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                             "Probability that a view gets the affine transform."}),
                "distortion": ("FLOAT", {"default": d.distortion, "min": 0.0, "max": 1.0, "step": 0.05,
                               "tooltip": "Perspective distortion scale (RandomPerspective)."}),
                "p_perspective": ("FLOAT", {"default": d.p_perspective, "min": 0.0, "max": 1.0, "step": 0.05,
                                  "tooltip": "Probability that a view gets the perspective warp."}),
                "fix_translate": ("BOOLEAN", {"default": d.fix_translate, "tooltip":
                                  "The original passes translate as one number, which kornia turns into "
                                  "vertical-only shifts. On = shift both ways, as the paper intends."}),
            }
        }

    def build(self, num_views, degrees, translate, p_affine, distortion, p_perspective, fix_translate):
        settings = AugmentationSettings(num_views=num_views, degrees=degrees, translate=translate, p_affine=p_affine,
                                        distortion=distortion, p_perspective=p_perspective,
                                        fix_translate=fix_translate)
        settings.validate()  # here, not after the Sampler has loaded its models
        return (settings,)


class CLIPGuidance:
    DESCRIPTION = ("What the edit should look like: one prompt per line (several lines = the paper's 'different "
                   "prompts' application: every prompt gets its own results), and how hard CLIP pushes. Beyond "
                   "the original: weighted and negative prompt parts, a reference picture as a target, several "
                   "CLIPs at once (CLIP List) and a per-step schedule (Guidance Schedule). Defaults are the "
                   "original's.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CLIP_GUIDANCE",)
    RETURN_NAMES = ("guidance",)
    OUTPUT_TOOLTIPS = ("CLIP guidance for the Blended Diffusion Sampler.",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        d = GuidanceSettings()
        return {
            "required": {
                "clip": ("GUIDANCE_CLIP", {"tooltip": "CLIP from the Load CLIP (guidance) node."}),
                "prompt": ("STRING", {"multiline": True, "default": "a red rock", "tooltip":
                           "Text describing the masked region after the edit. One prompt per line (each gets "
                           "its own results); an empty prompt means no guidance (plain inpainting by the "
                           "diffusion model). Weighted parts: 'a red rock:1.0 | moss:0.5 | blurry:-0.5' "
                           "(parts split by '|', each may end in ':weight'; a negative weight pushes away; "
                           "'\\:' and '\\|' are a literal colon and bar). Each part has its own 77-token "
                           "limit."}),
                "clip_lambda": ("FLOAT", {"default": d.clip_lambda, "min": 0.0, "max": 100000.0, "step": 10.0,
                                "tooltip": "Weight of the CLIP loss (original: 1000). 0 = no CLIP guidance."}),
                "range_lambda": ("FLOAT", {"default": d.range_lambda, "min": 0.0, "max": 10000.0, "step": 1.0,
                                 "tooltip": "Weight of the loss keeping predicted pixels in range (original: 50)."}),
                "num_views": ("INT", {"default": d.augmentations.num_views, "min": 1, "max": 64, "tooltip":
                              "CLIP views per step (1 clean + augmented); ignored when an Augmentations node "
                              "is connected."}),
                "truncate_long_prompts": ("BOOLEAN", {"default": True, "tooltip":
                                          "CLIP reads at most 77 tokens. On = cut longer prompts with a warning; "
                                          "off = stop with an error."}),
            },
            "optional": {
                "augmentations": ("CLIP_AUGMENTATIONS", {"tooltip": "Full augmentation settings (optional)."}),
                "background_l2_lambda": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1000000.0, "step": 100.0,
                                         "tooltip": "Background preservation L2 loss (original's "
                                                    "--background_preservation_loss uses 10000). Meant for the "
                                                    "'local' baseline mode; 0 = off."}),
                "background_lpips_lambda": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100000.0, "step": 100.0,
                                            "tooltip": "Background preservation LPIPS loss (original: 1000 with "
                                                       "--background_preservation_loss). Needs the 'lpips' package "
                                                       "and torchvision's VGG16 weights on disk; 0 = off."}),
                "image_target": ("IMAGE", {"tooltip": "A reference picture (e.g. from Load Image) whose CLIP "
                                 "image embedding is a target like a prompt, for every prompt line. With an "
                                 "empty prompt it is the only target. A batch counts as one target, each "
                                 "picture with weight/N."}),
                "image_target_mask": ("MASK", {"tooltip": "Only this part of the reference picture counts (1 = "
                                      "counts; grey elsewhere). Without it, the whole picture."}),
                "image_target_weight": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.05,
                                        "tooltip": "Weight of the image target, as a prompt part's weight (1 = "
                                                   "as strong as a prompt; negative = away from the picture). "
                                                   "Used only when an image target is connected."}),
                "more_clips": ("GUIDANCE_CLIP_LIST", {"tooltip": "More CLIPs guiding at once (an ensemble), "
                               "from CLIP List nodes; each sees its own views at its own input size. The main "
                               "clip counts with weight 1."}),
                "schedule": ("GUIDANCE_SCHEDULE", {"tooltip": "CLIP weight per step and gradient guard, from a "
                             "Guidance Schedule node. Without it: constant weight, no guard (the original)."}),
            },
        }

    def build(self, clip, prompt, clip_lambda, range_lambda, num_views, truncate_long_prompts=True,
              augmentations=None, background_l2_lambda=0.0, background_lpips_lambda=0.0, image_target=None,
              image_target_mask=None, image_target_weight=1.0, more_clips=None, schedule=None):
        prompts = parse_prompt_lines(prompt)
        if augmentations is None:
            augmentations = AugmentationSettings(num_views=num_views)
        settings = GuidanceSettings(clip_lambda=clip_lambda, range_lambda=range_lambda,
                                    background_l2_lambda=background_l2_lambda,
                                    background_lpips_lambda=background_lpips_lambda, augmentations=augmentations,
                                    schedule=schedule)
        settings.validate()  # here, not after the Sampler has loaded its models (a link skips the widgets' ranges)
        if background_lpips_lambda:
            check_lpips_available()  # likewise
        extra_clips = list(more_clips or [])
        if not truncate_long_prompts:
            # fail here, before any model is loaded or step is run; the limit applies to each part
            for guidance_clip in [clip] + [entry.model for entry in extra_clips]:
                for p in prompts:
                    for part in p.parts:
                        guidance_clip.clip.tokenize([part.text], truncate=False)
        image_targets = []
        if image_target is not None:
            pictures = image_io.to_rgb_nchw(image_target)
            mask = None
            if image_target_mask is not None:
                # As for the edited image: one picture with several masks is a target per mask, none dropped.
                image_io.warn_of_unused_masks(pictures.shape[0], image_target_mask, images="reference pictures",
                                              advice="give one picture per mask, or one picture for all")
                pictures, mask = image_io.match_batches(pictures,
                                                        image_io.mask_for_images(pictures, image_target_mask))
                empty = image_io.empty_mask_items(mask)
                if empty:  # here, before the Sampler loads its models
                    which = f" for picture(s) {empty[:8]}" if mask.shape[0] > 1 else ""
                    raise BlendedInputError(f"image_target_mask is empty (all 0){which}: paint the part of the "
                                            "reference picture that should count, or leave image_target_mask "
                                            "unconnected.")
            weight = check_weight(image_target_weight, "image_target_weight")
            image_targets.append(bridge.ImageTargetSpec(pictures, mask, weight))
        return (bridge.ClipGuidanceSpec(clip=clip, prompts=prompts, settings=settings, extra_clips=extra_clips,
                                        image_targets=image_targets),)


class CLIPList:
    DESCRIPTION = ("Adds a CLIP to an ensemble that guides together with CLIP Guidance's main clip: each CLIP "
                   "judges its own augmented views at its own input size, and their losses add up with these "
                   "weights. Chain several; connect the last one to CLIP Guidance's more_clips.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("GUIDANCE_CLIP_LIST",)
    RETURN_NAMES = ("clips",)
    OUTPUT_TOOLTIPS = ("The CLIPs so far, for CLIP Guidance's more_clips or another CLIP List.",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("GUIDANCE_CLIP", {"tooltip": "A CLIP from a Load CLIP (guidance) node (any size: "
                                                      "ViT-B/16, ViT-L/14, RN50x4...)."}),
                "weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.05, "tooltip":
                           "This CLIP's loss weight, relative to the main clip's 1 (0 = ignored)."}),
                "num_views": ("INT", {"default": AugmentationSettings().num_views, "min": 1, "max": 64,
                              "tooltip": "Views this CLIP judges per sample per step (1 clean + augmented); "
                                         "the other augmentation settings are CLIP Guidance's."}),
            },
            "optional": {
                "clips": ("GUIDANCE_CLIP_LIST", {"tooltip": "CLIPs from a previous CLIP List node."}),
            },
        }

    def build(self, clip, weight, num_views, clips=None):
        AugmentationSettings(num_views=num_views).validate()
        weight = check_weight(weight, "CLIP List's weight", negative_advice=(
            "0 leaves this CLIP out; to steer away from something, give a prompt part a negative weight "
            "('blurry:-0.5')"))
        entry = bridge.ClipListEntry(model=clip, weight=weight, num_views=int(num_views))
        return (tuple(clips or ()) + (entry,),)


class GuidanceSchedule:
    DESCRIPTION = ("How hard CLIP pulls at each step, and a guard on the guidance gradient. The schedule "
                   "multiplies CLIP Guidance's clip_lambda; constant with guard off is the original.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("GUIDANCE_SCHEDULE",)
    RETURN_NAMES = ("schedule",)
    OUTPUT_TOOLTIPS = ("For CLIP Guidance's schedule input.",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "shape": (list(guidance_schedule.SHAPES), {"default": "constant", "tooltip":
                          "constant: clip_lambda at every step (original). linear: from the first value at the "
                          "first step to the second at the last, e.g. '1.0, 0.2' ramps down to a fifth. values: "
                          "any list placed evenly over the steps and interpolated, e.g. '0.5, 1.5, 1.0'."}),
                "values": ("STRING", {"default": "1.0, 0.2", "tooltip":
                           "Multipliers of clip_lambda (>= 0), separated by commas, spaces or semicolons, decimals "
                           "with a point (ignored when constant)."}),
                "gradient_guard": (list(guidance_schedule.GUARDS), {"default": "off", "tooltip":
                                   "off: the original. clamp: every element of the guidance gradient is clamped "
                                   "to +-limit. normalize: each result's gradient is scaled down so its RMS is "
                                   "at most limit (Disco Diffusion's clamp_grad). Guards against blow-ups with "
                                   "high clip_lambda."}),
                "limit": ("FLOAT", {"default": 0.05, "min": 0.0, "max": 1000.0, "step": 0.001, "tooltip":
                          "The guard's limit, in units of the gradient w.r.t. the noisy image (ignored when "
                          "off)."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, shape=None, values=None, gradient_guard=None, limit=None):
        # At queue time, before any loader runs; a linked input is not known yet (None) and is checked by build.
        if None in (shape, values, gradient_guard, limit):
            return True
        try:
            cls._schedule(shape, values, gradient_guard, limit)
        except BlendedInputError as exc:
            return str(exc)
        return True

    def build(self, shape, values, gradient_guard, limit):
        return (self._schedule(shape, values, gradient_guard, limit),)

    @staticmethod
    def _schedule(shape, values, gradient_guard, limit):
        parsed = guidance_schedule.parse_values(values, shape) if shape != "constant" else ()
        return guidance_schedule.GuidanceSchedule(shape=shape, values=parsed, guard=gradient_guard,
                                                  limit=float(limit))
