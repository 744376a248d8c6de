"""ComfyUI adapters of the pack: each node is a thin wrapper over the pure ``blended`` library."""

from .guidance import Augmentations, CLIPGuidance, CLIPList, GuidanceSchedule
from .loaders import LoadGuidanceCLIP, LoadGuidedDiffusionModel
from .metrics import EditMetrics
from .model_folders import register_model_folders
from .rank import CLIPRank
from .sampler import BlendedDiffusionSampler

register_model_folders()

NODE_CLASS_MAPPINGS = {
    "BlendedDiffusion_LoadGuidedDiffusion": LoadGuidedDiffusionModel,
    "BlendedDiffusion_LoadCLIP": LoadGuidanceCLIP,
    "BlendedDiffusion_Augmentations": Augmentations,
    "BlendedDiffusion_CLIPGuidance": CLIPGuidance,
    "BlendedDiffusion_CLIPList": CLIPList,
    "BlendedDiffusion_GuidanceSchedule": GuidanceSchedule,
    "BlendedDiffusion_Sampler": BlendedDiffusionSampler,
    "BlendedDiffusion_CLIPRank": CLIPRank,
    "BlendedDiffusion_EditMetrics": EditMetrics,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "BlendedDiffusion_LoadGuidedDiffusion": "Load Guided Diffusion Model",
    "BlendedDiffusion_LoadCLIP": "Load CLIP (guidance)",
    "BlendedDiffusion_Augmentations": "CLIP Augmentations",
    "BlendedDiffusion_CLIPGuidance": "CLIP Guidance",
    "BlendedDiffusion_CLIPList": "CLIP List (ensemble)",
    "BlendedDiffusion_GuidanceSchedule": "Guidance Schedule",
    "BlendedDiffusion_Sampler": "Blended Diffusion Sampler",
    "BlendedDiffusion_CLIPRank": "CLIP Rank",
    "BlendedDiffusion_EditMetrics": "Blended Edit Metrics",
}
