"""Throw-away model, input and output folders for one ComfyUI run, holding the tiny fixture models."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from .errors import HarnessError
from .locate import FIXTURES, PACK_DIR_NAME, REPO_ROOT, pack_is_linked

# The tiny models the harness installs, as (ComfyUI folder, file name, fixture it is copied from).
TINY_MODELS = (
    ("guided_diffusion", "gd_tiny.safetensors", FIXTURES / "reference" / "gd_tiny" / "model.safetensors"),
    ("clip_guidance", "clip_tiny.safetensors", FIXTURES / "reference" / "clip_tiny" / "model.safetensors"),
)
GD_TINY_NAME = TINY_MODELS[0][1]
CLIP_TINY_NAME = TINY_MODELS[1][1]

# Example photos, under the names the shipped workflows' LoadImage nodes use.
EXAMPLE_IMAGES = {
    "blended_example_img.png": FIXTURES / "examples" / "img.png",
    "blended_example_mask.png": FIXTURES / "examples" / "mask.png",
    "blended_example_img2.png": FIXTURES / "examples" / "img2.png",
    "blended_example_mask2.png": FIXTURES / "examples" / "mask2.png",
    "blended_example_scribble.png": FIXTURES / "examples" / "scribble.png",
    "blended_example_dogs_mask.png": FIXTURES / "examples" / "dogs_mask.png",
}


@dataclasses.dataclass(frozen=True)
class ComfyWorkspace:
    """Throw-away directories for one ComfyUI run, so tests never write into the repo or ComfyUI's tree."""

    root: Path
    models_dir: Path
    input_dir: Path
    output_dir: Path
    temp_dir: Path
    user_dir: Path
    extra_model_paths: Path


def build_workspace(root: Path, comfy_dir: Path | None = None) -> ComfyWorkspace:
    """Create models (tiny fixtures), input (example photos), output/temp/user dirs and the extra-paths yaml.

    The yaml registers our two model folders under a base_path, as a user would; it also adds a
    `custom_nodes:` entry pointing at a folder holding a link to this repo when ComfyUI does not already
    load the pack from its own custom_nodes/ (loading it twice would register every node twice).
    """
    root = Path(root)
    models_dir = root / "models"
    for folder, name, source in TINY_MODELS:
        if not source.is_file():
            raise HarnessError(f"missing test fixture {source}: the repo checkout is incomplete")
        (models_dir / folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, models_dir / folder / name)
    input_dir = root / "input"
    input_dir.mkdir(parents=True, exist_ok=True)
    for name, source in EXAMPLE_IMAGES.items():
        shutil.copyfile(source, input_dir / name)
    output_dir, temp_dir, user_dir = root / "output", root / "temp", root / "user"
    for d in (output_dir, temp_dir, user_dir):
        d.mkdir(parents=True, exist_ok=True)

    lines = [
        "blended_diffusion_tests:",
        f"  base_path: {json.dumps(str(models_dir))}",
        "  guided_diffusion: guided_diffusion",
        "  clip_guidance: clip_guidance",
    ]
    if comfy_dir is not None and not pack_is_linked(comfy_dir):
        custom_nodes = root / "custom_nodes"
        custom_nodes.mkdir(exist_ok=True)
        link = custom_nodes / PACK_DIR_NAME
        if not link.exists():
            link.symlink_to(REPO_ROOT, target_is_directory=True)
        lines += ["blended_diffusion_pack:", f"  custom_nodes: {json.dumps(str(custom_nodes))}"]
    extra = root / "extra_model_paths.yaml"
    extra.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ComfyWorkspace(root, models_dir, input_dir, output_dir, temp_dir, user_dir, extra)
