"""Score a folder of edits with the same metrics as the Blended Edit Metrics node, and print a table.

One case per folder:

    case/
      image.png      the input the edits were made from (or input.png)
      mask.png       the edited region: white (> 0) = edited, black = background
      prompt.txt     optional: the prompt, one line (or one line per result)
      results/       the edits to score (.png/.jpg/.webp), same size as image.png, scored in name order

Give one or more case folders, or a folder of case folders:

    PYTHONPATH=. .venv/bin/python scripts/evaluate.py cases/ --clip models/clip_guidance/ViT-B-16.safetensors

Without --clip the CLIP similarity and diversity columns are n/a. LPIPS is added with --lpips when the
``lpips`` package and torchvision's VGG16 weights are installed (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from blended import metrics
from blended.errors import BlendedInputError

log = logging.getLogger("evaluate")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def read_image(path: Path) -> torch.Tensor:
    """[1,3,H,W] float32 0..1."""
    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def read_mask(path: Path) -> torch.Tensor:
    """[1,H,W] float32 0..1 from the image's luminance (or alpha when it has one)."""
    image = Image.open(path)
    channel = image.getchannel("A") if "A" in image.getbands() else image.convert("L")
    return torch.from_numpy(np.asarray(channel, dtype=np.float32) / 255)[None]


def find_cases(folders) -> list[Path]:
    cases = []
    for folder in map(Path, folders):
        if _input_path(folder) is not None:
            cases.append(folder)
        elif folder.is_dir():
            cases.extend(sorted(sub for sub in folder.iterdir() if sub.is_dir() and _input_path(sub) is not None))
    return cases


def _input_path(folder: Path):
    for name in ("image.png", "input.png"):
        if (folder / name).is_file():
            return folder / name
    return None


def score_case(folder: Path, clip=None, lpips_model=None, ring_width: int = metrics.DEFAULT_RING_WIDTH):
    """(result file names, EditScores) for one case folder."""
    image = read_image(_input_path(folder))
    if not (folder / "mask.png").is_file():
        raise BlendedInputError(f"{folder} has no mask.png (white = edited region)")
    mask = read_mask(folder / "mask.png")
    files = sorted(p for p in (folder / "results").glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise BlendedInputError(f"{folder / 'results'} holds no result images ({', '.join(IMAGE_SUFFIXES)})")
    results = torch.cat([read_image(p) for p in files])
    prompt_file = folder / "prompt.txt"
    prompt = prompt_file.read_text(encoding="utf-8") if prompt_file.is_file() else None
    scores = metrics.score_edits(results, image, mask, clip=clip, prompt=prompt, lpips_model=lpips_model,
                                 ring_width=ring_width)
    return [p.name for p in files], scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="case folders, or folders of case folders")
    parser.add_argument("--clip", help="CLIP weights for similarity and diversity (a file Load CLIP reads)")
    parser.add_argument("--lpips", action="store_true", help="add background LPIPS (needs lpips + VGG16 weights)")
    parser.add_argument("--ring-width", type=int, default=metrics.DEFAULT_RING_WIDTH,
                        help="seam ring: pixels on each side of the mask border")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    cases = find_cases(args.folders)
    if not cases:
        log.error("no case folder found (a folder with image.png, mask.png and results/)")
        return 1
    clip = None
    if args.clip:
        from blended.clip_model import load_guidance_clip
        clip = load_guidance_clip(args.clip)
    lpips_model = None
    if args.lpips:
        from blended.lpips_loss import load_lpips
        lpips_model = load_lpips()
    for case in cases:
        names, scores = score_case(case, clip=clip, lpips_model=lpips_model, ring_width=args.ring_width)
        sys.stdout.write(f"\n== {case}\n{scores.table(names)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
