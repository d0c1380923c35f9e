"""Train the v3 embedded model's UNet: a tiny Stable Diffusion on the emoji renders at 128 px (16x16 latents).

The VAE comes from ``selfcascade train-vae`` (its export folder); images and captions are encoded once
(latents through the VAE's posterior mode times its scaling factor, captions exactly as the stock
pipeline encodes them, ``embedded_sd.encode_prompts``) and held in memory, so a step is one UNet pass.
Recipe knobs: epsilon or v-prediction, min-SNR-gamma loss weighting (Hang et al. 2023), caption dropout
for guidance, caption-form dropout (some captions cut to the emoji's name, or its name and style: the short
prompts people type), EMA. Resumable through the shared loop; ``--export`` writes a stock SD folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .backbones.base import BANKS_DIR, zoom_prompt
from .checkpoints import deadline_after, find_checkpoint, read_checkpoint_state
from .commands import add_command, add_cooldown_argument, add_time_limit_argument, run_module
from . import embedded_sd
from .embedded_sd import (BASE_SIZE, DEFAULT_SAMPLING, SD15_UNET, ZOOM_CUE, build_sd_scheduler,
                          build_sd_unet, encode_prompts, folder_sampling, load_embedded_pipeline, load_text_components,
                          save_sd_folder, ship_parts)
from .io import atomic_path
from .text_encoder import DEFAULT_MAX_LENGTH
from .training import (LoopConfig, check_resume, hardware, latest_ema, model_and_ema_writer, prepare_training,
                       prior_training, train_loop)

logger = logging.getLogger(__name__)


class LatentData:
    """Latents [N, 4, h, w] with caption states [N, L, 384], the empty prompt's states [L, 384], a pool of
    zoomed windows (latents [M, 4, h, w], states of their captions with the scale cue; M may be 0), and the
    states of short forms of the N captions (``short_context``: form name -> [N, L, 384]; see ``SHORT_FORMS``)."""

    def __init__(self, latents: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor,
                 zoom_latents: torch.Tensor | None = None, zoom_context: torch.Tensor | None = None,
                 short_context: dict[str, torch.Tensor] | None = None) -> None:
        self.latents, self.context, self.uncond = latents, context, uncond
        self.zoom_latents = zoom_latents if zoom_latents is not None else latents[:0]
        self.zoom_context = zoom_context if zoom_context is not None else context[:0]
        self.short_context = short_context or {}

    def __len__(self) -> int:
        return len(self.latents)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """uint8 images [N, 3, S, S] -> fp16 latents (the posterior's mode times the VAE's scaling factor)."""
    latents = []
    for i in tqdm(range(0, len(images), batch_size), desc="encoding latents", unit="batch", mininterval=5,
                  disable=len(images) <= batch_size):
        x = images[i:i + batch_size].to(vae.device).float() / 127.5 - 1.0
        latents.append((vae.encode(x).latent_dist.mode() * vae.config.scaling_factor).half().cpu())
    return torch.cat(latents)


@torch.no_grad()
def encode_captions(captions: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH,
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(fp16 states [N, L, 384] of the captions, fp32 states [L, 384] of the empty prompt), as the stock
    pipeline encodes them."""
    tokenizer, encoder = load_text_components(max_length)
    encoder.to(device)
    context = torch.cat([encode_prompts(tokenizer, encoder, captions[i:i + 256]).half().cpu()
                         for i in range(0, len(captions), 256)])
    return context, encode_prompts(tokenizer, encoder, [""])[0].float().cpu()


def encode_dataset(vae, images: torch.Tensor, captions: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH,
                   batch_size: int = 64) -> LatentData:
    """uint8 images [N, 3, S, S] and their captions -> ``LatentData`` (fp16 storage, fp32 batches)."""
    context, uncond = encode_captions(captions, max_length, vae.device)
    return LatentData(encode_images(vae, images, batch_size), context, uncond)


def zoom_windows(cache_dir: Path, records: list[dict], factors: Sequence[int], count: int, seed: int,
                 size: int = BASE_SIZE) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Chunks of (uint8 ``size``-px windows of renders ``factor`` times larger, captions with the scale cue).

    For each factor, ``count`` records drawn by ``seed`` give one window each at a seeded random offset: the
    parts of an emoji at ``factor``x their usual scale, which is what a cascade stage at ``factor``x the base
    side asks the model to denoise. Renders are read in chunks, so large ones never sit in memory together.
    """
    from .data.loader import load_images

    g = torch.Generator().manual_seed(seed)
    for factor in factors:
        chosen = torch.randperm(len(records), generator=g)[:count].tolist()
        for i in tqdm(range(0, len(chosen), 64), desc=f"zoom {factor}x windows", unit="chunk", mininterval=5):
            chunk = [records[j] for j in chosen[i:i + 64]]
            big = load_images(cache_dir, chunk, size * factor, None, progress=False)
            span = size * (factor - 1) + 1
            ys, xs = torch.randint(0, span, (2, len(chunk)), generator=g).tolist()
            yield (torch.stack([img[:, y:y + size, x:x + size] for img, y, x in zip(big, ys, xs)]),
                   [zoom_prompt(r["caption"], factor, ZOOM_CUE) for r in chunk])


SHORT_FORMS = ("name", "name_style")
"""The short prompt forms (``data.emoji.PROMPT_FORMS``) the caption-form dropout trains on."""


def diffusion_loss(unet, scheduler, latents: torch.Tensor, context: torch.Tensor, generator: torch.Generator,
                   min_snr_gamma: float = 0.0) -> torch.Tensor:
    """MSE to the scheduler's target (epsilon or v) at uniform timesteps, min-SNR weighted when gamma > 0; latents
    [B, C, h, w], or clips [B, C, F, h, w] for a UNet3DConditionModel (one timestep per clip)."""
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    v_pred = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(latents, noise, t) if v_pred else noise
    pred = unet(noisy, t, encoder_hidden_states=context).sample
    per_item = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
    if min_snr_gamma > 0:
        snr = (scheduler.alphas_cumprod.to(t.device)[t] / (1 - scheduler.alphas_cumprod.to(t.device)[t]))
        weight = torch.clamp(snr, max=min_snr_gamma) / (snr + 1 if v_pred else snr)
        per_item = per_item * weight
    return per_item.mean()


def sample_batch(data: LatentData, batch_size: int, zoom_prob: float, g: torch.Generator,
                 short_probs: dict[str, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, caption states) of a batch: whole images, and zoomed windows with probability ``zoom_prob``. A whole
    image's caption is cut to short form F with probability ``short_probs[F]`` (the caption-form dropout), so the
    model learns the short prompts people type as well as the full captions it was trained on."""
    idx = torch.randint(0, len(data), (batch_size,), generator=g)
    latents, context = data.latents[idx], data.context[idx]
    short = {form: p for form, p in (short_probs or {}).items() if p > 0}
    if short:
        u, start = torch.rand(batch_size, generator=g), 0.0
        for form, p in short.items():
            pick = (u >= start) & (u < start + p)
            context = torch.where(pick[:, None, None], data.short_context[form][idx], context)
            start += p
    if zoom_prob > 0 and len(data.zoom_latents):
        zoom = torch.rand(batch_size, generator=g) < zoom_prob
        zidx = torch.randint(0, len(data.zoom_latents), (batch_size,), generator=g)
        latents = torch.where(zoom[:, None, None, None], data.zoom_latents[zidx], latents)
        context = torch.where(zoom[:, None, None], data.zoom_context[zidx], context)
    return latents, context


def drop_captions(context: torch.Tensor, uncond: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    """Caption states [B, L, D] with each item's replaced by the empty prompt's ``uncond`` [L, D] with probability
    ``p``: the unconditional branch classifier-free guidance needs."""
    drop = torch.rand(len(context), generator=g) < p
    return torch.where(drop[:, None, None], uncond.to(context.dtype).expand(len(context), -1, -1), context)


def _settings(args: argparse.Namespace, unet_config: dict) -> dict:
    return {"batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup, "cooldown": args.cooldown,
            "ema_decay": args.ema_decay, "caption_dropout": args.caption_dropout, "prediction_type": args.prediction_type,
            "min_snr_gamma": args.min_snr_gamma, "seed": args.seed, "max_length": args.max_length,
            "zoom_prob": args.zoom_prob, "zoom_factors": list(args.zoom_factors), "zoom_count": args.zoom_count,
            "name_prob": args.name_prob, "name_style_prob": args.name_style_prob,
            "unet_config": unet_config, "vae": str(args.vae)}


def _short_probs(settings: dict) -> dict[str, float]:
    return {"name": settings.get("name_prob", 0.0), "name_style": settings.get("name_style_prob", 0.0)}


def _default_data(args: argparse.Namespace, vae) -> LatentData:
    """The train split at 128 px with its captions' short forms, and its zoomed windows, encoded once and cached
    beside the run (``latents.safetensors``; re-encoded when the settings it was made with differ)."""
    from .data.emoji import PROMPT_FORMS, default_cache_dir, read_manifest
    from .data.loader import load_images

    cache = Path(args.run_dir) / "latents.safetensors"
    made_with = {"zoom_factors": json.dumps(args.zoom_factors), "zoom_count": str(args.zoom_count),
                 "max_length": str(args.max_length), "vae": str(args.vae), "short_forms": ",".join(SHORT_FORMS)}
    if cache.exists():
        with safe_open(str(cache), "pt") as f:
            if f.metadata() == made_with:
                t = {k: f.get_tensor(k) for k in f.keys()}
                return LatentData(t["latents"], t["context"], t["uncond"], t["zoom_latents"], t["zoom_context"],
                                  {form: t[f"short_{form}"] for form in SHORT_FORMS})
        logger.info("%s was made with other data settings: encoding again", cache)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    records = [r for r in read_manifest(cache_dir) if r["split"] == "train"]
    data = encode_dataset(vae, load_images(cache_dir, records, BASE_SIZE, "train"), [r["caption"] for r in records],
                          args.max_length)
    data.short_context = {form: encode_captions([PROMPT_FORMS[form](r) for r in records], args.max_length,
                                                vae.device)[0] for form in SHORT_FORMS}
    windows, captions = [], []
    for images, texts in zoom_windows(cache_dir, records, args.zoom_factors, args.zoom_count, args.seed):
        windows.append(encode_images(vae, images))
        captions += texts
    if windows:
        data.zoom_latents = torch.cat(windows)
        data.zoom_context = encode_captions(captions, args.max_length, vae.device)[0]
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as tmp:
        save_file({"latents": data.latents, "context": data.context, "uncond": data.uncond.contiguous(),
                   "zoom_latents": data.zoom_latents, "zoom_context": data.zoom_context,
                   **{f"short_{form}": states for form, states in data.short_context.items()}},
                  str(tmp), metadata=made_with)
    return data


def train(args: argparse.Namespace, data: LatentData | None = None) -> dict:
    """Train (resuming from ``args.run_dir``'s checkpoint if any) to ``args.max_steps`` or for ``args.max_minutes``;
    return the state."""
    from accelerate import Accelerator
    from diffusers import AutoencoderKL

    probs = (args.name_prob, args.name_style_prob)
    if min(probs) < 0 or sum(probs) > 1:
        raise ValueError(f"--name-prob {args.name_prob} and --name-style-prob {args.name_style_prob}: each is a share "
                         "of the captions, so give values of 0 or more that add up to at most 1.")
    deadline = deadline_after(args.max_minutes)
    accelerator = Accelerator(cpu=args.cpu)
    if accelerator.device.type == "cpu":
        torch.set_num_threads(args.threads)
    run_dir, device = Path(args.run_dir), accelerator.device
    config = {**SD15_UNET, **(json.loads(args.unet_config) if args.unet_config else {})}
    settings = _settings(args, config)
    ckpt = find_checkpoint(run_dir)
    state = read_checkpoint_state(ckpt) if ckpt is not None else {"step": 0, "train_seconds": 0.0}
    if ckpt is not None:
        check_resume(state.get("args"), settings, run_dir, ignore=("cooldown",))
    state["args"], state["hardware"] = settings, hardware(accelerator)
    vae = AutoencoderKL.from_pretrained(args.vae).to(device).eval()
    data = data or _default_data(args, vae)
    missing = [form for form, p in _short_probs(settings).items() if p > 0 and form not in data.short_context]
    if missing:
        raise ValueError(f"the training data holds no states of the short caption form(s) {', '.join(missing)}; "
                         "encode them into LatentData.short_context or set their probability to 0.")
    torch.manual_seed(args.seed)
    unet = build_sd_unet(config)
    if ckpt is not None:
        unet.load_state_dict(load_file(str(ckpt / "model.safetensors")))
        if args.init_from is not None:
            logger.warning("--init-from %s ignored: %s resumes from its checkpoint", args.init_from, run_dir)
    elif args.init_from is not None:
        state["init_from"] = warm_start(unet, args.init_from)
    unet, optimizer, ema = prepare_training(accelerator, unet, args.lr, args.ema_decay, ckpt, state)
    scheduler = build_sd_scheduler(args.prediction_type)
    logger.info("training a %d-parameter SD UNet on %d latents, batch %d, on %s",
                sum(p.numel() for p in unet.parameters()), len(data), args.batch_size, state["hardware"])

    def loss_fn(step: int, g: torch.Generator) -> torch.Tensor:
        latents, context = sample_batch(data, args.batch_size, args.zoom_prob, g, _short_probs(settings))
        context = drop_captions(context, data.uncond, args.caption_dropout, g)
        return diffusion_loss(unet, scheduler, latents.float().to(device), context.float().to(device), g,
                              args.min_snr_gamma)

    loop = LoopConfig(run_dir, args.max_steps, args.lr, args.warmup, args.grad_clip, args.checkpoint_every,
                      args.log_every, args.seed, "train-sd", deadline, cooldown=args.cooldown)
    train_loop(accelerator, unet, optimizer, loss_fn, loop, state, model_and_ema_writer(accelerator, unet, ema), ema)
    if args.export and accelerator.is_main_process:
        export_run(run_dir, Path(args.export))
    if args.ship and accelerator.is_main_process:
        ship_run(run_dir)
    return state


def warm_start(unet: torch.nn.Module, folder: Path) -> dict:
    """Load the UNet of a ``--ship``/``--export`` folder (or a bare UNet folder) into a new run's model, e.g. to
    continue a run on another machine; returns where it came from and what it had been trained for."""
    from diffusers import UNet2DConditionModel

    folder = Path(folder)
    unet_dir = folder / "unet" if (folder / "unet").is_dir() else folder
    if not (unet_dir / "config.json").is_file():
        raise FileNotFoundError(f"{unet_dir} holds no UNet (config.json); give a folder written by `train-sd --ship` "
                                "or `--export`, or its unet/ folder.")
    source = UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=torch.float32)
    differ = sorted(k for k in unet.config if not k.startswith("_") and source.config.get(k) != unet.config[k])
    if differ:
        raise ValueError(f"{unet_dir} has another UNet layout ({', '.join(differ)} differ); pass its config with "
                         "--unet-config or start without --init-from.")
    unet.load_state_dict(source.state_dict())
    return prior_training(folder)


def run_sampling(settings: dict) -> dict:
    """``selfcascade.json`` of a run's model: the defaults, and the scale cue if it trained on zoomed windows."""
    sampling = dict(DEFAULT_SAMPLING)
    if settings.get("zoom_prob", 0) > 0:
        sampling.update(zoom_cue=ZOOM_CUE, zoom_factors=list(settings["zoom_factors"]))
    return sampling


def _run_unet(run_dir: Path) -> tuple[dict, torch.nn.Module]:
    state, weights = latest_ema(run_dir, "train-sd")
    unet = build_sd_unet(state["args"]["unet_config"])
    unet.load_state_dict(weights)
    return state, unet


def export_run(run_dir: Path, out_dir: Path) -> Path:
    """The EMA UNet of the latest checkpoint, with its VAE, MiniLM and SD's scheduler, as a stock SD folder."""
    from diffusers import AutoencoderKL

    state, unet = _run_unet(run_dir)
    settings = state["args"]
    return save_sd_folder(out_dir, unet, AutoencoderKL.from_pretrained(settings["vae"]), settings["max_length"],
                          build_sd_scheduler(settings["prediction_type"]), state, run_sampling(settings))


def ship_run(run_dir: Path, folder: Path | None = None) -> Path:
    """Put a run's EMA UNet (fp16), scheduler, ``train_state.json`` and sampling defaults into the package's v3
    folder, beside its VAE and banks; sampling values already chosen there (by measurement) are kept."""
    state, unet = _run_unet(run_dir)
    folder = folder or embedded_sd.SHIPPED_DIR
    ship_parts(folder, unet, build_sd_scheduler(state["args"]["prediction_type"]), run_sampling(state["args"]), state)
    logger.info("shipped step %d of %s into %s", state["step"], run_dir, folder)
    return folder


def export_embedded(out_dir: Path, folder: Path | None = None) -> Path:
    """The shipped v3 model as a complete stock SD folder: weights, MiniLM, sampling defaults and banks (for the
    video sibling's folder, ``embedded_sd.SHIPPED_VIDEO_DIR``, a ``TextToVideoSDPipeline`` one)."""
    folder = folder or embedded_sd.SHIPPED_DIR
    pipe = load_embedded_pipeline(folder)
    out = save_sd_folder(out_dir, pipe.unet, pipe.vae, pipe.tokenizer.model_max_length, pipe.scheduler,
                         sampling=folder_sampling(folder), banks=folder / BANKS_DIR)
    if (folder / "train_state.json").is_file():
        shutil.copy2(folder / "train_state.json", out / "train_state.json")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vae", type=Path, required=True, 
                        help="AutoencoderKL folder (`selfcascade train-vae --export`)")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/sd"), help="checkpoints go to RUN_DIR/checkpoint")
    parser.add_argument("--cache-dir", type=Path, default=None, help="data set cache (see `selfcascade data build`)")
    parser.add_argument("--max-steps", type=int, default=20000)
    add_time_limit_argument(parser)
    add_cooldown_argument(parser)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--caption-dropout", type=float, default=0.1, help="share trained unconditionally (guidance)")
    parser.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default="epsilon")
    parser.add_argument("--min-snr-gamma", type=float, default=5.0, help="min-SNR loss weighting (0: off)")
    parser.add_argument("--zoom-prob", type=float, default=0.25,
                        help="share of each batch drawn from zoomed windows (captions end with the scale cue)")
    parser.add_argument("--zoom-factors", type=int, nargs="+", default=[2, 4],
                        help="zooms of the windows: 128 px crops of the 256 / 512 px renders (`data build --sizes`)")
    parser.add_argument("--zoom-count", type=int, default=3000, help="zoomed windows per factor (one per image)")
    parser.add_argument("--name-prob", type=float, default=0.0,
                        help="share of whole-image captions cut to the emoji's name alone ('red apple')")
    parser.add_argument("--name-style-prob", type=float, default=0.0,
                        help="share cut to the name and style ('red apple, fluent style')")
    parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="caption tokens")
    parser.add_argument("--unet-config", default=None, help="json overrides of the SD 1.5-layout UNet config")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--checkpoint-every", type=int, default=200)
    parser.add_argument("--init-from", type=Path, default=None,
                        help="new runs: start from this UNet (a `--ship`/`--export` folder), e.g. a run continued on "
                             "another machine; its steps and time count toward the model card")
    parser.add_argument("--export", type=Path, default=None, help="write a stock SD folder here at the end")
    parser.add_argument("--ship", action="store_true",
                        help="at the end, put the EMA UNet into the package as the embedded model (developers)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--cpu", action="store_true", help="train on CPU even when a GPU is present")


def run(args: argparse.Namespace) -> None:
    train(args)


def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", type=Path, help="folder to write (replaced atomically)")
    parser.add_argument("--video", action="store_true",
                        help="the video sibling (`embedded-video`) as a stock TextToVideoSDPipeline folder")


def _run_export(args: argparse.Namespace) -> None:
    if args.video and not embedded_sd.is_shipped(embedded_sd.SHIPPED_VIDEO_DIR):
        raise SystemExit("--video: the v3 video sibling is not in this install (`selfcascade train-sd-video --ship`)")
    folder = embedded_sd.SHIPPED_VIDEO_DIR if args.video else embedded_sd.SHIPPED_DIR
    loader = "TextToVideoSDPipeline" if args.video else "StableDiffusionPipeline"
    print(f"wrote {export_embedded(args.output, folder)}: load it with {loader}.from_pretrained")


def register_cli(subparsers: "argparse._SubParsersAction") -> None:
    add_command(subparsers, "train-sd", "train the v3 embedded model's UNet (tiny SD, resumable)", __doc__,
                add_arguments, run)
    add_command(subparsers, "export-embedded", "write the embedded model as a stock Stable Diffusion folder",
                "Write the embedded model (weights, MiniLM text encoder, sampling defaults, banks) as a folder that "
                "StableDiffusionPipeline.from_pretrained and every SD tool load offline.", _add_export_arguments,
                _run_export)


def main(argv: Sequence[str] | None = None) -> None:
    run_module("python -m selfcascade.train_sd", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
