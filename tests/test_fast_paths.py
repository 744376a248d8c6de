"""Fast paths keep the faithful numbers where they must, stay close where they trade precision, and the
benchmark script runs and prints its figures (tests/fixtures only; CPU)."""

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blended import fast_paths
from blended.architecture_detection import unet_config_from_original_kwargs
from blended.augment import AugmentationSettings
from blended.errors import BlendedInputError
from blended.fast_paths import FastPathOptions, WeightSnapshot
from blended.guidance import GuidanceObjective, GuidanceSettings
from blended.sampler import SamplerSettings, guided_step
from blended.unet import GuidedDiffusionUNet
from conftest import REF, assert_close, parameter_casts, tiny_clip, tiny_unet

INDEX = 60  # a mid-schedule step of the blended_step reference


def load_bench():
    from blended import benchmark

    return benchmark


@pytest.fixture(scope="module")
def reference():
    return load_file(str(REF / "blended_step.safetensors"))


@pytest.fixture(scope="module")
def unet_reference():
    return load_file(str(REF / "gd_tiny" / "reference.safetensors"))


@pytest.fixture
def unet():
    # Function scope: the fast paths change the model in place.
    return tiny_unet()


@pytest.fixture
def clip():
    return tiny_clip()


def step(unet, clip, diffusion, reference, settings=None):
    objective = GuidanceObjective(
        clip, clip.text_embedding("a red rock"), reference["mask"], reference["init_image"],
        GuidanceSettings(clip_lambda=float(reference["clip_guidance_lambda"]),
                         range_lambda=float(reference["range_lambda"]),
                         augmentations=AugmentationSettings(num_views=1)))
    return guided_step(unet, diffusion, objective, reference[f"t{INDEX}_x"], INDEX, reference["init_image"],
                       reference["mask"], reference[f"t{INDEX}_noise"], reference[f"t{INDEX}_background_noise"],
                       settings or SamplerSettings(), result_ids=[0, 1])


def check_step_against_reference(out, reference):
    assert_close(out["grad"], reference[f"t{INDEX}_grad"], rel=1e-3, name="grad")
    for key in ("guided_mean", "sample", "blended", "pred_xstart"):
        assert_close(out[key], reference[f"t{INDEX}_{key}"], name=key)


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


# --------------------------------------------------------------------------------------------- exact paths

def test_faithful_options_leave_the_models_as_loaded(unet, clip, diffusion, reference):
    fast_paths.apply_fast_paths(unet, clip, fast_paths.FAITHFUL)
    assert unet.autocast_dtype is None and not unet.gradient_checkpointing
    assert all(p.dtype == torch.float32 for p in unet.parameters())
    assert all(p.is_contiguous() for p in unet.parameters())
    check_step_against_reference(step(unet, clip, diffusion, reference), reference)


def test_channels_last_keeps_the_reference_numbers(unet, clip, diffusion, reference, unet_reference):
    fast_paths.apply_channels_last(unet, clip)
    conv = unet.input_blocks[1][0].in_layers[2].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    with torch.no_grad():
        out = unet(unet_reference["unet_x"], unet_reference["unet_t"])
    assert_close(out, unet_reference["unet_out"], name="unet_out")
    check_step_against_reference(step(unet, clip, diffusion, reference), reference)


def test_gradient_checkpointing_gives_identical_gradients(unet, clip, diffusion, reference, monkeypatch):
    plain = step(unet, clip, diffusion, reference)
    fast_paths.set_gradient_checkpointing(unet, True)
    block = unet.input_blocks[1]
    calls = []
    block_forward = block.forward

    def counting_forward(*args):
        # Not a forward hook: torch does not fire module hooks when the backward recomputes a block.
        calls.append(1)
        return block_forward(*args)

    monkeypatch.setattr(block, "forward", counting_forward)
    checkpointed = step(unet, clip, diffusion, reference)
    # Block 1 runs in the no-grad forward, the grad forward, and once more when the backward recomputes it.
    assert len(calls) == 3
    for key in ("grad", "guided_mean", "sample", "blended", "pred_xstart"):
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=0, atol=1e-7, msg=key)


def test_reuse_guided_forward_keeps_the_reference_numbers(unet, clip, diffusion, reference):
    settings = fast_paths.sampler_settings_with(SamplerSettings(), FastPathOptions(reuse_guided_forward=True))
    assert settings.reuse_guided_forward and settings.skip_timesteps == SamplerSettings().skip_timesteps
    check_step_against_reference(step(unet, clip, diffusion, reference, settings), reference)


def test_compiled_unet_keeps_the_reference_numbers(unet, clip, diffusion, reference):
    # aot_eager traces forward and backward like inductor but needs no C++ toolchain and compiles in seconds.
    fast_paths.compile_unet(unet, backend="aot_eager")
    assert fast_paths.is_compiled(unet)
    check_step_against_reference(step(unet, clip, diffusion, reference), reference)
    fast_paths.uncompile_unet(unet)
    assert not fast_paths.is_compiled(unet)


def test_a_compiled_unet_keeps_compiling_new_batch_sizes_past_dynamos_default_limit():
    """Each batch size is a new variant of one code object shared by every UNet: under dynamo's own limit the
    fourth batch size of a session ran eagerly without a word. Here the global limit is 1, as if spent."""
    from torch._dynamo.utils import counters

    unet = tiny_unet()
    fast_paths.compile_unet(unet, backend="eager")
    size = unet.config.image_size
    before = counters["stats"]["unique_graphs"]
    with torch.no_grad(), fast_paths.recompile_limit(1):
        for batch in (1, 2, 3):
            unet(torch.zeros(batch, 3, size, size), torch.zeros(batch, dtype=torch.long))
    assert counters["stats"]["unique_graphs"] - before == 3


# ------------------------------------------------------------------------------------- low-precision paths

def test_bf16_autocast_is_close_and_switching_back_is_exact(unet, unet_reference):
    x, t = unet_reference["unet_x"], unet_reference["unet_t"]
    with torch.no_grad():
        before = unet(x, t)
        fast_paths.set_unet_precision(unet, "bf16", "autocast")
        low = unet(x, t)
        assert all(p.dtype == torch.float32 for p in unet.parameters())  # autocast leaves the weights alone
        fast_paths.set_unet_precision(unet, "fp32")
        after = unet(x, t)
    assert low.dtype == torch.float32  # the diffusion arithmetic downstream stays fp32
    assert not torch.equal(low, before)  # bf16 really ran
    assert_close(low, before, rel=5e-2, name="bf16 autocast")
    assert cosine(low, before) > 0.999
    assert torch.equal(after, before)


def test_autocast_group_norm_matches_the_fp32_cast_and_saves_low_precision():
    from blended.unet import GroupNorm32

    norm = GroupNorm32(8, 32)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = (torch.randn(2, 32, 16, 16) * 5 + 3).to(torch.bfloat16)
    reference = torch.nn.functional.group_norm(x.float(), 8, norm.weight, norm.bias, norm.eps)
    saved = []
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.dtype) or t, lambda t: t):
        out = norm(x.requires_grad_())
    assert out.dtype == torch.bfloat16
    assert torch.float32 not in saved  # no fp32 copy of the activation kept for the backward
    assert_close(out.float(), reference, rel=2e-2, name="bf16 group norm")


def _map_dtypes_under_autocast(device: str, options: FastPathOptions) -> dict:
    """The dtype of every 4-D map each UNet module returns in a bf16-autocast forward of the tiny UNet, on fake
    tensors of ``device`` (so under that device's autocast rules), and the dtype of the UNet's output."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from blended import memory_trace, traffic_trace

    unet = memory_trace.unet_for_trace("tiny", device="meta")
    memory_trace._configure_unet(unet, options)
    dtypes = {}

    def record(module, args, out, name):
        if isinstance(out, torch.Tensor) and out.dim() == 4:
            dtypes[name] = out.dtype

    for name, module in unet.named_modules():
        module.register_forward_hook(lambda m, a, o, name=name: record(m, a, o, name))
    with FakeTensorMode(allow_non_fake_inputs=True):
        memory_trace._fake_weights(unet, device=device)
        x = torch.empty(2, 3, 64, 64, device=device)
        # Forward only: a backward through fake CUDA tensors needs a CUDA driver.
        with memory_trace.cuda_norm_rules(), traffic_trace.modelled_triton_kernels(traffic_trace.KernelTraffic(),
                                                                                    options):
            dtypes["output"] = unet(x, torch.full((2,), 500.0, device=device)).dtype
    return dtypes


# NCHW: without a CUDA driver, fake CUDA convolutions return NCHW maps whatever their input's layout.
@pytest.mark.parametrize("preset", ("bf16", "bf16+triton_norm"))
def test_unet_maps_keep_the_blocks_dtype_under_cudas_autocast_rules_as_under_the_cpus(preset, monkeypatch):
    # CUDA's autocast runs upsample_nearest2d in float32 and CPU's does not: an up ResBlock's output, the next
    # block's concatenation and norm went float32 on a GPU only, where the CPU tests and traces saw bf16.
    # Checked on fake CUDA tensors (no GPU); torch.autocast("cuda") is told CUDA is there.
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    options = fast_paths.parse_preset(preset)
    on_cpu = _map_dtypes_under_autocast("cpu", options)
    on_cuda = _map_dtypes_under_autocast("cuda", options)
    assert on_cuda == on_cpu
    ups = [name for name in on_cuda if name.endswith(".resample") and "output_blocks" in name]
    assert ups and all(on_cuda[name] == torch.bfloat16 for name in ups)
    assert on_cuda["output"] == torch.float32  # the head stays float32, as in the original


def test_torso_rounds_weights_and_a_snapshot_restores_them(unet, unet_reference):
    x, t = unet_reference["unet_x"], unet_reference["unet_t"]
    snapshot = WeightSnapshot(unet)
    with torch.no_grad():
        before = unet(x, t)
        fast_paths.set_unet_precision(unet, "bf16", "torso")
        assert unet.compute_dtype == torch.bfloat16 and unet.out[2].weight.dtype == torch.float32
        low = unet(x, t)
        fast_paths.set_unet_precision(unet, "fp32")
        rounded = unet(x, t)
        snapshot.restore(unet)
        restored = unet(x, t)
    assert_close(low, before, rel=5e-2, name="bf16 torso")
    assert not torch.equal(rounded, before)  # the weights lost bits: fp32 alone does not undo the torso
    assert torch.equal(restored, before)


def test_fast_cpu_preset_steers_like_the_faithful_step(unet, clip, diffusion, reference):
    faithful = step(unet, clip, diffusion, reference)
    options = fast_paths.FASTEST_CPU
    fast_paths.apply_fast_paths(unet, clip, options)
    fast = step(unet, clip, diffusion, reference, fast_paths.sampler_settings_with(SamplerSettings(), options))
    assert fast["grad"].dtype == torch.float32
    assert cosine(fast["grad"], faithful["grad"]) > 0.99
    assert_close(fast["pred_xstart"], faithful["pred_xstart"], rel=5e-2, name="pred_xstart")


# -------------------------------------------------------------------------------------------- options API

def test_options_describe_and_validate():
    assert fast_paths.FAITHFUL.is_faithful and fast_paths.FAITHFUL.describe() == "faithful"
    assert fast_paths.FASTEST_CPU.describe() == "bf16-autocast+reuse"
    assert fast_paths.FAST_GPU.describe() == "bf16-autocast+reuse+cudnn_benchmark"
    assert fast_paths.parse_preset("bf16+reuse+cudnn_benchmark") == fast_paths.PRESETS["fast-gpu"]
    assert fast_paths.PRESETS["fast-gpu"] == fast_paths.FAST_GPU
    assert (fast_paths.FASTEST_GPU.describe()
            == "bf16-autocast+channels_last+reuse+triton_norm+triton_clip+cuda_graphs+cudnn_benchmark")
    assert fast_paths.parse_preset("fast-gpu+channels_last+triton_norm+triton_clip+cuda_graphs") \
        == fast_paths.FASTEST_GPU == fast_paths.PRESETS["fastest-gpu"]
    assert fast_paths.FASTEST_GPU_WITHOUT_TRITON.describe() == "bf16-autocast+reuse+cuda_graphs+cudnn_benchmark"
    assert FastPathOptions(precision="fp16", precision_scheme="torso", clip_precision="fp32",
                           gradient_checkpointing=True).describe() == "fp16-torso+clip-fp32+ckpt"
    assert fast_paths.parse_dtype("BF16") is torch.bfloat16
    with pytest.raises(BlendedInputError, match="fp32, bf16 or fp16"):
        FastPathOptions(precision="int8")
    with pytest.raises(BlendedInputError, match="autocast"):
        FastPathOptions(precision="bf16", precision_scheme="fast")
    assert isinstance(fast_paths.autocast_context("cpu", "fp32"), type(fast_paths.autocast_context("cpu", "fp32")))
    with fast_paths.autocast_context("cpu", "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with fast_paths.autocast_context("cpu", "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


# ----------------------------------------------------------------------------------------------- benchmark

def test_flop_count_of_the_released_unet_matches_the_spec():
    """The released 256x256 UNet's forward is 1119.8 GMAC (2.24 TFLOP), as forward hooks count it on the original
    implementation; count ours on 'meta' (free)."""
    bench = load_bench()
    layout = json.loads(bench.FULL256_LAYOUT.read_text())
    with torch.device("meta"):
        model = GuidedDiffusionUNet(unet_config_from_original_kwargs(layout["config"]))
        x = torch.randn(1, 3, 256, 256, requires_grad=True)
        with bench.FlopCount() as forward:
            model(x, torch.tensor([500.0]))
        with bench.FlopCount() as both:
            torch.autograd.grad(model(x, torch.tensor([500.0])).sum(), x)
    assert forward.total / 1e12 == pytest.approx(2.2397, rel=2e-3)
    # Backward to the input only (frozen weights): about one more forward's worth, twice for the convs' inputs.
    assert both.total / 1e12 == pytest.approx(4.49, rel=1e-2)


def test_bench_short_prints_every_figure(monkeypatch):
    bench = load_bench()
    threads = torch.get_num_threads()
    out = io.StringIO()
    rows = bench.main(["--short", "--threads", "1"], out=out)
    assert torch.get_num_threads() == threads  # the script's --threads does not leak into the caller
    text = out.getvalue()
    assert [r["options"] for r in rows] == ["faithful", "bf16-autocast+reuse"]
    for row in rows:
        line = next(line for line in text.splitlines() if f"options={row['options']} " in line)
        for field in bench.FIELDS:
            assert f"{field}=" in line, field
        assert row["s_per_step"] > 0 and row["s_per_edit"] > 0 and row["results_per_min"] > 0
        assert row["peak_mem_gib"] > 0
        assert row["clip_fwd_per_step"] == 1  # every view of every sample in one CLIP forward
        assert row["mfu"] is None  # no peak TFLOPS known for a CPU
    faithful, fast = rows
    # The reused forward saves one of the three UNet forward-equivalents of a guided step.
    assert fast["tflop_per_step"] / faithful["tflop_per_step"] == pytest.approx(2 / 3, abs=0.04)
    # bf16 activations: ~0.55x of fp32 (GroupNorm keeps its input in bf16; the original's torso: ~0.75x).
    assert 0.4 < fast["saved_gib"] / faithful["saved_gib"] < 0.8
    assert "| options | batch |" in text
    assert "| faithful | 1 |" in text


def test_bench_reports_mfu_with_a_given_peak_and_refuses_bad_options():
    bench = load_bench()
    rows = bench.main(["--short", "--threads", "1", "--preset", "reuse,reuse+ckpt", "--peak-tflops", "1"],
                      out=io.StringIO())
    assert rows[0]["mfu"] == pytest.approx(rows[0]["achieved_tflops"] / 1.0)
    # Checkpointing keeps only each block's input for the backward.
    assert rows[1]["saved_gib"] < rows[0]["saved_gib"] / 2
    with pytest.raises(SystemExit):
        bench.parse_option_set("bf16+turbo")
    with pytest.raises(BlendedInputError):
        fast_paths.parse_preset("fast-gpu+turbo")
    assert fast_paths.parse_preset("fast-gpu-eager+ckpt") == fast_paths.FastPathOptions(
        precision="bf16", reuse_guided_forward=True, gradient_checkpointing=True, cudnn_benchmark=True)
    assert fast_paths.parse_preset("fast-gpu+fp32").precision == "fp32"  # later parts override a preset's
    specs = bench.run_specs(bench.parse_args(["--dtype", "fp32,bf16", "--precision-scheme", "autocast,torso",
                                              "--checkpointing", "on,off", "--batch", "1,4"]))
    # fp32 has one scheme, bf16 two: (1 + 2) x 2 checkpointing x 2 batches
    assert len(specs) == 12


def test_clip_checkpointing_gives_identical_gradients_and_fewer_saved_bytes():
    from blended import benchmark

    clip = tiny_clip()
    x = torch.rand(4, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(0))

    def gradient():
        leaf = x.clone().requires_grad_(True)
        return torch.autograd.grad(clip.encode_image(clip.normalize(leaf)).pow(2).sum(), leaf)[0]

    def saved():
        return benchmark.saved_activation_bytes(gradient, clip.model)

    plain, plain_saved = gradient(), saved()
    fast_paths.set_clip_checkpointing(clip, True)
    try:
        torch.testing.assert_close(gradient(), plain, rtol=0, atol=1e-6)
        assert saved() < plain_saved / 2
    finally:
        fast_paths.set_clip_checkpointing(clip, False)
    assert fast_paths.parse_preset("fast-gpu-lowmem").clip_checkpointing
# ------------------------------------------------------------------------------------------ per-run clones

def _snapshot(module):
    tensors = list(module.named_parameters()) + list(module.named_buffers())  # non-persistent buffers too
    return {name: (t.detach().clone(), t.stride()) for name, t in tensors}


def test_run_clones_apply_the_options_and_leave_the_given_models_unchanged(unet, clip, diffusion, reference):
    options = FastPathOptions(channels_last=True, gradient_checkpointing=True, compile=True,
                              clip_precision="fp32")
    unet_before, clip_before = _snapshot(unet), _snapshot(clip.model)
    for _run in range(2):  # the second run finds the kept, already compiled clone
        with fast_paths.run_clones(unet, clip, options, compile_backend="aot_eager") as (unet_run, clip_run):
            assert unet_run is not unet and clip_run.model is not clip.model
            assert fast_paths.is_compiled(unet_run) and unet_run.gradient_checkpointing
            conv = unet_run.input_blocks[0][0].weight
            assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
            check_step_against_reference(step(unet_run, clip_run, diffusion, reference), reference)
        kept = unet_run
    assert all(p.numel() == 0 for p in kept.parameters())  # a kept clone holds no weights between runs
    assert not fast_paths.is_compiled(unet) and not unet.gradient_checkpointing and unet.autocast_dtype is None
    for before, module in ((unet_before, unet), (clip_before, clip.model)):
        after = _snapshot(module)
        assert after.keys() == before.keys()
        for name, (tensor, stride) in after.items():
            assert stride == before[name][1] and torch.equal(tensor, before[name][0]), name


def test_run_clone_in_low_precision_leaves_the_shared_weights_in_float32(unet, clip):
    with fast_paths.run_clones(unet, clip, FastPathOptions(precision="bf16", precision_scheme="torso")) as (u, c):
        assert u.compute_dtype == torch.bfloat16 and c.dtype == torch.bfloat16
        assert fast_paths.clone_bytes(unet, clip, FastPathOptions(precision="bf16", precision_scheme="torso")) > 0
    assert unet.compute_dtype == torch.float32 and clip.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in list(unet.parameters()) + list(clip.model.parameters()))


def test_a_row_out_of_memory_is_reported_and_the_sweep_goes_on(monkeypatch):
    """A batch that does not fit gives an 'out of memory' row; the rows after it are still measured."""
    benchmark = load_bench()
    measure = benchmark.measure

    def measure_or_fail(models, inputs, spec, args, flop_cache):
        if spec.batch == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return measure(models, inputs, spec, args, flop_cache)

    monkeypatch.setattr(benchmark, "measure", measure_or_fail)
    out = io.StringIO()
    rows = benchmark.main(["--config", "tiny", "--device", "cpu", "--preset", "faithful", "--batch", "2,1",
                           "--steps", "0", "--warmup", "0", "--repeats", "1", "--flops", "off", "--saved", "off",
                           "--ops", "off"], out=out)
    assert [r["batch"] for r in rows] == [2, 1]
    assert rows[0]["out_of_memory"].startswith("CUDA out of memory") and "s_per_step" not in rows[0]
    assert rows[1]["s_per_step"] > 0
    assert "| faithful | 2 | out of memory |" in out.getvalue()


@pytest.mark.parametrize("options", [FastPathOptions(precision="bf16"),
                                     FastPathOptions(precision="bf16", triton_norm=True),
                                     FastPathOptions(precision="bf16", channels_last=True)],
                         ids=["autocast", "triton_norm", "channels_last"])
def test_precast_weights_give_autocasts_bits_with_fewer_casts(unet, clip, options):
    """Run clones store the block weights in the autocast dtype: the same outputs and input gradients, bit for
    bit, as casting them on every use, and no per-forward weight casts. A GroupNorm's weights only where it
    applies them in that dtype: with a fused norm kernel the attention blocks' norms still do (where the Triton
    kernels run, those read float32 weights too), and under channels_last this CPU's GroupNorm reads float32
    weights (CUDA's applies bf16 ones: see test_a_gpu_step_casts_no_weight_per_use)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 64, 64, generator=gen, requires_grad=True)
    t = torch.tensor([30.0, 700.0])

    def run(model):
        out = model(x, t)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        with parameter_casts() as casts:
            model(x, t)
        return out, grad, casts.shapes

    snapshot = WeightSnapshot(unet)
    try:
        fast_paths.apply_fast_paths(unet, clip, options)  # autocast only: fp32 weights cast on every use
        out_plain, grad_plain, casts_plain = run(unet)
    finally:
        fast_paths.apply_fast_paths(unet, clip, fast_paths.FAITHFUL)
        snapshot.restore(unet)
    with fast_paths.run_clones(unet, clip, options) as (clone, _):
        assert clone.input_blocks[1][0].in_layers[2].weight.dtype == torch.bfloat16
        out_fast, grad_fast, casts_fast = run(clone)
    assert all(p.dtype == torch.float32 for p in unet.parameters())  # the shared model is untouched
    assert torch.equal(out_fast, out_plain) and torch.equal(grad_fast, grad_plain)
    assert len(casts_plain) > 20 and casts_fast == []


def test_cudnn_benchmark_is_on_for_a_cuda_run_only_and_comes_back_as_it_was(unet, clip, monkeypatch):
    """``cudnn_benchmark`` sets torch's process-wide flag for one run on a CUDA device and restores it; it never
    turns off a flag the host set for the whole process (ComfyUI's ``--fast autotune``)."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    with fast_paths.cudnn_benchmark(True, "cuda"):
        assert torch.backends.cudnn.benchmark
    assert torch.backends.cudnn.benchmark is False
    with fast_paths.cudnn_benchmark(False, "cuda"), fast_paths.cudnn_benchmark(True, "cpu"):
        assert torch.backends.cudnn.benchmark is False
    with pytest.raises(RuntimeError), fast_paths.cudnn_benchmark(True, torch.device("cuda", 0)):
        raise RuntimeError("a run that fails")
    assert torch.backends.cudnn.benchmark is False
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    with fast_paths.cudnn_benchmark(True, "cuda"):
        pass
    assert torch.backends.cudnn.benchmark is True  # the host's setting stays
    # A host that asked for deterministic algorithms (ComfyUI's --deterministic) keeps cuDNN's fixed choices.
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    with fast_paths.cudnn_benchmark(True, "cuda"):
        assert torch.backends.cudnn.benchmark is False
    monkeypatch.undo()
    # A run's clones follow their own device: on the CPU the flag is left alone.
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert not torch.are_deterministic_algorithms_enabled()
    with fast_paths.run_clones(unet, clip, fast_paths.FAST_GPU):
        assert torch.backends.cudnn.benchmark is False


def test_precast_clip_embeddings_give_the_same_bits_with_no_casts(clip):
    """OpenAI's conversion keeps CLIP's class and position embeddings float32, so each encoding cast both; a
    run clone stores them in the tower's dtype once (the same rounding), and the embeddings stay the same bits."""
    gen = torch.Generator().manual_seed(6)
    images = torch.rand(3, 3, clip.image_size, clip.image_size, generator=gen)
    options = FastPathOptions(precision="bf16")

    def encode(guidance_clip):
        with parameter_casts() as casts:
            return guidance_clip.encode_image(images), casts.shapes

    snapshot = WeightSnapshot(clip.model)
    try:
        fast_paths.set_clip_precision(clip, options.clip_dtype)  # what a run applies to the tower
        plain, casts_plain = encode(clip)
    finally:
        fast_paths.set_clip_precision(clip, torch.float32)
        snapshot.restore(clip.model)
    with fast_paths.run_clones(tiny_unet(), clip, options) as (_, clone):
        assert clone.model.visual.positional_embedding.dtype == torch.bfloat16
        fast, casts_fast = encode(clone)
    assert clip.model.visual.positional_embedding.dtype == torch.float32  # the shared model is untouched
    assert torch.equal(fast, plain)
    assert len(casts_plain) == 2 and casts_fast == []


def _gpu_compare():
    script = Path(__file__).resolve().parent.parent / "scripts" / "gpu_compare.py"
    spec = importlib.util.spec_from_file_location("gpu_compare", script)
    gpu_compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_compare)
    return gpu_compare


def test_gpu_compare_dry_run_measures_every_stage(tmp_path):
    """The one-command GPU comparison, run on the CPU with the tiny model: every stage writes its JSON rows (or
    its profile) and the table shows them, so whoever runs it on a GPU does not find a broken script."""
    gpu_compare = _gpu_compare()
    out = tmp_path / "rows.jsonl"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        gpu_compare.main(["--config", "tiny", "--device", "cpu", "--presets", "fast-gpu", "--batches", "1,2",
                          "--edit-presets", "fastest", "--results", "2", "--edit-batch", "2", "--steps", "2",
                          "--profile", "fast-gpu", "--profile-batch", "1", "--views", "2", "--timeout", "300",
                          "--late-presets", "", "--large-batch", "3",
                          "--budget", "900", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["stage"] for row in rows] == ["pack-step-fast-gpu"] * 2 + ["pack-ranked-edit-fast-gpu",
                                                                          "pack-large-batch-fast-gpu",
                                                                          "profile-fast-gpu"]
    assert all(row["rc"] == 0 and not row["timed_out"] for row in rows)
    assert [row["batch"] for row in rows[:2]] == [1, 2] and all(row["s_per_step"] > 0 for row in rows[:2])
    assert rows[2]["s_ranked"] > 0 and rows[2]["num_results"] == 2
    assert rows[3]["batch"] == 3 and rows[3]["s_per_step"] > 0
    profile = Path(rows[4]["text"])
    assert profile.parent == tmp_path and "aten ops" in profile.read_text()
    table = printed.getvalue()
    assert "| pack `bf16-autocast+reuse+cudnn_benchmark` | 1 |" in table and "2 ranked results, batch 2" in table


def test_gpu_compare_edits_with_the_preset_fastest_at_the_edit_batch():
    gpu_compare = _gpu_compare()
    rows = [{"stage": "original-step", "batch": 16, "s_per_step": 0.1},
            {"stage": "pack-step-fast-gpu", "batch": 16, "s_per_step": 0.40},
            {"stage": "pack-step-fast-gpu", "batch": 4, "s_per_step": 0.10},
            {"stage": "pack-step-fast-gpu+cuda_graphs", "batch": 16, "s_per_step": 0.35},
            {"stage": "pack-step-fast-gpu+cuda_graphs", "batch": 4, "s_per_step": 0.12},
            {"stage": "pack-step-fast-gpu+channels_last", "batch": 16, "error": "out of memory"}]
    assert gpu_compare.fastest_preset(rows, 16) == "fast-gpu+cuda_graphs"
    assert gpu_compare.fastest_preset(rows, 4) == "fast-gpu"
    assert gpu_compare.fastest_preset(rows, 64) == "fast-gpu"  # nothing measured there: the default GPU path
    # a row whose graphs fell back to eager says so in the table; its first step (the cold start) has a column
    table = gpu_compare._table([{"stage": "pack-step-fast-gpu+cuda_graphs", "batch": 16, "s_per_step": 0.3,
                                 "options": "bf16-autocast+reuse+cuda_graphs", "s_first_step": 12.34,
                                 "cuda_graphs": "UNet 0 captured / 0 replayed (eager since: its capture failed)"}], 64)
    assert "CUDA graphs not replayed" in table and table.splitlines()[-1].endswith("| n/a | 12.3 |")


def test_gpu_compare_reports_the_kernel_checks():
    gpu_compare = _gpu_compare()
    rows = [{"stage": "kernel-checks", "check": "a", "ok": True, "device": "cuda"},
            {"stage": "kernel-checks", "check": "b", "ok": False, "error": "AssertionError", "device": "cuda"}]
    table = gpu_compare._table(rows, 64)
    assert "| Triton kernel checks on cuda: 1 of 2 passed; FAILED: b |" in table and "AssertionError" not in table


def test_gpu_compare_keeps_rows_of_a_stage_cut_short_and_skips_past_the_budget(tmp_path):
    """A stage stopped by its timeout keeps the rows it printed; a stage the budget no longer reaches is listed
    as skipped instead of started."""
    gpu_compare = _gpu_compare()
    slow = tmp_path / "slow_original.py"
    slow.write_text("import json, time\n"
                    "print(json.dumps({'impl': 'original', 'batch': 1, 's_per_step': 0.5}), flush=True)\n"
                    "time.sleep(60)\n")
    out_file = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()):
        rows = gpu_compare.run_stage("original-step", [sys.executable, str(slow)], gpu_compare.Budget(120, 3),
                                     out_file)
        skipped = gpu_compare.run_stage("late", [sys.executable, str(slow)], gpu_compare.Budget(0, 3), out_file)
    assert len(rows) == 1 and rows[0]["timed_out"] and rows[0]["s_per_step"] == 0.5 and rows[0]["batch"] == 1
    assert skipped[0]["error"].startswith("skipped") and skipped[0]["stage_wall_s"] == 0.0
    assert len(out_file.getvalue().splitlines()) == 2


def test_gpu_compare_passes_the_original_its_code_folder_and_checks_both_paths_first(tmp_path, capsys):
    """The original's benchmark finds its code only where it looks by default; elsewhere ``--original-src``
    must reach it. A wrong path stops the run before any stage starts, instead of losing the original's rows."""
    gpu_compare = _gpu_compare()
    code = tmp_path / "original-code"
    code.mkdir()
    fake = tmp_path / "fake_original.py"
    fake.write_text("import json, sys\n"
                    "src = sys.argv[sys.argv.index('--original-src') + 1]\n"
                    "print(json.dumps({'impl': 'original', 'batch': 1, 's_per_step': 0.5, 'src': src}), flush=True)\n")
    out = tmp_path / "new-folder" / "rows.jsonl"
    none = ["--presets", "", "--edit-presets", "", "--profile", "", "--late-presets", "", "--large-batch", "0",
            "--device", "cpu",
            "--config", "tiny", "--batches", "1", "--out", str(out)]
    gpu_compare.main(["--original", str(fake), "--original-src", str(code), *none])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(row["stage"], row["src"], row["rc"]) for row in rows] == [("original-step", str(code), 0)]
    for wrong, message in ((["--original", str(tmp_path / "missing.py")], "no such file"),
                           (["--original", str(fake), "--original-src", str(tmp_path / "nowhere")], "no such folder")):
        out.unlink(missing_ok=True)
        with pytest.raises(SystemExit) as stopped:
            gpu_compare.main([*wrong, *none])
        assert stopped.value.code == 2 and message in capsys.readouterr().err and not out.exists()
