"""The Sampler sizes a batch by the run's own guiding CLIPs (nodes/sampler.py over blended.memory)."""

import pytest
from test_node_errors import box_mask, empty_image, graph

pytestmark = pytest.mark.comfy


def _memory_asked(comfy_inprocess, monkeypatch, preset: str, **widgets):
    """(the Sampler node module, the run's UNet, CLIP and options, the memory each load asked of ComfyUI) for one
    edit whose default speed is ``preset`` (the run clones' own bytes left out)."""
    sampler = comfy_inprocess.pack_module("sampler")
    asked = []
    real_load = sampler.bridge.load_for_sampling
    monkeypatch.setattr(sampler.bridge, "load_for_sampling", lambda patchers, memory: asked.append(memory) or
                        real_load(patchers, memory))
    monkeypatch.setattr(sampler.fast_paths, "clone_bytes", lambda *args: 0)
    options = sampler.fast_paths.parse_preset(preset)
    monkeypatch.setattr(sampler, "default_speed_options", lambda: options)
    result = comfy_inprocess.run(graph(empty_image(), box_mask(), respacing="4", **widgets))
    return sampler, result.tensors["unet"][0][0].unet, result.tensors["clip"][0][0].clip, options, asked


def test_the_memory_asked_counts_the_run_s_clip_and_its_views(comfy_inprocess, monkeypatch):
    """ComfyUI is asked for room for the run's CLIP (the tiny fixture, 1 view) in place of the measured figure's
    ViT-B/16 on 8 views, and the auto batch uses the same figure."""
    sampler, unet, clip, options, asked = _memory_asked(comfy_inprocess, monkeypatch, "bf16+reuse", num_results=3,
                                                        batch_size=2, seed=7)
    run_options = sampler.for_clip(options, clip)
    clips = sampler.guiding_clips(clip, 1, [], run_options)
    expected = sampler.per_result_bytes(unet.config.image_size, run_options, clips)
    assert expected != sampler.per_result_bytes(unet.config.image_size, run_options)
    assert asked == [2 * expected + (1 << 30)]


def test_the_triton_kernels_smaller_figures_count_only_where_they_run(comfy_inprocess, monkeypatch):
    """On the CPU (or MPS) the Triton options run plain torch, which keeps more: the memory asked counts the
    options without them, not the Triton figures measured on CUDA."""
    sampler, unet, clip, options, asked = _memory_asked(comfy_inprocess, monkeypatch, "fastest-gpu", num_results=2,
                                                        batch_size=1, seed=8)
    plain = sampler.dataclasses.replace(sampler.for_clip(options, clip), triton_norm=False, triton_clip=False)
    expected = sampler.per_result_bytes(unet.config.image_size, plain, sampler.guiding_clips(clip, 1, [], plain))
    assert asked == [expected + (1 << 30)]
    with_triton = sampler.for_clip(options, clip)
    assert expected > sampler.per_result_bytes(unet.config.image_size, with_triton,
                                               sampler.guiding_clips(clip, 1, [], with_triton))
