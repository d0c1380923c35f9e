"""Wall time of the cascade with and without ``window_attention`` (HiDiffusion's MSW-MSA on the final stage),
beside direct inference, side by side in one process.

    python benchmarks/bench_window_attention.py --model tiny --ratio 16 --steps 10 --repeats 3

Same protocol as bench_inference.py: one warm-up call per variant, then the variants alternate on every repeat;
medians, reported as ratios. Writes benchmarks/results/window_attention_<model>.{md,csv}.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import RESULTS, device_name, load, write_results  # noqa: E402

VARIANTS = {"direct": dict(mode="direct"), "tuning-free": dict(mode="tuning-free"),
            "tuning-free+window": dict(mode="tuning-free", window_attention=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--ratio", type=float, default=16, help="target/base pixel ratio")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cascade = load(args.model)
    side = int(round(math.sqrt(args.ratio)))
    height, width = (s * side for s in cascade.backbone.base_size)
    call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="np", progress=False)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for kwargs in VARIANTS.values():
        cascade("a red apple", height, width, seed=0, **kwargs, **call)
    for rep in range(args.repeats):
        for name, kwargs in VARIANTS.items():
            start = time.perf_counter()
            cascade("a red apple", height, width, seed=rep, **kwargs, **call)
            times[name].append(time.perf_counter() - start)
    medians = {v: statistics.median(t) for v, t in times.items()}
    rows = [{"model": args.model, "size": f"{height}x{width}", "variant": v, "seconds_median": round(m, 3),
             "vs_direct": round(m / medians["direct"], 3), "vs_tuning_free": round(m / medians["tuning-free"], 3),
             "steps": args.steps, "repeats": args.repeats} for v, m in medians.items()]
    for row in rows:
        print(row, flush=True)
    lines = [f"# Window attention on the cascade's final stage ({args.model})", "",
             f"Device: {device_name(args.threads)}; torch {torch.__version__}; {args.steps} DDIM steps, guidance "
             f"{args.guidance}, batch 1, median of {args.repeats} after one warm-up. Command: `python "
             f"benchmarks/bench_window_attention.py --model {args.model} --ratio {args.ratio:g} --steps {args.steps} "
             f"--repeats {args.repeats} --threads {args.threads}`.", "",
             "| size | variant | s / image | x direct | x tuning-free |", "|---|---|---|---|---|"]
    lines += [f"| {r['size']} | {r['variant']} | {r['seconds_median']} | {r['vs_direct']} | {r['vs_tuning_free']} |"
              for r in rows]
    write_results(RESULTS / f"window_attention_{Path(args.model).name}", rows, lines)


if __name__ == "__main__":
    main()
