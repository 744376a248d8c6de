"""The vision tower's own attention path (clip_vision.py): open_clip's numbers, fewer ops, open_clip's fallbacks."""

from __future__ import annotations

import pytest
import torch
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from torch.utils._python_dispatch import TorchDispatchMode

from blended import clip_vision
from blended.clip_model import load_guidance_clip, set_precision
from conftest import REF


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _embed_and_grad(tower, images, encode):
    images = images.detach().requires_grad_(True)
    with _Count() as count:
        embeds = encode(tower, images)
        (grad,) = torch.autograd.grad(embeds.float().square().sum(), images)
    return embeds, grad, count.ops


def _small_vit(**overrides):
    torch.manual_seed(0)
    cfg = CLIPVisionCfg(layers=2, width=64, head_width=16, patch_size=8, image_size=32, **overrides)
    tower = _build_vision_tower(32, cfg, quick_gelu=True)
    return tower.eval().requires_grad_(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_reference_clip_gives_open_clips_bits_with_fewer_ops(dtype):
    clip = load_guidance_clip(REF / "clip_tiny" / "model.safetensors")
    set_precision(clip.model, dtype)
    visual = clip.model.visual
    assert clip_vision.supports(visual)
    images = torch.randn(6, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(1))
    ours, grad, ops = _embed_and_grad(visual, images.to(dtype), clip_vision.encode_image)
    theirs, grad_theirs, ops_theirs = _embed_and_grad(visual, images.to(dtype), lambda v, x: v(x))
    assert torch.equal(ours, theirs) and torch.equal(grad, grad_theirs)
    # nn.MultiheadAttention's q/k/v copies and per-tensor selections (each backward a zero fill and a copy) are
    # gone; the one selection left is the class token's
    assert ops.count("select_backward") == 1 < ops_theirs.count("select_backward")
    assert ops.count("clone") < ops_theirs.count("clone")
    assert len(ops) < 0.8 * len(ops_theirs), (len(ops), len(ops_theirs))


@pytest.mark.parametrize("variant", [dict(), dict(ls_init_value=0.5), dict(no_ln_pre=True),
                                     dict(final_ln_after_pool=True)])
def test_open_clip_vit_variants_match(variant):
    tower = _small_vit(**variant)
    assert clip_vision.supports(tower)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ours, grad, _ = _embed_and_grad(tower, images, clip_vision.encode_image)
    theirs, grad_theirs, _ = _embed_and_grad(tower, images, lambda v, x: v(x))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # Float32 sums in another order: the gradients agree to a few roundings of their largest element (0.52 without
    # ln_pre, where a fixed 1e-7 held on some CPUs' matmul kernels and not on others').
    torch.testing.assert_close(grad, grad_theirs, rtol=1e-5, atol=4e-6 * grad_theirs.abs().max().item())


def test_checkpointed_blocks_give_the_same_gradient():
    tower = _small_vit()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    plain, grad, _ = _embed_and_grad(tower, images, clip_vision.encode_image)
    tower.set_grad_checkpointing(True)
    again, grad_again, ops = _embed_and_grad(tower, images, clip_vision.encode_image)
    assert torch.equal(plain, again) and torch.equal(grad, grad_again)
    assert ops.count("_scaled_dot_product_flash_attention_for_cpu") == 2 * 2  # each block's forward ran twice


@pytest.mark.parametrize("variant", [dict(attentional_pool=True), dict(pool_type="avg"), dict(output_tokens=True),
                                     dict(layers=(1, 1, 1, 1), width=8, head_width=8)])
def test_other_towers_take_open_clips_forward(variant):
    torch.manual_seed(0)
    cfg = dict(layers=2, width=64, head_width=16, patch_size=8, image_size=32)
    cfg.update(variant)
    tower = _build_vision_tower(32, CLIPVisionCfg(**cfg), quick_gelu=True)
    assert not clip_vision.supports(tower)


def test_triton_clip_is_an_option_for_the_run_clone_and_the_towers_own_modules_off_cuda():
    """The option reaches the run clone's tower only; off CUDA (no interpreter) the blocks run their own
    LayerNorm and QuickGELU modules, so the bits are eager's. The kernels: tests/triton_kernel_checks.py."""
    from blended import fast_paths
    from conftest import tiny_unet

    options = fast_paths.parse_preset("bf16+triton_clip")
    assert options.triton_clip and "triton_clip" in options.describe()
    # measured on an H100 before it joined a preset: only the Sampler's CUDA default has it
    assert [name for name, preset in fast_paths.PRESETS.items() if preset.triton_clip] == ["fastest-gpu"]
    clip = load_guidance_clip(path=REF / "clip_tiny" / "model.safetensors")
    images = torch.randn(2, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(3))
    expected, g_expected, _ = _embed_and_grad(clip.model.visual, images, clip_vision.encode_image)
    with fast_paths.run_clones(tiny_unet(), clip, fast_paths.FastPathOptions(triton_clip=True)) as (_, fast):
        assert fast.kernels == "triton" and clip.kernels is None
        embeds, grad, ops = _embed_and_grad(fast.model.visual, images, lambda _, x: fast.image_tower()(x))
    assert torch.equal(embeds, expected) and torch.equal(grad, g_expected)
    blocks = len(clip.model.visual.transformer.resblocks)
    assert ops.count("sigmoid") == blocks and ops.count("native_layer_norm") >= 2 * blocks  # the modules' own
