"""Wall time and peak memory per image: direct inference vs the tuning-free cascade, side by side.

    python benchmarks/bench_inference.py --model tiny --ratios 4 16 --steps 50 --repeats 3

Every (ratio, mode) cell runs in the same process, alternating modes each repeat, after one
warm-up call per cell, so both modes see the same machine state. Peak memory is CUDA's
max_memory_allocated on a GPU; on CPU it is the rise of the process's peak resident set (VmHWM,
reset through /proc/self/clear_refs before each call) over the resident set before the call.
Results go to benchmarks/results/inference_<model>.{md,csv}.
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
import re
import statistics
import time
from pathlib import Path

import torch

from selfcascade import SelfCascadePipeline
from selfcascade.io import atomic_path
from selfcascade.testing import make_tiny_sd

RESULTS = Path(__file__).resolve().parent / "results"


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


class PeakMemory:
    """Peak extra memory of the enclosed block, in MiB (CUDA allocator or CPU resident set)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib = float("nan")

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")
            self.start = _rss_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _rss_kib("VmHWM") * 1024
        self.mib = (peak - self.start) / 2**20


def load(model: str) -> SelfCascadePipeline:
    if model == "tiny":
        return SelfCascadePipeline.from_pipe(make_tiny_sd(seed=0))
    return SelfCascadePipeline.from_pretrained(model)


def run(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    cascade = load(args.model)
    bb = cascade.backbone
    base_h, base_w = bb.base_size
    rows = []
    for ratio in args.ratios:
        side = int(round(math.sqrt(ratio)))
        height, width = base_h * side, base_w * side
        times: dict[str, list[float]] = {m: [] for m in args.modes}
        peaks: dict[str, list[float]] = {m: [] for m in args.modes}
        call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="np", progress=False)
        for mode in args.modes:  # warm-up: allocator, kernels, lazy inits
            cascade(args.prompt, height, width, mode=mode, seed=0, **{**call, "num_inference_steps": args.warmup_steps or args.steps})
        for rep in range(args.repeats):
            for mode in args.modes:
                with PeakMemory(bb.device) as mem:
                    start = time.perf_counter()
                    cascade(args.prompt, height, width, mode=mode, seed=rep, **call)
                    if bb.device.type == "cuda":
                        torch.cuda.synchronize()
                    times[mode].append(time.perf_counter() - start)
                peaks[mode].append(mem.mib)
        direct = statistics.median(times["direct"]) if "direct" in times else float("nan")
        for mode in args.modes:
            plan = cascade.plan(height, width, mode)
            med = statistics.median(times[mode])
            rows.append({
                "model": args.model, "ratio": ratio, "size": f"{height}x{width}", "mode": mode,
                "stages": " -> ".join(f"{h}x{w}" for h, w in plan.stages), "steps": args.steps,
                "seconds_median": round(med, 3), "seconds_min": round(min(times[mode]), 3),
                "vs_direct": round(med / direct, 3), "peak_mib": round(max(peaks[mode]), 1), "repeats": args.repeats,
            })
            print(rows[-1], flush=True)
    return rows


def device_name(threads: int) -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {threads} threads)"


def write_results(stem: Path, rows: list[dict], markdown: list[str]) -> None:
    """``stem``.csv (every column of every row) and ``stem``.md from the lines, each replaced atomically."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(stem.with_suffix(".csv")) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    with atomic_path(stem.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(markdown) + "\n")
    print(f"wrote {stem}.md and .csv")


def write(rows: list[dict], args: argparse.Namespace) -> None:
    lines = [
        f"# Inference cost: {', '.join(args.modes)} ({args.model})", "",
        f"Device: {device_name(args.threads)}; torch {torch.__version__}; {args.steps} DDIM steps, guidance {args.guidance}, "
        f"batch 1, median of {args.repeats} after one warm-up"
        + (f" of {args.warmup_steps} steps" if args.warmup_steps else "") + ". Command: `python benchmarks/bench_inference.py "
        f"--model {args.model} --ratios {' '.join(map(str, args.ratios))} --modes {' '.join(args.modes)} --steps {args.steps} "
        f"--repeats {args.repeats}" + (f" --warmup-steps {args.warmup_steps}" if args.warmup_steps else "") + "`.", "",
        "| pixels | size | mode | stages | s / image | x direct | peak MiB |", "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['ratio']}x | {r['size']} | {r['mode']} | {r['stages']} | {r['seconds_median']} | "
              f"{r['vs_direct']} | {r['peak_mib']} |" for r in rows]
    write_results(RESULTS / f"inference_{Path(args.model).name}", rows, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny' (random-weight SD built here), 'embedded', a folder or hub id")
    parser.add_argument("--ratios", type=float, nargs="+", default=[4, 16], help="target/base pixel ratios")
    parser.add_argument("--modes", nargs="+", default=["direct", "tuning-free"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="steps of each cell's warm-up call (default: --steps); a few suffice where one image takes minutes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", default="a red apple")
    args = parser.parse_args()
    if "direct" not in args.modes:
        parser.error("--modes must include direct: every time is reported relative to it")
    write(run(args), args)


if __name__ == "__main__":
    main()
