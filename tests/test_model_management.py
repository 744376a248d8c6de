"""The pack's models under ComfyUI's model management: loaded wholly onto the device whatever the memory mode,
since their layers cannot stream weights from the host as ComfyUI's own do, and loaded again when the files
beside a checkpoint change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_node_errors import box_mask, empty_image, graph

import harness
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


@pytest.mark.comfy
def test_a_config_json_added_beside_a_checkpoint_is_read_on_the_next_queue(comfy_inprocess):
    """The config wins over detection, so adding one must not wait for a restart behind the loader's cache."""
    import folder_paths

    prompt = graph(empty_image(64, 64, color=0x446688), box_mask(), respacing="5")
    before = comfy_inprocess.run(prompt)
    assert before.tensors["unet"][0][0].unet.noise_schedule.name == "linear"
    checkpoint = Path(folder_paths.get_full_path("guided_diffusion", harness.GD_TINY_NAME))
    config_path = checkpoint.with_name(checkpoint.stem + ".config.json")
    config = json.loads((harness.FIXTURES / "reference" / "gd_tiny" / "config.json").read_text())
    config_path.write_text(json.dumps({**config, "noise_schedule": "cosine"}))
    try:
        after = comfy_inprocess.run(prompt)
        assert after.tensors["unet"][0][0].unet.noise_schedule.name == "cosine"
        assert not torch.equal(after.tensors["sampler"][0][0], before.tensors["sampler"][0][0])
        again = comfy_inprocess.run(prompt)  # nothing changed since: the loaded model is reused
        assert again.tensors["unet"][0][0] is after.tensors["unet"][0][0]
    finally:
        config_path.unlink()
    restored = comfy_inprocess.run(prompt)
    assert restored.tensors["unet"][0][0].unet.noise_schedule.name == "linear"


@pytest.mark.comfy
def test_a_clip_replaced_under_the_same_name_is_read_on_the_next_queue(comfy_inprocess):
    """Guidance and ranking must not keep the old weights, unsaid, until a restart (the UNet loader already
    re-reads its file)."""
    import folder_paths
    from safetensors.torch import load_file, save_file

    prompt = graph(empty_image(64, 64, color=0x446688), box_mask(), respacing="5")
    before = comfy_inprocess.run(prompt)
    path = Path(folder_paths.get_full_path("clip_guidance", harness.CLIP_TINY_NAME))
    original = path.read_bytes()
    weights = load_file(path)
    weights["positional_embedding"] = weights["positional_embedding"] * 1.5
    save_file(weights, path)
    try:
        after = comfy_inprocess.run(prompt)
        clip = after.tensors["clip"][0][0]
        assert clip is not before.tensors["clip"][0][0]
        assert torch.equal(clip.clip.model.positional_embedding.detach().cpu(), weights["positional_embedding"])
        assert comfy_inprocess.run(prompt).tensors["clip"][0][0] is clip  # nothing changed since: reused
    finally:
        path.write_bytes(original)


@pytest.mark.comfy
def test_the_loaders_outputs_tell_comfyuis_ram_cache_their_weights_size(comfy_inprocess):
    """ComfyUI's RAM-pressure cache weighs each output by its ``get_ram_usage`` (0.1 byte without one): the
    models must weigh what their weights do, or under pressure the cache lets everything else go first."""
    result = comfy_inprocess.run(graph(empty_image(64, 64, color=0x446688), box_mask(), respacing="5"))
    unet, clip = result.tensors["unet"][0][0], result.tensors["clip"][0][0]
    for bundle, module in ((unet, unet.unet), (clip, clip.clip.model)):
        weights = sum(t.nelement() * t.element_size() for t in module.state_dict().values())
        assert bundle.get_ram_usage() == weights > 1000
