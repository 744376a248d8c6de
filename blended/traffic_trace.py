"""How many bytes each kernel of a guided step reads and writes, counted on fake tensors: where fusions pay.

On a GPU the guided step's convolutions and matmuls run near the tensor cores' peak, but everything between
them (GroupNorm, SiLU, residual sums, gradient accumulation, casts, layout copies, CLIP's activations) is bound
by memory bandwidth: each such kernel costs about the bytes it moves. Counting those bytes needs no GPU. The
step runs on fake tensors (shapes, dtypes and strides, no data; :func:`blended.memory_trace.fake_guided_step`)
under a dispatch mode that charges every ATen op the bytes of its tensor inputs and outputs:

* views, allocations and metadata queries move nothing; an in-place op reads and writes what it changes;
* an input broadcast along a dimension (a stride of 0) is charged once, not once per use;
* the layout copies CUDA's GroupNorm and cuDNN make inside their kernels are charged as "CUDA layout copy";
* the pack's Triton kernels (``triton_norm``, ``triton_clip``) are charged by the passes they make over their
  tensors, since off CUDA their reference runs instead: GroupNorm + SiLU reads ``x`` twice and writes once
  forward, reads ``x`` and the gradient twice each and writes once backward (a ResBlock's first norm also
  reads its skip path's gradient, and an encoder block's the skip stack's, which it adds); CLIP's LayerNorm
  and QuickGELU read and write once forward, read two and write one backward (a LayerNorm that also makes the
  residual sum it normalises reads two and writes two forward, reads three and writes one backward);
* cuDNN's own NCHW<->NHWC transposes around a bf16/fp16 convolution given NCHW activations, and the separate
  pass that adds a convolution's bias to its output (CUDA rules).

Convolutions, matmuls and attention are listed apart ("compute"): their time follows FLOPs, not bytes. The
result is a model of traffic, not a timing: kernels reach their bandwidth to different degrees.

    PYTHONPATH=. python scripts/memory_trace.py --traffic --step --batch 8 \
        --preset fast-gpu,fast-gpu+channels_last+triton_norm+triton_clip
"""

from __future__ import annotations

import collections
import contextlib
from pathlib import Path
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from . import carried_statistics, memory_trace

__all__ = ["KernelTraffic", "adds_bias_in_a_pass", "launches_a_kernel", "modelled_triton_kernels", "touched_bytes",
           "trace_step_traffic"]

GB = 1e9
_THIS_FILE = str(Path(__file__).resolve())
# Ops whose time is set by their FLOPs.
COMPUTE_OPS = frozenset({
    "convolution", "convolution_backward", "mm", "bmm", "addmm", "baddbmm", "linear",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"})
_ALLOCATIONS = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})


def touched_bytes(tensor: torch.Tensor) -> int:
    """Bytes a kernel reads or writes for ``tensor``: its elements, a broadcast (stride 0) dimension once."""
    count = 1
    for size, stride in zip(tensor.shape, tensor.stride(), strict=True):
        if stride != 0:
            count *= size
    return count * tensor.element_size()


def adds_bias_in_a_pass(func, args) -> bool:
    """Whether CUDA runs this op's bias as a kernel of its own: a convolution with a bias is cuDNN's convolution
    and then an in-place add of the bias over the whole output (an H100 profile of a step at batch 8: 14 such
    adds of 0.4 ms on the 256-px maps)."""
    return func._overloadpacket.__name__ == "convolution" and len(args) > 2 and args[2] is not None


def launches_a_kernel(func, inputs: list, outputs: list) -> bool:
    """Whether an aten op, given its tensor inputs and outputs, runs a kernel on the device: not an allocation,
    a query (no tensor out, nothing mutated) or a view (every output aliases an input)."""
    mutates = func._schema.is_mutable
    if func._overloadpacket.__name__ in _ALLOCATIONS or (not outputs and not mutates):
        return False
    input_storages = {a.untyped_storage()._cdata for a in inputs}
    return mutates or not outputs or not all(o.untyped_storage()._cdata in input_storages for o in outputs)


class KernelTraffic(TorchDispatchMode):
    """Bytes moved by every memory-bound op (and, apart, by the compute ops), by op and by site in the pack.

    A site is the innermost line of the pack's code that issued the op, with the phase ("forward", or
    "backward of <autograd node>"), so the backward's bytes are told apart by the forward op they undo.
    ``emulate_cuda`` charges CUDA's in-kernel layout copies (see :mod:`blended.memory_trace`).
    """

    def __init__(self, emulate_cuda: bool = True):
        super().__init__()
        self.emulate_cuda = emulate_cuda
        self.by_op: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()
        self.by_site: collections.Counter = collections.Counter()
        self.compute: collections.Counter = collections.Counter()

    def charge(self, op: str, nbytes: int) -> None:
        """Count ``nbytes`` of memory-bound traffic for ``op`` at the current site (modelled kernels use it)."""
        self.by_op[op] += nbytes
        self.calls[op] += 1
        self.by_site[(op, _site())] += nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.emulate_cuda:
            copied = memory_trace._cuda_layout_copies(func, args)
            for before, after in zip(args, copied, strict=True):
                if after is not before:
                    self.charge("CUDA layout copy", 2 * touched_bytes(after))
            args = copied
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._overloadpacket.__name__
        inputs = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        outputs = [o for o in tree_leaves(out) if isinstance(o, torch.Tensor)]
        if not launches_a_kernel(func, inputs, outputs):
            return out
        # Inputs are read; new outputs written; a mutated input is read (counted with the inputs) and written.
        nbytes = sum(touched_bytes(a) for a in inputs) + sum(touched_bytes(o) for o in outputs)
        if name in COMPUTE_OPS:
            self.compute[name] += nbytes
            if self.emulate_cuda and name in ("convolution", "convolution_backward"):
                self._cudnn_transposes(args, outputs)
            if self.emulate_cuda and adds_bias_in_a_pass(func, args):
                self.charge("convolution bias add (CUDA)", 2 * touched_bytes(outputs[0]))
        else:
            self.charge(name, nbytes)
        return out

    def _cudnn_transposes(self, args: tuple, outputs: list) -> None:
        # cuDNN's bf16/fp16 convolutions run in NHWC: given NCHW activations, it transposes what it reads and
        # what it writes, in kernels of its own (an H100 profile of a bf16 NCHW step: 508 such kernels, 12% of
        # the kernel time). Forward: input and output; backward (input gradient): the output's gradient and
        # the input's.
        moved = [t for t in (args[0], outputs[0] if outputs else None) if t is not None and t.dim() == 4]
        if not moved or moved[0].dtype not in (torch.bfloat16, torch.float16):
            return
        if memory_trace._layout(moved[0]) == "channels_last":
            return
        self.charge("cuDNN NCHW<->NHWC transposes", sum(2 * touched_bytes(t) for t in moved))

    @property
    def memory_bound_bytes(self) -> int:
        return sum(self.by_op.values())

    def report(self, keep: int = 25) -> dict:
        ops = [{"op": op, "gb": round(n / GB, 2), "calls": self.calls[op]} for op, n in self.by_op.most_common(keep)]
        sites = [{"op": op, "site": site, "gb": round(n / GB, 2)} for (op, site), n in self.by_site.most_common(keep)]
        return {"memory_bound_gb": round(self.memory_bound_bytes / GB, 1),
                "compute_op_gb": round(sum(self.compute.values()) / GB, 1),
                "layout_copy_gb": round(self.by_op.get("CUDA layout copy", 0) / GB, 2),
                "by_op": ops, "by_site": sites}


def _site() -> str:
    phase = "forward"
    if torch._C._current_graph_task_id() != -1:
        node = torch._C._current_autograd_node()
        phase = f"backward of {node.name()}" if node is not None else "backward"
    where, _ = memory_trace._where(skip=(_THIS_FILE,))
    return phase if where == "-" else f"{phase}: {where}"


# ------------------------------------------------------------------ the Triton kernels, by their passes

class _ModelledKernel(torch.autograd.Function):
    """Stands in for one of the pack's Triton kernels on fake tensors: charges its passes, returns a fake
    output of the input's shape and strides (as the kernels write) in ``out_dtype``.

    Forward, the kernel reads ``x`` ``x_reads`` times (and ``extra``, the timestep terms, once) and writes its
    output; backward it reads ``x`` and the output's gradient ``grad_reads`` times each and writes ``x``'s.
    """

    @staticmethod
    def forward(ctx, counter, name, x_reads, grad_reads, x, extra, out_dtype):
        ctx.counter, ctx.kernel, ctx.grad_reads = counter, name, grad_reads
        y = torch.empty_like(x, dtype=out_dtype or x.dtype)
        counter.charge(f"{name} (Triton)", x_reads * touched_bytes(x) + touched_bytes(y)
                       + (touched_bytes(extra) if extra is not None else 0))
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        ctx.counter.charge(f"{ctx.kernel} backward (Triton)",
                           ctx.grad_reads * (touched_bytes(x) + touched_bytes(grad)) + touched_bytes(x))
        return None, None, None, None, torch.empty_like(x), None, None


class _ModelledKernelKeepingInput(torch.autograd.Function):
    """:class:`_ModelledKernel` for the norm that also hands ``x`` on (the skip path; ``aliases=2``: the UNet's
    skip stack too) and adds those paths' gradients in its backward kernel: one more read there for each, and no
    accumulation by autograd."""

    @staticmethod
    def forward(ctx, counter, name, x_reads, grad_reads, x, aliases):
        ctx.counter, ctx.kernel, ctx.grad_reads = counter, name, grad_reads
        ctx.set_materialize_grads(False)
        counter.charge(f"{name} (Triton)", (x_reads + 1) * touched_bytes(x))
        ctx.save_for_backward(x)
        return (torch.empty_like(x), *(x.view_as(x) for _ in range(aliases)))

    @staticmethod
    def backward(ctx, grad, *grad_aliases):
        (x,) = ctx.saved_tensors
        ctx.counter.charge(f"{ctx.kernel} backward (Triton)", ctx.grad_reads * (touched_bytes(x) + touched_bytes(grad))
                           + sum(touched_bytes(g) for g in grad_aliases if g is not None) + touched_bytes(x))
        return None, None, None, None, torch.empty_like(x), None


class _ModelledKernelHalving(torch.autograd.Function):
    """:class:`_ModelledKernelKeepingInput` for a down block's norm that writes its output and its skip input
    2x2-pooled: its output pass writes two half-size maps, and its backward reads both poolings' half-size
    gradients in place."""

    @staticmethod
    def forward(ctx, counter, name, x_reads, grad_reads, x, aliases):
        ctx.counter, ctx.kernel, ctx.grad_reads = counter, name, grad_reads
        ctx.set_materialize_grads(False)
        batch, channels, height, width = x.shape
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        y, x_half = (torch.empty((batch, channels, height // 2, width // 2), dtype=x.dtype, device=x.device,
                                 memory_format=layout) for _ in range(2))
        counter.charge(f"{name} (Triton)", x_reads * touched_bytes(x) + touched_bytes(y) + touched_bytes(x_half))
        ctx.save_for_backward(x)
        return (y, x_half, *(x.view_as(x) for _ in range(aliases)))

    @staticmethod
    def backward(ctx, grad, grad_half, *grad_aliases):
        (x,) = ctx.saved_tensors
        ctx.counter.charge(f"{ctx.kernel} backward (Triton)", ctx.grad_reads * (touched_bytes(x) + touched_bytes(grad))
                           + sum(touched_bytes(g) for g in (grad_half, *grad_aliases) if g is not None)
                           + touched_bytes(x))
        return None, None, None, None, torch.empty_like(x), None


class _ModelledKernelOfPair(torch.autograd.Function):
    """:class:`_ModelledKernelKeepingInput` for the norm of a concatenation's two parts, made without the
    concatenation: the same passes over the two parts, an output of their joint channels, each part's gradient
    written as its own map."""

    @staticmethod
    def forward(ctx, counter, name, x_reads, grad_reads, a, b):
        # x_reads: (a's, b's), since either may carry its statistics.
        ctx.counter, ctx.kernel, ctx.grad_reads = counter, name, grad_reads
        y = torch.empty((a.shape[0], a.shape[1] + b.shape[1], *a.shape[2:]), dtype=a.dtype, device=a.device,
                        memory_format=torch.channels_last)
        counter.charge(f"{name} (Triton)", x_reads[0] * touched_bytes(a) + x_reads[1] * touched_bytes(b)
                       + touched_bytes(y))
        ctx.save_for_backward(a, b)
        return y, a.view_as(a), b.view_as(b)

    @staticmethod
    def backward(ctx, grad, grad_a, grad_b):
        a, b = ctx.saved_tensors
        parts = touched_bytes(a) + touched_bytes(b)
        ctx.counter.charge(f"{ctx.kernel} backward (Triton)", ctx.grad_reads * (parts + touched_bytes(grad))
                           + touched_bytes(grad_a) + touched_bytes(grad_b) + parts)
        return None, None, None, None, torch.empty_like(a), torch.empty_like(b)


class _ModelledResidualSum(torch.autograd.Function):
    """Stands in for :func:`blended.triton_residual.residual_sum`: one pass reading both maps and writing the
    sum and its partial statistics, which it leaves on the sum as the kernel does; the backward hands the
    gradient to both as it is (no kernel), or for a half-size skip (an up block's input, read as its upsampling)
    runs the upsampling's backward, as the kernel's does."""

    @staticmethod
    def forward(ctx, counter, skip, h, upsampled_skip):
        from .triton_norm import statistics_grid

        out = torch.empty_like(h, dtype=torch.result_type(skip, h))
        grid = statistics_grid(out)
        sums = grid.partial_sums(3, out.device)
        counter.charge("residual sum + bias (Triton)", touched_bytes(skip) + touched_bytes(h) + touched_bytes(out)
                       + touched_bytes(sums))
        ctx.skip_shape = tuple(skip.shape) if upsampled_skip else None
        ctx.mark_non_differentiable(sums)
        ctx.set_materialize_grads(False)
        return out, sums

    @staticmethod
    def backward(ctx, grad, _sums):
        from .triton_residual import upsampling_gradient

        if grad is None or ctx.skip_shape is None:
            return None, grad, grad, None
        return None, upsampling_gradient(grad, ctx.skip_shape), grad, None


def _modelled_residual_sum(counter, skip, h, upsampled_skip):
    out, sums = _ModelledResidualSum.apply(counter, skip, h, upsampled_skip)
    return carried_statistics.attach(out, sums)


def _statistics_reads(x, input_bias=None) -> int:
    """How often the norm's statistics pass reads ``x``: not at all where ``x`` carries its statistics (and the
    norm adds no input bias), as the kernels decide (:func:`blended.triton_norm._channel_partials`)."""
    return 0 if input_bias is None and carried_statistics.carried(x) is not None else 1


class _ModelledResidualLayerNorm(torch.autograd.Function):
    """Stands in for :func:`blended.triton_clip.residual_layer_norm`: forward reads ``x`` and ``delta`` and
    writes their sum and its norm; backward reads the sum, the norm's gradient and the sum's own, and writes the
    one gradient both terms get."""

    @staticmethod
    def forward(ctx, counter, x, delta):
        ctx.counter = counter
        total, y = torch.empty_like(x), torch.empty_like(x)
        counter.charge("residual sum + LayerNorm (Triton)", touched_bytes(x) + touched_bytes(delta)
                       + touched_bytes(total) + touched_bytes(y))
        ctx.save_for_backward(total)
        return total, y

    @staticmethod
    def backward(ctx, grad_total, grad):
        (total,) = ctx.saved_tensors
        ctx.counter.charge("residual sum + LayerNorm backward (Triton)", 2 * touched_bytes(total)
                           + touched_bytes(grad) + touched_bytes(grad_total))
        grad_terms = torch.empty_like(total)
        return None, grad_terms, grad_terms


@contextlib.contextmanager
def modelled_triton_kernels(counter: KernelTraffic, options):
    """The pack's Triton kernels (per ``options``) replaced by stand-ins that run on fake tensors, charge
    ``counter`` their passes and keep for the backward what the kernels keep (their input)."""
    from . import clip_vision
    from . import unet as unet_module

    patches = contextlib.ExitStack()
    with patches:
        if options.triton_norm:
            def norm_silu(kernel, norm, x, scale_shift=None, out_dtype=None, input_bias=None):
                # Forward: a statistics pass (unless x carries its statistics) and an output pass read x.
                # Backward: a statistics pass and an output pass read x and the gradient. (An input bias is a few
                # numbers per channel.)
                return _ModelledKernel.apply(counter, "GroupNorm+SiLU", 1 + _statistics_reads(x, input_bias), 2, x,
                                             scale_shift, out_dtype)

            def norm_silu_keeping_input(kernel, norm, x, hand_on=False):
                return _ModelledKernelKeepingInput.apply(counter, "GroupNorm+SiLU", 1 + _statistics_reads(x), 2, x,
                                                         2 if hand_on else 1)
            patches.enter_context(mock.patch.object(unet_module, "_fused_norm_silu", norm_silu))
            patches.enter_context(mock.patch.object(unet_module, "_fused_norm_silu_keeping_input",
                                                    norm_silu_keeping_input))

            def norm_keeping_input(norm, x):  # an attention block's GroupNorm alone, the same passes
                return _ModelledKernelKeepingInput.apply(counter, "GroupNorm", 1 + _statistics_reads(x), 2, x, 1)
            patches.enter_context(mock.patch.object(unet_module, "_norm_keeping_input", norm_keeping_input))

            def norm_silu_halving(norm, x, hand_on=False):
                return _ModelledKernelHalving.apply(counter, "GroupNorm+SiLU", 1 + _statistics_reads(x), 2, x,
                                                    1 if hand_on else 0)
            patches.enter_context(mock.patch.object(unet_module, "_fused_norm_silu_halving", norm_silu_halving))

            def norm_silu_of_pair(norm, a, b):
                return _ModelledKernelOfPair.apply(counter, "GroupNorm+SiLU", tuple(1 + _statistics_reads(t)
                                                                                    for t in (a, b)), 2, a, b)
            patches.enter_context(mock.patch.object(unet_module, "_fused_norm_silu_of_pair", norm_silu_of_pair))
            patches.enter_context(mock.patch.object(
                unet_module, "_residual_sum", lambda skip, h, bias, upsampled_skip=False: _modelled_residual_sum(
                    counter, skip, h, upsampled_skip)))
            # The tensors are fake CPU ones: let the output blocks take the parts as the kernels would on CUDA.
            patches.enter_context(mock.patch.object(unet_module, "runs_triton_kernels", lambda tensor: True))
        if options.triton_clip:
            real_residual_layer_norm = clip_vision._residual_layer_norm

            def mlp(module, x, kernels):
                if kernels != "triton" or not clip_vision._is_quick_gelu(getattr(module, "gelu", None)):
                    return module(x)
                hidden = module.c_fc(x)
                return module.c_proj(_ModelledKernel.apply(counter, "QuickGELU", 1, 1, hidden, None, None))

            def layer_norm(norm, x, kernels):
                if kernels != "triton" or not clip_vision._is_affine_layer_norm(norm, x):
                    return norm(x)
                return _ModelledKernel.apply(counter, "LayerNorm", 1, 1, x, None, None)

            def residual_layer_norm(norm, x, delta, kernels):
                if (norm is None or kernels != "triton" or not clip_vision._is_affine_layer_norm(norm, x)
                        or x.dtype != delta.dtype):
                    return real_residual_layer_norm(norm, x, delta, None)
                return _ModelledResidualLayerNorm.apply(counter, x, delta)
            patches.enter_context(mock.patch.object(clip_vision, "_mlp", mlp))
            patches.enter_context(mock.patch.object(clip_vision, "_layer_norm", layer_norm))
            patches.enter_context(mock.patch.object(clip_vision, "_residual_layer_norm", residual_layer_norm))
        yield


def trace_step_traffic(options, batch: int, views: int = 8, config: str = "full256", keep: int = 25,
                       emulate_cuda: bool = True) -> dict:
    """The bytes one whole guided step moves (:func:`blended.memory_trace.fake_run_step`), by op and by site.

    ``options`` is a :class:`~blended.fast_paths.FastPathOptions`. ``memory_bound_gb`` sums the ops whose time
    follows their bytes (``compute_op_gb``: the convolutions', matmuls' and attention's, apart).
    """
    counter = KernelTraffic(emulate_cuda=emulate_cuda)
    with memory_trace.fake_run_step(options, batch, views, config, emulate_cuda) as runner:
        with memory_trace.cuda_norm_rules(emulate_cuda), modelled_triton_kernels(counter, options), counter:
            runner()
    result = counter.report(keep)
    result.update(config=config, batch=batch, views=views, options=options.describe(), emulate_cuda=emulate_cuda)
    return result
