"""Print the peak memory and the largest allocations of one UNet forward + backward, traced on fake tensors.

Needs no GPU and no memory for the activations (``blended.memory_trace``): shapes, dtypes and layouts only.

Usage (from the repository root):

    PYTHONPATH=. .venv/bin/python scripts/memory_trace.py --batch 64 --preset bf16+channels_last+ckpt
    PYTHONPATH=. .venv/bin/python scripts/memory_trace.py --batch 16 --preset faithful,bf16 --json
    PYTHONPATH=. .venv/bin/python scripts/memory_trace.py --step --batch 64 --preset fast-gpu+ckpt  # + CLIP

By default the trace is the UNet's forward + backward; ``--step`` traces a whole guided step (UNet, 8 CLIP
views per result, both backwards). Figures are estimates from shapes: kernels' workspaces and the allocator's
fragmentation come on top.

``--traffic --step`` counts instead the bytes each kernel of a guided step reads and writes
(``blended.traffic_trace``): the memory-bound ops by op and by line of the pack, the compute ops apart.

    PYTHONPATH=. .venv/bin/python scripts/memory_trace.py --traffic --step --batch 8 \
        --preset fast-gpu,fast-gpu+channels_last+triton_norm+triton_clip
"""

import argparse
import json

from blended.fast_paths import parse_preset
from blended.memory_trace import Allocation, trace_guided_step, trace_unet_backward
from blended.traffic_trace import trace_step_traffic


def _rows(rows):
    return [Allocation(**{k: v for k, v in row.items() if k != "gib"}).describe() for row in rows]


def _traffic_text(result: dict, args) -> str:
    lines = [f"{result['options']} batch {args.batch}: guided step, {args.views} views ({args.config}, "
             f"{'CPU' if args.cpu_rules else 'CUDA'} rules): memory-bound ops move {result['memory_bound_gb']} GB "
             f"(layout copies {result['layout_copy_gb']} GB); convolutions, matmuls and attention "
             f"{result['compute_op_gb']} GB", "  by op:"]
    lines += [f"    {row['gb']:8.2f} GB {row['calls']:6d} calls  {row['op']}" for row in result["by_op"]]
    lines.append("  by site:")
    lines += [f"    {row['gb']:8.2f} GB  {row['op']:<28} {row['site']}" for row in result["by_site"]]
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="full256", choices=("full256", "tiny"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=None, help="default: the config's training size")
    parser.add_argument("--preset", default="bf16+channels_last+ckpt", help="comma list of option sets")
    parser.add_argument("--top", type=int, default=15, help="how many allocations to list")
    parser.add_argument("--cpu-rules", action="store_true",
                        help="follow the CPU's code paths instead of emulating CUDA's (see blended.memory_trace)")
    parser.add_argument("--step", action="store_true", help="trace a whole guided step (full256 only)")
    parser.add_argument("--views", type=int, default=8, help="CLIP views per result (with --step)")
    parser.add_argument("--traffic", action="store_true",
                        help="with --step: the bytes each kernel moves instead of the memory held")
    parser.add_argument("--json", action="store_true", help="one JSON object per option set")
    args = parser.parse_args(argv)
    if args.traffic and not args.step:
        parser.error("--traffic counts a whole guided step: add --step")
    results = []
    for preset in args.preset.split(","):
        if args.traffic:
            result = trace_step_traffic(parse_preset(preset), args.batch, args.views, args.config, keep=args.top,
                                        emulate_cuda=not args.cpu_rules)
            results.append(result)
            print(json.dumps(result) if args.json else _traffic_text(result, args))
            continue
        if args.step:
            result = trace_guided_step(parse_preset(preset), args.batch, args.views, args.config, keep=args.top,
                                       emulate_cuda=not args.cpu_rules)
        else:
            result = trace_unet_backward(parse_preset(preset), args.batch, args.config, args.image_size,
                                         keep=args.top, emulate_cuda=not args.cpu_rules)
        results.append(result)
        if args.json:
            print(json.dumps(result))
            continue
        what = f"guided step, {args.views} views" if args.step else "UNet forward+backward"
        kept = "" if args.step else f"; {result['after_forward_gib']} GiB held after the forward"
        print(f"{result['options']} batch {args.batch}: {what} ({args.config}, {result['image_size']} px, "
              f"{'CPU' if args.cpu_rules else 'CUDA'} rules): peak {result['peak_gib']} GiB in the "
              f"{result['peak_phase']}{kept} (weights {result['weights_gib']} GiB included)")
        print("  largest allocations:")
        print("\n".join("    " + row for row in _rows(result["largest"])))
        print("  live at the peak:")
        print("\n".join("    " + row for row in _rows(result["live_at_peak"])))
    return results


if __name__ == "__main__":
    main()
