"""The triton_norm and triton_clip kernels, run by Triton's CPU interpreter against the plain-torch reference.

Each check runs in a fresh process (tests/triton_interpreter_checks.py): Triton picks the interpreter when it
builds the kernels, which an earlier test's Triton or inductor use in this process would get in the way of.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
CHECKS = ("float32_forward_and_input_gradient_match_the_reference",
          "bfloat16_input_is_computed_in_float32_and_rounded_once",
          "weight_and_timestep_gradients_come_from_the_reference_when_asked",
          "unet_with_triton_norm_matches_the_unet_without",
          "quick_gelu_float32_forward_and_input_gradient_match_the_formula",
          "quick_gelu_bfloat16_is_computed_in_float32_and_rounded_once",
          "layer_norm_float32_forward_and_input_gradient_match_torch",
          "layer_norm_bfloat16_is_openais_float32_norm_rounded_once",
          "layer_norm_weight_gradients_come_from_the_reference_when_asked",
          "clip_with_triton_kernels_matches_the_clip_without",
          "skip_path_gradient_is_added_inside_the_backward_kernel",
          "float32_output_of_a_bfloat16_input_needs_no_converted_copy")


@pytest.mark.parametrize("check", CHECKS)
def test_triton_kernels_in_the_interpreter(check):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(TESTS.parent), str(TESTS)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    done = subprocess.run([sys.executable, str(TESTS / "triton_interpreter_checks.py"), check], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and f"ok {check}" in done.stdout, done.stdout + done.stderr[-4000:]


def test_the_checks_listed_here_are_all_the_driver_has():
    source = (TESTS / "triton_interpreter_checks.py").read_text()
    assert sorted(CHECKS) == sorted(line.split("def check_")[1].split("(")[0] for line in source.splitlines()
                                    if line.startswith("def check_"))


def _assert_no_register_spills(compiled, tmp_path):
    """ptxas (the one Triton ships) on the kernel's PTX: registers only, no spills to local memory."""
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    ptx = tmp_path / "kernel.ptx"
    ptx.write_text(compiled.asm["ptx"])
    target = compiled.asm["ptx"].split(".target", 1)[1].split()[0]  # sm_90a
    done = subprocess.run([str(ptxas), "-v", "--gpu-name", target, str(ptx), "-o", str(tmp_path / "kernel.cubin")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Used" in done.stderr and " 0 bytes spill stores, 0 bytes spill loads" in done.stderr, done.stderr


# Each kernel's arguments as Triton types; pointers get the activation dtype or float32, strides may be 1.
_POINTERS = {"_stats_kernel": ("x_ptr", "partial_ptr"),
             "_forward_kernel": ("x_ptr", "y_ptr", "mean_ptr", "rstd_ptr", "w_ptr", "b_ptr", "ss_ptr"),
             "_backward_stats_kernel": ("x_ptr", "dy_ptr", "partial_ptr", "mean_ptr", "rstd_ptr", "w_ptr", "b_ptr",
                                        "ss_ptr"),
             "_backward_kernel": ("x_ptr", "dy_ptr", "dx_ptr", "mean_ptr", "rstd_ptr", "c1_ptr", "c2_ptr", "w_ptr",
                                  "b_ptr", "ss_ptr", "r_ptr")}
_ACTIVATIONS = ("x_ptr", "y_ptr", "dy_ptr", "dx_ptr", "r_ptr")


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("kernel", list(_POINTERS))
def test_kernels_compile_for_hopper(kernel, dtype, tmp_path):
    """Each kernel compiles to a cubin for sm_90 (the H100) with the compiler Triton ships, as a GPU run would
    JIT it for channels_last input (channel stride 1) with and without the timestep scale-shift (the backward
    also with the skip path's gradient to add): the interpreter alone would not catch code that only the real
    compiler refuses."""
    import inspect

    import triton  # a dependency of torch's Linux builds
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from blended import triton_norm

    fn = getattr(triton_norm, kernel)
    names = list(inspect.signature(fn.fn).parameters)
    for has_scale_shift, has_residual in ((True, False), (False, True), (False, False)):
        constexprs = {"BLOCK_HW": 128, "BLOCK_C": 16}
        if "HAS_SCALE_SHIFT" in names:
            constexprs["HAS_SCALE_SHIFT"] = has_scale_shift
        if "HAS_RESIDUAL" in names:
            constexprs["HAS_RESIDUAL"] = has_residual
        constexprs.update({name: 1 for name in names if name.endswith("_c") or name == "stride_c"})
        signature = {name: "constexpr" if name in constexprs else
                     (f"*{dtype}" if name in _ACTIVATIONS else "*fp32") if name in _POINTERS[kernel] else "i32"
                     for name in names}
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"] and ".target sm_90" in compiled.asm["ptx"]
        _assert_no_register_spills(compiled, tmp_path)


_CLIP_KERNEL_INTS = {"n": "i32", "D": "i32", "eps": "fp32"}
_CLIP_KERNEL_FLOAT32_POINTERS = ("mean_ptr", "rstd_ptr")


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("kernel", ["_gelu_forward_kernel", "_gelu_backward_kernel", "_norm_forward_kernel",
                                    "_norm_backward_kernel"])
def test_clip_kernels_compile_for_hopper(kernel, dtype, tmp_path):
    """The triton_clip kernels compile for sm_90 too, in every dtype the CLIP tower runs in (a LayerNorm's
    weights stay float32, as OpenAI's; its row width is ViT-B's 768, padded to a 1024 block)."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from blended import triton_clip

    fn = getattr(triton_clip, kernel)
    constexprs = {"BLOCK": 1024} if "gelu" in kernel else {"BLOCK_D": 1024}
    signature = {name: "constexpr" if name in constexprs else _CLIP_KERNEL_INTS.get(name) or
                 ("*fp32" if name in _CLIP_KERNEL_FLOAT32_POINTERS or name in ("w_ptr", "b_ptr") else f"*{dtype}")
                 for name in inspect.signature(fn.fn).parameters}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"] and ".target sm_90" in compiled.asm["ptx"]
    _assert_no_register_spills(compiled, tmp_path)
