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
