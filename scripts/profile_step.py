"""Profile one guided step with torch.profiler: where the kernel time goes and how many ops are launched.

Usage (from the repository root):

    PYTHONPATH=. .venv/bin/python scripts/profile_step.py --config full256 --device cuda --preset fast-gpu \\
        --batch 8

Prints the wall time of the profiled step, the summed device (or CPU) time, and the top ops by self time.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from blended import benchmark, fast_paths
from blended.diffusion import create_diffusion
from blended.sampler import SamplerSettings


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny", choices=("tiny", "full256"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="fast-gpu", help="presets and options joined by '+'")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--views", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, cuDNN autotuning)")
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--by-shape", action="store_true",
                   help="also a table grouped by input shapes (tells, e.g., a conv's bias add [B,C,H,W]+[1,C,1,1] "
                        "from a gradient accumulation [B,C,H,W]+[B,C,H,W])")
    p.add_argument("--stack", default="",
                   help="comma list of op names (e.g. aten::copy_,aten::add_): also their device time by the pack's "
                        "Python line that issued them")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    options = fast_paths.parse_preset(args.preset)
    torch.backends.cudnn.benchmark = True
    with torch.inference_mode(False):
        unet, clip = benchmark.build_models(args.config, device)
        fast_paths.apply_fast_paths(unet, clip, options)
        inputs = benchmark.edit_inputs(unet, clip, device)
        diffusion = create_diffusion(timestep_respacing=str(benchmark.SCHEDULE_STEPS))
        settings = fast_paths.sampler_settings_with(SamplerSettings(batch_size=args.batch), options)
        step = benchmark.StepRunner(unet, diffusion, clip, inputs, args.batch, args.views, settings, options)
        for _ in range(args.warmup):
            step()
        benchmark.synchronize(device)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        stack_config = torch._C._profiler._ExperimentalConfig(verbose=True) if args.stack else None
        with torch.profiler.profile(activities=activities, record_shapes=args.by_shape or bool(args.stack),
                                    with_stack=bool(args.stack), experimental_config=stack_config) as prof:
            start = time.perf_counter()
            step()
            benchmark.synchronize(device)
            wall = time.perf_counter() - start
    events = prof.key_averages()
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    device_total = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e6
    launches = sum(e.count for e in events if e.key.startswith("aten::"))
    print(f"{options.describe()} batch {args.batch}: wall {wall:.3f} s/step; summed self device time "
          f"{device_total:.3f} s; {launches} aten ops")
    print(events.table(sort_by=sort_by, row_limit=args.rows, max_name_column_width=60))
    if args.by_shape:
        print(prof.key_averages(group_by_input_shape=True).table(sort_by=sort_by, row_limit=args.rows,
                                                                  max_name_column_width=40, max_shapes_column_width=60))
    if args.stack:
        _print_sources(prof, args.stack.split(","), sort_by, args.rows)


def _print_sources(prof, names: list[str], sort_by: str, rows: int) -> None:
    """The named ops' time by where they come from: the ops and autograd nodes enclosing them (a backward's
    copy runs inside its node, on a thread without a Python stack) and the pack's innermost Python lines. The
    profile's op table says only what an op is; this says which line or backward issued it."""
    wanted = set(names)
    totals: dict = {}
    for event in prof.events():
        if event.name not in wanted:
            continue
        parents, parent = [], event.cpu_parent
        while parent is not None and len(parents) < 4:
            parents.append(parent.name)
            parent = parent.cpu_parent
        frames = [f for f in event.stack if "site-packages" not in f and "built-in" not in f][:3]
        key = (event.name, str(event.input_shapes)[:80], " <- ".join(parents), " <- ".join(frames))
        time_us = getattr(event, sort_by.replace("_total", ""), 0) or getattr(event, sort_by, 0)
        count, total = totals.get(key, (0, 0.0))
        totals[key] = (count + 1, total + time_us)
    for (name, shapes, parents, frames), (count, total) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:rows]:
        print(f"{total / 1e3:8.2f} ms  x{count:<4} {name} {shapes}")
        print(f"            in: {parents}\n            at: {frames}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
