"""Fetch the guided-diffusion checkpoints and the CLIP models (ViT-B/16; ViT-L/14 for the CLIP ensemble
workflow) into ComfyUI's model folders.

    PYTHONPATH=. .venv/bin/python scripts/download_models.py --comfyui /path/to/ComfyUI [--dry-run]
    bash scripts/start.sh --download-models          # the same, into start.sh's ComfyUI, then starts it

Files are saved under the names the shipped workflows use (README, "Models"), from their official public
locations, or from a mirror holding them under those names (--base-url: a URL or a local folder). Interrupted
downloads resume (run it again). Files already there are left alone, also one smaller than the model (a truncated
download, or another file): it is reported, and the exit status is 1 until it is moved away. --dry-run only says
what is missing and where it would go.
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
                                           "official locations): a URL, or a local folder")
    parser.add_argument("--dry-run", action="store_true", help="say what is missing and where it would go")
    args = parser.parse_args(argv)
    if args.models_dir is None and args.comfyui is None:
        parser.error("say where ComfyUI is: --comfyui PATH (or COMFYUI_PATH), or --models-dir PATH")
    if args.models_dir is None and not Path(args.comfyui).is_dir():
        # A mistyped path would otherwise get a new models/ tree and gigabytes nobody's ComfyUI reads.
        typed = any(str(a).startswith("--comfyui") for a in (sys.argv[1:] if argv is None else argv))
        given = "--comfyui" if typed else "$COMFYUI_PATH"
        parser.error(f"{given} {args.comfyui}: no such folder (give the folder holding ComfyUI's main.py; "
                     "for a models/ folder of your own, use --models-dir)")
    if args.base_url:
        try:
            download.mirror_url(args.base_url)
        except download.DownloadError as exc:
            parser.error(f"--base-url: {exc}")
    if not selected(args):  # else it would say nothing and succeed
        parser.error("nothing to fetch: --only names no required model, and --required-only skips the others")
    return args


def selected(args: argparse.Namespace) -> list:
    """The model files asked for: --only's (default all), less the optional ones with --required-only."""
    models = [model_file(name) for name in args.only] if args.only else list(MODEL_FILES)
    return [m for m in models if m.required] if args.required_only else models


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="[models] %(message)s")
    args = parse_args(argv)
    # Absolute in every message: "to ../../models/..." does not tell a user which ComfyUI gets the files.
    models_dir = Path(args.models_dir or Path(args.comfyui) / "models").resolve()
    planned = download.plan(selected(args), models_dir, base_url=args.base_url)
    missing = [item for item in planned if not item.present and not item.in_the_way]
    in_the_way = [item for item in planned if item.in_the_way]
    for item in planned:
        report(item, args.dry_run)
    if args.dry_run:
        log.info("%d of %d file(s) missing", len(missing) + len(in_the_way), len(planned))
        return 0
    failed = fetch_all(missing)
    if in_the_way:
        log.error("%d file(s) left alone (see above): move them away and run the script again", len(in_the_way))
    if failed:
        log.error("%d file(s) failed; run the script again to resume", failed)
    return 1 if failed or in_the_way else 0


def report(item: download.Planned, dry_run: bool) -> None:
    """One file's plan: present, in the way, or where it comes from and goes."""
    if item.present:
        log.info("present: %s", item.path)
    elif item.in_the_way:
        log.warning("%s", item.in_the_way)
    else:
        resume = f", resuming after {item.resume_from / 1e9:.2f} GB" if item.resume_from else ""
        verb = "would download" if dry_run else "downloading"
        log.info("%s %s (at least %.2f GB%s)\n    from %s\n    to   %s", verb, item.model.name,
                 item.model.min_bytes / 1e9, resume, item.url, item.path)


def fetch_all(missing: list) -> int:
    """Fetch each file, going on after a failure; returns how many failed. Ctrl-C keeps the .part to resume."""
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
        except KeyboardInterrupt:
            bar.close()
            log.error("interrupted: what arrived (if anything) is kept in %s.part; run the script again to resume",
                      item.path)
            raise SystemExit(130) from None
        bar.close()
        log.info("saved %s", item.path)
    return failed


if __name__ == "__main__":
    sys.exit(main())
