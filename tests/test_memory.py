"""Batch sizing from free memory (blended/memory.py)."""

import pytest
import torch

from blended.memory import GIB, activation_bytes_per_result, auto_batch_size


def test_batch_fills_the_free_memory_and_no_more():
    per = 4 * GIB
    assert auto_batch_size(80 * GIB, per, num_results=64) == 16  # 79 GiB usable: 19 fit -> 4 batches of 16
    assert auto_batch_size(41 * GIB, per, num_results=10) == 10
    assert auto_batch_size(21 * GIB, per, num_results=64) == 5
    assert auto_batch_size(2 * GIB, per, num_results=64) == 1   # never below one
    assert auto_batch_size(1000 * GIB, per, num_results=64, max_batch=32) == 32
    assert auto_batch_size(1000 * GIB, per, num_results=3) == 3
    with pytest.raises(ValueError):
        auto_batch_size(GIB, 0, num_results=1)


def test_batches_are_evened_out():
    # room for 24: 64 results run as 3 batches of 22 rather than 24 + 24 + 16
    assert auto_batch_size(24 * GIB + GIB, GIB, num_results=64) == 22


def test_per_result_estimate_scales_with_options():
    fp32 = activation_bytes_per_result(256)
    assert activation_bytes_per_result(256, low_precision=True) < fp32
    assert activation_bytes_per_result(256, gradient_checkpointing=True) == pytest.approx(fp32 / 4, rel=1e-6)
    assert activation_bytes_per_result(512) == pytest.approx(4 * fp32, rel=1e-6)


def test_the_triton_path_is_sized_by_its_measured_peak_and_an_80gb_card_stays_below_what_did_not_fit():
    low = activation_bytes_per_result(256, low_precision=True)
    triton = activation_bytes_per_result(256, low_precision=True, triton_kernels=True)
    assert triton < low / 3  # about half the activations of bf16 eager, whose figure is the older, larger one
    assert activation_bytes_per_result(512, low_precision=True, triton_kernels=True) == 4 * triton
    # checkpointing and fp32 keep their own estimates
    assert activation_bytes_per_result(256, low_precision=True, gradient_checkpointing=True,
                                       triton_kernels=True) < low
    assert activation_bytes_per_result(256, triton_kernels=True) == activation_bytes_per_result(256)
    # An H100 with about 77 GiB free once the models are loaded: batch 64 ran out of memory there, 32 peaked at
    # 37.1 GiB. 64 results run as two batches of 32, not one of 64.
    assert auto_batch_size(77 * GIB, triton, num_results=64) == 32
    # a 24 GB card with about 22 GiB free: 16 (which peaked at 19.6 GiB)
    assert auto_batch_size(22 * GIB, triton, num_results=64) == 16


def test_the_default_without_triton_is_sized_by_its_measured_peak():
    """bf16 autocast with one UNet forward in NCHW (the Sampler's CUDA default without the triton package) peaked
    at 37.7 GiB at batch 16 on an H100 (2.27 GiB per result): counted between the Triton path's figure and the
    saved-tensor estimate of the original's fp16 torso."""
    low = activation_bytes_per_result(256, low_precision=True)
    one_forward = activation_bytes_per_result(256, low_precision=True, autocast_one_forward=True)
    triton = activation_bytes_per_result(256, low_precision=True, triton_kernels=True)
    assert triton < one_forward < low and one_forward > 2.27 * GIB
    assert activation_bytes_per_result(512, low_precision=True, autocast_one_forward=True) == pytest.approx(
        4 * one_forward, abs=4)
    # fp32 and checkpointing keep their own estimates
    assert activation_bytes_per_result(256, autocast_one_forward=True) == activation_bytes_per_result(256)
    assert (activation_bytes_per_result(256, low_precision=True, gradient_checkpointing=True, autocast_one_forward=True)
            == activation_bytes_per_result(256, low_precision=True, gradient_checkpointing=True))
    # an H100 with about 77 GiB free: 3 batches of 22 (a peak near 52 GiB at 2.27 per result), no longer 5 of 13;
    # a 24 GB card with about 22 GiB free: 8 (about 20 GiB), no longer 4
    assert auto_batch_size(77 * GIB, one_forward, num_results=64) == 22
    assert auto_batch_size(77 * GIB, low, num_results=64) == 13
    assert auto_batch_size(22 * GIB, one_forward, num_results=64) == 8


def test_per_result_bytes_picks_each_setting_s_estimate():
    from blended import fast_paths
    from blended.memory import per_result_bytes

    low = dict(low_precision=True)
    assert per_result_bytes(256, fast_paths.FAITHFUL) == activation_bytes_per_result(256)
    assert per_result_bytes(256, fast_paths.FASTEST_GPU) == activation_bytes_per_result(256, triton_kernels=True, **low)
    assert per_result_bytes(512, fast_paths.FASTEST_GPU_WITHOUT_TRITON) == activation_bytes_per_result(
        512, autocast_one_forward=True, **low)
    assert per_result_bytes(256, fast_paths.PRESETS["original-gpu"]) == activation_bytes_per_result(256, **low)
    checkpointed = fast_paths.parse_preset("fastest-gpu+ckpt")
    assert per_result_bytes(256, checkpointed) == activation_bytes_per_result(256, gradient_checkpointing=True, **low)
    # the Triton kernels count as such only in channels_last; autocast with one forward only in NCHW
    import dataclasses

    nchw_triton = dataclasses.replace(fast_paths.FASTEST_GPU, channels_last=False)
    assert per_result_bytes(256, nchw_triton) == activation_bytes_per_result(256, autocast_one_forward=True, **low)
    channels_last = dataclasses.replace(fast_paths.FASTEST_GPU_WITHOUT_TRITON, channels_last=True)
    assert per_result_bytes(256, channels_last) == activation_bytes_per_result(256, **low)


def test_a_smaller_batch_is_about_half_evened_out():
    from blended.memory import smaller_batch_size

    assert [smaller_batch_size(b, n) for b, n in [(64, 64), (22, 64), (2, 3), (3, 3), (1, 9)]] == [32, 11, 1, 1, 1]


class _OutOfMemory(RuntimeError):
    pass


def _is_oom(exc):
    return isinstance(exc, _OutOfMemory)


def _attempts(fits_at):
    """An attempt that runs out of memory above ``fits_at``, and the batches it was called with."""
    batches = []

    def attempt(batch_size):
        batches.append(batch_size)
        if batch_size > fits_at:
            raise _OutOfMemory(f"out of memory at {batch_size}")
        return f"done at {batch_size}"

    return attempt, batches


def test_an_auto_batch_that_runs_out_of_memory_runs_again_smaller(caplog):
    import logging

    from blended.memory import run_with_smaller_batches

    attempt, batches = _attempts(fits_at=2)
    freed = []
    with caplog.at_level(logging.WARNING, logger="blended.memory"):
        result = run_with_smaller_batches(attempt, 22, 64, auto=True, is_oom=_is_oom,
                                          free_memory=lambda: freed.append(list(batches)))
    assert result == "done at 2" and batches == [22, 11, 5, 2]  # about halved, evened out over 64 results
    assert freed == [[22], [22, 11], [22, 11, 5]]  # before each new attempt, after the failed one
    assert [r.getMessage() for r in caplog.records] == [
        "Blended Diffusion: out of memory at batch_size=22 (auto); running again at 11",
        "Blended Diffusion: out of memory at batch_size=11 (auto); running again at 5",
        "Blended Diffusion: out of memory at batch_size=5 (auto); running again at 2"]
    assert all(r.levelname == "WARNING" for r in caplog.records)


@pytest.mark.parametrize("batch_size, auto, tried", [(2, False, [2]), (4, True, [4, 2, 1]), (1, True, [1])])
def test_a_batch_by_hand_or_of_one_raises_with_the_advice(caplog, batch_size, auto, tried):
    import logging

    from blended.memory import run_with_smaller_batches

    attempt, batches = _attempts(fits_at=0)
    freed = []
    with caplog.at_level(logging.ERROR, logger="blended.memory"), pytest.raises(_OutOfMemory) as err:
        run_with_smaller_batches(attempt, batch_size, 5, auto=auto, is_oom=_is_oom,
                                 free_memory=lambda: freed.append(1))
    assert batches == tried and len(freed) == len(tried) - 1
    advice = (f"Blended Diffusion ran out of memory with batch_size={tried[-1]}: lower batch_size (results do not "
              "depend on it), or connect a Speed node with gradient_checkpointing on or precision 'bf16 autocast'.")
    # The last attempt's error, with the advice the error dialog shows after its text.
    assert str(err.value) == f"out of memory at {tried[-1]}\n{advice}"
    # The error itself, so its traceback still ends where it ran out (the dialog's traceback is built from it).
    import traceback

    assert traceback.extract_tb(err.value.__traceback__)[-1].name == "attempt"
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert [r.getMessage() for r in errors] == [advice]


def test_other_errors_pass_through_at_once():
    from blended.memory import run_with_smaller_batches

    batches, freed = [], []

    def attempt(batch_size):
        batches.append(batch_size)
        raise ValueError("the mask is empty")

    with pytest.raises(ValueError, match="the mask is empty"):
        run_with_smaller_batches(attempt, 8, 64, auto=True, is_oom=_is_oom, free_memory=lambda: freed.append(1))
    assert batches == [8] and freed == []
    attempt, batches = _attempts(fits_at=64)
    assert run_with_smaller_batches(attempt, 16, 64, auto=True, is_oom=_is_oom, free_memory=freed.append) == (
        "done at 16")
    assert batches == [16] and freed == []


def _meta_clip(name):
    from blended.memory_trace import clip_for_trace

    return clip_for_trace(name)


@pytest.mark.parametrize("preset", ["faithful", "fastest-gpu", "fastest-gpu-without-triton", "original-gpu",
                                    "fast-cpu", "fast-gpu-lowmem"])
def test_vit_b16_on_8_views_keeps_the_measured_figure_exactly(preset):
    """The measured figures hold ViT-B/16 on 8 views: counted as the run's CLIP, with the options the run gives it
    (CLIP at the loader's half precision on a GPU, or following the preset), the estimate is today's, to the byte."""
    import dataclasses

    from blended import fast_paths
    from blended.memory import guiding_clips, per_result_bytes

    options = fast_paths.parse_preset(preset)
    clip = _meta_clip("ViT-B-16")
    today = activation_bytes_per_result(
        256, options.unet_dtype != torch.float32, options.gradient_checkpointing,
        triton_kernels=options.triton_norm and options.channels_last,
        autocast_one_forward=(options.precision_scheme == "autocast" and options.reuse_guided_forward
                              and not options.channels_last))
    runs = [options]
    if options.unet_dtype != torch.float32:  # the Speed node's for_clip pins CLIP to its loader's fp16
        runs.append(dataclasses.replace(options, clip_precision="fp16"))
    for run in runs:
        clips = guiding_clips(clip, 8, [], run)
        if run.clip_checkpointing:  # checkpointed CLIP keeps less than the figure's: the estimate comes down
            assert per_result_bytes(256, run, clips) < today
        else:
            assert per_result_bytes(256, run, clips) == per_result_bytes(256, run) == today




def test_the_fastest_gpu_figure_is_unchanged_at_its_measured_value():
    from blended import fast_paths
    from blended.memory import guiding_clips, per_result_bytes

    clips = guiding_clips(_meta_clip("ViT-B-16"), 8, [], fast_paths.FASTEST_GPU)
    assert per_result_bytes(256, fast_paths.FASTEST_GPU, clips) == int(1.25 * GIB)


def test_views_a_larger_clip_and_an_ensemble_raise_the_estimate_and_lower_the_auto_batch():
    """ViT-L/14 (257 tokens x 1024 wide x 24 blocks) keeps 3.3x ViT-B/16's bytes per view; 16 views (the paper's)
    twice 8's; a CLIP List member adds its own views. On an 80 GB card (77 GiB free) with the Sampler's CUDA default,
    64 results no longer run as 2 batches of 32 when the views do not fit beside them."""
    from blended import fast_paths
    from blended.memory import MIB, VIT_B16, clip_view_bytes, guiding_clips, per_result_bytes

    options = fast_paths.FASTEST_GPU
    b16, l14 = _meta_clip("ViT-B-16"), fast_paths.set_clip_precision(_meta_clip("ViT-L-14"), "fp16")  # as loaded
    base = per_result_bytes(256, options)
    view_b16 = clip_view_bytes(VIT_B16, True, triton=True)
    assert per_result_bytes(256, options, guiding_clips(b16, 16, [], options)) == base + 8 * view_b16
    l14_8 = per_result_bytes(256, options, guiding_clips(l14, 8, [], options))
    assert l14_8 - base == pytest.approx(8 * (126.66 - 38.20) * MIB, rel=0.01)  # the traced per-view figures
    ensemble = per_result_bytes(256, options, guiding_clips(b16, 8, [(l14, 32)], options))
    assert ensemble == pytest.approx(base + 32 * 126.66 * MIB, rel=0.01)
    assert auto_batch_size(77 * GIB, base, 64) == 32
    assert auto_batch_size(77 * GIB, l14_8, 64) == 32  # 39 fit
    l14_16 = per_result_bytes(256, options, guiding_clips(l14, 16, [], options))
    assert auto_batch_size(77 * GIB, l14_16, 64) == 22  # 25 fit: 3 batches of 22
    assert auto_batch_size(77 * GIB, ensemble, 64) == 13
    # the main CLIP's model listed again in the CLIP List runs as the main CLIP, on views of its own
    again = per_result_bytes(256, options, guiding_clips(b16, 8, [(b16, None)], options))
    assert again == base + 8 * view_b16


def test_clip_options_and_precision_are_counted():
    import dataclasses

    from blended import fast_paths
    from blended.memory import VIT_B16, clip_view_bytes, guiding_clips, per_result_bytes

    options = fast_paths.FASTEST_GPU
    l14 = _meta_clip("ViT-L-14")
    plain = per_result_bytes(256, options, guiding_clips(l14, 64, [], options))
    checkpointed = dataclasses.replace(options, clip_checkpointing=True)
    assert per_result_bytes(256, checkpointed, guiding_clips(l14, 64, [], checkpointed)) < plain / 3
    float32_clip = dataclasses.replace(options, clip_precision="fp32")
    assert per_result_bytes(256, float32_clip, guiding_clips(l14, 64, [], float32_clip)) > plain
    # a member loaded in float32 counts in float32 whatever the main CLIP's precision
    member = _meta_clip("ViT-B-16")
    assert member.dtype == torch.float32
    with_member = per_result_bytes(256, options, guiding_clips(l14, 64, [(member, 8)], options))
    assert with_member - plain == 8 * clip_view_bytes(VIT_B16, False, triton=True)


def test_the_clip_s_views_do_not_scale_with_the_model_s_size():
    """The figure scales with the model's area; the CLIP's views are at the CLIP's resolution: at 512 px the
    figure's own CLIP is taken off scaled, the run's CLIP added as it is."""
    from blended import fast_paths
    from blended.memory import VIT_B16, GuidingClip, per_result_bytes

    options = fast_paths.FASTEST_GPU
    measured = GuidingClip(VIT_B16, 8, True, triton=True).bytes_per_result
    clips = [GuidingClip(VIT_B16, 8, True, triton=True)]
    assert per_result_bytes(512, options, clips) == pytest.approx(
        per_result_bytes(512, options) - 3 * measured, abs=2)
    assert per_result_bytes(64, options, clips) > 0


def test_lpips_is_counted_where_it_is_on():
    from blended import fast_paths
    from blended.memory import MIB, lpips_bytes_per_result, per_result_bytes

    base = per_result_bytes(256, fast_paths.FASTEST_GPU)
    assert per_result_bytes(256, fast_paths.FASTEST_GPU, lpips=True) == base + lpips_bytes_per_result(256)
    assert lpips_bytes_per_result(256) == pytest.approx(213.5 * MIB, rel=0.01)
    assert lpips_bytes_per_result(512) == 4 * lpips_bytes_per_result(256)


def test_the_estimate_s_parts_are_logged(caplog):
    import logging

    from blended import fast_paths
    from blended.memory import guiding_clips, per_result_bytes

    with caplog.at_level(logging.DEBUG, logger="blended.memory"):
        per_result_bytes(256, fast_paths.FASTEST_GPU, guiding_clips(_meta_clip("ViT-L-14"), 16, [],
                                                                    fast_paths.FASTEST_GPU), lpips=True)
    text = caplog.records[-1].getMessage()
    assert "measured +1280 MiB" in text and "24x1024 257 tokens, 16 views" in text and "LPIPS" in text


def test_under_checkpointing_the_figures_own_clip_is_taken_off_at_the_figures_scale():
    """Checkpointing's figure is the saved set, its ViT-B/16 on 8 views included, times the checkpoint factor:
    taking that CLIP off at full size took off four times what the figure holds of it."""
    from blended import fast_paths, memory

    options = fast_paths.parse_preset("fast-gpu-lowmem")
    assert options.gradient_checkpointing
    clip = _meta_clip("ViT-B-16")
    parts = memory.per_result_parts(256, options, memory.guiding_clips(clip, 8, [], options))
    full = memory._measured_clip(True, True, False).bytes_per_result
    assert parts["measured CLIP (ViT-B/16, 8 views)"] == -int(full * memory._CHECKPOINT_FACTOR)


def test_the_triton_figures_count_only_for_towers_the_kernels_run_in(monkeypatch):
    """A ViT that clip_vision does not reproduce runs open_clip's own forward, where the Triton kernels never
    apply: counted at the plain figures."""
    from blended import fast_paths, memory

    options = fast_paths.parse_preset("fastest-gpu")
    clip = _meta_clip("ViT-B-16")
    assert options.triton_clip and memory.guiding_clip(clip, 8, options).triton
    monkeypatch.setattr(memory.clip_vision, "supports", lambda visual: False)
    assert not memory.guiding_clip(clip, 8, options).triton
