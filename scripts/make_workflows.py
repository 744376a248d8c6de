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
import re
import sys
from pathlib import Path

from blended.model_files import model_file
from workflow_format import MODE_BYPASSED, input_options, widget_default, widget_layout

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
# Nodes the frontend's Nodes 2.0 (Vue-rendered nodes) draws taller than the canvas renderer, for their content: an
# image loader shows its picture at the node's full width, and the Sampler's widgets take more room. Sized for
# both, so that under either renderer no node covers the one below it.
IMAGE_LOADER_SIZE = (340, 420)
SAMPLER_SIZE = (360, 690)
# The Markdown note that says what a workflow shows and what to change: left of the graph's first column, its
# title level with the topmost node's. The frontend gives a Markdown widget at least 400 x 200, and writes its text
# in a small font (about 85 characters to a 400-wide line, 11 high): the height counts fewer, taller lines, so that
# the text fits in other fonts too.
NOTE_WIDTH, NOTE_GAP = 400, 40
NOTE_CHARS_PER_LINE, NOTE_LINE_HEIGHT, NOTE_PADDING = 70, 12, 60
# Names of widgets and files are written as code in the notes' source but shown in italics: under Nodes 2.0 the
# frontend draws inline code blue on blue, unreadable on any note colour.
INLINE_CODE = re.compile(r"`([^`]+)`")
# The view a workflow opens with (extra.ds, which the frontend restores): at this scale, with the note's title
# clear of the menu bar and the sidebar, so the note and the graph's first columns are in sight.
VIEW_SCALE = 0.8
VIEW_TOP_LEFT = (72, 140)  # screen pixels of the note's top-left corner


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

    def add_note(self, text: str) -> dict:
        """A Markdown note (a frontend-only node, never sent to the server) left of the graph, its title level
        with the topmost node's."""
        left = min(node["pos"][0] for node in self.nodes)
        top = min(node["pos"][1] for node in self.nodes)
        node = {"id": len(self.nodes) + 1, "type": "MarkdownNote", "pos": [left - NOTE_GAP - NOTE_WIDTH, top],
                "size": [NOTE_WIDTH, note_height(text)], "flags": {}, "order": len(self.nodes), "mode": 0,
                "inputs": [], "outputs": [], "title": "About this workflow", "properties": {},
                "widgets_values": [INLINE_CODE.sub(r"*\1*", text)], "color": "#432", "bgcolor": "#653"}
        self.nodes.append(node)
        return node

    def to_json(self, text: str) -> dict:
        """The workflow, with `text` (Markdown) in a note on the canvas; it opens with the note in view."""
        placed = self.add_note(text)
        if overlapping := self.overlaps():
            raise ValueError(f"nodes overlap on the canvas: {'; '.join(overlapping)}")
        # The graph's top left corner (the note's title bar) at the canvas origin: Nodes 2.0 spreads a layout
        # made for the canvas renderer out from about there, and the view below then shows the note under either.
        dx, dy = -placed["pos"][0], TITLE_HEIGHT - placed["pos"][1]
        for node in self.nodes:
            node["pos"] = [node["pos"][0] + dx, node["pos"][1] + dy]
        # The frontend draws canvas point p at (p + offset) * scale.
        offset = [round(VIEW_TOP_LEFT[0] / VIEW_SCALE), round(VIEW_TOP_LEFT[1] / VIEW_SCALE)]
        return {"id": "00000000-0000-4000-8000-000000000000", "revision": 0,
                "last_node_id": len(self.nodes), "last_link_id": len(self.links),
                "nodes": self.nodes, "links": self.links, "groups": [], "config": {},
                "extra": {"ds": {"scale": VIEW_SCALE, "offset": offset}},
                "version": 0.4}


def note_height(text: str) -> int:
    """A Markdown note's height for `text`, roughly: its lines wrapped at the note's width, plus a margin."""
    lines = sum(max(1, math.ceil(len(line) / NOTE_CHARS_PER_LINE)) for line in text.splitlines())
    return max(200, NOTE_PADDING + NOTE_LINE_HEIGHT * lines)


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


# What every note ends with: the models, the settings the Sampler keeps unless the note says otherwise, and how
# to edit one's own photo.
MODELS = (f"**Models:** `{GD.name}` in `models/{GD.directory}/`, `{CLIP.name}` in `models/{CLIP.directory}/` "
          "(`scripts/download_models.py` fetches them; README, *Models*).")
SETTINGS = ("**Sampler:** the original's settings unless said above (100 respaced steps, 25 of them skipped, seed "
            "404 fixed); `batch_size` 0 (auto) fits the batch to the free memory, results do not depend on it.")
OWN_PHOTO = ("**Your own photo:** choose it in *Load Image* and its mask (white = edit) in *Load Image (as Mask)*, "
             "or paint the region in Load Image's mask editor (right-click the node) and connect Load Image's "
             "`MASK` output to the Sampler's `mask` instead.")


def note(title: str, *paragraphs: str, photo: str | None = OWN_PHOTO, models: str = MODELS) -> str:
    """A workflow's Markdown note: what it shows and what to change, then the common lines."""
    return "\n\n".join([f"## {title}", *paragraphs, "---", models, SETTINGS, *([photo] if photo else [])])


def models(g: Graph, x=0, y=0):
    unet = g.add("BlendedDiffusion_LoadGuidedDiffusion", (x, y), {"model_name": GD.name}, size=(340, 180))
    clip = g.add("BlendedDiffusion_LoadCLIP", (x, y + 220), {"clip_name": CLIP.name}, size=(340, 110))
    # Declared as ComfyUI's frontend reads them: a user without the files is told what to get, and where.
    unet["properties"]["models"] = [GD.declaration()]
    clip["properties"]["models"] = [CLIP.declaration()]
    return unet, clip


def inputs(g: Graph, image=IMG, mask=MASK, x=0, y=380):
    img = g.add("LoadImage", (x, y), {"image": image}, size=IMAGE_LOADER_SIZE)
    msk = g.add("LoadImageMask", (x, below(img)), {"image": mask, "channel": "red"}, size=IMAGE_LOADER_SIZE)
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
    # batch_size auto: as many results at once as the free memory holds, started again smaller if it runs out.
    node = g.add("BlendedDiffusion_Sampler", (x, y), {"batch_size": 0, **widgets}, title=title, size=SAMPLER_SIZE)
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


def simple_edit(defs, prompt, prefix, text, image=IMG, mask=MASK, **widgets):
    """Photo and mask -> sampler guided by one prompt -> SaveImage; `text` is the workflow's note."""
    g, unet, _, img, msk, guide = edit_start(defs, prompt, image, mask)
    save(g, sampler(g, unet, guide, (img, 0), (msk, 0), **widgets), 0, prefix, 1220, 0)
    return g.to_json(text)


def ranked_results(defs):
    g, unet, clip, img, msk, guide = edit_start(defs, "a big rock")
    samp = sampler(g, unet, guide, (img, 0), (msk, 0), num_results=32)
    # Bypassed: without a Speed node the Sampler runs the fastest setting for the device, and a Speed node, even
    # at its defaults, means the original's numerics (slower on a GPU). It shows where the options are.
    speed = g.add("BlendedDiffusion_Speed", (400, below(guide)), size=(380, 290),
                  title="Speed (bypassed: Ctrl+B to use it)")
    speed["mode"] = MODE_BYPASSED
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
    return g.to_json(note(
        "Many results, ranked by CLIP",
        "The paper's basic use: the Sampler makes `num_results` edits of the masked region for one prompt (32, as "
        "the original; its authors recommend 64) and **CLIP Rank** sorts them by how close the edited region is to "
        "the prompt. *Preview Image* shows them all, best first; *Save Image* keeps the best `top_k`; *Preview "
        "Any* lists each result's CLIP distance (lower = closer).",
        "- Change the prompt in **CLIP Guidance** and in **CLIP Rank** alike.\n"
        "- The **Speed** node is bypassed: without it the Sampler runs the fastest setting for your device. "
        "Select it and press Ctrl+B to choose the speed and memory options yourself; at its defaults it "
        "reproduces the original's numerics (on a GPU its fp16 scheme: 2.5 to 7 times slower on an H100)."))


def different_prompts(defs):
    return simple_edit(defs, "a teddy bear\na white cat\na red ball", "blended/different_prompts", note(
        "Different prompts, one mask",
        "One prompt per line in **CLIP Guidance**: each line gets its own `num_results` edits of the masked "
        "grass. Result *i* of every line starts from the same noise (the same seed), so the results differ only "
        "by the text. The images come prompt by prompt: here 3 lines x 2 results = 6.",
        "Add or change lines; raise `num_results` for more choice per prompt."),
        IMG2, MASK2, num_results=2)


def alter_object_part(defs):
    g = Graph(defs)
    unet, clip = models(g)
    img = g.add("LoadImage", (0, 380), {"image": IMG}, size=IMAGE_LOADER_SIZE)
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
    return g.to_json(note(
        "Altering part of an object",
        "Only the masked part of the leopard changes: a patch of its flank and back gets blue fur, the rest of "
        "the leopard and the road keep every pixel. `skip_timesteps` 33 (the original's default is 25) starts "
        "from a less noisy copy of the photo, so more of the leopard's shape stays.",
        "The mask is a box made by core nodes, so no mask file is needed: a black 256x256 **SolidMask** (the "
        "photo's size) with a white 70x50 one added by **MaskComposite** at x 150, y 115. Move or resize the box "
        "there.",
        photo="**Your own photo:** choose it in *Load Image*, paint the part to change in its mask editor "
              "(right-click the node) and connect Load Image's `MASK` output to the Sampler's `mask` in place of "
              "MaskComposite's."))


def background_replacement(defs):
    # The dogs are painted white and the mask inverted: everything else is regenerated.
    return simple_edit(defs, "a snowy mountain landscape", "blended/background", note(
        "Background replacement",
        "The mask paints the two dogs white and the Sampler's `invert_mask` is on, so everything *but* the dogs "
        "is regenerated from the prompt, and the dogs keep every pixel. `skip_timesteps` 33 of 100, as the paper "
        "uses for backgrounds (the original's default is 25).",
        "For your own photo, mask the subject to keep; or turn `invert_mask` off and mask the background "
        "itself."),
        IMG2, DOGS_MASK, num_results=4, skip_timesteps=33, invert_mask=True)


def scribble_guided(defs):
    return simple_edit(defs, "a blue ball", "blended/scribble", note(
        "Scribble-guided editing",
        "The input is the photo with a rough blue disc painted on the road (`blended_example_scribble.png`), and "
        "the mask covers the scribble; the prompt says what it should become. `skip_timesteps` 40 of 100, as "
        "the paper uses for scribbles (the original's default is 25): the edit starts from a less noisy copy, so "
        "the scribble's colour and shape stay.",
        "Paint your own scribble on a photo in any image editor, then mask the scribbled region."),
        SCRIBBLE, MASK, num_results=4, skip_timesteps=40)


def text_guided_extrapolation(defs):
    g = Graph(defs)
    unet, clip = models(g)
    img = g.add("LoadImage", (0, 380), {"image": IMG}, size=IMAGE_LOADER_SIZE)
    pad = g.add("ImagePadForOutpaint", (400, 380), {"left": 0, "top": 0, "right": 128, "bottom": 0,
                                                    "feathering": 0}, size=(320, 180))
    g.link(img, 0, pad, "image")
    guide = guidance(g, clip, "a dirt road in the savanna")
    place_below(pad, guide)
    samp = sampler(g, unet, guide, (pad, 0), (pad, 1), num_results=4, region="mask_crop", context=0.5)
    save(g, samp, 0, "blended/extrapolation", 1220, 0)
    return g.to_json(note(
        "Text-guided extrapolation (outpainting)",
        "Core **Pad Image for Outpainting** widens the photo by 128 px on the right and outputs a mask of just "
        "that strip; the Sampler fills the strip from the prompt, and the photo keeps every pixel. With `region` "
        "mask_crop the Sampler edits a square around the strip instead of squashing the 384x256 picture into "
        "the model's square: its margin (`context` 0.5 of the strip's longer side) takes in the whole picture "
        "here, and the square is filled out beyond the picture's top and bottom.",
        "Set left, top, right and bottom on the pad node to extend other sides; say in the prompt what should be "
        "there.",
        photo="**Your own photo:** choose it in *Load Image*; the pad node makes the mask."))


def sequential_edits(defs):
    g, unet, clip, img, msk, first = edit_start(defs, "a big rock")
    s1 = sampler(g, unet, first, (img, 0), (msk, 0), title="Edit 1: rock", num_results=1)
    mask2 = g.add("SolidMask", (400, below(first)), {"value": 0.0, "width": 256, "height": 256}, size=(300, 110))
    box = g.add("SolidMask", (400, below(mask2)), {"value": 1.0, "width": 60, "height": 60}, size=(300, 110))
    comp = g.add("MaskComposite", (400, below(box)), {"x": 180, "y": 20, "operation": "add"}, size=(300, 160))
    g.link(mask2, 0, comp, "destination")
    g.link(box, 0, comp, "source")
    second = guidance(g, clip, "a bush with yellow flowers", x=1220, y=0)
    s2 = sampler(g, unet, second, (s1, 0), (comp, 0), x=1640, y=0, title="Edit 2: flowering bush", num_results=1)
    save(g, s2, 0, "blended/sequential", 2040, 0)
    return g.to_json(note(
        "Several edits in sequence",
        "**Edit 1** puts a rock in the loaded mask; its result is the input of **Edit 2**, which turns the "
        "roadside grass in a second region into a flowering bush: a 60x60 box at x 180, y 20, made by core "
        "**SolidMask** and **MaskComposite** nodes (the first SolidMask is the photo's size). Each edit keeps every "
        "pixel outside its own mask, so the rock is still there after edit 2.",
        "Each edit has its own **CLIP Guidance** (prompt) and mask; both share the models. Add more edits the "
        "same way."))


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
    return g.to_json(note(
        "Chaining into core nodes",
        "The Sampler's `mask` output (the mask its final paste used) goes on into core nodes: **GrowMask** -3 "
        "shrinks it, **Convert Mask to Image**, **Image Blur** and **Convert Image to Mask** give it a soft "
        "edge, **InvertMask** turns it around, and **ImageCompositeMasked** lays the original photo back over "
        "the edit through it. Just inside the mask's border the edit now fades into the photo instead of "
        "stopping at a hard line; elsewhere nothing changes.",
        "A bigger blur radius and sigma (with a bigger shrink) give a wider fade."))


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
    return g.to_json(note(
        "Any size and aspect ratio: editing a crop",
        "Core **Upscale Image** stretches the 256x256 example to 1000x600, only to make a big, non-square input; "
        "the Sampler resizes the 256x256 mask to the image. With `region` mask_crop it edits a square crop "
        "around the mask (a margin of `context` 0.5 of the mask's longer side all round) at the model's 256 px "
        "and pastes it back at full resolution, so the rest of the picture keeps every pixel; `grow_mask` 4 and "
        "`feather` 6 soften the pasted edge.",
        "With your own big photo, delete Upscale Image and connect Load Image to the Sampler's `image`."))


def process_video(defs):
    g, unet, _, img, msk, guide = edit_start(defs, "a big rock")
    samp = sampler(g, unet, guide, (img, 0), (msk, 0), num_results=1, capture_every=3)
    final = save(g, samp, 0, "blended/process_final", 1220, 0)
    anim = g.add("SaveAnimatedWEBP", (1220, below(final)), {"filename_prefix": "blended/process", "fps": 8.0},
                 size=(360, 420))
    g.link(samp, 2, anim, "images")
    return g.to_json(note(
        "The process as an animation",
        "`capture_every` 3 keeps the model's prediction of the finished image (x0) every 3 steps and at the "
        "last, at the model's 256 px, on the Sampler's `frames` output; core **SaveAnimatedWEBP** saves them at "
        "8 fps. *Save Image* keeps the final edit.",
        "Lower `capture_every` for a smoother, longer animation. With more results, the frames of each result "
        "follow one another in the same animation."))


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
    return g.to_json(note(
        "Measuring edits",
        "**Edit Metrics** scores the Sampler's 4 results against the photo and mask: CLIP similarity of the "
        "edited region to the prompt (higher = better), background PSNR outside the mask (inf = untouched), the "
        "seam gradient and seam colour across the mask's border (lower = better) and the batch's diversity. The "
        "first table scores the Sampler's hard paste; the second, the same results blended into the photo with "
        "a soft edge by core nodes (as in workflow 08): compare their seam columns.",
        "The judge is its own **Load CLIP** node, here the same ViT-B/16 that guides. Guidance optimises its own "
        "CLIP and can fool it: another CLIP (e.g. `ViT-L-14.safetensors`) is a fairer judge. Keep the metrics' "
        "prompt the same as CLIP Guidance's."))


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
    return g.to_json(note(
        "Colour match at paste-back",
        "Two Samplers with the same seed and settings, `colour_match` off (the original) and `rgb`: before the "
        "paste, the edit's colours are shifted so the pixels just inside the mask's border get the photo's mean "
        "and spread there, which removes a tinted outline. Compare the images, and the **seam colour** column "
        "of the two Edit Metrics tables (lower = less tint).",
        "`lab` matches in Lab colour instead."))


def soft_mask_schedule(defs):
    g = Graph(defs)
    unet, clip = models(g)
    img, msk = inputs(g)
    # A grey-edged mask from core nodes (a painted grey mask works the same way).
    grey = soft_edge(g, (msk, 0), 400, 700, expand=10, blur_radius=12, sigma=6.0)
    guide = guidance(g, clip, "a big rock")
    samp = sampler(g, unet, guide, (img, 0), (grey, 0), num_results=2, soft_mask=True)
    save(g, samp, 0, "blended/soft_mask", 1220, 0)
    return g.to_json(note(
        "Soft masks as a schedule (Differential Diffusion)",
        "Core nodes give the mask a grey edge: **GrowMask** +10 px, then **Convert Mask to Image**, **Image "
        "Blur** (radius 12, sigma 6) and **Convert Image to Mask**. With the Sampler's `soft_mask` on, a pixel "
        "of grey value m is edited only during the last m of the steps, so the edit fades out over the blurred "
        "border. Off, any value above 0 is edited for the whole run (the original).",
        "A mask painted with soft or grey strokes works the same way."))


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
    return g.to_json(note(
        "Harmonising resampling (RePaint)",
        "Two Samplers with the same seed: resampling off (the original), and `resample_count` 2 with "
        "`resample_jump_length` 5: after every 5 steps their noise is added back and they are denoised again, "
        "twice more, so the edit and the background agree at the border. That run takes 3 times the steps. "
        "Compare the images, and the seam columns of the two Edit Metrics tables (lower = smoother border)."))


def weighted_prompts(defs):
    g = Graph(defs)
    unet, clip = models(g)
    img, msk = inputs(g)
    guide = guidance(g, clip, "a big rock:1.0 | moss:0.5 | blurry:-0.5\na big rock")
    samp = sampler(g, unet, guide, (img, 0), (msk, 0), num_results=4)
    save(g, samp, 0, "blended/weighted_prompts", 1220, 0)
    return g.to_json(note(
        "Weighted and negative prompts",
        "In **CLIP Guidance**, line 1 `a big rock:1.0 | moss:0.5 | blurry:-0.5` is split into parts at `|`, "
        "each with its `:weight`: moss pulls half as hard as the rock, and *blurry*, weighted negative, pushes "
        "the edit away. Line 2 is the plain prompt. Result *i* of both lines starts from the same noise, so of "
        "the 8 images, the first 4 (line 1) and the last 4 (line 2) differ only by the weighting.",
        "Write `\\:` or `\\|` for a literal colon or bar."))


def image_target(defs):
    g = Graph(defs)
    unet, clip = models(g)
    img, msk = inputs(g)
    ref = g.add("LoadImage", (400, 380), {"image": IMG2}, title="Reference picture", size=IMAGE_LOADER_SIZE)
    ref_mask = g.add("LoadImageMask", (400, below(ref)), {"image": DOGS_MASK, "channel": "red"},
                     title="Part of the reference that counts", size=IMAGE_LOADER_SIZE)
    guide = guidance(g, clip, "", image_target_weight=1.0)
    place_below(ref, guide)
    place_below(ref_mask, ref)
    g.link(ref, 0, guide, "image_target")
    g.link(ref_mask, 0, guide, "image_target_mask")
    samp = sampler(g, unet, guide, (img, 0), (msk, 0), num_results=4)
    save(g, samp, 0, "blended/image_target", 1220, 0)
    return g.to_json(note(
        "A picture as the target",
        "CLIP Guidance's prompt is empty, so its only target is the CLIP image embedding of the masked part of "
        "the **Reference picture**: the two dogs of `blended_example_img2.png`. The masked patch of road in the "
        "leopard photo is steered toward them.",
        "Write a prompt too to steer by both; `image_target_weight` weighs the picture like a prompt part "
        "(negative = away from it). Disconnect the reference's mask to use the whole picture."))


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
    return g.to_json(note(
        "Several CLIPs at once",
        "A second CLIP, ViT-L/14, joins the main ViT-B/16: **CLIP List** (weight 0.5, 4 views of its own at its "
        "own input size) feeds CLIP Guidance's `more_clips`, and the two losses add up. **CLIP Rank** ranks the "
        "results with the second CLIP and *Save Image* keeps the best.",
        "Chain more CLIP List nodes for more CLIPs; connect CLIP Rank's `clip` to either loader.",
        models=MODELS + f" The second CLIP is the optional `{CLIP_LARGE.name}`, also in "
                        f"`models/{CLIP_LARGE.directory}/` (the script skips it with `--required-only`)."))


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
    return g.to_json(note(
        "A guidance schedule",
        "**Guidance Schedule** multiplies CLIP Guidance's `clip_lambda` at each step: `linear` from 1.5x at the "
        "first step to 0.2x at the last. `clip_lambda` is 2000 here (the original's is 1000), so CLIP pulls "
        "with 3000 at the start and 400 at the end. `gradient_guard` normalize scales each result's guidance "
        "gradient down to an RMS of at most `limit` (0.05), a guard against blow-ups at such weights.",
        "Shape `constant` with the guard off (or no schedule node) is the original."))


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
    from tests.harness import throwaway_comfy

    logging.basicConfig(level=logging.WARNING)
    with throwaway_comfy() as comfy:
        defs = comfy.node_defs()
    OUT_DIR.mkdir(exist_ok=True)
    for name, workflow in build_all(defs).items():
        (OUT_DIR / f"{name}.json").write_text(json.dumps(workflow, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
