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
