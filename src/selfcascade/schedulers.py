"""Which diffusers schedulers can drive the cascade, under the names A1111 and ComfyUI users know.

Every stage after the first starts part-way through the schedule (at the first timestep <= K), so a
scheduler must add noise at a timestep, start there, and count its timesteps in training steps. A
converted scheduler keeps the model's own settings (its config); keys the source config lacks take the
value diffusers' latent pipelines use, not the target class's default (DDIM's ``clip_sample=True`` would
clip latents).

Importing this module needs neither torch nor diffusers (the CLI lists the names without them).
"""

from __future__ import annotations

import copy
from typing import Any

#: Name -> (diffusers class, config overrides). ``pipeline`` keeps the pipeline's own scheduler.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++-2m": ("DPMSolverMultistepScheduler",
                 {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "dpm++-2m-karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
#: Every name ``--scheduler`` takes, the cascade's default first.
SCHEDULER_NAMES: tuple[str, ...] = (*SCHEDULERS, "pipeline")
#: Config keys a source may lack, with the value latent diffusion models use.
_LATENT_DEFAULTS = {"clip_sample": False}

_REQUIRED_METHODS = ("set_timesteps", "add_noise", "step", "scale_model_input")
#: Schedulers whose step() keeps a warm-up counter that set_begin_index does not move.
_CANNOT_START_MID_SCHEDULE = frozenset({"PNDMScheduler"})
_HINT = (f"Use one of the schedulers the cascade supports: {', '.join(SCHEDULER_NAMES[:-1])} (--scheduler NAME; "
         "A1111 spellings such as 'DPM++ 2M Karras' or 'Euler a' work too), or a diffusers instance of "
         "DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler or UniPCMultistepScheduler.")


def scheduler_key(name: str) -> str:
    """'DPM++ 2M Karras' -> 'dpm++-2m-karras', 'Euler a' -> 'euler-a': case, spaces and underscores ignored."""
    return "-".join(name.strip().lower().replace("_", " ").split())


def make_scheduler(choice: str | Any, current: Any) -> Any:
    """The scheduler named ``choice`` built from ``current``'s config, ``current`` itself for "pipeline", or
    ``choice`` when it is already a scheduler instance; checked for the cascade either way."""
    if not isinstance(choice, str):
        check_scheduler(choice)
        return choice
    key = scheduler_key(choice)
    if key == "pipeline":
        check_scheduler(current)
        return current
    if key not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {choice!r}; choose one of {', '.join(SCHEDULER_NAMES)}.")
    import diffusers

    class_name, overrides = SCHEDULERS[key]
    missing = {k: v for k, v in _LATENT_DEFAULTS.items() if k not in current.config}
    scheduler = getattr(diffusers, class_name).from_config(current.config, **missing, **overrides)
    check_scheduler(scheduler)
    return scheduler


def check_scheduler(scheduler: Any) -> None:
    """Refuse, naming what works, a scheduler that cannot start part-way or whose timesteps are not training steps."""
    name = type(scheduler).__name__
    missing = [m for m in _REQUIRED_METHODS if not callable(getattr(scheduler, m, None))]
    if missing or not hasattr(scheduler, "config"):
        raise ValueError(f"scheduler {name} cannot drive the cascade: it lacks {', '.join(missing) or 'config'}. {_HINT}")
    if name in _CANNOT_START_MID_SCHEDULE:
        raise ValueError(f"scheduler {name} cannot start part-way through its schedule (its multistep warm-up always "
                         f"begins at the first timestep), which every stage after the first needs. {_HINT}")
    total = scheduler.config.get("num_train_timesteps")
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(10)
    top = float(probe.timesteps.max())
    if total is None or top < total / 2:
        # EDM-style schedulers count in log-sigma (c_noise): every value would be <= K, the whole schedule would
        # run and the pivot would be drowned in noise of sigma_max.
        raise ValueError(f"scheduler {name} counts its timesteps in other units than training steps (largest "
                         f"{top:.3g} of {total}), so K cannot pick where a pivot re-enters its schedule. {_HINT}")
