"""One command for the GPU table: the original's guided step beside the pack's presets, on one card, in one run.

Usage (from the repository root, on a machine with a CUDA GPU):

    PYTHONPATH=. .venv/bin/python scripts/gpu_compare.py --original /path/to/original_step_bench.py \\
        --original-src /path/to/original-code --out gpu-rows.jsonl

``--original`` is a step benchmark of the original code (it must accept ``--config full256 --device cuda
--batch B[,B...] --views V --steps N [--edit-steps N] --json FILE``, print each finished row as a JSON line and
write them all as a JSON list, with ``s_per_step``/``s_step_min``/``peak_gib``/``s_edit``); it is run as given,
never copied. Without it only the pack's rows are measured. ``--original-src`` is passed on to it: the folder of
the original code, needed wherever that folder is not where the benchmark looks by default.

The stages run in order of importance, each its own process with a timeout, so an out-of-memory or a slow
compile loses only that stage, and the whole run keeps within ``--budget`` seconds: a stage gets what is left
of it (at most ``--timeout``), and the stages it no longer reaches are listed as skipped. Rows a stage finished
before its time ran out are kept; a stage whose ``--json`` file is cut short (stopped mid-write) gives the rows
it printed, or an error row, and the run goes on.

1. the original at every ``--batches`` (full 256x256 layout, random weights, 8 views);
2. the pack's ``scripts/bench.py`` for each ``--presets`` entry, all batches in one process (seconds per
   guided step, peak memory, MFU);
3. the pack's ranked edit: ``--results`` results (whole edits at ``--edit-batch``, then CLIP ranking) for each
   ``--edit-presets`` entry ("fastest": the preset fastest at ``--edit-batch`` in stage 2);
3b. on CUDA, the Triton kernels' checks against the plain-torch reference (``tests/triton_kernel_checks.py
   --device cuda``): the compiled kernels as the JIT specialises them, which CPU machines only interpret; a
   Triton preset's timings count only if these pass;
3c. the preset fastest at ``--edit-batch`` at ``--large-batch`` (64 by default: all results of an edit in one
   batch), seconds per step and peak memory, or the out-of-memory row;
4. a torch.profiler table of one step for each ``--profile`` entry at ``--profile-batch``, by op and by op and
   input shapes, and the copies' and adds' time by the line or backward that issued them (a text file beside
   ``--out``);
5. the ``--late-presets``, as stage 2;
6. with ``--original-edit``, the original's whole edit (75 steps) at the largest batch.

Every row goes to ``--out`` as one JSON line (with its stage, command, exit code and whether it timed out), and
a Markdown table with the speed-up over the original at the same batch is printed at the end (a batch that ran
out of memory says so in the step time's column).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "scripts" / "bench.py"
PROFILE = REPO / "scripts" / "profile_step.py"
KERNEL_CHECKS = REPO / "tests" / "triton_kernel_checks.py"
# The Sampler's CUDA default (with and without Triton) and the eager fast path before it.
DEFAULT_PRESETS = "fastest-gpu,fastest-gpu-without-triton,fast-gpu"
# Measured after the ranked edit and the profile, if the budget still allows: fast-gpu without cuDNN's timing of
# its algorithms (ComfyUI's own default), the original's numerics with graphs, and each Triton option alone, to
# tell their shares apart.
DEFAULT_LATE_PRESETS = ("bf16+reuse,original-gpu+cuda_graphs,fast-gpu+channels_last+triton_norm+cuda_graphs,"
                        "fast-gpu+triton_clip+cuda_graphs,fastest-gpu+single_resample")
# "fastest": the --presets entry with the lowest seconds per step at --edit-batch in this run.
DEFAULT_EDIT_PRESETS = "fastest"
DEFAULT_PROFILES = "fast-gpu+channels_last+triton_norm+triton_clip"
# Ops whose time the profile also gives by the line or backward that issued them (profile_step --stack).
PROFILE_SOURCES = "aten::copy_,aten::add_,aten::add"
# A stage is not started with less time than this left: loading the 256x256 models alone takes a while.
MIN_STAGE_SECONDS = 45


class Budget:
    """The run's wall-clock allowance; each stage's timeout is what is left of it, at most ``per_stage``."""

    def __init__(self, seconds: float, per_stage: float):
        self.deadline = time.monotonic() + seconds
        self.per_stage = per_stage

    def stage_timeout(self) -> float | None:
        """Seconds for the next stage, or None when too little is left to start one."""
        left = self.deadline - time.monotonic()
        return min(self.per_stage, left) if left >= MIN_STAGE_SECONDS else None


def run_stage(name: str, command: list[str], budget: Budget, out_file, json_file: bool = True,
              text_out: Path | None = None) -> list[dict]:
    """Run one stage; return its JSON rows, tagged with the stage.

    Rows come from the ``--json`` file the stage writes (rewritten after each row by the pack's bench) or, for
    a stage stopped before it wrote one or one that left it cut short, from the JSON lines it printed (or one
    error row saying what went wrong): one stage's broken file never costs the stages after it or the table.
    ``text_out`` keeps the whole output.
    """
    timeout = budget.stage_timeout()
    if timeout is None:
        return _record([{"error": "skipped: the --budget was spent"}], name, command, None, False, 0.0, out_file)
    with tempfile.TemporaryDirectory() as tmp:
        json_path = Path(tmp) / "rows.json"
        if json_file:
            command = command + ["--json", str(json_path)]
        print(f"[{name}] ({timeout:.0f} s at most) {' '.join(command)}", flush=True)
        start = time.perf_counter()
        timed_out, rc = False, None
        try:
            done = subprocess.run(command, cwd=REPO, timeout=timeout, capture_output=True, text=True, env=_env())
            rc, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as exc:
            timed_out = True
            output = _text(exc.stdout) + _text(exc.stderr)
        wall = time.perf_counter() - start
        rows = _rows_from(json_path, output, name) if json_file else []
    if text_out is not None:
        text_out.write_text(output)
        rows = rows or [{"text": str(text_out)}]
    if not rows:
        tail = output.strip().splitlines()
        last = tail[-1] if tail else "no output"
        rows = [{"error": f"timed out after {timeout:.0f} s (last line: {last})" if timed_out else last}]
        print(output[-2000:], flush=True)
    return _record(rows, name, command, rc, timed_out, wall, out_file)


def _record(rows, name, command, rc, timed_out, wall, out_file) -> list[dict]:
    for row in rows:
        row.update({"stage": name, "rc": rc, "timed_out": timed_out, "stage_wall_s": wall, "command": command})
        out_file.write(json.dumps(row) + "\n")
        out_file.flush()
        print(f"[{name}] {json.dumps({k: v for k, v in row.items() if k != 'command'})}", flush=True)
    return rows


# A printed JSON line is a row if it has one of these: a measured step or edit, or a batch that did not fit.
ROW_KEYS = ("s_per_step", "s_edit", "out_of_memory")


def _rows_from(json_path: Path, output: str, name: str = "stage") -> list[dict]:
    """The stage's rows: its ``--json`` file if that holds a whole JSON list, else the rows it printed, else (a
    file cut short, e.g. by the stage's timeout mid-write, and nothing printed) one error row saying so."""
    problem = None
    try:
        data = json.loads(json_path.read_text())
    except FileNotFoundError:
        data = None
    except (OSError, ValueError) as exc:  # ValueError: json.JSONDecodeError, or bytes that are not text
        data = None
        problem = f"its --json file is not whole JSON (cut short?): {exc}"
    if isinstance(data, dict):
        data = [data]
    if isinstance(data, list) and all(isinstance(row, dict) for row in data):
        return data
    if data is not None:
        problem = f"its --json file holds no list of rows: {str(data)[:80]}"
    rows = []
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and any(key in row for key in ROW_KEYS):
                rows.append(row)
    if problem is not None:
        print(f"[{name}] {problem}; {len(rows)} rows from its printed output instead", flush=True)
        if not rows:
            rows = [{"error": problem}]
    return rows


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _table(rows: list[dict], num_results: int) -> str:
    original = {r.get("batch"): r for r in rows if r["stage"] == "original-step" and r.get("s_per_step")}
    # The first step of a bench process's first batch includes its cold start: Triton's compiles (none once its
    # on-disk cache has them), the CUDA graphs' warm-up and capture, cuDNN's first plans.
    lines = ["| run | batch | s / guided step (min) | speed-up vs original | peak GiB | MFU | first step s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        label = "original" if r["stage"].startswith("original") else f"pack `{r.get('options')}`"
        if "out_of_memory" in r:  # the answer to "does this batch fit?" is no
            lines.append(f"| {label} | {r.get('batch')} | out of memory | n/a | n/a | n/a | n/a |")
            continue
        if not r.get("s_per_step") or r["stage"] == "original-edit":
            continue
        graphs = r.get("cuda_graphs") or ""
        if "eager since" in graphs or " 0 replayed" in graphs:
            label += " (CUDA graphs not replayed: see the row's cuda_graphs)"
        base = original.get(r.get("batch"))
        speedup = f"{base['s_per_step'] / r['s_per_step']:.2f}x" if base else "n/a"
        peak = r.get("peak_gib", r.get("peak_mem_gib"))
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
        peak_text = f"{peak:.1f}" if peak is not None else "n/a"
        first = f"{r['s_first_step']:.1f}" if r.get("s_first_step") else "n/a"
        lines.append(f"| {label} | {r.get('batch')} | {r['s_per_step']:.3f} ({r.get('s_step_min', 0):.3f}) | "
                     f"{speedup} | {peak_text} | {mfu} | {first} |")
    checks = [r for r in rows if "check" in r]
    if checks:
        failed = [r["check"] for r in checks if not r["ok"]]
        lines.append(f"| Triton kernel checks on {checks[0]['device']}: {len(checks) - len(failed)} of {len(checks)} "
                     f"passed{'; FAILED: ' + ', '.join(failed) if failed else ''} | | | | | | |")
    for r in rows:
        if "check" in r:
            continue
        if r.get("s_ranked"):
            lines.append(f"| pack `{r['options']}`: {r['num_results']} ranked results, batch {r['batch']} | | "
                         f"{r['s_ranked']:.1f} s in all ({r['results_per_min']:.1f} results/min) | | "
                         f"{r['peak_mem_gib']:.1f} | | |")
        elif r["stage"] == "original-edit" and r.get("s_edit"):
            edits = -(-num_results // r["batch"])
            lines.append(f"| original: {num_results} results = {edits} edits of {r['batch']} "
                         f"({r.get('edit_steps', 75)} steps each, ranking not included) | {r['batch']} | "
                         f"{edits * r['s_edit']:.1f} s in all ({r['s_edit']:.1f} s per edit) | | | | |")
        elif r.get("error"):
            lines.append(f"| {r['stage']}: {r['error']} | | | | | | |")
        elif r.get("text"):
            lines.append(f"| {r['stage']}: {r['text']} | | | | | | |")
    return "\n".join(lines)


def _items(text: str) -> list[str]:
    return [item for item in text.split(",") if item]


def fastest_preset(rows: list[dict], batch: int, fallback: str = "fast-gpu") -> str:
    """The step stage's preset with the lowest seconds per guided step at ``batch`` (``fallback`` if none ran)."""
    prefix = "pack-step-"
    timed = [(r["s_per_step"], r["stage"][len(prefix):]) for r in rows
             if r.get("stage", "").startswith(prefix) and r.get("batch") == batch and r.get("s_per_step")]
    return min(timed)[1] if timed else fallback


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--original", type=Path, default=None, help="the original's step benchmark script (run as is)")
    p.add_argument("--original-src", type=Path, default=None,
                   help="passed on as --original-src (where the original code lives), if given")
    p.add_argument("--original-edit", action="store_true",
                   help="also time the original's whole edit (75 steps) at the largest batch (last stage)")
    p.add_argument("--python", default=sys.executable, help="interpreter for every stage")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--views", type=int, default=8)
    p.add_argument("--presets", default=DEFAULT_PRESETS, help="comma list of pack option sets (bench --preset)")
    p.add_argument("--late-presets", default=DEFAULT_LATE_PRESETS,
                   help="option sets measured like --presets after the edit and the profile ('' = none)")
    p.add_argument("--edit-presets", default=DEFAULT_EDIT_PRESETS,
                   help="option sets for the ranked edit ('' = none; 'fastest' = the fastest --presets entry)")
    p.add_argument("--results", type=int, default=64, help="results of the whole ranked edit")
    p.add_argument("--edit-batch", type=int, default=16, help="batch size of the pack's ranked edit")
    p.add_argument("--large-batch", type=int, default=64,
                   help="one more batch for the preset fastest at --edit-batch (0 = none): does it fit, how fast")
    p.add_argument("--profile", default=DEFAULT_PROFILES, help="option sets to profile one step of ('' = none)")
    p.add_argument("--profile-batch", type=int, default=8)
    p.add_argument("--config", default="full256", choices=("full256", "tiny"),
                   help="tiny (the test fixtures) with --device cpu is a dry run of the plumbing")
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=75, help="guided steps of a whole edit")
    p.add_argument("--budget", type=float, default=540,
                   help="seconds for the whole run (set it under any time limit on the command)")
    p.add_argument("--timeout", type=float, default=240, help="seconds per stage at most")
    p.add_argument("--out", type=Path, default=Path("gpu-rows.jsonl"))
    args = p.parse_args(argv)
    # Checked before any stage, so a wrong path loses no GPU time; resolved where the command was given, since the
    # stages run in the repository root.
    if args.original is not None:
        if not args.original.is_file():
            p.error(f"--original {args.original}: no such file; give the path of the original's step benchmark script")
        args.original = args.original.resolve()
    if args.original_src is not None:
        if not args.original_src.is_dir():
            p.error(f"--original-src {args.original_src}: no such folder; give the path of the original's code folder")
        args.original_src = args.original_src.resolve()

    budget = Budget(args.budget, args.timeout)
    batches = args.batches
    rows: list[dict] = []
    common = ["--config", args.config, "--device", args.device, "--views", str(args.views)]
    reference = REPO / "tests" / "fixtures" / "reference"
    original = [args.python, str(args.original), *common, *(["--ref", str(reference)] if args.config == "tiny" else []),
                *(["--original-src", str(args.original_src)] if args.original_src else [])]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as out:
        if args.original is not None:
            rows += run_stage("original-step", original + ["--batch", batches, "--steps", "5"], budget, out)
        def step_stages(presets: str):
            for preset in _items(presets):
                yield from run_stage(f"pack-step-{preset}", [args.python, str(BENCH), *common, "--preset", preset,
                                     "--batch", batches, "--steps", "0", "--repeats", "3", "--saved", "off",
                                     "--ops", "off"], budget, out)
        rows += step_stages(args.presets)
        edit_presets = [fastest_preset(rows, args.edit_batch) if preset == "fastest" else preset
                        for preset in _items(args.edit_presets)]
        for preset in edit_presets:
            rows += run_stage(f"pack-ranked-edit-{preset}", [args.python, str(BENCH), *common, "--preset", preset,
                              "--batch", str(args.edit_batch), "--steps", str(args.steps),
                              "--ranked-edit", str(args.results)], budget, out)
        if args.device == "cuda":
            rows += run_stage("kernel-checks", [args.python, str(KERNEL_CHECKS), "--device", "cuda"], budget, out)
        if args.large_batch > 0 and _items(args.presets):
            preset = fastest_preset(rows, args.edit_batch)
            rows += run_stage(f"pack-large-batch-{preset}", [args.python, str(BENCH), *common, "--preset", preset,
                              "--batch", str(args.large_batch), "--steps", "0", "--repeats", "2", "--saved", "off",
                              "--ops", "off"], budget, out)
        for preset in _items(args.profile):
            text_out = args.out.with_name(f"{args.out.stem}.profile-{preset.replace('+', '_')}.txt")
            rows += run_stage(f"profile-{preset}", [args.python, str(PROFILE), "--config", args.config,
                              "--device", args.device, "--views", str(args.views), "--preset", preset,
                              "--batch", str(args.profile_batch), "--rows", "40", "--by-shape",
                              "--stack", PROFILE_SOURCES], budget, out,
                              json_file=False, text_out=text_out)
        rows += step_stages(args.late_presets)
        if args.original is not None and args.original_edit:
            largest = str(max(int(b) for b in _items(batches)))
            rows += run_stage("original-edit", original + ["--batch", largest, "--steps", "1",
                              "--edit-steps", str(args.steps)], budget, out)
    print(_table(rows, args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
