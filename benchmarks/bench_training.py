"""Time and peak memory per training step: upsampler tuning vs full fine-tuning of the UNet (paper: 5x).

    python benchmarks/bench_training.py --model tiny --size 64 --batch-size 4 --steps 10 --repeats 3
    python benchmarks/bench_training.py --model embedded --size 64 --batch-size 8

Both methods train at the same high-res size and batch on the same images, captions, timesteps and
noise, in one process, alternating methods each repeat after one warm-up step each (which also
allocates the optimisers' state). A tuning step is what ``selfcascade train-upsamplers`` does once
its cache is warm: frozen UNet forward with the bank's residuals, backward into the bank only, AdamW
on the bank. The one-off cost of filling the cache (VAE encode, text encode, pivot pass) is reported
apart. A full fine-tuning step is a plain forward, backward and AdamW step over every UNet weight.
Peak memory as in bench_inference.py (CUDA allocator, or the rise of the CPU resident set).
Results go to benchmarks/results/training_<model>.{md,csv}.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_inference import RESULTS, PeakMemory, device_name, write_results
from selfcascade import SelfCascadePipeline
from selfcascade.backbones.embedded import CONFIG_NAME, SHIPPED_DIR
from selfcascade.testing import make_tiny_sd
from selfcascade.train_upsamplers import ImageCaptions, PivotCache, prediction_target, tuning_loss
from selfcascade.upsamplers import UpsamplerBank


def load(model: str) -> SelfCascadePipeline | None:
    if model == "tiny":
        return SelfCascadePipeline.from_pipe(make_tiny_sd(seed=0))
    if model == "embedded" and not (SHIPPED_DIR / CONFIG_NAME).is_file():
        print(f"skipped: the embedded model is not at {SHIPPED_DIR} (train and export it with "
              "`selfcascade train-base --export`)")
        return None
    return SelfCascadePipeline.from_pretrained(model, dtype=torch.float32)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> list[dict] | None:
    torch.set_num_threads(args.threads)
    cascade = load(args.model)
    if cascade is None:
        return None
    bb = cascade.backbone
    bb.freeze()  # the base is frozen in upsampler tuning, as in train-upsamplers
    device = bb.device
    size = args.size or bb.base_size[0] * 2
    gen = torch.Generator().manual_seed(0)
    data = ImageCaptions(torch.randint(0, 256, (args.batch_size, 3, size, size), dtype=torch.uint8, generator=gen),
                         ["a red apple"] * args.batch_size)
    start = time.perf_counter()
    z0, embeds, features = PivotCache(bb, data, low_size=size // 2).batch(range(args.batch_size), [False] * args.batch_size)
    _sync(device)
    cache_seconds = time.perf_counter() - start
    t = torch.randint(1, 701, (args.batch_size,), generator=gen).to(device)
    noise = torch.randn(z0.shape, generator=gen).to(device)
    autocast = torch.autocast(device.type, enabled=device.type == "cuda")

    bank = UpsamplerBank.for_unet(bb.unet).to(device).train()
    bank_opt = torch.optim.AdamW(bank.parameters(), lr=1e-4)
    full = copy.deepcopy(bb.unet).requires_grad_(True).train()
    full_opt = torch.optim.AdamW(full.parameters(), lr=1e-5)
    inputs = bb.unet_inputs(embeds, size, size, do_cfg=False)
    target = prediction_target(bb.scheduler, z0, noise, t)
    noisy = bb.scheduler.add_noise(z0, noise, t)

    def tuning_step() -> None:
        with autocast:
            loss = tuning_loss(bb, bank, z0, embeds, features, t, noise)
        bank_opt.zero_grad(set_to_none=True)
        loss.backward()
        bank_opt.step()

    def full_step() -> None:
        with autocast:
            loss = F.mse_loss(full(noisy, t, **inputs, return_dict=False)[0].float(), target.float())
        full_opt.zero_grad(set_to_none=True)
        loss.backward()
        full_opt.step()

    methods = {"upsampler tuning": (tuning_step, bank.num_parameters()),
               "full fine-tuning": (full_step, sum(p.numel() for p in full.parameters()))}
    times: dict[str, list[float]] = {m: [] for m in methods}
    peaks: dict[str, list[float]] = {m: [] for m in methods}
    for step, _ in methods.values():  # warm-up, optimiser state
        step()
    for _ in range(args.repeats):
        for name, (step, _) in methods.items():
            with PeakMemory(device) as mem:
                _sync(device)
                begin = time.perf_counter()
                for _ in range(args.steps):
                    step()
                _sync(device)
                times[name].append((time.perf_counter() - begin) / args.steps)
            peaks[name].append(mem.mib)
    tuned = statistics.median(times["upsampler tuning"])
    rows = []
    for name, (_, params) in methods.items():
        med = statistics.median(times[name])
        rows.append({
            "model": args.model, "size": f"{size}x{size}", "batch": args.batch_size, "method": name,
            "trainable_params": params, "s_per_step": round(med, 4), "x_upsampler_tuning": round(med / tuned, 2),
            "peak_mib": round(max(peaks[name]), 1), "steps": args.steps, "repeats": args.repeats,
            "cache_fill_s": round(cache_seconds, 3) if name == "upsampler tuning" else "",
        })
        print(rows[-1], flush=True)
    return rows


def write(rows: list[dict], args: argparse.Namespace) -> None:
    device = device_name(args.threads)
    ratio = rows[1]["x_upsampler_tuning"]
    lines = [
        f"# Training cost per step: upsampler tuning vs full fine-tuning ({args.model})", "",
        f"Device: {device}; torch {torch.__version__}; {rows[0]['size']} px, batch {args.batch_size}, "
        f"median of {args.repeats} blocks of {args.steps} steps after one warm-up step each. Command: "
        f"`python benchmarks/bench_training.py --model {args.model} --size {rows[0]['size'].split('x')[0]} "
        f"--batch-size {args.batch_size} --steps {args.steps} --repeats {args.repeats}`.", "",
        f"Full fine-tuning costs **{ratio}x** the time per step of upsampler tuning (paper: about 5x). The "
        f"one-off cache fill (latents, text, pivot features) for this batch took {rows[0]['cache_fill_s']} s.", "",
        "| method | trainable params | s / step | x tuning | peak MiB |", "|---|---|---|---|---|",
    ]
    lines += [f"| {r['method']} | {r['trainable_params']:,} | {r['s_per_step']} | {r['x_upsampler_tuning']} | "
              f"{r['peak_mib']} |" for r in rows]
    write_results(RESULTS / f"training_{Path(args.model).name}", rows, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny' (random-weight SD built here), 'embedded', a folder or hub id")
    parser.add_argument("--size", type=int, default=None, help="high-res side in px (default: 2x the base side)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks per method, alternating")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rows = run(args)
    if rows is None:
        sys.exit(0)
    write(rows, args)


if __name__ == "__main__":
    main()
