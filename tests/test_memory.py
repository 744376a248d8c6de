"""Batch sizing from free memory (blended/memory.py)."""

import pytest

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
