"""The UNet reproduces the original guided-diffusion numerics and builds the released checkpoints' layouts."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from blended.architecture_detection import detect_unet_config, infer_image_size, unet_config_from_original_kwargs
from blended.checkpoint import load_guided_diffusion
from blended.diffusion import create_diffusion
from blended.unet import AttentionBlock, GroupNorm32, GuidedDiffusionUNet, UNetConfig
from conftest import REF

GD_TINY = REF / "gd_tiny"
LAYOUTS = sorted((REF / "checkpoint_layouts").glob("*.json"))


def assert_matches_reference(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.shape == expected.shape, name
    limit = 1e-4 * (1 + expected.abs().max().item())
    diff = (actual.double() - expected.double()).abs().max().item()
    assert diff <= limit, f"{name}: max|diff| {diff:.3g} > {limit:.3g}"


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(str(GD_TINY / "reference.safetensors"))


def _copy_alone(file_name: str, folder: Path, with_config: bool) -> Path:
    target = folder / file_name
    shutil.copyfile(GD_TINY / file_name, target)
    if with_config:
        shutil.copyfile(GD_TINY / "config.json", folder / "config.json")
    return target


@pytest.mark.parametrize("with_config", [False, True], ids=["weights-only", "with-config.json"])
@pytest.mark.parametrize("file_name", ["model.pt", "model.safetensors"])
def test_tiny_model_reproduces_original(tmp_path, reference, file_name, with_config):
    model, config = load_guided_diffusion(_copy_alone(file_name, tmp_path, with_config))
    assert config == unet_config_from_original_kwargs(json.loads((GD_TINY / "config.json").read_text()))
    assert config.image_size == 64  # detected, not given
    with torch.no_grad():
        out = model(reference["unet_x"], reference["unet_t"])
    assert_matches_reference(out, reference["unet_out"], "unet_out")

    diffusion = create_diffusion(timestep_respacing="100")
    assert diffusion.timestep_map.tolist() == reference["spaced_timestep_map"].tolist()
    for table in ("betas", "alphas_cumprod", "posterior_variance"):
        assert_matches_reference(torch.from_numpy(getattr(diffusion, table)), reference[f"spaced_{table}"], table)
    for index in (99, 60, 3):
        with torch.no_grad():
            pmv = diffusion.p_mean_variance(model, reference["unet_x"], index, clip_denoised=False)
        for key in ("mean", "variance", "log_variance", "pred_xstart"):
            assert_matches_reference(pmv[key], reference[f"pmv_t{index}_{key}"], f"pmv_t{index}_{key}")


def test_state_dict_round_trip_is_lossless():
    original = torch.load(GD_TINY / "model.pt", map_location="cpu", weights_only=True)
    model, _ = load_guided_diffusion(state_dict=original)
    saved = model.state_dict()
    assert list(saved) == list(original)
    for key, value in original.items():
        assert torch.equal(saved[key], value), key
    reloaded = GuidedDiffusionUNet(model.config)
    reloaded.load_state_dict(saved)
    pairs = zip(reloaded.state_dict().values(), original.values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def _legacy_attention(x: torch.Tensor, block_weights: dict[str, torch.Tensor], heads: int) -> torch.Tensor:
    """The original QKVAttentionLegacy from its definition: heads split before q/k/v, scale on q and k."""
    b, c, hgt, wid = x.shape
    tokens = x.reshape(b, c, -1)
    normed = F.group_norm(tokens, 32, block_weights["norm.weight"], block_weights["norm.bias"], 1e-5)
    qkv = F.conv1d(normed, block_weights["qkv.weight"], block_weights["qkv.bias"])
    ch = c // heads
    q, k, v = qkv.reshape(b * heads, 3 * ch, -1).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    attended = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, -1)
    out = F.conv1d(attended, block_weights["proj_out.weight"], block_weights["proj_out.bias"])
    return (tokens + out).reshape(b, c, hgt, wid)


def test_legacy_qkv_permutation_matches_legacy_attention():
    torch.manual_seed(0)
    channels, heads = 128, 4
    weights = {
        "norm.weight": torch.randn(channels), "norm.bias": torch.randn(channels),
        "qkv.weight": torch.randn(3 * channels, channels, 1) * 0.1, "qkv.bias": torch.randn(3 * channels) * 0.1,
        "proj_out.weight": torch.randn(channels, channels, 1) * 0.1, "proj_out.bias": torch.randn(channels),
    }
    block = AttentionBlock(channels, heads, legacy_order=True)
    block.load_state_dict(weights)
    # The held weight really is permuted (the test would pass trivially with one head otherwise).
    assert not torch.equal(block.qkv.weight, weights["qkv.weight"])
    x = torch.randn(2, channels, 6, 5)
    with torch.no_grad():
        torch.testing.assert_close(block(x), _legacy_attention(x, weights, heads), rtol=1e-5, atol=1e-5)
    assert torch.equal(block.state_dict()["qkv.weight"], weights["qkv.weight"])

    new_order = AttentionBlock(channels, heads, legacy_order=False)
    # A new-order block given the held (already permuted) weights computes the very same thing.
    new_order.load_state_dict({name: p.detach() for name, p in block.named_parameters()})
    with torch.no_grad():
        torch.testing.assert_close(new_order(x), block(x), rtol=0, atol=0)


@pytest.mark.parametrize("layout_path", LAYOUTS, ids=lambda p: p.stem)
def test_released_layouts_build_exactly_on_meta(layout_path):
    layout = json.loads(layout_path.read_text())
    config = unet_config_from_original_kwargs(layout["config"])
    with torch.device("meta"):
        model = GuidedDiffusionUNet(config)
    built = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert built == [(k, list(s)) for k, s in layout["keys"]]
    assert sum(p.numel() for p in model.parameters()) == layout["parameters"]
    meta_state = {k: torch.empty(s, device="meta") for k, s in layout["keys"]}
    assert detect_unet_config(meta_state) == config


def _tiny_config(**changes) -> UNetConfig:
    base = UNetConfig(image_size=32, model_channels=32, num_res_blocks=1, attention_resolutions=(2,),
                      channel_mult=(1, 2), num_head_channels=32)
    return UNetConfig(**{**base.to_dict(), **changes})


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"resblock_updown": False},
        {"use_scale_shift_norm": False, "out_channels": 3},
        {"num_classes": 10, "num_res_blocks": 2},
        {"channel_mult": (0.5, 1, 2), "attention_resolutions": (2, 4), "image_size": 64, "model_channels": 64},
    ],
    ids=["base", "conv-resample", "no-scale-shift-fixed-sigma", "class-cond", "half-width-level"],
)
def test_detection_round_trips_other_variants(changes):
    config = _tiny_config(**changes)
    with torch.device("meta"):
        state = GuidedDiffusionUNet(config).state_dict()
    overrides = {"image_size": config.image_size, "num_head_channels": config.num_head_channels}
    assert detect_unet_config(state, overrides=overrides) == config


def test_class_conditional_forward_uses_labels():
    torch.manual_seed(0)
    model = GuidedDiffusionUNet(_tiny_config(num_classes=10)).eval()
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([500.0])
    with torch.no_grad():
        a, b = model(x, t, y=torch.tensor([1])), model(x, t, y=torch.tensor([2]))
    assert a.shape == (1, 6, 16, 16) and not torch.allclose(a, b)
    with pytest.raises(ValueError):
        model(x, t)


def test_image_size_inference_rules():
    assert infer_image_size(_tiny_config(attention_resolutions=(8, 16, 32))) == 256
    assert infer_image_size(_tiny_config(attention_resolutions=(4,))) == 64
    assert infer_image_size(_tiny_config(attention_resolutions=(), channel_mult=(1, 1, 2, 3, 4))) == 128
    assert infer_image_size(_tiny_config(attention_resolutions=(), channel_mult=(1, 2, 2))) == 32


def test_channels_last_input_gives_same_output(reference):
    model, _ = load_guided_diffusion(GD_TINY / "model.pt")
    x = reference["unet_x"]
    with torch.no_grad():
        plain = model(x, reference["unet_t"])
        model_cl = model.to(memory_format=torch.channels_last)
        channels_last = model_cl(x.contiguous(memory_format=torch.channels_last), reference["unet_t"])
    assert_matches_reference(channels_last, plain, "channels_last")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_compute_keeps_fp32_islands(reference, dtype, monkeypatch):
    model, _ = load_guided_diffusion(GD_TINY / "model.pt")
    with torch.no_grad():
        fp32 = model(reference["unet_x"], reference["unet_t"])
    model.to_compute_dtype(dtype)
    assert model.compute_dtype == dtype
    stack_conv_params = {
        f"{module_name}.{param_name}"
        for module_name, module in model.named_modules()
        if module_name.startswith(("input_blocks", "middle_block", "output_blocks"))
        and isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d))
        for param_name, _ in module.named_parameters()
    }
    assert "input_blocks.0.0.bias" in stack_conv_params and "middle_block.1.qkv.weight" in stack_conv_params
    for name, param in model.named_parameters():
        assert param.dtype == (dtype if name in stack_conv_params else torch.float32), name

    norm_input_dtypes = []
    real_group_norm = F.group_norm

    def recording_group_norm(x, *args, **kwargs):
        norm_input_dtypes.append(x.dtype)
        return real_group_norm(x, *args, **kwargs)

    monkeypatch.setattr(F, "group_norm", recording_group_norm)
    with torch.no_grad():
        low = model(reference["unet_x"], reference["unet_t"])
    assert norm_input_dtypes and set(norm_input_dtypes) == {torch.float32}
    assert low.dtype == torch.float32
    scale = 1 + fp32.abs().max().item()
    assert (low - fp32).abs().max().item() < 0.05 * scale
    assert (low - fp32).abs().max().item() > 0  # it really ran in low precision

    monkeypatch.undo()
    model.to_compute_dtype(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(reference["unet_x"], reference["unet_t"]), fp32, rtol=0, atol=1e-2 * scale)


def test_group_norm_is_computed_in_float32():
    norm = GroupNorm32(32, 64)
    x = torch.randn(2, 64, 8, 8) * 50 + 300
    low = norm(x.to(torch.bfloat16))
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), norm(x.to(torch.bfloat16).float()).to(torch.bfloat16).float())


def test_gradient_checkpointing_does_not_change_output_or_gradient(reference):
    model, _ = load_guided_diffusion(GD_TINY / "model.pt")
    x = reference["unet_x"][:1]
    t = reference["unet_t"][:1]

    calls = []
    middle_forward = model.middle_block.forward

    def counting_forward(*args, **kwargs):
        calls.append(1)
        return middle_forward(*args, **kwargs)

    model.middle_block.forward = counting_forward

    def run(checkpointing: bool):
        model.gradient_checkpointing = checkpointing
        x_in = x.clone().requires_grad_(True)
        out = model(x_in, t)
        (out ** 2).sum().backward()
        return out.detach(), x_in.grad

    calls.clear()
    out_off, grad_off = run(False)
    assert len(calls) == 1
    calls.clear()
    out_on, grad_on = run(True)
    assert len(calls) == 2  # recomputed in backward: checkpointing is really active
    assert torch.equal(out_on, out_off)
    torch.testing.assert_close(grad_on, grad_off, rtol=1e-6, atol=1e-7)
