"""Find the largest tensors a UNet forward + backward allocates, and its peak, without the memory to run it.

A batch-64 guided step of the 256x256 UNet needs tens of GiB; to see *which* op allocates what, the step is
run on fake tensors (``torch._subclasses.fake_tensor``: shapes, dtypes and strides, no data) under a dispatch
mode that records every op's new storages and frees them when their last reference dies. That replays the
caching allocator's view closely: what autograd saves, what a checkpointed block recomputes in the backward,
each gradient, each layout copy. Not seen: kernels' private workspaces (cuDNN, cuBLAS) and allocator
fragmentation, so a real peak is somewhat higher.

The backward of fake CUDA tensors needs a CUDA driver, so without a GPU the trace runs on fake CPU tensors
under CPU autocast: a proxy for CUDA whose layout rules differ where the library itself branches on the device
type. Its dtypes are CUDA's for the UNet: the two autocasts' float32 lists differ (CUDA's has the nearest
upsampling), the UNet keeps its maps out of that difference, and a test compares every module's output dtype
under both rules on fake tensors of both devices (a forward needs no driver).

    PYTHONPATH=. python scripts/memory_trace.py --batch 64 --preset bf16+channels_last+ckpt
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import weakref
from pathlib import Path
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["Allocation", "MemoryTracer", "clip_for_trace", "fake_guided_step", "trace_clip_backward",
           "trace_guided_step", "trace_unet_backward", "unet_for_trace"]

_PACKAGE_DIR = str(Path(__file__).resolve().parent)
_THIS_FILE = str(Path(__file__).resolve())
_CHECKPOINT_FILE = str(Path("torch", "utils", "checkpoint.py"))
GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Allocation:
    """One new storage: how big, what made it, where in the pack's code, and when (forward/backward)."""

    nbytes: int
    op: str
    shape: tuple[int, ...]
    dtype: str
    layout: str
    phase: str
    where: str

    def describe(self) -> str:
        return (f"{self.nbytes / GIB:7.3f} GiB  {self.op:<40} {list(self.shape)} {self.dtype} {self.layout}"
                f"  [{self.phase}]  {self.where}")


# ATen's group_norm and its backward formula make these arguments contiguous (NCHW) on CUDA, but keep a CPU
# tensor's channels_last.
_CUDA_CONTIGUOUS_ARGS = {torch.ops.aten.native_group_norm.default: (0,),
                         torch.ops.aten.native_group_norm_backward.default: (0, 1)}
# cuDNN runs a 2-D convolution in one layout (channels_last if the input or the weight is): the activations it is
# given in the other layout are copied first, inside the CUDA kernel. Argument positions: (activations, weight).
_CUDA_CONV_ARGS = {torch.ops.aten.convolution.default: ((0,), 1),
                   torch.ops.aten.convolution_backward.default: ((0, 1), 2)}


def _cuda_layout_copies(func, args: tuple) -> tuple:
    """Make on fake CPU tensors the layout copies that CUDA's kernels make, so that they are counted."""
    if func in _CUDA_CONTIGUOUS_ARGS:
        positions, memory_format = _CUDA_CONTIGUOUS_ARGS[func], torch.contiguous_format
    elif func in _CUDA_CONV_ARGS:
        positions, weight_at = _CUDA_CONV_ARGS[func]
        tensors = [args[i] for i in positions] + [args[weight_at]]
        if any(t.dim() != 4 for t in tensors):
            return args
        channels_last = any(_layout(t) == "channels_last" for t in tensors)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
    else:
        return args
    return tuple(a.contiguous(memory_format=memory_format)
                 if i in positions and not a.is_contiguous(memory_format=memory_format) else a
                 for i, a in enumerate(args))


def _layout(tensor: torch.Tensor) -> str:
    if tensor.dim() == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "contiguous" if tensor.is_contiguous() else "strided"


def _where(skip: tuple[str, ...] = ()) -> tuple[str, bool]:
    """The innermost frame in the pack (this module and the files in ``skip`` excluded), as 'file:line
    function', and whether torch's checkpoint is further out (in the backward: a checkpointed block
    recomputing its forward)."""
    skipped = (_THIS_FILE, *skip)
    frame = sys._getframe(1)
    where, through_checkpoint = "-", False
    while frame is not None:
        filename = frame.f_code.co_filename
        if where == "-" and filename.startswith(_PACKAGE_DIR) and filename not in skipped:
            where = f"{Path(filename).name}:{frame.f_lineno} {frame.f_code.co_name}"
        through_checkpoint = through_checkpoint or filename.endswith(_CHECKPOINT_FILE)
        frame = frame.f_back
    return where, through_checkpoint


class MemoryTracer(TorchDispatchMode):
    """Live bytes of the storages ops create, their peak, and the largest single allocations.

    A storage counts from the op that creates it until its last user (a tensor, a view, a saved tensor of
    autograd) is gone; views and in-place ops add nothing. Use inside a ``FakeTensorMode`` (or on real tensors
    of a small run). ``baseline`` adds bytes held before (e.g. the weights) to ``current``/``peak``.
    """

    def __init__(self, baseline: int = 0, keep: int = 25, emulate_cuda: bool = False):
        super().__init__()
        self.emulate_cuda = emulate_cuda
        self.keep = keep
        self.current = baseline
        self.peak = baseline
        self.peak_phase = "-"
        self._peak_seq = -1
        self._seq = 0
        self._live: dict[int, int] = {}          # storage -> index into _records
        self._records: list[list] = []           # [Allocation, allocated at seq, freed at seq or None]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.emulate_cuda:
            copied = _cuda_layout_copies(func, args)
            for before, after in zip(args, copied, strict=True):
                if after is not before:  # made outside this mode (a mode is off inside its handler): count it
                    self._track(after, torch.ops.aten.clone.default, note=f"CUDA layout copy for {func.__name__}")
            args = copied
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor, func)
        return out

    def _track(self, tensor: torch.Tensor, func, note: str | None = None) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._live:
            return
        nbytes = storage.nbytes()
        phase = "backward" if torch._C._current_graph_task_id() != -1 else "forward"
        node = torch._C._current_autograd_node()
        op = note or str(func.__name__)
        op = op if node is None else f"{op} in {node.name()}"
        where, recompute = _where()
        if phase == "backward" and recompute:
            phase = "backward (recompute)"  # a checkpointed block re-running the pack's forward code
        dtype = str(tensor.dtype).replace("torch.", "")
        self._live[key] = len(self._records)
        self._records.append([Allocation(nbytes, op, tuple(tensor.shape), dtype, _layout(tensor), phase, where),
                              self._seq, None])
        self._seq += 1
        weakref.finalize(storage, self._free, key)
        self.current += nbytes
        if self.current > self.peak:
            self.peak, self.peak_phase, self._peak_seq = self.current, phase, self._seq

    def _free(self, key: int) -> None:
        index = self._live.pop(key, None)
        if index is not None:
            record = self._records[index]
            record[2] = self._seq
            self.current -= record[0].nbytes

    def largest(self) -> list[Allocation]:
        """The ``keep`` largest allocations (identical ones listed once)."""
        unique = dict.fromkeys(record[0] for record in self._records)
        return sorted(unique, key=lambda a: -a.nbytes)[: self.keep]

    def live_at_peak(self) -> list[Allocation]:
        """What was allocated (by this trace) and not yet freed when the peak was reached, largest first."""
        live = [r[0] for r in self._records if r[1] < self._peak_seq and (r[2] is None or r[2] >= self._peak_seq)]
        return sorted(live, key=lambda a: -a.nbytes)

    def live_now(self) -> list[Allocation]:
        """What this trace allocated and is still alive, largest first."""
        return sorted((r[0] for r in self._records if r[2] is None), key=lambda a: -a.nbytes)

    def bytes_by_dtype(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for record in self._records:
            totals[record[0].dtype] = totals.get(record[0].dtype, 0) + record[0].nbytes
        return totals

    @staticmethod
    def rows(allocations) -> list[dict]:
        return [dataclasses.asdict(a) | {"gib": round(a.nbytes / GIB, 3)} for a in allocations]

    def report(self) -> dict:
        rows = self.rows
        return {"peak_gib": round(self.peak / GIB, 3), "peak_phase": self.peak_phase,
                "largest": rows(self.largest()), "live_at_peak": rows(self.live_at_peak()[: self.keep]),
                "allocated_gib_by_dtype": {k: round(v / GIB, 2) for k, v in sorted(self.bytes_by_dtype().items())
                                           if v >= GIB // 100}}


def unet_for_trace(config: str = "full256", device: str = "cpu"):
    """The UNet of ``config`` ('full256': the released 256x256 layout; 'tiny': the test fixture's config),
    weights frozen. Call inside a ``FakeTensorMode`` to build it without memory."""
    from .architecture_detection import unet_config_from_original_kwargs
    from .benchmark import FULL256_LAYOUT, REFERENCE
    from .unet import GuidedDiffusionUNet

    if config == "full256":
        unet_config = unet_config_from_original_kwargs(json.loads(FULL256_LAYOUT.read_text())["config"])
    elif config == "tiny":
        unet_config = unet_config_from_original_kwargs(json.loads((REFERENCE / "gd_tiny" / "config.json").read_text()))
    else:
        raise ValueError(f"unknown config {config!r}: use full256 or tiny")
    with torch.device(device):
        unet = GuidedDiffusionUNet(unet_config)
    return unet.eval().requires_grad_(False)


def _fake_weights(*modules: torch.nn.Module, device: str = "cpu") -> int:
    """Replace every parameter and buffer by a fake tensor on ``device`` of the same shape, dtype and layout
    (inside a ``FakeTensorMode``); returns their bytes."""
    total = 0
    for root in modules:
        for module in root.modules():
            for name, param in module.named_parameters(recurse=False):
                module._parameters[name] = torch.nn.Parameter(torch.empty_like(param, device=device),
                                                              requires_grad=param.requires_grad)
                total += module._parameters[name].untyped_storage().nbytes()
            for name, buffer in module.named_buffers(recurse=False):
                if buffer is not None:
                    module._buffers[name] = torch.empty_like(buffer, device=device)
                    total += module._buffers[name].untyped_storage().nbytes()
    return total


def _configure_unet(unet, options) -> None:
    from . import fast_paths

    fast_paths.set_unet_precision(unet, options.unet_dtype, options.precision_scheme)
    fast_paths.apply_channels_last(unet, enabled=options.channels_last)
    fast_paths.set_gradient_checkpointing(unet, options.gradient_checkpointing)
    unet.norm_kernel = options.norm_kernel
    # Not precast_autocast_weights: a run clone's bf16 weight copies sit beside the shared fp32 model, which
    # this trace already counts; the copies (1.1 GB for the 256x256 model) are left out, the per-use casts in.


@contextlib.contextmanager
def cuda_norm_rules(emulate_cuda: bool = True):
    """Inside, with ``emulate_cuda``: the UNet's GroupNorm takes CUDA's path on the (fake CPU) tensors, without
    the float32 detour for strided maps that only the CPU needs (:data:`blended.unet.STRIDED_NORM_FP32_DEVICES`),
    and a run stores its norms' weights as it does where the Triton kernels run (they read them in float32)."""
    from . import fast_paths
    from . import unet as unet_module

    devices = frozenset() if emulate_cuda else unet_module.STRIDED_NORM_FP32_DEVICES
    takes = (lambda tensor: True) if emulate_cuda else fast_paths.runs_triton_kernels
    with (mock.patch.object(unet_module, "STRIDED_NORM_FP32_DEVICES", devices),
          mock.patch.object(fast_paths, "runs_triton_kernels", takes)):
        yield


@contextlib.contextmanager
def _tracing(tracer: MemoryTracer, options):
    from .traffic_trace import KernelTraffic, modelled_triton_kernels

    # The Triton kernels cannot run on fake tensors (their plain-torch references would keep more): stand-ins
    # that keep what the kernels keep.
    with tracer, cuda_norm_rules(tracer.emulate_cuda), modelled_triton_kernels(KernelTraffic(), options):
        yield tracer


def trace_unet_backward(options, batch: int, config: str = "full256", image_size: int | None = None,
                        keep: int = 25, emulate_cuda: bool = True) -> dict:
    """Trace one grad-enabled UNet forward + backward to the input (the UNet's part of a guided step).

    ``options`` is a :class:`~blended.fast_paths.FastPathOptions` (precision, channels_last, checkpointing
    and the norm kernel are applied; reuse/compile do not change this trace). Runs on fake CPU tensors (see the
    module doc); ``emulate_cuda`` makes it follow CUDA where the code paths differ by device type (the layout
    copies of GroupNorm and cuDNN, :data:`blended.unet.STRIDED_NORM_FP32_DEVICES`). Returns the peak and the
    memory held after the forward (weights included), the largest allocations, what is live at the peak and
    after the forward (what the backward will need), and bytes by dtype.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    # Built and configured on the meta device (module.to cannot swap fake parameters), then given fake weights.
    unet = unet_for_trace(config, device="meta")
    _configure_unet(unet, options)
    with FakeTensorMode(allow_non_fake_inputs=True):
        weights = _fake_weights(unet)
        size = image_size or unet.config.image_size
        x = torch.empty(batch, unet.config.in_channels, size, size)
        timesteps = torch.full((batch,), 500.0)
        with _tracing(MemoryTracer(baseline=weights, keep=keep, emulate_cuda=emulate_cuda), options) as tracer:
            x = x.requires_grad_(True)
            out = unet(x, timesteps)
            loss = out.sum()
            del out
            after_forward, live_after_forward = tracer.current, tracer.live_now()[:keep]
            (grad,) = torch.autograd.grad(loss, x)
            del grad, loss
        result = tracer.report()
    result.update(config=config, batch=batch, image_size=size, options=options.describe(), emulate_cuda=emulate_cuda,
                  weights_gib=round(weights / GIB, 3), after_forward_gib=round(after_forward / GIB, 3),
                  live_after_forward=tracer.rows(live_after_forward))
    return result


def trace_guided_step(options, batch: int, views: int = 8, config: str = "full256", keep: int = 25,
                      emulate_cuda: bool = True) -> dict:
    """Trace one whole guided step (:class:`blended.benchmark.StepRunner`: UNet, augmentations, CLIP on every
    view, both backwards) on fake tensors, with the benchmark's models ('full256': the released UNet layout and
    a ViT-B/16-shaped CLIP). Same result fields as :func:`trace_unet_backward`, less those after the forward.

    The CLIP tower is built for real first (a few hundred MB, some seconds) to encode the prompt.
    """
    with fake_guided_step(options, batch, views, config) as (runner, weights):
        with _tracing(MemoryTracer(baseline=weights, keep=keep, emulate_cuda=emulate_cuda), options) as tracer:
            runner()
        result = tracer.report()
    result.update(config=config, batch=batch, views=views, image_size=runner.unet.config.image_size,
                  options=options.describe(), emulate_cuda=emulate_cuda, weights_gib=round(weights / GIB, 3))
    return result


def clip_for_trace(name: str = "ViT-B-16"):
    """The vision tower of open_clip's architecture ``name`` (e.g. 'ViT-B-16', 'ViT-L-14') on the meta device, as
    a :class:`~blended.clip_model.GuidanceCLIP` the speed options can configure: nothing is downloaded or
    initialised (building ViT-L/14 takes a fraction of a second). Its LayerNorms compute in float32, as the
    loader's do (open_clip builds them so for a low-precision ``cast_dtype``); the text tower is left out: a guided
    step runs only the image tower with gradients."""
    import open_clip
    from open_clip.model import _build_vision_tower

    from .clip_model import GuidanceCLIP

    config = open_clip.get_model_config(name)
    if config is None:
        raise ValueError(f"open_clip has no architecture {name!r}")
    with torch.device("meta"):
        visual = _build_vision_tower(config["embed_dim"], config["vision_cfg"], quick_gelu=True,
                                     cast_dtype=torch.float16)
    model = torch.nn.Module()
    model.visual = visual.eval().requires_grad_(False)
    size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    return GuidanceCLIP(model, int(size))


def trace_clip_backward(options, views: int, name: str = "ViT-B-16", keep: int = 25,
                        emulate_cuda: bool = True) -> dict:
    """Trace CLIP's part of a guided step for ``views`` images: normalised float32 views (as the augmentations
    hand them on) through the image tower configured for ``options`` (CLIP precision, channels_last,
    clip_checkpointing, triton_clip), and the backward to the views. What the views add to a step's peak, for
    :func:`blended.memory.clip_view_bytes` to be checked against. Same fields as :func:`trace_unet_backward`."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from . import fast_paths

    clip = clip_for_trace(name)
    fast_paths.set_clip_precision(clip, options.clip_dtype)
    fast_paths._to_memory_format(clip.model, torch.channels_last if options.channels_last else torch.contiguous_format)
    fast_paths.set_clip_checkpointing(clip, options.clip_checkpointing)
    fast_paths.set_clip_kernels(clip, options.triton_clip)
    with FakeTensorMode(allow_non_fake_inputs=True):
        weights = _fake_weights(clip.model)
        fast_paths.precast_clip_embeddings(clip)
        images = torch.empty(views, 3, clip.image_size, clip.image_size).requires_grad_(True)
        with _tracing(MemoryTracer(baseline=weights, keep=keep, emulate_cuda=emulate_cuda), options) as tracer:
            loss = clip.encode_image(images).sum()
            after_forward, live_after_forward = tracer.current, tracer.live_now()[:keep]
            (grad,) = torch.autograd.grad(loss, images)
            del grad, loss
        result = tracer.report()
    result.update(clip=name, views=views, options=options.describe(), emulate_cuda=emulate_cuda,
                  weights_gib=round(weights / GIB, 3), after_forward_gib=round(after_forward / GIB, 3),
                  peak_bytes=tracer.peak, weights_bytes=weights, after_forward_bytes=after_forward,
                  live_after_forward=tracer.rows(live_after_forward))
    return result


@contextlib.contextmanager
def fake_guided_step(options, batch: int, views: int = 8, config: str = "full256"):
    """Inside a ``FakeTensorMode``: a :class:`blended.benchmark.StepRunner` of one guided step with the
    benchmark's models configured for ``options``, and the bytes of their (fake) weights. For tracers."""
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

    from . import augment, benchmark, fast_paths
    from .diffusion import create_diffusion
    from .sampler import SamplerSettings

    if config != "full256":
        raise ValueError("guided-step traces use the full256 models; use trace_unet_backward for the tiny UNet")
    unet = unet_for_trace(config, device="meta")
    _configure_unet(unet, options)
    clip = benchmark.random_vit_b16_clip()
    fast_paths.set_clip_precision(clip, options.clip_dtype)
    fast_paths.apply_channels_last(unet, clip, enabled=options.channels_last)
    fast_paths.set_clip_checkpointing(clip, options.clip_checkpointing)
    fast_paths.set_clip_kernels(clip, options.triton_clip)
    inputs = benchmark.edit_inputs(unet, clip, torch.device("cpu"))
    diffusion = create_diffusion(timestep_respacing=str(benchmark.SCHEDULE_STEPS))
    settings = fast_paths.sampler_settings_with(SamplerSettings(skip_timesteps=25), options)
    draw_view_params = augment.draw_view_params

    def draw_for_real(*args, **kwargs):
        # The views' parameters are host-side numpy arrays drawn from CPU generators: real numbers even here.
        with unset_fake_temporarily():
            return draw_view_params(*args, **kwargs)

    with FakeTensorMode(allow_non_fake_inputs=True), mock.patch.object(augment, "draw_view_params", draw_for_real):
        weights = _fake_weights(unet, clip.model)
        yield benchmark.StepRunner(unet, diffusion, clip, inputs, batch, views, settings, options), weights


@contextlib.contextmanager
def fake_run_step(options, batch: int, views: int = 8, config: str = "full256", emulate_cuda: bool = True):
    """:func:`fake_guided_step`'s runner with its weights stored once as a run's clone stores them
    (``fast_paths.precast_run_weights``), under CUDA's norm rules with ``emulate_cuda``: which norms apply bf16
    weights depends on the device. For counting what each step of a run does (traffic, launches, compiles)."""
    from . import fast_paths

    with fake_guided_step(options, batch, views, config) as (runner, _):
        with cuda_norm_rules(emulate_cuda):
            fast_paths.precast_run_weights(runner.unet, runner.objective.clip, options)
        yield runner
