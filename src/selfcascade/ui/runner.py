"""What the web UI runs, without the web: size presets, a pool of loaded models shared by every tab, and a run of
several modes with one seed, each timed and written as a PNG with the CLI's ``parameters`` chunk.

Kept free of gradio so it can be tested (and reused) without a browser or a server.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..io import save_png
from ..pipeline import SelfCascadePipeline
from ..plan import DEFAULT_MAX_RATIO

logger = logging.getLogger(__name__)

#: Size presets: this many times the model's base pixels (2x, 4x, 8x the side of a square).
PIXEL_FACTORS = (4, 16, 64)
#: Common aspect ratios, width:height.
ASPECTS = {"1:1": (1, 1), "4:3": (4, 3), "3:4": (3, 4), "3:2": (3, 2), "2:3": (2, 3), "16:9": (16, 9), "9:16": (9, 16)}
#: Largest seed drawn for "random" (what torch's CPU generator keeps of a seed: its low bits).
MAX_SEED = 2**31 - 1

#: on_step(mode, stage, stage_sizes, step, total_steps) after every denoising step (stage sizes: the plan's, HxW).
StepReport = Callable[[str, int, tuple[tuple[int, int], ...], int, int], None]


class Stopped(Exception):
    """The user pressed stop: raised (with the mode it interrupted) from the step callback, so the pipeline
    unwinds at the next step instead of finishing a run nobody waits for."""


def preset_size(base: tuple[int, int], multiple: int, factor: float, aspect: str) -> tuple[int, int]:
    """(height, width) with ``factor`` x the base's pixels at ``aspect`` (W:H), sides rounded to ``multiple``."""
    if aspect not in ASPECTS:
        raise ValueError(f"aspect must be one of {', '.join(ASPECTS)}, got {aspect!r}.")
    aw, ah = ASPECTS[aspect]
    height = math.sqrt(factor * base[0] * base[1] * ah / aw)
    return (max(multiple, round(height / multiple) * multiple),
            max(multiple, round(height * aw / ah / multiple) * multiple))


def resolve_seed(seed: int | None) -> int:
    """A fixed seed as given; None or a negative one (the page's -1) draws a fresh one."""
    return secrets.randbelow(MAX_SEED) if seed is None or seed < 0 else int(seed)


class ModelPool:
    """Loads each model once for every tab, and gives each its own lock: one generation at a time per model.

    ``load`` turns a name from the page (or the command line) into a pipeline, e.g. the CLI's ``load_cascade``.
    """

    def __init__(self, load: Callable[[str], SelfCascadePipeline], max_ratio: float = DEFAULT_MAX_RATIO) -> None:
        self.load = load
        self.max_ratio = max_ratio
        self._models: dict[str, tuple[SelfCascadePipeline, threading.Lock]] = {}
        self._loading = threading.Lock()

    def get(self, name: str) -> tuple[SelfCascadePipeline, threading.Lock]:
        """The loaded model and its lock; an image model only (the page shows images, not clips)."""
        name = name.strip()
        if not name:
            raise ValueError("give a model: 'embedded', a diffusers folder, or a hub id.")
        with self._loading:
            if name not in self._models:
                logger.info("loading %s", name)
                cascade = self.load(name)
                if cascade.backbone.is_video:
                    raise ValueError(f"{name} makes clips, not images: use `selfcascade generate-video` for it.")
                cascade.max_ratio = self.max_ratio
                self._models[name] = (cascade, threading.Lock())
            return self._models[name]


@dataclass(frozen=True)
class Request:
    """One click of Generate: every mode samples the same prompt, size and seed."""

    prompt: str
    height: int
    width: int
    modes: Sequence[str]
    seed: int
    negative_prompt: str | None = None
    steps: int = 50
    guidance: float | None = None
    K: int | None = None
    bank: str | None = None


@dataclass
class ModeResult:
    """One mode of a request: its PNG (and its stages', base first), or the error that stopped it."""

    mode: str
    seconds: float
    path: Path | None = None
    stage_paths: list[Path] = field(default_factory=list)
    stage_sizes: list[tuple[int, int]] = field(default_factory=list)
    error: str | None = None


def check_request(cascade: SelfCascadePipeline, request: Request) -> None:
    """Refuse what the CLI refuses before sampling anything (sizes, ratios, modes), with its messages."""
    if not request.prompt.strip():
        raise ValueError("type a prompt first.")
    if not request.modes:
        raise ValueError("choose at least one mode.")
    for mode in request.modes:
        cascade.plan(request.height, request.width, mode)


def run_modes(cascade: SelfCascadePipeline, lock: threading.Lock, request: Request, out_dir: Path,
              stop: threading.Event, on_step: StepReport | None = None) -> Iterator[ModeResult]:
    """Sample ``request`` once per mode, yielding each result as it is written; ``stop`` ends the run at the next step.

    A mode that refuses the settings (e.g. K for hires-fix, a missing bank) yields its error; the others still run.
    """
    check_request(cascade, request)
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    for mode in request.modes:
        stages = cascade.plan(request.height, request.width, mode).stages

        def callback(stage: int, step: int, timestep: torch.Tensor, _latents: torch.Tensor, mode: str = mode,
                     stages: tuple[tuple[int, int], ...] = stages) -> None:
            if stop.is_set():
                raise Stopped(mode)
            if on_step is not None:  # the stage's steps: those done plus the schedule's timesteps still below this one
                total = step + 1 + int((cascade.backbone.scheduler.timesteps < timestep).sum())
                on_step(mode, stage, stages, step + 1, total)

        start = time.perf_counter()
        try:
            with lock:
                out = cascade(request.prompt, request.height, request.width, mode=mode,
                              negative_prompt=request.negative_prompt or None, num_inference_steps=request.steps,
                              guidance_scale=request.guidance, K=request.K, seed=request.seed, return_stages=True,
                              callback=callback, progress=False,
                              upsamplers=(request.bank or None) if mode == "tuned" else None)
        except (ValueError, OSError) as exc:
            yield ModeResult(mode, time.perf_counter() - start, error=str(exc))
            continue
        seconds = time.perf_counter() - start
        path = out_dir / f"{run_id}-{request.seed}-{mode}.png"
        stage_paths = [save_png(images[0], path.with_name(f"{path.stem}-stage{r}.png"), out.settings, request.seed)
                       for r, images in enumerate(out.stages[:-1])]
        save_png(out.images[0], path, out.settings, request.seed)
        yield ModeResult(mode, seconds, path, stage_paths, list(out.plan.stages))
