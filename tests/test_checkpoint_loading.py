"""Checkpoint reading is safe, strict, and explains every refusal; config precedence is weights < json < overrides."""

from __future__ import annotations

import builtins
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from blended.checkpoint import load_guided_diffusion, read_state_dict
from blended.errors import BlendedInputError, CheckpointError
from conftest import REF

GD_TINY = REF / "gd_tiny"


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    return torch.load(GD_TINY / "model.pt", map_location="cpu", weights_only=True)


def refused(path: Path, *fragments: str) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        load_guided_diffusion(path)
    message = str(info.value)
    assert path.name in message, message
    for fragment in fragments:
        assert fragment.lower() in message.lower(), message
    return info.value


def copy_with_config(folder: Path, file_name: str, **changes) -> tuple[Path, dict]:
    """The tiny checkpoint copied into `folder` with the original's config.json beside it, changed by `changes`."""
    path = folder / file_name
    shutil.copyfile(GD_TINY / file_name, path)
    config = {**json.loads((GD_TINY / "config.json").read_text()), **changes}
    (folder / "config.json").write_text(json.dumps(config))
    return path, config


def test_loaded_model_is_frozen_float32_eval_on_cpu(tmp_path, tiny_state):
    half = {k: v.half() for k, v in tiny_state.items()}
    path = tmp_path / "half.safetensors"
    save_file(half, str(path))
    model, _ = load_guided_diffusion(path)
    assert not model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" and not p.requires_grad
               for p in model.parameters())


def test_stable_diffusion_checkpoint_is_refused_with_guidance(tmp_path):
    path = tmp_path / "v1-5-pruned.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 1, 1)}, str(path))
    refused(path, "Stable Diffusion", "256x256_diffusion_uncond.pt")


def test_clip_file_is_refused(tmp_path):
    path = tmp_path / "clip.pt"
    shutil.copyfile(REF / "clip_tiny" / "model.pt", path)
    refused(path, "CLIP")


@pytest.mark.parametrize("file_name", ["model.pt", "model.safetensors"])
def test_truncated_files_are_refused(tmp_path, file_name):
    data = (GD_TINY / file_name).read_bytes()
    path = tmp_path / file_name
    path.write_bytes(data[: len(data) // 2])
    refused(path, "download it again")


def test_text_and_empty_files_are_refused(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("this is not a model\n")
    refused(text, "text file")
    lfs = tmp_path / "256x256_diffusion_uncond.pt"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 2211\n")
    refused(lfs, "Git LFS")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    refused(empty, "empty")
    refused(tmp_path / "absent.pt", "not found")


def test_missing_key_is_refused_and_named(tmp_path, tiny_state):
    state = dict(tiny_state)
    del state["middle_block.1.qkv.bias"]
    path = tmp_path / "missing.pt"
    torch.save(state, path)
    refused(path, "middle_block.1.qkv.bias", "missing")


def test_extra_key_is_refused_and_named(tmp_path, tiny_state):
    path = tmp_path / "extra.safetensors"
    save_file({**tiny_state, "extra_head.weight": torch.zeros(2)}, str(path))
    refused(path, "extra_head.weight", "unexpected")


def test_wrong_shape_is_refused(tmp_path, tiny_state):
    state = dict(tiny_state)
    state["out.0.weight"] = torch.zeros(7)
    path = tmp_path / "shape.pt"
    torch.save(state, path)
    refused(path, "out.0.weight")


class _RunsCodeWhenUnpickled:
    """A payload whose unpickling creates a marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("container", ["torch-zip", "raw-pickle"])
def test_pickle_that_runs_code_is_refused_without_running_it(tmp_path, container, tiny_state):
    def write(path: Path, marker: Path) -> None:
        payload = {"time_embed.0.weight": tiny_state["time_embed.0.weight"], "evil": _RunsCodeWhenUnpickled(marker)}
        if container == "torch-zip":
            torch.save(payload, path)
        else:
            path.write_bytes(pickle.dumps(payload, protocol=2))

    # The payload is live: an unsafe load does run it (so the assertion below can really fail).
    live, live_marker = tmp_path / "live.pt", tmp_path / "live-marker"
    write(live, live_marker)
    torch.load(live, weights_only=False) if container == "torch-zip" else pickle.loads(live.read_bytes())
    assert live_marker.exists()

    path, marker = tmp_path / "evil.pt", tmp_path / "marker"
    write(path, marker)
    refused(path, "refused", "Python objects")
    assert not marker.exists()


def test_non_tensor_values_are_refused(tmp_path, tiny_state):
    path = tmp_path / "mixed.pt"
    torch.save({**tiny_state, "epoch": 3}, path)
    with pytest.raises(CheckpointError, match="epoch"):
        read_state_dict(path)


def test_wrapped_state_dict_and_misnamed_formats_load(tmp_path, tiny_state):
    wrapped = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": tiny_state}, wrapped)
    assert list(read_state_dict(wrapped)) == list(tiny_state)
    # safetensors content behind a .pt name is recognised by its content
    misnamed = tmp_path / "really_safetensors.pt"
    shutil.copyfile(GD_TINY / "model.safetensors", misnamed)
    assert set(read_state_dict(misnamed)) == set(tiny_state)


def test_config_json_beside_wins_and_overrides_win_over_it(tmp_path):
    path, config = copy_with_config(tmp_path, "model.pt", num_head_channels=32)

    _, detected = load_guided_diffusion(state_dict=read_state_dict(path))
    assert detected.num_head_channels == 64
    _, from_json = load_guided_diffusion(path)
    assert from_json.num_head_channels == 32
    _, overridden = load_guided_diffusion(path, overrides={"num_head_channels": 16, "image_size": 128})
    assert (overridden.num_head_channels, overridden.image_size) == (16, 128)

    # a per-file config beats the folder's config.json
    config["num_head_channels"] = 64
    config["use_new_attention_order"] = True
    (tmp_path / "model.config.json").write_text(json.dumps(config))
    _, per_file = load_guided_diffusion(path)
    assert per_file.use_new_attention_order and per_file.num_head_channels == 64


def test_config_json_that_contradicts_the_weights_is_reported(tmp_path):
    path, _ = copy_with_config(tmp_path, "model.safetensors", num_res_blocks=2)
    refused(path, "config.json", "missing", "renamed to <that checkpoint's name>.config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_guided_diffusion(path)


def test_unrelated_config_json_is_ignored(tmp_path):
    path = tmp_path / "model.pt"
    shutil.copyfile(GD_TINY / "model.pt", path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    _, config = load_guided_diffusion(path)
    assert config.model_channels == 32


def test_overrides_of_shape_fixed_fields_are_refused(tiny_state):
    with pytest.raises(BlendedInputError, match="model_channels"):
        load_guided_diffusion(state_dict=tiny_state, overrides={"model_channels": 64})


def test_state_dict_with_path_names_the_path_in_errors(tiny_state):
    state = dict(tiny_state)
    state.pop("out.2.bias")
    with pytest.raises(CheckpointError, match="named.pt"):
        load_guided_diffusion(path="models/named.pt", state_dict=state)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("file_name", ["model.pt", "model.safetensors"])
def test_non_finite_weights_are_refused_and_named(tmp_path, tiny_state, bad, file_name):
    """NaN/inf weights load fine as tensors but give black images: refused at load, naming file and tensor."""
    state = dict(tiny_state)
    damaged = state["input_blocks.1.0.in_layers.2.weight"].clone()
    damaged.view(-1)[5] = bad
    state["input_blocks.1.0.in_layers.2.weight"] = damaged
    path = tmp_path / f"damaged_{file_name}"
    if file_name.endswith(".pt"):
        torch.save(state, path)
    else:
        save_file(state, str(path))
    refused(path, "input_blocks.1.0.in_layers.2.weight", "NaN or infinite")
    with pytest.raises(CheckpointError, match="NaN or infinite"):  # also when the caller read the file itself
        load_guided_diffusion(path, state_dict=state)


def _tiny_with_config(tmp_path, **changes):
    folder = tmp_path / "tiny"
    folder.mkdir()
    shutil.copyfile(GD_TINY / "model.safetensors", folder / "model.safetensors")
    config = json.loads((GD_TINY / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "model.safetensors"


def test_config_noise_schedule_reaches_the_sampler_diffusion(tmp_path):
    """A cosine model's config.json: the diffusion the Sampler builds for it uses the cosine schedule."""
    from blended.diffusion import NoiseSchedule, create_diffusion
    from blended.sampler import diffusion_for

    model, _ = load_guided_diffusion(_tiny_with_config(tmp_path, noise_schedule="cosine"))
    assert model.noise_schedule == NoiseSchedule("cosine", 1000)
    diffusion = diffusion_for(model, "100")
    expected = create_diffusion(noise_schedule="cosine", timestep_respacing="100")
    np.testing.assert_array_equal(diffusion.betas, expected.betas)
    assert not np.allclose(diffusion.betas, create_diffusion(timestep_respacing="100").betas)
    # without a config, and with the fixture's linear one, the released models' linear schedule
    plain, _ = load_guided_diffusion(state_dict=torch.load(GD_TINY / "model.pt", weights_only=True))
    assert plain.noise_schedule == NoiseSchedule("linear", 1000)
    linear, _ = load_guided_diffusion(GD_TINY / "model.pt")
    np.testing.assert_array_equal(diffusion_for(linear, "100").betas, create_diffusion().betas)


def test_unknown_noise_schedule_in_config_is_refused(tmp_path):
    path = _tiny_with_config(tmp_path, noise_schedule="sigmoid")
    with pytest.raises(CheckpointError, match="sigmoid") as info:
        load_guided_diffusion(path)
    assert "config.json" in str(info.value)


# OpenAI's flags for its class-conditional 64x64 and 128x128 checkpoints (guided-diffusion README): what their
# shapes cannot show differs from the 256x256 and 512x512 releases (its dropout, 0.1 for 64x64, does nothing in
# eval mode).
RELEASED_FLAGS = {
    "64x64_diffusion.pt": dict(attention_resolutions="32,16,8", class_cond=True, image_size=64,
                               learn_sigma=True, noise_schedule="cosine", num_channels=192, num_head_channels=64,
                               num_res_blocks=3, resblock_updown=True, use_new_attention_order=True,
                               use_scale_shift_norm=True),
    "128x128_diffusion.pt": dict(attention_resolutions="32,16,8", class_cond=True, image_size=128, learn_sigma=True,
                                 noise_schedule="linear", num_channels=256, num_heads=4, num_res_blocks=2,
                                 resblock_updown=True, use_scale_shift_norm=True),
}


@pytest.mark.parametrize("name", sorted(RELEASED_FLAGS))
def test_the_64_and_128_pixel_releases_are_recognised_with_their_flags(name):
    from blended.architecture_detection import detect_unet_config, released_checkpoint, unet_config_from_original_kwargs
    from blended.unet import GuidedDiffusionUNet

    flags = RELEASED_FLAGS[name]
    config = unet_config_from_original_kwargs(flags)
    with torch.device("meta"):
        state = GuidedDiffusionUNet(config).state_dict()
    assert detect_unet_config(state) == config
    assert released_checkpoint(config).name == name and released_checkpoint(config).noise_schedule == flags[
        "noise_schedule"]


def test_a_recognised_release_brings_its_noise_schedule_and_widgets_still_win(tmp_path, tiny_state, monkeypatch):
    from blended import architecture_detection
    from blended.architecture_detection import ReleasedCheckpoint, detect_unet_config

    tiny = detect_unet_config(tiny_state)
    key = (tiny.model_channels, tiny.num_res_blocks, tuple(float(m) for m in tiny.channel_mult), tiny.num_classes)
    monkeypatch.setitem(architecture_detection.RELEASED_BY_SHAPE, key, ReleasedCheckpoint(
        "tiny.pt", {"use_new_attention_order": True}, "cosine"))
    path = tmp_path / "tiny.pt"
    shutil.copyfile(GD_TINY / "model.pt", path)
    unet, config = load_guided_diffusion(path)
    assert config.use_new_attention_order and unet.noise_schedule.name == "cosine"
    _, config = load_guided_diffusion(path, overrides={"use_new_attention_order": False})
    assert not config.use_new_attention_order


def test_a_pytorch_checkpoint_renamed_safetensors_still_loads(tmp_path, tiny_state):
    """The format goes by the content, whatever the torch: torch >= 2.10's own load hands any path ending in
    .safetensors to safetensors, which failed with a bare "header too large"."""
    renamed = tmp_path / "256x256_diffusion_uncond.safetensors"
    shutil.copyfile(GD_TINY / "model.pt", renamed)
    assert list(read_state_dict(renamed)) == list(tiny_state)
    model, _ = load_guided_diffusion(renamed)
    assert torch.equal(model.state_dict()["out.2.weight"], tiny_state["out.2.weight"])


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_a_config_json_saved_by_a_windows_editor_is_read(tmp_path, encoding):
    """Notepad saves UTF-8 with a byte-order mark and PowerShell's redirection UTF-16: both are JSON all the same,
    and were refused as unreadable."""
    path, config = copy_with_config(tmp_path, "model.pt", num_head_channels=32)
    (tmp_path / "config.json").write_text(json.dumps(config), encoding=encoding)
    assert load_guided_diffusion(path)[1].num_head_channels == 32


def test_a_config_json_yes_no_setting_written_as_a_word_means_that_word(tmp_path):
    """bool("false") is True: a config saying "use_new_attention_order": "false" loaded the new order, silently
    (the qkv layout changes no shape)."""
    path, _ = copy_with_config(tmp_path, "model.pt", use_new_attention_order="false")
    assert not load_guided_diffusion(path)[1].use_new_attention_order
    copy_with_config(tmp_path, "model.pt", use_new_attention_order="True")
    assert load_guided_diffusion(path)[1].use_new_attention_order
    copy_with_config(tmp_path, "model.pt", use_new_attention_order="sometimes")
    with pytest.raises(CheckpointError, match="config.json: .*use_new_attention_order must be true or false, not "
                                              "'sometimes'"):
        load_guided_diffusion(path)


def test_a_config_json_flag_may_be_a_number_and_an_x0_predicting_model_is_refused(tmp_path):
    """JSON writers turn flags into 1.0 as often as into true; and a model trained with predict_xstart would load
    (its shapes are the same) and edit wrongly, since the sampler reads the output as the noise."""
    path, _ = copy_with_config(tmp_path, "model.pt", learn_sigma=1.0, use_new_attention_order=0.0)
    assert load_guided_diffusion(path)[1].out_channels == 6
    copy_with_config(tmp_path, "model.pt", predict_xstart=False)
    load_guided_diffusion(path)
    copy_with_config(tmp_path, "model.pt", predict_xstart=True)
    with pytest.raises(CheckpointError, match="config.json: predict_xstart is true: this model predicts the clean "
                                              "image"):
        load_guided_diffusion(path)
    copy_with_config(tmp_path, "model.pt", predict_xstart="maybe")
    with pytest.raises(CheckpointError, match="predict_xstart must be true or false, not 'maybe'"):
        load_guided_diffusion(path)


def test_a_misspelt_config_json_setting_is_refused_and_other_scripts_settings_are_ignored(tmp_path, caplog):
    """A misspelt key was ignored and its default used: "num_head_channel": 32 gave four heads of 16 channels,
    which load without complaint and compute another model."""
    path, config = copy_with_config(tmp_path, "model.pt")
    config["num_head_channel"] = config.pop("num_head_channels")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json: unknown setting 'num_head_channel': did you mean "
                                              "'num_head_channels'"):
        load_guided_diffusion(path)
    # the settings of Blended Diffusion's own script (or any other) beside the model's are only named in the log
    copy_with_config(tmp_path, "model.pt", num_head_channels=32, clip_guidance_lambda=1000, batch_size=4)
    assert load_guided_diffusion(path)[1].num_head_channels == 32
    assert "'clip_guidance_lambda', 'batch_size'" in caplog.text


def test_an_optimizer_state_is_refused_as_such(tmp_path):
    """guided-diffusion's training saves opt<step>.pt beside model<step>.pt and ema_*.pt; picking it was met with
    advice to save the model's state_dict."""
    path = tmp_path / "opt050000.pt"
    torch.save(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))]).state_dict(), path)
    error = refused(path, "optimizer's state", "ema_")
    assert "Save model.state_dict()" not in str(error)
