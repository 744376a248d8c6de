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
