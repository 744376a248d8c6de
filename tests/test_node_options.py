"""The sampler node's speed options run through ComfyUI and keep the background exact."""

from __future__ import annotations

import pytest
import torch

from test_node_errors import empty_image, graph, solid_mask

pytestmark = pytest.mark.comfy


def test_bf16_autocast_and_channels_last_run_and_keep_background(comfy_inprocess):
    prompt = graph(empty_image(64, 64, color=0x446688), {"class_type": "MaskComposite", "inputs": {
        "destination": ["14", 0], "source": ["15", 0], "x": 16, "y": 16, "operation": "add"}},
        precision="bf16 autocast", channels_last=True, reuse_guided_forward=True)
    prompt["14"] = solid_mask(0.0)
    prompt["15"] = solid_mask(1.0, 32, 32)
    result = comfy_inprocess.run(prompt)
    images = result.tensors["4"][0][0]
    assert images.shape == (1, 64, 64, 3) and torch.isfinite(images).all()
    expected = torch.tensor([0x44, 0x66, 0x88]) / 255.0
    torch.testing.assert_close(images[0, 0, 0], expected, atol=1e-6, rtol=0)
    # the shared model is left usable for a faithful run afterwards
    faithful = comfy_inprocess.run(graph(empty_image(), solid_mask(1.0)))
    assert faithful.tensors["4"][0][0].shape == (1, 64, 64, 3)


def test_clip_rank_node_sorts_best_first_and_reports_scores(comfy_inprocess):
    """Any IMAGE batch in, sorted by CLIP distance out; the expectation is computed with the library directly."""
    from blended.clip_model import load_guidance_clip
    from blended.rank import clip_scores
    import comfy_harness as harness

    colors = [0xFF2020, 0x2040FF, 0x20C040]
    prompt = {
        "2": {"class_type": "BlendedDiffusion_LoadCLIP", "inputs": {"clip_name": harness.CLIP_TINY_NAME,
                                                                     "dtype": "float32"}},
        "a": empty_image(48, 40, color=colors[0]), "b": empty_image(48, 40, color=colors[1]),
        "c": empty_image(48, 40, color=colors[2]),
        "ab": {"class_type": "ImageBatch", "inputs": {"image1": ["a", 0], "image2": ["b", 0]}},
        "abc": {"class_type": "ImageBatch", "inputs": {"image1": ["ab", 0], "image2": ["c", 0]}},
        "r": {"class_type": "BlendedDiffusion_CLIPRank", "inputs": {"images": ["abc", 0], "clip": ["2", 0],
                                                                     "prompt": "a red rock", "top_k": 2,
                                                                     "normalized": True}},
        "p": {"class_type": "PreviewImage", "inputs": {"images": ["r", 1]}},
        "t": {"class_type": "PreviewAny", "inputs": {"source": ["r", 2]}},
    }
    result = comfy_inprocess.run(prompt)
    ranked, top_k, scores = (result.tensors["r"][i][0] for i in range(3))

    images = torch.stack([torch.tensor([(c >> 16) & 255, (c >> 8) & 255, c & 255]) / 255.0 for c in colors])
    images = images[:, :, None, None].expand(-1, -1, 40, 48)
    clip = load_guidance_clip(path=harness.TINY_MODELS[1][2])
    with torch.no_grad():
        expected_order = torch.argsort(clip_scores(clip, images, "a red rock"))
    expected = images[expected_order].movedim(1, -1)
    torch.testing.assert_close(ranked, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(top_k, expected[:2], atol=1e-6, rtol=0)
    lines = scores.splitlines()
    assert len(lines) == 3 and lines[0].startswith(f"1. image {int(expected_order[0])}:")
