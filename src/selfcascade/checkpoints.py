"""Resumable training checkpoints shared by every trainer: safetensors and json only, swapped in atomically.

A checkpoint is a folder ``<run-dir>/checkpoint`` holding ``state.json`` (step, settings, the optimizer's
non-tensor state) next to the trainer's own safetensors files. It is built as a sibling folder and then
renamed into place, so a run killed at any moment leaves one complete checkpoint behind.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from time import monotonic
from typing import Callable, Iterable

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT = "checkpoint"
STATE_JSON = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


def write_checkpoint(run_dir: Path, optimizer: torch.optim.Optimizer, state: dict,
                     write_weights: Callable[[Path], None]) -> Path:
    """``write_weights(folder)`` saves the trainer's weights; optimizer and state are added here."""
    final, tmp, old = run_dir / CHECKPOINT, run_dir / f"{CHECKPOINT}.tmp", run_dir / f"{CHECKPOINT}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_weights(tmp)
    tensors, meta = _split_optimizer_state(optimizer)
    save_file(tensors, str(tmp / OPTIMIZER_FILE))
    (tmp / STATE_JSON).write_text(json.dumps({**state, "optimizer": meta}, indent=1))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_at(accelerator, run_dir: Path, step: int, every: int, last: int, optimizer: torch.optim.Optimizer,
                  state: dict, write_weights: Callable[[Path], None]) -> None:
    """Every ``every`` steps and at step ``last``: all processes meet, the main one writes the checkpoint."""
    if step % every and step != last:
        return
    accelerator.wait_for_everyone()
    state["step"] = step
    if accelerator.is_main_process:
        write_checkpoint(run_dir, optimizer, state, write_weights)


def find_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint of a run, also after a crash mid-swap."""
    for name in (CHECKPOINT, f"{CHECKPOINT}.old"):
        path = run_dir / name
        if (path / STATE_JSON).exists():
            return path
    return None


def read_checkpoint_state(path: Path) -> dict:
    return json.loads((path / STATE_JSON).read_text())


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path, state: dict) -> None:
    """Restore what :func:`write_checkpoint` saved of ``optimizer``."""
    tensors = load_file(str(path / OPTIMIZER_FILE))
    meta = state["optimizer"]
    per_param: dict[int, dict] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        pid, name = key.split(".", 1)
        per_param.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": meta["param_groups"]})


def optimizer_step(accelerator, loss: torch.Tensor | Iterable[torch.Tensor], optimizer: torch.optim.Optimizer, params,
                   grad_clip: float) -> torch.Tensor:
    """Backward through accelerate (mixed precision, several processes), clip the gradient norm (0: off), step.

    ``loss`` may be an iterable of micro-batch losses (gradient accumulation, each already divided by their
    count): each is backpropagated as soon as it is made, so one micro-batch's graph is alive at a time. Returns
    the (summed) loss, detached.
    """
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros(())
    for part in [loss] if isinstance(loss, torch.Tensor) else loss:
        accelerator.backward(part)
        total = total.to(part.device) + part.detach()
    if grad_clip > 0:
        accelerator.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return total


def record_loss(accelerator, loss: torch.Tensor, state: dict, step: int, bar, log_every: int = 0,
                decay: float = 0.95) -> float:
    """The step's loss averaged over processes, into ``state`` (smoothed ``loss``; every ``log_every``
    steps the ``losses`` curve) and onto the progress bar; a non-finite loss stops training."""
    value = accelerator.gather(loss.detach()[None]).mean().item()
    if not math.isfinite(value):
        raise FloatingPointError(f"loss became {value} at step {step}; lower --lr or check the data")
    smooth = state.get("loss")
    state["loss"] = value if smooth is None else decay * smooth + (1 - decay) * value
    if log_every and step % log_every == 0:
        state.setdefault("losses", []).append([step, value])
    bar.update()
    bar.set_postfix(loss=f"{state['loss']:.4f}", refresh=False)
    return value


def deadline_after(minutes: float | None) -> float | None:
    """The ``monotonic()`` instant ``minutes`` from now (None: no time limit), for ``past_deadline``."""
    return None if minutes is None else monotonic() + 60 * minutes


def past_deadline(accelerator, deadline: float | None) -> bool:
    """Whether a trainer's wall-clock budget (``deadline_after``) is spent, as the main process's clock says, so that
    every process stops after the same step."""
    if deadline is None:
        return False
    late = monotonic() >= deadline
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        late = bool(broadcast(torch.tensor([late], device=accelerator.device)).item())
    return late


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The only randomness of a training step, so that a resumed run replays an uninterrupted one exactly."""
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + step) * 131 + rank)
    return g


def _split_optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flat tensors for safetensors, and the json-able rest."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, pstate in state["state"].items():
        for name, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}
