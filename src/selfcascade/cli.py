"""``selfcascade``: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from .commands import (DTYPES, HelpFormatter, add_model_args, load_cascade, parse_guidance, parse_hw,
                       parse_positive_int, parse_seeds, read_prompts)
from .modes import MODE_HELP, MODES, VIDEO_MODES
from .plan import DEFAULT_MAX_RATIO, make_plan

__all__ = ["DTYPES", "build_parser", "main", "parse_guidance", "parse_hw", "parse_positive_int", "parse_seeds"]

logger = logging.getLogger("selfcascade")


def _add_size_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--height", type=int, help="target height in pixels (default: 2x the model's base height)")
    p.add_argument("--width", type=int, help="target width in pixels (default: 2x the model's base width)")
    p.add_argument("--size", type=int, help="shorthand for a square target: --height N --width N")
    p.add_argument("--max-ratio", type=float, default=DEFAULT_MAX_RATIO,
                   help="largest target/base pixel ratio accepted (guards memory and time)")


def _resolve_size(args: argparse.Namespace) -> None:
    if args.size is not None:
        if args.height is not None or args.width is not None:
            raise SystemExit("error: give --size or --height/--width, not both")
        args.height = args.width = args.size


def _add_sampling_args(p: argparse.ArgumentParser, modes: list[str]) -> None:
    """How to sample: shared by ``generate`` and ``generate-video``."""
    p.add_argument("--mode", choices=modes, default="tuning-free",
                   help="; ".join(f"{m}: {MODE_HELP[m]}" for m in modes).replace("%", "%%"))
    p.add_argument("--upsamplers", default=None,
                   help="feature-upsampler bank for --mode tuned: a folder or hub id (see `selfcascade train-upsamplers`); "
                        "default: the banks shipped with the model (the embedded model has them)")
    p.add_argument("--steps", type=int, default=50, help="scheduler steps of a full schedule; later stages run the part <= K")
    p.add_argument("--guidance", type=parse_guidance, default=None,
                   help="classifier-free guidance scale, or one per stage (7.5,5,3); default: the model's")
    p.add_argument("--K", type=int, default=None,
                   help="step the pivot is re-noised to, of T=1000 (default: 700 on SD's schedule, the same "
                        "signal level on others: 494 for the embedded model)")
    p.add_argument("--noise-level", type=float, default=None, help="K as a fraction of T, in (0, 1] (instead of --K)")
    p.add_argument("--pivot-space", choices=["latent", "pixel"], default=None,
                   help="upsample the pivot bilinearly in latent space (the paper) or decode-resize-encode "
                        "(default: the model's own, from its selfcascade.json, else latent; hires-fix: pixel)")
    p.add_argument("--strength", type=float, default=None,
                   help="img2img strength of --mode hires-fix, in (0, 1]: K = strength * T (default 0.55)")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from")
    p.add_argument("--seeds", type=parse_seeds, default=[0], help="one output per seed: 7, 0-3 or 1,5,9")
    p.add_argument("--batch-size", type=parse_positive_int, default=None,
                   help="images per UNet batch; seeds run in chunks of this many (default: by size, one at 2048x2048)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--dry-run", action="store_true", help="print the resolved settings and plan, generate nothing")


def build_parser(load: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The CLI; ``load`` names the plugin commands whose options are read (None: all, importing their modules)."""
    parser = argparse.ArgumentParser(
        prog="selfcascade",
        description="Generate images far above a diffusion model's training size with the self-cascade "
                    "(arXiv 2402.10491): sample at the base size, then re-noise and refine at ~4x the pixels per stage.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate images from a prompt",
                       formatter_class=HelpFormatter)
    g.add_argument("prompt", nargs="?", default=None, help="what to draw (or --prompts FILE)")
    g.add_argument("--prompts", default=None, metavar="FILE",
                   help="a text file, one prompt per line (blank lines skipped): every prompt with every seed, "
                        "written NAME-pINDEX.png (NAME-pINDEX-SEED.png with several seeds)")
    _add_size_args(g)
    add_model_args(g)
    _add_sampling_args(g, MODES)
    g.add_argument("--save-stages", action="store_true", help="also write every stage's image (-stageN.png)")
    g.add_argument("--window-attention", action="store_true",
                   help="cascade modes: the final stage's top-level self-attention in shifted 2x2 windows (HiDiffusion's MSW-MSA)")
    g.add_argument("-o", "--output", default="outputs/out.png",
                   help="PNG path; several seeds write NAME-SEED.png")

    v = sub.add_parser("generate-video", help="generate clips from a prompt with a text-to-video model",
                       formatter_class=HelpFormatter)
    v.add_argument("prompt", help="what to film")
    _add_size_args(v)
    add_model_args(v, video=True)
    _add_sampling_args(v, VIDEO_MODES)
    v.add_argument("--frames", type=parse_positive_int, default=None,
                   help="frames per clip, the same at every stage (the cascade scales height and width only); "
                        "default: the model's (16 for TextToVideoSDPipeline, 8 for embedded-video)")
    v.add_argument("--fps", type=float, default=8.0, help="frames per second of the written clip")
    v.add_argument("--decode-chunk", type=parse_positive_int, default=8,
                   help="frames the VAE decodes at once (lower it if decoding runs out of memory)")
    v.add_argument("-o", "--output", default="outputs/video.gif",
                   help=".gif, .mp4 (needs: pip install imageio imageio-ffmpeg) or a folder for PNG frames; "
                        "several seeds write NAME-SEED.EXT")

    p = sub.add_parser("plan", help="print the stage sizes for a target (no model needed with --base)",
                       formatter_class=HelpFormatter)
    _add_size_args(p)
    p.add_argument("--base", type=parse_hw, default=None,
                   help="base (training) size: 512 or HxW; default: read from --model")
    p.add_argument("--multiple", type=int, default=None,
                   help="every side divides by this (SD: 64 = VAE 8 x 2^3 downsamplings); default: read from --model, else 64")
    p.add_argument("--model", default=None, help="read base size and multiple from this model instead")

    c = sub.add_parser("compare", help="one grid: modes (rows) x square sizes (columns), same prompt and seed",
                       formatter_class=HelpFormatter)
    c.add_argument("prompt", help="what to draw")
    add_model_args(c)
    c.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="square target sides in pixels (default: 2x, 4x and 8x the base side)")
    c.add_argument("--modes", nargs="+", choices=MODES, default=["direct", "tuning-free"])
    c.add_argument("--upsamplers", default=None, help="feature-upsampler bank (folder or hub id) for the tuned row (default: the model's own)")
    c.add_argument("--steps", type=int, default=50, help="scheduler steps of a full schedule")
    c.add_argument("--guidance", type=parse_guidance, default=None, help="guidance scale (default: the model's)")
    c.add_argument("--seed", type=int, default=0, help="the same seed for every cell")
    c.add_argument("--max-ratio", type=float, default=DEFAULT_MAX_RATIO, help="largest target/base pixel ratio")
    c.add_argument("--cell", type=int, default=None, help="cell side in the grid (default: the largest size)")
    c.add_argument("-o", "--output", default="outputs/compare.png", help="PNG path of the grid")

    for register in _registrars(PLUGIN_COMMANDS if load is None else load):
        register(sub)
    for name, (_, help_text) in PLUGIN_COMMANDS.items():
        if name not in sub.choices:  # listed by --help; its options are read when it runs
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


#: Subcommands that live beside the modules they drive: name -> (module, its one-line help). A module (and torch)
#: is imported only when one of its commands runs, so ``selfcascade --help`` stays fast; tests check these lines
#: against what the modules register.
PLUGIN_COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("selfcascade.data.commands", "build the embedded emoji data set"),
    "train-base": ("selfcascade.train_base", "train the embedded 32 px base model (resumable)"),
    "train-vae": ("selfcascade.train_vae", "train the embedded model's VAE (resumable)"),
    "train-sd": ("selfcascade.train_sd", "train the v3 embedded model's UNet (tiny SD, resumable)"),
    "export-embedded": ("selfcascade.train_sd", "write the embedded model as a stock Stable Diffusion folder"),
    "train-sd-video": ("selfcascade.train_sd_video", "train the v3 model's video sibling (inflated UNet3D, resumable)"),
    "train-upsamplers": ("selfcascade.train_upsamplers", "tune a feature-upsampler bank (the tuned self-cascade)"),
    "finetune": ("selfcascade.baselines.finetune", "fine-tune the UNet at the target size (full or LoRA baselines)"),
    "evaluate": ("selfcascade.evaluate", "FID/KID (full, patch, base) and SWD of modes vs real renders"),
    "train-features": ("selfcascade.metrics.train_features", "train the offline FID/KID feature extractor (resumable)"),
    "ui": ("selfcascade.ui", "a local web page: prompt, size presets, modes side by side"),
}
#: Why a plugin module could not be imported (a missing optional package), by module.
_IMPORT_ERRORS: dict[str, ImportError] = {}


def _registrars(commands: Sequence[str]) -> list:
    """The ``register_cli`` of each module behind ``commands``; modules that cannot be imported are skipped."""
    registrars = []
    for module in dict.fromkeys(PLUGIN_COMMANDS[c][0] for c in commands if c in PLUGIN_COMMANDS):
        try:
            registrars.append(__import__(module, fromlist=["register_cli"]).register_cli)
        except ImportError as exc:
            logger.debug("subcommands of %s unavailable: %s", module, exc)
            _IMPORT_ERRORS[module] = exc
    return registrars


def _output_paths(output: str, seeds: Sequence[int], suffix: str | None = ".png", tag: str = "") -> list[Path]:
    """One path per seed: NAME{tag}.EXT, or NAME{tag}-SEED.EXT when several; ``suffix`` None: the caller checks
    the suffix."""
    out = Path(output)
    if suffix is not None and out.suffix.lower() != suffix:
        raise ValueError(f"--output must end in {suffix}, got {output}")
    if len(seeds) == 1:
        return [out.with_name(f"{out.stem}{tag}{out.suffix}")]
    return [out.with_name(f"{out.stem}{tag}-{s}{out.suffix}") for s in seeds]


def _generate_jobs(args: argparse.Namespace) -> list[tuple[str, int, Path]]:
    """(prompt, seed, output path) of every image ``generate`` writes: the prompt, or every line of --prompts,
    with every seed, in that order."""
    if (args.prompt is None) == (args.prompts is None):
        raise SystemExit("error: give a prompt or --prompts FILE (one of them)")
    if args.prompts is None:
        return [(args.prompt, s, p) for s, p in zip(args.seeds, _output_paths(args.output, args.seeds))]
    prompts = read_prompts(args.prompts)
    digits = len(str(len(prompts) - 1))
    return [(prompt, s, p) for i, prompt in enumerate(prompts)
            for s, p in zip(args.seeds, _output_paths(args.output, args.seeds, tag=f"-p{i:0{digits}d}"))]


def _prepare(args: argparse.Namespace) -> tuple[Any, int, int, float | list[float], Any]:
    """Load the model and resolve the target size, guidance and plan that a generate command samples."""
    if args.no_progress:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    cascade = load_cascade(args)
    cascade.max_ratio = args.max_ratio
    bb = cascade.backbone
    height = bb.base_size[0] * 2 if args.height is None else args.height
    width = bb.base_size[1] * 2 if args.width is None else args.width
    plan = cascade.plan(height, width, args.mode)
    guidance = args.guidance if args.guidance is not None else bb.stage_guidance(plan.num_stages)
    return cascade, height, width, guidance, plan


def _dry_run(args: argparse.Namespace, cascade: Any, height: int, width: int, guidance: float | list[float],
             plan: Any, paths: list[Path], **extra: Any) -> int:
    """Print the resolved settings and the plan instead of sampling."""
    bb = cascade.backbone
    print(json.dumps({
        "model": bb.name, "device": str(bb.device), "dtype": str(bb.dtype).replace("torch.", ""),
        "mode": args.mode, "height": height, "width": width, **extra, "steps": args.steps, "guidance": guidance,
        "K": args.K, "noise_level": args.noise_level, "pivot_space": args.pivot_space, "strength": args.strength,
        "scheduler": type(bb.scheduler).__name__, "seeds": args.seeds, "outputs": [str(p) for p in paths],
        "upsamplers": args.upsamplers, "batch_size": args.batch_size,
    }, indent=2))
    print(plan)
    return 0


def _sampling_kwargs(args: argparse.Namespace, guidance: float | list[float],
                     seeds: Sequence[int] | None = None) -> dict[str, Any]:
    """``SelfCascadePipeline.__call__`` arguments from the options of ``_add_sampling_args``, for ``seeds``
    (default: --seeds)."""
    seeds = list(args.seeds if seeds is None else seeds)
    return dict(mode=args.mode, negative_prompt=args.negative_prompt, num_images_per_prompt=len(seeds),
                num_inference_steps=args.steps, guidance_scale=guidance, K=args.K, noise_level=args.noise_level,
                pivot_space=args.pivot_space, strength=args.strength, seed=seeds, progress=not args.no_progress,
                upsamplers=args.upsamplers, batch_size=args.batch_size)


def _print_path(path: Path) -> None:
    """One write per line: launched processes share stdout unbuffered (``python -u``), where ``print`` writes the
    text and the newline apart and two processes' lines can merge."""
    sys.stdout.write(f"{path}\n")
    sys.stdout.flush()


def cmd_generate(args: argparse.Namespace) -> int:
    """Every (prompt, seed) image; under ``accelerate launch`` each process writes its contiguous share of them."""
    from .io import save_png
    from .processes import gather, is_main_process, my_share, num_processes, process_device

    _resolve_size(args)
    jobs = _generate_jobs(args)  # before loading a model, so a typo costs nothing
    args.device = process_device(args.device)
    cascade, height, width, guidance, plan = _prepare(args)
    if args.dry_run:
        return _dry_run(args, cascade, height, width, guidance, plan, [p for *_, p in jobs]) if is_main_process() else 0
    if is_main_process():
        logger.info("%s", plan)
    mine = my_share(jobs)
    for prompt, group in itertools.groupby(mine, key=lambda job: job[0]):  # one call per prompt, batched over seeds
        group = list(group)
        result = cascade(prompt, height, width, return_stages=args.save_stages, window_attention=args.window_attention,
                         **_sampling_kwargs(args, guidance, [seed for _, seed, _ in group]))
        for i, (seed, (*_, path)) in enumerate(zip(result.seeds, group)):
            save_png(result.images[i], path, result.settings, seed)
            _print_path(path)
            for r, stage_images in enumerate(result.stages[:-1]):
                stage_path = path.with_name(f"{path.stem}-stage{r}{path.suffix}")
                save_png(stage_images[i], stage_path, result.settings, seed)
                _print_path(stage_path)
    if num_processes() > 1:
        counts = gather(len(mine))  # also waits for every process
        if is_main_process():
            logger.info("%d processes wrote %d images (%s) next to %s", len(counts), sum(counts),
                        " + ".join(map(str, counts)), args.output)
    return 0


def cmd_generate_video(args: argparse.Namespace) -> int:
    from .io import check_video_output, save_video

    _resolve_size(args)
    if args.fps <= 0:
        raise ValueError(f"--fps must be positive, got {args.fps:g}")
    paths = _output_paths(args.output, args.seeds, suffix=None)
    for path in paths:  # before loading a model: a bad suffix or a missing MP4 writer costs nothing
        check_video_output(path)
    cascade, height, width, guidance, plan = _prepare(args)
    bb = cascade.backbone
    if not bb.is_video:
        raise ValueError(f"{bb.name} makes images, not clips: give generate-video a text-to-video model (a "
                         "TextToVideoSDPipeline folder or hub id), or use `selfcascade generate`.")
    if hasattr(bb, "decode_chunk_size"):  # latent video models decode in chunks; pixel-space ones decode elementwise
        bb.decode_chunk_size = args.decode_chunk
    frames = args.frames or bb.default_num_frames
    if args.dry_run:
        return _dry_run(args, cascade, height, width, guidance, plan, paths, frames=frames, fps=args.fps)
    logger.info("%s\n  %d frames per clip", plan, frames)
    result = cascade(args.prompt, height, width, num_frames=frames, **_sampling_kwargs(args, guidance))
    for seed, path, clip in zip(result.seeds, paths, result.frames):
        print(save_video(clip, path, args.fps, result.settings, seed))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    _resolve_size(args)
    if args.height is None or args.width is None:
        raise SystemExit("error: give --height and --width (or --size)")
    if args.model is not None:
        from .pipeline import SelfCascadePipeline

        cascade = SelfCascadePipeline.from_pretrained(args.model)
        cascade.max_ratio = args.max_ratio
        print(cascade.plan(args.height, args.width))
        return 0
    if args.base is None:
        raise SystemExit("error: give --base (e.g. --base 512) or --model")
    print(make_plan(args.base, args.height, args.width, multiple=args.multiple or 64, max_ratio=args.max_ratio))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .grid import make_grid
    from .io import save_png

    cascade = load_cascade(args)
    cascade.max_ratio = args.max_ratio
    bb = cascade.backbone
    base = bb.base_size[0]
    sizes = args.sizes or [base * 2, base * 4, base * 8]
    cells = []
    for mode in args.modes:
        row = []
        for size in sizes:
            logger.info("%s at %dx%d", mode, size, size)
            out = cascade(args.prompt, size, size, mode=mode, num_inference_steps=args.steps,
                          guidance_scale=args.guidance, seed=args.seed,
                          upsamplers=args.upsamplers if mode == "tuned" else None)
            row.append(out.images[0])
        cells.append(row)
    grid = make_grid(cells, args.modes, [f"{s}x{s}" for s in sizes], cell=args.cell)
    print(save_png(grid, args.output))
    return 0


COMMANDS = {"generate": cmd_generate, "generate-video": cmd_generate_video, "plan": cmd_plan, "compare": cmd_compare}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(load=[command] if command in PLUGIN_COMMANDS else [])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    handler = COMMANDS.get(args.command) or getattr(args, "func", None)
    if handler is None:
        module = PLUGIN_COMMANDS.get(args.command, ("", ""))[0]
        parser.error(f"`selfcascade {args.command}` is unavailable: {_IMPORT_ERRORS.get(module, 'unknown command')}")
    try:
        return handler(args) or 0
    except (ValueError, FileNotFoundError) as exc:
        # Bad input: say what and how to fix it, without a traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if "torch" in sys.modules:  # a command that never loaded torch made no process group: skip importing accelerate
            from .processes import close

            close()


if __name__ == "__main__":
    sys.exit(main())
