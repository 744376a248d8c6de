"""ComfyUI adapters of the pack: each node is a thin wrapper over the pure ``blended`` library."""

from .guidance import Augmentations, CLIPGuidance, CLIPList, GuidanceSchedule
from .loaders import LoadGuidanceCLIP, LoadGuidedDiffusionModel
from .metrics import EditMetrics
from .model_folders import register_model_folders
from .rank import CLIPRank
from .sampler import BlendedDiffusionSampler
from .speed import BlendedDiffusionSpeed

register_model_folders()

NODE_CLASS_MAPPINGS = {
    "BlendedDiffusion_LoadGuidedDiffusion": LoadGuidedDiffusionModel,
    "BlendedDiffusion_LoadCLIP": LoadGuidanceCLIP,
    "BlendedDiffusion_Augmentations": Augmentations,
    "BlendedDiffusion_CLIPGuidance": CLIPGuidance,
    "BlendedDiffusion_CLIPList": CLIPList,
    "BlendedDiffusion_GuidanceSchedule": GuidanceSchedule,
    "BlendedDiffusion_Sampler": BlendedDiffusionSampler,
    "BlendedDiffusion_Speed": BlendedDiffusionSpeed,
    "BlendedDiffusion_CLIPRank": CLIPRank,
    "BlendedDiffusion_EditMetrics": EditMetrics,
}

# One prefix, so that typing "Blended Diffusion" in the node search lists them all.
NODE_DISPLAY_NAME_MAPPINGS = {
    "BlendedDiffusion_LoadGuidedDiffusion": "Blended Diffusion: Load Guided Diffusion Model",
    "BlendedDiffusion_LoadCLIP": "Blended Diffusion: Load CLIP (guidance)",
    "BlendedDiffusion_Augmentations": "Blended Diffusion: CLIP Augmentations",
    "BlendedDiffusion_CLIPGuidance": "Blended Diffusion: CLIP Guidance",
    "BlendedDiffusion_CLIPList": "Blended Diffusion: CLIP List (ensemble)",
    "BlendedDiffusion_GuidanceSchedule": "Blended Diffusion: Guidance Schedule",
    "BlendedDiffusion_Sampler": "Blended Diffusion: Sampler",
    "BlendedDiffusion_Speed": "Blended Diffusion: Speed",
    "BlendedDiffusion_CLIPRank": "Blended Diffusion: CLIP Rank",
    "BlendedDiffusion_EditMetrics": "Blended Diffusion: Edit Metrics",
}
