"""The Speed node: every speed and memory option of a run in one place, as ``FastPathOptions``.

The Sampler applies them for its run to clones of the loaded models (``fast_paths.run_clones``), so a
choice made here never stays on the loader's cached model for other nodes or later runs. This node's defaults
reproduce the original code. Without a Speed node the Sampler runs ``default_speed_options()``: these defaults on
the CPU, the measured fastest setting on a CUDA GPU with bf16.
"""

from __future__ import annotations

import dataclasses

import torch

from ..blended import fast_paths
from ..blended.devices import triton_package_dir
from ..blended.errors import BlendedInputError
from ..blended.fast_paths import FastPathOptions
from . import comfy_bridge as bridge

# choice -> (dtype, scheme); "auto" is resolved on the device that runs (see resolve_precision)
PRECISIONS = {
    "auto": None,
    "fp32": ("fp32", "autocast"),
    "fp16 torso": ("fp16", "torso"),
    "bf16 torso": ("bf16", "torso"),
    "bf16 autocast": ("bf16", "autocast"),
    "fp16 autocast": ("fp16", "autocast"),
}
# The node's widgets that are FastPathOptions fields of the same name; precision and triton_kernels are mapped.
_OPTION_WIDGETS = ("reuse_guided_forward", "channels_last", "gradient_checkpointing", "compile", "clip_checkpointing",
                   "single_resample", "cuda_graphs", "cudnn_benchmark")
# The original's settings (fast_paths.FAITHFUL), but the precision: "auto" is the original's own choice per device.
DEFAULTS = {"precision": "auto", **{name: getattr(fast_paths.FAITHFUL, name) for name in _OPTION_WIDGETS},
            "triton_kernels": fast_paths.FAITHFUL.triton_norm}

# The tooltips' words for each option a setting can turn on, in the order they are named.
_OPTION_WORDS = {
    "reuse_guided_forward": "one UNet forward per step",
    "channels_last": "channels_last",
    "gradient_checkpointing": "gradient checkpointing",
    "clip_checkpointing": "CLIP checkpointing",
    "compile": "torch.compile",
    "single_resample": "single_resample",
    "fused_norm": "the fused GroupNorm",
    "triton_norm": "the pack's Triton kernels",
    "triton_clip": "the pack's Triton kernels",
    "cuda_graphs": "CUDA graphs",
    "cudnn_benchmark": "cudnn_benchmark",
}
# FastPathOptions' fields that say the precision rather than turn an option on.
_PRECISION_FIELDS = ("precision", "precision_scheme", "clip_precision")


def describe_options(options: FastPathOptions) -> str:
    """``options`` in the tooltips' words: the UNet's precision, then each option it turns on ("bf16 autocast,
    one UNet forward per step, ... and cudnn_benchmark"), so that the text follows the setting."""
    parts = ["fp32" if options.unet_dtype == torch.float32 else f"{options.precision} {options.precision_scheme}"]
    for name, words in _OPTION_WORDS.items():
        if getattr(options, name) != getattr(fast_paths.FAITHFUL, name) and words not in parts:
            parts.append(words)
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


# The default on ROCm (AMD cards, which torch names "cuda"): only what is not NVIDIA-specific and was measured to
# pay on a GPU, bf16 autocast and one UNet forward per step; no Triton kernels, graphs or cuDNN timing.
ROCM_DEFAULT = dataclasses.replace(fast_paths.FAST_GPU, cudnn_benchmark=False)

# What the Sampler runs without a Speed node, for its and this node's tooltips. The figures are README "GPU"'s
# (fastest-gpu against the original's settings, measured on an H100).
DEFAULT_SPEED = ("the measured fastest setting for the device. On a CUDA GPU with bf16 (Ampere or newer) that is "
                 f"{describe_options(fast_paths.FASTEST_GPU)}: 2.5x the original's speed at batch 16 on an H100, "
                 "3.3x at batch 4 (without the Triton kernels and channels_last where the triton package is "
                 "missing or Triton fails on the GPU). On an AMD GPU (ROCm), where none of that was measured: "
                 f"{describe_options(ROCM_DEFAULT)}. Elsewhere the original's settings")


# Devices where the Triton kernels failed in a run without a Speed node, with the first line of the error; the
# default leaves them out there for the rest of the ComfyUI session rather than failing each run's first step.
_TRITON_FAILED_ON: dict[str, str] = {}


def resolve_precision(choice: str, device) -> tuple[str, str]:
    """(dtype name, scheme) of a precision choice; 'auto' is the original's choice on ``device``: its fp16
    "torso" on GPUs where ComfyUI would use half precision, float32 on the CPU."""
    if choice not in PRECISIONS:
        raise BlendedInputError(f"unknown precision {choice!r}: use one of {', '.join(PRECISIONS)}")
    if PRECISIONS[choice] is not None:
        return PRECISIONS[choice]
    dtype = bridge.resolve_dtype("auto", device)
    return fast_paths.dtype_name(dtype), "autocast" if dtype == torch.float32 else "torso"


def speed_options(**choices) -> FastPathOptions:
    """FastPathOptions from the node's widget values (missing ones take the node's defaults). ``triton_kernels``
    is both of the library's Triton options: the UNet's (``triton_norm``) and CLIP's (``triton_clip``)."""
    values = {**DEFAULTS, **choices}
    device = torch.device(bridge.mm.get_torch_device())
    precision, scheme = resolve_precision(values.pop("precision"), device)
    triton = values.pop("triton_kernels")
    if triton and device.type == "cuda" and triton_package_dir() is None:
        raise BlendedInputError("triton_kernels needs the 'triton' Python package, which this ComfyUI's Python does "
                                "not have: install it (pip install triton; on Windows, triton-windows) or turn "
                                "triton_kernels off on the Speed node")
    return FastPathOptions(precision=precision, precision_scheme=scheme, triton_norm=triton, triton_clip=triton,
                           **values)


def default_speed_options() -> FastPathOptions:
    """What the Sampler runs without a Speed node (``DEFAULT_SPEED`` in words): the measured fastest setting for
    the device.

    On a CUDA GPU with bf16 that is ``fast_paths.FASTEST_GPU``; without the `triton` package, or once the kernels
    have failed on this GPU (``default_without_triton_kernels``), the same with PyTorch's own kernels
    (``FASTEST_GPU_WITHOUT_TRITON``). On ROCm, whose cards share the "cuda" device type but where neither the
    Triton kernels nor the graphs were measured, ``FAST_GPU`` (bf16 autocast, one UNet forward per step).
    Elsewhere the original's settings, this node's defaults. A Speed node, even left at its defaults, always means
    exactly what it shows.
    """
    device = torch.device(bridge.mm.get_torch_device())
    if device.type == "cuda" and bridge.mm.should_use_bf16(device):
        if getattr(torch.version, "hip", None):
            return ROCM_DEFAULT
        if triton_package_dir() is None or str(device) in _TRITON_FAILED_ON:
            return fast_paths.FASTEST_GPU_WITHOUT_TRITON
        return fast_paths.FASTEST_GPU
    return speed_options()


def default_without_triton_kernels(device, error_line: str) -> FastPathOptions:
    """The default to run again when the default's Triton kernels failed on ``device`` (a GPU or Triton release
    they cannot be compiled for): the same setting with PyTorch's own kernels, which gives the same results
    within rounding. Remembered for ``device``, so later runs start without them."""
    _TRITON_FAILED_ON[str(torch.device(device))] = error_line
    return fast_paths.FASTEST_GPU_WITHOUT_TRITON


def for_clip(options: FastPathOptions, clip) -> FastPathOptions:
    """``options`` with CLIP kept at the precision its loader chose (that CLIP serves ranking too)."""
    return dataclasses.replace(options, clip_precision=fast_paths.dtype_name(clip.dtype))


class BlendedDiffusionSpeed:
    DESCRIPTION = ("Speed and memory options of the Blended Diffusion Sampler, for its runs only: the loaded "
                   "models stay as loaded for every other node and run. This node's defaults reproduce the "
                   "original code (on a GPU, its half-precision 'torso': fp16, or bf16 where ComfyUI uses bf16). "
                   f"Without this node the Sampler runs {DEFAULT_SPEED}.")
    CATEGORY = "BlendedDiffusion"
    RETURN_TYPES = ("FAST_PATH_OPTIONS",)
    RETURN_NAMES = ("speed",)
    OUTPUT_TOOLTIPS = ("Speed options for the Blended Diffusion Sampler's 'speed' input.",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        d = DEFAULTS
        return {
            "required": {
                "precision": (list(PRECISIONS), {"default": d["precision"], "tooltip":
                              "UNet compute precision. auto = the original's: fp16 'torso' (block convs stored "
                              "in fp16) where ComfyUI uses fp16, else bf16 'torso' where it uses bf16, fp32 on "
                              "the CPU. 'autocast' keeps fp32 weights and runs the kernels in bf16/fp16 (about "
                              "half the activation memory); 'torso' converts a copy of the block convs' weights."}),
                "reuse_guided_forward": ("BOOLEAN", {"default": d["reuse_guided_forward"], "tooltip":
                                         "One UNet forward per step instead of two (same result in float32; "
                                         "about a third less UNet work)."}),
                "channels_last": ("BOOLEAN", {"default": d["channels_last"], "tooltip":
                                  "NHWC memory layout for the convolutions (same numbers). With triton_kernels "
                                  "on, part of the fastest setting measured on an H100; alone it is slower there "
                                  "(PyTorch's GroupNorm in NHWC). Costs a copy of the conv weights during the run."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": d["gradient_checkpointing"], "tooltip":
                                           "Recompute UNet blocks in the guidance backward pass instead of keeping "
                                           "their activations: far bigger batches, about a third slower."}),
                "compile": ("BOOLEAN", {"default": d["compile"], "tooltip":
                            "torch.compile the UNet: the first run pays the compile time (minutes: on an H100 it "
                            "had not finished after 200 s, so not found worth it there); cannot be combined with "
                            "cuda_graphs. Each new batch size compiles again and keeps about 50 MB of RAM until "
                            "ComfyUI restarts."}),
            },
            "optional": {
                "clip_checkpointing": ("BOOLEAN", {"default": d["clip_checkpointing"], "tooltip":
                                       "Recompute CLIP's vision blocks in the backward pass instead of keeping "
                                       "their activations: less memory with many views, a little slower."}),
                "single_resample": ("BOOLEAN", {"default": d["single_resample"], "tooltip":
                                    "Warp each CLIP view once (rotation/shift and perspective composed) instead "
                                    "of the original's two resamplings: less blur, one warp fewer. Off = the "
                                    "original."}),
                "triton_kernels": ("BOOLEAN", {"default": d["triton_kernels"], "tooltip":
                                   "Use with channels_last: with cuda_graphs too, part of the Sampler's default on "
                                   "a CUDA GPU with bf16, the fastest setting measured on an H100 (0.29 s per step "
                                   "at batch 16 instead of 0.38 without these three, half the memory). "
                                   "The UNet's GroupNorms (with their scale-shift and SiLU) and CLIP's LayerNorms "
                                   "and QuickGELU "
                                   "as the pack's own Triton kernels: "
                                   "fewer passes over memory, less kept for the backward, the same results within "
                                   "rounding. Needs a CUDA GPU and the triton package (the first run on a "
                                   "machine compiles them, seconds); elsewhere the usual kernels run."}),
                "cuda_graphs": ("BOOLEAN", {"default": d["cuda_graphs"], "tooltip":
                                "Replays the UNet's and CLIP's forward and backward from CUDA graphs captured "
                                "at the second step: a few launches per step instead of thousands, the same "
                                "kernels and numbers (on an H100 0.043 s per step "
                                "at batch 1 instead of 0.152; little gain at batch 16). CUDA only (elsewhere the "
                                "usual path); if a capture fails the run goes on without graphs. Cannot be "
                                "combined with compile."}),
                "cudnn_benchmark": ("BOOLEAN", {"default": d["cudnn_benchmark"], "tooltip":
                                    "Let cuDNN time its convolution algorithms at the first step and keep the "
                                    "fastest for the run (a run's shapes do not change). The same arithmetic; "
                                    "another algorithm may round differently. CUDA only; not under ComfyUI's "
                                    "--deterministic. Off leaves ComfyUI's setting (on with --fast autotune). "
                                    "Without a Speed node it is on with bf16 on a CUDA GPU, as the speed figures "
                                    "were measured."}),
            },
        }

    def build(self, **choices):
        return (speed_options(**choices),)
