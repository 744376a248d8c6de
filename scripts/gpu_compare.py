"""One command for the GPU table: the original's guided step beside the pack's presets, on one card, in one run.

Usage (from the repository root, on a machine with a CUDA GPU):

    PYTHONPATH=. .venv/bin/python scripts/gpu_compare.py --original /path/to/original_step_bench.py \\
        --out gpu-rows.jsonl

``--original`` is a step benchmark of the original code (it must accept ``--config full256 --device cuda
--batch B --views V --steps N [--edit-steps N] --json FILE`` and write a JSON list of rows with
``s_per_step``/``s_step_min``/``peak_gib``/``s_edit``); it is run as given, never copied. Without it only the
pack's rows are measured.

Stages (each its own process with ``--timeout``, so an out-of-memory or a slow compile loses only that stage):
1. the original at each ``--batches`` (full 256x256 layout, random weights, 8 views);
2. the original's whole edit (75 steps) at the largest batch, for the time to ``--results`` results;
3. the pack's ``scripts/bench.py`` for every ``--presets`` entry at each batch (seconds per guided step, peak
   memory, MFU);
4. the pack's ranked edit: ``--results`` results (whole edits at ``--edit-batch``, then CLIP ranking) for every
   ``--edit-presets`` entry.

Every row goes to ``--out`` as one JSON line (with its stage, command, exit code and whether it timed out), and
a Markdown table with the speed-up over the original at the same batch is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "scripts" / "bench.py"
DEFAULT_PRESETS = ("original-gpu,fast-gpu,fast-gpu+channels_last+triton_norm,fast-gpu+triton_norm,"
                   "fast-gpu+single_resample")
DEFAULT_EDIT_PRESETS = "fast-gpu,fast-gpu-lowmem"


def run_stage(name: str, command: list[str], timeout: float, out_file) -> list[dict]:
    """Run one stage; return its JSON rows (read from the --json file it writes), tagged with the stage."""
    with tempfile.TemporaryDirectory() as tmp:
        json_path = Path(tmp) / "rows.json"
        command = command + ["--json", str(json_path)]
        print(f"[{name}] {' '.join(command)}", flush=True)
        start = time.perf_counter()
        timed_out, rc = False, None
        try:
            done = subprocess.run(command, cwd=REPO, timeout=timeout, capture_output=True, text=True,
                                  env=_env())
            rc = done.returncode
            tail = (done.stdout + done.stderr)[-2000:]
        except subprocess.TimeoutExpired as exc:
            timed_out = True
            tail = ((exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace"))[-2000:]
        wall = time.perf_counter() - start
        rows = json.loads(json_path.read_text()) if json_path.exists() else []
    if not rows:
        rows = [{"error": tail.strip().splitlines()[-1] if tail.strip() else "no output"}]
        print(tail, flush=True)
    for row in rows:
        row.update({"stage": name, "rc": rc, "timed_out": timed_out, "stage_wall_s": wall, "command": command})
        out_file.write(json.dumps(row) + "\n")
        out_file.flush()
        print(f"[{name}] {json.dumps({k: v for k, v in row.items() if k != 'command'})}", flush=True)
    return rows


def _env():
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _table(rows: list[dict], num_results: int) -> str:
    original = {r["batch"]: r for r in rows if r["stage"].startswith("original-step") and r.get("s_per_step")}
    lines = ["| run | batch | s / guided step (min) | speed-up vs original | peak GiB | MFU |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if not r.get("s_per_step") or r["stage"] == "original-edit":
            continue
        label = "original" if r["stage"].startswith("original") else f"pack `{r.get('options')}`"
        base = original.get(r["batch"])
        speedup = f"{base['s_per_step'] / r['s_per_step']:.2f}x" if base else "n/a"
        peak = r.get("peak_gib", r.get("peak_mem_gib"))
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
        lines.append(f"| {label} | {r['batch']} | {r['s_per_step']:.3f} ({r.get('s_step_min', 0):.3f}) | {speedup} | "
                     f"{peak:.1f} | {mfu} |" if peak is not None else
                     f"| {label} | {r['batch']} | {r['s_per_step']:.3f} | {speedup} | n/a | {mfu} |")
    for r in rows:
        if r.get("s_ranked"):
            lines.append(f"| pack `{r['options']}`: {r['num_results']} ranked results, batch {r['batch']} | | "
                         f"{r['s_ranked']:.1f} s in all ({r['results_per_min']:.1f} results/min) | | "
                         f"{r['peak_mem_gib']:.1f} | |")
        elif r["stage"] == "original-edit" and r.get("s_edit"):
            edits = -(-num_results // r["batch"])
            lines.append(f"| original: {num_results} results = {edits} edits of {r['batch']} "
                         f"({r.get('edit_steps', 75)} steps each, ranking not included) | {r['batch']} | "
                         f"{edits * r['s_edit']:.1f} s in all ({r['s_edit']:.1f} s per edit) | | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--original", type=Path, default=None, help="the original's step benchmark script (run as is)")
    p.add_argument("--original-src", type=Path, default=None,
                   help="passed on as --original-src (where the original code lives), if given")
    p.add_argument("--python", default=sys.executable, help="interpreter for every stage")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--views", type=int, default=8)
    p.add_argument("--presets", default=DEFAULT_PRESETS, help="comma list of pack option sets (bench --preset)")
    p.add_argument("--edit-presets", default=DEFAULT_EDIT_PRESETS, help="option sets for the ranked edit ('' = none)")
    p.add_argument("--results", type=int, default=64, help="results of the whole ranked edit")
    p.add_argument("--edit-batch", type=int, default=16, help="batch size of the pack's ranked edit")
    p.add_argument("--config", default="full256", choices=("full256", "tiny"),
                   help="tiny (the test fixtures) with --device cpu is a dry run of the plumbing")
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=75, help="guided steps of a whole edit")
    p.add_argument("--timeout", type=float, default=600, help="seconds per stage")
    p.add_argument("--out", type=Path, default=Path("gpu-rows.jsonl"))
    args = p.parse_args(argv)

    batches = [int(b) for b in args.batches.split(",")]
    rows: list[dict] = []
    common = ["--config", args.config, "--device", args.device, "--views", str(args.views)]
    reference = REPO / "tests" / "fixtures" / "reference"
    original_common = common + (["--ref", str(reference)] if args.config == "tiny" else [])
    with args.out.open("w") as out:
        if args.original is not None:
            extra = ["--original-src", str(args.original_src)] if args.original_src else []
            for batch in batches:
                rows += run_stage(f"original-step-b{batch}", [args.python, str(args.original), *original_common,
                                  *extra, "--batch", str(batch), "--steps", "5"], args.timeout, out)
            rows += run_stage("original-edit", [args.python, str(args.original), *original_common, *extra,
                              "--batch", str(max(batches)), "--steps", "1", "--edit-steps", str(args.steps)],
                              args.timeout, out)
        for preset in args.presets.split(","):
            for batch in batches:
                rows += run_stage(f"pack-step-{preset}-b{batch}", [args.python, str(BENCH), *common, "--preset",
                                  preset, "--batch", str(batch), "--steps", "0", "--repeats", "3",
                                  "--saved", "off", "--ops", "off"], args.timeout, out)
        for preset in filter(None, args.edit_presets.split(",")):
            rows += run_stage(f"pack-ranked-edit-{preset}", [args.python, str(BENCH), *common, "--preset", preset,
                              "--batch", str(args.edit_batch), "--steps", str(args.steps),
                              "--ranked-edit", str(args.results)], args.timeout, out)
    print(_table(rows, args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
