"""API prompts for tests: built with ComfyUI's own GraphBuilder, and the shipped workflows made tiny.

Tests run the shipped workflows with the tiny fixture models and a few steps, so `tiny_overrides` says which
widget values change for that; everything else in a workflow runs as a user would run it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from workflow_format import fill_defaults, set_widget_value, widget_values_by_name

from .errors import HarnessError
from .locate import REPO_ROOT, find_comfyui, use_comfyui
from .workspace import CLIP_TINY_NAME, GD_TINY_NAME

SAMPLER = "BlendedDiffusion_Sampler"


def graph_builder():
    """ComfyUI's GraphBuilder with plain node ids: "1", "2", ... in the order added, or the ids given."""
    comfy_dir = find_comfyui()
    if comfy_dir is None:
        raise HarnessError("ComfyUI not found: run `bash scripts/setup_env.sh --test` or set COMFYUI_PATH")
    use_comfyui(comfy_dir)
    from comfy_execution.graph_utils import GraphBuilder

    return GraphBuilder(prefix="")


def tiny_edit_prompt(node_defs: dict, *, seed: int = 1, respacing: str = "6", skip_timesteps: int = 1,
                     num_results: int = 1, text: str = "a red rock", image: str = "blended_example_img.png",
                     mask: str = "blended_example_mask.png", **sampler_inputs) -> dict:
    """A complete edit with the tiny models: photo + white-is-edit mask -> sampler -> SaveImage.

    Node ids are fixed so tests can find them: "1" image, "2" mask, "3" UNet, "4" CLIP, "5" guidance,
    "6" sampler, "7" SaveImage of the edits.
    """
    g = graph_builder()
    photo = g.node("LoadImage", image=image)
    white_is_edit = g.node("LoadImageMask", image=mask, channel="red")
    unet = g.node("BlendedDiffusion_LoadGuidedDiffusion", model_name=GD_TINY_NAME)
    clip = g.node("BlendedDiffusion_LoadCLIP", clip_name=CLIP_TINY_NAME)
    guidance = g.node("BlendedDiffusion_CLIPGuidance", clip=clip.out(0), prompt=text)
    sampler = g.node(SAMPLER, model=unet.out(0), guidance=guidance.out(0), image=photo.out(0),
                     mask=white_is_edit.out(0), seed=seed, num_results=num_results, respacing=respacing,
                     skip_timesteps=skip_timesteps, **sampler_inputs)
    g.node("SaveImage", images=sampler.out(0), filename_prefix="blended_test")
    return fill_defaults(g.finalize(), node_defs)


def tiny_overrides(class_type: str, current: dict) -> dict:
    """Widget values that make a node of a shipped workflow run in seconds with the tiny models.

    `current` holds the node's present widget values; only values that exist are changed.
    """
    changes: dict[str, Any] = {}
    if class_type == "BlendedDiffusion_LoadGuidedDiffusion":
        changes["model_name"] = GD_TINY_NAME
    elif class_type == "BlendedDiffusion_LoadCLIP":
        changes["clip_name"] = CLIP_TINY_NAME
    elif class_type == SAMPLER:
        changes["respacing"] = "4"
        changes["skip_timesteps"] = min(int(current.get("skip_timesteps", 0)), 1)
        changes["num_results"] = min(int(current.get("num_results", 1)), 2)
        if int(current.get("capture_every", 0)) > 0:
            changes["capture_every"] = 1
    if isinstance(current.get("num_views"), int):
        changes["num_views"] = min(current["num_views"], 2)
    return {name: value for name, value in changes.items() if name in current}


def shrink_prompt(prompt: dict) -> dict:
    """An API prompt with every node's tiny_overrides applied (a copy)."""
    shrunk = json.loads(json.dumps(prompt))
    for entry in shrunk.values():
        widget_values = {k: v for k, v in entry["inputs"].items() if not isinstance(v, list)}
        entry["inputs"].update(tiny_overrides(entry["class_type"], widget_values))
    return shrunk


def shrink_ui_workflow(workflow: dict, node_defs: dict) -> dict:
    """A UI workflow with every node's tiny_overrides applied to its widgets_values (a copy)."""
    shrunk = json.loads(json.dumps(workflow))
    for node in shrunk.get("nodes", []):
        node_def = node_defs.get(node["type"])
        if node_def is None or node.get("widgets_values") is None:
            continue
        current = widget_values_by_name(node, node_def)
        for name, value in tiny_overrides(node["type"], current).items():
            set_widget_value(node, node_def, name, value)
    return shrunk


def load_workflow(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def workflow_files() -> list[Path]:
    return sorted((REPO_ROOT / "workflows").glob("*.json"))
