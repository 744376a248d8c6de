"""The released model files the pack uses: one name per file, the folder it goes in, its official location.

One table for everything that names a model file: the download script saves under these names, the shipped
workflows select them (and declare them to ComfyUI's frontend, which tells a user without them what to get
and where to put it), and README lists them.
"""

from __future__ import annotations

from dataclasses import dataclass

GUIDED_DIFFUSION_FOLDER = "guided_diffusion"
CLIP_GUIDANCE_FOLDER = "clip_guidance"

_GUIDED_DIFFUSION_RELEASE = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/"


@dataclass(frozen=True)
class ModelFile:
    name: str          # the file name in its folder, as the loaders list it and the workflows select it
    directory: str     # ComfyUI model folder (models/<directory>)
    url: str           # the official public location
    min_bytes: int     # its float32 tensors alone (parameters x 4 bytes): a smaller file is incomplete
    required: bool     # needed by the shipped workflows (the others are optional models)
    what: str

    def declaration(self) -> dict:
        """The entry ComfyUI's frontend reads from a loader node's ``properties.models``."""
        return {"name": self.name, "url": self.url, "directory": self.directory}


MODEL_FILES = (
    ModelFile("256x256_diffusion_uncond.pt", GUIDED_DIFFUSION_FOLDER,
              _GUIDED_DIFFUSION_RELEASE + "256x256_diffusion_uncond.pt", 4 * 552_814_086, True,
              "OpenAI guided-diffusion, 256x256 unconditional ImageNet: the model Blended Diffusion uses"),
    ModelFile("256x256_diffusion.pt", GUIDED_DIFFUSION_FOLDER,
              _GUIDED_DIFFUSION_RELEASE + "256x256_diffusion.pt", 4 * 553_838_086, False,
              "OpenAI guided-diffusion, 256x256 class-conditional ImageNet (optional)"),
    ModelFile("512x512_diffusion.pt", GUIDED_DIFFUSION_FOLDER,
              _GUIDED_DIFFUSION_RELEASE + "512x512_diffusion.pt", 4 * 558_997_638, False,
              "OpenAI guided-diffusion, 512x512 class-conditional ImageNet (optional)"),
    # open_clip's ViT-B-16 'openai' weights (the original's CLIP), as open_clip itself fetches them.
    ModelFile("ViT-B-16.safetensors", CLIP_GUIDANCE_FOLDER,
              "https://huggingface.co/timm/vit_base_patch16_clip_224.openai/resolve/main/"
              "open_clip_model.safetensors", 4 * 149_620_737, True,
              "CLIP ViT-B/16 (OpenAI weights, open_clip layout): guidance and ranking"),
    ModelFile("ViT-L-14.safetensors", CLIP_GUIDANCE_FOLDER,
              "https://huggingface.co/timm/vit_large_patch14_clip_224.openai/resolve/main/"
              "open_clip_model.safetensors", 4 * 427_616_513, False,
              "CLIP ViT-L/14 (OpenAI weights, open_clip layout): the second CLIP of the ensemble workflow (optional)"),
)


def model_file(name: str) -> ModelFile:
    for entry in MODEL_FILES:
        if entry.name == name:
            return entry
    raise KeyError(f"no model file named {name!r}; known: {', '.join(m.name for m in MODEL_FILES)}")
