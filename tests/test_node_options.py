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
