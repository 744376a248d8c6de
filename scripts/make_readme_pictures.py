"""Before/after pictures for the README, made by the pack itself.

The pictures come from the random-weight tiny test models, so that anyone can make them again without the real
weights (tests/fixtures/reference): they show what the pack does to pixels (which region changes,
the untouched background, crop-and-stitch on a non-square photo, outpainting) -- not the quality of real edits.
Every picture is labelled accordingly.

    PYTHONPATH=. .venv/bin/python scripts/make_readme_pictures.py            # every picture
    PYTHONPATH=. .venv/bin/python scripts/make_readme_pictures.py metrics    # only the named ones
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from blended import colour_match, mask_morphology, metrics
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


def panel(images, titles, path, label=LABEL, captions=None):
    """Images side by side, a title above each, optional caption lines below each, a label at the bottom."""
    captions = captions or [[] for _ in images]
    extra = 14 * max(len(c) for c in captions)
    height = max(im.height for im in images)
    width = sum(im.width for im in images) + 10 * (len(images) - 1)
    canvas = Image.new("RGB", (width, height + 36 + extra), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for im, title, caption in zip(images, titles, captions, strict=True):
        canvas.paste(im, (x, 20))
        draw.text((x + 4, 4), title, fill="black")
        for row, line in enumerate(caption):
            draw.text((x + 4, height + 22 + 14 * row), line, fill="black")
        x += im.width + 10
    draw.text((4, height + 22 + extra), label, fill=(160, 0, 0))
    canvas.save(path)
    logging.info("wrote %s", path)


def metrics_picture():
    """Blended Edit Metrics on synthetic pastes of another photo's pixels: which scores move, and which way."""
    image, mask = load_image("img.png"), load_mask("mask.png")
    other = load_image("img2.png")
    nchw, m = image.movedim(-1, 1), mask[:, None]
    hard = nchw * (1 - m) + other.movedim(-1, 1) * m
    soft_mask = mask_morphology.feather_mask(mask_morphology.grow_mask(m, 6), 6)
    feathered = nchw * (1 - soft_mask) + other.movedim(-1, 1) * soft_mask
    results = torch.cat([nchw, hard, feathered])
    masks = torch.cat([m, m, (soft_mask > 0).float()])
    scores = metrics.score_edits(results, nchw, masks)
    captions = [[f"PSNR {metrics._fmt(scores.background_psnr[i], '{:.1f}')} dB (+)",
                 f"seam grad {scores.seam_gradient[i]:+.4f} (-)", f"seam colour {scores.seam_colour[i]:.4f} (-)"]
                for i in range(3)]
    panel([to_pil(r.movedim(0, -1)) for r in results], ["input, untouched", "hard paste of another photo",
                                                        "feathered paste (grow 6)"],
          OUT / "edit_metrics.png", label="synthetic results scored by Blended Edit Metrics", captions=captions)
    logging.info("metrics picture scores:\n%s", scores.table(["untouched", "hard", "feathered"]))


def colour_match_picture():
    """Colour match at paste-back on synthetic pastes: another photo, and the original drifted in colour."""
    image, mask = load_image("img.png").movedim(-1, 1), load_mask("mask.png")[:, None]
    drifted = (image * 0.8 + torch.tensor([0.12, 0.02, -0.05]).view(1, 3, 1, 1)).clamp(0, 1)
    other = load_image("img2.png").movedim(-1, 1)
    for name, edit in (("drifted original", drifted), ("another photo", other)):
        row = []
        for space in colour_match.SPACES:
            matched = colour_match.match_border(edit, image, mask, space=space)
            pasted = image * (1 - mask) + matched * mask
            row.append((space, metrics.score_edits(pasted, image, mask).seam_colour[0], pasted))
        logging.info("colour match, %s: %s", name, ", ".join(f"{s} seam colour {v:.4f}" for s, v, _ in row))
        if name == "drifted original":
            drifted_row = row
    panel([to_pil(p[0].movedim(0, -1)) for _, _, p in drifted_row],
          [f"paste, colour_match={space}" for space, _, _ in drifted_row], OUT / "colour_match.png",
          label="synthetic edit: the masked region drifted in colour (x0.8, +red), pasted back",
          captions=[[f"seam colour {value:.4f} (-)"] for _, value, _ in drifted_row])


def tiny_models():
    unet, _ = load_guided_diffusion(path=REF / "gd_tiny" / "model.safetensors")
    clip = load_guidance_clip(path=REF / "clip_tiny" / "model.safetensors")
    return unet, clip


def change_map(result, image, gain=3.0):
    """|result - input| averaged over RGB, brightened: white = changed a lot, black = unchanged."""
    change = (result - image).abs().mean(-1, keepdim=True).mul(gain).clamp(0, 1)
    return change.expand(-1, -1, 3)


def soft_mask_picture():
    """What the soft-mask schedule changes: how much each pixel moves under a feathered grey mask."""
    unet, clip = tiny_models()
    diffusion = create_diffusion(timestep_respacing="20")
    guidance = GuidanceSettings(augmentations=AugmentationSettings(num_views=2))
    image, mask = load_image("img.png"), load_mask("mask.png")
    grey = mask_morphology.feather_mask(mask_morphology.grow_mask(mask[:, None], 10), 30)[:, 0]
    images = [to_pil(image[0]), to_pil(grey[0, :, :, None].expand(-1, -1, 3))]
    means = []
    for soft in (False, True):
        out = edit_image(image, grey, unet, diffusion, clip, ["a big rock"], seed=404, num_results=1,
                         settings=SamplerSettings(skip_timesteps=5, soft_mask=soft), guidance_settings=guidance)
        images.append(to_pil(change_map(out.images[0], image[0])))
        changed = (out.images[0] - image[0]).abs().mean(-1)
        bands = [(grey[0] > lo) & (grey[0] <= hi) for lo, hi in ((0, 0.34), (0.34, 0.67), (0.67, 1.0))]
        means.append([float(changed[b].mean()) for b in bands])
        logging.info("soft_mask=%s: mean |change| for mask values (0,1/3], (1/3,2/3], (2/3,1]: %s", soft,
                     ", ".join(f"{v:.4f}" for v in means[-1]))
    captions = [[], ["feathered mask (grey = partly)"]] + [
        ["mean change by mask value:", "low {:.3f} mid {:.3f} high {:.3f}".format(*m)] for m in means]
    panel(images, ["input", "grey mask", "change, soft_mask off (binary)", "change, soft_mask on"],
          OUT / "soft_mask.png", captions=captions)


def resampling_picture():
    """Seam scores with and without harmonising resampling (tiny random model: the content is noise).

    Two settings: the synthetic smooth image of tests/test_resampling.py (unguided), and the example photo
    (guided). Both are logged; the picture shows the first.
    """
    unet, clip = tiny_models()
    smooth = F.interpolate(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(3)), size=(64, 64),
                           mode="bicubic").clamp(0, 1).movedim(1, -1)
    box = torch.zeros(1, 64, 64)
    box[:, 18:46, 14:50] = 1
    photo, photo_mask = load_image("img.png"), load_mask("mask.png")
    cases = (("synthetic, unguided", smooth, box, "10", 2, GuidanceSettings(clip_lambda=0.0, range_lambda=0.0)),
             ("example photo, guided", photo, photo_mask, "20", 10,
              GuidanceSettings(augmentations=AugmentationSettings(num_views=2))))
    for name, image, mask, respacing, skip, guidance in cases:
        diffusion = create_diffusion(timestep_respacing=respacing)
        images, captions, titles = [to_pil(image[0])], [[]], ["input"]
        for count in (0, 2):
            out = edit_image(image, mask, unet, diffusion, clip, ["a big rock"], seed=2, num_results=3,
                             settings=SamplerSettings(skip_timesteps=skip, resample_count=count,
                                                      resample_jump_length=2), guidance_settings=guidance)
            scores = metrics.score_edits(out.images.movedim(-1, 1), image.movedim(-1, 1), mask)
            mean = sum(scores.seam_gradient) / len(scores.seam_gradient)
            logging.info("%s, resample_count=%d: seam gradient per result %s, mean %.4f", name, count,
                         ", ".join(f"{v:.4f}" for v in scores.seam_gradient), mean)
            images.append(to_pil(out.images[0]).resize((192, 192), Image.NEAREST)
                          if image.shape[1] == 64 else to_pil(out.images[0]))
            titles.append("resampling off (original)" if count == 0 else f"resample_count {count}, jump 2")
            captions.append([f"seam grad, mean of 3: {mean:.4f} (-)"])
        if image.shape[1] == 64:
            images[0] = images[0].resize((192, 192), Image.NEAREST)
            panel(images, titles, OUT / "resampling.png", captions=captions)


def main(only=None):
    logging.basicConfig(level=logging.INFO)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, make in EXTRA_PICTURES.items():
        if only is None or name in only:
            make()
    if only is not None:
        return
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


EXTRA_PICTURES = {"metrics": metrics_picture, "colour_match": colour_match_picture,
                  "soft_mask": soft_mask_picture, "resampling": resampling_picture}

if __name__ == "__main__":
    import sys

    main(sys.argv[1:] or None)
