"""Blended Edit Metrics inside ComfyUI, scoring another node's output (core ImageCompositeMasked)."""

from __future__ import annotations

import math

import pytest
import torch

import harness
from blended import metrics
from blended.clip_model import load_guidance_clip
from workflow_format import fill_defaults

PROMPT = "a red rock"


def _core_paste_prompt(node_defs, colour=0xFF2020, **metric_inputs):
    """A flat red square pasted into the photo by core ImageCompositeMasked, then scored."""
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "blended_example_img.png"}},
        "2": {"class_type": "LoadImageMask", "inputs": {"image": "blended_example_mask.png", "channel": "red"}},
        "3": {"class_type": "EmptyImage", "inputs": {"width": 256, "height": 256, "batch_size": 1,
                                                     "color": colour}},
        "4": {"class_type": "ImageCompositeMasked", "inputs": {"destination": ["1", 0], "source": ["3", 0],
                                                               "x": 0, "y": 0, "resize_source": False,
                                                               "mask": ["2", 0]}},
        "5": {"class_type": "BlendedDiffusion_LoadCLIP", "inputs": {"clip_name": harness.CLIP_TINY_NAME}},
        "6": {"class_type": "BlendedDiffusion_EditMetrics", "inputs": {
            "results": ["4", 0], "image": ["1", 0], "mask": ["2", 0], "clip": ["5", 0], "prompt": PROMPT,
            **metric_inputs}},
    }
    return fill_defaults(prompt, node_defs)


@pytest.mark.comfy
def test_metrics_node_scores_a_core_composite(comfy_inprocess):
    prompt = _core_paste_prompt(comfy_inprocess.node_defs())
    outputs, tensors = comfy_inprocess.run(prompt)
    table, similarity, psnr, seam_gradient, seam_colour, diversity = (slot for slot in tensors["6"])
    # list outputs arrive as lists; the single outputs as one-item lists
    assert len(similarity) == len(psnr) == len(seam_gradient) == len(seam_colour) == 1
    assert psnr == [math.inf], "core's composite keeps the background exactly"
    assert seam_colour[0] > 0.05 and seam_gradient[0] > 0, "a flat red paste has a seam"
    assert math.isnan(diversity[0])  # one image: no pairs
    assert "PSNR dB (+)" in table[0] and "inf" in table[0]
    assert outputs["6"]["text"] == [table[0]]  # shown on the node in the UI

    # the same numbers as the library on the same tensors
    composite, image, mask = tensors["4"][0][0], tensors["1"][0][0], tensors["2"][0][0]
    clip = load_guidance_clip(harness.TINY_MODELS[1][2])
    expected = metrics.score_edits(composite.movedim(-1, 1), image.movedim(-1, 1), mask, clip=clip, prompt=PROMPT)
    assert seam_colour[0] == pytest.approx(expected.seam_colour[0], abs=1e-6)
    assert seam_gradient[0] == pytest.approx(expected.seam_gradient[0], abs=1e-6)
    assert similarity[0] == pytest.approx(expected.clip_similarity[0], abs=1e-4)


@pytest.mark.comfy
def test_metrics_node_without_clip_and_lpips(comfy_inprocess):
    prompt = _core_paste_prompt(comfy_inprocess.node_defs(), lpips="off")
    del prompt["6"]["inputs"]["clip"]
    _, tensors = comfy_inprocess.run(prompt)
    table, similarity, psnr = tensors["6"][0][0], tensors["6"][1], tensors["6"][2]
    assert math.isnan(similarity[0]) and psnr == [math.inf]
    assert "n/a" in table


@pytest.mark.comfy
def test_metrics_node_refuses_a_mismatched_input(comfy_inprocess):
    prompt = _core_paste_prompt(comfy_inprocess.node_defs())
    prompt["7"] = {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "nearest-exact",
                                                          "width": 128, "height": 128, "crop": "disabled"}}
    prompt["6"]["inputs"]["image"] = ["7", 0]
    with pytest.raises(harness.PromptExecutionError, match="same size"):
        comfy_inprocess.run(prompt)


@pytest.mark.comfy
def test_metrics_node_scores_grayscale_images_as_their_rgb_copies(comfy_inprocess):
    """A one-channel IMAGE (some nodes output them) is repeated to RGB, as the Sampler and CLIP Rank take it."""
    node = comfy_inprocess.node_class_mappings["BlendedDiffusion_EditMetrics"]()
    gray = torch.rand(2, 48, 48, 1, generator=torch.Generator().manual_seed(4))
    reference = torch.rand(1, 48, 48, 1, generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(1, 48, 48)
    mask[:, 10:30, 12:36] = 1
    from_gray = node.score(gray, reference, mask, lpips="off")["result"]
    from_rgb = node.score(gray.expand(-1, -1, -1, 3), reference.expand(-1, -1, -1, 3), mask, lpips="off")["result"]
    assert from_gray[0] == from_rgb[0] and from_gray[2] == from_rgb[2]


@pytest.mark.comfy
def test_a_missing_lpips_is_said_once_a_session_with_this_nodes_way_out(comfy_inprocess, monkeypatch, caplog):
    """'if available' without the lpips package: the column is empty, and the console says why once, naming this
    node's own switch (not CLIP Guidance's weight); the table is not logged at INFO on every run."""
    import importlib.util
    import logging

    monkeypatch.setattr(comfy_inprocess.pack_module("comfy_bridge"), "_SAID", set())
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lpips" else find_spec(name, *a))
    with caplog.at_level(logging.INFO):
        for colour in (0xFF2020, 0x20FF20):  # two runs (another input, so ComfyUI runs the node again)
            comfy_inprocess.run(_core_paste_prompt(comfy_inprocess.node_defs(), colour=colour))
    said = [r.getMessage() for r in caplog.records if "LPIPS" in r.getMessage() and r.levelno >= logging.INFO]
    assert len(said) == 1 and "no LPIPS column" in said[0] and "set Edit Metrics' lpips to 'off'" in said[0]
    assert "background_lpips_lambda" not in said[0]
    assert not any("PSNR dB" in r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)


def _loaded_clip(comfy_inprocess):
    """The tiny CLIP as Load CLIP gives it (a GUIDANCE_CLIP), to call the nodes directly."""
    g = harness.graph_builder()
    g.node("PreviewAny", source=g.node("BlendedDiffusion_LoadCLIP", id="clip", clip_name=harness.CLIP_TINY_NAME,
                                       dtype="float32").out(0))
    return comfy_inprocess.run(g.finalize()).tensors["clip"][0][0]


@pytest.mark.comfy
def test_clip_rank_and_edit_metrics_move_their_bar_and_stop_on_cancel(comfy_inprocess, monkeypatch):
    """Hundreds of results take a while to score: both nodes move their own progress bar as they go and stop
    at ComfyUI's Cancel (between chunks), as the Sampler does between steps."""
    import sys

    import comfy.model_management as mm

    # the library as ComfyUI loaded the pack (under a module name it chose), with small chunks
    library_rank = sys.modules[comfy_inprocess.pack_module("rank").rank_by_clip.__module__]
    monkeypatch.setattr(library_rank, "EMBED_CHUNK", 4)
    monkeypatch.setattr(comfy_inprocess.pack_module("metrics").metrics, "VIEW_CHUNK", 4)
    clip = _loaded_clip(comfy_inprocess)
    rank_node = comfy_inprocess.node_class_mappings["BlendedDiffusion_CLIPRank"]()
    metrics_node = comfy_inprocess.node_class_mappings["BlendedDiffusion_EditMetrics"]()
    images = torch.rand(10, 40, 40, 3, generator=torch.Generator().manual_seed(6))
    mask = torch.zeros(1, 40, 40)
    mask[:, 8:30, 10:32] = 1
    messages = comfy_inprocess.server.messages
    del messages[:]
    rank_node.rank(images, clip, PROMPT, top_k=1, unique_id="rank")
    metrics_node.score(images, images[:1], mask, lpips="off", clip=clip, prompt=PROMPT, unique_id="metrics")
    bars = {}
    for kind, data in messages:
        if kind == "progress":
            bars.setdefault(data["node"], []).append((data["value"], data["max"]))
    assert bars["rank"] == [(4, 10), (8, 10), (10, 10)]
    assert bars["metrics"][-1] == (20, 20) and len(bars["metrics"]) == 10 + 3
    for run in (lambda: rank_node.rank(images, clip, PROMPT, top_k=1),
                lambda: metrics_node.score(images, images[:1], mask, lpips="off", clip=clip, prompt=PROMPT)):
        mm.interrupt_current_processing(True)
        try:
            with pytest.raises(mm.InterruptProcessingException):
                run()
        finally:
            mm.interrupt_current_processing(False)


class Distance(torch.nn.Module):
    """A stand-in for LPIPS (the package is optional): a per-result distance with a weight to move."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1), requires_grad=False)

    def forward(self, x, y):
        return ((x - y) ** 2).flatten(1).mean(dim=1) * self.scale


def _metrics_inputs():
    images = torch.rand(2, 24, 24, 3, generator=torch.Generator().manual_seed(7))
    mask = torch.zeros(1, 24, 24)
    mask[:, 4:12, 4:12] = 1
    return images, images[:1], mask


@pytest.mark.comfy
def test_edit_metrics_loads_lpips_with_clip_onto_comfyuis_device_in_one_call(comfy_inprocess, monkeypatch):
    """LPIPS is VGG16 at full resolution: on the CPU it takes seconds a result. The node loads it as ComfyUI loads
    its models, onto ComfyUI's device, in one call with CLIP (making room for one in a second call could move the
    other off the device) and with room for its largest chunk's activations."""
    module = comfy_inprocess.pack_module("metrics")
    bridge = comfy_inprocess.pack_module("comfy_bridge")
    clip = comfy_inprocess.node_class_mappings["BlendedDiffusion_LoadCLIP"]().load(harness.CLIP_TINY_NAME,
                                                                                    "float32")[0]
    calls = []
    real_load = bridge.load_for_sampling
    monkeypatch.setattr(module, "load_lpips", lambda way_out: Distance())
    monkeypatch.setattr(bridge, "load_for_sampling", lambda patchers, memory: calls.append((patchers, memory)) or
                        real_load(patchers, memory))
    images, reference, mask = _metrics_inputs()
    table = module.EditMetrics().score(images, reference, mask, clip=clip, prompt=PROMPT)["result"][0]
    assert len(calls) == 1
    patchers, memory = calls[0]
    assert patchers[0] is clip.patcher and type(patchers[1].model).__name__ == "Distance"
    assert patchers[1].load_device == bridge.mm.get_torch_device()
    assert memory == 2 * 24 * 24 * module.LPIPS_BYTES_PER_PIXEL  # both results in one chunk
    assert "LPIPS (-)" in table and "0.0000" in table


@pytest.mark.comfy
def test_edit_metrics_scores_lpips_on_the_cpu_when_the_device_runs_out(comfy_inprocess, monkeypatch, caplog):
    """A picture too large for LPIPS beside the device's other models: the node scores again with LPIPS on the CPU
    (slower, but it finishes) instead of failing, and says so."""
    module = comfy_inprocess.pack_module("metrics")

    class OutOfMemory(Distance):
        def forward(self, x, y):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 31.30 GiB")
    models = iter([OutOfMemory(), Distance()])
    monkeypatch.setattr(module, "load_lpips", lambda way_out=None: next(models))
    images, reference, mask = _metrics_inputs()
    table = module.EditMetrics().score(images, reference, mask)["result"][0]
    assert "LPIPS ran out of memory" in caplog.text and "LPIPS (-)" in table and "0.0000" in table
