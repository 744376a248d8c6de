"""Which Triton kernels a run compiles before its first step finishes, and how long that takes, on any machine.

Why: a user should not wait minutes for a compile. Triton compiles a kernel once for each specialisation the
JIT meets: the dtypes of its pointers, which integers are 1 or multiples of 16, which pointers are 16-byte
aligned, and its compile-time constants. The pack's kernels meet several (group sizes and their tiles, optional
terms, the float32 ``out`` head), and each is a compile of its own: Triton's MLIR passes, then ptxas.

:func:`launched_specialisations` runs one guided step of the 256x256 model on fake tensors with the kernel
objects replaced by recorders, which bind the launch arguments with Triton's own specialisation code (as its JIT
does, for the H100's target) and keep each distinct specialisation. :func:`compile_times` then compiles each one
for sm_90 into an empty cache, as a cold start does, and times it. The compile runs on the host's CPU, so the
times are this machine's CPU's. Triton keeps what it compiled in its
on-disk cache (``~/.triton/cache`` unless ``TRITON_CACHE_DIR`` says otherwise), so only the first run on a
machine, or after a Triton or pack update changes a kernel, pays for this.

:func:`launches_per_step` counts what the same step launches, torch ops and Triton kernels: at small batches
the host's launches, not the GPU, set a step's pace.

This reads Triton's JIT internals (``create_function_from_signature``, ``JITFunction._pack_args``), checked
against the Triton the pack is tested with.
"""

from __future__ import annotations

import collections
import contextlib
import os
import tempfile
import time
from dataclasses import dataclass
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from . import memory_trace

__all__ = ["Specialisation", "recording_launches", "launched_specialisations", "launches_per_step", "compile_times"]

# (module, kernel) of every Triton kernel the pack launches.
KERNELS = (("triton_norm", "_stats_kernel"), ("triton_norm", "_stats_merge_kernel"), ("triton_norm", "_forward_kernel"),
           ("triton_norm", "_backward_stats_kernel"), ("triton_norm", "_backward_stats_merge_kernel"),
           ("triton_norm", "_backward_kernel"), ("triton_residual", "_residual_sum_kernel"),
           ("triton_clip", "_gelu_forward_kernel"), ("triton_clip", "_gelu_backward_kernel"),
           ("triton_clip", "_norm_forward_kernel"), ("triton_clip", "_norm_backward_kernel"))


@dataclass
class Specialisation:
    """One compile: the kernel and what Triton's JIT would hand its compiler, and how often a step launched it."""

    kernel: str
    fn: object  # the JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: object
    launches: int = 0

    def describe(self) -> str:
        """The kernel, its pointers' dtypes, its constants by name (the JIT's and the launch's) and the integers
        the JIT takes as multiples of 16."""
        names = list(self.signature)
        pointers = ",".join(v[1:] for v in self.signature.values() if v.startswith("*"))
        constants = ",".join(f"{names[path[0]]}={value}" for path, value in self.constexprs.items())
        aligned = ",".join(names[path[0]] for path, attrs in self.attrs.items()
                           if attrs and not self.signature[names[path[0]]].startswith("*"))
        return f"{self.kernel}({pointers}; {constants}; x16: {aligned or '-'})"


class _Pointer:
    """What Triton's specialisation reads of a tensor argument: its dtype and its address's alignment. Fake
    tensors have no address; the caching allocator hands out blocks aligned far beyond 16 bytes, so a tensor's
    alignment is its storage offset's."""

    def __init__(self, tensor: torch.Tensor):
        self.dtype = tensor.dtype
        self._offset = tensor.storage_offset() * tensor.element_size()

    def data_ptr(self) -> int:
        return self._offset


class _Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args)`` records the specialisation and launches nothing."""

    def __init__(self, name, fn, backend, found: dict):
        from triton import knobs
        from triton.runtime.jit import create_function_from_signature

        self.name, self.fn, self.backend, self.found, self.knobs = name, fn, backend, found, knobs
        self.binder = create_function_from_signature(fn.signature, fn.params, backend)

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        kwargs["debug"] = kwargs.get("debug", self.fn.debug) or self.knobs.runtime.debug
        # As the JIT's own run() sets them; Triton before 3.6 has no instrumentation mode.
        if hasattr(self.knobs.compilation, "instrumentation_mode"):
            kwargs["instrumentation_mode"] = self.knobs.compilation.instrumentation_mode
        args = [_Pointer(a) if isinstance(a, torch.Tensor) else a for a in args]
        bound, specialization, options = self.binder(*args, **kwargs)
        key = (self.name, repr(specialization), repr(sorted(options.items())))
        if key not in self.found:
            packed = self.fn._pack_args(self.backend, kwargs, bound, specialization, options)
            self.found[key] = Specialisation(self.name, self.fn, *packed[1:], options=packed[0])
        self.found[key].launches += 1


@contextlib.contextmanager
def recording_launches(found: dict, target=None):
    """Inside: the pack's Triton kernels record into ``found`` instead of launching, and the UNet and CLIP take
    their Triton paths whatever the device (the tensors are fake)."""
    import importlib

    from triton.compiler import make_backend

    from . import clip_vision
    from . import unet as unet_module
    from .kernel_report import cuda_target

    backend = make_backend(target or cuda_target())
    with contextlib.ExitStack() as patches:
        for module_name, name in KERNELS:
            module = importlib.import_module(f"blended.{module_name}")
            recorder = _Recorder(name, getattr(module, name), backend, found)
            patches.enter_context(mock.patch.object(module, name, recorder))
        for module in (unet_module, clip_vision):
            patches.enter_context(mock.patch.object(module, "runs_triton_kernels", lambda tensor: True))
        patches.enter_context(memory_trace.cuda_norm_rules())
        yield found


def launched_specialisations(options, batches=(1,), views: int = 8) -> list[Specialisation]:
    """The distinct Triton specialisations one guided step of the 256x256 model launches with ``options`` (a
    :class:`~blended.fast_paths.FastPathOptions`), over the given batch sizes: a launch's integer arguments
    follow the batch, and an integer the JIT specialises on could make a new batch size compile anew."""
    found: dict = {}
    for batch in batches:
        with memory_trace.fake_run_step(options, batch, views) as runner, recording_launches(found):
            runner()
    return list(found.values())


class _TorchLaunches(TorchDispatchMode):
    """Counts the aten ops that run a kernel (not views, allocations or queries), by the pack's file that issued
    them."""

    def __init__(self):
        super().__init__()
        self.by_file: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from . import traffic_trace

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        outputs = [o for o in tree_leaves(out) if isinstance(o, torch.Tensor)]
        if traffic_trace.launches_a_kernel(func, inputs, outputs):
            where, _ = memory_trace._where(skip=(__file__,))
            # A convolution with a bias is two kernels on CUDA: the convolution, then the bias's add.
            self.by_file[where.split(":")[0]] += 2 if traffic_trace.adds_bias_in_a_pass(func, args) else 1
        return out


def launches_per_step(options, batch: int = 1, views: int = 8) -> dict:
    """The kernels one guided step of the 256x256 model launches on a CUDA GPU with ``options``, counted on fake
    tensors after a first step: ``{"torch": {file: count}, "triton": {kernel: count}}``, a torch op counted by
    the pack's file that issued it. At small batches the host's launches, not the GPU, set a step's pace."""
    found: dict = {}
    with memory_trace.fake_run_step(options, batch, views) as runner:
        with recording_launches({}):
            runner()  # the first step builds what later steps reuse
        with recording_launches(found), _TorchLaunches() as torch_launches:
            runner()
    triton = collections.Counter()
    for spec in found.values():
        triton[spec.kernel] += spec.launches
    return {"torch": dict(torch_launches.by_file), "triton": dict(triton)}


def compile_times(specialisations, target=None) -> list[dict]:
    """Each specialisation compiled for ``target`` (sm_90 by default) into an empty Triton cache, one after the
    other, as a cold start compiles them: one row each with its wall time in seconds."""
    import triton
    from triton.compiler import ASTSource

    from .kernel_report import cuda_target

    rows = []
    with tempfile.TemporaryDirectory() as cache, mock.patch.dict(os.environ, {"TRITON_CACHE_DIR": cache}):
        for spec in specialisations:
            source = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs)
            start = time.perf_counter()
            triton.compile(source, target=target or cuda_target(), options=spec.options.__dict__)
            rows.append({"specialisation": spec.describe(), "kernel": spec.kernel, "launches": spec.launches,
                         "compile_s": round(time.perf_counter() - start, 3)})
    return rows
