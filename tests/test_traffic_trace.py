"""The kernel-traffic model (blended.traffic_trace): what each op is charged, and what a guided step moves."""

import pytest
import torch

from blended.fast_paths import parse_preset
from blended.traffic_trace import KernelTraffic, touched_bytes, trace_step_traffic


def test_ops_are_charged_the_bytes_they_read_and_write():
    a, b = torch.ones(16, 32), torch.ones(16, 32)  # 2 KiB each
    column = torch.ones(16, 1)
    with KernelTraffic(emulate_cuda=False) as traffic:
        c = a + b  # reads two, writes one
        view = c.view(-1).t().unsqueeze(0)  # views: nothing
        c.add_(a)  # reads both, writes c
        _ = a * column.expand(16, 32)  # a broadcast input is read once
        torch.empty(1000)  # an allocation moves nothing
        assert c.is_contiguous() and view.numel() == 512
        e = torch.mm(a, b.t())  # compute, listed apart
    assert traffic.by_op["add"] == 3 * 2048 and traffic.calls["add"] == 1
    assert traffic.by_op["add_"] == 3 * 2048
    assert traffic.by_op["mul"] == 2048 + 64 + 2048
    assert traffic.memory_bound_bytes == 6 * 2048 + 4096 + 64
    assert traffic.compute["mm"] == 2 * 2048 + touched_bytes(e)
    assert touched_bytes(column.expand(16, 32)) == 64


def test_cuda_rules_charge_layout_copies_and_cudnns_transposes_of_low_precision_nchw_convolutions():
    weight = torch.ones(8, 4, 3, 3, dtype=torch.bfloat16)
    nchw = torch.ones(2, 4, 16, 16, dtype=torch.bfloat16)
    with KernelTraffic(emulate_cuda=True) as traffic:
        out = torch.nn.functional.conv2d(nchw, weight, padding=1)
    # cuDNN's bf16 kernels are NHWC: the input and the output are transposed, each read and written.
    assert traffic.by_op["cuDNN NCHW<->NHWC transposes"] == 2 * (touched_bytes(nchw) + touched_bytes(out))
    with KernelTraffic(emulate_cuda=True) as traffic:
        torch.nn.functional.conv2d(nchw, weight.to(memory_format=torch.channels_last), padding=1)
    # A channels_last weight: the NCHW input is copied into channels_last first, and no transposes.
    assert traffic.by_op["CUDA layout copy"] == 2 * touched_bytes(nchw)
    assert "cuDNN NCHW<->NHWC transposes" not in traffic.by_op
    nchw32, weight32 = nchw.float(), weight.float()
    with KernelTraffic(emulate_cuda=True) as traffic:
        torch.nn.functional.conv2d(nchw32, weight32, padding=1)
    assert traffic.memory_bound_bytes == 0  # float32 NCHW convolutions run in place


@pytest.fixture(scope="module")
def step_traffic():
    return {preset: trace_step_traffic(parse_preset(preset), batch=1, views=2, keep=200)
            for preset in ("fast-gpu", "fast-gpu+channels_last+triton_norm+triton_clip")}


def test_a_guided_step_with_the_triton_kernels_and_channels_last_moves_half_the_bytes(step_traffic):
    eager, fused = step_traffic["fast-gpu"], step_traffic["fast-gpu+channels_last+triton_norm+triton_clip"]
    eager_ops = {row["op"] for row in eager["by_op"]}
    fused_ops = {row["op"] for row in fused["by_op"]}
    assert {"native_group_norm", "native_group_norm_backward", "silu_backward", "cuDNN NCHW<->NHWC transposes",
            "sigmoid"} <= eager_ops
    assert {"GroupNorm+SiLU (Triton)", "GroupNorm+SiLU backward (Triton)", "LayerNorm (Triton)",
            "QuickGELU backward (Triton)"} <= fused_ops
    assert not {"silu_backward", "cuDNN NCHW<->NHWC transposes", "sigmoid", "sigmoid_backward"} & fused_ops
    assert fused["memory_bound_gb"] < 0.55 * eager["memory_bound_gb"]
    # The same convolutions, matmuls and attention, but the output blocks' 1x1 skip convs on two parts are two
    # products, the second reading the first's output back.
    assert eager["compute_op_gb"] < fused["compute_op_gb"] < 1.03 * eager["compute_op_gb"]


def test_output_blocks_take_the_running_map_and_the_skip_as_parts(step_traffic):
    """With the Triton norm in channels_last, no output block makes a concatenation (the 256x256 model's 18, 4 of
    them with a group across the two parts), and their gradients reach the convolutions as dense maps, not as
    strided slices that CUDA copies first."""
    def cat(result):
        (row,) = [row for row in result["by_op"] if row["op"] == "cat"]
        return row["calls"], row["gb"]
    eager, fused = step_traffic["fast-gpu"], step_traffic["fast-gpu+channels_last+triton_norm+triton_clip"]
    (eager_calls, eager_gb), (fused_calls, fused_gb) = cat(eager), cat(fused)
    assert fused_calls == eager_calls - 18 and fused_gb < 0.1 * eager_gb
    assert any("_ModelledKernelOfPairBackward" in row["site"] for row in fused["by_site"])
    assert fused["layout_copy_gb"] < 0.3 * eager_gb


def test_the_norm_kernel_adds_the_skip_paths_gradient_itself(step_traffic):
    """A ResBlock's input has two gradients (its norm's and its skip path's): eager autograd sums them in an
    extra pass over the map; the Triton backward kernel adds the skip path's as it writes."""
    def accumulated(result, node):
        return sum(row["gb"] for row in result["by_site"] if row["op"] == "add" and f"backward of {node}" in
                   row["site"])
    eager, fused = step_traffic["fast-gpu"], step_traffic["fast-gpu+channels_last+triton_norm+triton_clip"]
    assert accumulated(eager, "NativeGroupNormBackward0") > 3 * accumulated(fused, "_ModelledKernelKeepingInput")
    assert any("_ModelledKernelKeepingInputBackward" in row["site"] for row in fused["by_site"])


def test_down_blocks_pool_inside_the_norm_kernels(step_traffic):
    """A down ResBlock pools its norm's output and its skip input: eagerly two avg_pool2d passes over full-size
    maps and, backward, two upsampled full-size gradients; the Triton norm writes both poolings and reads their
    half-size gradients itself."""
    def ops(result):
        return {row["op"] for row in result["by_op"]}
    def sites(result):
        return " ".join(row["site"] for row in result["by_site"])
    eager, fused = step_traffic["fast-gpu"], step_traffic["fast-gpu+channels_last+triton_norm+triton_clip"]
    assert "avg_pool2d" in ops(eager) and "_HalvingAvgPoolBackward" in sites(eager)
    assert "avg_pool2d" not in ops(fused) and "_HalvingAvgPoolBackward" not in sites(fused)
    assert "_ModelledKernelHalvingBackward" in sites(fused)


def test_script_traffic_needs_a_whole_step(capsys):
    import runpy
    from pathlib import Path

    script = runpy.run_path(str(Path(__file__).resolve().parent.parent / "scripts" / "memory_trace.py"))
    with pytest.raises(SystemExit):
        script["main"](["--traffic", "--batch", "1"])
    assert "--traffic counts a whole guided step" in capsys.readouterr().err
