"""CUDA graphs of the networks (``cuda_graphs``): the bookkeeping, on the CPU, with a replay emulator; and what a
capture needs of the networks (no value read back, nothing copied from the host), checked without a GPU.

A real capture needs a CUDA device. What can go wrong around one is visible without it: a graph replays into
the same input, output and gradient buffers every time, so anything that keeps a graph's output past the next
replay, or a per-step value baked into the graph, gives different numbers. :func:`emulated_capture` reproduces
exactly those semantics (static buffers, outputs and gradients returned as aliases of them, the most recent
replay's activations used by the backward); whole guided runs through it must give eager's bits.
"""

from __future__ import annotations

import gc
import logging
import weakref

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from blended import cuda_graphs, fast_paths
from blended.augment import AugmentationSettings
from blended.errors import BlendedInputError
from blended.fast_paths import FastPathOptions, parse_preset
from blended.guidance import GuidanceObjective, GuidanceSettings
from blended.sampler import SamplerSettings, sample_results
from conftest import tiny_clip, tiny_unet


def emulated_capture(fn, samples, label: str = "emulated graph"):
    """``torch.cuda.make_graphed_callables``'s contract on any device: inputs copied into static buffers,
    outputs and input gradients written into buffers allocated once and returned as detached aliases.

    Each replay (forward or backward) runs inside a profiler range named ``label``, so the host work that
    graphs would leave (the ops outside those ranges) can be counted.
    """
    static_inputs = samples
    state = {"outputs": None, "static_outputs": None, "static_grads": None, "spec": None}

    class Replay(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            with torch.no_grad():
                for static, given in zip(static_inputs, inputs, strict=True):
                    if static.data_ptr() != given.data_ptr():
                        static.copy_(given)
            with torch.enable_grad(), torch.profiler.record_function(label):
                flat, state["spec"] = pytree.tree_flatten(fn(*static_inputs))
            state["outputs"] = flat
            if state["static_outputs"] is None:
                state["static_outputs"] = [o.detach().clone() for o in flat]
            else:
                for static, out in zip(state["static_outputs"], flat, strict=True):
                    static.copy_(out.detach())
            return tuple(o.detach() for o in state["static_outputs"])

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, *grads):
            pairs = [(o, g) for o, g in zip(state["outputs"], grads, strict=True) if o.requires_grad]
            wanted = [i for i in static_inputs if i.requires_grad]
            with torch.profiler.record_function(label):
                computed = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                               allow_unused=True)
            if state["static_grads"] is None:
                state["static_grads"] = [None if g is None else g.detach().clone() for g in computed]
            else:
                for static, g in zip(state["static_grads"], computed, strict=True):
                    if static is not None:
                        static.copy_(g)
            returned, it = [], iter(state["static_grads"])
            for i in static_inputs:
                g = next(it) if i.requires_grad else None
                returned.append(None if g is None else g.detach())
            return tuple(returned)

    def graphed(*flat):
        out = Replay.apply(*flat)
        return pytree.tree_unflatten(list(out), state["spec"])

    return graphed


def emulated_forward_capture(fn, samples, label: str = "emulated graph"):
    """A forward-only capture's contract (``cuda_graphs.capture_cuda_forward``): inputs copied into static
    buffers, the outputs written into buffers allocated once and returned themselves."""
    outputs = []

    def replay(*args):
        with torch.no_grad(), torch.profiler.record_function(label):
            for static, given in zip(samples, args, strict=True):
                if static.data_ptr() != given.data_ptr():
                    static.copy_(given)
            flat, spec = pytree.tree_flatten(fn(*samples))
            if not outputs:
                outputs.extend(o.clone() for o in flat)
            else:
                for static, out in zip(outputs, flat, strict=True):
                    static.copy_(out)
        return pytree.tree_unflatten(list(outputs), spec)
    return replay


def emulate_graphs(monkeypatch, module=cuda_graphs) -> list:
    """Graph CPU calls through the emulators (in ``module``: ComfyUI loads the pack's own copy of
    ``blended.cuda_graphs``); returns the list of captures made, each ('autograd' or 'forward', the shapes)."""
    captured = []

    def capture(fn, samples):
        captured.append(("autograd", [tuple(s.shape) for s in samples]))
        return emulated_capture(fn, samples)

    def capture_forward(fn, samples):
        captured.append(("forward", [tuple(s.shape) for s in samples]))
        return emulated_forward_capture(fn, samples)
    monkeypatch.setattr(module, "GRAPH_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(module, "CAPTURE", capture)
    monkeypatch.setattr(module, "CAPTURE_FORWARD", capture_forward)
    return captured


@pytest.fixture
def emulated(monkeypatch):
    return emulate_graphs(monkeypatch)


@pytest.fixture(scope="module")
def models():
    return tiny_unet(), tiny_clip()


def _run(unet, clip, diffusion, options: FastPathOptions, batch=2, steps=3, views=4, **sampler):
    size = unet.config.image_size
    gen = torch.Generator().manual_seed(0)
    init = torch.rand(1, 3, size, size, generator=gen) * 2 - 1
    mask = torch.zeros(1, 1, size, size)
    mask[..., 16:48, 12:40] = 1
    settings = SamplerSettings(skip_timesteps=diffusion.num_timesteps - steps, **sampler)
    settings = fast_paths.sampler_settings_with(settings, options)
    with fast_paths.run_clones(unet, clip, options) as (unet_run, clip_run):
        guidance = fast_paths.guidance_settings_with(
            GuidanceSettings(range_lambda=50.0, background_l2_lambda=100.0,
                             augmentations=AugmentationSettings(num_views=views)), options)
        objective = GuidanceObjective(clip_run, clip_run.text_embedding("a red rock"), mask, init, guidance, seed=5)
        trace = []
        pred, _ = sample_results(unet_run, diffusion, objective, init, mask, list(range(batch)), seed=7,
                                 settings=settings, on_step=lambda i, out: trace.append(out["grad"].clone()))
        calls = [(c.name, c.captures, c.replays, c.disabled or c.eager_while_awaiting)
                 for c in cuda_graphs.graphed_calls(unet_run, clip_run)]
    return pred, trace, calls


@pytest.mark.parametrize("preset, sampler, unet_graphs", [
    ("bf16+reuse", {}, 1),                       # the fast path's shape: one grad-enabled UNet forward per step
    ("fp32", {}, 2),                             # the faithful numerics: the unguided forward gets its own graph
    ("bf16+reuse+ckpt+clip_ckpt", {"method": "ddim"}, 1),  # recomputation inside the captured backward
])
def test_a_run_through_replayed_graphs_gives_eagers_bits(models, diffusion, emulated, preset, sampler, unet_graphs):
    unet, clip = models
    eager_pred, eager_grads, eager_calls = _run(unet, clip, diffusion, parse_preset(preset), steps=4, **sampler)
    pred, grads, calls = _run(unet, clip, diffusion, parse_preset(preset + "+cuda_graphs"), steps=4, **sampler)
    assert eager_calls == []
    # the first step is eager (a call seen once is not captured), the second captures, every later one replays
    assert calls == [("UNet", unet_graphs, 3 * unet_graphs, 0), ("CLIP image tower", 1, 3, 0)]
    assert sorted(kind for kind, _ in emulated) == ["autograd"] * 2 + ["forward"] * (unet_graphs - 1)
    assert torch.equal(pred, eager_pred)
    assert all(torch.equal(a, b) for a, b in zip(grads, eager_grads, strict=True))
    assert not eager_grads[-1].eq(0).all()  # guidance did act


def test_the_emulator_reuses_its_buffers_and_graphed_calls_hand_out_copies(models, emulated):
    """The harness must be able to fail: a graph's raw outputs are overwritten by the next replay."""
    unet = models[0]
    size = unet.config.image_size
    x1 = torch.randn(2, 3, size, size, requires_grad=True)
    x2 = torch.randn(2, 3, size, size, requires_grad=True)
    t = torch.full((2,), 500.0)
    raw = emulated_capture(lambda x, ts: unet(x, ts), (x1.detach().clone().requires_grad_(), t.clone()))
    first = raw(x1, t)
    kept = first.clone()
    raw(x2, t)
    assert not torch.equal(first, kept)  # the raw output was overwritten

    calls = cuda_graphs.GraphedCalls(lambda x, ts: unet(x, ts), "UNet")
    calls(x2, t)  # seen once: eager
    first = calls(x1, t)
    kept = first.clone()
    torch.autograd.grad(first.sum(), x1)  # its backward done, the graph may be replayed while `first` lives on
    second = calls(x2, t)
    assert torch.equal(first, kept) and not torch.equal(second, kept)
    assert calls.captures == 1 and calls.replays == 2
    with torch.no_grad():
        assert torch.equal(unet(x1, t), first)


def test_graphed_calls_capture_per_input_signature_and_fall_back_to_eager(models, emulated, caplog):
    unet = models[0]
    size = unet.config.image_size
    calls = cuda_graphs.GraphedCalls(lambda x, ts: unet(x, ts), "UNet", keep=2, max_captures=3)

    def x(batch, grad=True):
        return torch.randn(batch, 3, size, size, requires_grad=grad)

    def t(batch):
        return torch.full((batch,), 500.0)
    calls(x(2), t(2))
    assert calls.captures == 0  # seen once: eager
    calls(x(2), t(2))
    calls(x(2), t(2))
    assert calls.captures == 1 and calls.replays == 2
    calls(x(1), t(1))
    calls(x(1), t(1))  # a smaller last chunk: a second graph
    assert calls.captures == 2 and len(calls._graphs) == 2
    with torch.no_grad():  # the same shapes without autograd: a forward-only graph, dropping the oldest
        calls(x(2), t(2))
        calls(x(2), t(2))
    assert calls.captures == 3 and len(calls._graphs) == 2 and [k for k, _ in emulated] == [
        "autograd", "autograd", "forward"]
    replays = calls.replays
    with torch.autocast("cpu", dtype=torch.bfloat16):
        calls(x(1), t(1))  # autocast around the call: eager (a graph would bake its casts)
    assert calls.captures == 3 and calls.replays == replays
    with caplog.at_level(logging.WARNING, logger="blended.cuda_graphs"):
        calls(x(3), t(3))
        out = calls(x(3), t(3))  # past max_captures: eager for the rest of the run
    assert calls.captures == 3 and "3 input shapes in one run" in calls.disabled
    assert "runs without CUDA graphs for the rest of this run" in caplog.text and out.shape[0] == 3
    calls(x(1), t(1))
    assert calls.replays == replays


def test_a_graph_is_not_replayed_while_its_last_output_awaits_its_gradient(models, emulated):
    """Two grad-enabled calls before one backward: a second replay would overwrite the activations the first
    one's backward reads. The second call runs eagerly, and both gradients are right."""
    unet = models[0]
    size = unet.config.image_size
    t = torch.full((1,), 500.0)
    xs = [torch.randn(1, 3, size, size, requires_grad=True) for _ in range(3)]

    def eager_grad(x):
        x = x.detach().requires_grad_(True)
        return torch.autograd.grad(unet(x, t).square().sum(), x)[0]
    calls = cuda_graphs.GraphedCalls(lambda x, ts: unet(x, ts), "UNet")
    calls(xs[0], t)  # seen once: eager
    first, second = calls(xs[0], t), calls(xs[1], t)
    assert calls.replays == 1 and calls.eager_while_awaiting == 1
    g0, g1 = torch.autograd.grad((first.square().sum(), second.square().sum()), (xs[0], xs[1]))
    assert torch.equal(g0, eager_grad(xs[0])) and torch.equal(g1, eager_grad(xs[1]))
    third = calls(xs[2], t)  # the first one's gradient came: replays again
    assert calls.replays == 2 and torch.equal(torch.autograd.grad(third.square().sum(), xs[2])[0], eager_grad(xs[2]))
    calls(xs[0], t)
    calls(xs[1], t)  # the previous output was dropped without a backward: nothing waits for it any more
    assert calls.replays == 4 and calls.eager_while_awaiting == 1


def test_a_failed_capture_leaves_the_run_eager_with_a_warning(models, monkeypatch, caplog):
    def failing(fn, samples):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(cuda_graphs, "GRAPH_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(cuda_graphs, "CAPTURE", failing)
    unet = models[0]
    size = unet.config.image_size
    x = torch.randn(1, 3, size, size, requires_grad=True)
    t = torch.full((1,), 500.0)
    calls = cuda_graphs.GraphedCalls(lambda x, ts: unet(x, ts), "UNet")
    with caplog.at_level(logging.WARNING, logger="blended.cuda_graphs"):
        calls(x, t)
        out = calls(x, t)  # the capture fails
        calls(x, t)
    assert "not permitted when stream is capturing" in caplog.text
    assert caplog.text.count("runs without CUDA graphs") == 1
    with torch.no_grad():
        assert torch.equal(out, unet(x, t))


def test_keyword_tensors_reach_the_network(emulated):
    seen = []

    def fn(x, t, y=None):
        seen.append(y)
        return x * t + y
    calls = cuda_graphs.GraphedCalls(fn, "net")
    x = torch.ones(2, requires_grad=True)
    calls(x, torch.full((2,), 3.0), y=torch.full((2,), 1.0))
    out = calls(x, torch.full((2,), 3.0), y=torch.full((2,), 1.0))
    assert calls.replays == 1
    assert torch.equal(out, torch.full((2,), 4.0)) and seen[-1] is not None
    grad, = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad, torch.full((2,), 3.0))


def test_on_the_cpu_the_option_runs_eagerly_and_gives_the_same_bits(models, diffusion):
    unet, clip = models
    eager_pred, _, _ = _run(unet, clip, diffusion, parse_preset("bf16+reuse"), steps=2)
    pred, _, calls = _run(unet, clip, diffusion, parse_preset("bf16+reuse+cuda_graphs"), steps=2)
    assert torch.equal(pred, eager_pred)
    assert calls == [("UNet", 0, 0, 0), ("CLIP image tower", 0, 0, 0)]


def test_graphs_live_on_the_run_clones_only(models, diffusion, emulated):
    unet, clip = models
    options = parse_preset("fast-gpu+cuda_graphs")
    with fast_paths.run_clones(unet, clip, options) as (unet_run, clip_run):
        assert len(cuda_graphs.graphed_calls(unet_run, clip_run)) == 2
        assert cuda_graphs.summary(unet_run, clip_run) == ("UNet 0 captured / 0 replayed; "
                                                           "CLIP image tower 0 captured / 0 replayed")
        assert "forward" not in unet.__dict__ and clip.graphed_tower is None
    assert cuda_graphs.graphed_calls(unet_run, clip_run) == []  # dropped with the run
    assert "forward" not in unet_run.__dict__ and cuda_graphs.summary(unet_run, clip_run) is None


def test_the_option_parses_and_refuses_compile():
    options = parse_preset("fast-gpu+cuda_graphs")
    assert options.cuda_graphs and "cuda_graphs" in options.describe()
    with pytest.raises(BlendedInputError, match="cuda_graphs and compile"):
        parse_preset("fast-gpu+cuda_graphs+compile")


# ------------------------------------------------------------------- what a capture needs of the networks

# Ops that read a device value on the host, or make a tensor from host data: neither may run inside a capture.
_NOT_CAPTURABLE = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "unique", "_unique2",
                   "lift_fresh", "lift_fresh_copy", "item"}


class _HostTraffic(TorchDispatchMode):
    """Records ops that need the host: readbacks, tensors from host data, copies from a CPU tensor to another
    device (under a fake CUDA device)."""

    def __init__(self):
        super().__init__()
        self.found, self.ops, self.names = [], 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        out = func(*args, **kwargs)
        name = func._overloadpacket.__name__
        self.names.add(name)
        inputs = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        outputs = [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        from_host = any(a.device.type == "cpu" for a in inputs) and any(o.device.type != "cpu" for o in outputs)
        if name in _NOT_CAPTURABLE or from_host:
            self.found.append(str(func))
        return out


@pytest.mark.parametrize("preset", ["faithful", "bf16", "bf16+channels_last+triton_norm+ckpt+clip_ckpt"])
def test_the_networks_forward_and_backward_need_nothing_from_the_host(models, preset, monkeypatch):
    def no_rng_state(*args, **kwargs):  # checkpointing must not read it: a capture cannot
        raise AssertionError("the RNG state was read")
    monkeypatch.setattr(torch, "get_rng_state", no_rng_state)
    unet, clip = models
    options = parse_preset(preset)
    with fast_paths.run_clones(unet, clip, options) as (unet_run, clip_run):
        size = unet.config.image_size
        x = torch.randn(2, 3, size, size, requires_grad=True)
        views = torch.randn(8, 3, clip.image_size, clip.image_size, dtype=clip_run.dtype, requires_grad=True)
        tower = clip_run.image_tower()
        with _HostTraffic() as traffic:
            out = unet_run(x, torch.full((2,), 500.0))
            torch.autograd.grad(out.float().square().sum(), x)
            embeds = tower(views)
            torch.autograd.grad(embeds.float().sum(), views)
    assert traffic.ops > 500 and {"convolution_backward", "native_group_norm_backward"} <= traffic.names
    assert traffic.found == []


def test_the_unet_forward_on_a_cuda_device_copies_nothing_from_the_host():
    """On fake CUDA tensors (no GPU needed), so every device-dependent branch takes its CUDA path."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from blended import memory_trace

    with FakeTensorMode(allow_non_fake_inputs=True):
        unet = memory_trace.unet_for_trace("tiny")
        for module in unet.modules():
            for name, param in module.named_parameters(recurse=False):
                module._parameters[name] = torch.nn.Parameter(torch.empty_like(param, device="cuda"),
                                                              requires_grad=False)
            for name, buffer in module.named_buffers(recurse=False):
                module._buffers[name] = torch.empty_like(buffer, device="cuda")
        x = torch.randn(2, 3, unet.config.image_size, unet.config.image_size, device="cuda")
        with _HostTraffic() as traffic:
            out = unet(x, torch.full((2,), 500.0, device="cuda"))
    assert out.device.type == "cuda" and traffic.ops > 500 and traffic.found == []


@pytest.mark.parametrize(("free_gib", "warmups"), [(80.0, cuda_graphs.CAPTURE_WARMUPS), (60.0, 0)])
def test_a_capture_skips_its_warmups_where_two_steps_do_not_fit(monkeypatch, free_gib, warmups):
    """Before a capture the eager call's cache is handed back (the capture could not), and the warm-ups, which
    leave a step's worth cached on their own stream, run only where the card holds two steps (with a margin):
    here a step of 30 GiB, judged by what emptying the cache freed, against 80 or 60 GiB free."""
    gib = 2 ** 30
    reserved = iter([40 * gib, 10 * gib])
    calls = []
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: next(reserved))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("synchronize"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * gib), 80 * gib))
    assert cuda_graphs.warmups_that_fit(torch.device("cuda", 0)) == warmups
    assert calls == ["synchronize", "empty_cache"]


def test_an_edit_runs_with_the_models_device_current(models, diffusion, monkeypatch):
    # Triton launches on CUDA's current device and a graph captures on its streams, whatever device the tensors
    # are on: an edit on a second GPU makes that GPU current for its device work, and restores the old one after.
    # The context is made without entering it, so which device it selects is checked without a GPU.
    import contextlib

    from blended import devices, sampler

    assert isinstance(devices.made_current("cuda:1"), torch.cuda.device) and devices.made_current("cuda:1").idx == 1
    assert isinstance(devices.made_current("cpu"), contextlib.nullcontext)
    current, seen = [], []

    @contextlib.contextmanager
    def recording(device):
        current.append(torch.device(device))
        yield
        current.pop()

    def watched_sample_results(*args, **kwargs):
        seen.append(list(current))
        return real_sample_results(*args, **kwargs)

    real_sample_results = sampler.sample_results
    monkeypatch.setattr(sampler, "made_current", recording)
    monkeypatch.setattr(sampler, "sample_results", watched_sample_results)
    unet, clip = models
    size = unet.config.image_size
    image, mask = torch.rand(1, size, size, 3), torch.zeros(1, size, size)
    mask[:, 8:40, 8:40] = 1
    settings = SamplerSettings(skip_timesteps=diffusion.num_timesteps - 1, batch_size=1)
    sampler.edit_image(image, mask, unet, diffusion, clip, ["a red rock"], seed=1, num_results=2, settings=settings,
                       device="cpu")
    assert seen == [[torch.device("cpu")]] * 2 and current == []


def test_releasing_frees_graphs_kept_in_reference_cycles_at_once(monkeypatch):
    """torch's graphed callables sit in reference cycles; their memory must not wait for the cycle collector."""
    class CycleGraph:  # stands for make_graphed_callables' result: a callable in a reference cycle
        def __init__(self, fn):
            self.fn, self.me = fn, self

        def __call__(self, *args):
            return self.fn(*args)
    alive = []
    monkeypatch.setattr(cuda_graphs, "GRAPH_DEVICE_TYPES", ("cpu",))

    def capture(fn, samples):
        graph = CycleGraph(fn)
        alive.append(weakref.ref(graph))
        return graph
    monkeypatch.setattr(cuda_graphs, "CAPTURE", capture)
    calls = cuda_graphs.GraphedCalls(lambda x: x * 2, "net")
    x = torch.ones(3, requires_grad=True)
    calls(x)
    calls(x)
    assert len(alive) == 1 and alive[0]() is not None
    gc.disable()
    try:
        calls.release()
        assert alive[0]() is None, "the released graph is still alive"
    finally:
        gc.enable()
