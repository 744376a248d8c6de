"""Writes the UI-format example workflows in workflows/ from the live node definitions.

Generating them (instead of hand-editing JSON) keeps every workflow's widget values in the exact positional
order the installed ComfyUI frontend expects, for our nodes and core ones alike. Run after changing a node's
inputs:

    PYTHONPATH=. .venv/bin/python scripts/make_workflows.py

A test (tests/test_workflows_execute.py) checks that the committed files are what this script writes.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import tempfile
from pathlib import Path

from blended.model_files import model_file
from workflow_format import input_options, widget_default, widget_layout

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "workflows"
GD = model_file("256x256_diffusion_uncond.pt")
CLIP = model_file("ViT-B-16.safetensors")
CLIP_LARGE = model_file("ViT-L-14.safetensors")
IMG, MASK = "blended_example_img.png", "blended_example_mask.png"
IMG2, MASK2 = "blended_example_img2.png", "blended_example_mask2.png"
SCRIBBLE = "blended_example_scribble.png"
DOGS_MASK = "blended_example_dogs_mask.png"  # img2's two dogs, painted white

# The canvas's measures (ComfyUI frontend 1.32): the title bar drawn above a node's pos, one input/output row,
# one widget row, a multiline text box and a Load Image picture preview. On loading a workflow the frontend grows
# every node to the minimum its rows and widgets need (LGraphNode.computeSize), whatever size was saved, and a
# node that grows covers the one below it: so each node is saved at least that tall (min_size) and Graph refuses
# a layout where two nodes' boxes, title bars included, overlap.
TITLE_HEIGHT = 30
SLOT_HEIGHT = 20
WIDGET_HEIGHT = 20
MULTILINE_HEIGHT = 50
WIDGET_SPACING, WIDGETS_PADDING, BOTTOM_PADDING = 4, 8, 6
IMAGE_PREVIEW_HEIGHT = 220
TITLE_CHAR_WIDTH = 7  # a title's width per character, roughly, in the canvas's title font
# Widgets the frontend adds to some core nodes beyond the declared inputs: PreviewAny's text box.
FRONTEND_WIDGET_HEIGHTS = {"PreviewAny": [MULTILINE_HEIGHT]}
GAP = 40  # between a node and the one below it


class Graph:
    """A UI-format (v0.4) workflow under construction."""

    def __init__(self, defs: dict):
        self.defs = defs
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(self, node_type: str, pos, widgets: dict | None = None, title: str | None = None,
            size=(320, 200)) -> dict:
        d = self.defs[node_type]
        widgets = dict(widgets or {})
        values = []
        for name, spec in widget_layout(d):
            if name is None:
                values.append("fixed" if spec.get("extra") == "control_after_generate" else "image")
                continue
            values.append(widgets.pop(name) if name in widgets else widget_default(spec))
        if widgets:
            raise KeyError(f"{node_type} has no widgets {sorted(widgets)}")
        widget_names = {name for name, _ in widget_layout(d) if name}
        inputs = []
        for section in ("required", "optional"):
            for name, spec in d["input"].get(section, {}).items():
                if name not in widget_names:
                    inputs.append({"name": name, "type": spec[0] if isinstance(spec[0], str) else "COMBO",
                                   "link": None})
        names = d.get("output_name") or d["output"]
        outputs = [{"name": n, "type": t, "links": [], "slot_index": i}
                   for i, (n, t) in enumerate(zip(names, d["output"], strict=True))]
        low = min_size(d, node_type, title)
        size = [max(size[0], low[0]), max(size[1], low[1])]
        node = {"id": len(self.nodes) + 1, "type": node_type, "pos": list(pos), "size": size,
                "flags": {}, "order": len(self.nodes), "mode": 0, "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": node_type}, "widgets_values": values}
        if node_type.startswith("BlendedDiffusion_"):
            node["properties"]["cnr_id"] = "blended-diffusion"
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node

    def link(self, src: dict, output, dst: dict, input_name: str) -> None:
        if isinstance(output, str):
            output = next(o["slot_index"] for o in src["outputs"] if o["name"] == output)
        out = src["outputs"][output]
        slot = next(i for i, s in enumerate(dst["inputs"]) if s["name"] == input_name)
        link_id = len(self.links) + 1
        self.links.append([link_id, src["id"], output, dst["id"], slot, out["type"]])
        out["links"].append(link_id)
        dst["inputs"][slot]["link"] = link_id

    def overlaps(self) -> list[str]:
        """Pairs of nodes whose boxes (title bar included) overlap on the canvas."""
        def box(node):
            (x, y), (w, h) = node["pos"], node["size"]
            return x, y - TITLE_HEIGHT, x + w, y + h

        found = []
        for i, a in enumerate(self.nodes):
            for b in self.nodes[i + 1:]:
                (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = box(a), box(b)
                if min(ax1, bx1) > max(ax0, bx0) and min(ay1, by1) > max(ay0, by0):
                    found.append(f"#{a['id']} {a['type']} and #{b['id']} {b['type']}")
        return found

    def to_json(self, note: str) -> dict:
        if overlapping := self.overlaps():
            raise ValueError(f"nodes overlap on the canvas: {'; '.join(overlapping)}")
        return {"id": "00000000-0000-4000-8000-000000000000", "revision": 0,
                "last_node_id": len(self.nodes), "last_link_id": len(self.links),
                "nodes": self.nodes, "links": self.links, "groups": [], "config": {},
                "extra": {"ds": {"scale": 0.8, "offset": [40, 40]}, "blended_diffusion_note": note},
                "version": 0.4}


def min_size(node_def: dict, node_type: str, title: str | None) -> tuple[int, int]:
    """The smallest size the frontend gives a node of this definition: one row per link slot (inputs that are
    not widgets, or outputs, whichever are more), then its widgets; a given title needs its width."""
    layout = widget_layout(node_def)
    names = {name for name, _ in layout if name}
    links = [name for section in ("required", "optional") for name, spec in node_def["input"].get(section, {}).items()
             if name not in names]
    rows = max(len(links), len(node_def["output"]), 1)
    widgets = [MULTILINE_HEIGHT if input_options(spec).get("multiline") else WIDGET_HEIGHT for _, spec in layout]
    if any(spec.get("extra") == "upload" for name, spec in layout if name is None):
        widgets.append(IMAGE_PREVIEW_HEIGHT)
    widgets += FRONTEND_WIDGET_HEIGHTS.get(node_type, [])
    height = rows * SLOT_HEIGHT + BOTTOM_PADDING
    if widgets:
        height += sum(h + WIDGET_SPACING for h in widgets) + WIDGETS_PADDING
    width = math.ceil(TITLE_HEIGHT * 1.33 + TITLE_CHAR_WIDTH * len(title)) if title else 0
    return width, height


def below(node: dict, gap: float = GAP) -> float:
    """The y of a node placed under `node`, its title bar `gap` below that node's bottom."""
    return node["pos"][1] + node["size"][1] + gap + TITLE_HEIGHT


def place_below(node: dict, above: dict, gap: float = GAP) -> None:
    """Moves `node` under `above` (for a node added before the one it goes under, keeping the nodes' ids)."""
    node["pos"][1] = below(above, gap)


def models(g: Graph, x=0, y=0):
    unet = g.add("BlendedDiffusion_LoadGuidedDiffusion", (x, y), {"model_name": GD.name}, size=(340, 180))
    clip = g.add("BlendedDiffusion_LoadCLIP", (x, y + 220), {"clip_name": CLIP.name}, size=(340, 110))
    # Declared as ComfyUI's frontend reads them: a user without the files is told what to get, and where.
    unet["properties"]["models"] = [GD.declaration()]
    clip["properties"]["models"] = [CLIP.declaration()]
    return unet, clip


def inputs(g: Graph, image=IMG, mask=MASK, x=0, y=380):
    img = g.add("LoadImage", (x, y), {"image": image}, size=(340, 340))
    msk = g.add("LoadImageMask", (x, below(img)), {"image": mask, "channel": "red"}, size=(340, 340))
    return img, msk


def soft_edge(g: Graph, mask_src, x, y, expand, blur_radius, sigma):
    """A mask's edge made grey by core nodes: grown (or shrunk, expand < 0), then blurred as an image.

    Core FeatherMask fades the picture's outer frame, not a mask's own edge, so a blob inside the picture
    would stay hard.
    """
    grow = g.add("GrowMask", (x, y), {"expand": expand, "tapered_corners": True}, size=(300, 110))
    g.link(mask_src[0], mask_src[1], grow, "mask")
    as_image = g.add("MaskToImage", (x, below(grow)), size=(300, 60))
    g.link(grow, 0, as_image, "mask")
    blur = g.add("ImageBlur", (x, below(as_image)), {"blur_radius": blur_radius, "sigma": sigma}, size=(300, 110))
    g.link(as_image, 0, blur, "image")
    as_mask = g.add("ImageToMask", (x, below(blur)), {"channel": "red"}, size=(300, 80))
    g.link(blur, 0, as_mask, "image")
    return as_mask


def guidance(g: Graph, clip, prompt, x=400, y=0, **widgets):
    node = g.add("BlendedDiffusion_CLIPGuidance", (x, y), {"prompt": prompt, **widgets}, size=(380, 370))
    g.link(clip, 0, node, "clip")
    return node


def sampler(g: Graph, unet, guide, image_src, mask_src, x=820, y=0, title=None, **widgets):
    node = g.add("BlendedDiffusion_Sampler", (x, y), widgets, title=title, size=(360, 660))
    g.link(unet, 0, node, "model")
    g.link(guide, 0, node, "guidance")
    g.link(image_src[0], image_src[1], node, "image")
    g.link(mask_src[0], mask_src[1], node, "mask")
    return node


def save(g: Graph, src, output, prefix, x, y):
    node = g.add("SaveImage", (x, y), {"filename_prefix": prefix}, size=(360, 360))
    g.link(src, output, node, "images")
    return node


def edit_start(defs, prompt, image=IMG, mask=MASK):
    """A new workflow holding the two models, the photo and mask loaders and the guidance for `prompt`."""
    g = Graph(defs)
    unet, clip = models(g)
    img, msk = inputs(g, image, mask)
    return g, unet, clip, img, msk, guidance(g, clip, prompt)


def simple_edit(defs, prompt, prefix, note, image=IMG, mask=MASK, **widgets):
    """Photo and mask -> sampler guided by one prompt -> SaveImage."""
    g, unet, _, img, msk, guide = edit_start(defs, prompt, image, mask)
    save(g, sampler(g, unet, guide, (img, 0), (msk, 0), **widgets), 0, prefix, 1220, 0)
    return g.to_json(note)


def ranked_results(defs):
    g, unet, clip, img, msk, guide = edit_start(defs, "a big rock")
    samp = sampler(g, unet, guide, (img, 0), (msk, 0), num_results=8, batch_size=4)
    # Speed options at their (faithful) defaults: where to turn on bf16, reuse_guided_forward, compile, ...
    speed = g.add("BlendedDiffusion_Speed", (400, below(guide)), size=(380, 290))
    g.link(speed, 0, samp, "speed")
    rank = g.add("BlendedDiffusion_CLIPRank", (1220, 0), {"prompt": "a big rock", "top_k": 2}, size=(340, 220))
    g.link(samp, 0, rank, "images")
    g.link(clip, 0, rank, "clip")
    g.link(samp, 1, rank, "mask")
    save(g, rank, 1, "blended/ranked_best", 1600, 0)
    preview = g.add("PreviewImage", (1220, 280), size=(340, 360))
    g.link(rank, 0, preview, "images")
    text = g.add("PreviewAny", (1600, 420), size=(340, 200))
    g.link(rank, 2, text, "source")
    return g.to_json("Many results for one prompt, ranked by CLIP (the original makes 32; 64 recommended). The "
                     "Speed node holds the speed and memory options, at the original's settings.")


def different_prompts(defs):
    return simple_edit(defs, "a teddy bear\na white cat\na red ball", "blended/different_prompts",
                       "Different prompts for one image and mask: one line per prompt, results of every prompt "
                       "share their seeds so they differ only by the text.", IMG2, MASK2, num_results=2,
                       batch_size=2)


def alter_object_part(defs):
    g = Graph(defs)
    unet, clip = models(g)
    img = g.add("LoadImage", (0, 380), {"image": IMG}, size=(340, 340))
    # A box on the leopard's flank, built from core mask nodes (users paint it in the mask editor).
    base = g.add("SolidMask", (0, below(img)), {"value": 0.0, "width": 256, "height": 256}, size=(300, 110))
    part = g.add("SolidMask", (0, below(base)), {"value": 1.0, "width": 70, "height": 50}, size=(300, 110))
    comp = g.add("MaskComposite", (360, base["pos"][1]), {"x": 150, "y": 115, "operation": "add"},
                 size=(300, 160))
    g.link(base, 0, comp, "destination")
    g.link(part, 0, comp, "source")
    guide = guidance(g, clip, "blue fur")
    samp = sampler(g, unet, guide, (img, 0), (comp, 0), num_results=4, skip_timesteps=33)
    save(g, samp, 0, "blended/object_part", 1220, 0)
    return g.to_json("Altering part of an object: only the masked part of the leopard changes.")


def background_replacement(defs):
    # The dogs are painted white and the mask inverted: everything else is regenerated.
    return simple_edit(defs, "a snowy mountain landscape", "blended/background",
                       "Background replacement: the mask paints the dogs and invert_mask regenerates everything "
                       "else (paper: skip 33 of 100 steps).", IMG2, DOGS_MASK, num_results=4, skip_timesteps=33,
                       invert_mask=True)


def scribble_guided(defs):
    return simple_edit(defs, "a blue ball", "blended/scribble",
                       "Scribble-guided editing: a rough colour scribble inside the mask plus a prompt; more "
                       "skipped steps keep the scribble's colours (paper: skip 40).", SCRIBBLE, MASK,
                       num_results=4, skip_timesteps=40)


def text_guided_extrapolation(defs):
    g = Graph(defs)
    unet, clip = models(g)
    img = g.add("LoadImage", (0, 380), {"image": IMG}, size=(340, 340))
    pad = g.add("ImagePadForOutpaint", (400, 380), {"left": 0, "top": 0, "right": 128, "bottom": 0,
                                                    "feathering": 0}, size=(320, 180))
    g.link(img, 0, pad, "image")
    guide = guidance(g, clip, "a dirt road in the savanna")
    place_below(pad, guide)
    samp = sampler(g, unet, guide, (pad, 0), (pad, 1), num_results=4, region="mask_crop", context=0.5)
    save(g, samp, 0, "blended/extrapolation", 1220, 0)
    return g.to_json("Text-guided extrapolation (outpainting): core ImagePadForOutpaint widens the photo; the "
                     "sampler fills the padding, working on a square crop so any aspect ratio works.")


def sequential_edits(defs):
    g, unet, clip, img, msk, first = edit_start(defs, "a big rock")
    s1 = sampler(g, unet, first, (img, 0), (msk, 0), title="Edit 1: rock", num_results=1)
    mask2 = g.add("SolidMask", (400, below(first)), {"value": 0.0, "width": 256, "height": 256}, size=(300, 110))
    box = g.add("SolidMask", (400, below(mask2)), {"value": 1.0, "width": 60, "height": 60}, size=(300, 110))
    comp = g.add("MaskComposite", (400, below(box)), {"x": 180, "y": 20, "operation": "add"}, size=(300, 160))
    g.link(mask2, 0, comp, "destination")
    g.link(box, 0, comp, "source")
    second = guidance(g, clip, "a hot air balloon", x=1220, y=0)
    s2 = sampler(g, unet, second, (s1, 0), (comp, 0), x=1640, y=0, title="Edit 2: balloon", num_results=1)
    save(g, s2, 0, "blended/sequential", 2040, 0)
    return g.to_json("Composing several edits in sequence: the first result is the second edit's input.")


def chain_core_compositing(defs):
    g, unet, _, img, msk, guide = edit_start(defs, "a puddle of water")
    samp = sampler(g, unet, guide, (img, 0), (msk, 0), num_results=1)
    # Shrunk, then blurred: grey only inside the mask's border, where the edit and the original differ. The
    # original goes over the results (the composite keeps its destination's batch) where the edge is not white.
    soft = soft_edge(g, (samp, 1), 1220, 0, expand=-3, blur_radius=6, sigma=3.0)
    invert = g.add("InvertMask", (1220, below(soft)), size=(300, 80))
    g.link(soft, 0, invert, "mask")
    comp = g.add("ImageCompositeMasked", (1560, 0), {"x": 0, "y": 0, "resize_source": False}, size=(320, 170))
    g.link(samp, 0, comp, "destination")
    g.link(img, 0, comp, "source")
    g.link(invert, 0, comp, "mask")
    save(g, comp, 0, "blended/chained", 1920, 0)
    return g.to_json("Chaining into core nodes: the sampler's mask output gets a soft edge from core "
                     "GrowMask/MaskToImage/ImageBlur/ImageToMask, and ImageCompositeMasked lays the original "
                     "back over our edit through its inverse, so the edit fades in at the border.")


def high_resolution(defs):
    g = Graph(defs)
    unet, clip = models(g)
    img, msk = inputs(g)
    up = g.add("ImageScale", (400, 380), {"upscale_method": "lanczos", "width": 1000, "height": 600,
                                         "crop": "disabled"}, size=(320, 160))
    g.link(img, 0, up, "image")
    guide = guidance(g, clip, "a big rock")
    place_below(up, guide)
    samp = sampler(g, unet, guide, (up, 0), (msk, 0), num_results=2, region="mask_crop", context=0.5,
                   grow_mask=4, feather=6)
    save(g, samp, 0, "blended/high_res", 1220, 0)
    return g.to_json("Any resolution and aspect ratio: a 1000x600 photo is edited on a square crop around the "
                     "mask at model resolution and pasted back; grow/feather soften the seam.")


def process_video(defs):
    g, unet, _, img, msk, guide = edit_start(defs, "a big rock")
    samp = sampler(g, unet, guide, (img, 0), (msk, 0), num_results=1, capture_every=3)
    final = save(g, samp, 0, "blended/process_final", 1220, 0)
    anim = g.add("SaveAnimatedWEBP", (1220, below(final)), {"filename_prefix": "blended/process", "fps": 8.0},
                 size=(360, 420))
    g.link(samp, 2, anim, "images")
    return g.to_json("The process as an animation: the model's x0 prediction every 3 steps, saved as WEBP.")


def edit_metrics(defs):
    g = Graph(defs)
    unet, clip = models(g)
    judge = g.add("BlendedDiffusion_LoadCLIP", (0, 0), {"clip_name": CLIP.name}, size=(340, 110),
                  title="Judge CLIP (the guiding one here; another CLIP is a fairer judge)")
    judge["properties"]["models"] = [CLIP.declaration()]
    img, msk = inputs(g)
    place_below(judge, msk)
    guide = guidance(g, clip, "a big rock")
    samp = sampler(g, unet, guide, (img, 0), (msk, 0), num_results=4)
    preview = g.add("PreviewImage", (1220, 0), size=(360, 360))
    g.link(samp, 0, preview, "images")
    hard = g.add("BlendedDiffusion_EditMetrics", (1220, below(preview)), {"prompt": "a big rock"}, size=(340, 260),
                 title="Metrics: the sampler's hard composite")
    g.link(samp, 0, hard, "results")
    g.link(img, 0, hard, "image")
    g.link(samp, 1, hard, "mask")
    g.link(judge, 0, hard, "clip")
    table = g.add("PreviewAny", (1600, hard["pos"][1]), size=(520, 260))
    g.link(hard, 0, table, "source")
    # The same results blended into the original by core nodes through a soft-edged mask: compare the seam
    # columns (both tables measure at the sampler's mask).
    edge_y = below(hard)
    edge = soft_edge(g, (samp, 1), 1220, edge_y, expand=-3, blur_radius=6, sigma=3.0)
    invert = g.add("InvertMask", (1220, below(edge)), size=(300, 80))
    g.link(edge, 0, invert, "mask")
    comp = g.add("ImageCompositeMasked", (1560, edge_y), {"x": 0, "y": 0, "resize_source": False},
                 size=(320, 170))
    g.link(samp, 0, comp, "destination")
    g.link(img, 0, comp, "source")
    g.link(invert, 0, comp, "mask")
    soft = g.add("BlendedDiffusion_EditMetrics", (1920, edge_y), {"prompt": "a big rock"}, size=(340, 260),
                 title="Metrics: soft edge by core nodes")
    g.link(comp, 0, soft, "results")
    g.link(img, 0, soft, "image")
    g.link(samp, 1, soft, "mask")
    g.link(judge, 0, soft, "clip")
    table2 = g.add("PreviewAny", (2300, edge_y), size=(520, 260))
    g.link(soft, 0, table2, "source")
    return g.to_json("Measuring edits: Blended Edit Metrics scores the sampler's results (CLIP similarity of the "
                     "edited region, background PSNR, seam, diversity) and the same results blended with a soft "
                     "edge by core nodes, so the two tables can be compared.")


def metrics_of(g: Graph, samp, img, clip, prompt, x, y, title):
    node = g.add("BlendedDiffusion_EditMetrics", (x, y), {"prompt": prompt}, size=(340, 260), title=title)
    g.link(samp, 0, node, "results")
    g.link(img, 0, node, "image")
    g.link(samp, 1, node, "mask")
    g.link(clip, 0, node, "clip")
    table = g.add("PreviewAny", (x + 380, y), size=(520, 260))
    g.link(node, 0, table, "source")
    return node


def colour_match_at_paste(defs):
    g = Graph(defs)
    unet, clip = models(g)
    img, msk = inputs(g)
    guide = guidance(g, clip, "a big rock")
    plain = sampler(g, unet, guide, (img, 0), (msk, 0), title="colour_match off (original)", num_results=2)
    matched = sampler(g, unet, guide, (img, 0), (msk, 0), x=820, y=below(plain), title="colour_match rgb",
                      num_results=2, colour_match="rgb")
    for node, name in ((plain, "off"), (matched, "rgb")):
        y = node["pos"][1]
        save(g, node, 0, f"blended/colour_match_{name}", 1220, y)
        metrics_of(g, node, img, clip, "a big rock", 1620, y, f"Metrics: colour_match {name}")
    return g.to_json("Colour match at paste-back: the same seed with and without colour_match; compare the "
                     "'seam colour' column of the two metrics tables.")


def soft_mask_schedule(defs):
    g = Graph(defs)
    unet, clip = models(g)
    img, msk = inputs(g)
    # A grey-edged mask from core nodes (a painted grey mask works the same way).
    grey = soft_edge(g, (msk, 0), 400, 700, expand=10, blur_radius=12, sigma=6.0)
    guide = guidance(g, clip, "a big rock")
    samp = sampler(g, unet, guide, (img, 0), (grey, 0), num_results=2, soft_mask=True)
    save(g, samp, 0, "blended/soft_mask", 1220, 0)
    return g.to_json("Soft masks: with soft_mask on, a grey pixel of value m is edited only during the last m "
                     "of the steps (Differential Diffusion), so the edit fades out over the blurred border.")


def harmonising_resampling(defs):
    g = Graph(defs)
    unet, clip = models(g)
    img, msk = inputs(g)
    guide = guidance(g, clip, "a big rock")
    plain = sampler(g, unet, guide, (img, 0), (msk, 0), title="resampling off (original)", num_results=2)
    resampled = sampler(g, unet, guide, (img, 0), (msk, 0), x=820, y=below(plain), title="resampling 2 x 5 steps",
                        num_results=2, resample_count=2, resample_jump_length=5)
    for node, name in ((plain, "off"), (resampled, "on")):
        y = node["pos"][1]
        save(g, node, 0, f"blended/resampling_{name}", 1220, y)
        metrics_of(g, node, img, clip, "a big rock", 1620, y, f"Metrics: resampling {name}")
    return g.to_json("Harmonising resampling (RePaint): every 5 steps are re-noised and denoised twice more, so "
                     "the edit and the background agree at the border; compare the seam columns.")
def weighted_prompts(defs):
    g = Graph(defs)
    unet, clip = models(g)
    img, msk = inputs(g)
    guide = guidance(g, clip, "a big rock:1.0 | moss:0.5 | blurry:-0.5\na big rock")
    samp = sampler(g, unet, guide, (img, 0), (msk, 0), num_results=4, batch_size=4)
    save(g, samp, 0, "blended/weighted_prompts", 1220, 0)
    return g.to_json("Weighted and negative prompts: parts split by '|', each with ':weight'; a negative weight "
                     "pushes away. The second line is the plain prompt, with the same seeds, for comparison.")


def image_target(defs):
    g = Graph(defs)
    unet, clip = models(g)
    img, msk = inputs(g)
    ref = g.add("LoadImage", (400, 380), {"image": IMG2}, title="Reference picture", size=(340, 340))
    ref_mask = g.add("LoadImageMask", (400, below(ref)), {"image": DOGS_MASK, "channel": "red"},
                     title="Part of the reference that counts", size=(340, 340))
    guide = guidance(g, clip, "", image_target_weight=1.0)
    place_below(ref, guide)
    place_below(ref_mask, ref)
    g.link(ref, 0, guide, "image_target")
    g.link(ref_mask, 0, guide, "image_target_mask")
    samp = sampler(g, unet, guide, (img, 0), (msk, 0), num_results=4)
    save(g, samp, 0, "blended/image_target", 1220, 0)
    return g.to_json("An image target: the masked part of a reference picture steers the edit instead of a "
                     "prompt (combine both by writing a prompt too).")


def clip_ensemble(defs):
    g = Graph(defs)
    unet, clip = models(g)
    img, msk = inputs(g)
    clip2 = g.add("BlendedDiffusion_LoadCLIP", (0, -160), {"clip_name": CLIP_LARGE.name},
                  title="Second CLIP", size=(340, 110))
    clip2["properties"]["models"] = [CLIP_LARGE.declaration()]
    members = g.add("BlendedDiffusion_CLIPList", (400, -220), {"weight": 0.5, "num_views": 4}, size=(340, 130))
    g.link(clip2, 0, members, "clip")
    guide = guidance(g, clip, "a big rock")
    g.link(members, 0, guide, "more_clips")
    samp = sampler(g, unet, guide, (img, 0), (msk, 0), num_results=4)
    rank = g.add("BlendedDiffusion_CLIPRank", (1220, 0), {"prompt": "a big rock", "top_k": 1}, size=(340, 220))
    g.link(samp, 0, rank, "images")
    g.link(clip2, 0, rank, "clip")
    g.link(samp, 1, rank, "mask")
    save(g, rank, 1, "blended/ensemble_best", 1600, 0)
    return g.to_json("Several CLIPs at once: the second CLIP (weight 0.5, 4 views at its own input size) guides "
                     "with the main one; CLIP Rank can use either.")


def guidance_schedule(defs):
    g = Graph(defs)
    unet, clip = models(g)
    img, msk = inputs(g)
    sched = g.add("BlendedDiffusion_GuidanceSchedule", (400, -220),
                  {"shape": "linear", "values": "1.5, 0.2", "gradient_guard": "normalize", "limit": 0.05},
                  size=(340, 160))
    guide = guidance(g, clip, "a big rock", clip_lambda=2000.0)
    g.link(sched, 0, guide, "schedule")
    samp = sampler(g, unet, guide, (img, 0), (msk, 0), num_results=4)
    save(g, samp, 0, "blended/schedule", 1220, 0)
    return g.to_json("A guidance schedule: CLIP pulls hard early (1.5x) and gently late (0.2x), and each "
                     "result's guidance gradient is capped (normalize guard).")


WORKFLOWS = {
    "01_ranked_results": ranked_results,
    "02_different_prompts": different_prompts,
    "03_alter_object_part": alter_object_part,
    "04_background_replacement": background_replacement,
    "05_scribble_guided": scribble_guided,
    "06_text_guided_extrapolation": text_guided_extrapolation,
    "07_sequential_edits": sequential_edits,
    "08_chain_core_compositing": chain_core_compositing,
    "09_high_resolution_crop": high_resolution,
    "10_process_animation": process_video,
    "11_weighted_negative_prompts": weighted_prompts,
    "12_image_target": image_target,
    "13_clip_ensemble": clip_ensemble,
    "14_guidance_schedule": guidance_schedule,
    "15_edit_metrics": edit_metrics,
    "16_colour_match": colour_match_at_paste,
    "17_soft_mask": soft_mask_schedule,
    "18_harmonising_resampling": harmonising_resampling,
}


def build_all(defs: dict) -> dict[str, dict]:
    return {name: make(defs) for name, make in WORKFLOWS.items()}


def main() -> int:
    # The test harness boots ComfyUI in this process; imported here so the freshness test, which loads this
    # file for `build_all`, does not import it a second time under another name.
    from tests.harness import InProcessComfy, build_workspace, find_comfyui

    logging.basicConfig(level=logging.WARNING)
    comfy = find_comfyui()
    if comfy is None:
        logging.error("no ComfyUI found: run scripts/setup_env.sh first")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        defs = InProcessComfy(comfy, build_workspace(Path(tmp), comfy)).node_defs()
    OUT_DIR.mkdir(exist_ok=True)
    for name, workflow in build_all(defs).items():
        (OUT_DIR / f"{name}.json").write_text(json.dumps(workflow, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
