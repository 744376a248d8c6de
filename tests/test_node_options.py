"""The sampler node's speed options run through ComfyUI and keep the background exact."""

from __future__ import annotations

import pytest
import torch
from test_node_errors import box_mask, empty_image, graph, solid_mask

import harness

pytestmark = pytest.mark.comfy


def test_bf16_autocast_and_channels_last_run_and_keep_background(comfy_inprocess):
    prompt = graph(empty_image(64, 64, color=0x446688), box_mask(),
                   precision="bf16 autocast", channels_last=True, reuse_guided_forward=True)
    result = comfy_inprocess.run(prompt)
    images = result.tensors["sampler"][0][0]
    assert images.shape == (1, 64, 64, 3) and torch.isfinite(images).all()
    expected = torch.tensor([0x44, 0x66, 0x88]) / 255.0
    torch.testing.assert_close(images[0, 0, 0], expected, atol=1e-6, rtol=0)
    # the shared model is left usable for a faithful run afterwards
    faithful = comfy_inprocess.run(graph(empty_image(), solid_mask(1.0)))
    assert faithful.tensors["sampler"][0][0].shape == (1, 64, 64, 3)


RANK_COLORS = [0xFF2020, 0x2040FF, 0x20C040]


def _rank_prompt(mode):
    g = harness.graph_builder()
    clip_node = g.node("BlendedDiffusion_LoadCLIP", clip_name=harness.CLIP_TINY_NAME, dtype="float32")
    a, b, c = (empty_image(48, 40, color=color)(g) for color in RANK_COLORS)
    abc = g.node("ImageBatch", image1=g.node("ImageBatch", image1=a, image2=b).out(0), image2=c)
    rank = g.node("BlendedDiffusion_CLIPRank", id="rank", images=abc.out(0), clip=clip_node.out(0),
                  prompt="a red rock", top_k=2, mode=mode)
    g.node("PreviewImage", images=rank.out(1))
    g.node("PreviewAny", source=rank.out(2))
    return g.finalize()


# True/False: what a workflow saved before the mode choice holds in that slot (the former "normalized" switch).
@pytest.mark.parametrize("mode, library_mode", [("original", "original"), ("guidance view", "guidance view"),
                                                (True, "guidance view"), (False, "original")])
def test_clip_rank_node_sorts_best_first_and_reports_scores(comfy_inprocess, mode, library_mode):
    """Any IMAGE batch in, sorted by CLIP distance out; the expectation is computed with the library directly."""
    from blended.clip_model import load_guidance_clip
    from blended.rank import clip_scores

    result = comfy_inprocess.run(_rank_prompt(mode))
    ranked, top_k, scores = (result.tensors["rank"][i][0] for i in range(3))

    images = torch.stack([torch.tensor([(c >> 16) & 255, (c >> 8) & 255, c & 255]) / 255.0 for c in RANK_COLORS])
    images = images[:, :, None, None].expand(-1, -1, 40, 48)
    clip = load_guidance_clip(path=harness.TINY_MODELS[1][2])
    with torch.no_grad():
        distances = clip_scores(clip, images, "a red rock", mode=library_mode)
    expected_order = torch.argsort(distances)
    expected = images[expected_order].movedim(1, -1)
    torch.testing.assert_close(ranked, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(top_k, expected[:2], atol=1e-6, rtol=0)
    lines = scores.splitlines()
    assert len(lines) == 3
    for rank, index in enumerate(expected_order.tolist()):
        assert lines[rank] == f"{rank + 1}. image {index}: {float(distances[index]):.4f}"


def test_clip_rank_node_refuses_an_unknown_mode(comfy_inprocess):
    with pytest.raises(Exception, match="mode must be one of"):
        comfy_inprocess.run(_rank_prompt("best"))


def test_batch_size_zero_sizes_the_batch_from_free_memory(comfy_inprocess, caplog):
    """batch_size 0 asks ComfyUI for the free memory; the results are those of an explicit batch size."""
    import logging

    mask = solid_mask(1.0)
    with caplog.at_level(logging.INFO):
        auto = comfy_inprocess.run(graph(empty_image(), mask, num_results=2, batch_size=0)).tensors["sampler"][0][0]
    assert any("batch_size auto = 2" in r.getMessage() for r in caplog.records)  # the CPU has room for both
    one = comfy_inprocess.run(graph(empty_image(), mask, num_results=2, batch_size=1)).tensors["sampler"][0][0]
    assert auto.shape == (2, 64, 64, 3)
    # float32 batch effects of the conv kernels only, far below one 8-bit grey level
    torch.testing.assert_close(auto, one, atol=1 / 255, rtol=0)
