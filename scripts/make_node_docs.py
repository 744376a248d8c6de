"""Writes the node help pages in web/docs/ from the live node definitions and the text kept here.

ComfyUI's frontend shows a custom node's help page (node library: the node's "?" button; or the info button of a
selected node) from `/extensions/<pack folder>/docs/<NODE_CLASS>.md`, and ComfyUI serves `/extensions/<pack
folder>/` from the pack's WEB_DIRECTORY, `web/`. A page replaces the frontend's fallback (the node's description
and its inputs and outputs with their tooltips), so each page keeps all of that and adds what the fallback cannot
say: how the node is wired to the others, the original's defaults and when to change them, tips, and the shipped
workflows that show it.

Each page is the node's display name and DESCRIPTION, the hand-written part below (PAGES), the shipped workflows
that show the node, and lists of its inputs and outputs read from the live definitions (INPUT_TYPES with their
optional inputs, RETURN_NAMES, RETURN_TYPES, OUTPUT_TOOLTIPS), so that they never drift. Run after changing a
node's inputs, outputs, tooltips or description, or the workflows:

    PYTHONPATH=. .venv/bin/python scripts/make_node_docs.py

A test (tests/test_node_docs.py) checks that the committed pages are what this script writes.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import NamedTuple

from workflow_format import input_options, is_widget, node_info_v1

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "web" / "docs"
WORKFLOW_DIR = REPO / "workflows"

# Combo inputs that list the files of a model folder: their choices (and so their first, default, entry) depend on
# the installation, so the page names the folder instead.
MODEL_FOLDER_INPUTS = {
    ("BlendedDiffusion_LoadGuidedDiffusion", "model_name"): "guided_diffusion",
    ("BlendedDiffusion_LoadCLIP", "clip_name"): "clip_guidance",
}


class Page(NamedTuple):
    """The hand-written part of a node's help page, in Markdown."""

    about: tuple[str, ...]  # 1-3 short paragraphs: what it is for, how it is wired, its defaults
    tips: tuple[str, ...]
    # (workflow file name without .json, what it shows of this node); each must use the node
    workflows: tuple[tuple[str, str], ...] = ()
    no_workflow: str = ""  # said instead when none of the shipped workflows uses the node


PAGES = {
    "BlendedDiffusion_LoadGuidedDiffusion": Page(
        about=(
            "**In a graph.** The first node of every edit: its `model` output goes to the **Sampler**'s `model` "
            "input. Blended Diffusion uses OpenAI's unconditional 256x256 ImageNet model, "
            "`256x256_diffusion_uncond.pt`, in `models/guided_diffusion/`; the pack's "
            "`scripts/download_models.py` fetches it (README, *Models*).",
            "ComfyUI's model memory manager loads and offloads the model like its own models. A file that is not "
            "a guided-diffusion UNet is refused with a message naming it.",
        ),
        tips=(
            "Leave `attention_order` on `auto` and `head_channels` on 0: the architecture is read from the "
            "weights, and OpenAI's releases are recognised. Only for another checkpoint set them, or put a "
            "`config.json` (the original's `create_model_and_diffusion` arguments) beside the file; the widgets "
            "win over the file.",
            "A `config.json` also sets the noise schedule (`noise_schedule`, `diffusion_steps`); without one it "
            "is linear over 1000 steps, as in OpenAI's releases (cosine for the recognised 64x64 release).",
            "The class-conditional `256x256_diffusion.pt` and `512x512_diffusion.pt` (optional downloads) load "
            "too; the Sampler then draws a random class for every result at every step, as the original does.",
            "A file missing from the folder is refused when you queue, with the folder it belongs in. After "
            "adding a file, press R to refresh the list.",
        ),
        workflows=(
            ("01_ranked_results", "32 results for one prompt, ranked by CLIP: the paper's basic use."),
        ),
    ),
    "BlendedDiffusion_LoadCLIP": Page(
        about=(
            "**In a graph.** Its `clip` output goes to **CLIP Guidance**'s `clip`, and to **CLIP Rank**, "
            "**CLIP List** and **Edit Metrics** where you use them. Blended Diffusion guides and ranks with "
            "OpenAI's ViT-B/16: `ViT-B-16.safetensors` in `models/clip_guidance/`, which the pack's "
            "`scripts/download_models.py` fetches.",
            "This is not ComfyUI's core Load CLIP: its output type, `GUIDANCE_CLIP`, connects only to this pack's "
            "nodes. One loader can feed every node that uses the same CLIP.",
        ),
        tips=(
            "`activation` must match the weights, which cannot show it: `quick_gelu` for OpenAI's weights and "
            "open_clip models named `-quickgelu`, `gelu` for the other open_clip models (e.g. LAION, DataComp).",
            "For a fair judge in CLIP Rank or Edit Metrics, load a second, different CLIP, e.g. "
            "`ViT-L-14.safetensors` (an optional download): guidance optimises its own CLIP and can fool it.",
            "Other copies of the same weights load too: an open_clip `.bin`, or OpenAI's `ViT-B-16.pt`, read "
            "without running its code.",
        ),
        workflows=(
            ("01_ranked_results", "one CLIP guides the edit and ranks the results."),
            ("13_clip_ensemble", "a second loader with ViT-L/14 joins the guidance and ranks the results."),
            ("15_edit_metrics", "a loader of its own for the metrics' judge."),
        ),
    ),
    "BlendedDiffusion_Augmentations": Page(
        about=(
            "**In a graph.** Optional: connect `augmentations` to **CLIP Guidance**'s `augmentations` input. "
            "Without it CLIP Guidance makes its views with these defaults and its own `num_views`; with it, CLIP "
            "Guidance's `num_views` is ignored.",
            "**Defaults** are the original code's: leaving the node out, or at its defaults, gives the original's "
            "views. More views give steadier guidance at more CLIP work per step.",
        ),
        tips=(
            "`num_views` 1 is the clean view alone, without the augmentations' guard against adversarial "
            "pixels.",
            "`fix_translate` on shifts the views both ways; off reproduces the original, whose `translate` "
            "kornia applies vertically only.",
            "Warping each view once instead of twice (less blur) is the **Speed** node's `single_resample`.",
            "**CLIP List** nodes keep their own `num_views`; the other settings here apply to every CLIP.",
        ),
        no_workflow=("None of the shipped workflows uses it: they keep the original's views through CLIP "
                     "Guidance's own `num_views`."),
    ),
    "BlendedDiffusion_CLIPGuidance": Page(
        about=(
            "**In a graph.** `clip` comes from **Load CLIP (guidance)**; `guidance` goes to the **Sampler**'s "
            "`guidance` input. The optional inputs take the other guidance nodes: **CLIP Augmentations** "
            "(`augmentations`), **CLIP List** (`more_clips`), **Guidance Schedule** (`schedule`), and a reference "
            "picture, e.g. from core Load Image (`image_target`, with `image_target_mask`).",
            "**Defaults** are the original code's: CLIP loss weight 1000, range loss 50, 8 views per step (1 clean "
            "+ 7 augmented), no background losses. With none of the optional inputs connected the loss is "
            "exactly the original's.",
        ),
        tips=(
            "Describe the masked region as it should look after the edit (`a big rock`), not the change you "
            "want.",
            "Several lines are several prompts, each with its own `num_results` results; result *i* of every "
            "line starts from the same noise, so the lines' results differ only by the text.",
            "Weighted parts within one line: `a big rock:1.0 | moss:0.5 | blurry:-0.5`; a negative weight pushes "
            "the edit away from that text. `\\:` and `\\|` write a literal colon and bar; a part ending in a ratio "
            "or a time (`a photo 16:9`) is refused as ambiguous until it is written `16\\:9` (text) or `16 :9` "
            "(weight 9).",
            "`clip_lambda` sets how hard the prompt pulls: raise it when the results ignore the prompt. Very high "
            "weights can blow up; a **Guidance Schedule** with a gradient guard holds them.",
            "`background_l2_lambda` and `background_lpips_lambda` are for the Sampler's `local` mode (the "
            "paper's baseline): in `blended` mode the background is kept by blending. The original's "
            "`--background_preservation_loss` uses 10000 and 1000.",
            "Give **CLIP Rank** and **Edit Metrics** the same prompt as this node.",
        ),
        workflows=(
            ("02_different_prompts", "one prompt per line, each with its own results."),
            ("11_weighted_negative_prompts", "weighted and negative prompt parts next to the plain prompt."),
            ("12_image_target", "an empty prompt and the masked part of a reference picture as the target."),
            ("13_clip_ensemble", "a second CLIP through `more_clips`."),
            ("14_guidance_schedule", "`clip_lambda` 2000 with a schedule and a gradient guard."),
        ),
    ),
    "BlendedDiffusion_CLIPList": Page(
        about=(
            "**In a graph.** Each CLIP List takes a CLIP from its own **Load CLIP (guidance)** node. Chain "
            "several (one list's `clips` output into the next one's `clips` input) and connect the last one's "
            "`clips` output to **CLIP Guidance**'s `more_clips`.",
            "CLIP Guidance's own `clip` counts with weight 1, so the loss of a listed CLIP with `weight` 0.5 counts "
            "half as much as the main one's. The original guides with one CLIP: without this node nothing changes.",
        ),
        tips=(
            "Each listed CLIP adds its views' forward and backward pass to every step: a few views keep the "
            "cost down.",
            "The other augmentation settings (rotation, shift, perspective) are CLIP Guidance's, from its **CLIP "
            "Augmentations** node when one is connected.",
            "Set each loader's `activation` to match its weights.",
            "Rank or score the results with one of the listed CLIPs to judge by another model than the main "
            "one.",
        ),
        workflows=(
            ("13_clip_ensemble", "ViT-L/14 (weight 0.5, 4 views) guiding beside ViT-B/16, and ranking the "
                                 "results."),
        ),
    ),
    "BlendedDiffusion_GuidanceSchedule": Page(
        about=(
            "**In a graph.** Connect `schedule` to **CLIP Guidance**'s `schedule` input. At each step the Sampler "
            "runs, the schedule's value multiplies CLIP Guidance's `clip_lambda`: `linear` with `1.5, 0.2` pulls "
            "with 1.5 times the weight at the first step and 0.2 times at the last.",
        ),
        tips=(
            "`linear` takes exactly two values (first step, last step); `values` takes any number, spread evenly "
            "over the steps and interpolated between. Values are 0 or more, separated by commas, spaces or "
            "semicolons; a bad entry is refused when you queue, and so is a decimal comma: `0,5` could be 0.5 or "
            "two values, so write `0.5`, or `0, 5` for two (a `linear` schedule needs two, so there `1,0` is "
            "read as 1 and 0).",
            "A common ramp is strong early, to set the layout, and weak late, to spare the details (`linear` "
            "`1.0, 0.2`); the reverse is possible too.",
            "`gradient_guard` `normalize` scales each result's guidance gradient down to an RMS of at most "
            "`limit`, and `clamp` clamps every element to plus or minus `limit`: both guard against blow-ups at "
            "a high `clip_lambda`.",
        ),
        workflows=(
            ("14_guidance_schedule", "`linear` from 1.5 to 0.2 at `clip_lambda` 2000, with `normalize` at "
                                     "0.05."),
        ),
    ),
    "BlendedDiffusion_Sampler": Page(
        about=(
            "**In a graph.** `model` from **Load Guided Diffusion Model**, `guidance` from **CLIP Guidance**, "
            "`image` from core Load Image and `mask` from core Load Image (as Mask), or Load Image's own `MASK` "
            "after painting the region in its mask editor (white = edit). A **Speed** node may go into `speed`. "
            "`images` goes to Save Image or Preview Image, or first to **CLIP Rank** to keep the best; `images` "
            "with `mask` feed **Edit Metrics** and core compositing nodes; `frames` feeds core SaveAnimatedWEBP.",
            "**Defaults** are the original code's: 100 respaced steps with the first 25 skipped (75 run), DDPM, "
            "`blended` mode, the background enforced, seed 404. Two differ: `num_results` is 4 (the original "
            "makes 32 and ranks them), and without a Speed node the Sampler runs a faster setting on a GPU "
            "rather than the original's numerics (on a CPU, the original's).",
        ),
        tips=(
            "`skip_timesteps` trades change for faithfulness: more skipped steps start from a less noisy copy of "
            "the photo and keep more of its shapes and colours. The paper uses 33 for background replacement "
            "and 40 for scribbles; fewer let the edit depart further from what is there.",
            "`skip_timesteps` counts respaced steps: with `respacing` `50`, 12 or 13 skip the same quarter as 25 "
            "of `100`.",
            "For the paper's ranked results set `num_results` to 32 (or the 64 its authors recommend) and chain "
            "CLIP Rank. Result *i* depends only on the seed, *i* and the image's place in the batch, so asking "
            "for more results keeps the first ones.",
            "Out of memory: lower `batch_size`, or set it to 0 (auto), which fits it to the free memory and "
            "starts again smaller if needed. The results do not depend on it.",
            "Big or non-square photos: `region` `mask_crop` edits a square around the mask at the model's "
            "resolution and pastes it back at full size, instead of squashing the whole picture into the "
            "model's square.",
            "A visible seam: `grow_mask` and `feather` soften the paste, `colour_match` `rgb` removes a tinted "
            "outline, `resample_count` harmonises the border (at about `1 + resample_count` times the steps), and "
            "`soft_mask` lets grey mask values fade the edit out.",
            "`invert_mask` edits everything but the mask. `mode` `local` is the paper's baseline without "
            "blending, meant to be paired with CLIP Guidance's `background_l2_lambda`.",
        ),
        workflows=(
            ("01_ranked_results", "32 results ranked by CLIP Rank."),
            ("04_background_replacement", "`invert_mask` on, `skip_timesteps` 33."),
            ("05_scribble_guided", "`skip_timesteps` 40 for a scribble."),
            ("09_high_resolution_crop", "`region` `mask_crop` on a 1000x600 picture, with `grow_mask` and "
                                        "`feather`."),
            ("10_process_animation", "`capture_every` and the `frames` output."),
            ("16_colour_match", "`colour_match` off and `rgb`, side by side."),
            ("17_soft_mask", "`soft_mask` with a blurred mask."),
            ("18_harmonising_resampling", "`resample_count` 0 and 2, side by side."),
        ),
    ),
    "BlendedDiffusion_Speed": Page(
        about=(
            "**In a graph.** Optional: connect `speed` to the **Sampler**'s `speed` input. Its options apply to "
            "that Sampler's runs only, on copies of the loaded models; the loaders' models stay as loaded for "
            "every other node and run.",
            "**Defaults.** Without a Speed node the Sampler already runs a faster setting on a GPU (see above); "
            "on a CPU, the original's. A connected Speed node means exactly what it shows: left at its defaults "
            "it reproduces the original code's numerics (two UNet forwards per step; on a GPU the original's "
            "half-precision scheme), which is slower.",
        ),
        tips=(
            "To reproduce the original's numbers, connect a Speed node at its defaults.",
            "The Sampler's default on a CUDA GPU with bf16, by hand: `precision` `bf16 autocast` with "
            "`reuse_guided_forward`, `channels_last`, `triton_kernels`, `cuda_graphs` and `cudnn_benchmark` on.",
            "On a CPU with AMX, `bf16 autocast` with `reuse_guided_forward` runs about twice as fast as the "
            "defaults (README, *Speed and memory*).",
            "Short of memory: `gradient_checkpointing` (far bigger batches, about a third slower) and "
            "`clip_checkpointing`.",
            "`triton_kernels` needs the `triton` package. If Triton cannot compile the kernels for your GPU, the "
            "run stops with an error that names the option: turn it off.",
        ),
        workflows=(
            ("01_ranked_results", "a bypassed Speed node: select it and press Ctrl+B to use it."),
        ),
    ),
    "BlendedDiffusion_CLIPRank": Page(
        about=(
            "**In a graph.** `images` from the **Sampler**'s `images` (or any IMAGE batch), `clip` from a **Load "
            "CLIP (guidance)** node, `mask` from the Sampler's `mask` output so that only the edited region is "
            "scored, and the same prompt as CLIP Guidance's. `top_k` goes to Save Image, `sorted` to Preview "
            "Image, `scores` to core Preview Any.",
            "**The paper's recipe.** Ask the Sampler for many results (the original makes 32 per prompt; its "
            "authors recommend 64) and keep the best few with `top_k`.",
        ),
        tips=(
            "The scores are CLIP distances: lower is closer to the prompt. Each line gives the rank, the image's "
            "index in the input batch and its distance.",
            "It ranks against one prompt (line breaks count as spaces): with several prompt lines in CLIP "
            "Guidance, every line's results are compared with this one prompt.",
            "A CLIP other than the guiding one is a fairer judge: guidance optimises its own CLIP and can fool "
            "it.",
        ),
        workflows=(
            ("01_ranked_results", "32 results ranked, best first."),
            ("13_clip_ensemble", "ranking with the second CLIP."),
        ),
    ),
    "BlendedDiffusion_EditMetrics": Page(
        about=(
            "**In a graph.** `results` from the **Sampler**'s `images` (or any edits), `image` the input they "
            "were made from, `mask` the Sampler's `mask` output. `clip` (from a **Load CLIP (guidance)** node) "
            "adds the similarity and diversity columns, and `prompt` is what the similarity measures against. "
            "Wire `table` to core Preview Any; the node shows the table too. The FLOAT outputs give one value per "
            "image (diversity: one for the batch) to further nodes.",
            "To compare settings, run the variants with the same seed and score each with its own Edit Metrics "
            "node.",
        ),
        tips=(
            "Judge with a CLIP other than the guiding one (e.g. `ViT-L-14.safetensors`): guidance optimises its "
            "own CLIP and can fool it.",
            "With `enforce_background` on (the default) the Sampler pastes the input back outside the mask "
            "unchanged, so its background PSNR reads inf: the seam columns are where settings differ.",
            "Give it the same prompt lines as CLIP Guidance: each input's results are paired with the lines "
            "group by group.",
            "`scripts/evaluate.py` in the pack's folder computes the same scores for folders of image files.",
        ),
        workflows=(
            ("15_edit_metrics", "the Sampler's hard paste against a soft edge made by core nodes."),
            ("16_colour_match", "`colour_match` off and `rgb`, each scored."),
            ("18_harmonising_resampling", "resampling off and on, each scored."),
        ),
    ),
}

# Markdown's markup characters, escaped so that a tooltip or description shows as the plain text it is.
MARKUP = re.compile(r"([\\`*_\[\]<>|~])")


def plain(text: str) -> str:
    """Plain text as Markdown that shows it unchanged, on one line (a list item's line)."""
    return MARKUP.sub(r"\\\1", " ".join(str(text).splitlines()))


def code(text) -> str:
    """A value as inline code."""
    text = str(text)
    fence = "``" if "`" in text else "`"
    return f"{fence}{text}{fence}"


def value(v) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, (int, float)):
        return str(v)
    return code(v) if v != "" else "empty"


def default_text(node_type: str, name: str, spec) -> str:
    """A widget's default, with a combo's choices or a number's range; empty for a link input."""
    if (node_type, name) in MODEL_FOLDER_INPUTS:
        return f"**Choices:** the files in {code(f'models/{MODEL_FOLDER_INPUTS[node_type, name]}/')}."
    if not is_widget(spec):
        return ""
    options = input_options(spec)
    if isinstance(spec[0], (list, tuple)):
        choices = list(spec[0])
        default = options.get("default", choices[0] if choices else "")
        return f"**Default:** {value(default)}; choices {', '.join(code(c) for c in choices)}."
    text = f"**Default:** {value(options['default'])}" if "default" in options else ""
    if spec[0] in ("INT", "FLOAT") and ("min" in options or "max" in options):
        low, high = value(options.get("min", "")), value(options.get("max", ""))
        text = f"{text} ({low} to {high})" if text else f"**Range:** {low} to {high}"
    return f"{text}." if text else ""


# The help panel is narrow (about a fifth of the window): a table of inputs would need scrolling sideways to reach
# its tooltips, so each input or output is a list item that wraps, its lines apart: name and type, tooltip, default.
ITEM_LINES = "<br>"


def inputs_list(node_type: str, info: dict, section: str) -> list[str]:
    specs = info["input"].get(section, {})
    order = (info.get("input_order") or {}).get(section) or list(specs)
    items = []
    for name in order:
        spec = specs[name]
        type_ = "COMBO" if isinstance(spec[0], (list, tuple)) else spec[0]
        lines = [f"{code(name)} · {plain(type_)}", plain(input_options(spec).get("tooltip", "")),
                 default_text(node_type, name, spec)]
        items.append(f"- {ITEM_LINES.join(line for line in lines if line)}")
    return items


def outputs_list(info: dict) -> list[str]:
    types = list(info["output"])
    names = list(info.get("output_name") or types)
    tooltips = list(info.get("output_tooltips") or [""] * len(types))
    is_list = list(info.get("output_is_list") or [False] * len(types))
    items = []
    for name, type_, tooltip, listed in zip(names, types, tooltips, is_list, strict=True):
        lines = [f"{code(name)} · {plain(type_)}{' list' if listed else ''}", plain(tooltip)]
        items.append(f"- {ITEM_LINES.join(line for line in lines if line)}")
    return items


def workflow_title(workflow: dict) -> str:
    """The heading of a workflow's note (*About this workflow*), without its `##`."""
    for node in workflow.get("nodes", []):
        if node.get("type") == "MarkdownNote":
            first = (node.get("widgets_values") or [""])[0].strip().splitlines()
            if first and first[0].startswith("#"):
                return first[0].lstrip("#").strip()
    return ""


def workflows_section(node_type: str, page: Page, workflows: dict[str, dict]) -> list[str]:
    using = sorted(name for name, workflow in workflows.items()
                   if any(node.get("type") == node_type for node in workflow.get("nodes", [])))
    for name, _ in page.workflows:
        if name not in using:
            raise ValueError(f"{node_type}'s page names workflow {name!r}, which "
                             f"{'does not use the node' if name in workflows else 'is not in workflows/'}")
    lines = ["## Shipped workflows", ""]
    if not using:
        if not page.no_workflow or page.workflows:
            raise ValueError(f"no shipped workflow uses {node_type}: its page must say so (no_workflow)")
        return lines + [page.no_workflow]
    if not page.workflows:
        raise ValueError(f"{node_type} is in workflows {using}: its page must name the ones that show it")
    shown = [name for name, _ in page.workflows]
    count = "all" if len(using) == len(workflows) else f"{len(using)} of the"
    best = "; these show it best" if len(shown) < len(using) else ""
    lines.append(f"Used in {count} {len(workflows)} shipped workflows{best}. ComfyUI's template browser lists the "
                 "workflows under this pack, and each opens with a note that says what it shows.")
    lines.append("")
    for name, what in page.workflows:
        title = workflow_title(workflows[name])
        lines.append(f"- {code(name)}{f' (*{plain(title)}*)' if title else ''}: {what}")
    return lines


def render(node_type: str, info: dict, page: Page, workflows: dict[str, dict]) -> str:
    lines = [f"# {plain(info.get('display_name') or node_type)}", ""]
    if str(info.get("description") or "").strip():
        lines += [plain(info["description"]), ""]
    for paragraph in page.about:
        lines += [paragraph, ""]
    lines += ["## Tips", ""] + [f"- {tip}" for tip in page.tips] + [""]
    lines += workflows_section(node_type, page, workflows) + [""]
    lines += ["## Inputs", ""] + inputs_list(node_type, info, "required") + [""]
    if info["input"].get("optional"):
        lines += ["## Optional inputs", ""] + inputs_list(node_type, info, "optional") + [""]
    lines += ["## Outputs", ""] + outputs_list(info)
    return "\n".join(lines) + "\n"


def build_all(infos: dict[str, dict], workflows: dict[str, dict]) -> dict[str, str]:
    """Each node's page (Markdown) by node class name, from its /object_info entry and PAGES."""
    missing, unknown = sorted(set(infos) - set(PAGES)), sorted(set(PAGES) - set(infos))
    if missing or unknown:
        raise KeyError(f"PAGES has no text for {missing} and text for unregistered nodes {unknown}")
    return {name: render(name, infos[name], PAGES[name], workflows) for name in infos}


def node_info(name: str, node_class: type, display_name: str) -> dict:
    """The `/object_info` entry ComfyUI's server builds for a node (its parts the pages read), as JSON gives it:
    workflow_format's entry with the outputs' names, list flags and tooltips and the node's module added."""
    info = node_info_v1(node_class)
    if not hasattr(node_class, "GET_NODE_INFO_V1"):  # a V3 node's entry has them already
        info |= {"output_is_list": getattr(node_class, "OUTPUT_IS_LIST", [False] * len(node_class.RETURN_TYPES)),
                 "output_name": getattr(node_class, "RETURN_NAMES", node_class.RETURN_TYPES),
                 "python_module": getattr(node_class, "RELATIVE_PYTHON_MODULE", "nodes")}
        if hasattr(node_class, "OUTPUT_TOOLTIPS"):
            info["output_tooltips"] = node_class.OUTPUT_TOOLTIPS
    return json.loads(json.dumps({**info, "name": name, "display_name": display_name}))


def node_infos(comfy) -> dict[str, dict]:
    """The `/object_info` entries of the nodes the pack registers, from a booted tests.harness.InProcessComfy."""
    pack = comfy.pack_module("__init__")  # the pack's nodes/__init__.py, as ComfyUI imported it
    return {name: node_info(name, cls, pack.NODE_DISPLAY_NAME_MAPPINGS.get(name, name))
            for name, cls in pack.NODE_CLASS_MAPPINGS.items()}


def load_workflows(folder: Path = WORKFLOW_DIR) -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text(encoding="utf-8")) for path in sorted(folder.glob("*.json"))}


def main() -> int:
    # Imported here, as in make_workflows.py: the freshness test loads this file for `build_all` and must not
    # import the harness a second time under another name.
    from tests.harness import throwaway_comfy

    logging.basicConfig(level=logging.WARNING)
    with throwaway_comfy() as comfy:
        infos = node_infos(comfy)
    pages = build_all(infos, load_workflows())
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for stale in OUT_DIR.glob("*.md"):  # a page of a node that is gone
        if stale.stem not in pages:
            stale.unlink()
    for name, text in pages.items():
        (OUT_DIR / f"{name}.md").write_text(text, encoding="utf-8", newline="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
