"""scripts/triton_versions.py, on the Triton this environment has: it installs nothing for ``installed``,
compiles every kernel specialisation, runs the interpreter checks asked for, and reports a check it could not
run rather than counting it as passed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from blended import kernel_report

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "triton_versions.py"


def _script():
    spec = importlib.util.spec_from_file_location("triton_versions", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_installed_triton_compiles_every_kernel_and_passes_the_checks_asked_for(tmp_path):
    script = _script()
    rows_path = tmp_path / "rows.json"
    rc = script.main(["--versions", "installed", "--cards", "90", "--dtype", "bf16", "--checks",
                      "quick_gelu_float32_forward_and_input_gradient_match_the_formula",
                      "--cache", str(tmp_path / "cache"), "--json", str(rows_path)])
    (row,) = json.loads(rows_path.read_text())
    assert rc == 0
    assert row["compiled"] == len(kernel_report.kernel_cases(["bf16"])) and row["spilled"] == []
    assert (row["checks_passed"], row["checks_run"], row["checks_failed"]) == (1, 1, [])
    assert not (tmp_path / "cache").exists()  # "installed" installs nothing


def test_a_check_that_could_not_run_is_reported_not_passed(tmp_path):
    script = _script()
    row = script.check_version("installed", tmp_path, "90", "bf16", ["no_such_check"], timeout=600)
    assert row["checks_run"] == 0 and row["checks_passed"] == 0
    assert "no such check" in row["checks_error"]
    assert "0 of 0 passed (" in script.table([row])
