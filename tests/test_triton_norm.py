"""The triton_norm and triton_clip kernels, run by Triton's CPU interpreter against the plain-torch reference,
and compiled for the H100.

Each check runs in a fresh process (tests/triton_kernel_checks.py): Triton picks the interpreter when it
builds the kernels, which an earlier test's Triton or inductor use in this process would get in the way of. On a
GPU machine the same checks run the compiled kernels (scripts/gpu_compare.py's kernel-checks stage).
"""

from __future__ import annotations

import json
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
          "residual_layer_norm_is_the_sum_rounded_then_normalised",
          "clip_with_triton_kernels_matches_the_clip_without",
          "skip_path_gradient_is_added_inside_the_backward_kernel",
          "skip_stack_gradient_is_added_in_the_same_pass",
          "float32_output_of_a_bfloat16_input_needs_no_converted_copy",
          "the_256px_models_group_sizes_match_the_reference",
          "pair_of_maps_is_normalised_as_their_concatenation",
          "down_blocks_poolings_are_made_by_the_norm",
          "many_splits_are_merged_like_one_reduction",
          "passes_taking_many_tiles_write_what_one_tile_does",
          "attention_norm_is_group_norm_alone",
          "input_bias_is_the_norm_of_the_sum",
          "residual_sum_is_the_plain_sum_rounded_once",
          "residual_sum_reads_an_upsampled_skip_at_half_size",
          "residual_sum_leaves_the_statistics_the_norm_would_read",
          "checkpointed_networks_with_the_kernels_match_the_plain_ones")


@pytest.mark.parametrize("check", CHECKS)
def test_triton_kernels_in_the_interpreter(check):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(TESTS.parent), str(TESTS)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    done = subprocess.run([sys.executable, str(TESTS / "triton_kernel_checks.py"), check], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and f"ok {check}" in done.stdout, done.stdout + done.stderr[-4000:] + _known_cause(done)


def _known_cause(done: subprocess.CompletedProcess) -> str:
    """A hint for the one failure that is the environment's, not the kernels': Triton 3.6's interpreter (the release
    torch 2.11 installs) turns a loop bound into an int in a way numpy 2.4 and newer refuse (triton-lang/triton#9171;
    Triton 3.8 has the fix). The compiled kernels are not affected."""
    if "only 0-dimensional arrays can be converted to Python scalars" in done.stdout + done.stderr:
        return ("\nThis Triton's interpreter cannot run under numpy >= 2.4 (triton-lang/triton#9171): run the tests "
                "with `pip install 'numpy<2.4'` or a newer Triton (scripts/setup_env.sh installs one that works).")
    return ""


def test_the_checks_listed_here_are_all_the_driver_has():
    source = (TESTS / "triton_kernel_checks.py").read_text()
    assert sorted(CHECKS) == sorted(line.split("def check_")[1].split("(")[0] for line in source.splitlines()
                                    if line.startswith("def check_"))


def _hopper_cases():
    from blended.kernel_report import kernel_cases

    return kernel_cases(("bf16", "fp16", "fp32"))


@pytest.mark.parametrize("case", _hopper_cases(), ids=lambda case: case.label)
def test_kernels_compile_for_hopper(case):
    """Each kernel compiles to a cubin for sm_90 (the H100) with the compiler Triton ships, specialised as the JIT
    would for channels_last activations and ViT-B rows, in every dtype and with every optional term: the
    interpreter alone would not catch code that only the real compiler refuses. ptxas reports no register spills;
    the norm's kernels and the residual sum loop over their tiles (the passes that write a map, so that each
    program's setup serves several tiles; the residual sum, to leave partial statistics per split), CLIP's
    elementwise ones do not; and no loop holds a barrier (the split reductions' lanes each
    accumulate on their own and are merged once, after the loop)."""
    from blended.kernel_report import compile_for, ptxas_figures, sass_figures

    compiled = compile_for(case)
    assert compiled.asm["cubin"] and ".target sm_90" in compiled.asm["ptx"]
    ptxas = ptxas_figures(compiled)
    assert ptxas["spill_bytes"] == 0, ptxas["ptxas"]
    loops = sass_figures(compiled)["loops"]
    assert bool(loops) == (case.module in ("triton_norm", "triton_residual")), loops
    assert all(loop["barriers"] == 0 for loop in loops), loops


@pytest.mark.parametrize("capability", [75, 80, 86, 89, 100, 120])
def test_kernels_compile_without_spills_for_every_card_family(capability):
    """Users bring RTX 20xx to 50xx cards, A100s and B200s, not only H100s: every kernel, in every dtype and with
    every optional term, compiles for each family with the ptxas Triton would use for it (Blackwell has its own),
    and none spills registers there either (fewer registers per SM on consumer cards would show up as spills)."""
    from blended.kernel_report import CARDS, compile_for, kernel_cases, ptxas_figures

    assert set(CARDS) == {75, 80, 86, 89, 90, 100, 120}  # 90 is the test above, with its SASS checks
    spilled = {}
    for case in kernel_cases(("bf16", "fp16", "fp32")):
        compiled = compile_for(case, capability)
        assert compiled.asm["cubin"] and f".target sm_{capability}" in compiled.asm["ptx"], case.label
        figures = ptxas_figures(compiled)
        if figures["spill_bytes"]:
            spilled[case.label] = figures["ptxas"]
    assert not spilled, spilled


def test_the_checks_write_one_row_each_and_refuse_unknown_names(tmp_path):
    """The JSON rows gpu_compare's kernel-checks stage reads (there with --device cuda)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(TESTS.parent))
    rows_file = tmp_path / "rows.json"
    check = "layer_norm_weight_gradients_come_from_the_reference_when_asked"
    done = subprocess.run([sys.executable, str(TESTS / "triton_kernel_checks.py"), check, "--json", str(rows_file)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    rows = json.loads(rows_file.read_text())
    assert [(row["check"], row["ok"], row["device"]) for row in rows] == [(check, True, "cpu")]
    done = subprocess.run([sys.executable, str(TESTS / "triton_kernel_checks.py"), "no_such_check"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "no such check: no_such_check" in done.stderr


def test_a_step_compiles_the_same_few_kernels_at_every_batch_size():
    """A cold start compiles each Triton specialisation a step launches once (then Triton's on-disk cache has it).
    One guided step of the 256x256 model on fake tensors, its launches bound by Triton's own specialisation code
    for the H100: batch 1 and batch 16 launch the same specialisations (the auto batch size must not bring new
    compiles), no two of a kernel differ only in which integers are multiples of 16 (the group size and the
    split count vary with the block and the batch, and specialising on them doubled the compiles), every kernel
    of both options is among them, and each compiles for sm_90."""
    from blended import fast_paths
    from blended.kernel_specialisations import KERNELS, compile_times, launched_specialisations

    options = fast_paths.parse_preset("fast-gpu+channels_last+triton_norm+triton_clip")
    one, sixteen = (launched_specialisations(options, (batch,)) for batch in (1, 16))
    assert sorted(s.describe() for s in one) == sorted(s.describe() for s in sixteen)
    without_alignment = [s.describe().rsplit("; x16:", 1)[0] for s in one]
    assert len(set(without_alignment)) == len(without_alignment), sorted(without_alignment)
    assert {s.kernel for s in one} == {name for _, name in KERNELS}
    rows = compile_times(one)
    assert len(rows) == len(one) and all(row["compile_s"] > 0 for row in rows)


@pytest.mark.parametrize("preset", ["fast-gpu", "fast-gpu+channels_last",
                                    "fast-gpu+channels_last+triton_norm+triton_clip"])
def test_a_gpu_step_casts_no_weight_per_use(preset):
    """A run stores every weight a step applies in bf16 in bf16 once (``fast_paths.precast_run_weights``). On a
    GPU's rules, one guided step of the 256x256 model then casts no parameter: under channels_last CUDA's
    GroupNorm applies bf16 weights (200 casts a step before), the Triton kernels read every norm's in float32
    (the attention blocks' too), and CLIP's class and position embeddings are kept float32 by OpenAI's
    conversion (2)."""
    from blended import fast_paths
    from blended.kernel_specialisations import recording_launches
    from blended.memory_trace import fake_run_step
    from conftest import parameter_casts

    with fake_run_step(fast_paths.parse_preset(preset), 1, 2) as runner, recording_launches({}):
        runner()  # the first step builds what later steps reuse
        with parameter_casts() as casts:
            runner()
    assert casts.shapes == []


def test_the_kernels_launch_fewer_kernels_per_step_than_the_ops_they_replace():
    """At small batches the host's launches set a step's pace on a GPU, so the Triton path must launch fewer
    kernels than the eager ops it replaces. The norm's host code launches no torch op of its own: merging the
    split reductions' partial sums in torch took 13 small ops per norm forward and 4 per backward, and casting
    the timestep terms one more (1,767 of a 256x256 step's 3,241 launches at batch 1); a merge kernel each does
    it now, and the kernels read the timestep terms as they are. Each norm launches its two merges once and its
    passes (output; gradient sums, input gradient) once per part: twice for each of the 18 output blocks, which
    normalise their running map and the encoder's skip as two parts. The statistics pass runs only for a part
    that carries no statistics from the kernel that wrote it: each of the 42 ResBlocks' residual sums spares the
    norm after it that pass, and the 11 input blocks that end with a ResBlock spare it to the output block that
    reads their output again as its skip."""
    from blended import fast_paths
    from blended.kernel_specialisations import launches_per_step

    plain = launches_per_step(fast_paths.parse_preset("fast-gpu"))
    triton = launches_per_step(fast_paths.parse_preset("fast-gpu+channels_last+triton_norm+triton_clip"))
    assert not {"triton_norm.py", "triton_clip.py"} & set(triton["torch"]), triton["torch"]
    counts = triton["triton"]
    per_norm = {counts[name] for name in ("_stats_merge_kernel", "_backward_stats_merge_kernel")}
    per_part = {counts[name] for name in ("_forward_kernel", "_backward_stats_kernel", "_backward_kernel")}
    assert len(per_norm) == len(per_part) == 1 and next(iter(per_part)) == next(iter(per_norm)) + 18, counts
    assert counts["_residual_sum_kernel"] == 42, counts
    assert counts["_stats_kernel"] == per_part.pop() - 42 - 11, counts
    total = {name: sum(counts["torch"].values()) + sum(counts["triton"].values())
             for name, counts in (("plain", plain), ("triton", triton))}
    assert total["triton"] < total["plain"], (total, triton)
