"""GuidanceCLIP: loading from local files, parity with the original CLIP, tokenizer limits, refusals."""

from __future__ import annotations

import inspect
import logging
import socket
import zipfile

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

from blended import clip_model
from blended.clip_model import GuidanceCLIP, load_guidance_clip
from blended.errors import BlendedInputError, CheckpointError
from conftest import REF

CLIP_DIR = REF / "clip_tiny"
ATOL = 1e-3  # README: open_clip matches the original within 2e-4; 1e-3 allowed


@pytest.fixture(scope="module")
def reference():
    return load_file(str(CLIP_DIR / "reference.safetensors"))


@pytest.fixture(scope="module")
def state_dict():
    return torch.load(CLIP_DIR / "model.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def clip():
    return load_guidance_clip(CLIP_DIR / "model.safetensors")


def _assert_matches_reference(clip: GuidanceCLIP, reference):
    assert torch.equal(clip.tokenize(["a red rock"]), reference["tokens"])
    text = clip.text_embedding("a red rock")
    assert text.dtype == torch.float32 and text.shape == (1, 32)
    torch.testing.assert_close(text, reference["text_embed"], atol=ATOL, rtol=0)
    image = clip.encode_image(reference["image_in"])
    assert image.dtype == torch.float32
    torch.testing.assert_close(image, reference["image_embed"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("filename", ["model.pt", "model.safetensors"])
def test_matches_original_clip(filename, reference):
    clip = load_guidance_clip(CLIP_DIR / filename)
    assert clip.image_size == 32 and clip.context_length == 77
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in clip.model.parameters())
    assert not clip.model.training
    _assert_matches_reference(clip, reference)


def test_state_dict_wrappers(state_dict, reference, tmp_path):
    wrapped = {"state_dict": {f"module.{k}": v for k, v in state_dict.items()}, "epoch": 3}
    _assert_matches_reference(load_guidance_clip(state_dict=wrapped), reference)
    path = tmp_path / "wrapped.bin"
    torch.save(wrapped, path)
    _assert_matches_reference(load_guidance_clip(path), reference)


def test_float32_weights_are_not_rounded_to_half(state_dict, tmp_path):
    sd32 = {k: v.float() for k, v in state_dict.items()}
    sd32["visual.proj"] = sd32["visual.proj"] + 1e-5 * torch.randn_like(sd32["visual.proj"])
    path = tmp_path / "fp32.safetensors"
    save_file(sd32, str(path))
    clip = load_guidance_clip(path)
    assert torch.equal(clip.model.visual.proj, sd32["visual.proj"])


def test_torchscript_archive_is_read_without_running_code(state_dict, reference, tmp_path):
    from open_clip.model import build_model_from_openai_state_dict

    model = build_model_from_openai_state_dict(dict(state_dict)).float().eval()
    traced = torch.jit.trace_module(
        model, {"encode_image": (reference["image_in"],), "encode_text": (reference["tokens"],)})
    archive_path = tmp_path / "ViT-tiny.pt"
    traced.save(str(archive_path))
    _assert_matches_reference(load_guidance_clip(archive_path), reference)

    # Same archive with a data.pkl that would create a directory if it were unpickled unsafely.
    marker = tmp_path / "code_ran"
    evil = (b"\x80\x02cos\nmkdir\nX" + len(str(marker)).to_bytes(4, "little") + str(marker).encode()
            + b"\x85R.")
    evil_path = tmp_path / "evil.pt"
    with zipfile.ZipFile(archive_path) as src, zipfile.ZipFile(evil_path, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, evil if name.endswith("/data.pkl") else src.read(name))
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_guidance_clip(evil_path)
    assert not marker.exists()


def test_refuses_guided_diffusion_unet():
    with pytest.raises(CheckpointError, match="guided-diffusion UNet") as info:
        load_guidance_clip(REF / "gd_tiny" / "model.pt")
    assert "model.pt" in str(info.value)


def test_refuses_text_file(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("this is not a model\n")
    with pytest.raises(CheckpointError, match="notes.pt.*text file"):
        load_guidance_clip(path)


@pytest.mark.parametrize("filename", ["model.pt", "model.safetensors"])
def test_refuses_truncated_file(filename, tmp_path):
    data = (CLIP_DIR / filename).read_bytes()
    path = tmp_path / filename
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_guidance_clip(path)
    assert str(path) in str(info.value)


def test_refuses_missing_keys(state_dict):
    partial = {k: v for k, v in state_dict.items() if k != "text_projection"}
    with pytest.raises(CheckpointError, match="missing text_projection"):
        load_guidance_clip(state_dict=partial)
    no_layer = {k: v for k, v in state_dict.items() if not k.startswith("visual.transformer.resblocks.0.mlp")}
    with pytest.raises(CheckpointError, match="consistent CLIP"):
        load_guidance_clip(state_dict=no_layer)


def test_refuses_missing_file_and_ambiguous_arguments(tmp_path, state_dict):
    with pytest.raises(CheckpointError, match="not found"):
        load_guidance_clip(tmp_path / "absent.safetensors")
    with pytest.raises(BlendedInputError):
        load_guidance_clip()
    # With both, the state dict (already read by the caller, e.g. ComfyUI) is used and the path names the file
    # in messages: a path that does not exist is not read.
    assert load_guidance_clip(tmp_path / "read-elsewhere.safetensors", state_dict=state_dict).image_size == 32
    with pytest.raises(CheckpointError, match="read-elsewhere"):
        load_guidance_clip(tmp_path / "read-elsewhere.safetensors", state_dict={"not": torch.zeros(1)})


def test_long_prompt_truncates_with_warning_or_raises(clip, caplog):
    prompt = " ".join(["rock"] * 100)
    with caplog.at_level(logging.WARNING, logger="blended.clip_model"):
        tokens = clip.tokenize([prompt, "a red rock"])
    assert tokens.shape == (2, 77)
    assert tokens[0, -1].item() == 49407  # end marker kept after truncation
    assert any("102 tokens" in r.getMessage() for r in caplog.records)
    with pytest.raises(BlendedInputError, match="102 tokens.*77"):
        clip.tokenize([prompt], truncate=False)
    # exactly at the limit is fine: 75 words + start/end markers
    assert clip.tokenize([" ".join(["rock"] * 75)], truncate=False).shape == (1, 77)


def test_a_long_prompt_is_quoted_whole_when_short_enough_and_cut_with_dots_otherwise(clip):
    """Long in tokens is not long in characters: a prompt under 60 characters is quoted whole, without dots that
    would suggest more text; a longer one is quoted cut, with dots."""
    short = "\U0001f98a" * 40  # 40 emoji, a few tokens each: over the limit in 40 characters
    with pytest.raises(BlendedInputError) as err:
        clip.tokenize([short], truncate=False)
    assert f"the prompt {short!r} has" in str(err.value)
    long = " ".join(["rock"] * 100)
    with pytest.raises(BlendedInputError) as err:
        clip.tokenize([long], truncate=False)
    assert f"the prompt {long[:60]!r}... has" in str(err.value)


def test_tokenizer_needs_no_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the tokenizer tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    clip_model._bpe_tokenizer.cache_clear()
    tokens = clip_model._bpe_tokenizer()(["a red rock"], context_length=77)
    assert tokens[0, :5].tolist() == [49406, 320, 736, 2172, 49407]


def test_text_embedding_cache_is_bounded_and_stable(clip):
    first = clip.text_embedding("a blue sky")
    first.mul_(0)  # the caller mutating its copy must not poison the cache
    again = clip.text_embedding("a blue sky")
    assert again.abs().sum() > 0
    for i in range(clip_model.TEXT_CACHE_SIZE + 6):
        clip.text_embedding(f"prompt number {i}")
    assert len(clip._text_cache) == clip_model.TEXT_CACHE_SIZE
    empty = clip.text_embedding("")
    assert empty.shape == (1, 32) and torch.isfinite(empty).all()


def test_works_under_comfyui_style_inference_mode(reference):
    """Loaded in inference_mode(False), used from inference mode, differentiated outside it."""
    with torch.inference_mode():
        with torch.inference_mode(False):
            clip = load_guidance_clip(CLIP_DIR / "model.pt")
        text = clip.text_embedding("a red rock")
        assert not text.is_inference()
        with torch.inference_mode(False), torch.enable_grad():
            image = reference["image_in"].clone().requires_grad_(True)
            loss = torch.nn.functional.cosine_similarity(clip.encode_image(image), text).sum()
            (grad,) = torch.autograd.grad(loss, image)
    assert grad.abs().sum() > 0


def test_normalize_and_to(reference):
    clip = load_guidance_clip(CLIP_DIR / "model.pt")
    ones = torch.ones(1, 3, 2, 2)
    expected = (1 - torch.tensor(clip_model.CLIP_MEAN)) / torch.tensor(clip_model.CLIP_STD)
    torch.testing.assert_close(clip.normalize(ones)[0, :, 0, 0], expected)
    clip.to(dtype=torch.float16)
    assert clip.dtype == torch.float16
    image = clip.encode_image(reference["image_in"])
    assert image.dtype == torch.float32
    torch.testing.assert_close(image, reference["image_embed"], atol=ATOL, rtol=0)
    clip.to(dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in clip.model.parameters())
    with pytest.raises(BlendedInputError, match="float64"):
        clip.to(dtype=torch.float64)


# OpenAI's convert_weights (CLIP/clip/model.py): conv, linear and attention weights and the two projections go to
# fp16; LayerNorms, token/class/positional embeddings and the logit scale stay fp32.
_OPENAI_HALF_SUFFIXES = ("conv1.weight", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                         "attn.out_proj.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
                         "mlp.c_proj.bias")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_follows_openai_convert_weights(reference, dtype):
    clip = load_guidance_clip(CLIP_DIR / "model.pt").to(dtype=dtype)
    dtypes = {name: p.dtype for name, p in clip.model.named_parameters()}
    expected = {name: dtype if name.endswith(_OPENAI_HALF_SUFFIXES) or name in ("text_projection", "visual.proj")
                else torch.float32 for name in dtypes}
    assert dtypes == expected
    assert dtypes["ln_final.weight"] == torch.float32 and dtypes["token_embedding.weight"] == torch.float32
    if dtype == torch.float16:  # the tiny fixture in fp16 stays within the float32 reference tolerance
        torch.testing.assert_close(clip.text_embedding("a red rock"), reference["text_embed"], atol=ATOL, rtol=0)
        torch.testing.assert_close(clip.encode_image(reference["image_in"]), reference["image_embed"], atol=ATOL,
                                   rtol=0)
        # guidance differentiates through it
        image = reference["image_in"].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(clip.encode_image(image).sum(), image)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_non_finite_clip_weights_are_refused(state_dict, tmp_path):
    damaged = dict(state_dict)
    damaged["ln_final.weight"] = damaged["ln_final.weight"].clone()
    damaged["ln_final.weight"][0] = float("nan")
    path = tmp_path / "damaged_clip.safetensors"
    save_file(damaged, str(path))
    with pytest.raises(CheckpointError, match="ln_final.weight contains NaN") as info:
        load_guidance_clip(path)
    assert "damaged_clip.safetensors" in str(info.value)


def _layer_norms_see_their_weights_dtype(clip: GuidanceCLIP, dtype: torch.dtype) -> list[str]:
    """LayerNorms that would get a low-precision input with float32 weights without casting it (CUDA refuses
    that mix; the CPU kernels accept it, so the forward alone cannot show it here)."""
    bad = []
    for name, module in clip.model.named_modules():
        if isinstance(module, torch.nn.LayerNorm) and module.weight.dtype != dtype:
            casts_input = type(module).forward is not torch.nn.LayerNorm.forward and "float" in \
                inspect.getsource(type(module).forward)
            if not casts_input:
                bad.append(name)
    return bad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_layer_norms_compute_in_float32(dtype):
    """Loaded CLIPs (and the benchmark's random ViT-B/16, built through the same loader) keep their LayerNorms
    in float32 and cast what enters them, as OpenAI's do."""
    from blended.benchmark import random_vit_b16_clip

    for clip in (load_guidance_clip(CLIP_DIR / "model.pt"), random_vit_b16_clip()):
        assert _layer_norms_see_their_weights_dtype(clip.to(dtype=dtype), dtype) == []
    plain = GuidanceCLIP(open_clip.create_model("ViT-B-16-quickgelu", pretrained=None), 224)
    # What the benchmark built before: open_clip's plain LayerNorm, which CUDA fails on in low precision.
    assert _layer_norms_see_their_weights_dtype(plain.to(dtype=dtype), dtype) != []


def test_normalisation_constants_are_made_once_per_device_and_dtype_and_work_in_a_later_backward():
    fresh = load_guidance_clip(CLIP_DIR / "model.safetensors")
    images = torch.rand(2, 3, 8, 8, dtype=torch.float64)  # another dtype: the constants are new tensors
    with torch.inference_mode():  # e.g. CLIP Rank, which ComfyUI runs under inference mode, uses it first
        first = fresh.normalize(images)
    fresh.mean = fresh.std = None  # a second call must not copy them again
    leaf = images.clone().requires_grad_(True)
    again = fresh.normalize(leaf)
    assert torch.equal(again.detach(), first)
    again.sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
