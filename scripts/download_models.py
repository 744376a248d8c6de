"""Fetch the guided-diffusion checkpoints and the CLIP models (ViT-B/16; ViT-L/14 for the CLIP ensemble
workflow) into ComfyUI's model folders.

    PYTHONPATH=. .venv/bin/python scripts/download_models.py --comfyui /path/to/ComfyUI [--dry-run]
    bash scripts/start.sh --download-models          # the same, into start.sh's ComfyUI, then starts it

Files are saved under the names the shipped workflows use (README, "Models"), from their official public
locations, or from a mirror holding them under those names (--base-url). Interrupted downloads resume.
Files already present are left alone. --dry-run only says what is missing and where it would go.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from blended import download
from blended.model_files import MODEL_FILES, model_file

log = logging.getLogger("download_models")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--comfyui", type=Path, default=os.environ.get("COMFYUI_PATH") or None,
                       help="ComfyUI folder; files go to its models/ (default: $COMFYUI_PATH)")
    where.add_argument("--models-dir", type=Path, help="a models/ folder (e.g. one extra_model_paths.yaml names)")
    parser.add_argument("--only", action="append", metavar="NAME", choices=[m.name for m in MODEL_FILES],
                        help="fetch only this file (repeatable; default: all of them)")
    parser.add_argument("--required-only", action="store_true",
                        help="only the required models (256x256_diffusion_uncond.pt, ViT-B-16): every shipped "
                             "workflow but the CLIP ensemble (13), which also needs ViT-L-14")
    parser.add_argument("--base-url", help="a mirror holding the files under their names (instead of the "
                                           "official locations)")
    parser.add_argument("--dry-run", action="store_true", help="say what is missing and where it would go")
    args = parser.parse_args(argv)
    if args.models_dir is None and args.comfyui is None:
        parser.error("say where ComfyUI is: --comfyui PATH (or COMFYUI_PATH), or --models-dir PATH")
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="[models] %(message)s")
    args = parse_args(argv)
    models_dir = args.models_dir or Path(args.comfyui) / "models"
    models = [model_file(name) for name in args.only] if args.only else list(MODEL_FILES)
    if args.required_only:
        models = [m for m in models if m.required]
    planned = download.plan(models, models_dir, base_url=args.base_url)
    missing = [item for item in planned if not item.present]
    for item in planned:
        if item.present:
            log.info("present: %s", item.path)
        else:
            resume = f", resuming after {item.resume_from / 1e9:.2f} GB" if item.resume_from else ""
            verb = "would download" if args.dry_run else "downloading"
            log.info("%s %s (at least %.2f GB%s)\n    from %s\n    to   %s", verb, item.model.name,
                     item.model.min_bytes / 1e9, resume, item.url, item.path)
    if args.dry_run:
        log.info("%d of %d file(s) missing", len(missing), len(planned))
        return 0
    failed = 0
    for item in missing:
        bar = download.ProgressBar(item.model.name)
        try:
            download.fetch(item, progress=bar)
        except download.DownloadError as exc:
            bar.close()
            log.error("%s", exc)
            failed += 1
            continue
        bar.close()
        log.info("saved %s", item.path)
    if failed:
        log.error("%d file(s) failed; run the script again to resume", failed)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
