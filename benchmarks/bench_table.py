"""The paper's Tables 1-2 on the embedded model: every method side by side at 4x and 16x pixels (and 64x).

    python benchmarks/bench_table.py --quick                       # minutes on 2 CPU cores
    python benchmarks/bench_table.py --sizes 64 128 256 --num-images 256 --steps 50

Rows: direct inference, Attn-SF, ScaleCrafter-style re-dilation, hires fix, the rivals users pick today
(HiDiffusion through its PyPI package, DemoFusion, FreeScale, Kohya's Deep Shrink), the tuning-free and tuned
self-cascade, the tuned cascade with HiDiffusion's windowed attention on its last stage (``tuned+window``), and the
training baselines (full fine-tuning, LoRA rank 4 and 32) wherever their runs
exist (``--bank``, ``--full``, ``--lora4``, ``--lora32``: a ``selfcascade train-upsamplers`` /
``selfcascade finetune`` run folder; a fine-tuned UNet is used at the size it was tuned at and above, as
the banks are: a 64x row with fine-tunes at 128 px compares them with banks trained on the same images).
The ``tuned`` rows use the model's shipped banks; ``--bank`` adds its bank as ``tuned-run`` (``tuned`` for a
model that ships none), so a table's cached images stay valid when training rows join it.
Columns: trainable parameters, training steps and training image size, seconds per image and peak memory measured side by
side in this run (batch 1, methods alternated, after a warm-up; ratios to direct inference at the same
size), and the metrics of ``selfcascade evaluate`` on the eval split (generated images cached under
``--out``, so an interrupted run resumes). The table is updated one size at a time: rows of the sizes
this run measures replace that size's rows, rows of other sizes made with the same images, steps and seed
are kept, so ``--sizes 256`` adds the 64x rows to an existing 4x/16x table (every ratio and timing column
still compares methods measured side by side at one size). ``--curves`` adds the paper's Fig. 5: FID_r at
the tuning size over training steps for the bank and the fine-tuning runs, from their ``snapshots/``.
Writes ``benchmarks/results/table_<model>.{md,csv}``, a grid of the same captions across methods per size
(``table_<model>_grid_<size>.png``) and ``table_<model>_curves.{md,png}``.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from selfcascade import SelfCascadePipeline
from selfcascade.loading import FINETUNE_INFO_FILE, load_unet_weights
from selfcascade.data.emoji import default_cache_dir, read_manifest
from selfcascade.evaluate import GenerationSpec, choose_records, generate_set, objects_text, percent, write_grid
from selfcascade.image_sets import emoji_renders
from selfcascade.scoring import make_reference, score, style_adherence
from selfcascade.io import atomic_path
from selfcascade.metrics import load_features
from selfcascade.upsamplers import UpsamplerBank

from bench_inference import PeakMemory, device_name, write_results

RESULTS = Path(__file__).resolve().parent / "results"
TRAINING_FREE = ["direct", "attn-sf", "redilate", "hires-fix", "hidiffusion", "demofusion", "freescale", "deep-shrink",
                 "tuning-free"]
GRID_COLUMNS = 4


@dataclass
class Method:
    label: str
    mode: str
    cascade: SelfCascadePipeline
    trainable: int = 0
    steps: int = 0
    upsamplers: str | None = None
    tuned_size: int | None = None  # fine-tuned UNets: used at this size and above
    shipped_banks: bool = False  # tuned with the model's own banks, one per stage
    window_attention: bool = False  # the cascade's final stage in shifted-window self-attention

    def cost(self, size: int) -> tuple[int, int]:
        """Trainable parameters and training steps behind this row at ``size``: with the shipped banks, the sum
        over the distinct banks its stages use (64 px: bank-64; 128 px: bank-64 and bank-128)."""
        if not self.shipped_banks:
            return self.trainable, self.steps
        return bank_cost(self.banks(size))

    def banks(self, size: int) -> set[str]:
        """The banks a tuned row uses at ``size``: the shipped ones of its stages, or the one it was given."""
        if not self.shipped_banks:
            return {self.upsamplers}
        stages = list(self.cascade.plan(size, size, self.mode).stages[1:])
        return set(self.cascade.backbone.default_banks(stages))

    def train_px(self, size: int) -> str:
        """Sides of the images its training saw (banks: of every stage's bank), '' when training-free."""
        if self.tuned_size is not None:
            return str(self.tuned_size)
        if self.mode != "tuned":
            return ""
        sides = {UpsamplerBank.load_config(b)["train_size"][0] for b in self.banks(size)}
        return "+".join(str(s) for s in sorted(sides))

    def spec(self, size: int, steps: int, seed: int) -> GenerationSpec:
        """The cache's settings; rows the mode and window flag do not tell apart (fine-tunes, a run's bank) add
        their label to the model name, so ``tuned+window`` folders are the ones ``selfcascade evaluate`` writes."""
        spec = GenerationSpec(model=self.cascade.backbone.name, mode=self.mode, size=size, steps=steps,
                              guidance=None, seed=seed, upsamplers=self.upsamplers,
                              window_attention=self.window_attention)
        if self.label != spec.label:
            spec.model += f"+{self.label}"
        return spec

    def __call__(self, prompt: str, size: int, steps: int, seed: int):
        return self.cascade(prompt, size, size, mode=self.mode, num_inference_steps=steps, seed=seed,
                            upsamplers=self.upsamplers, window_attention=self.window_attention, output_type="np",
                            progress=False)


def bank_cost(banks) -> tuple[int, int]:
    """Trainable parameters and training steps (from their configs) of these banks together."""
    return (sum(UpsamplerBank.from_pretrained(b).num_parameters() for b in banks),
            sum(UpsamplerBank.load_config(b).get("train_steps", 0) for b in banks))


def load_methods(args: argparse.Namespace) -> list[Method]:
    base = SelfCascadePipeline.from_pretrained(args.model)
    methods = [Method(mode, mode, base) for mode in TRAINING_FREE]
    shipped = bool(base.backbone.default_banks([base.backbone.base_size]))  # the model's own banks
    if shipped:
        methods.append(Method("tuned", "tuned", base, shipped_banks=True))
    if args.bank is not None:  # a bank trained beside the fine-tunes, on their budget: its own row
        bank = args.bank / "bank" if (args.bank / "bank").is_dir() else args.bank
        methods.append(Method("tuned-run" if shipped else "tuned", "tuned", base, *bank_cost([bank]),
                              upsamplers=str(bank)))
    tuned = next((m for m in methods if m.label == "tuned"), None)
    if tuned is not None:  # HiDiffusion's windowed attention on the cascade's last stage: kept if faster at equal quality
        methods.append(Method("tuned+window", "tuned", base, tuned.trainable, tuned.steps, tuned.upsamplers,
                              shipped_banks=tuned.shipped_banks, window_attention=True))
    for label in ("full", "lora4", "lora32"):
        run = getattr(args, label)
        if run is None:
            continue
        cascade = SelfCascadePipeline.from_pretrained(args.model)
        info = load_unet_weights(cascade.backbone.unet, run / "model", cascade.backbone.name)
        methods.append(Method(f"{label}-ft" if label == "full" else label, "direct", cascade,
                              info["trainable_parameters"], info["steps"], tuned_size=info["size"]))
    if args.methods:
        methods = [m for m in methods if m.label in args.methods]
    return methods


def time_methods(methods: list[Method], size: int, steps: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Median seconds per image and peak MiB at batch 1, methods alternated so they share machine states."""
    device = methods[0].cascade.backbone.device
    times = {m.label: [] for m in methods}
    peaks = {m.label: [] for m in methods}
    for m in methods:  # lazy initialisation and kernel choice at this size, before anything is timed
        m("warm-up", size, 2, seed=0)
    for rep in range(repeats):
        for m in methods:
            with PeakMemory(device) as mem:
                start = time.perf_counter()
                m("red apple, fruit, noto style", size, steps, seed=rep)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[m.label].append(time.perf_counter() - start)
            peaks[m.label].append(mem.mib)
    return {k: (statistics.median(v), max(peaks[k])) for k, v in times.items()}


def curves(args: argparse.Namespace, extractor, captions: list[str], reference, base_features, out: Path) -> list[dict]:
    """FID_r and FID_b at the tuning size over training steps (Fig. 5 of the paper), from each run's snapshots.
    Step 0 is where training starts: tuning-free for the bank (its residuals start at zero), direct inference
    for the fine-tunes; those images are the table's own (same folder under ``out``)."""
    points = []
    for label in ("bank", "full", "lora4", "lora32"):
        run = getattr(args, label)
        if run is None:
            continue
        start = "tuning-free" if label == "bank" else "direct"
        untrained = Method(start, start, SelfCascadePipeline.from_pretrained(args.model))
        sets = [(0, untrained, None, out / f"{start}-{args.curve_size}")]
        for snap in sorted((run / "snapshots").glob("step-*")):
            step = int(snap.name.split("-")[1])
            cascade = SelfCascadePipeline.from_pretrained(args.model)
            if label == "bank":
                method = Method("tuned", "tuned", cascade, upsamplers=str(snap))
            else:
                load_unet_weights(cascade.backbone.unet, snap, cascade.backbone.name)
                method = Method(label, "direct", cascade)
            sets.append((step, method, snap, out / "curves" / f"{label}-{step:06d}"))
        for step, method, snap, folder in sets:
            spec = method.spec(args.curve_size, args.steps, args.seed)
            spec.model += "" if snap is None else f"@{snap}"
            fake, _ = generate_set(method.cascade, spec, captions, folder, args.batch_size)
            row = score(extractor, fake, reference, base_features, method.cascade.backbone.base_size[0],
                        args.crops_per_image, args.seed)
            seconds = 0.0 if snap is None else snapshot_seconds(snap)
            points.append({"run": label, "step": step, "seconds": seconds,
                           **{k: row[k] for k in ("FID_r", "KID_r", "FID_b", "SWD_x1e3", "n_gen")}})
            print(points[-1], flush=True)
    return points


def snapshot_seconds(snapshot: Path) -> float | None:
    """Training wall time up to a snapshot, as its bank config or fine-tune info records it (None: not recorded)."""
    for name in ("config.json", FINETUNE_INFO_FILE):
        if (snapshot / name).is_file():
            return json.loads((snapshot / name).read_text()).get("train_seconds")
    return None


def time_to_quality(points: list[dict]) -> list[dict]:
    """Steps and wall time each run needs to reach the FID_b of the bank's last snapshot: the paper's "5x faster
    training" counts steps to quality (Table 1). A run that never reaches it within its snapshots has step None."""
    bank = [p for p in points if p["run"] == "bank"]
    if not bank:
        return []
    target = max(bank, key=lambda p: p["step"])["FID_b"]
    rows = []
    for run in dict.fromkeys(p["run"] for p in points):
        mine = sorted((p for p in points if p["run"] == run), key=lambda p: p["step"])
        reached = next((p for p in mine if p["FID_b"] <= target), None)
        best = min(mine, key=lambda p: p["FID_b"])
        rows.append({"run": run, "target": target, "step": reached and reached["step"],
                     "seconds": reached and reached["seconds"], "best": best["FID_b"], "best_step": best["step"],
                     "steps_run": mine[-1]["step"], "seconds_run": mine[-1]["seconds"]})
    return rows


def time_to_quality_lines(rows: list[dict]) -> list[str]:
    def minutes(seconds) -> str:
        return "not recorded" if seconds is None else f"{seconds / 60:.1f} min"

    lines = [f"Time to quality: steps and training wall time until FID_b <= {rows[0]['target']:.4g}, the bank's "
             "last snapshot's (snapshots only: a run reaches it at the first snapshot that does).", "",
             "| run | reaches it at step | wall time | best FID_b (step) | steps run (wall time) |",
             "|---|---|---|---|---|"]
    for r in rows:
        at = (f"{r['step']} | {minutes(r['seconds'])}" if r["step"] is not None
              else f"not within {r['steps_run']} | -")
        lines.append(f"| {r['run']} | {at} | {_f(r['best'])} ({r['best_step']}) | {r['steps_run']} "
                     f"({minutes(r['seconds_run'])}) |")
    return lines


def plot_curves(points: list[dict], path: Path, size: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), dpi=120)
    names = {"bank": "upsampler tuning (ours)", "full": "full fine-tuning", "lora4": "LoRA r4", "lora32": "LoRA r32"}
    for ax, metric, meaning in zip(axes, ("FID_r", "FID_b"), ("vs real renders", "vs the base model's samples")):
        for run in names:
            xs = [(p["step"], p[metric]) for p in points if p["run"] == run]
            if xs:
                ax.plot(*zip(*sorted(xs)), marker="o", label=names[run])
        ax.set_xlabel("training steps")
        ax.set_ylabel(f"{metric} at {size} px")
        ax.set_title(meaning, fontsize="medium")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path)


def _f(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--sizes", type=int, nargs="*", default=[64, 128],
                        help="square target sides (none, with --curves: only the curves)")
    parser.add_argument("--num-images", type=int, default=64, help="eval captions per (method, size)")
    parser.add_argument("--num-real", type=int, default=512, help="real eval renders per size")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats per method and size")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crops-per-image", type=int, default=4)
    parser.add_argument("--methods", nargs="+", default=None, help="only these rows (labels)")
    parser.add_argument("--bank", type=Path, default=None, help="train-upsamplers run (default: the shipped banks)")
    parser.add_argument("--full", type=Path, default=None, help="finetune --method full run")
    parser.add_argument("--lora4", type=Path, default=None, help="finetune --method lora --rank 4 run")
    parser.add_argument("--lora32", type=Path, default=None, help="finetune --method lora --rank 32 run")
    parser.add_argument("--curves", action="store_true", help="FID over training steps from the runs' snapshots")
    parser.add_argument("--curve-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/table"), help="cached images")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the table, grids and curves")
    parser.add_argument("--quick", action="store_true", help="16 images, 20 steps, 64 px only, 1 timing repeat")
    args = parser.parse_args()
    if args.curves and importlib.util.find_spec("matplotlib") is None:
        parser.error("--curves draws its plot with matplotlib: pip install -e '.[bench]'")
    if args.quick:
        args.num_images, args.steps, args.sizes, args.repeats, args.num_real = 16, 20, [64], 1, 256
    torch.set_num_threads(args.threads)

    methods = load_methods(args)
    base_cascade = methods[0].cascade
    base = base_cascade.backbone.base_size[0]
    cache_dir = default_cache_dir()
    records = read_manifest(cache_dir)
    caption_records = choose_records(records, args.num_images, args.seed)
    captions = [r["caption"] for r in caption_records]
    reference_records = choose_records(records, args.num_real, args.seed + 1)
    extractor = load_features("auto", None, device=base_cascade.backbone.device)
    base_spec = GenerationSpec(base_cascade.backbone.name, "direct", base, args.steps, None, args.seed)
    base_samples, _ = generate_set(base_cascade, base_spec, captions, args.out / f"direct-{base}", args.batch_size)
    base_features = extractor(base_samples)
    style_base = style_adherence(extractor, base_samples, captions)

    stem = args.results / f"table_{Path(args.model).name}{'_quick' if args.quick else ''}"
    settings = {"num_images": args.num_images, "steps": args.steps, "seed": args.seed}
    kept = [r for r in read_rows(stem.with_suffix(".csv")) if r["size"] not in args.sizes
            and all(r.get(k) == v for k, v in settings.items())]
    rows, references = [], {}
    for size in args.sizes:
        active = [m for m in methods if m.tuned_size is None or size >= m.tuned_size]
        timing = time_methods(active, size, args.steps, args.repeats)
        real = emoji_renders(cache_dir, reference_records, size)
        references[size] = make_reference(extractor, real, base, args.crops_per_image, args.seed, count_objects=True)
        style_real = style_adherence(extractor, real, [r["caption"] for r in reference_records])
        grid = {"real": emoji_renders(cache_dir, caption_records, size).head(GRID_COLUMNS)}
        for m in active:
            fake, _ = generate_set(m.cascade, m.spec(size, args.steps, args.seed), captions,
                                   args.out / f"{m.label}-{size}", args.batch_size)
            metrics = score(extractor, fake, references[size], base_features, base, args.crops_per_image, args.seed,
                            captions, count_objects=True)
            grid[m.label] = fake
            seconds, peak = timing[m.label]
            trainable, train_steps = m.cost(size)
            rows.append({"size": size, "pixels": f"{(size / base) ** 2:g}x", "method": m.label,
                         "trainable_params": trainable, "train_steps": train_steps, "train_px": m.train_px(size),
                         "s_per_image": round(seconds, 3),
                         "x_direct": round(seconds / timing["direct"][0], 3), "peak_mib": round(peak, 1), **metrics,
                         "style_acc_real": style_real, "style_acc_base": style_base, **settings})
            print({k: rows[-1][k] for k in ("size", "method", "x_direct", "FID_r", "pFID_r", "FID_b", "SWD_x1e3",
                                            "objects")},
                  flush=True)
        write_grid(stem.with_name(f"{stem.name}_grid_{size}.png"), grid, GRID_COLUMNS, cell=size)
        table = sorted(kept + rows, key=lambda r: r["size"])
        lines = table_lines(table, args, extractor.name, len(reference_records), base)
        lines += ["", f"Grids: the real render of the caption, then each method, for the first {GRID_COLUMNS} captions "
                  f"({'; '.join(captions[:GRID_COLUMNS])}), seed {args.seed} onwards:", ""]
        lines += [f"![{s} px]({stem.name}_grid_{s}.png)" for s in sorted({r['size'] for r in table})
                  if stem.with_name(f"{stem.name}_grid_{s}.png").is_file()]
        write_results(stem, table, lines)  # after every size

    if args.curves:
        size = args.curve_size
        reference = references.get(size) or make_reference(
            extractor, emoji_renders(cache_dir, reference_records, size), base, args.crops_per_image, args.seed)
        points = curves(args, extractor, captions, reference, base_features, args.out)
        if points:
            plot_curves(points, stem.with_name(stem.name + "_curves.png"), size)
            lines = [f"# FID over training steps at {size} px on the `{Path(args.model).name}` model", "",
                     f"{args.num_images} eval-split captions, {args.steps} DDIM steps, seed {args.seed}, one image per "
                     "caption per snapshot; step 0: tuning-free for the bank, direct inference for the fine-tunes. "
                     "FID_r against real renders, FID_b against the base model's own samples (downsampled), as in the "
                     f"table. ![curves]({stem.name}_curves.png)", "",
                     "| run | step | FID_r | KID_r | FID_b | SWD x1e3 |", "|---|---|---|---|---|---|"]
            lines += [f"| {p['run']} | {p['step']} | {_f(p['FID_r'])} | {_f(p['KID_r'], 3)} | {_f(p['FID_b'])} | "
                      f"{_f(p['SWD_x1e3'])} |" for p in points]
            quality = time_to_quality(points)
            if quality:
                lines += ["", *time_to_quality_lines(quality)]
            with atomic_path(stem.with_name(stem.name + "_curves.md")) as tmp:
                tmp.write_text("\n".join(lines) + "\n")


def read_rows(path: Path) -> list[dict]:
    """Rows of an earlier table (numbers parsed back), or none."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _parse(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return None if text == "" else text


def _style_ceilings(rows: list[dict], base: int) -> str:
    """The style adherence of the real renders per size and of the base model's own samples, for scale."""
    real = {r["size"]: r.get("style_acc_real") for r in rows}
    own = next((r.get("style_acc_base") for r in rows if r.get("style_acc_base") is not None), None)
    return (", ".join(f"real renders at {s} px: {percent(v)}" for s, v in real.items())
            + f"; the base model's own {base} px samples of these captions: {percent(own)}")


def table_lines(rows: list[dict], args: argparse.Namespace, features: str, num_real: int, base: int) -> list[str]:
    name = Path(args.model).name
    lines = [
        f"# Methods side by side on the `{name}` model", "",
        f"Device: {device_name(args.threads)}; torch {torch.__version__}. {args.num_images} eval-split captions (unseen "
        f"concepts), one image each (seeds {args.seed}-{args.seed + args.num_images - 1}), {args.steps} DDIM steps, the "
        f"model's default guidance; {num_real} real eval renders per size; features `{features}`. "
        f"Time and peak memory: batch 1, median of {args.repeats} after a warm-up, methods alternated in one process "
        "(CPU peak = rise of the resident set). KID: mean ± std over subsets. Counts: (generated / reference). "
        "Lower is better, except style: the share of images the feature network assigns the style their caption "
        f"names (prompt adherence without CLIP; {_style_ceilings(rows, base)}); no concept column, as the network "
        "cannot name concepts it never saw (concept top-5 on train captions: `prompt_adherence.py`). Objects: "
        "separate foreground objects "
        "per image, mean and share with more than one (repetition of the subject), real renders' in parentheses. "
        "Train px: side of the images a "
        "row's training saw (fine-tuned UNets are used at that size and above, like the banks). The rows of one "
        "size come from one run, so ratios and timings compare methods measured side by side.", "",
        "| pixels | size | method | trainable params | train steps | train px | s / image | x direct | peak MiB | FID_r | "
        "KID_r | pFID_r | pKID_r | FID_b | KID_b | SWD x1e3 | style | objects |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        n, nc, nb = f"({r['n_gen']}/{r['n_real']})", f"({r['n_gen_crops']}/{r['n_real_crops']})", f"({r['n_gen']}/{r['n_base']})"
        lines.append(
            f"| {r['pixels']} | {r['size']} | {r['method']} | {r['trainable_params']:,} | {r['train_steps']} | "
            f"{r.get('train_px') or '-'} | "
            f"{r['s_per_image']} | {r['x_direct']} | {r['peak_mib']} | {_f(r['FID_r'])} {n} | {_f(r['KID_r'], 3)} ± "
            f"{_f(r['KID_r_std'], 2)} | {_f(r['pFID_r'])} {nc} | {_f(r['pKID_r'], 3)} ± {_f(r['pKID_r_std'], 2)} | "
            f"{_f(r['FID_b'])} {nb} | {_f(r['KID_b'], 3)} | {_f(r['SWD_x1e3'])} | {percent(r.get('style_acc'))} | "
            f"{objects_text(r)} |")
    return lines


if __name__ == "__main__":
    main()
