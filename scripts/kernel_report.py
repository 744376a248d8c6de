"""Print static figures of the pack's Triton kernels compiled for the H100 (sm_90): no GPU needed.

Usage (from the repository root):

    PYTHONPATH=. .venv/bin/python scripts/kernel_report.py            # bf16 and fp32
    PYTHONPATH=. .venv/bin/python scripts/kernel_report.py --dtype bf16 --json

For each kernel in each specialisation the pack launches (``blended.kernel_report``): registers per thread,
bytes spilled, SASS instructions per element a thread executes (in the loop body for the split reductions)
and per byte the kernel moves, and barriers inside loops. Above about 9 instructions per byte an H100 kernel is
bound by its arithmetic rather than its memory.
"""

import argparse
import json

from blended.kernel_report import kernel_cases, report_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bf16,fp32", help="comma-separated Triton dtypes: bf16, fp16, fp32")
    parser.add_argument("--json", action="store_true", help="one JSON object per kernel instead of a table")
    args = parser.parse_args()
    rows = report_rows(kernel_cases(tuple(args.dtype.split(","))))
    if args.json:
        for row in rows:
            print(json.dumps(row))  # the report is the script's output
        return
    print("| kernel | registers | spilled bytes | SASS instructions (loop bodies) | instructions per element "
          "| per byte | barriers in loops |\n|---|---|---|---|---|---|---|")
    for row in rows:
        loops = f" ({', '.join(map(str, row['loop_instructions']))})" if row["loop_instructions"] else ""
        print(f"| {row['kernel']} | {row['registers']} | {row['spill_bytes']} | {row['sass_instructions']}{loops} "
              f"| {row['instructions_per_element']} | {row['instructions_per_byte']} | {row['loop_barriers']} |")


if __name__ == "__main__":
    main()
