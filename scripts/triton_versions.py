"""Do the pack's Triton kernels build, and compute what they should, with each Triton release a user may bring?

ComfyUI users bring their own torch, and with it their own Triton (torch 2.4 brings Triton 3.0, 2.6 brings 3.2,
2.11 brings 3.6, 2.14 brings 3.8), and on a CUDA GPU the Sampler's default runs the pack's kernels. For each
``--versions`` entry this script installs that Triton once (pip, into ``--cache/triton-<version>``, beside this
environment's torch) and runs, each stage in its own process with a timeout:

1. every kernel specialisation the pack launches, compiled for each ``--cards`` family, with its registers and
   any spills (:mod:`blended.kernel_report`);
2. the kernels' interpreter checks (``tests/triton_kernel_checks.py`` under ``TRITON_INTERPRET=1``): the same
   values as the plain-torch reference. Triton 3.0 and 3.1's interpreter cannot run them (it loses a helper's
   constant arguments); their compiler builds the kernels.

``installed`` stands for the Triton this environment has, installed nothing. It downloads, so it is run by hand,
never by the pack. It exits 1 where a release fails to compile a kernel or a kernel spills. Usage (from the
repository root):

    PYTHONPATH=. .venv/bin/python scripts/triton_versions.py --versions 3.2.0,3.6.0,installed --cards 86,90
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_VERSIONS = "3.0.0,3.1.0,3.2.0,3.3.1,3.4.0,3.5.1,3.6.0,installed"
# Before this release Triton's interpreter fails under numpy 2.4 and newer (triton-lang/triton#9171).
_INTERPRETER_NEEDS_OLD_NUMPY_BEFORE = (3, 8)

_COMPILE = """
import json, sys
import triton
from blended import kernel_report
dtypes = sys.argv[2].split(",")
rows = []
for card in (int(c) for c in sys.argv[1].split(",")):
    for row in kernel_report.report_rows(kernel_report.kernel_cases(dtypes), card):
        rows.append({"card": card, "kernel": row["kernel"], "registers": row["registers"],
                     "spill_bytes": row["spill_bytes"]})
print(json.dumps({"triton": triton.__version__, "rows": rows}))
"""


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:2])


def install(version: str, cache: Path) -> Path | None:
    """The folder holding ``version`` of Triton (installed there once), or None for ``installed``."""
    if version == "installed":
        return None
    target = cache / f"triton-{version}"
    if not (target / "triton").is_dir():
        packages = [f"triton=={version}"]
        import numpy

        if (_version_tuple(version) < _INTERPRETER_NEEDS_OLD_NUMPY_BEFORE
                and _version_tuple(numpy.__version__) >= (2, 4)):
            packages.append("numpy<2.4")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                        *packages], check=True, timeout=1800)
    return target


def _env(target: Path | None, interpret: bool) -> dict:
    env = dict(os.environ)
    paths = ([str(target)] if target else []) + [str(REPO), str(REPO / "tests")]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


def _run(command: list[str], env: dict, timeout: float) -> tuple[int | None, str]:
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "timed out"
    return done.returncode, done.stdout + done.stderr


def _last_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def check_version(version: str, cache: Path, cards: str, dtypes: str, checks: list[str], timeout: float) -> dict:
    """One row: the Triton version, what compiled and spilled, and which interpreter checks passed."""
    row: dict = {"version": version}
    try:
        target = install(version, cache)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        return {**row, "error": f"could not install it: {exc}"}
    rc, output = _run([sys.executable, "-c", _COMPILE, cards, dtypes], _env(target, False), timeout)
    if rc == 0:
        compiled = json.loads(output.strip().splitlines()[-1])
        row["triton"] = compiled["triton"]
        row["compiled"] = len(compiled["rows"])
        row["spilled"] = [f"{r['kernel']} on sm_{r['card']}: {r['spill_bytes']} bytes" for r in compiled["rows"]
                          if r["spill_bytes"]]
    else:
        row["compile_error"] = _last_line(output)
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "checks.json"
        rc, output = _run([sys.executable, str(REPO / "tests" / "triton_kernel_checks.py"), *checks,
                           "--json", str(results)], _env(target, True), timeout)
        ran = json.loads(results.read_text()) if results.exists() else []
    row["checks_passed"] = sum(r["ok"] for r in ran)
    row["checks_run"] = len(ran)
    row["checks_failed"] = [r["check"] for r in ran if not r["ok"]]
    if rc is None or (rc != 0 and not row["checks_failed"]):
        row["checks_error"] = _last_line(output)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| Triton | kernels compiled | spills | interpreter checks |", "|---|---|---|---|"]
    for row in rows:
        name = row.get("triton", row["version"])
        if "error" in row:
            lines.append(f"| {name} | {row['error']} | | |")
            continue
        compiled = row.get("compiled", f"failed: {row.get('compile_error')}")
        spills = "; ".join(row.get("spilled", [])) or ("none" if "compiled" in row else "")
        checks = f"{row['checks_passed']} of {row['checks_run']} passed"
        if row["checks_failed"]:
            checks += f" (failed: {', '.join(row['checks_failed'])})"
        if row.get("checks_error"):
            checks += f" ({row['checks_error']})"
        lines.append(f"| {name} | {compiled} | {spills} | {checks} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", default=DEFAULT_VERSIONS,
                        help="comma-separated Triton releases; 'installed': this environment's own")
    parser.add_argument("--cards", default="86,90", help="compute capabilities to compile for (75 to 120)")
    parser.add_argument("--dtype", default="bf16,fp16,fp32", help="the kernels' activation dtypes")
    parser.add_argument("--checks", default="", help="comma-separated interpreter checks (default: all)")
    parser.add_argument("--cache", type=Path, default=REPO / ".triton-versions",
                        help="where each Triton release is installed, once")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per stage")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    checks = [c for c in args.checks.split(",") if c]
    rows = []
    for version in (v.strip() for v in args.versions.split(",") if v.strip()):
        print(f"[triton {version}]", flush=True)
        rows.append(check_version(version, args.cache, args.cards, args.dtype, checks, args.timeout))
        print(json.dumps(rows[-1]), flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return 0 if all(r.get("compiled") and not r.get("spilled") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
