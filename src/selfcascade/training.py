"""One training loop for the trainers: accelerate, resumable checkpoints, EMA, warm-up, progress bar, loss log.

A trainer supplies the model, its optimizer and ``loss_fn(step, generator)``; the loop owns everything
around it. Every random draw of a step comes from ``step_generator(seed, step, rank)``, so a run resumed
from its checkpoint continues exactly as an uninterrupted one would, and a run refuses to resume under
settings other than the ones it was started with (``check_resume``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from safetensors.torch import load_file, save_file

from .checkpoints import (find_checkpoint, load_optimizer, optimizer_step, past_deadline, read_checkpoint_state,
                          record_loss, step_generator, write_checkpoint)

logger = logging.getLogger(__name__)

#: One step's loss, or its micro-batch losses (gradient accumulation: each backpropagated as it is made).
LossFn = Callable[[int, torch.Generator], torch.Tensor | Iterable[torch.Tensor]]
WriteWeights = Callable[[Path], None]


class EMA:
    """Exponential moving average of a model's float tensors, with the usual warm-up of the decay."""

    def __init__(self, model: torch.nn.Module, max_decay: float) -> None:
        self.max_decay = max_decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.max_decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.float(), 1 - decay)
            else:
                self.shadow[k].copy_(v)


@dataclass(frozen=True)
class LoopConfig:
    """The loop's own settings; the trainer's settings travel in ``state["args"]``."""

    run_dir: Path
    max_steps: int
    lr: float
    warmup: int = 0              # linear learning-rate warm-up steps, then constant
    grad_clip: float = 1.0       # gradient-norm clip (0: off)
    checkpoint_every: int = 100
    log_every: int = 10          # steps between points of the recorded loss curve
    seed: int = 0
    desc: str = "train"
    deadline: float | None = None  # ``checkpoints.deadline_after``: stop (and checkpoint) once it has passed
    lr_at: Callable[[int], float] | None = None  # a step's learning rate, instead of warm-up then constant
    cooldown: int = 0            # linear decay to 0 over the last this many steps before max_steps (0: none)


MODEL_FILE, EMA_FILE = "model.safetensors", "ema.safetensors"


def model_and_ema_writer(accelerator, model: torch.nn.Module, ema: EMA) -> WriteWeights:
    """``write_weights`` for a trainer of one model with an EMA: ``model.safetensors`` and ``ema.safetensors``."""
    def write(folder: Path) -> None:
        weights = accelerator.unwrap_model(model).state_dict()
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(folder / MODEL_FILE))
        save_file({k: v.cpu().contiguous() for k, v in ema.shadow.items()}, str(folder / EMA_FILE))
    return write


def restore_model_and_ema(ckpt: Path, ema: EMA, optimizer: torch.optim.Optimizer, state: dict,
                          device: torch.device) -> None:
    """Load what ``model_and_ema_writer`` saved into the EMA and the optimizer (the model loads its own)."""
    ema.shadow = {k: v.to(device) for k, v in load_file(str(ckpt / EMA_FILE)).items()}
    load_optimizer(optimizer, ckpt, state)


def prepare_training(accelerator, model: torch.nn.Module, lr: float, ema_decay: float, ckpt: Path | None,
                     state: dict, weight_decay: float = 0.0) -> tuple[torch.nn.Module, torch.optim.Optimizer, EMA]:
    """The model on the device with its EMA and an AdamW over its trainable weights, both restored from ``ckpt``
    when resuming, model and optimizer handed to accelerate: what every trainer does before ``train_loop``."""
    model.to(accelerator.device)
    ema = EMA(model, ema_decay)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    if ckpt is not None:
        restore_model_and_ema(ckpt, ema, optimizer, state, accelerator.device)
    state.pop("optimizer", None)
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, ema


def latest_ema(run_dir: Path, command: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(state, EMA weights) of a run's latest checkpoint, for export; ``command`` names the trainer to run first."""
    ckpt = find_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint under {run_dir}; train first with `selfcascade {command}`")
    return read_checkpoint_state(ckpt), load_file(str(ckpt / EMA_FILE))


def write_train_summary(folder: Path, state: dict) -> None:
    """``train_state.json`` beside exported weights: steps, wall time, hardware, final loss and the run's settings."""
    summary = {"train_steps": state["step"], "train_seconds": round(state["train_seconds"]),
               "hardware": state.get("hardware", ""), "loss": state.get("loss"), **state["args"]}
    if "prediction_type" in state:  # an objective taken from the starting weights, not given as an argument
        summary.setdefault("prediction_type", state["prediction_type"])
    if "init_from" in state:  # a run continued from another run's weights
        summary["init_from"] = state["init_from"]
    (folder / "train_state.json").write_text(json.dumps(summary, indent=1) + "\n")


def prior_training(folder: Path) -> dict:
    """Where a run's starting weights came from and the steps and seconds they had been trained for (their
    ``train_state.json``, earlier starts included), for ``state["init_from"]``."""
    summary_file = folder / "train_state.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    previous = summary.get("init_from") or {}  # null: the source started from scratch
    prior = {"path": str(folder), "steps": summary.get("train_steps", 0) + previous.get("steps", 0),
             "seconds": summary.get("train_seconds", 0) + previous.get("seconds", 0)}
    if "prediction_type" in summary:  # a continuation may change the objective (the v3 UNet did)
        prior["prediction_type"] = summary["prediction_type"]
    if not previous:  # one run made these weights: its batch and hardware describe all their steps
        prior.update({k: summary[k] for k in ("batch_size", "hardware") if k in summary})
    return prior


def check_resume(saved: Mapping | None, settings: Mapping, run_dir: Path, ignore: tuple[str, ...] = (),
                 hint: str = "") -> None:
    """Refuse to resume a run under other settings, naming each one that differs. ``saved``: the settings the run
    recorded (keys it lacks, e.g. from before they existed, are not compared); ``hint`` ends the message."""
    saved = saved or {}
    differ = [k for k in settings if k not in ignore and k in saved and saved[k] != settings[k]]
    if differ:
        listed = ", ".join(f"{k}: run has {saved[k]!r}, now {settings[k]!r}" for k in differ)
        raise ValueError(f"{run_dir} holds a run made with other settings ({listed}); resume it with the same "
                         f"arguments or give another --run-dir{hint}.")


def constant_lr(config: LoopConfig, step: int) -> float:
    """Warm-up, a constant rate, then (``config.cooldown``) a linear decay to 0 at ``config.max_steps``: the decay
    lets a run trained at a constant rate settle, and is set where it starts, so a run can be extended, then cooled."""
    scale = min(1.0, (step + 1) / max(1, config.warmup))
    if config.cooldown:
        scale = min(scale, (config.max_steps - step) / config.cooldown)
    return config.lr * scale


def hardware(accelerator) -> str:
    if accelerator.device.type == "cuda":
        return f"{accelerator.num_processes}x {torch.cuda.get_device_name(accelerator.device)}"
    return f"CPU, {torch.get_num_threads()} threads, {accelerator.num_processes} process(es)"


def train_loop(accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn,
               config: LoopConfig, state: dict, write_weights: WriteWeights, ema: EMA | None = None,
               on_checkpoint: Callable[[int], None] | None = None,
               on_step: Callable[[int], None] | None = None) -> dict:
    """Run ``loss_fn`` steps from ``state["step"]`` to ``config.max_steps``, or until ``config.deadline`` has passed;
    checkpoint atomically on the way and where it stops.

    ``model`` and ``optimizer`` are already ``accelerator.prepare``d; ``write_weights(folder)`` saves the
    trainer's weights (the EMA's too) into a checkpoint folder. The main process calls ``on_checkpoint(step)``
    after each checkpoint and ``on_step(step)`` after every step (snapshots, validation grids). Returns ``state``.
    """
    step = state.setdefault("step", 0)
    state.setdefault("train_seconds", 0.0)
    bar = tqdm(total=config.max_steps, initial=step, desc=config.desc, unit="step",
               disable=not accelerator.is_main_process, mininterval=5)
    model.train()
    saved = None
    while step < config.max_steps:
        if past_deadline(accelerator, config.deadline):
            logger.info("time budget spent at step %d (of --max-steps %d)", step, config.max_steps)
            break
        t0 = time.perf_counter()
        lr = config.lr_at(step) if config.lr_at else constant_lr(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = optimizer_step(accelerator, loss_fn(step, step_generator(config.seed, step, accelerator.process_index)),
                              optimizer, model.parameters(), config.grad_clip)
        if ema is not None:
            ema.update(accelerator.unwrap_model(model), step)
        step += 1
        state["train_seconds"] += time.perf_counter() - t0
        record_loss(accelerator, loss, state, step, bar, config.log_every, decay=0.98)
        if step % config.checkpoint_every == 0 or step == config.max_steps:
            _checkpoint(accelerator, config.run_dir, optimizer, state, step, write_weights)
            saved = step
            if on_checkpoint is not None and accelerator.is_main_process:
                on_checkpoint(step)
        if on_step is not None and accelerator.is_main_process:
            on_step(step)
    bar.close()
    if saved != step and (step < config.max_steps or not (config.run_dir / "checkpoint").exists()):
        # stopped by the deadline between checkpoints, or no steps to run: still leave this step to resume or export
        _checkpoint(accelerator, config.run_dir, optimizer, state, step, write_weights)
    return state


def _checkpoint(accelerator, run_dir: Path, optimizer, state: dict, step: int, write_weights: WriteWeights) -> None:
    accelerator.wait_for_everyone()
    state["step"] = step
    if accelerator.is_main_process:
        write_checkpoint(run_dir, optimizer, state, write_weights)
        logger.info("step %d: loss %.4f, %.2f s/step, checkpoint saved", step, state.get("loss", float("nan")),
                    state["train_seconds"] / max(1, step))
