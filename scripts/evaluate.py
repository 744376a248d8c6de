"""Score a folder of edits with the same metrics as the Edit Metrics node, and print a table.

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

Images are read upright, as ComfyUI's Load Image shows them (EXIF orientation), 16-bit greyscale at its full
range. A case that cannot be scored (no mask, a result of another size, an unreadable file) is reported and the
others are still scored; the exit status is 1 if any case failed or a folder given holds no case.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from blended import metrics
from blended.errors import BlendedInputError, CheckpointError

log = logging.getLogger("evaluate")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


# Pillow's modes for one channel of more than 8 bits (16-bit greyscale PNGs): convert("RGB") or ("L") would clip
# every value above 255 to white.
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _open(path: Path) -> Image.Image:
    """The image upright, as Load Image shows it (a phone's JPEG is stored sideways with an EXIF rotation)."""
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise BlendedInputError(f"cannot read {path} as an image ({exc})") from exc


def _grey(image: Image.Image) -> np.ndarray:
    """[H,W] float32 0..1 luminance, 16-bit greyscale at its full range."""
    if image.mode in _WIDE_GREY:
        return np.asarray(image, dtype=np.float32) / 65535
    return np.asarray(image.convert("L"), dtype=np.float32) / 255


def read_image(path: Path) -> torch.Tensor:
    """[1,3,H,W] float32 0..1 (alpha dropped, as Load Image's IMAGE output drops it)."""
    image = _open(path)
    if image.mode in _WIDE_GREY:
        array = np.repeat(_grey(image)[..., None], 3, axis=-1)
    else:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def read_mask(path: Path) -> torch.Tensor:
    """[1,H,W] float32 0..1: white (> 0) = edited, as on black; transparent counts as black.

    Not the alpha channel alone: a white-on-black mask saved with an opaque alpha (many editors save RGBA)
    would read as one edited region covering the whole picture.
    """
    image = _open(path)
    mask = _grey(image)
    if "A" in image.getbands() or "transparency" in image.info:
        mask = mask * np.asarray(image.convert("RGBA").getchannel("A"), dtype=np.float32) / 255
    if not mask.any():
        raise BlendedInputError(f"{path} is all black (or transparent): paint the edited region white (> 0) on "
                                "black")
    return torch.from_numpy(mask)[None]


def find_cases(folders) -> tuple[list[Path], list[Path], list[Path]]:
    """(the case folders among ``folders``, each a case or a folder of cases; the folders that hold none; the
    case folders skipped for want of their input image).

    A folder that holds none, or a case without its input, is an error, not a silence: else a mistyped path, or
    a case whose input is named image.jpg, would score nothing and the run would still succeed.
    """
    cases, empty, skipped = [], [], []
    for folder in map(Path, folders):
        if _input_path(folder) is not None:
            cases.append(folder)
            continue
        subfolders = sorted(sub for sub in folder.iterdir() if sub.is_dir()) if folder.is_dir() else []
        found = [sub for sub in subfolders if _input_path(sub) is not None]
        half_made = [sub for sub in subfolders
                     if sub not in found and ((sub / "results").is_dir() or (sub / "mask.png").is_file())]
        cases.extend(found)
        skipped.extend(half_made)
        if not found and not half_made:
            empty.append(folder)
    return cases, empty, skipped


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
    files = sorted(p for p in (folder / "results").glob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise BlendedInputError(f"{folder / 'results'} holds no result images ({', '.join(IMAGE_SUFFIXES)})")
    results = torch.cat([_same_size(read_image(p), image, p) for p in files])
    prompt_file = folder / "prompt.txt"
    # utf-8-sig: Windows' Notepad starts a UTF-8 file with a byte-order mark, which would become part of the prompt.
    prompt = prompt_file.read_text(encoding="utf-8-sig") if prompt_file.is_file() else None
    scores = metrics.score_edits(results, image, mask, clip=clip, prompt=prompt, lpips_model=lpips_model,
                                 ring_width=ring_width)
    return [p.name for p in files], scores


def _same_size(result: torch.Tensor, image: torch.Tensor, path: Path) -> torch.Tensor:
    """A result must be the input's size; name the file that is not (else torch.cat fails with a traceback)."""
    if result.shape[-2:] != image.shape[-2:]:
        raise BlendedInputError(f"{path} is {result.shape[-1]}x{result.shape[-2]}, but the input is "
                                f"{image.shape[-1]}x{image.shape[-2]}: score results at the size of the image they "
                                "were made from")
    return result


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="case folders, or folders of case folders")
    parser.add_argument("--clip", help="CLIP weights for similarity and diversity (a file Load CLIP reads)")
    parser.add_argument("--lpips", action="store_true", help="add background LPIPS (needs lpips + VGG16 weights)")
    parser.add_argument("--ring-width", type=_positive, default=metrics.DEFAULT_RING_WIDTH,
                        help="seam ring: pixels on each side of the mask border")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    cases, empty, skipped = find_cases(args.folders)
    for folder in empty:
        log.error("%s: %s", folder, "no case in it (a case is a folder with image.png or input.png, mask.png and "
                  "results/)" if folder.is_dir() else "no such folder")
    for folder in skipped:
        log.error("%s: not scored, it has no image.png or input.png (the input the edits were made from)", folder)
    if not cases:
        return 1
    try:
        clip, lpips_model = _models(args)
    except (BlendedInputError, CheckpointError) as exc:
        log.error("%s", exc)
        return 1
    failed = 0
    for case in cases:
        try:
            names, scores = score_case(case, clip=clip, lpips_model=lpips_model, ring_width=args.ring_width)
        except BlendedInputError as exc:  # one bad case is reported; the others are still scored
            log.error("%s: %s", case, exc)
            failed += 1
            continue
        sys.stdout.write(f"\n== {case}\n{scores.table(names)}\n")
    failed += len(skipped)
    if failed:
        log.error("%d of %d case(s) could not be scored (see above)", failed, len(cases) + len(skipped))
    return 1 if failed or empty else 0


def _models(args):
    """(CLIP or None, LPIPS or None) as the options ask, with a message for the user on a bad file."""
    clip = None
    if args.clip:
        from blended.clip_model import load_guidance_clip
        clip = load_guidance_clip(args.clip)
    lpips_model = None
    if args.lpips:
        from blended.lpips_loss import load_lpips
        lpips_model = load_lpips("run without --lpips")
    return clip, lpips_model


if __name__ == "__main__":
    # Scores for a folder named in any script, also when stdout is a file in a legacy Windows code page.
    sys.stdout.reconfigure(errors="backslashreplace")
    sys.exit(main())
