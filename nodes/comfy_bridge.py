"""What the nodes share with ComfyUI's machinery: model bundles, loading, dtypes, progress, previews.

Models are wrapped in ``ModelPatcher`` so ComfyUI loads, offloads and frees them like its own; they are
built and moved outside inference mode because CLIP guidance needs autograd through them (ComfyUI runs every
node under ``torch.inference_mode()``, whose tensors cannot be saved for backward).
"""

from __future__ import annotations

import contextlib
import gc
import logging
from dataclasses import dataclass, field

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import torch

from ..blended.devices import HostCopies, raised_in_triton
from ..blended.fast_paths import parse_dtype
from ..blended.image_io import from_model_range

log = logging.getLogger(__name__)

DTYPE_CHOICES = ["auto", "float32", "float16", "bfloat16"]


@dataclass
class GuidedDiffusionModel:
    """The GUIDED_DIFFUSION_MODEL passed between nodes."""

    patcher: object
    unet: torch.nn.Module
    name: str

    def get_ram_usage(self) -> int:
        """What ComfyUI's RAM-pressure cache weighs this output by (as core's CLIP and VAE): its weights' bytes,
        so under pressure a 2.2 GB model is let go before the small outputs beside it."""
        return self.patcher.get_ram_usage()


@dataclass
class GuidanceClipModel:
    """The GUIDANCE_CLIP passed between nodes."""

    patcher: object
    clip: object
    name: str

    def get_ram_usage(self) -> int:
        """As :meth:`GuidedDiffusionModel.get_ram_usage`."""
        return self.patcher.get_ram_usage()


@dataclass
class ClipListEntry:
    """One entry of the GUIDANCE_CLIP_LIST passed between nodes: a CLIP of the ensemble."""

    model: GuidanceClipModel
    weight: float = 1.0
    num_views: int = 8


@dataclass
class ImageTargetSpec:
    """A reference picture for CLIP Guidance: [N,3,H,W] 0..1, optional [N,1,H,W] mask, weight."""

    image: torch.Tensor
    mask: object = None
    weight: float = 1.0


@dataclass
class ClipGuidanceSpec:
    """The CLIP_GUIDANCE passed between nodes: which CLIP(s), which prompts and targets, which loss weights."""

    clip: GuidanceClipModel
    prompts: list
    settings: object
    extra_clips: list = field(default_factory=list)     # ClipListEntry
    image_targets: list = field(default_factory=list)   # ImageTargetSpec


def resolve_dtype(choice: str, device) -> torch.dtype:
    """'auto' follows ComfyUI: half precision where ComfyUI would use it on that device (the original ran its
    UNet torso and CLIP in fp16 on the GPU), float32 on the CPU."""
    if choice != "auto":
        return parse_dtype(choice)
    if mm.should_use_fp16(device, prioritize_performance=True):
        return torch.float16
    if mm.should_use_bf16(device):
        return torch.bfloat16
    return torch.float32


def make_patcher(module: torch.nn.Module):
    return comfy.model_patcher.ModelPatcher(module, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def load_state_dict(path: str) -> dict:
    """ComfyUI's safe loader: safetensors, or torch.load(weights_only=True); never arbitrary unpickling.

    Where it fails, the library reads the file itself, as safely. ComfyUI picks the format by the file's name, the
    library by its content, so a checkpoint renamed between .pt and .safetensors loads; anything else fails there
    with the reason in the user's terms (a web page or a Git LFS pointer saved instead of the weights, a truncated
    download, Python objects in a pickle), rather than torch's message, whose advice (load with
    weights_only=False) would be unsafe. What it returns must be named tensors."""
    from ..blended.checkpoint import as_state_dict, read_state_dict
    from ..blended.errors import CheckpointError

    try:
        loaded = comfy.utils.load_torch_file(path, safe_load=True)
    except Exception as exc:  # torch/safetensors raise many types; the user needs one clear message
        try:
            state_dict = read_state_dict(path)
        except CheckpointError as clear:
            raise clear from exc
        log.info("Blended Diffusion: %s holds another format than its name says; read by its content", path)
        return state_dict
    return as_state_dict(path, loaded)


_SAID: set[str] = set()


def say_once(logger: logging.Logger, message: str) -> None:
    """Log ``message`` at INFO the first time this session: news that would be the same on every run."""
    if message not in _SAID:
        _SAID.add(message)
        logger.info(message)


def load_for_sampling(patchers, memory_required: int) -> None:
    """Load all models at once so ComfyUI frees room for both, fully (plain nn.Modules cannot stream).

    ComfyUI's --novram loads no weight at all, even when asked for a full load: it counts on layers that stream
    their weights to the device as they run, which ours do not. The weights left behind are loaded here, or the
    run would fail with tensors on two devices."""
    patchers = list(patchers)
    with torch.inference_mode(False):
        mm.load_models_gpu(patchers, memory_required=memory_required, force_full_load=True)
        for patcher in patchers:
            if patcher.loaded_size() < patcher.model_size():
                say_once(log, f"Blended Diffusion: loading {type(patcher.model).__name__} wholly onto "
                              f"{patcher.load_device} (its layers cannot stream their weights)")
                patcher.partially_load(patcher.load_device, 1e32)


@contextlib.contextmanager
def autograd_enabled():
    """Undo ComfyUI's inference mode for the guided loop; release cached memory however it ends."""
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        mm.soft_empty_cache()


def release_failed_attempt() -> None:
    """Before a run starts again after an error: collect what the failed attempt left in reference cycles
    (tensors held by its traceback's frames) and hand the allocator's cached blocks back to the device."""
    gc.collect()
    mm.soft_empty_cache()


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an error is the device running out of memory, decided as ComfyUI decides it.

    Newer ComfyUI has `is_oom`, which also knows torch's AcceleratorError (how CUDA can report an OOM);
    older ones only have OOM_EXCEPTION, which is plain Exception without CUDA, hence the message check. Triton
    reports a GPU out of memory while it loads a kernel as a plain RuntimeError ("Triton Error [CUDA]: out of
    memory"): that is the card's memory too, not a kernel that cannot run there.
    """
    if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower() and raised_in_triton(exc):
        return True
    if hasattr(mm, "is_oom"):
        if mm.is_oom(exc):
            return True
    else:
        kinds = (mm.OOM_EXCEPTION,) + ((torch.AcceleratorError,) if hasattr(torch, "AcceleratorError") else ())
        if isinstance(exc, kinds) and "out of memory" in str(exc).lower():
            return True
    # Apple's MPS and DirectML report running out as a plain RuntimeError, which neither check above knows.
    message = str(exc)
    return isinstance(exc, RuntimeError) and any(text in message for text in NON_CUDA_OOM_MESSAGES)


# How MPS and DirectML word an allocation that does not fit.
NON_CUDA_OOM_MESSAGES = ("MPS backend out of memory", "Could not allocate tensor")


def progress_callback(node_id=None, preview: bool = True):
    """A sampler callback that moves ComfyUI's progress bar with a pred_xstart preview and honours Cancel.

    The bar's total is the sampler's, given with every step (the one it starts with is a placeholder)."""
    from PIL import Image

    bar = comfy.utils.ProgressBar(1, node_id=node_id)
    try:
        from comfy.cli_args import args
        preview_size = int(getattr(args, "preview_size", 512))
    except Exception:
        preview_size = 512

    # The preview shown is the newest whose copy has reached the host, usually the step before: waiting for this
    # step's would stall the GPU once per step. The last step's is waited for, so the bar ends on the result.
    copies = HostCopies()

    def callback(done: int, total_steps: int, pred_xstart: torch.Tensor) -> None:
        mm.throw_exception_if_processing_interrupted()
        image = None
        if preview and pred_xstart is not None:
            pixels = from_model_range(pred_xstart[0].detach().float())
            copies.add((pixels * 255).round().to(torch.uint8).movedim(0, -1).contiguous())  # 8-bit HWC crosses
            arrived = copies.newest() if done >= total_steps else copies.newest_arrived()
            if arrived is not None:
                image = ("JPEG", Image.fromarray(arrived.numpy()), preview_size)
        bar.update_absolute(done, total_steps, image)

    return callback


def progress_steps(node_id=None):
    """``progress(done, total)`` for the library's scoring loops (hundreds of results): moves the node's bar and
    stops at ComfyUI's Cancel between chunks, as the Sampler's callback does between steps."""
    callback = progress_callback(node_id=node_id, preview=False)
    return lambda done, total: callback(done, total, None)


def to_output(images: torch.Tensor) -> torch.Tensor:
    return images.detach().to(mm.intermediate_device(), dtype=torch.float32)
