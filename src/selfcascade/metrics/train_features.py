"""Train the offline feature extractor (EmojiFeatureNet) on the emoji train split; ship it with a model card.

    OMP_NUM_THREADS=1 python -m selfcascade.metrics.train_features --threads 1

The network learns to name each training image's concept (~2k classes) and, as an auxiliary task, its
style, from augmented views: random crops from the whole image down to a quarter of its side (what
pFID's base-size crops of 128 px images show) and horizontal flips; optionally blurry copies
(``--blur-prob``, off by default so that the features keep seeing blur). A small fraction of
training images (only from concepts with several images) is held out to measure accuracy; the eval
split is never read for training, only for the sanity FIDs of the model card.

Resumable: ``<run-dir>/checkpoint`` (safetensors + json) is replaced atomically every
``--checkpoint-every`` steps, and every step's randomness comes from a generator seeded by (seed, step),
so a resumed run continues exactly as an uninterrupted one. At the end the weights are exported (fp16)
with ``config.json`` and a README model card to ``--export`` (default: the package's shipped folder).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from selfcascade.checkpoints import find_checkpoint, load_optimizer, read_checkpoint_state
from selfcascade.commands import add_command, run_module
from selfcascade.data.emoji import default_cache_dir, read_manifest
from selfcascade.data.loader import load_images
from selfcascade.io import atomic_path
from selfcascade.metrics.distances import frechet_distance, kernel_inception_distance
from selfcascade.metrics.emoji_features import DEFAULT_DIR, EmojiFeatureNet, EmojiFeatures, save_feature_net
from selfcascade.metrics.images import resize_images
from selfcascade.training import MODEL_FILE, LoopConfig, check_resume, train_loop

logger = logging.getLogger(__name__)

#: Renders the views are cut from: large enough that a quarter-side crop still has 32 real pixels.
SOURCE_SIZE = 128


# --------------------------------------------------------------------------------------------------
# Data


def split_holdout(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) images of the train split: a seeded-hash ``fraction`` of the images whose
    concept keeps at least one training image, so every held-out image has a learnable label."""
    ranked = sorted(records, key=lambda r: hashlib.sha256(f"{seed}:{r['id']}".encode()).hexdigest())
    remaining: dict[str, int] = {}
    for r in records:
        remaining[r["concept"]] = remaining.get(r["concept"], 0) + 1
    held = set()
    for r in ranked[:round(fraction * len(records) * 2)]:  # candidates; about half have single-image concepts
        if len(held) >= round(fraction * len(records)):
            break
        if remaining[r["concept"]] > 1:
            remaining[r["concept"]] -= 1
            held.add(r["id"])
    return [r for r in records if r["id"] not in held], [r for r in records if r["id"] in held]


def augment(images: torch.Tensor, out_size: int, generator: torch.Generator, min_side: float = 0.25,
            blur_prob: float = 0.0) -> torch.Tensor:
    """Random views of uint8 ``[B, 3, S, S]`` images as float ``[B, 3, out_size, out_size]`` in [0, 1].

    Half the views keep 80-100% of the side, half a log-uniform 25-100% (pFID's crops); aspect jitter
    +-10%, horizontal flips; the crop is resampled bilinearly at twice ``out_size`` and 2x2-averaged,
    which antialiases the downscale. ``blur_prob`` of the views are then downsampled to 16-48 px and
    upsampled back (bicubic), like base-size samples enlarged for the extractor.
    """
    b = images.shape[0]
    u = torch.rand(5, b, generator=generator)
    side = torch.where(u[0] < 0.5, 0.8 + 0.2 * u[1], torch.exp(math.log(min_side) * u[1]))
    aspect = torch.exp(0.2 * (u[2] - 0.5))
    sx, sy = (side * aspect).clamp(max=1), (side / aspect).clamp(max=1)
    cx, cy = (1 - sx) * (2 * u[3] - 1), (1 - sy) * (2 * u[4] - 1)
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx * flip, cx, sy, cy
    grid = F.affine_grid(theta, [b, 3, 2 * out_size, 2 * out_size], align_corners=False)
    views = F.avg_pool2d(F.grid_sample(images.float() / 255, grid, mode="bilinear", padding_mode="border",
                                       align_corners=False), 2)
    blur = torch.rand(b, generator=generator) < blur_prob
    low = int(torch.randint(16, 49, (), generator=generator))
    if blur.any():
        views[blur] = resize_images(resize_images(views[blur], low), out_size)
    return views.clamp(0, 1)


# --------------------------------------------------------------------------------------------------
# Evaluation (held-out accuracy, sanity FIDs for the model card)


@torch.inference_mode()
def accuracy(net: EmojiFeatureNet, images: torch.Tensor, concepts: torch.Tensor, styles: torch.Tensor,
             crop_side: float = 1.0, seed: int = 0) -> dict[str, float]:
    """Top-1/top-5 concept and top-1 style accuracy on uint8 images, whole or one random crop each."""
    net.eval()
    size = net.config["input_size"]
    if crop_side < 1:
        side = round(crop_side * images.shape[-1])
        g = torch.Generator().manual_seed(seed)
        tops = torch.randint(0, images.shape[-1] - side + 1, (images.shape[0], 2), generator=g).tolist()
        images = torch.stack([im[:, t:t + side, l:l + side] for im, (t, l) in zip(images, tops)])
    top1 = top5 = style_hits = 0
    for i in range(0, images.shape[0], 256):
        _, concept_logits, style_logits = net(resize_images(images[i:i + 256].float() / 255, size))
        best5 = concept_logits.topk(5, dim=1).indices
        top1 += int((best5[:, 0] == concepts[i:i + 256]).sum())
        top5 += int((best5 == concepts[i:i + 256, None]).any(dim=1).sum())
        style_hits += int((style_logits.argmax(dim=1) == styles[i:i + 256]).sum())
    n = images.shape[0]
    return {"concept_top1": top1 / n, "concept_top5": top5 / n, "style_top1": style_hits / n}


def sanity_fids(extractor: EmojiFeatures, train: torch.Tensor, eval_: torch.Tensor, seed: int) -> list[dict]:
    """FID/KID of eval-split renders against train-split renders, clean and degraded (64 px, float)."""
    g = torch.Generator().manual_seed(seed)
    degraded = {
        "train renders (other concepts, same styles)": train,
        "train renders, blurred (to 32 px and back)": resize_images(resize_images(train, 32), train.shape[-1]),
        "train renders, blurred (to 16 px and back)": resize_images(resize_images(train, 16), train.shape[-1]),
        "train renders + Gaussian noise (std 0.05)": (train + 0.05 * torch.randn(train.shape, generator=g)).clamp(0, 1),
        "train renders + Gaussian noise (std 0.1)": (train + 0.1 * torch.randn(train.shape, generator=g)).clamp(0, 1),
    }
    reference = extractor(eval_)
    rows = []
    for label, images in degraded.items():
        feats = extractor(images)
        kid, kid_std = kernel_inception_distance(reference, feats, subsets=50, subset_size=len(feats) // 2)
        rows.append({"compared with eval renders": label, "FID": frechet_distance(reference, feats),
                     "KID": kid, "KID_std": kid_std, "n": f"{len(eval_)} vs {len(images)}"})
    return rows


# --------------------------------------------------------------------------------------------------
# Training


def _lr(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to zero at ``--max-steps``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.max_steps - args.warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _labels(train_records: list[dict], records: list[dict]) -> dict[str, list[str]]:
    """Class names, stored with the weights: the concepts trained on and every style."""
    return {"concepts": sorted({r["concept"] for r in train_records}), "styles": sorted({r["style"] for r in records})}


def _sample(records: list[dict], split: str, count: int, seed: int) -> list[dict]:
    chosen = [r for r in records if r["split"] == split]
    order = torch.randperm(len(chosen), generator=torch.Generator().manual_seed(seed)).tolist()
    return [chosen[i] for i in order[:count]]


def _targets(records: list[dict], labels: dict[str, list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    concept_index = {c: i for i, c in enumerate(labels["concepts"])}
    style_index = {s: i for i, s in enumerate(labels["styles"])}
    return (torch.tensor([concept_index[r["concept"]] for r in records]),
            torch.tensor([style_index[r["style"]] for r in records]))


def train(args: argparse.Namespace) -> dict:
    """Train (resuming from ``args.run_dir`` if it holds a checkpoint) to ``--max-steps``; return the state."""
    torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir)
    cache_dir = Path(args.cache_dir) if args.cache_dir is not None else default_cache_dir()
    records = read_manifest(cache_dir)
    train_records, held = split_holdout([r for r in records if r["split"] == "train"], args.holdout_fraction, args.seed)
    labels = _labels(train_records, records)
    images = load_images(cache_dir, train_records, SOURCE_SIZE, "train")
    concept_t, style_t = _targets(train_records, labels)

    torch.manual_seed(args.seed)  # reproducible initial weights
    net = EmojiFeatureNet(len(labels["concepts"]), len(labels["styles"]), tuple(args.widths), args.input_size)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    settings = {k: getattr(args, k) for k in ("batch_size", "lr", "warmup", "weight_decay", "style_weight",
                                              "label_smoothing", "blur_prob", "holdout_fraction", "seed", "max_steps")}
    ckpt = find_checkpoint(run_dir)
    state: dict = {"step": 0, "train_seconds": 0.0}
    if ckpt is not None:
        state = read_checkpoint_state(ckpt)
        # only --max-steps may change (it stretches the cosine decay)
        check_resume({**state["config"], **state["args"]}, {**net.config, **settings}, run_dir, ignore=("max_steps",))
        net.load_state_dict(load_file(str(ckpt / MODEL_FILE)))
        load_optimizer(optimizer, ckpt, state)
        logger.info("resuming from %s at step %d", ckpt, state["step"])
    state.pop("optimizer", None)
    state["config"], state["args"] = net.config, settings
    logger.info("%d-parameter network, %d training images (%d concepts, %d styles), %d held out, %d thread(s)",
                sum(p.numel() for p in net.parameters()), len(train_records), len(labels["concepts"]),
                len(labels["styles"]), len(held), torch.get_num_threads())

    def write_weights(folder: Path) -> None:
        save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(folder / MODEL_FILE))

    def loss_fn(step: int, g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(train_records), (args.batch_size,), generator=g)
        views = augment(images[idx], args.input_size, g, blur_prob=args.blur_prob)
        _, concept_logits, style_logits = net(views)
        return (F.cross_entropy(concept_logits, concept_t[idx], label_smoothing=args.label_smoothing)
                + args.style_weight * F.cross_entropy(style_logits, style_t[idx]))

    loop = LoopConfig(run_dir, args.max_steps, args.lr, args.warmup, 0.0, args.checkpoint_every, 0, args.seed,
                      "train-features", lr_at=lambda step: _lr(step, args))
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(net, optimizer)
    train_loop(accelerator, model, optimizer, loss_fn, loop, state, write_weights)
    export(args, accelerator.unwrap_model(model).eval(), state, labels, cache_dir, records, held)
    return state


def export(args: argparse.Namespace, net: EmojiFeatureNet, state: dict, labels: dict[str, list[str]],
           cache_dir: Path, records: list[dict], held: list[dict]) -> Path:
    """Measure held-out accuracy and the sanity FIDs, then write weights, config and model card."""
    started = time.perf_counter()
    held_images = load_images(cache_dir, held, SOURCE_SIZE, "held-out train")
    concept_t, style_t = _targets(held, labels)
    acc = {name: accuracy(net, held_images, concept_t, style_t, side, args.seed)
           for name, side in (("whole image", 1.0), ("random crop, half side", 0.5), ("random crop, quarter side", 0.25))}
    size, count = args.input_size, args.sanity_images
    train_renders = load_images(cache_dir, _sample(records, "train", count, args.seed), size, "train").float() / 255
    eval_renders = load_images(cache_dir, _sample(records, "eval", count, args.seed), size, "eval").float() / 255
    sanity = sanity_fids(EmojiFeatures.from_network(net, "in-training"), train_renders, eval_renders, args.seed)
    info = {
        "data": "selfcascade emoji data set, train split only (OpenMoji, Twemoji, Noto, Fluent), "
                f"{SOURCE_SIZE} px renders",
        "train_images": len(records) - len(held) - sum(r["split"] == "eval" for r in records),
        "held_out_images": len(held), "steps": state["step"], "train_seconds": round(state["train_seconds"]),
        "hardware": f"CPU, {args.threads} thread(s)", **state["args"], "held_out_accuracy": acc,
        "sanity_fid": sanity, "final_loss": state.get("loss"),
    }
    folder = save_feature_net(net, args.export, labels, info)
    with atomic_path(folder / "README.md") as tmp:
        tmp.write_text(model_card(info, net, EmojiFeatures(folder).name))
    logger.info("exported to %s (evaluation took %.0f s)", folder, time.perf_counter() - started)
    return folder


def model_card(info: dict, net: EmojiFeatureNet, name: str) -> str:
    """The README shipped next to the weights: what the features are, how they were made, how good."""
    params = sum(p.numel() for p in net.parameters())
    acc_rows = [f"| {view} | {a['concept_top1']:.1%} | {a['concept_top5']:.1%} | {a['style_top1']:.1%} |"
                for view, a in info["held_out_accuracy"].items()]
    fid_rows = [f"| {r['compared with eval renders']} | {r['FID']:.2f} | {r['KID']:.4f} ± {r['KID_std']:.4f} | {r['n']} |"
                for r in info["sanity_fid"]]
    return "\n".join([
        "# selfcascade emoji feature extractor", "",
        f"`{name}`: the offline feature extractor of `selfcascade evaluate --features emoji` (the default when "
        "Inception-V3 weights are not in the local cache). **Not Inception**: FID/KID computed with it are comparable "
        "only with numbers from these same weights, never with published FIDs.", "",
        "| | |", "|---|---|",
        f"| architecture | VGG-style CNN, widths {net.config['widths']}, BatchNorm, {params:,} parameters (heads included), "
        f"{net.config['input_size']} px input (images are resized to it, antialiased bicubic) |",
        f"| features | {net.feature_dim}-d global average pool of the last convolution (after ReLU), the penultimate layer |",
        f"| task | concept classification ({net.config['num_concepts']} classes, label smoothing "
        f"{info['label_smoothing']}) + {info['style_weight']} x style classification ({net.config['num_styles']} styles) |",
        f"| data | {info['data']}; {info['train_images']:,} training images, {info['held_out_images']} held out; "
        "the eval split (concepts held out from the diffusion model) is never trained on |",
        "| augmentation | random crops keeping 80-100% or a log-uniform 25-100% of the side, ±10% aspect, flips; "
        f"{info['blur_prob']:.0%} blurred (to 16-48 px and back) |",
        f"| training | {info['steps']} steps, batch {info['batch_size']}, AdamW lr {info['lr']} (warm-up "
        f"{info['warmup']}, cosine), weight decay {info['weight_decay']}, seed {info['seed']}; final loss "
        f"{info['final_loss']:.3f} |",
        f"| wall time | {info['train_seconds'] / 60:.1f} min on {info['hardware']} |",
        "| licence | code Apache-2.0; weights inherit the artwork licences (CC BY-SA 4.0, CC BY 4.0, Apache-2.0, MIT) |",
        "",
        "## Held-out accuracy",
        "",
        "Images of the train split never shown in training (concepts seen in other styles or variants; chance is "
        f"{1 / net.config['num_concepts']:.2%} for concepts, {1 / net.config['num_styles']:.0%} for styles):", "",
        "| view | concept top-1 | concept top-5 | style top-1 |", "|---|---|---|---|", *acc_rows, "",
        "## Sanity check: do the features see quality?", "",
        "Eval-split renders (concepts unseen by this network) against train-split renders, clean and degraded, "
        f"{net.config['input_size']} px. A useful extractor scores the clean comparison low and degradations high:", "",
        "| eval renders vs | FID | KID (mean ± std over 50 subsets of half the images) | images |", "|---|---|---|---|", *fid_rows, "",
        "Reproduce: `OMP_NUM_THREADS=1 python -m selfcascade.metrics.train_features --threads 1` (resumes from "
        "`runs/features/checkpoint`, then rewrites this folder).", "",
    ])


# --------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", type=Path, default=Path("runs/features"), help="checkpoints go to RUN_DIR/checkpoint")
    parser.add_argument("--cache-dir", type=Path, default=None, help="data set cache (see `selfcascade data build`)")
    parser.add_argument("--max-steps", type=int, default=1100, help="train until this many steps in total")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--style-weight", type=float, default=0.5, help="weight of the auxiliary style loss")
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--blur-prob", type=float, default=0.0,
                        help="share of views blurred (to 16-48 px and back); off by default: it teaches invariance to "
                             "blur, and FID should see an upscaler's blur (a trial at 0.25 barely told 2x-blurred renders apart)")
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 256], help="channels per stage")
    parser.add_argument("--input-size", type=int, default=64, help="side images are resized to")
    parser.add_argument("--holdout-fraction", type=float, default=0.05, help="train-split images kept for accuracy")
    parser.add_argument("--sanity-images", type=int, default=1000, help="images per set in the model card's FIDs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--export", type=Path, default=DEFAULT_DIR, help="write the trained extractor here")


def run(args: argparse.Namespace) -> None:
    train(args)


def register_cli(subparsers: "argparse._SubParsersAction") -> None:
    add_command(subparsers, "train-features", "train the offline FID/KID feature extractor (resumable)", __doc__,
                add_arguments, run)


def main(argv: Sequence[str] | None = None) -> None:
    run_module("python -m selfcascade.metrics.train_features", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
