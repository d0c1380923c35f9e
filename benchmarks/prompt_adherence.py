"""Does a model draw what it is asked? Concept and style of base-size samples, named by the emoji feature network.

For random captions of a split, each model samples at its own base size (one pass, new seeds: direct inference at
the base size), and the real renders of the same captions are scored the same way:

- concept top-5: share of images whose caption's concept is among the network's 5 best guesses (train-split
  captions only: the network knows the train concepts, not the held-out ones);
- style: share whose style the network names as the caption's ("..., noto style");
- FID (emoji features) of the samples against the real renders of the same captions, at equal counts.

``--prompt-form name`` prompts with the emoji's name alone ("red apple"), as a new user types, instead of the
training caption ("red apple, fruit, noto style"); its style column is then what the model picks unasked.
``name_style`` adds the style ("red apple, noto style").

    python benchmarks/prompt_adherence.py --model embedded --model src/selfcascade/embedded_model --count 48

Writes ``benchmarks/results/prompt_adherence.md`` (and ``.csv``) and a grid of the first captions.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch
from PIL import Image

from selfcascade import SelfCascadePipeline
from selfcascade.data.emoji import PROMPT_FORMS, default_cache_dir, read_manifest
from selfcascade.data.loader import load_images
from selfcascade.grid import make_grid
from selfcascade.io import atomic_path
from selfcascade.metrics import EmojiFeatures, frechet_distance
from selfcascade.metrics.emoji_features import load_feature_net
from selfcascade.metrics.train_features import accuracy

RESULTS = Path(__file__).resolve().parent / "results"
REAL_SIZE = 128


def pick_records(records: list[dict], split: str, count: int, seed: int) -> list[dict]:
    pool = [r for r in records if r["split"] == split]
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
    return [pool[i] for i in order[:count]]


def sample(cascade: SelfCascadePipeline, captions: list[str], steps: int, first_seed: int, batch: int,
           guidance: float | None = None) -> torch.Tensor:
    """uint8 [N, 3, S, S] samples at the model's base size, one new seed per caption (guidance: the model's own
    when None)."""
    h, w = cascade.backbone.base_size
    out = []
    for i in range(0, len(captions), batch):
        chunk = captions[i:i + batch]
        images = cascade(chunk, h, w, mode="direct", num_inference_steps=steps, seed=first_seed + i,
                         guidance_scale=guidance, output_type="pt", progress=False).images
        out.append((images * 255).round().to(torch.uint8))
    return torch.cat(out)


def score(net, labels: dict, extractor: EmojiFeatures, images: torch.Tensor, real: torch.Tensor,
          records: list[dict]) -> dict:
    concept_index = {c: i for i, c in enumerate(labels["concepts"])}
    style_index = {s: i for i, s in enumerate(labels["styles"])}
    known = all(r["concept"] in concept_index for r in records)
    concepts = torch.tensor([concept_index.get(r["concept"], -1) for r in records])
    styles = torch.tensor([style_index[r["style"]] for r in records])
    acc = accuracy(net, images, concepts, styles)
    fid = frechet_distance(extractor(images.float() / 255), extractor(real.float() / 255))
    return {"concept_top5": acc["concept_top5"] if known else None, "style": acc["style_top1"], "fid": fid}


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True,
                        help="a model to score: 'embedded', a folder, or LABEL=PATH (repeat for several)")
    parser.add_argument("--count", type=int, default=48, help="captions per split")
    parser.add_argument("--splits", nargs="+", default=["train", "eval"])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, nargs="+", default=None,
                        help="classifier-free guidance scales to sweep (default: each model's own)")
    parser.add_argument("--prompt-form", nargs="+", choices=list(PROMPT_FORMS), default=["caption"],
                        help="prompt with the training caption, the emoji's name alone, or the name and style "
                             "(rows per form)")
    parser.add_argument("--first-seed", type=int, default=1000, help="seeds never used in training or earlier reports")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="which captions are drawn")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--grid-rows", type=int, default=8)
    parser.add_argument("--output", type=Path, default=RESULTS / "prompt_adherence")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cache_dir = default_cache_dir()
    records = read_manifest(cache_dir)
    net, labels = load_feature_net()
    extractor = EmojiFeatures()
    named = [m.split("=", 1) if "=" in m else (m, m) for m in args.model]
    sweep = args.guidance or [None]
    forms = args.prompt_form
    models = [(label + ("" if g is None else f" g={g:g}") + ("" if len(forms) == 1 else f" ({form})"), path, g, form)
              for label, path in named for g in sweep for form in forms]
    cascades = {path: SelfCascadePipeline.from_pretrained(path, device="cpu") for _, path in named}  # once per model
    rows, grids = [], []
    for split in args.splits:
        chosen = pick_records(records, split, args.count, args.seed)
        prompts = {form: [PROMPT_FORMS[form](r) for r in chosen] for form in forms}
        real = load_images(cache_dir, chosen, REAL_SIZE, split, progress=False)
        rows.append({"split": split, "model": "real renders", "steps": "-", "s_per_image": None,
                     **score(net, labels, extractor, real, real, chosen), "fid": None})
        samples = {}
        for label, path, guidance, form in models:
            t0 = time.perf_counter()
            images = sample(cascades[path], prompts[form], args.steps, args.first_seed, args.batch, guidance)
            seconds = (time.perf_counter() - t0) / len(chosen)
            samples[label] = images
            rows.append({"split": split, "model": label, "steps": args.steps, "s_per_image": seconds,
                         **score(net, labels, extractor, images, real, chosen)})
            print(rows[-1], flush=True)
        n = min(args.grid_rows, len(chosen))
        cells = [[to_pil(real[i]), *(to_pil(samples[label][i]) for label, *_ in models)] for i in range(n)]
        row_labels = [r["caption"][:40] for r in chosen[:n]]
        grids.append((split, make_grid(cells, row_labels, ["real", *(m for m, *_ in models)], cell=REAL_SIZE)))

    args.output.parent.mkdir(parents=True, exist_ok=True)
    guidance_text = "guidance as labelled" if args.guidance else "each model's default guidance"
    form_text = {"caption": "prompted with the training captions", "name": "prompted with the emoji's name alone",
                 "name_style": "prompted with the name and style"}
    lines = ["# Prompt adherence at the base size", "",
             f"{args.count} random captions per split (caption seed {args.seed}), one sample each (seeds "
             f"{args.first_seed}+), {args.steps} DDIM steps, {guidance_text}, "
             f"{' / '.join(form_text[f] for f in forms)}; scored by the emoji "
             f"feature network `{extractor.name}`; real renders at {REAL_SIZE} px. Concept top-5 only for train-split "
             "captions (the network never saw held-out concepts). FID: emoji features, samples vs the real renders "
             f"of the same captions ({args.count} vs {args.count}: compare within a split only).", "",
             "| split | model | concept top-5 | style | FID vs renders | s / image |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['split']} | {r['model']} | {_fmt(r['concept_top5'], '.0%')} | {_fmt(r['style'], '.0%')} | "
                     f"{_fmt(r['fid'], '.1f')} | {_fmt(r['s_per_image'], '.2f')} |")
    lines.append("")
    for split, grid in grids:
        path = args.output.with_name(f"{args.output.name}_{split}.png")
        with atomic_path(path, ".png") as tmp:
            grid.save(tmp)
        lines.append(f"![{split}]({path.name})")
    lines.append("")
    with atomic_path(args.output.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines))
    with atomic_path(args.output.with_suffix(".csv")) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
