"""Guidance nodes: the prompt(s) and loss weights, and the CLIP augmentations."""

from __future__ import annotations

from ..blended.augment import AugmentationSettings
from ..blended.guidance import GuidanceSettings
from . import comfy_bridge as bridge

CATEGORY = "BlendedDiffusion/guidance"


class Augmentations:
    DESCRIPTION = ("Settings of the random views CLIP judges each guided prediction through (1 clean view + "
                   "the rest randomly rotated, shifted and perspective-warped with kornia), which keep CLIP "
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
        return (AugmentationSettings(num_views=num_views, degrees=degrees, translate=translate, p_affine=p_affine,
                                     distortion=distortion, p_perspective=p_perspective,
                                     fix_translate=fix_translate),)


class CLIPGuidance:
    DESCRIPTION = ("What the edit should look like: one prompt per line (several lines = the paper's 'different "
                   "prompts' application: every prompt gets its own results), and how hard CLIP pushes. "
                   "Defaults are the original's.")
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
                           "Text describing the masked region after the edit. One prompt per line; an empty "
                           "prompt means no guidance (plain inpainting by the diffusion model)."}),
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
            },
        }

    def build(self, clip, prompt, clip_lambda, range_lambda, num_views, truncate_long_prompts=True,
              augmentations=None, background_l2_lambda=0.0, background_lpips_lambda=0.0):
        prompts = [line.strip() for line in str(prompt).splitlines() if line.strip()] or [""]
        if augmentations is None:
            augmentations = AugmentationSettings(num_views=num_views)
        settings = GuidanceSettings(clip_lambda=clip_lambda, range_lambda=range_lambda,
                                    background_l2_lambda=background_l2_lambda,
                                    background_lpips_lambda=background_lpips_lambda, augmentations=augmentations)
        if not truncate_long_prompts:
            for p in prompts:  # fail here, before any model is loaded or step is run
                clip.clip.tokenize([p], truncate=False)
        return (bridge.ClipGuidanceSpec(clip=clip, prompts=prompts, settings=settings),)
