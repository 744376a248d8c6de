"""The triton_norm kernels, run by Triton's CPU interpreter against the plain-torch reference.

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
          "unet_with_triton_norm_matches_the_unet_without")


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


# Each kernel's arguments as Triton types; pointers get the activation dtype or float32, strides may be 1.
_POINTERS = {"_stats_kernel": ("x_ptr", "partial_ptr"),
             "_forward_kernel": ("x_ptr", "y_ptr", "mean_ptr", "rstd_ptr", "w_ptr", "b_ptr", "ss_ptr"),
             "_backward_stats_kernel": ("x_ptr", "dy_ptr", "partial_ptr", "mean_ptr", "rstd_ptr", "w_ptr", "b_ptr",
                                        "ss_ptr"),
             "_backward_kernel": ("x_ptr", "dy_ptr", "dx_ptr", "mean_ptr", "rstd_ptr", "c1_ptr", "c2_ptr", "w_ptr",
                                  "b_ptr", "ss_ptr")}
_ACTIVATIONS = ("x_ptr", "y_ptr", "dy_ptr", "dx_ptr")


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("kernel", list(_POINTERS))
def test_kernels_compile_for_hopper(kernel, dtype):
    """Each kernel compiles to a cubin for sm_90 (the H100) with the compiler Triton ships, as a GPU run would
    JIT it for channels_last input (channel stride 1) with and without the timestep scale-shift: the
    interpreter alone would not catch code that only the real compiler refuses."""
    import inspect

    import triton  # a dependency of torch's Linux builds
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from blended import triton_norm

    fn = getattr(triton_norm, kernel)
    names = list(inspect.signature(fn.fn).parameters)
    for has_scale_shift in (True, False):
        constexprs = {"BLOCK_HW": 128, "BLOCK_C": 16}
        if "HAS_SCALE_SHIFT" in names:
            constexprs["HAS_SCALE_SHIFT"] = has_scale_shift
        constexprs.update({name: 1 for name in names if name.endswith("_c") or name == "stride_c"})
        signature = {name: "constexpr" if name in constexprs else
                     (f"*{dtype}" if name in _ACTIVATIONS else "*fp32") if name in _POINTERS[kernel] else "i32"
                     for name in names}
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"] and ".target sm_90" in compiled.asm["ptx"]
