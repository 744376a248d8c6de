"""Print static figures of the pack's Triton kernels compiled for the H100 (sm_90; ``--arch`` names another card
family): no GPU needed.

Usage (from the repository root):

    PYTHONPATH=. .venv/bin/python scripts/kernel_report.py            # bf16 and fp32
    PYTHONPATH=. .venv/bin/python scripts/kernel_report.py --dtype bf16 --json
    PYTHONPATH=. .venv/bin/python scripts/kernel_report.py --arch 86      # an RTX 30xx card instead
    PYTHONPATH=. .venv/bin/python scripts/kernel_report.py --cold-start \\
        --preset fast-gpu+channels_last+triton_norm+triton_clip --batch 1,4,16
    PYTHONPATH=. .venv/bin/python scripts/kernel_report.py --launches --preset fast-gpu,fast-gpu+triton_norm

For each kernel in each specialisation the pack launches (``blended.kernel_report``): registers per thread,
bytes spilled, SASS instructions per element a thread executes (in the loop body for the split reductions)
and per byte the kernel moves, and barriers inside loops. Above about 9 instructions per byte an H100 kernel is
bound by its arithmetic rather than its memory.

``--launches`` counts the kernels one guided step of the 256x256 model launches on a GPU (torch ops that run a
kernel, by the pack's file that issued them, and Triton launches), on fake tensors: at small batches the host's
launches set a step's pace.

``--cold-start`` instead lists the specialisations one guided step of the 256x256 model launches with each
preset, over the given batch sizes (``blended.kernel_specialisations``), compiles each for sm_90 into an empty
Triton cache and prints its compile time on this machine's CPU: what a first run on a new machine waits for
before Triton's on-disk cache has them.
"""

import argparse
import json

from blended.kernel_report import CARDS, cuda_target, kernel_cases, report_rows


def _static_report(args) -> None:
    rows = report_rows(kernel_cases(tuple(args.dtype.split(","))), args.arch)
    if args.json:
        for row in rows:
            print(json.dumps({"arch": args.arch, **row}))  # the report is the script's output
        return
    print(f"sm_{args.arch} ({CARDS[args.arch]})\n")
    print("| kernel | registers | spilled bytes | SASS instructions (loop bodies) | instructions per element "
          "| per byte | barriers in loops |\n|---|---|---|---|---|---|---|")
    for row in rows:
        loops = f" ({', '.join(map(str, row['loop_instructions']))})" if row["loop_instructions"] else ""
        print(f"| {row['kernel']} | {row['registers']} | {row['spill_bytes']} | {row['sass_instructions']}{loops} "
              f"| {row['instructions_per_element']} | {row['instructions_per_byte']} | {row['loop_barriers']} |")


def _cold_start_report(args) -> None:
    from blended import fast_paths
    from blended.kernel_specialisations import compile_times, launched_specialisations

    batches = tuple(int(b) for b in args.batch.split(","))
    for preset in args.preset.split(","):
        options = fast_paths.parse_preset(preset)
        rows = compile_times(launched_specialisations(options, batches, args.views), cuda_target(args.arch))
        total = sum(row["compile_s"] for row in rows)
        if args.json:
            for row in rows:
                print(json.dumps({"preset": preset, "batches": list(batches), **row}))
            continue
        print(f"\n{preset}, batches {args.batch}, {args.views} views: {len(rows)} Triton specialisations, "
              f"{total:.1f} s to compile them for sm_{args.arch} one after the other on this CPU\n")
        print("| specialisation | launches per step (all batches) | compile s |\n|---|---|---|")
        for row in rows:
            print(f"| `{row['specialisation']}` | {row['launches']} | {row['compile_s']:.2f} |")


def _launches_report(args) -> None:
    from blended import fast_paths
    from blended.kernel_specialisations import launches_per_step

    for preset in args.preset.split(","):
        for batch in (int(b) for b in args.batch.split(",")):
            counts = launches_per_step(fast_paths.parse_preset(preset), batch, args.views)
            row = {"preset": preset, "batch": batch, "views": args.views, "torch": sum(counts["torch"].values()),
                   "triton": sum(counts["triton"].values()), "torch_by_file": counts["torch"],
                   "triton_by_kernel": counts["triton"]}
            if args.json:
                print(json.dumps(row))
                continue
            files = ", ".join(f"{f} {n}" for f, n in sorted(counts["torch"].items(), key=lambda kv: -kv[1]))
            print(f"{preset}, batch {batch}, {args.views} views: {row['torch'] + row['triton']} kernel launches per "
                  f"step ({row['torch']} torch ops: {files}; {row['triton']} Triton)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bf16,fp32", help="comma-separated Triton dtypes: bf16, fp16, fp32")
    parser.add_argument("--json", action="store_true", help="one JSON object per row instead of a table")
    parser.add_argument("--arch", type=int, default=90, choices=sorted(CARDS),
                        help="the card's compute capability: " + "; ".join(f"{k} {v}" for k, v in CARDS.items()))
    parser.add_argument("--cold-start", action="store_true",
                        help="the specialisations a step launches and their compile times, per --preset")
    parser.add_argument("--launches", action="store_true",
                        help="the kernels one guided step launches, per --preset and --batch")
    parser.add_argument("--preset", default="fast-gpu+channels_last+triton_norm+triton_clip",
                        help="--cold-start, --launches: comma-separated option sets (as scripts/bench.py takes them)")
    parser.add_argument("--batch", default="1,4,16", help="--cold-start, --launches: comma-separated batch sizes")
    parser.add_argument("--views", type=int, default=8, help="--cold-start, --launches: CLIP views per result")
    args = parser.parse_args()
    (_cold_start_report if args.cold_start else _launches_report if args.launches else _static_report)(args)


if __name__ == "__main__":
    main()
