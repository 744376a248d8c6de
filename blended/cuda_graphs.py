"""Replay the frozen networks' forward and backward as CUDA graphs: one launch where eager mode makes thousands.

Why: on a GPU the guided step is bound by the host. A profile of one step (the H100, batch 8) had the GPU busy
two thirds of the time, the rest spent launching the UNet's and CLIP's thousands of small kernels one by one.
A captured CUDA graph replays all the kernels of a network's forward, or of its backward, in one launch.

Guidance suits capture: the networks are frozen, their inputs keep their shapes for a whole run, and nothing
in them reads a value back or copies from the host (``tests/test_cuda_graphs.py`` checks both). Nothing is
traced or generated, so there is no compile to wait for: a capture costs a few warm-up forwards and
backwards, once per run and input shape.

:class:`GraphedCalls` wraps one network call. The second time it sees an input signature (shapes, dtypes,
strides, which inputs need a gradient, whether autograd is on) it captures a graph, and replays it from then
on; a call seen once (the ranking's, say) stays eager, since a capture costs a few calls. Calls that need a
gradient get the forward and the backward captured (``torch.cuda.make_graphed_callables``); calls without
autograd (the sampler's unguided forward when ``reuse_guided_forward`` is off) get the forward alone. Calls
run eagerly where a graph cannot stand in: inputs not on a CUDA device, autocast active around the call,
non-tensor arguments.

Replays write their outputs into the same buffers each time, so the outputs are copied before they are
returned (a [B,6,256,256] UNet output: 1.5 MB per result): what a caller keeps is never overwritten. A replay's
backward reads the activations its forward left in the graph's memory, so a graph is not replayed again while
the previous replay's output still waits for its gradient: such a call runs eagerly (a guided step makes one
grad-enabled call of each network and backpropagates it before the next step).

The graphs belong to one run (``fast_paths.run_clones`` installs them on the run's clones and drops them when
it ends): their memory pools hold the inputs, outputs and activations of one step of one batch size.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import weakref
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

log = logging.getLogger(__name__)

# The device types whose calls are captured, and the capture itself; tests replace them to run the same
# bookkeeping on the CPU with a replay emulator (``tests/test_cuda_graphs.py``).
GRAPH_DEVICE_TYPES: tuple[str, ...] = ("cuda",)


# Gradient checkpointing (the ``ckpt`` and ``clip_ckpt`` options) without saving and restoring the RNG state: the
# frozen blocks draw no random numbers (dropout acts only in training), so the recomputation is the same without
# it. Saving it reads the generators' state at every checkpoint: host work each time, and on many torch versions
# an error inside a CUDA graph capture ("Cannot call CUDAGeneratorImpl::current_seed during CUDA graph capture").
CHECKPOINT_ARGS = {"use_reentrant": False, "preserve_rng_state": False}


# Warm-up calls before a capture (torch's default): they run on a side stream, off the graph.
CAPTURE_WARMUPS = 3


def capture_cuda_graphs(fn: Callable, samples: tuple) -> Callable:
    """``fn``'s forward and backward captured on ``samples``' device; the result replays them."""
    with torch.cuda.device(samples[0].device):
        warmups = warmups_that_fit(samples[0].device)
        return torch.cuda.make_graphed_callables(fn, samples, num_warmup_iters=warmups, allow_unused_input=True)


def warmups_that_fit(device: torch.device, margin: float = 1.25) -> int:
    """How many warm-up calls a capture can afford: :data:`CAPTURE_WARMUPS`, or none where memory is short.

    Why: the warm-ups run on a side stream and leave a step's worth of activations cached there, and while a
    capture runs torch's allocator cannot hand cached memory back to the driver, so the graph's own pool needs a
    second step's worth on top: at batch 64 of the 256x256 model on an 80 GB card that does not fit (batch 32,
    about 37 GiB a step, does). The call was already run once eagerly with these shapes before its capture (a
    call is captured the second time its shapes are seen), so cuDNN's algorithm search, Triton's compiles and
    the libraries' lazy set-up are done. Here the cache of that eager call is emptied; its size is about a
    step's transient memory, and where the card's free memory holds less than two of those (with a margin), the
    capture runs without warm-ups, in one step's worth."""
    reserved = torch.cuda.memory_reserved(device)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    step = reserved - torch.cuda.memory_reserved(device)
    free, _ = torch.cuda.mem_get_info(device)
    if free >= margin * 2 * step:
        return CAPTURE_WARMUPS
    log.debug("cuda_graphs: capturing without warm-ups (%.1f GiB free, a step takes about %.1f GiB)", free / 2**30,
             step / 2**30)
    return 0


def capture_cuda_forward(fn: Callable, samples: tuple, warmup: int = 2) -> Callable:
    """``fn``'s forward alone (autograd off) captured on ``samples``' device; the result copies its arguments
    into ``samples``, replays, and returns the graph's own output tensors."""
    with torch.cuda.device(samples[0].device), torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (cuDNN and Triton choose and build their kernels) off the graph
            for _ in range(warmup):
                fn(*samples)
        torch.cuda.current_stream().wait_stream(side)
        # What the warm-ups cached on their stream cannot be handed back while the capture runs: hand it back now.
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = fn(*samples)

    def replay(*args):
        with torch.no_grad():
            for static, given in zip(samples, args, strict=True):
                if static.data_ptr() != given.data_ptr():
                    static.copy_(given)
            graph.replay()
        return outputs
    return replay


CAPTURE: Callable[[Callable, tuple], Callable] = capture_cuda_graphs
CAPTURE_FORWARD: Callable[[Callable, tuple], Callable] = capture_cuda_forward


def _signature(tensor: torch.Tensor) -> tuple:
    return (tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype, tensor.device, tensor.requires_grad)


def _own(tensor):
    return tensor.clone() if isinstance(tensor, torch.Tensor) else tensor


class GraphedCalls:
    """One network call (``fn``), replayed from CUDA graphs captured per input signature.

    ``keep`` graphs are kept: an edit sees its batch size and perhaps a smaller last chunk, each with and without
    autograd (the unguided forward when ``reuse_guided_forward`` is off), four signatures that come back for every
    input image of a batch, so all four are kept; beyond that the least recently used is dropped for a new one.
    After ``max_captures`` captures, or a capture that fails, the rest of the run is eager, with a warning: a call
    whose shapes keep changing gains nothing from graphs.
    """

    def __init__(self, fn: Callable, name: str, keep: int = 4, max_captures: int = 8):
        self.fn, self.name, self.keep, self.max_captures = fn, name, keep, max_captures
        self._graphs: dict[tuple, Callable] = {}
        self._seen: set[tuple] = set()
        self._captured: set[tuple] = set()  # the signatures captured so far (for the warning)
        # per graph: the last replay's output that needs a gradient (weakly) and whether its gradient came
        self._awaiting: dict[tuple, tuple[weakref.ref, list]] = {}
        self.captures = 0
        self.replays = 0
        self.eager_while_awaiting = 0
        self.disabled: str | None = None

    def __call__(self, *args, **kwargs):
        names = tuple(sorted(kwargs))
        flat = args + tuple(kwargs[name] for name in names)
        if not self._graphable(flat):
            return self.fn(*args, **kwargs)
        autograd = torch.is_grad_enabled() and any(t.requires_grad for t in flat)
        key = (autograd, len(args), names) + tuple(_signature(t) for t in flat)
        graphed = self._graphs.get(key)
        if graphed is None:
            if key not in self._seen:  # first sighting: eager (a one-off call is not worth a capture)
                self._seen.add(key)
                return self.fn(*args, **kwargs)
            graphed = self._capture(key, flat, len(args), names, autograd)
            if graphed is None:
                return self.fn(*args, **kwargs)
        elif self._awaits_backward(key):
            self.eager_while_awaiting += 1
            return self.fn(*args, **kwargs)
        else:
            self._graphs[key] = self._graphs.pop(key)  # the most recently used: dropped last
        self.replays += 1
        outputs = pytree.tree_map(_own, graphed(*flat))
        if autograd:
            self._note_awaiting(key, outputs)
        return outputs

    def _awaits_backward(self, key: tuple) -> bool:
        entry = self._awaiting.get(key)
        return entry is not None and not entry[1][0] and entry[0]() is not None

    def _note_awaiting(self, key: tuple, outputs) -> None:
        needing = [o for o in pytree.tree_leaves(outputs) if isinstance(o, torch.Tensor) and o.requires_grad]
        if not needing:
            self._awaiting.pop(key, None)
            return
        arrived = [False]

        def gradient_arrived(grad):
            arrived[0] = True
        needing[0].register_hook(gradient_arrived)
        self._awaiting[key] = (weakref.ref(needing[0]), arrived)

    def _graphable(self, flat: tuple) -> bool:
        if self.disabled is not None or not flat:
            return False
        if not all(isinstance(t, torch.Tensor) for t in flat):
            return False
        device_type = flat[0].device.type
        if device_type not in GRAPH_DEVICE_TYPES or any(t.device != flat[0].device for t in flat):
            return False
        # The no-argument form is CUDA's in every torch version; the per-device form is newer.
        return not (torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_enabled(device_type))

    def _capture(self, key: tuple, flat: tuple, num_args: int, names: tuple, autograd: bool) -> Callable | None:
        if self.captures >= self.max_captures:
            self._disable(f"{len(self._captured)} input shapes in one run (with and without gradients counted "
                          f"apart), {self.captures} captures")
            return None
        while len(self._graphs) >= self.keep:
            oldest = next(iter(self._graphs))
            self._graphs.pop(oldest)
            self._awaiting.pop(oldest, None)
        samples = tuple(t.detach().clone().requires_grad_(t.requires_grad and autograd) for t in flat)
        fn = functools.partial(_call_flat, self.fn, num_args, names)
        try:
            graphed = CAPTURE(fn, samples) if autograd else CAPTURE_FORWARD(fn, samples)
        except Exception as exc:  # noqa: BLE001 - any capture failure: keep the run going, eagerly
            self._disable(f"its capture failed ({type(exc).__name__}: {exc})")
            return None
        self.captures += 1
        self._captured.add(key)
        log.debug("cuda_graphs: captured the %s%s for inputs %s", self.name, "" if autograd else " (forward only)",
                 [tuple(t.shape) for t in flat])
        self._graphs[key] = graphed
        return graphed

    def _disable(self, why: str) -> None:
        self.disabled = why
        self.release()
        log.warning("Blended Diffusion: the %s runs without CUDA graphs for the rest of this run (the same "
                    "results, a little slower): %s", self.name, why)

    def release(self) -> None:
        """Drop the graphs and hand their memory pools back.

        ``make_graphed_callables`` keeps its graphs in reference cycles (an autograd Function class made per
        capture), so dropping ours frees nothing until the cycle collector runs; until then the pools stay
        reserved, and the next run's batch size, chosen from free memory, would come out smaller.
        """
        had_graphs = bool(self._graphs)
        self._graphs.clear()
        self._seen.clear()
        self._captured.clear()
        self._awaiting.clear()
        if had_graphs:
            gc.collect()
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()


def _call_flat(fn: Callable, num_args: int, names: tuple, *flat: Any):
    return fn(*flat[:num_args], **dict(zip(names, flat[num_args:], strict=True)))


# ------------------------------------------------------------------------------- the networks of a run

def install(unet, clip) -> None:
    """Graph ``unet``'s forward and ``clip``'s image tower (run clones: the shared models are never touched)."""
    if not isinstance(unet.__dict__.get("forward"), GraphedCalls):
        unet.forward = GraphedCalls(functools.partial(type(unet).forward, unet), "UNet")
    install_clip(clip)


def install_clip(clip) -> None:
    """Graph ``clip``'s image tower alone: a CLIP of an ensemble guides beside the run's UNet (a run clone)."""
    if clip is not None and clip.graphed_tower is None:
        clip.graphed_tower = GraphedCalls(clip.image_tower(), "CLIP image tower")


def remove(unet, clip) -> None:
    """Back to eager calls; the graphs' memory is released."""
    graphed = unet.__dict__.get("forward")
    if isinstance(graphed, GraphedCalls):
        graphed.release()
        del unet.forward
    remove_clip(clip)


def remove_clip(clip) -> None:
    """``clip``'s image tower back to eager calls, its graphs' memory released."""
    if clip is not None and clip.graphed_tower is not None:
        clip.graphed_tower.release()
        clip.graphed_tower = None


@contextlib.contextmanager
def eager_tower(clip):
    """``clip``'s image tower called eagerly meanwhile: a one-off call (the image targets' embeddings, made once
    before a run's first step) would otherwise capture a graph that keeps a slot and a memory pool for the run."""
    graphed = getattr(clip, "graphed_tower", None)
    if graphed is None:
        yield clip
        return
    clip.graphed_tower = None
    try:
        yield clip
    finally:
        clip.graphed_tower = graphed


def graphed_calls(unet, clip=None) -> list[GraphedCalls]:
    """The installed :class:`GraphedCalls` of ``unet`` and ``clip`` (for logs and tests)."""
    calls = [unet.__dict__.get("forward"), getattr(clip, "graphed_tower", None)]
    return [c for c in calls if isinstance(c, GraphedCalls)]


def summary(unet, clip=None) -> str | None:
    """'UNet 1 captured / 12 replayed, ...' for benchmark rows (None when no graphs are installed), so a table
    never shows an eager fallback as a graphed figure."""
    calls = graphed_calls(unet, clip)
    if not calls:
        return None
    return "; ".join(f"{c.name} {c.captures} captured / {c.replays} replayed"
                     + (f" (eager since: {c.disabled})" if c.disabled else "") for c in calls)
