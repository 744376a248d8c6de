"""Before/after pictures for the README, made by the pack itself.

No real weights can be downloaded where this project is built, so the pictures come from the random-weight
tiny test models (tests/fixtures/reference): they show what the pack does to pixels (which region changes,
the untouched background, crop-and-stitch on a non-square photo, outpainting) -- not the quality of real edits.
Every picture is labelled accordingly.

    PYTHONPATH=. .venv/bin/python scripts/make_readme_pictures.py
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from blended.augment import AugmentationSettings
from blended.checkpoint import load_guided_diffusion
from blended.clip_model import load_guidance_clip
from blended.diffusion import create_diffusion
from blended.guidance import GuidanceSettings
from blended.sampler import SamplerSettings, edit_image

REPO = Path(__file__).resolve().parent.parent
REF = REPO / "tests" / "fixtures" / "reference"
EXAMPLES = REPO / "tests" / "fixtures" / "examples"
OUT = REPO / "docs" / "images"
LABEL = "tiny random-weight test model (plumbing, not quality)"


def load_image(name):
    return torch.from_numpy(np.asarray(Image.open(EXAMPLES / name).convert("RGB"), dtype=np.float32) / 255)[None]


def load_mask(name):
    return torch.from_numpy((np.asarray(Image.open(EXAMPLES / name).convert("L")) > 0).astype(np.float32))[None]


def to_pil(image):
    return Image.fromarray((image.clamp(0, 1).numpy() * 255).round().astype(np.uint8))


def panel(images, titles, path):
    height = max(im.height for im in images)
    width = sum(im.width for im in images) + 10 * (len(images) - 1)
    canvas = Image.new("RGB", (width, height + 36), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for im, title in zip(images, titles, strict=True):
        canvas.paste(im, (x, 20))
        draw.text((x + 4, 4), title, fill="black")
        x += im.width + 10
    draw.text((4, height + 22), LABEL, fill=(160, 0, 0))
    canvas.save(path)
    logging.info("wrote %s", path)


def main():
    logging.basicConfig(level=logging.INFO)
    OUT.mkdir(parents=True, exist_ok=True)
    unet, _ = load_guided_diffusion(path=REF / "gd_tiny" / "model.safetensors")
    clip = load_guidance_clip(path=REF / "clip_tiny" / "model.safetensors")
    diffusion = create_diffusion(timestep_respacing="20")
    guidance = GuidanceSettings(augmentations=AugmentationSettings(num_views=2))

    image, mask = load_image("img.png"), load_mask("mask.png")
    result = edit_image(image, mask, unet, diffusion, clip, ["a big rock"], seed=404, num_results=1,
                        settings=SamplerSettings(skip_timesteps=5), guidance_settings=guidance)
    overlay = image[0].clone()
    overlay[mask[0] > 0] = overlay[mask[0] > 0] * 0.4 + torch.tensor([1.0, 0.0, 0.0]) * 0.6
    panel([to_pil(image[0]), to_pil(overlay), to_pil(result.images[0])],
          ["input", "mask (red = edit)", "result, full image (original)"], OUT / "edit_256.png")

    wide = torch.nn.functional.interpolate(image.movedim(-1, 1), size=(300, 500), mode="bicubic",
                                           antialias=True).clamp(0, 1).movedim(1, -1)
    wide_mask = torch.nn.functional.interpolate(mask[None], size=(300, 500), mode="nearest")[0]
    crop = edit_image(wide, wide_mask, unet, diffusion, clip, ["a big rock"], seed=404, num_results=1,
                      settings=SamplerSettings(skip_timesteps=5, region="mask_crop", grow_mask=2, feather=3),
                      guidance_settings=guidance)
    panel([to_pil(wide[0]), to_pil(crop.images[0])], ["500x300 input", "mask_crop result, 500x300"],
          OUT / "crop_stitch_500x300.png")

    padded = torch.full((1, 256, 384, 3), 0.5)
    padded[:, :, :256] = image
    pad_mask = torch.zeros(1, 256, 384)
    pad_mask[:, :, 256:] = 1
    out = edit_image(padded, pad_mask, unet, diffusion, clip, ["a dirt road"], seed=404, num_results=1,
                     settings=SamplerSettings(skip_timesteps=0, region="mask_crop", context=0.5),
                     guidance_settings=guidance)
    panel([to_pil(padded[0]), to_pil(out.images[0])], ["padded (ImagePadForOutpaint)", "outpainted"],
          OUT / "outpaint_384x256.png")


if __name__ == "__main__":
    main()
