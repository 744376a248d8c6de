"""scripts/gpu_compare.py's driver with stub stages: a stage's broken ``--json`` file, out-of-memory rows, and the
stages' writers, which must never leave a cut-short file. (The driver's dry run with the real stages is in
tests/test_fast_paths.py.)"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def _gpu_compare():
    spec = importlib.util.spec_from_file_location("gpu_compare", REPO / "scripts" / "gpu_compare.py")
    gpu_compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_compare)
    return gpu_compare


# Only the original's stages run: no pack stage, no profile, CPU (no kernel checks).
ONLY_THE_ORIGINAL = ["--presets", "", "--edit-presets", "", "--profile", "", "--late-presets", "",
                     "--large-batch", "0", "--device", "cpu", "--config", "tiny", "--batches", "1"]


def test_a_stage_that_leaves_its_json_file_cut_short_costs_no_later_stage(tmp_path):
    """A stage stopped by its timeout while rewriting its ``--json`` file leaves it cut short. The driver takes
    the rows the stage printed instead (here: the edit stage's), or one error row naming the stage (the step
    stage printed none), runs the stages after it and prints the table."""
    gpu_compare = _gpu_compare()
    stub = tmp_path / "original_bench.py"
    stub.write_text(
        "import json, sys, time\n"
        "path = sys.argv[sys.argv.index('--json') + 1]\n"
        "if '--edit-steps' in sys.argv:\n"
        "    print(json.dumps({'impl': 'original', 'batch': 1, 's_per_step': 0.4, 's_edit': 30.0}), flush=True)\n"
        "    open(path, 'w').write('[{\"batch\": 1, \"s_edit\"')\n"
        "else:\n"
        "    open(path, 'w').write('[{\"batch\": 1, \"s_per_step\": 0.5}, {\"batch\"')\n"
        "    time.sleep(60)  # stopped by the stage's timeout\n")
    out = tmp_path / "rows.jsonl"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = gpu_compare.main(["--original", str(stub), "--original-edit", "--results", "2", "--timeout", "3",
                                 "--budget", "120", *ONLY_THE_ORIGINAL, "--out", str(out)])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["stage"] for row in rows] == ["original-step", "original-edit"]
    assert rows[0]["timed_out"] and "--json file is not whole JSON" in rows[0]["error"]
    assert rows[1]["rc"] == 0 and rows[1]["s_edit"] == 30.0
    table = printed.getvalue().split("| run | batch |", 1)[1]
    assert "| original-step: its --json file is not whole JSON (cut short?)" in table
    assert "| original: 2 results = 2 edits of 1 (75 steps each, ranking not included) | 1 | 60.0 s in all" in table


def test_the_table_says_which_batch_ran_out_of_memory(tmp_path):
    """``--large-batch`` asks whether 64 fits: a row that ran out of memory answers no, in the table too, and a
    stage that printed it without writing its ``--json`` file keeps it."""
    gpu_compare = _gpu_compare()
    rows = [{"stage": "pack-step-fast-gpu", "batch": 16, "s_per_step": 0.4, "options": "bf16-autocast+reuse"},
            {"stage": "pack-large-batch-fast-gpu", "batch": 64, "options": "bf16-autocast+reuse",
             "out_of_memory": "CUDA out of memory"}]
    table = gpu_compare._table(rows, 64)
    assert table.splitlines()[-1] == "| pack `bf16-autocast+reuse` | 64 | out of memory | n/a | n/a | n/a | n/a |"
    stub = tmp_path / "stage.py"
    stub.write_text("import json\n"
                    "print(json.dumps({'batch': 64, 'options': 'bf16', 'out_of_memory': 'CUDA out of memory'}))\n")
    with contextlib.redirect_stdout(io.StringIO()):
        rows = gpu_compare.run_stage("pack-large-batch-bf16", [sys.executable, str(stub)],
                                     gpu_compare.Budget(120, 30), io.StringIO())
    assert [(row["batch"], row["out_of_memory"]) for row in rows] == [(64, "CUDA out of memory")]
    assert "| pack `bf16` | 64 | out of memory |" in gpu_compare._table(rows, 64)


# Run in a child process: an audit hook cannot be removed again. It records every opening of the target and every
# rename onto it.
_WRITERS = """
import json, os, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
sys.argv = [sys.argv[0]]  # the kernel checks read their device from the command line when imported
import triton_kernel_checks
from blended import benchmark

seen = []
def audit(event, args):
    if event == "open" and args[0] is not None and not isinstance(args[0], int):
        seen.append(("open", os.path.basename(os.fspath(args[0])), args[1], args[2]))
    elif event == "os.rename":
        seen.append(("rename", os.path.basename(os.fspath(args[0])), os.path.basename(os.fspath(args[1]))))
sys.addaudithook(audit)
folder = Path({folder!r})
bench_json = folder / "bench.json"
benchmark._write_json(type("Args", (), {{"json": bench_json}})(), [{{"batch": 1, "s_per_step": 0.5}}])
triton_kernel_checks.CHECKS.clear()
triton_kernel_checks.CHECKS["nothing"] = lambda: None
checks_json = folder / "checks.json"
triton_kernel_checks.main(["--json", str(checks_json)])
print(json.dumps(seen))
"""


def test_the_stages_write_their_json_file_whole_or_not_at_all(tmp_path):
    """The pack's bench and the kernel checks rewrite ``--json`` after each row. Never opening the file itself
    for writing, only renaming a whole temporary file from its folder onto it, a stage stopped at any moment
    leaves its last whole file."""
    script = _WRITERS.format(tests=str(TESTS), folder=str(tmp_path))
    env = dict(os.environ, PYTHONPATH=str(REPO), TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    for target, rows in (("bench.json", [{"batch": 1, "s_per_step": 0.5}]), ("checks.json", None)):
        written_in_place = [e for e in seen if e[0] == "open" and e[1] == target and _writes(e[2], e[3])]
        assert written_in_place == [], f"{target} was opened for writing: a stop mid-write leaves it cut short"
        renames = [e for e in seen if e[0] == "rename" and e[2] == target]
        assert renames and all(e[1] != target and e[1].endswith(".tmp") for e in renames)
        data = json.loads((tmp_path / target).read_text())
        assert data == rows if rows is not None else [row["check"] for row in data] == ["nothing"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "checks.json"]  # no temporary left


def _writes(mode, flags) -> bool:
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return bool(flags & (os.O_WRONLY | os.O_RDWR))


def test_a_stage_stopped_by_its_timeout_says_so_in_its_error_row(tmp_path):
    """A stage that printed no row before its timeout: the row says it timed out, not only its last log line."""
    gpu_compare = _gpu_compare()
    stub = tmp_path / "original_bench.py"
    stub.write_text("import sys, time\nprint('INFO loading', file=sys.stderr, flush=True)\ntime.sleep(60)\n")
    out = tmp_path / "rows.jsonl"
    with contextlib.redirect_stdout(io.StringIO()):
        gpu_compare.main(["--original", str(stub), "--timeout", "3", "--budget", "60", *ONLY_THE_ORIGINAL,
                          "--out", str(out)])
    row = json.loads(out.read_text().splitlines()[0])
    assert row["timed_out"] and row["error"] == "timed out after 3 s (last line: INFO loading)"
