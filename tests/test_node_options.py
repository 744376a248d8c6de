"""The Speed node's options run through ComfyUI, keep the background exact and leave the loader's cached models
exactly as loaded."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
from test_node_errors import box_mask, empty_image, graph, solid_mask

import harness

pytestmark = pytest.mark.comfy


def model_state(module: torch.nn.Module) -> dict:
    """Everything a run could leave behind on a module: its tensors (values, dtype, layout) and its options."""
    tensors = list(module.named_parameters()) + list(module.named_buffers())  # non-persistent buffers too
    return {
        "tensors": {name: (t.detach().clone(), t.dtype, t.stride()) for name, t in tensors},
        "parameters": [id(t) for _, t in tensors],
        "options": {k: getattr(module, k, None) for k in ("autocast_dtype", "gradient_checkpointing",
                                                           "_compiled_call_impl")},
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert after["parameters"] == before["parameters"] and after["options"] == before["options"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, (value, dtype, stride) in before["tensors"].items():
        now, now_dtype, now_stride = after["tensors"][name]
        assert (now_dtype, now_stride) == (dtype, stride), name
        assert torch.equal(now, value), name


# Each Speed node precision choice -> (FastPathOptions.precision, .precision_scheme); "auto" as on the CPU.
EXPECTED_PRECISIONS = {
    "auto": ("fp32", "autocast"),
    "fp32": ("fp32", "autocast"),
    "fp16 torso": ("fp16", "torso"),
    "bf16 torso": ("bf16", "torso"),
    "bf16 autocast": ("bf16", "autocast"),
    "fp16 autocast": ("fp16", "autocast"),
}


def record_run_options(comfy_inprocess, monkeypatch) -> list:
    """The FastPathOptions each Sampler run applies to its clones, in the order of the runs."""
    chosen = []
    fast_paths = comfy_inprocess.pack_module("sampler").fast_paths
    run_clones = fast_paths.run_clones
    monkeypatch.setattr(fast_paths, "run_clones", lambda unet, clip, opts, *a, **k: (
        chosen.append(opts), run_clones(unet, clip, opts, *a, **k))[1])
    return chosen


def assert_options_are(options, speed: dict) -> None:
    """``options`` hold the Speed node's widget values ``speed``: its precision choice as (dtype, scheme)."""
    assert (options.precision, options.precision_scheme) == EXPECTED_PRECISIONS[speed["precision"]]
    for name, value in speed.items():
        if name != "precision":
            assert getattr(options, name) == value, name


def test_bf16_autocast_and_channels_last_run_and_keep_background(comfy_inprocess, monkeypatch):
    """The Sampler runs what the Speed node says (every precision choice maps to its dtype and scheme) and the
    background stays exact."""
    speed = comfy_inprocess.pack_module("speed")
    assert set(speed.PRECISIONS) == set(EXPECTED_PRECISIONS)
    for choice in speed.PRECISIONS:
        assert_options_are(speed.BlendedDiffusionSpeed().build(precision=choice)[0], {"precision": choice})
    chosen = record_run_options(comfy_inprocess, monkeypatch)
    widgets = {"precision": "bf16 autocast", "channels_last": True, "reuse_guided_forward": True}
    prompt = graph(empty_image(64, 64, color=0x446688), box_mask(), speed=widgets)
    result = comfy_inprocess.run(prompt)
    assert len(chosen) == 1
    assert_options_are(chosen[0], widgets)
    images = result.tensors["sampler"][0][0]
    assert images.shape == (1, 64, 64, 3) and torch.isfinite(images).all()
    expected = torch.tensor([0x44, 0x66, 0x88]) / 255.0
    torch.testing.assert_close(images[0, 0, 0], expected, atol=1e-6, rtol=0)
    # the shared model is left usable for a faithful run afterwards
    faithful = comfy_inprocess.run(graph(empty_image(), solid_mask(1.0)))
    assert faithful.tensors["sampler"][0][0].shape == (1, 64, 64, 3)


@pytest.mark.parametrize("speed", [
    {"precision": "bf16 torso", "channels_last": True, "gradient_checkpointing": True},
    {"precision": "fp16 autocast", "reuse_guided_forward": True},
], ids=["torso+channels_last+ckpt", "autocast+reuse"])
def test_speed_options_leave_the_loaders_cached_models_unchanged(comfy_inprocess, monkeypatch, speed):
    """The options apply to clones for the run (the options the Speed node says): the loader's cached UNet and
    CLIP are the same objects, with the same tensors bit for bit (dtype and layout too) and the same options,
    after a run as before it."""
    faithful_prompt = graph(empty_image(), solid_mask(1.0))
    first = comfy_inprocess.run(faithful_prompt)
    unet, clip = first.tensors["unet"][0][0], first.tensors["clip"][0][0]
    before = (model_state(unet.unet), model_state(clip.clip.model))

    chosen = record_run_options(comfy_inprocess, monkeypatch)
    sped = comfy_inprocess.run(graph(empty_image(), solid_mask(1.0), speed=speed))
    assert len(chosen) == 1
    assert_options_are(chosen[0], speed)
    assert sped.tensors["unet"][0][0] is unet and sped.tensors["clip"][0][0] is clip  # the cached loader outputs
    assert_same_state(before[0], model_state(unet.unet))
    assert_same_state(before[1], model_state(clip.clip.model))

    # and a faithful run afterwards gives exactly what it gave before the sped-up run
    again = comfy_inprocess.run(faithful_prompt)
    torch.testing.assert_close(again.tensors["sampler"][0][0], first.tensors["sampler"][0][0], atol=0, rtol=0)


def test_speed_node_defaults_are_the_samplers_defaults_on_the_cpu(comfy_inprocess):
    """On the CPU an unconnected speed input and a Speed node left at its defaults give the same images, bit for
    bit (both are the original's settings there)."""
    plain = comfy_inprocess.run(graph(empty_image(), solid_mask(1.0), seed=3))
    sped = comfy_inprocess.run(graph(empty_image(), solid_mask(1.0), seed=3, speed={}))
    torch.testing.assert_close(sped.tensors["sampler"][0][0], plain.tensors["sampler"][0][0], atol=0, rtol=0)


def test_without_a_speed_node_a_cuda_gpu_runs_the_measured_fastest_path(comfy_inprocess, monkeypatch):
    speed = comfy_inprocess.pack_module("speed")
    mm = speed.bridge.mm
    monkeypatch.setattr(mm, "get_torch_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(mm, "should_use_bf16", lambda *args, **kwargs: True)
    assert speed.default_speed_options() == speed.fast_paths.FASTEST_GPU
    assert (speed.default_speed_options().describe()
            == "bf16-autocast+channels_last+reuse+triton_norm+triton_clip+cuda_graphs+cudnn_benchmark")
    # Without the triton package (common on Windows): the same less the Triton kernels and channels_last.
    find_spec = importlib.util.find_spec
    with monkeypatch.context() as patch:
        patch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
        assert speed.default_speed_options() == speed.fast_paths.FASTEST_GPU_WITHOUT_TRITON
        assert speed.default_speed_options().describe() == "bf16-autocast+reuse+cuda_graphs+cudnn_benchmark"
    # An AMD card (ROCm's torch reports it as "cuda"): the generic fast path, nothing measured only on NVIDIA.
    with monkeypatch.context() as patch:
        patch.setattr(torch.version, "hip", "6.4.0", raising=False)
        assert speed.default_speed_options().describe() == "bf16-autocast+reuse"
    # A GPU without bf16: the Speed node's own defaults, i.e. the original's fp16 torso.
    monkeypatch.setattr(mm, "should_use_bf16", lambda *args, **kwargs: False)
    monkeypatch.setattr(mm, "should_use_fp16", lambda *args, **kwargs: True)
    assert speed.default_speed_options() == speed.speed_options() == speed.fast_paths.PRESETS["original-gpu"]
    monkeypatch.undo()
    assert mm.get_torch_device().type == "cpu" and speed.default_speed_options().is_faithful


def test_the_speed_tooltips_name_the_default_the_sampler_runs(comfy_inprocess):
    """The Speed node's defaults are the original's settings (FAITHFUL) with precision 'auto'; what the Sampler
    runs without one is named from fast_paths.FASTEST_GPU itself, in the Sampler's and the Speed node's texts."""
    speed = comfy_inprocess.pack_module("speed")
    sampler = comfy_inprocess.pack_module("sampler")
    fast_paths = speed.fast_paths
    assert speed.DEFAULTS == {"precision": "auto", "reuse_guided_forward": False, "channels_last": False,
                              "gradient_checkpointing": False, "compile": False, "clip_checkpointing": False,
                              "single_resample": False, "triton_kernels": False, "cuda_graphs": False,
                              "cudnn_benchmark": False}
    assert speed.speed_options(precision="fp32") == fast_paths.FAITHFUL
    inputs = speed.BlendedDiffusionSpeed.INPUT_TYPES()
    assert set(speed.DEFAULTS) == set(inputs["required"]) | set(inputs["optional"])
    # Every option has words, so a setting that turns a new one on is named in full.
    named = set(speed._OPTION_WORDS) | set(speed._PRECISION_FIELDS)
    assert named == {field.name for field in dataclasses.fields(fast_paths.FastPathOptions)}
    assert speed.describe_options(fast_paths.FASTEST_GPU) == (
        "bf16 autocast, one UNet forward per step, channels_last, the pack's Triton kernels, CUDA graphs and "
        "cudnn_benchmark")
    assert speed.describe_options(fast_paths.FASTEST_GPU_WITHOUT_TRITON) == (
        "bf16 autocast, one UNet forward per step, CUDA graphs and cudnn_benchmark")
    assert speed.describe_options(fast_paths.FAITHFUL) == "fp32"
    sampler_inputs = sampler.BlendedDiffusionSampler.INPUT_TYPES()
    for text in (sampler.BlendedDiffusionSampler.DESCRIPTION, sampler_inputs["optional"]["speed"][1]["tooltip"],
                 speed.BlendedDiffusionSpeed.DESCRIPTION):
        assert speed.DEFAULT_SPEED in text
        assert "one model forward" not in text


RANK_COLORS = [0xFF2020, 0x2040FF, 0x20C040]


def _rank_prompt(mode):
    g = harness.graph_builder()
    clip_node = g.node("BlendedDiffusion_LoadCLIP", clip_name=harness.CLIP_TINY_NAME, dtype="float32")
    a, b, c = (empty_image(48, 40, color=color)(g) for color in RANK_COLORS)
    abc = g.node("ImageBatch", image1=g.node("ImageBatch", image1=a, image2=b).out(0), image2=c)
    rank = g.node("BlendedDiffusion_CLIPRank", id="rank", images=abc.out(0), clip=clip_node.out(0),
                  prompt="a red rock", top_k=2, mode=mode)
    g.node("PreviewImage", images=rank.out(1))
    g.node("PreviewAny", source=rank.out(2))
    return g.finalize()


# True/False: what a workflow saved before the mode choice holds in that slot (the former "normalized" switch).
@pytest.mark.parametrize("mode, library_mode", [("original", "original"), ("guidance view", "guidance view"),
                                                (True, "guidance view"), (False, "original")])
def test_clip_rank_node_sorts_best_first_and_reports_scores(comfy_inprocess, mode, library_mode):
    """Any IMAGE batch in, sorted by CLIP distance out; the expectation is computed with the library directly."""
    from blended.clip_model import load_guidance_clip
    from blended.rank import clip_scores

    result = comfy_inprocess.run(_rank_prompt(mode))
    ranked, top_k, scores = (result.tensors["rank"][i][0] for i in range(3))

    images = torch.stack([torch.tensor([(c >> 16) & 255, (c >> 8) & 255, c & 255]) / 255.0 for c in RANK_COLORS])
    images = images[:, :, None, None].expand(-1, -1, 40, 48)
    clip = load_guidance_clip(path=harness.TINY_MODELS[1][2])
    with torch.no_grad():
        distances = clip_scores(clip, images, "a red rock", mode=library_mode)
    expected_order = torch.argsort(distances)
    expected = images[expected_order].movedim(1, -1)
    torch.testing.assert_close(ranked, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(top_k, expected[:2], atol=1e-6, rtol=0)
    lines = scores.splitlines()
    assert len(lines) == 3
    for rank, index in enumerate(expected_order.tolist()):
        assert lines[rank] == f"{rank + 1}. image {index}: {float(distances[index]):.4f}"


def test_clip_rank_node_refuses_an_unknown_mode(comfy_inprocess):
    with pytest.raises(Exception, match="mode must be one of"):
        comfy_inprocess.run(_rank_prompt("best"))


def test_batch_size_zero_sizes_the_batch_from_free_memory(comfy_inprocess, caplog):
    """batch_size 0 asks ComfyUI for the free memory; the results are those of an explicit batch size."""
    import logging

    mask = solid_mask(1.0)
    with caplog.at_level(logging.INFO):
        auto = comfy_inprocess.run(graph(empty_image(), mask, num_results=2, batch_size=0)).tensors["sampler"][0][0]
    assert any("in batches of 2 (auto)" in r.getMessage() for r in caplog.records)  # the CPU has room for both
    one = comfy_inprocess.run(graph(empty_image(), mask, num_results=2, batch_size=1)).tensors["sampler"][0][0]
    assert auto.shape == (2, 64, 64, 3)
    # float32 batch effects of the conv kernels only, far below one 8-bit grey level
    torch.testing.assert_close(auto, one, atol=1 / 255, rtol=0)


def test_auto_batch_size_counts_the_triton_paths_smaller_peak(comfy_inprocess, monkeypatch):
    """With the Sampler's CUDA default (Triton kernels in channels_last) an 80 GB card runs 64 results as two
    batches of 32 (batch 64 did not fit on an H100); its default without Triton (bf16 autocast, one UNet forward,
    2.27 GiB per result measured) as three of 22; the original's fp16 torso, by its saved tensors, 5 of 13."""
    from types import SimpleNamespace

    sampler = comfy_inprocess.pack_module("sampler")
    monkeypatch.setattr(sampler.bridge.mm, "get_free_memory", lambda *args, **kwargs: 77 * (1 << 30))
    model = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(image_size=256)))
    fast_paths = sampler.fast_paths
    assert sampler._auto_batch_size(model, torch.device("cpu"), 64, fast_paths.FASTEST_GPU) == 32
    assert sampler._auto_batch_size(model, torch.device("cpu"), 64, fast_paths.FASTEST_GPU_WITHOUT_TRITON) == 22
    assert sampler._auto_batch_size(model, torch.device("cpu"), 64, fast_paths.PRESETS["original-gpu"]) == 13
    # channels_last without the Triton kernels has no measured figure: the saved-tensor estimate
    channels_last = dataclasses.replace(fast_paths.FASTEST_GPU_WITHOUT_TRITON, channels_last=True)
    assert sampler._auto_batch_size(model, torch.device("cpu"), 64, channels_last) == 13


def test_the_models_load_with_room_for_the_batch_by_the_runs_own_estimate(comfy_inprocess, monkeypatch):
    """ComfyUI frees memory for the weights and what a batch adds; that is the same per-result peak the auto batch
    counts for the run's options (the Triton path's measured 1.25 GiB, not a fixed 3.4 GiB in low precision, which
    unloaded other nodes' models for nothing)."""
    sampler = comfy_inprocess.pack_module("sampler")
    asked, expected = [], []
    real_load = sampler.bridge.load_for_sampling
    monkeypatch.setattr(sampler.bridge, "load_for_sampling", lambda patchers, memory: asked.append(memory) or
                        real_load(patchers, memory))
    monkeypatch.setattr(sampler.fast_paths, "clone_bytes", lambda *args: 0)
    for seed, preset in enumerate(("faithful", "bf16+reuse")):  # a seed each, or ComfyUI reuses the first run
        options = sampler.fast_paths.parse_preset(preset)
        monkeypatch.setattr(sampler, "default_speed_options", lambda options=options: options)
        result = comfy_inprocess.run(graph(empty_image(), box_mask(), respacing="4", num_results=3, batch_size=2,
                                           seed=seed))
        image_size = result.tensors["unet"][0][0].unet.config.image_size
        clip = result.tensors["clip"][0][0].clip
        run = sampler.for_clip(options, clip)  # the run's CLIP on its 1 view, as the Sampler counts it
        expected.append(2 * sampler.per_result_bytes(image_size, run, sampler.guiding_clips(clip, 1, [], run))
                        + (1 << 30))
    assert asked == expected and expected[0] != expected[1]


def test_clip_loader_activation_picks_quickgelu_or_gelu(comfy_inprocess):
    """The weights cannot show CLIP's MLP activation: quick_gelu (OpenAI's, the default) is the library's default
    model; gelu (LAION-style open_clip models) builds the same weights with GELU, which embeds differently."""
    from blended.clip_model import load_guidance_clip

    clips = {}
    for activation in ("quick_gelu", "gelu"):
        g = harness.graph_builder()
        g.node("PreviewAny", source=g.node("BlendedDiffusion_LoadCLIP", id="clip", clip_name=harness.CLIP_TINY_NAME,
                                           dtype="float32", activation=activation).out(0))
        clips[activation] = comfy_inprocess.run(g.finalize()).tensors["clip"][0][0].clip
    library = load_guidance_clip(path=harness.TINY_MODELS[1][2])
    image = torch.rand(1, 3, library.image_size, library.image_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        embeds = {name: clip.encode_image(clip.normalize(image)) for name, clip in clips.items()}
        expected = library.encode_image(library.normalize(image))
    assert torch.equal(embeds["quick_gelu"], expected) and not torch.allclose(embeds["gelu"], expected)
    activations = {type(m).__name__ for m in clips["gelu"].model.modules()} - {
        type(m).__name__ for m in clips["quick_gelu"].model.modules()}
    assert activations == {"GELU"}


def _loaded_clip_and_rank_node(comfy_inprocess):
    """The tiny CLIP as Load CLIP gives it, and a CLIP Rank node to call directly."""
    g = harness.graph_builder()
    g.node("PreviewAny", source=g.node("BlendedDiffusion_LoadCLIP", id="clip", clip_name=harness.CLIP_TINY_NAME,
                                       dtype="float32").out(0))
    clip = comfy_inprocess.run(g.finalize()).tensors["clip"][0][0]
    return clip, comfy_inprocess.node_class_mappings["BlendedDiffusion_CLIPRank"]()


def test_clip_rank_node_ranks_a_grayscale_batch_like_its_rgb_copy(comfy_inprocess):
    """A 1-channel IMAGE is CLIP-ranked as the same picture in RGB; an empty batch gets the pack's input error."""
    clip, node = _loaded_clip_and_rank_node(comfy_inprocess)
    gray = torch.linspace(0, 1, 3)[:, None, None, None].expand(3, 40, 48, 1).contiguous()
    ranked_gray, _, scores_gray = node.rank(gray, clip, "a white wall", top_k=1)
    ranked_rgb, _, scores_rgb = node.rank(gray.expand(-1, -1, -1, 3), clip, "a white wall", top_k=1)
    assert ranked_gray.shape == (3, 40, 48, 1) and scores_gray == scores_rgb
    torch.testing.assert_close(ranked_gray.expand(-1, -1, -1, 3), ranked_rgb, atol=0, rtol=0)
    with pytest.raises(ValueError, match="empty image batch") as error:
        node.rank(gray[:0], clip, "a white wall", top_k=1)
    assert type(error.value).__name__ == "BlendedInputError"  # the pack's class, as ComfyUI loaded it


def test_clip_rank_node_takes_one_prompt_with_weights_and_refuses_an_empty_mask(comfy_inprocess):
    """The prompt box is one prompt: a line break is a space, and weighted parts rank by the weighted sum of their
    distances. A mask with nothing in it for some image (LoadImage's mask of a picture without alpha) would score
    those images alike, so it is refused, naming them; no prompt is refused too."""
    from blended.prompts import parse_prompt
    from blended.rank import clip_scores

    clip, node = _loaded_clip_and_rank_node(comfy_inprocess)
    images = torch.rand(3, 40, 48, 3, generator=torch.Generator().manual_seed(5))
    _, _, one_line = node.rank(images, clip, "a red rock", top_k=1)
    assert node.rank(images, clip, "a red\n  rock\n", top_k=1)[2] == one_line
    _, _, scores = node.rank(images, clip, "a red rock:1.0 | a blue sky:-0.5", top_k=1)
    with torch.no_grad():
        expected = clip_scores(clip.clip, images.movedim(-1, 1), parse_prompt("a red rock:1.0 | a blue sky:-0.5"))
    assert scores.splitlines()[0].endswith(f"{float(expected.min()):.4f}") and scores != one_line
    mask = torch.zeros(3, 40, 48)
    mask[0, 10:30, 10:30] = 1
    with pytest.raises(ValueError, match=r"mask is empty \(all 0\) for image\(s\) \[1, 2\]"):
        node.rank(images, clip, "a red rock", top_k=1, mask=mask)
    with pytest.raises(ValueError, match="needs a prompt"):
        node.rank(images, clip, " \n ", top_k=1)


def test_clip_rank_node_pairs_a_mask_per_input_with_its_group_of_results(comfy_inprocess):
    """Two pictures' masks for their two results each: the Sampler's order (m0, m0, m1, m1), as Edit Metrics
    pairs them, not ComfyUI's tiling of a short batch (m0, m1, m0, m1)."""
    clip, node = _loaded_clip_and_rank_node(comfy_inprocess)
    images = torch.rand(4, 40, 48, 3, generator=torch.Generator().manual_seed(6))
    masks = torch.zeros(2, 40, 48)
    masks[0, 5:20, 5:20] = 1
    masks[1, 20:38, 25:45] = 1
    grouped = node.rank(images, clip, "a red rock", top_k=1, mask=masks)[2]
    assert grouped == node.rank(images, clip, "a red rock", top_k=1, mask=masks.repeat_interleave(2, dim=0))[2]
    assert grouped != node.rank(images, clip, "a red rock", top_k=1, mask=masks.repeat(2, 1, 1))[2]
    with pytest.raises(ValueError, match="mask has a batch of 3 but there are 4 images: give one mask, one per image"):
        node.rank(images, clip, "a red rock", top_k=1, mask=torch.ones(3, 40, 48))


def test_cuda_graphs_run_in_comfyuis_executor_and_give_eagers_bits(comfy_inprocess, monkeypatch):
    """The Sampler node with ``cuda_graphs``, its networks replayed through the tests' graph emulator (the static
    buffers a CUDA graph reuses) inside ComfyUI's executor: inference mode around the node, autograd inside. The
    images are eager's bits, each network is captured once, and the loader's cached models keep no graph."""
    from test_cuda_graphs import emulate_graphs

    sampler = comfy_inprocess.pack_module("sampler")
    captured = emulate_graphs(monkeypatch, sampler.fast_paths.cuda_graphs)

    def run(preset, preview):  # preview only changes the cache key: ComfyUI runs the node again
        monkeypatch.setattr(sampler, "default_speed_options", lambda: sampler.fast_paths.parse_preset(preset))
        return comfy_inprocess.run(graph(empty_image(64, 64, color=0x446688), box_mask(), respacing="6", seed=4,
                                         num_results=2, batch_size=2, preview=preview))
    eager = run("bf16+reuse", True)
    assert captured == []
    graphed = run("bf16+reuse+cuda_graphs", False)
    assert [kind for kind, _ in captured] == ["autograd"] * 2  # the UNet and CLIP's image tower, once each
    torch.testing.assert_close(graphed.tensors["sampler"][0][0], eager.tensors["sampler"][0][0], atol=0, rtol=0)
    unet, clip = graphed.tensors["unet"][0][0], graphed.tensors["clip"][0][0]
    assert "forward" not in unet.unet.__dict__ and clip.clip.graphed_tower is None


def test_a_clip_lists_own_clip_runs_with_the_speed_options_too(comfy_inprocess, monkeypatch):
    """A CLIP List member loaded by its own loader guides with the run's speed options on a run clone, as the main
    CLIP does (it ran as loaded: no checkpointing, kernels or graphs): with ``cuda_graphs`` through the tests'
    emulator, its tower is captured too, the images are eager's bits, and its loader's model keeps no graph."""
    from test_cuda_graphs import emulate_graphs

    sampler = comfy_inprocess.pack_module("sampler")
    captured = emulate_graphs(monkeypatch, sampler.fast_paths.cuda_graphs)

    def run(preset, preview):  # preview only changes the cache key: ComfyUI runs the node again
        monkeypatch.setattr(sampler, "default_speed_options", lambda: sampler.fast_paths.parse_preset(preset))
        prompt = graph(empty_image(64, 64, color=0x446688), box_mask(), respacing="6", seed=4, num_results=2,
                       batch_size=2, preview=preview)
        # the same weights under another activation: a second CLIP model, with a view count of its own
        prompt["clip2"] = {"class_type": "BlendedDiffusion_LoadCLIP",
                           "inputs": {"clip_name": harness.CLIP_TINY_NAME, "dtype": "float32", "activation": "gelu"}}
        prompt["list"] = {"class_type": "BlendedDiffusion_CLIPList",
                          "inputs": {"clip": ["clip2", 0], "weight": 0.5, "num_views": 2}}
        prompt["guidance"]["inputs"]["more_clips"] = ["list", 0]
        return comfy_inprocess.run(prompt)
    eager = run("bf16+reuse", True)
    assert captured == []
    graphed = run("bf16+reuse+cuda_graphs", False)
    assert [kind for kind, _ in captured] == ["autograd"] * 3  # the UNet and both CLIPs' image towers
    torch.testing.assert_close(graphed.tensors["sampler"][0][0], eager.tensors["sampler"][0][0], atol=0, rtol=0)
    assert graphed.tensors["clip2"][0][0].clip.graphed_tower is None


def test_speed_node_runs_the_triton_kernels_and_cuda_graphs_options(comfy_inprocess, monkeypatch):
    """triton_kernels is both Triton options (the UNet's GroupNorm + SiLU, CLIP's LayerNorm and QuickGELU) and
    cuda_graphs the graph replay. Through ComfyUI's executor on the CPU, where the Triton paths run their
    plain-torch references and the graphs stay eager, the images match the Speed node without them (within
    1e-4: the references round in float32 in another order than torch's GroupNorm, over a whole run)."""
    speed = comfy_inprocess.pack_module("speed")
    options = speed.BlendedDiffusionSpeed().build(triton_kernels=True, cuda_graphs=True)[0]
    assert options.triton_norm and options.triton_clip and options.cuda_graphs
    assert speed.speed_options() == speed.speed_options(triton_kernels=False, cuda_graphs=False)
    chosen = []
    sampler = comfy_inprocess.pack_module("sampler")
    run_clones = sampler.fast_paths.run_clones
    monkeypatch.setattr(sampler.fast_paths, "run_clones", lambda unet, clip, opts, *a, **k: (
        chosen.append(opts), run_clones(unet, clip, opts, *a, **k))[1])
    plain = comfy_inprocess.run(graph(empty_image(color=0x446688), box_mask(), seed=5, speed={}))
    kernels = comfy_inprocess.run(graph(empty_image(color=0x446688), box_mask(), seed=5,
                                        speed={"triton_kernels": True, "cuda_graphs": True}))
    assert [(o.triton_norm, o.triton_clip, o.cuda_graphs) for o in chosen][-1] == (True, True, True)
    torch.testing.assert_close(kernels.tensors["sampler"][0][0], plain.tensors["sampler"][0][0], atol=1e-4, rtol=0)
