"""Sharing image jobs between the processes of ``accelerate launch`` (or ``torchrun``), through accelerate's state.

Generating thousands of images is embarrassingly parallel: each process takes a contiguous share of the jobs,
writes its own files, and the main process does whatever needs every result (a summary, the metrics). A plain
``selfcascade`` run is a single process, for which every function here is the identity: it owns every job,
keeps its device, gathers only its own value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env

T = TypeVar("T")


def process_state(device: str | None = None) -> PartialState:
    """accelerate's per-process state (created on first use, shared afterwards).

    Processes use gloo on CPU when ``device`` is cpu, ``accelerate launch --cpu`` set ACCELERATE_USE_CPU, or the
    machine has no accelerator: accelerate only groups CPU processes when asked to.
    """
    cpu = device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU") or torch.accelerator.current_accelerator() is None
    return PartialState(cpu=cpu)


def process_device(requested: str | None) -> str | None:
    """The device this process samples on: with several processes, each its own (``cuda`` means this process's
    GPU); with one, ``requested`` unchanged (None: the best available, as ever)."""
    state = process_state(requested)
    if state.num_processes == 1 or (requested is not None and requested != state.device.type):
        return requested
    return str(state.device)


def my_share(items: Sequence[T]) -> list[T]:
    """This process's contiguous share of ``items`` (all of them in a single process; may be empty)."""
    with process_state().split_between_processes(list(items)) as share:
        return list(share)


def gather(value: Any) -> list[Any]:
    """``value`` of every process, in process order (on every process)."""
    return gather_object([value])


def wait_for_everyone() -> None:
    process_state().wait_for_everyone()


def close() -> None:
    """Tear down the process group, if a launcher made one: a gloo group left to interpreter shutdown can abort a
    process that has finished its work ("terminate called without an active exception"), failing the launch."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_main_process() -> bool:
    return process_state().is_main_process


def num_processes() -> int:
    return process_state().num_processes
