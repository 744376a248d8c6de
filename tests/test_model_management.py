"""The pack's models under ComfyUI's memory modes: loaded wholly onto the device whatever the mode, since their
layers cannot stream weights from the host as ComfyUI's own do."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_clip, tiny_unet


@pytest.mark.comfy
@pytest.mark.parametrize("mode", ["NO_VRAM", "LOW_VRAM", "NORMAL_VRAM", "HIGH_VRAM"])
def test_every_memory_mode_loads_the_models_wholly(comfy_inprocess, monkeypatch, mode):
    # --novram gives a full load a budget of 0.1 bytes: ComfyUI moved nothing, and the first forward mixed devices.
    import comfy.model_patcher

    bridge = comfy_inprocess.pack_module("comfy_bridge")
    mm = bridge.mm
    gpu = torch.device("meta")  # stands in for the GPU: what moves there is what ComfyUI loaded
    monkeypatch.setattr(mm, "vram_state", getattr(mm.VRAMState, mode))
    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False:
                        (8 << 30, 8 << 30) if torch_free_too else 8 << 30)
    monkeypatch.setattr(mm, "soft_empty_cache", lambda *args, **kwargs: None)
    monkeypatch.setattr(mm, "current_loaded_models", [])
    unet, clip = tiny_unet(), tiny_clip()
    patchers = [comfy.model_patcher.ModelPatcher(model, load_device=gpu, offload_device=torch.device("cpu"))
                for model in (unet, clip.model)]
    bridge.load_for_sampling(patchers, 1 << 30)
    for model in (unet, clip.model):
        assert {t.device for t in list(model.parameters()) + list(model.buffers())} == {gpu}
    assert all(p.loaded_size() == p.model_size() for p in patchers)
