"""Time the guided step and a whole edit, with and without each fast path; print speed, memory, FLOP use and
the host work of a step (aten ops launched).

The measuring code of ``scripts/bench.py`` (its command line); importable, so tests and other scripts use it
directly.

One Blended Diffusion edit is ~75 guided steps, each a UNet forward, a UNet forward + backward and CLIP on
every view; this script measures exactly the library's code for that (``blended.sampler.guided_step`` for one
step, ``blended.sampler.sample_results`` for a whole edit), so its figures are the pack's own.

Usage (from the repository root):

    PYTHONPATH=. .venv/bin/python scripts/bench.py                      # tiny fixture, CPU, faithful fp32
    PYTHONPATH=. .venv/bin/python scripts/bench.py --short              # CI smoke run: a few seconds
    PYTHONPATH=. .venv/bin/python scripts/bench.py --preset faithful,fast-cpu --batch 4
    PYTHONPATH=. .venv/bin/python scripts/bench.py --config full256 --device cuda --dtype bf16 \\
        --batch 1,4,16 --steps 75 --views 8 --checkpointing on,off

Comma lists (``--batch``, ``--dtype``, ``--precision-scheme``, ``--channels-last``, ``--checkpointing``,
``--compile``, ``--reuse``) are crossed: one row per combination. ``--preset`` replaces the option axes with
a comma list of option sets, each presets and options joined by '+' (``fast-gpu``,
``bf16+channels_last+reuse``, ``fast-gpu+ckpt``; see ``blended.fast_paths.PRESETS`` and ``OPTION_TOKENS``).
``--rounds`` interleaves the rows several times (for a shared machine); ``--threads 1`` keeps CPU timings
stable when other processes compete for the cores.

Each row prints: seconds per guided step (median and best), the first step (with compile time), seconds for
the whole edit, results per minute, peak memory (CUDA peak allocated; on CPU the process's peak RSS, which
includes ~1 GiB of libraries), the activations saved for the backward (exact, any device; also per result),
model TFLOP per step, achieved TFLOPS, model FLOP utilisation (GPU, or with ``--peak-tflops``) and the aten
ops one eager guided step launches (torch.profiler; on a GPU each is a kernel launch or host bookkeeping, so
this is the host-side cost, countable on a CPU too).

FLOPs are counted with ``torch.utils.flop_counter``'s per-op formulas over one eager guided step at batch 1 and
scaled by the batch; they are *model* FLOPs (checkpoint recomputation and compile are excluded), the same for
every precision and layout, so MFU compares options fairly.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import cuda_graphs, fast_paths
from .augment import AugmentationSettings
from .diffusion import create_diffusion
from .errors import BlendedInputError
from .fast_paths import FastPathOptions
from .guidance import GuidanceObjective, GuidanceSettings
from .sampler import SamplerSettings, guided_step, sample_results

log = logging.getLogger("blended.bench")

REPO = Path(__file__).resolve().parent.parent  # the pack's root: the tiny config reads its test fixtures
REFERENCE = REPO / "tests" / "fixtures" / "reference"
FULL256_LAYOUT = REFERENCE / "checkpoint_layouts" / "256x256_diffusion_uncond.json"
PROMPT = "a red rock"
SCHEDULE_STEPS = 100   # the original respaces 1000 steps to 100 and runs the last 75

# Dense peak TFLOPS by card: (bf16/fp16 tensor core, TF32 tensor core, plain fp32). Matched in order against
# the CUDA device name, so the more specific names come first.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0, 378.0, 51.0),
    ("H100 NVL", 835.0, 418.0, 60.0),
    ("H100", 989.0, 494.0, 67.0),      # SXM
    ("H200", 989.0, 494.0, 67.0),
    ("A100", 312.0, 156.0, 19.5),
)

FIELDS = ("config", "device", "batch", "views", "options", "s_per_step", "s_step_min", "s_first_step", "edit_steps",
          "s_per_edit", "results_per_min", "peak_mem_gib", "base_mem_gib", "saved_gib", "tflop_per_step",
          "achieved_tflops", "mfu", "clip_fwd_per_step", "aten_ops_per_step", "saved_mib_per_result")


# ------------------------------------------------------------------------------------------------ models

def build_models(config: str, device: torch.device):
    """(unet, clip) for ``config``: the tiny reference fixtures, or the released 256x256 layout, random weights.

    Random weights cost the same FLOPs as the released ones and need no download.
    """
    if config == "tiny":
        from .checkpoint import load_guided_diffusion
        from .clip_model import load_guidance_clip

        unet = load_guided_diffusion(path=REFERENCE / "gd_tiny" / "model.safetensors")[0]
        clip = load_guidance_clip(path=REFERENCE / "clip_tiny" / "model.safetensors")
        return unet.to(device), clip.to(device=device)
    if config == "full256":
        from .architecture_detection import unet_config_from_original_kwargs
        from .unet import GuidedDiffusionUNet

        layout = json.loads(FULL256_LAYOUT.read_text())
        with torch.device(device):  # initialise on the device: 552M parameters are slow to init on a CPU
            unet = GuidedDiffusionUNet(unet_config_from_original_kwargs(layout["config"]))
        unet.eval().requires_grad_(False)
        return unet, random_vit_b16_clip().to(device=device)
    raise SystemExit(f"unknown --config {config!r}: use tiny or full256")


def random_vit_b16_clip():
    """OpenAI's ViT-B/16 shape with random weights, built through the loader like a user's file, so that its
    LayerNorms compute in float32 whatever the tower's precision (as OpenAI's and the loader's do)."""
    import open_clip

    from .clip_model import load_guidance_clip

    random_weights = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).state_dict()
    return load_guidance_clip(state_dict=random_weights)


@dataclasses.dataclass
class EditInputs:
    init: torch.Tensor
    mask: torch.Tensor
    text: torch.Tensor


def edit_inputs(unet, clip, device: torch.device) -> EditInputs:
    size = unet.config.image_size
    gen = torch.Generator().manual_seed(0)
    init = (torch.rand(1, 3, size, size, generator=gen) * 2 - 1).to(device)
    mask = torch.zeros(1, 1, size, size, device=device)
    mask[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    return EditInputs(init, mask, clip.text_embedding(PROMPT).to(device))


def make_objective(clip, inputs: EditInputs, views: int, options: FastPathOptions = fast_paths.FAITHFUL
                   ) -> GuidanceObjective:
    settings = fast_paths.guidance_settings_with(
        GuidanceSettings(augmentations=AugmentationSettings(num_views=views)), options)
    return GuidanceObjective(clip, inputs.text, inputs.mask, inputs.init, settings, seed=0)


# ----------------------------------------------------------------------------------------- measurement

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator counter, or the kernel's RSS high-water mark (Linux clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def current_memory_bytes(device: torch.device) -> int:
    """What is held before a run (weights, caches; on CPU the whole process's RSS including libraries)."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    with contextlib.suppress(OSError):
        match = re.search(r"VmRSS:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
        if match:
            return int(match.group(1)) * 1024
    return 0


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA peak allocated; on CPU the peak RSS since the last reset (VmHWM), else the process's ru_maxrss."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    with contextlib.suppress(OSError, AttributeError):
        match = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
        if match:
            return int(match.group(1)) * 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _register_cpu_attention_flops() -> None:
    """FlopCounterMode knows the CUDA SDPA kernels but not the CPU flash kernel; count it the same way."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is None or forward in fc.flop_registry:
        return

    @fc.register_flop_formula(forward)
    def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    if backward is not None:
        @fc.register_flop_formula(backward)
        def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                               **kwargs) -> int:
            return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


class StepRunner:
    """One guided step of a fixed batch at a fixed schedule index, repeatable for timing."""

    def __init__(self, unet, diffusion, clip, inputs: EditInputs, batch: int, views: int, settings: SamplerSettings,
                 options: FastPathOptions = fast_paths.FAITHFUL):
        self.unet, self.diffusion, self.settings = unet, diffusion, settings
        self.objective = make_objective(clip, inputs, views, options)
        self.inputs = inputs
        device = inputs.init.device
        gen = torch.Generator().manual_seed(1)
        shape = (batch,) + tuple(inputs.init.shape[1:])
        self.index = SCHEDULE_STEPS // 2
        noise = torch.randn(shape, generator=gen).to(device)
        self.x = diffusion.q_sample(inputs.init.expand(batch, -1, -1, -1), self.index, noise)
        self.noise = torch.randn(shape, generator=gen).to(device)
        self.background_noise = torch.randn((1,) + shape[1:], generator=gen).to(device)
        self.result_ids = list(range(batch))

    def __call__(self) -> dict:
        return guided_step(self.unet, self.diffusion, self.objective, self.x, self.index, self.inputs.init,
                           self.inputs.mask, self.noise, self.background_noise, self.settings, self.result_ids)


class FlopCount:
    """Sums ``torch.utils.flop_counter``'s per-op formulas over every op run inside the context.

    FlopCounterMode itself cannot be used here: its per-module tracker hooks fail inside
    ``torch.autograd.grad`` w.r.t. a leaf input, which is exactly how guidance takes its gradient.
    """

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.flop_counter import flop_registry

        _register_cpu_attention_flops()
        counter = self
        self.total = 0

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                formula = flop_registry.get(func._overloadpacket)
                if formula is not None:
                    counter.total += int(formula(*args, **kwargs, out_val=out))
                return out

        self._mode = _Mode()

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def saved_activation_bytes(step_fn, *modules) -> int:
    """Bytes autograd saves for the backward during ``step_fn`` (parameters excluded), counted per storage.

    Device-independent and exact, unlike a process's RSS: this is the memory that grows with the batch and
    that checkpointing and low precision shrink. Under checkpointing only the blocks' inputs are seen, since
    checkpoint's own hooks take over inside each block.
    """
    params = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(tensor):
        nonlocal total
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in params and key not in seen:
            seen.add(key)
            total += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step_fn()
    return total


def count_aten_ops(step_fn) -> int:
    """aten ops run by ``step_fn`` (nested ones included), as torch.profiler records them on the CPU.

    On a GPU each of them costs host time (dispatch, and a kernel launch for the computing ones), so this is
    the number that makes a step launch-bound; it is the same on a CPU, where it can be counted anywhere.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step_fn()
    return sum(1 for event in prof.events() if event.name.startswith("aten::"))


def count_step_flops(unet, diffusion, clip, inputs: EditInputs, views: int, settings: SamplerSettings) -> int:
    """Model FLOPs of one guided step at batch 1 (eager, no checkpoint recomputation)."""
    compiled = fast_paths.is_compiled(unet)
    checkpointing = unet.gradient_checkpointing
    if compiled:
        fast_paths.uncompile_unet(unet)
    fast_paths.set_gradient_checkpointing(unet, False)
    try:
        runner = StepRunner(unet, diffusion, clip, inputs, 1, views, settings)
        with FlopCount() as counter:
            runner()
        return counter.total
    finally:
        fast_paths.set_gradient_checkpointing(unet, checkpointing)
        if compiled:
            fast_paths.compile_unet(unet)


def peak_tflops_for(device: torch.device, dtype: torch.dtype, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, low_precision, tf32, fp32 in PEAK_TFLOPS:
        if key in name:
            if dtype != torch.float32:
                return low_precision
            # fp32 convs run on TF32 tensor cores while cuDNN allows it (torch's default for convolutions).
            return tf32 if torch.backends.cudnn.allow_tf32 else fp32
    log.warning("no peak TFLOPS known for %r: pass --peak-tflops to get MFU", name)
    return None


class ClipForwardCounter:
    """Counts CLIP image-tower calls, to confirm all views of all samples go through one forward.

    Counted at ``encode_image``, which every guided step calls once per CLIP for all its views (a tower hook
    would miss the calls a CUDA graph replays).
    """

    def __init__(self, clip):
        self.calls = 0
        self._clip = clip
        encode = clip.encode_image

        def counted(images):
            self.calls += 1
            return encode(images)
        clip.encode_image = counted

    def close(self):
        del self._clip.encode_image


# ------------------------------------------------------------------------------------------------ runs

@dataclasses.dataclass
class RunSpec:
    batch: int
    options: FastPathOptions


@dataclasses.dataclass
class Models:
    """The networks under test plus pristine copies of their weights (lossy options are undone per run)."""

    unet: torch.nn.Module
    clip: object
    diffusion: object
    unet_weights: fast_paths.WeightSnapshot
    clip_weights: fast_paths.WeightSnapshot
    # "options": cuDNN times its algorithms where the options say so (``cudnn_benchmark``), as a run does; "on"/"off"
    cudnn_benchmark: str = "options"

    def configure(self, options: FastPathOptions, compile_backend: str = "inductor") -> None:
        fast_paths.apply_fast_paths(self.unet, self.clip, fast_paths.FAITHFUL)
        self.unet_weights.restore(self.unet)
        self.clip_weights.restore(self.clip.model)
        fast_paths.apply_fast_paths(self.unet, self.clip, options, compile_backend=compile_backend)
        fast_paths.precast_run_weights(self.unet, self.clip, options)  # as the nodes' run clones do
        if next(self.unet.parameters()).device.type == "cuda":
            torch.backends.cudnn.benchmark = (options.cudnn_benchmark if self.cudnn_benchmark == "options"
                                              else self.cudnn_benchmark == "on")


def measure(models: Models, inputs: EditInputs, spec: RunSpec, args, flop_cache: dict) -> dict:
    """One row: single-step times (all repeats, for the caller to aggregate), one whole edit, peak memory."""
    unet, clip, diffusion = models.unet, models.clip, models.diffusion
    device = inputs.init.device
    opts = spec.options
    # FLOPs and saved activations are counted on the eager networks: a compiled or graphed one hides its ops.
    models.configure(dataclasses.replace(opts, compile=False, cuda_graphs=False))
    settings = fast_paths.sampler_settings_with(SamplerSettings(skip_timesteps=SCHEDULE_STEPS - args.steps
                                                                if args.steps else 0,
                                                                batch_size=spec.batch), opts)
    if args.flops and opts.reuse_guided_forward not in flop_cache:
        flop_cache[opts.reuse_guided_forward] = count_step_flops(unet, diffusion, clip, inputs, args.views, settings)
    runner = StepRunner(unet, diffusion, clip, inputs, spec.batch, args.views, settings, opts)
    saved = saved_activation_bytes(runner, unet, clip.model) if args.saved else None  # eager, before compile
    # Steps before a steady one: per-device caches are built in the first; graphs are captured in the second.
    settle = 1
    if opts.cuda_graphs:
        cuda_graphs.install(unet, clip)
        settle = 2
    ops = None
    if args.ops:
        for _ in range(settle):
            runner()
        ops = count_aten_ops(runner)
    if opts.compile:
        # Each row (batch, checkpointing, dtype) is a new graph: without a reset, a long sweep would reach
        # dynamo's recompile limit and silently measure eager mode.
        torch.compiler.reset()
        fast_paths.compile_unet(unet, backend=args.compile_backend)

    base = current_memory_bytes(device)
    reset_peak_memory(device)
    first_step = None
    # A graphed run is timed only once its graphs are captured, whatever --warmup says.
    warmup = max(args.warmup, settle) if opts.cuda_graphs else args.warmup
    for _ in range(warmup):
        start = time.perf_counter()
        runner()
        synchronize(device)
        first_step = time.perf_counter() - start if first_step is None else first_step
    counter = ClipForwardCounter(clip)
    times = []
    try:
        for _ in range(args.repeats):
            start = time.perf_counter()
            runner()
            synchronize(device)
            times.append(time.perf_counter() - start)
    finally:
        counter.close()

    s_per_edit = None
    if args.steps:
        start = time.perf_counter()
        sample_results(unet, diffusion, runner.objective, inputs.init, inputs.mask, list(range(spec.batch)), seed=0,
                       settings=settings)
        synchronize(device)
        s_per_edit = time.perf_counter() - start
    return {"step_times": times, "first_step": first_step, "saved": saved, "s_per_edit": s_per_edit,
            "peak": peak_memory_bytes(device), "base": base, "clip_calls": counter.calls, "ops": ops,
            "graphs": cuda_graphs.summary(unet, clip)}


def time_ranked_edit(models: Models, inputs: EditInputs, options: FastPathOptions, num_results: int,
                     batch_size: int, views: int, steps: int = 75) -> dict:
    """Seconds to ``num_results`` ranked results: the library's whole edit (``edit_image``, ``steps`` guided
    steps per batch of ``batch_size``) then CLIP ranking of every result, as a user waits for it.
    """
    from .rank import rank_by_clip
    from .sampler import edit_image

    unet, clip, diffusion = models.unet, models.clip, models.diffusion
    device = inputs.init.device
    models.configure(options)
    settings = fast_paths.sampler_settings_with(
        SamplerSettings(skip_timesteps=SCHEDULE_STEPS - steps, batch_size=batch_size), options)
    guidance = fast_paths.guidance_settings_with(
        GuidanceSettings(augmentations=AugmentationSettings(num_views=views)), options)
    image = inputs.init.add(1).div(2).movedim(1, -1).cpu()
    mask = inputs.mask[:, 0].cpu()
    reset_peak_memory(device)
    synchronize(device)
    start = time.perf_counter()
    result = edit_image(image, mask, unet, diffusion, clip, [PROMPT], seed=0, num_results=num_results,
                        settings=settings, guidance_settings=guidance, device=device)
    synchronize(device)
    edit_seconds = time.perf_counter() - start
    graphs = cuda_graphs.summary(unet, clip)
    rank_by_clip(clip, result.images.movedim(-1, 1).to(device), PROMPT, mask=result.mask[:, None].to(device))
    synchronize(device)
    total = time.perf_counter() - start
    return {"config": None, "device": describe_device(device), "options": options.describe(),
            "num_results": num_results, "batch": batch_size, "views": views, "edit_steps": steps,
            "s_edit": edit_seconds, "s_ranked": total, "results_per_min": num_results * 60.0 / total,
            "peak_mem_gib": peak_memory_bytes(device) / 2**30, "cuda_graphs": graphs}


def summarise(spec: RunSpec, runs: list[dict], args, device: torch.device, flop_cache: dict) -> dict:
    """Merge the rounds of one spec: median and best step time, best edit time, highest peak memory.

    The best (minimum) time is what the code can do; on a shared machine the median also carries the
    interference of other processes, so both are reported.
    """
    times = [t for run in runs for t in run["step_times"]]
    s_per_step, s_step_min = statistics.median(times), min(times)
    edits = [run["s_per_edit"] for run in runs if run["s_per_edit"] is not None]
    s_per_edit = min(edits) if edits else None
    edit_seconds = s_per_edit if s_per_edit is not None else s_step_min * (args.steps or 75)
    flops = flop_cache.get(spec.options.reuse_guided_forward)
    tflop_per_step = flops * spec.batch / 1e12 if flops else None
    achieved = tflop_per_step / s_step_min if tflop_per_step else None
    peak_tflops = peak_tflops_for(device, spec.options.unet_dtype, args.peak_tflops)
    return {
        "config": args.config, "device": describe_device(device), "batch": spec.batch, "views": args.views,
        "options": spec.options.describe(), "s_per_step": s_per_step, "s_step_min": s_step_min,
        # The first round's first step: includes torch.compile's compile time and lazy initialisation.
        "s_first_step": runs[0]["first_step"],
        "edit_steps": args.steps, "s_per_edit": s_per_edit, "results_per_min": spec.batch * 60.0 / edit_seconds,
        "peak_mem_gib": max(run["peak"] for run in runs) / 2**30,
        "base_mem_gib": min(run["base"] for run in runs) / 2**30,
        "saved_gib": runs[0]["saved"] / 2**30 if runs[0]["saved"] is not None else None,
        "tflop_per_step": tflop_per_step, "achieved_tflops": achieved,
        "mfu": achieved / peak_tflops if (achieved and peak_tflops) else None,
        "clip_fwd_per_step": sum(run["clip_calls"] for run in runs) / max(1, len(times)),
        "aten_ops_per_step": runs[0]["ops"],
        "saved_mib_per_result": runs[0]["saved"] / 2**20 / spec.batch if runs[0]["saved"] is not None else None,
        "cuda_graphs": runs[-1]["graphs"],
    }


def _ranked_edits(models: Models, inputs: EditInputs, specs, args, device, out) -> list[dict]:
    rows = []
    for spec in specs:
        row = time_ranked_edit(models, inputs, spec.options, args.ranked_edit, spec.batch, args.views,
                               args.steps or 75)
        row["config"] = args.config
        out.write(" ".join(f"{k}={_fmt(v)}" for k, v in row.items()) + "\n")
        out.flush()
        rows.append(row)
        _write_json(args, rows)
    models.configure(fast_paths.FAITHFUL)
    return rows


def _write_json(args, rows: list[dict]) -> None:
    """``--json`` rewritten after every finished row, so a run stopped by a time limit keeps what it measured."""
    if args.json:
        write_json_atomically(args.json, rows, indent=1)


def write_json_atomically(path: Path, data, **dumps) -> None:
    """``data`` as JSON in ``path``, whole or not at all: written to a temporary file in the same folder, then
    renamed over ``path`` in one step, so a process stopped mid-write (a time limit's kill) leaves the previous
    whole file, never a cut-short one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, **dumps)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def out_of_memory_row(spec: RunSpec, args, device: torch.device, exc: BaseException) -> dict:
    """The row of a spec that ran out of memory (its buffers freed, so the next spec starts clean)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"config": args.config, "device": describe_device(device), "batch": spec.batch, "views": args.views,
            "options": spec.options.describe(), "out_of_memory": str(exc).split(".")[0]}


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu x{torch.get_num_threads()}"


def run_specs(args) -> list[RunSpec]:
    batches = [int(b) for b in args.batch.split(",")]
    if args.preset:
        presets = [parse_option_set(name) for name in args.preset.split(",")]
        return [RunSpec(b, p) for p in presets for b in batches]
    axes = itertools.product(args.dtype.split(","), args.precision_scheme.split(","), _switch(args.channels_last),
                             _switch(args.checkpointing), _switch(args.compile), _switch(args.reuse))
    specs = []
    seen = set()
    for dtype, scheme, channels_last, ckpt, compiled, reuse in axes:
        options = FastPathOptions(precision=dtype, precision_scheme=scheme if dtype != "fp32" else "autocast",
                                  clip_precision=args.clip_dtype, channels_last=channels_last,
                                  gradient_checkpointing=ckpt, compile=compiled, reuse_guided_forward=reuse)
        if options not in seen:  # fp32 x {autocast, torso} is one configuration
            seen.add(options)
            specs.extend(RunSpec(b, options) for b in batches)
    return specs


def parse_option_set(text: str) -> FastPathOptions:
    """One row's options: presets and options joined by '+' (:func:`blended.fast_paths.parse_preset`)."""
    try:
        return fast_paths.parse_preset(text)
    except BlendedInputError as exc:
        raise SystemExit(str(exc)) from exc


def _switch(text: str) -> list[bool]:
    values = []
    for item in text.split(","):
        if item not in ("on", "off"):
            raise SystemExit(f"expected on/off (or on,off), got {item!r}")
        values.append(item == "on")
    return values


# ------------------------------------------------------------------------------------------------ output

def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if value == 0 or math.isfinite(value) and abs(value) >= 0.01:
            return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
        return f"{value:.2e}"
    return str(value)


def format_row(row: dict) -> str:
    return " ".join(f"{k}={_fmt(row[k]) if k != 'mfu' or row[k] is None else f'{100 * row[k]:.1f}%'}"
                    for k in FIELDS)


def format_table(rows: list[dict]) -> str:
    # results/min marked ~ is estimated from the best step time x the edit's steps (no whole edit was timed).
    header = ("| options | batch | s/step median (min) | s/edit | results/min | peak mem GiB (before run) "
              "| saved for backward GiB | TFLOP/step | TFLOPS | MFU | aten ops/step |")
    lines = [header, "|" + "---|" * 11]
    for r in rows:
        if "out_of_memory" in r:
            lines.append(f"| {r['options']} | {r['batch']} | out of memory |" + " |" * 8)
            continue
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {r['options']} | {r['batch']} | {_fmt(r['s_per_step'])} ({_fmt(r['s_step_min'])}) | "
                     f"{_fmt(r['s_per_edit'])} | "
                     f"{'' if r['s_per_edit'] is not None else '~'}{_fmt(r['results_per_min'])} | "
                     f"{_fmt(r['peak_mem_gib'])} ({_fmt(r['base_mem_gib'])}) | {_fmt(r['saved_gib'])} | "
                     f"{_fmt(r['tflop_per_step'])} | "
                     f"{_fmt(r['achieved_tflops'])} | {mfu} | {_fmt(r['aten_ops_per_step'])} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", choices=("tiny", "full256"),
                   help="tiny: the reference fixtures (64 px); full256: the released 256x256 layout, random weights")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--batch", default="1", help="results denoised together, comma list (e.g. 1,4,16)")
    p.add_argument("--dtype", default="fp32", help="UNet compute dtype(s): fp32 (faithful), bf16, fp16; comma list")
    p.add_argument("--precision-scheme", default="autocast",
                   help="autocast (fp32 weights) or torso (the original's converted block convs); comma list")
    p.add_argument("--clip-dtype", default=None, help="CLIP dtype (default: follows --dtype)")
    p.add_argument("--channels-last", default="off", help="on, off or on,off")
    p.add_argument("--checkpointing", default="off", help="UNet gradient checkpointing: on, off or on,off")
    p.add_argument("--compile", default="off", help="torch.compile the UNet: on, off or on,off")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--reuse", default="off", help="reuse_guided_forward (skip the unguided forward): on, off, on,off")
    p.add_argument("--preset", default=None,
                   help=f"comma list of option sets instead of the axes, each presets ({', '.join(fast_paths.PRESETS)})"
                        f" and options ({', '.join(fast_paths.OPTION_TOKENS)}) joined by '+', "
                        "e.g. faithful,fast-gpu,bf16+channels_last+reuse")
    p.add_argument("--steps", type=int, default=75,
                   help="guided steps of the timed whole edit (the original runs 75 of 100); 0 = time steps only")
    p.add_argument("--views", type=int, default=8, help="CLIP views per sample (the original's aug_num=8)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (compile needs >= 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed single steps per round")
    p.add_argument("--rounds", type=int, default=1,
                   help="passes over all option sets, interleaved (use 3+ on a shared machine)")
    p.add_argument("--flops", default="on", choices=("on", "off"),
                   help="count model FLOPs (one extra eager step at batch 1 per reuse setting)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's). 1 gives stable CPU timings on a busy machine: "
                        "oversubscribed OpenMP threads can be 10-50x slower")
    p.add_argument("--saved", default="on", choices=("on", "off"),
                   help="measure the activations saved for the backward (one extra eager step per row)")
    p.add_argument("--ops", default="on", choices=("on", "off"),
                   help="count the aten ops one eager guided step launches (torch.profiler; two extra steps per row)")
    p.add_argument("--cudnn-benchmark", default="options", choices=("options", "on", "off"),
                   help="let cuDNN time its conv algorithms and keep the fastest per shape (CUDA only): as each "
                        "option set's cudnn_benchmark says, as a run does (default), or on/off for every row")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOPS of the device, for MFU")
    p.add_argument("--short", action="store_true",
                   help="CI smoke mode: tiny config, batch 1, 2-step edit, 1 timed step, faithful + fast-cpu")
    p.add_argument("--ranked-edit", type=int, default=0, metavar="N",
                   help="instead of step rows: time N ranked results (whole edits of --batch results with --steps "
                        "steps each, then CLIP ranking), one row per option set and batch")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.short:
        args.config, args.batch, args.steps, args.repeats, args.warmup = "tiny", "1", 2, 1, 1
        args.preset = args.preset or "faithful,fast-cpu"
    if not 0 <= args.steps <= SCHEDULE_STEPS:
        p.error(f"--steps must be between 0 and {SCHEDULE_STEPS}")
    if args.views < 1:
        p.error("--views must be >= 1")
    if args.rounds < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--rounds and --repeats must be >= 1, --warmup >= 0")
    args.flops = args.flops == "on"
    args.saved = args.saved == "on"
    args.ops = args.ops == "on"
    return args


def main(argv=None, out=None) -> list[dict]:
    """Run the benchmark; write one ``key=value`` line per row as it finishes, then a Markdown table.

    The figures go to ``out`` (stdout by default) because they are the program's output, not diagnostics.
    """
    out = out or sys.stdout
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, out)
    finally:
        torch.set_num_threads(threads)


def _run(args, out) -> list[dict]:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    torch.manual_seed(0)
    with torch.inference_mode(False):
        unet, clip = build_models(args.config, device)
        models = Models(unet, clip, create_diffusion(timestep_respacing=str(SCHEDULE_STEPS)),
                        fast_paths.WeightSnapshot(unet), fast_paths.WeightSnapshot(clip.model), args.cudnn_benchmark)
        inputs = edit_inputs(unet, clip, device)
        specs = run_specs(args)
        if args.ranked_edit:
            return _ranked_edits(models, inputs, specs, args, device, out)
        runs: dict[int, list[dict]] = {i: [] for i in range(len(specs))}
        out_of_memory: dict[int, dict] = {}
        finished: list[dict] = []
        flop_cache: dict = {}
        out.write(f"# bench: config={args.config} device={describe_device(device)} torch={torch.__version__} "
                  f"threads={torch.get_num_threads()} views={args.views} edit_steps={args.steps} "
                  f"rounds={args.rounds}\n")
        # Rounds interleave the specs, so slow phases of a shared machine hit every spec alike.
        for round_index in range(args.rounds):
            for i, spec in enumerate(specs):
                if i in out_of_memory:
                    continue
                try:
                    runs[i].append(measure(models, inputs, spec, args, flop_cache))
                except torch.OutOfMemoryError as exc:
                    # One row that does not fit must not cost the rows after it (a sweep up to batch 64).
                    out_of_memory[i] = out_of_memory_row(spec, args, device, exc)
                    out.write(" ".join(f"{k}={v}" for k, v in out_of_memory[i].items()) + "\n")
                    out.flush()
                    finished.append(out_of_memory[i])
                    _write_json(args, finished)
                    continue
                if round_index == args.rounds - 1:
                    finished.append(summarise(spec, runs[i], args, device, flop_cache))
                    out.write(format_row(finished[-1]) + "\n")
                    out.flush()
                    _write_json(args, finished)
        rows = [out_of_memory[i] if i in out_of_memory else summarise(spec, runs[i], args, device, flop_cache)
                for i, spec in enumerate(specs)]
        models.configure(fast_paths.FAITHFUL)
    out.write(format_table(rows) + "\n")
    _write_json(args, rows)
    return rows
