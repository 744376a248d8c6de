"""The fake-tensor memory tracer (blended.memory_trace) and what it found in the checkpointed UNet."""

import pytest
import torch

from blended.fast_paths import parse_preset
from blended.memory_trace import MemoryTracer, trace_unet_backward

MIB = 1024 ** 2
BATCH = 2


def test_tracer_counts_live_storages_and_frees_them():
    # Real tensors: x (4 MiB) is held; exp's result is saved for the backward, sin's is released by del.
    tracer = MemoryTracer()
    with tracer:
        x = torch.zeros(1024, 1024, requires_grad=True)
        y = x.exp()
        z = y.sin()
        view = z.view(-1)  # a view adds nothing
        del y
        assert tracer.current == 3 * 4 * MIB
        (grad,) = torch.autograd.grad(view.sum(), x)
        del z, view
    assert tracer.current == 2 * 4 * MIB  # x and its gradient
    assert tracer.peak >= 4 * 4 * MIB and grad.shape == x.shape
    assert tracer.largest()[0].nbytes == 4 * MIB and tracer.largest()[0].dtype == "float32"


def _maps(rows, dtype, channels):
    """Allocations of ``dtype`` with ``channels`` channels at the full 256 px."""
    return [a for a in rows if a["dtype"] == dtype and tuple(a["shape"]) == (BATCH, channels, 256, 256)]


def test_checkpointed_unet_keeps_no_concatenation_and_no_float32_head_for_the_backward():
    """Under checkpointing the output blocks concatenate inside the checkpoint and the float32 ``out`` head is
    recomputed too: the backward used to find the [B, 512, 256, 256] concatenations (a copy of each skip) and
    three float32 [B, 256, 256, 256] maps of the head kept from the forward (30 GiB in all at batch 64)."""
    result = trace_unet_backward(parse_preset("bf16+channels_last+ckpt"), batch=BATCH, config="full256", keep=10_000)
    kept = result["live_after_forward"]
    assert _maps(kept, "bfloat16", 256), "the trace should see the saved block outputs"
    assert not [a for a in kept if a["op"] == "cat.default"]
    assert not _maps(kept, "float32", 256)
    assert not [a for a in result["live_at_peak"] if a["op"] == "cat.default" and a["phase"] == "forward"]
    # bf16 autocast keeps the largest maps (512 channels at 256 px) in bf16: nothing float32 of that size.
    assert max(a["nbytes"] for a in result["largest"]) == BATCH * 512 * 256 * 256 * 2
    assert not _maps(result["largest"], "float32", 512)


def test_checkpointing_lowers_the_traced_peak():
    plain = trace_unet_backward(parse_preset("bf16"), batch=BATCH, config="full256")
    checkpointed = trace_unet_backward(parse_preset("bf16+ckpt"), batch=BATCH, config="full256")
    weights = plain["weights_gib"]
    assert checkpointed["weights_gib"] == weights
    assert checkpointed["peak_gib"] - weights < 0.5 * (plain["peak_gib"] - weights)
    assert checkpointed["after_forward_gib"] - weights < 0.25 * (plain["after_forward_gib"] - weights)


def test_script_prints_one_trace_per_option_set(capsys):
    import runpy
    from pathlib import Path

    script = runpy.run_path(str(Path(__file__).resolve().parent.parent / "scripts" / "memory_trace.py"))
    results = script["main"](["--config", "tiny", "--batch", "2", "--preset", "faithful,bf16+ckpt", "--top", "3"])
    printed = capsys.readouterr().out
    assert [r["options"] for r in results] == ["faithful", "bf16-autocast+ckpt"]
    assert "faithful batch 2: UNet forward+backward (tiny, 64 px, CUDA rules)" in printed
    assert results[1]["peak_gib"] < results[0]["peak_gib"]


def test_whole_guided_step_traces_with_its_views_drawn_on_the_host():
    """``--step`` traces UNet, augmentations and CLIP together. The views' parameters are numpy arrays drawn from
    real CPU generators, which a fake tensor cannot give; the trace must still run, and CLIP's clip_ckpt must lower
    what the views keep for the backward."""
    from blended.memory_trace import trace_guided_step

    plain = trace_guided_step(parse_preset("fast-gpu"), batch=1, views=8, keep=3)
    lowmem = trace_guided_step(parse_preset("fast-gpu+clip_ckpt"), batch=1, views=8, keep=3)
    assert plain["views"] == 8 and plain["peak_gib"] > plain["weights_gib"] + 1
    assert lowmem["peak_gib"] < plain["peak_gib"]


def test_triton_kernels_are_traced_by_stand_ins_that_keep_only_their_input():
    """The Triton kernels cannot run on fake tensors; their stand-ins keep what the kernels keep (the input),
    where eager GroupNorm, SiLU and the scale-shift keep a map each, and CLIP's float32 LayerNorms a float32
    copy: the traced step holds much less per result."""
    from blended.memory_trace import trace_guided_step

    def held(preset):
        result = trace_guided_step(parse_preset(preset), batch=2, views=2, keep=400)
        return result["peak_gib"] - result["weights_gib"], result

    eager, _ = held("fast-gpu+channels_last")
    fused, result = held("fast-gpu+channels_last+triton_norm+triton_clip")
    assert fused < 0.7 * eager
    ops = {a["op"] for a in result["largest"]}
    assert {"empty_like.default in _ModelledKernelBackward",  # the stand-ins' input gradients
            "empty_like.default in _ModelledKernelKeepingInputBackward"} <= ops


def _traced_view_bytes(preset, name):
    """The per-view slope of the traced peak of CLIP's forward + backward (2 and 4 views)."""
    from blended.memory_trace import trace_clip_backward

    peaks = [trace_clip_backward(parse_preset(preset), views, name, keep=1)["peak_bytes"] for views in (2, 4)]
    return (peaks[1] - peaks[0]) / 2


def test_clip_view_bytes_follow_the_traces_of_vit_b16_and_vit_l14():
    """blended.memory counts each guiding CLIP's views from its shape with coefficients fitted to these traces
    (ViT-L/14 keeps 3.3x ViT-B/16's bytes per view): within 0.5% of each."""
    from blended.memory import clip_tower, clip_view_bytes
    from blended.memory_trace import clip_for_trace

    for name in ("ViT-B-16", "ViT-L-14"):
        tower = clip_tower(clip_for_trace(name).model)
        for preset, low, ckpt, triton in (("faithful", False, False, False), ("bf16", True, False, False),
                                          ("bf16+triton_clip+clip_ckpt", True, True, True)):
            assert clip_view_bytes(tower, low, ckpt, triton) == pytest.approx(_traced_view_bytes(preset, name),
                                                                              rel=0.005), (name, preset)


def test_the_lpips_trunk_follows_its_trace():
    """The LPIPS figure's VGG16 trunk (torchvision's features to relu5_3, as the lpips package builds it)."""
    import torchvision
    from torch._subclasses.fake_tensor import FakeTensorMode

    from blended import memory
    from blended.memory_trace import MemoryTracer, _fake_weights

    def peak(batch):
        with torch.device("meta"):
            net = torchvision.models.vgg16().features[:30].eval().requires_grad_(False)
        with FakeTensorMode(allow_non_fake_inputs=True):
            weights = _fake_weights(net)
            x = torch.empty(batch, 3, 256, 256).requires_grad_(True)
            with MemoryTracer(baseline=weights) as tracer:
                (grad,) = torch.autograd.grad(net(x).sum(), x)
                del grad
        return tracer.peak

    assert peak(2) - peak(1) == pytest.approx(memory._LPIPS_TRUNK_PER_RESULT_256, rel=0.01)
