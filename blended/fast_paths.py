"""Speed and memory options for the guided step, each one switchable and measurable on its own.

Blended Diffusion's cost is ~75 steps of (UNet forward + UNet backward + CLIP on every view), so the options
here act on the two networks and leave the sampler's math alone:

* low precision for the UNet, either by autocast (every conv/matmul of the block stacks in bf16/fp16, weights
  kept fp32) or by the original's "torso" scheme (:meth:`GuidedDiffusionUNet.to_compute_dtype`: block-stack
  conv weights stored in low precision). Both keep GroupNorm statistics, the timestep embedding and the
  final ``out`` conv in fp32, and the UNet still returns fp32, so the diffusion arithmetic stays fp32;
* low precision for CLIP (the whole frozen tower converted; its embeddings come back fp32);
* channels_last memory format for both networks (what cuDNN/oneDNN's fastest conv kernels want);
* gradient checkpointing of the UNet blocks (trades ~one extra forward for most of the saved activations);
* ``torch.compile`` of the UNet, or only of its GroupNorm+scale-shift+SiLU chains (``fused_norm``: one small
  compile shared by every block, about ten seconds cold on an H100; measured slower there than eager GroupNorm
  for now, see :mod:`blended.fused_norm`), or the same chain by the pack's Triton kernels (``triton_norm``,
  :mod:`blended.triton_norm`);
* CLIP's LayerNorms and QuickGELU as Triton kernels, one each way (``triton_clip``, :mod:`blended.triton_clip`);
* reusing the grad-enabled UNet forward for the mean/variance (``SamplerSettings.reuse_guided_forward``);
* CUDA graphs of the UNet's and CLIP's forward and backward (``cuda_graphs``, :mod:`blended.cuda_graphs`): one
  launch per network and direction instead of thousands of small ones, without a compile.

Autocast is deliberately NOT meant to wrap the whole guided step: the views' warp grids are built with a
matmul (``blended.view_warps``), and in bf16 those coordinates would be off by up to a pixel at 224 px. Low
precision therefore lives inside the networks (``unet.autocast_dtype``, a CLIP dtype), where it needs no hook in
the sampler.

Faithful mode is :data:`FAITHFUL` (every option off): the models are left exactly as loaded.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import weakref
from dataclasses import dataclass

import torch

from . import cuda_graphs
from .devices import runs_triton_kernels
from .errors import BlendedInputError
from .fused_norm import recompile_limit

log = logging.getLogger(__name__)

__all__ = [
    "FAITHFUL",
    "FASTEST_CPU",
    "FASTEST_GPU",
    "FASTEST_GPU_WITHOUT_TRITON",
    "FAST_GPU",
    "FastPathOptions",
    "OPTION_TOKENS",
    "PRESETS",
    "apply_channels_last",
    "apply_clip_fast_paths",
    "apply_fast_paths",
    "precast_autocast_weights",
    "precast_clip_embeddings",
    "precast_run_weights",
    "autocast_context",
    "compile_unet",
    "cudnn_benchmark",
    "guidance_settings_with",
    "parse_preset",
    "dtype_name",
    "parse_dtype",
    "run_clip_clone",
    "run_clones",
    "sampler_settings_with",
    "set_clip_checkpointing",
    "set_clip_kernels",
    "set_clip_precision",
    "set_gradient_checkpointing",
    "set_unet_precision",
    "WeightSnapshot",
]

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}
PRECISION_SCHEMES = ("autocast", "torso")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'fp32' / 'bf16' / 'fp16' (or a torch dtype) -> torch dtype, refusing anything else."""
    if isinstance(name, torch.dtype):
        if name not in _DTYPES.values():
            raise BlendedInputError(f"unsupported dtype {name}: use fp32, bf16 or fp16")
        return name
    dtype = _DTYPES.get(str(name).lower())
    if dtype is None:
        raise BlendedInputError(f"unknown dtype {name!r}: use fp32, bf16 or fp16")
    return dtype


def dtype_name(dtype: str | torch.dtype) -> str:
    """The short name ('fp32', 'bf16', 'fp16') of a dtype, as FastPathOptions spells it."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[parse_dtype(dtype)]


@dataclass(frozen=True)
class FastPathOptions:
    """Which fast paths to use. The defaults (all off, fp32) are the faithful mode.

    precision: compute dtype of the networks, "fp32" (faithful), "bf16" or "fp16".
    precision_scheme: how the UNet gets there: "autocast" (fp32 weights, low-precision kernels) or "torso"
        (the original's fp16 scheme: block-stack conv weights converted; fp16 there is the original's own mode).
    clip_precision: dtype of the CLIP tower; None follows ``precision``.
    channels_last: NHWC memory format for the UNet's and CLIP's conv weights.
    gradient_checkpointing: recompute UNet blocks in the backward instead of keeping their activations.
    compile: ``torch.compile`` the UNet (the first steps pay the compile time).
    reuse_guided_forward: skip the sampler's unguided UNet forward (saves a third of the UNet work).
    single_resample: warp each CLIP view once (rotation/shift and perspective composed into one homography)
        instead of the original's two resamplings: less blur, one warp fewer (see ``AugmentationSettings``).
    clip_checkpointing: recompute CLIP's vision blocks in the backward instead of keeping their activations.
    fused_norm: compile each ResBlock's GroupNorm (+ scale-shift) + SiLU into one function (``blended.fused_norm``):
        fewer passes over the activations, no layout copies in channels_last, float32 statistics.
    triton_norm: the same chain by the pack's Triton kernels (``blended.triton_norm``; CUDA, plain torch elsewhere).
    triton_clip: CLIP's vision LayerNorms and QuickGELU by Triton kernels, one each way (``blended.triton_clip``;
        CUDA, the model's own modules elsewhere): computed in float32 and rounded once.
    cuda_graphs: replay the UNet's and CLIP's forward and backward from CUDA graphs captured at a run's second
        step (``blended.cuda_graphs``; CUDA only, eager elsewhere). The same kernels, so the same numbers.
    cudnn_benchmark: let cuDNN time its convolution algorithms at a run's first step and keep the fastest for
        each shape (``torch.backends.cudnn.benchmark`` for the run; CUDA only). The same arithmetic; another
        algorithm may round differently. Off leaves the host's setting (ComfyUI's ``--fast autotune`` turns it on).
    """

    precision: str = "fp32"
    precision_scheme: str = "autocast"
    clip_precision: str | None = None
    channels_last: bool = False
    gradient_checkpointing: bool = False
    compile: bool = False
    reuse_guided_forward: bool = False
    single_resample: bool = False
    clip_checkpointing: bool = False
    fused_norm: bool = False
    triton_norm: bool = False
    triton_clip: bool = False
    cuda_graphs: bool = False
    cudnn_benchmark: bool = False

    def __post_init__(self) -> None:
        parse_dtype(self.precision)
        if self.cuda_graphs and self.compile:
            raise BlendedInputError("cuda_graphs and compile cannot be combined: cuda_graphs replays the eager "
                                    "UNet's kernels; choose one of them")
        if self.clip_precision is not None:
            parse_dtype(self.clip_precision)
        if self.precision_scheme not in PRECISION_SCHEMES:
            raise BlendedInputError(
                f"unknown precision_scheme {self.precision_scheme!r}: use one of {', '.join(PRECISION_SCHEMES)}")

    @property
    def unet_dtype(self) -> torch.dtype:
        return parse_dtype(self.precision)

    @property
    def clip_dtype(self) -> torch.dtype:
        return parse_dtype(self.clip_precision or self.precision)

    @property
    def norm_kernel(self) -> str | None:
        """The UNet's ``norm_kernel`` for these options: "triton", "compile" (fused_norm) or None (eager)."""
        return "triton" if self.triton_norm else "compile" if self.fused_norm else None

    @property
    def is_faithful(self) -> bool:
        return self == FAITHFUL

    def describe(self) -> str:
        """Short label such as 'bf16-autocast+channels_last+reuse' (or 'faithful') for tables and logs."""
        if self.is_faithful:
            return "faithful"
        parts = ["fp32" if self.unet_dtype == torch.float32 else f"{self.precision}-{self.precision_scheme}"]
        if self.clip_dtype != self.unet_dtype:
            parts.append(f"clip-{self.clip_precision}")
        for flag, label in ((self.channels_last, "channels_last"), (self.gradient_checkpointing, "ckpt"),
                            (self.compile, "compile"), (self.reuse_guided_forward, "reuse"),
                            (self.single_resample, "single_resample"), (self.clip_checkpointing, "clip_ckpt"),
                            (self.fused_norm, "fused_norm"), (self.triton_norm, "triton_norm"),
                            (self.triton_clip, "triton_clip"), (self.cuda_graphs, "cuda_graphs"),
                            (self.cudnn_benchmark, "cudnn_benchmark")):
            if flag:
                parts.append(label)
        return "+".join(parts)


FAITHFUL = FastPathOptions()
# Measured fastest on a CPU with AMX (README, "Speed and memory"): AMX makes bf16 convs pay; channels_last does not
# (CPU GroupNorm backward is slow in NHWC bf16); compile saves ~15% per step but costs ~100 s to compile.
FASTEST_CPU = FastPathOptions(precision="bf16", reuse_guided_forward=True)
# bf16 autocast and one UNet forward per step, NCHW, eager, with cuDNN choosing its convolution algorithms by
# timing them: the "fast-gpu" preset, which the Sampler ran by default until the CUDA graphs and Triton kernels were
# measured. On an H100 channels_last alone made it slower (GroupNorm in NHWC: 0.605 vs 0.406 s/step at batch 16),
# and the fused_norm compile did not pay either; a whole-UNet compile takes minutes.
FAST_GPU = FastPathOptions(precision="bf16", reuse_guided_forward=True, cudnn_benchmark=True)
# Measured fastest on an H100 (README, "GPU", 2026-11-27): FAST_GPU in channels_last with the Triton GroupNorm+SiLU
# and CLIP kernels and the networks replayed from CUDA graphs: 0.029 / 0.079 / 0.294 s per guided step at batches
# 1 / 4 / 16 against FAST_GPU's 0.152 / 0.131 / 0.380, in half the memory, first step at most 7.4 s (no compile).
FASTEST_GPU = dataclasses.replace(FAST_GPU, channels_last=True, triton_norm=True, triton_clip=True, cuda_graphs=True)
# Where the `triton` package is missing (common on Windows): the CUDA graphs alone, 0.043 / 0.110 / 0.376 s.
FASTEST_GPU_WITHOUT_TRITON = dataclasses.replace(FAST_GPU, cuda_graphs=True)

# Named option sets for the benchmark and for users; a name or an option may be '+'-joined with more options
# (see :func:`parse_preset`).
PRESETS = {
    "faithful": FAITHFUL,
    "fast-cpu": FASTEST_CPU,
    "fast-gpu": FAST_GPU,
    # The name earlier workflows and scripts used for the same setting.
    "fast-gpu-eager": FAST_GPU,
    # The Sampler's default on a CUDA GPU with bf16, and the same without Triton.
    "fastest-gpu": FASTEST_GPU,
    "fastest-gpu-without-triton": FASTEST_GPU_WITHOUT_TRITON,
    # The original's GPU numerics: fp16 torso UNet, fp16 CLIP, two UNet forwards per step (attention via SDPA).
    "original-gpu": FastPathOptions(precision="fp16", precision_scheme="torso"),
    # Memory-first: the UNet's and CLIP's activations recomputed in the backward, for the largest batches.
    "fast-gpu-lowmem": dataclasses.replace(FAST_GPU, gradient_checkpointing=True, clip_checkpointing=True),
}

# The options a preset can be extended with, each the FastPathOptions fields it sets.
OPTION_TOKENS = {
    "fp32": {"precision": "fp32", "precision_scheme": "autocast"},
    "bf16": {"precision": "bf16", "precision_scheme": "autocast"},
    "fp16": {"precision": "fp16", "precision_scheme": "autocast"},
    "bf16-torso": {"precision": "bf16", "precision_scheme": "torso"},
    "fp16-torso": {"precision": "fp16", "precision_scheme": "torso"},
    "clip-fp32": {"clip_precision": "fp32"},
    "channels_last": {"channels_last": True},
    "ckpt": {"gradient_checkpointing": True},
    "clip_ckpt": {"clip_checkpointing": True},
    "compile": {"compile": True},
    "reuse": {"reuse_guided_forward": True},
    "single_resample": {"single_resample": True},
    "fused_norm": {"fused_norm": True},
    "triton_norm": {"triton_norm": True},
    "triton_clip": {"triton_clip": True},
    "cuda_graphs": {"cuda_graphs": True},
    "cudnn_benchmark": {"cudnn_benchmark": True},
}


def parse_preset(text: str) -> FastPathOptions:
    """'fast-gpu', 'bf16+channels_last+reuse' or 'fast-gpu+ckpt': presets and options joined by '+'.

    Parts apply left to right on top of the faithful mode, so a later option overrides a preset's.
    """
    fields: dict = {}
    for token in str(text).strip().split("+"):
        if token in PRESETS:
            preset = PRESETS[token]
            fields.update({f.name: getattr(preset, f.name) for f in dataclasses.fields(preset)
                           if getattr(preset, f.name) != getattr(FAITHFUL, f.name)})
        elif token in OPTION_TOKENS:
            fields.update(OPTION_TOKENS[token])
        else:
            raise BlendedInputError(f"unknown speed option {token!r} in {text!r}: use presets "
                                    f"({', '.join(PRESETS)}) and options ({', '.join(OPTION_TOKENS)}) joined by '+'")
    return FastPathOptions(**fields)


def autocast_context(device: torch.device | str, dtype: torch.dtype | str):
    """``torch.autocast`` for ``device`` in ``dtype``, or a no-op context for fp32.

    For callers that run a network forward outside :class:`GuidedDiffusionUNet` (which has its own
    ``autocast_dtype``). Keep it around network forwards only, never around the augmentations (see module doc).
    """
    dtype = parse_dtype(dtype)
    device_type = torch.device(device).type
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def set_unet_precision(unet, dtype: torch.dtype | str, scheme: str = "autocast"):
    """Put the UNet's block stacks in ``dtype`` by ``scheme``; fp32 turns both schemes off.

    "autocast" leaves the weights untouched, so switching back to fp32 is exact. "torso" rounds the block
    convs' weights; fp32 afterwards restores their dtype but not the lost bits: to get the faithful model back,
    restore a :class:`WeightSnapshot` (or reload). A shared, cached model should therefore use "autocast".
    """
    dtype = parse_dtype(dtype)
    if scheme not in PRECISION_SCHEMES:
        raise BlendedInputError(f"unknown precision scheme {scheme!r}: use one of {', '.join(PRECISION_SCHEMES)}")
    if dtype == torch.float32:
        unet.autocast_dtype = None
        unet.to_compute_dtype(torch.float32)
    elif scheme == "autocast":
        unet.to_compute_dtype(torch.float32)
        unet.autocast_dtype = dtype
    else:
        unet.autocast_dtype = None
        unet.to_compute_dtype(dtype)
    return unet


def set_clip_precision(clip, dtype: torch.dtype | str):
    """Convert the frozen CLIP tower to ``dtype``; ``GuidanceCLIP.encode_image`` still returns fp32.

    Like the original (OpenAI's ``clip.load`` runs the model in fp16 on a GPU). Converting rounds the weights:
    going back to fp32 needs a :class:`WeightSnapshot` or a reload. Text embeddings are cached per prompt, so a
    prompt first encoded in one precision keeps that embedding.
    """
    clip.to(dtype=parse_dtype(dtype))
    return clip


class WeightSnapshot:
    """A CPU copy of a module's float32 weights, to undo lossy precision changes between runs.

    Restoring first returns every parameter to float32 (copying into a bf16 parameter would round again),
    then loads the saved values, so the module is bit-identical to when it was captured.
    """

    def __init__(self, module: torch.nn.Module):
        self._state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

    def restore(self, module: torch.nn.Module) -> None:
        module.to(torch.float32)
        module.load_state_dict(self._state)


def _to_memory_format(module: torch.nn.Module, memory_format: torch.memory_format) -> None:
    # nn.Module.to(memory_format=...) only touches 4-D parameters (conv weights); everything else is left alone.
    module.to(memory_format=memory_format)


def apply_channels_last(unet, clip=None, enabled: bool = True):
    """NHWC conv weights for the UNet (and CLIP's patch embedding); activations follow the weights' format.

    The UNet's attention reads its NHWC input as a [B,C,HW] view and writes [B,T,C] tokens, so no layout copy
    is added around attention. ``enabled=False`` restores the contiguous (faithful) layout.
    """
    memory_format = torch.channels_last if enabled else torch.contiguous_format
    _to_memory_format(unet, memory_format)
    if clip is not None:
        _to_memory_format(clip.model, memory_format)
    return unet


def set_gradient_checkpointing(unet, enabled: bool):
    """Recompute each UNet block in the backward (memory ~ one block's activations instead of all of them)."""
    unet.gradient_checkpointing = bool(enabled)
    return unet


def set_clip_kernels(clip, triton: bool):
    """Run CLIP's vision LayerNorms and QuickGELU by the pack's Triton kernels (the ``triton_clip`` option)."""
    clip.kernels = "triton" if triton else None
    return clip


def set_clip_checkpointing(clip, enabled: bool):
    """Recompute CLIP's vision transformer blocks in the backward (open_clip's grad-checkpointing flag, which
    :mod:`blended.clip_vision` honours too).

    The views' activations inside CLIP are saved per result and per view; recomputing them costs about one
    more CLIP forward per step and frees that memory for a larger batch.
    """
    visual = clip.model.visual
    if hasattr(visual, "set_grad_checkpointing"):
        visual.set_grad_checkpointing(bool(enabled))
    elif enabled:
        raise BlendedInputError("this CLIP model has no gradient checkpointing: turn clip_checkpointing off")
    return clip


# Compiled variants of the UNet (2 per batch size and option set: with and without gradients) before dynamo
# stops compiling it for the rest of the session. Its default, 8, is shared by every UNet in the process (one
# code object), so the fourth batch size of a ComfyUI session would silently run eagerly. Not much more: each
# variant of the 256x256 model keeps about 50 MB of host memory for the session (graphs and guards, traced on
# a CPU), so 24 hold about 1.2 GB at most; beyond them new batch sizes run eagerly, as fast as without compile.
UNET_RECOMPILE_LIMIT = 24


def compile_unet(unet, backend: str = "inductor", mode: str | None = None, dynamic: bool | None = False):
    """``torch.compile`` the whole UNet in place (its ``config`` and parameters stay where callers look).

    The whole model, not each block: the blocks share one ``forward`` code object, so compiling them one by one
    would hit dynamo's recompile limit and silently fall back to eager. ``dynamic=False`` because the batch and
    image size are fixed during an edit; a new batch size recompiles once, under the pack's own recompile limit
    (``UNET_RECOMPILE_LIMIT``), which each call sets.
    """
    unet.compile(backend=backend, mode=mode, dynamic=dynamic)
    compiled = unet._compiled_call_impl

    def call_under_the_packs_limit(*args, **kwargs):
        with recompile_limit(UNET_RECOMPILE_LIMIT):
            return compiled(*args, **kwargs)

    unet._compiled_call_impl = call_under_the_packs_limit
    return unet


def is_compiled(unet) -> bool:
    return getattr(unet, "_compiled_call_impl", None) is not None


def uncompile_unet(unet):
    """Drop a :func:`compile_unet` (back to eager), e.g. before counting FLOPs op by op."""
    unet._compiled_call_impl = None
    return unet


def apply_fast_paths(unet, clip, options: FastPathOptions, compile_backend: str = "inductor"):
    """Configure ``unet`` and ``clip`` in place for ``options``; :data:`FAITHFUL` leaves them as loaded.

    ``reuse_guided_forward`` is a sampler setting: pass the settings through :func:`sampler_settings_with`.
    """
    set_unet_precision(unet, options.unet_dtype, options.precision_scheme)
    set_clip_precision(clip, options.clip_dtype)
    apply_channels_last(unet, clip, enabled=options.channels_last)
    set_gradient_checkpointing(unet, options.gradient_checkpointing)
    set_clip_checkpointing(clip, options.clip_checkpointing)
    unet.norm_kernel = options.norm_kernel
    if clip is not None:
        set_clip_kernels(clip, options.triton_clip)
    if options.compile and not is_compiled(unet):
        compile_unet(unet, backend=compile_backend)
    elif not options.compile and is_compiled(unet):
        uncompile_unet(unet)
    if options.cuda_graphs:
        cuda_graphs.install(unet, clip)
    else:
        cuda_graphs.remove(unet, clip)
    log.debug("fast paths: %s", options.describe())
    return unet, clip


_AUTOCAST_LAYERS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)


def precast_autocast_weights(unet, options: FastPathOptions):
    """Store the block stacks' conv, linear and GroupNorm weights in the autocast dtype (bf16/fp16 autocast).

    Autocast reuses a cast weight only for leaves that require grad; ours are frozen, so every forward cast each
    weight and bias again: one kernel per tensor (358 per forward of the 256x256 model, 551M parameters read fp32 and
    written bf16 each time). A weight cast once gives the same bits (the same rounding autocast applies), so the
    results do not change. It rounds the weights it is applied to: it is for run clones (``run_clones``) and for
    the benchmark's models, which are restored from float32 between runs, never for a shared model.
    """
    if options.precision_scheme != "autocast" or options.unet_dtype == torch.float32:
        return unet
    for module in _precast_modules(unet, options):
        for parameter in module.parameters(recurse=False):
            parameter.data = parameter.data.to(options.unet_dtype)
    return unet


def _precast_modules(unet, options: FastPathOptions) -> list[torch.nn.Module]:
    """The block stacks' layers whose parameters :func:`precast_autocast_weights` stores in the autocast dtype.

    Every conv and linear. A GroupNorm too (two casts per call otherwise, 200 per step of the 256x256 model under
    ``channels_last`` on CUDA), where it applies its weights in that dtype: ``GroupNorm32``'s low-precision path.
    Not where it reads them in float32: a ResBlock's norms under a fused norm kernel (under "compile" the attention
    blocks' norms stay modules; where the Triton kernels run, they run those too), and every norm under
    ``channels_last`` on a device whose GroupNorm takes the float32 path for strided maps (the CPU).
    """
    from .unet import STRIDED_NORM_FP32_DEVICES, AttentionBlock

    weight = next(unet.parameters())
    float32_norms = options.channels_last and weight.device.type in STRIDED_NORM_FP32_DEVICES
    triton_norms = options.norm_kernel == "triton" and runs_triton_kernels(weight)
    modules = list(unet.block_layers(_AUTOCAST_LAYERS))
    if float32_norms or triton_norms:
        return modules
    if options.norm_kernel is not None:
        return modules + [block.norm for block in unet.block_layers((AttentionBlock,))]
    return modules + list(unet.block_layers((torch.nn.GroupNorm,)))


def precast_run_weights(unet, clip, options: FastPathOptions) -> None:
    """What a run clone stores in its compute dtype once instead of casting per use: same results, fewer casts
    (:func:`precast_autocast_weights`, :func:`precast_clip_embeddings`)."""
    precast_autocast_weights(unet, options)
    precast_clip_embeddings(clip)


def precast_clip_embeddings(clip) -> None:
    """Store CLIP's class and position embeddings in the tower's dtype. OpenAI's conversion keeps them float32,
    so every image encoding cast both again (the same rounding each time, so the same bits). For run clones."""
    visual = getattr(clip.model, "visual", None) if clip is not None else None
    if visual is None or clip.dtype == torch.float32:
        return
    for name in ("class_embedding", "positional_embedding"):
        parameter = getattr(visual, name, None)
        if isinstance(parameter, torch.Tensor) and parameter.is_floating_point():
            parameter.data = parameter.data.to(clip.dtype)


def sampler_settings_with(settings, options: FastPathOptions):
    """A copy of ``settings`` (a SamplerSettings) with the sampler-level fast paths of ``options``."""
    return dataclasses.replace(settings, reuse_guided_forward=options.reuse_guided_forward)


def guidance_settings_with(settings, options: FastPathOptions):
    """A copy of ``settings`` (a GuidanceSettings) with the augmentation-level fast paths of ``options``."""
    augmentations = dataclasses.replace(settings.augmentations, single_resample=options.single_resample)
    return dataclasses.replace(settings, augmentations=augmentations)
# -------------------------------------------------------------------------------------- per-run clones
#
# A host such as ComfyUI caches one loaded model and hands it to every node that asks. Options that one run
# chooses must not stay on that shared model, so they are applied to a clone: the clone has its own module
# objects and its own Parameter objects, which alias the shared model's tensors until an option replaces a
# tensor (a low-precision or channels_last copy), so the shared model's tensors are never written. The clone of
# a model is kept (weakly keyed by the shared model) so that a compiled clone compiles once, not every run; its
# parameters are re-pointed at the shared model's current tensors (the host may have moved them) when a run
# starts and emptied when it ends, so a kept clone holds no weights between runs.

_CLONES: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()


def _tensors(module: torch.nn.Module) -> list:
    # Non-persistent buffers too (CLIP's attention mask): the clone must own every tensor object it empties.
    return list(module.parameters()) + list(module.buffers())


def _structural_clone(module: torch.nn.Module) -> torch.nn.Module:
    memo = {id(p): torch.nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in module.parameters()}
    memo.update({id(b): b.detach() for b in module.buffers()})
    clone = copy.deepcopy(module, memo)
    clone._compiled_call_impl = None  # a compile of the shared model is its own, not the clone's
    return clone


def _clone_of(module: torch.nn.Module) -> torch.nn.Module:
    clone = _CLONES.get(module)
    if clone is None:
        clone = _CLONES[module] = _structural_clone(module)
    for shared, own in zip(_tensors(module), _tensors(clone), strict=True):
        own.data = shared.data
    return clone


def _empty(clone: torch.nn.Module) -> None:
    for tensor in _tensors(clone):
        tensor.data = tensor.data.new_empty(0)


def clone_bytes(unet, clip, options: FastPathOptions) -> int:
    """Bytes of the tensors a run clone adds to the shared models for ``options`` (an upper bound)."""
    total = 0
    if options.unet_dtype != torch.float32:
        # torso: the block convs in low precision; autocast: the block convs, linears and GroupNorms
        # (precast_autocast_weights)
        item = torch.empty(0, dtype=options.unet_dtype).element_size()
        layers = (unet.block_layers((torch.nn.Conv1d, torch.nn.Conv2d)) if options.precision_scheme == "torso"
                  else _precast_modules(unet, options))
        total += sum(p.numel() * item for m in layers for p in m.parameters(recurse=False))
    if options.channels_last:
        total += sum(p.numel() * p.element_size() for p in unet.parameters() if p.dim() == 4)
    if clip is not None and options.clip_dtype != clip.dtype:
        total += sum(p.numel() * torch.empty(0, dtype=options.clip_dtype).element_size()
                     for p in clip.model.parameters())
    return total


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool, device: torch.device | str):
    """Inside, when ``enabled`` on a CUDA device: ``torch.backends.cudnn.benchmark`` on, so cuDNN times its
    convolution algorithms for each new shape and keeps the fastest. A run's shapes stay the same over its steps,
    so the first step's timing pays for all of them. The previous setting comes back on exit; it is never turned
    off here, so a host that set it for the whole process keeps it. Left off where the host asked for deterministic
    algorithms (ComfyUI's ``--deterministic``): a timed choice may differ from one process to the next."""
    if (not enabled or torch.device(device).type != "cuda" or torch.backends.cudnn.benchmark
            or torch.backends.cudnn.deterministic or torch.are_deterministic_algorithms_enabled()):
        yield
        return
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = False


def apply_clip_fast_paths(clip, options: FastPathOptions):
    """Configure one CLIP in place for the CLIP side of ``options`` (precision, channels_last, checkpointing, the
    Triton kernels, CUDA graphs of its image tower), as :func:`apply_fast_paths` configures the main CLIP. For
    the further CLIPs of an ensemble, which guide beside the run's UNet and would otherwise run as loaded."""
    set_clip_precision(clip, options.clip_dtype)
    _to_memory_format(clip.model, torch.channels_last if options.channels_last else torch.contiguous_format)
    set_clip_checkpointing(clip, options.clip_checkpointing)
    set_clip_kernels(clip, options.triton_clip)
    if options.cuda_graphs:
        cuda_graphs.install_clip(clip)
    else:
        cuda_graphs.remove_clip(clip)
    return clip


@contextlib.contextmanager
def run_clip_clone(clip, options: FastPathOptions):
    """A clone of one more guiding CLIP (an ensemble's), configured by :func:`apply_clip_fast_paths` for one run;
    ``clip`` stays as it is. Its precision is ``options.clip_dtype``: pin it to the CLIP's own dtype where that
    CLIP's loader chose it (the Speed node's ``for_clip``). A CLIP that is the run's main CLIP needs no second
    clone: the kept clone of a model is one object, and this one is emptied when it ends."""
    clone = copy.copy(clip)
    clone.model = _clone_of(clip.model)
    try:
        apply_clip_fast_paths(clone, options)
        precast_clip_embeddings(clone)
        yield clone
    finally:
        cuda_graphs.remove_clip(clone)
        _empty(clone.model)


@contextlib.contextmanager
def run_clones(unet, clip, options: FastPathOptions, compile_backend: str = "inductor"):
    """``(unet, clip)`` clones configured by :func:`apply_fast_paths` for one run; the given models stay as
    they are, bit for bit and option for option. Yields the clones; empties them when the run ends."""
    unet_clone = _clone_of(unet)
    clip_clone = None
    if clip is not None:
        clip_clone = copy.copy(clip)
        clip_clone.model = _clone_of(clip.model)
    try:
        apply_fast_paths(unet_clone, clip_clone, options, compile_backend=compile_backend)
        precast_run_weights(unet_clone, clip_clone, options)
        with cudnn_benchmark(options.cudnn_benchmark, next(unet_clone.parameters()).device):
            yield unet_clone, clip_clone
    finally:
        cuda_graphs.remove(unet_clone, clip_clone)
        _empty(unet_clone)
        if clip_clone is not None:
            _empty(clip_clone.model)
