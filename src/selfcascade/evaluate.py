"""Score generation modes against real images at higher resolutions: the paper's Tables 1-2 (section 5.2).

    selfcascade evaluate --modes direct tuning-free --sizes 256 512 --num-images 64 --steps 50

For each target size and mode, one image per caption for ``--num-images`` captions of the emoji eval
split (concepts the embedded model never saw; seeded choice, image i gets seed ``--seed`` + i), then:

- FID_r / KID_r: generated images vs real renders at the target size (the extractor resizes both);
- pFID_r / pKID_r: ``--crops-per-image`` random base-size crops of both sets instead of resizing, so
  the detail at the new scale is judged at native resolution;
- FID_b / KID_b: generated images downsampled to the base size vs the base model's own samples (same
  captions and seeds at the base size): how much of the base model's layout the mode keeps;
- SWD: sliced Wasserstein distance on Laplacian pyramids (x1e3), generated vs real at the target size;
- objects: separate foreground objects per image (mean, and the share of images with more than one), beside the
  real renders' (:mod:`selfcascade.metrics.objects`): repetition of the subject. Images on a plain background
  only, so n/a with ``--real``;
- peak MiB: the most GPU memory torch allocated while generating the set in this run (n/a on CPU or when every
  image came from the cache).

``--prompts FILE`` takes the captions from a file and ``--real DIR`` the real images from a folder (centre-cropped
and resized to each size), for the paper's protocol on LAION-style data. Under ``accelerate launch`` every
process generates its share of the missing images into the shared cache; the main process then scores them.

Features: Inception-V3 (torchmetrics/torch-fidelity) when installed with its weights cached, else
the emoji network the project trains and ships (``--features``; the table names the one used). KID
is reported as mean ± std over subsets; every number carries its sample counts, since FID is biased
at small counts. Generated images are cached as PNGs under ``OUT/generated/<mode>-<size>/``, so an
interrupted run continues where it stopped; ``--generated DIR`` scores any model's images instead. Scoring reads
every set ``--score-batch-size`` images at a time (:mod:`selfcascade.scoring`), so its memory does not grow with
the set beyond features and SWD descriptors.
Writes ``OUT/results.md``, ``OUT/results.csv`` and one image grid per size.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .commands import add_command, read_prompts, run_module
from .image_sets import IMAGE_SUFFIXES, ImageSet, emoji_renders, file_set, folder_set, image_files, real_folder_set
from .io import atomic_path, save_png
from .modes import CASCADE_MODES, MODES, WINDOW_SUFFIX
from .scoring import DEFAULT_BATCH_SIZE, make_reference, score, summarise

logger = logging.getLogger(__name__)

META_JSON = "meta.json"


# --------------------------------------------------------------------------------------------------
# Image sets


def choose_records(records: list[dict], count: int, seed: int) -> list[dict]:
    """``count`` eval-split records in a seeded order; a larger ``count`` extends a smaller one's choice,
    so cached images stay valid when a run asks for more."""
    chosen = [r for r in records if r["split"] == "eval"]
    if count > len(chosen):
        raise ValueError(f"asked for {count} images but the eval split has {len(chosen)}; lower the count")
    random.Random(seed).shuffle(chosen)
    return chosen[:count]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    array = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


@dataclass
class GenerationSpec:
    """What one cached folder of generated images holds; a folder made with other settings is refused."""

    model: str
    mode: str
    size: int
    steps: int
    guidance: float | list[float]
    seed: int
    upsamplers: str | None = None
    window_attention: bool = False  # the cascade's final stage in windowed self-attention

    @property
    def label(self) -> str:
        """The mode as ``--modes`` names it: ``tuned+window`` for the windowed cascade."""
        return self.mode + (WINDOW_SUFFIX if self.window_attention else "")

    @property
    def folder_name(self) -> str:
        return f"{self.label}-{self.size}"

    def settings(self) -> dict:
        """What a folder's meta.json records; window_attention only when on, so folders made before it existed
        still match."""
        settings = asdict(self)
        if not self.window_attention:
            del settings["window_attention"]
        return settings


def generate_set(cascade, spec: GenerationSpec, captions: list[str], folder: Path, batch_size: int,
                 progress: bool = True) -> tuple[torch.Tensor, float]:
    """:func:`fill_set`, then the images read back from the PNGs (so fresh and cached runs score identical pixels),
    all in memory, and the seconds per image: for small sets (benchmarks, tests); `evaluate` scores
    :func:`read_set` batch by batch."""
    seconds_per_image, _ = fill_set(cascade, spec, captions, folder, batch_size, progress)
    return read_set(folder, len(captions)).read_all(), seconds_per_image


def _set_paths(folder: Path, count: int) -> list[Path]:
    return [folder / f"{i:05d}.png" for i in range(count)]


def fill_set(cascade, spec: GenerationSpec, captions: list[str], folder: Path, batch_size: int | None,
             progress: bool = True) -> tuple[float, float | None]:
    """Generate the images of ``captions`` missing in ``folder`` (caption i with seed ``spec.seed + i``); returns
    the mean generation time per image over every image this folder ever generated, and the peak GPU memory (MiB,
    ``torch.cuda.max_memory_allocated``, weights included) of the images generated in this call: None when none
    were generated or the model runs on CPU (nothing comparable to measure there).

    Under ``accelerate launch`` every process calls this and generates its share of the missing images; each
    image depends only on its caption and seed, so the split changes no pixel. Returns once all are written.
    Images are written after every call of ``batch_size`` images (None: by size, as ``generate`` batches)."""
    from .pipeline import default_batch_size
    from .processes import gather, is_main_process, my_share, wait_for_everyone

    batch_size = batch_size or default_batch_size(spec.size, spec.size)

    meta_path = folder / META_JSON
    settings = spec.settings()
    weights = cascade.weights_fingerprint(spec.size, spec.size, spec.mode, spec.upsamplers)
    meta = (json.loads(meta_path.read_text()) if meta_path.exists() else
            {"settings": settings, "weights": weights, "captions": [], "generated": 0, "seconds": 0.0})
    common = min(len(captions), len(meta["captions"]))
    if meta["settings"] != settings or meta["captions"][:common] != captions[:common]:
        raise ValueError(f"{folder} holds images made with other settings or captions ({meta['settings']}, not "
                         f"{settings}); delete it or write to another --out")
    if meta.get("weights") != weights:
        raise ValueError(f"{folder} holds images made with other weights (fingerprint {meta.get('weights')}, not "
                         f"{weights}: the model, its banks or its selfcascade.json defaults changed since); delete it "
                         "or write to another --out")
    meta["captions"] = captions if len(captions) > common else meta["captions"]
    recorded_seconds, recorded_count = meta["seconds"], meta["generated"]
    paths = _set_paths(folder, len(captions))
    missing = [i for i, p in enumerate(paths) if not p.exists()]
    wait_for_everyone()  # every process has listed the same missing images before any process writes one
    mine = my_share(missing)
    main = is_main_process()

    def record(seconds: float, count: int) -> None:  # the main process keeps meta.json, after every chunk
        meta["seconds"], meta["generated"] = recorded_seconds + seconds, recorded_count + count
        if main:
            with atomic_path(meta_path) as tmp:
                tmp.write_text(json.dumps(meta, indent=1) + "\n")

    done = len(captions) - len(missing)
    bar = tqdm(total=done + len(mine), initial=done, desc=f"{spec.label} {spec.size} px", unit="img",
               disable=not progress or not mine)
    seconds = 0.0
    device = cascade.backbone.device
    peak_mib = None  # this process's, over its chunks
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        out = cascade([captions[i] for i in chunk], spec.size, spec.size, mode=spec.mode, num_inference_steps=spec.steps,
                      guidance_scale=spec.guidance, seed=[spec.seed + i for i in chunk], output_type="pil",
                      progress=False, upsamplers=spec.upsamplers, window_attention=spec.window_attention)
        seconds += time.perf_counter() - t0
        if device.type == "cuda":
            peak_mib = max(peak_mib or 0.0, torch.cuda.max_memory_allocated(device) / 2**20)
        for i, image, seed in zip(chunk, out.images, out.seeds):
            save_png(image, paths[i], {**out.settings, "prompt": [captions[i]]}, seed)
        record(seconds, start + len(chunk))
        bar.update(len(chunk))
    bar.close()
    shares = gather((seconds, len(mine), peak_mib))  # also waits until every process has written its share
    if len(shares) > 1 and missing:
        record(sum(s for s, _, _ in shares), sum(n for _, n, _ in shares))
    total_seconds = recorded_seconds + sum(s for s, _, _ in shares)
    total_count = recorded_count + sum(n for _, n, _ in shares)
    peaks = [p for _, _, p in shares if p is not None]  # each process on its own GPU: the largest
    return total_seconds / max(1, total_count), max(peaks) if peaks else None


def read_set(folder: Path, count: int) -> ImageSet:
    """The first ``count`` images :func:`fill_set` wrote to ``folder``, read when scored."""
    return file_set(_set_paths(folder, count))


# --------------------------------------------------------------------------------------------------
# Results


COLUMNS = ["size", "pixels", "mode", "FID_r", "KID_r", "KID_r_std", "pFID_r", "pKID_r", "pKID_r_std", "FID_b", "KID_b",
           "KID_b_std", "SWD_x1e3", "style_acc", "n_gen", "n_real", "n_gen_crops", "n_real_crops", "n_base", "s_per_image", "features",
           "objects", "objects_gt1", "objects_real", "objects_gt1_real", "peak_mib"]


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def objects_text(row: dict) -> str:
    """Mean objects per image, share with more than one, then the real images' in parentheses: "1.6, 38% (real 1.1,
    5%)"; n/a when not counted."""
    if row.get("objects") is None:
        return "n/a"
    text = f"{row['objects']:.2f}, {percent(row['objects_gt1'])}"
    if row.get("objects_real") is not None:
        text += f" (real {row['objects_real']:.2f}, {percent(row['objects_gt1_real'])})"
    return text


def markdown_table(rows: list[dict]) -> list[str]:
    """One line per (size, mode); counts in parentheses: (generated / reference) images or crops."""
    lines = ["| size | pixels | mode | FID_r | KID_r | pFID_r | pKID_r | FID_b | KID_b | SWD x1e3 | style | s / image | "
             "objects | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        n_r, n_p, n_b = f"({r['n_gen']}/{r['n_real']})", f"({r['n_gen_crops']}/{r['n_real_crops']})", f"({r['n_gen']}/{r['n_base']})"
        base = (f"{_fmt(r['FID_b'])} {n_b} | {_fmt(r['KID_b'])} ± {_fmt(r['KID_b_std'], 2)} {n_b}"
                if r["FID_b"] is not None else "n/a | n/a")
        lines.append(
            f"| {r['size']} | {r['pixels']} | {r['mode']} | {_fmt(r['FID_r'])} {n_r} | {_fmt(r['KID_r'])} ± "
            f"{_fmt(r['KID_r_std'], 2)} {n_r} | {_fmt(r['pFID_r'])} {n_p} | {_fmt(r['pKID_r'])} ± {_fmt(r['pKID_r_std'], 2)} "
            f"{n_p} | {base} | {_fmt(r['SWD_x1e3'])} {n_r} | {percent(r['style_acc'])} | {_fmt(r['s_per_image'], 3)} | "
            f"{objects_text(r)} | {mib(r.get('peak_mib'))} |")
    return lines


def write_results(out: Path, rows: list[dict], header: list[str]) -> None:
    """``results.csv`` (every column) and ``results.md`` (header + table), each replaced atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(out / "results.csv") as tmp:
        tmp.write_text(buffer.getvalue())
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text("\n".join([*header, "", *markdown_table(rows), ""]) + "\n")


def write_grid(path: Path, rows: dict[str, torch.Tensor], columns: int, cell: int) -> None:
    """Rows of images (first ``columns`` of each set), labelled; smaller images are enlarged."""
    from .grid import make_grid

    cells = [to_pil(images[:columns]) for images in rows.values()]
    width = min(len(c) for c in cells)
    grid = make_grid([c[:width] for c in cells], list(rows), [str(i) for i in range(width)], cell=cell)
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")


# --------------------------------------------------------------------------------------------------
# The command


def _generated_sets(root: Path) -> dict[tuple[int, str], ImageSet]:
    """``--generated DIR``: its images, or one set per subfolder (named by the subfolder), keyed by (size, name)."""
    if not root.is_dir():
        raise FileNotFoundError(f"--generated {root} is not a folder of images (or of folders of images)")
    folders = [root] if image_files(root) else sorted(p for p in root.iterdir() if p.is_dir() and image_files(p))
    if not folders:
        raise FileNotFoundError(f"no images in {root} or its subfolders")
    sets = {}
    for folder in folders:
        images = folder_set(folder)
        height, width = images.size
        if height != width:
            raise ValueError(f"{folder}: images are {width}x{height}; the real renders are square")
        sets[(height, folder.name)] = images
    return sets


def _default_guidance_text(backbone) -> str:
    base, refine = backbone.stage_guidance(2)
    return f"{base:g}" if base == refine else f"{base:g} at the base size, {refine:g} at later stages (the model's default)"


def _captions(args: argparse.Namespace, records: list[dict]) -> tuple[list[str], list[dict]]:
    """The captions to generate (--prompts' first --num-images lines, else a seeded choice of eval-split records)
    and the records they come from (none with --prompts)."""
    if args.prompts is not None:
        prompts = read_prompts(args.prompts)
        if len(prompts) < args.num_images:
            raise ValueError(f"--prompts {args.prompts} holds {len(prompts)} prompts, fewer than --num-images "
                             f"{args.num_images}")
        return prompts[:args.num_images], []
    chosen = choose_records(records, args.num_images, args.seed)
    return [r["caption"] for r in chosen], chosen


def evaluate(args: argparse.Namespace) -> list[dict]:
    """Run the evaluation described in the module docstring; returns the table rows (on the main process; other
    processes of ``accelerate launch`` generate their share of the images and return [])."""
    from .data.emoji import default_cache_dir, read_manifest
    from .data.loader import check_images
    from .metrics import load_features
    from .processes import is_main_process, process_device

    # 1. data, model, features (every process loads them, so a bad option fails everywhere alike)
    args.device = process_device(args.device)
    for option, folder in (("--real", args.real), ("--base-samples", args.base_samples)):
        if folder is not None and not (Path(folder).is_dir() and image_files(Path(folder))):  # before hours of sampling
            raise FileNotFoundError(f"{option} {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) there")
    out = Path(args.out)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    emoji_captions = args.generated is None and args.prompts is None
    records = read_manifest(cache_dir) if args.real is None or emoji_captions else []
    num_eval = sum(r["split"] == "eval" for r in records)
    reference_records = [] if args.real else choose_records(records, min(args.num_real, num_eval), args.seed + 1)
    cascade = None
    if args.generated is None or args.base_size is None:
        from .commands import load_cascade

        cascade = load_cascade(args)
    base = args.base_size or cascade.backbone.base_size[0]
    sizes = args.sizes or (2 * base, 4 * base)
    if args.generated is None and not args.real:  # the renders to score against must exist before hours of sampling
        for size in sizes:
            check_images(cache_dir, reference_records, size)
    extractor = load_features(args.features, args.feature_weights,
                              device=cascade.backbone.device if cascade is not None else "cpu")
    logger.info("features: %s", extractor.name)

    # 2. the image sets to score: generated here (cached per mode and size, shared between processes) or read
    #    from --generated
    folders: dict[tuple[int, str], Path] = {}
    timings: dict[tuple[int, str], float | None] = {}
    peaks: dict[tuple[int, str], float | None] = {}  # MiB, of the images generated in this run on a GPU
    chosen: list[dict] = []
    captions: list[str] | None = None  # of the generated images, when generated here
    guidance = None
    base_folder = None
    if args.generated is None:
        captions, chosen = _captions(args, records)
        guidance = args.guidance  # None: the model's default, per stage

        def generated(label: str, size: int) -> tuple[Path, float, float | None]:
            mode = label.removesuffix(WINDOW_SUFFIX)
            spec = GenerationSpec(model=cascade.backbone.name, mode=mode, size=size, steps=args.steps, guidance=guidance,
                                  seed=args.seed, upsamplers=args.upsamplers if mode == "tuned" else None,
                                  window_attention=label != mode)
            folder = out / "generated" / spec.folder_name
            return folder, *fill_set(cascade, spec, captions, folder, args.batch_size, progress=not args.no_progress)

        if args.base_samples is None:
            base_folder = generated("direct", base)[0]
        for size in sizes:
            for mode in args.modes:
                folders[(size, mode)], timings[(size, mode)], peaks[(size, mode)] = generated(mode, size)
    if not is_main_process():
        return []
    sets = ({key: read_set(folder, len(captions)) for key, folder in folders.items()} if args.generated is None
            else _generated_sets(Path(args.generated)))
    timings = timings or {key: None for key in sets}
    count_objects = args.real is None  # plain-background images only: photos give meaningless counts
    base_samples = (folder_set(Path(args.base_samples)) if args.base_samples else
                    read_set(base_folder, len(captions)) if base_folder is not None else None)
    batch = args.score_batch_size
    base_features = summarise(extractor, base_samples, batch_size=batch).features if base_samples is not None else None

    # 3. score size by size against the real images at that size
    caption_text = (f"{len(captions)} captions from `{args.prompts}` (its first lines)" if args.prompts else
                    f"{len(chosen)} eval-split captions (seed {args.seed})")
    header = [
        "# Self-cascade evaluation", "",
        f"Features: `{extractor.name}`. Generated: "
        + (f"`{args.generated}`" if args.generated else
           f"{args.model}, {caption_text}, one image each with seeds "
           f"{args.seed}-{args.seed + len(captions) - 1}, {args.steps} steps, guidance "
           f"{guidance if guidance is not None else _default_guidance_text(cascade.backbone)}")
        + ". Real: "
        + (f"up to {args.num_real} images of `{args.real}` per size (shorter side at least the size, centre-cropped "
           "and resized to it)" if args.real else f"{len(reference_records)} eval-split renders per size")
        + f". Base size {base} px; pFID/pKID on {args.crops_per_image} random {base} px crops per image; FID_b/KID_b "
        "against "
        + (f"`{args.base_samples}`" if args.base_samples else
           "n/a" if base_samples is None else "the base model's samples (same captions and seeds)")
        + ". KID: mean ± std over 100 random subsets of up to 1000 (std ~0 when both sets are that small: every "
        "subset is then the whole set). Counts in parentheses: (generated / reference) images or crops, the "
        "reference being the real images, or the base samples for FID_b/KID_b. Lower is better, except style: "
        "the share of generated images the emoji network assigns the style their caption names (prompt "
        "adherence without CLIP; n/a with other features or without captions naming a style). Objects: separate "
        "foreground objects per image (mean, then the share of images with more than one; the real "
        "images' in parentheses), counted on the plain background of emoji-like images (foreground differs from "
        "the border's median colour, hairline gaps closed, holes filled, parts under 1% of the image ignored), so "
        "more than the real renders' means a repeated subject; n/a with --real (photos have no plain background). "
        "Peak MiB: the most GPU memory torch allocated (weights included) while generating the set's images in this "
        "run; n/a on CPU or when every image came from the cache.",
    ]
    rows: list[dict] = []
    for size in sorted({size for size, _ in sets}):
        real = (real_folder_set(Path(args.real), size, args.num_real) if args.real else
                emoji_renders(cache_dir, reference_records, size))
        reference = make_reference(extractor, real, base, args.crops_per_image, args.seed, batch, count_objects)
        grid_rows = {"real": (emoji_renders(cache_dir, chosen, size) if chosen and not args.real else real)
                     .head(args.grid_images)}
        if base_samples is not None:
            grid_rows["base"] = base_samples.head(args.grid_images)
        for (set_size, name), fake in sets.items():
            if set_size != size:
                continue
            logger.info("scoring %s at %d px", name, size)
            row = {"size": size, "pixels": f"{(size / base) ** 2:g}x", "mode": name,
                   "objects": None, "objects_gt1": None, "objects_real": None, "objects_gt1_real": None,
                   **score(extractor, fake, reference, base_features, base, args.crops_per_image, args.seed,
                           captions, batch, count_objects),
                   "s_per_image": timings[(size, name)], "features": extractor.name,
                   "peak_mib": peaks.get((size, name))}
            rows.append(row)
            grid_rows[name] = fake.head(args.grid_images)
            logger.info("%s", {k: v for k, v in row.items() if k != "features"})
        write_grid(out / f"grid_{size}.png", grid_rows, args.grid_images, cell=max(size, 64))
        write_results(out, rows, header)  # after every size, so an interrupted run keeps what it measured
    logger.info("wrote %s and %s", out / "results.md", out / "results.csv")
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .commands import add_model_args, parse_guidance
    from .metrics import FEATURE_KINDS

    add_model_args(parser)
    parser.add_argument("--modes", nargs="+", choices=[*MODES, *(m + WINDOW_SUFFIX for m in CASCADE_MODES)],
                        default=["direct", "tuning-free"],
                        help="MODE+window: a cascade mode with its final stage's self-attention in shifted windows "
                             "(generate --window-attention)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="square target sides in pixels (default: 2x and 4x the base side, 4x and 16x its pixels)")
    parser.add_argument("--num-images", type=int, default=64, help="captions, one generated image each")
    parser.add_argument("--prompts", default=None, metavar="FILE",
                        help="captions to generate from: the first --num-images lines of FILE, one per line (default: "
                             "a seeded choice of the emoji eval split)")
    parser.add_argument("--num-real", type=int, default=512,
                        help="real images per size (capped at the eval split, or at the usable images of --real)")
    parser.add_argument("--real", default=None, metavar="DIR",
                        help="a folder of real images to score against instead of the emoji renders: the first "
                             "--num-real (by file name) at least SIZE px on their shorter side, centre-cropped to a "
                             "square and resized to SIZE (bicubic); smaller ones are skipped")
    parser.add_argument("--steps", type=int, default=50, help="scheduler steps of a full schedule")
    parser.add_argument("--guidance", type=parse_guidance, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--upsamplers", default=None, help="feature-upsampler bank for mode 'tuned'")
    parser.add_argument("--seed", type=int, default=0, help="caption choice; image i gets seed SEED + i")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images generated per call, written after each (default: by size, as generate: 16 at "
                             "512 px, 4 at 1024, 1 at 2048); an interrupted run loses at most the call in progress")
    parser.add_argument("--score-batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help="images read and scored at a time: scoring holds one such batch (as float32, e.g. "
                             "50 MB per 2048 px image) plus the sets' features and SWD descriptors")
    parser.add_argument("--crops-per-image", type=int, default=4, help="base-size crops per image for pFID/pKID")
    parser.add_argument("--features", choices=FEATURE_KINDS, default="auto",
                        help="auto: Inception if torchmetrics, torch-fidelity and cached weights are here, else the "
                             "shipped emoji network; inception; emoji")
    parser.add_argument("--feature-weights", default=None,
                        help="Inception weight file or emoji-network folder (default: torch.hub cache / shipped weights)")
    parser.add_argument("--generated", default=None,
                        help="score this folder of images (or its subfolders, one row each) instead of generating")
    parser.add_argument("--base-samples", default=None,
                        help="folder of base-size samples for FID_b/KID_b (default: generated by --model; "
                             "with --generated and no --base-samples, FID_b/KID_b are n/a)")
    parser.add_argument("--base-size", type=int, default=None, help="base side in pixels (default: --model's)")
    parser.add_argument("--cache-dir", default=None, help="emoji data set cache (see `selfcascade data build`)")
    parser.add_argument("--grid-images", type=int, default=8, help="columns of the per-size image grids")
    parser.add_argument("-o", "--out", default="outputs/evaluate", help="results, grids and cached images go here")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> None:
    from .metrics import FeatureExtractorUnavailable

    try:
        evaluate(args)
    except FeatureExtractorUnavailable as exc:  # its message names the fix; no traceback
        raise SystemExit(f"error: {exc}") from exc


def register_cli(subparsers: "argparse._SubParsersAction") -> None:
    add_command(subparsers, "evaluate", "FID/KID (full, patch, base) and SWD of modes vs real renders", __doc__,
                add_arguments, run)


def main(argv: Sequence[str] | None = None) -> None:
    run_module("python -m selfcascade.evaluate", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
