"""Every mode of a run, in one place (no torch import: the CLI's --help lists them).

A mode is a configuration of the same run (``SelfCascadePipeline.__call__(mode=...)``): the self-cascade,
its baseline (direct inference), and the methods it is compared with (``selfcascade.baselines``).
"""

from __future__ import annotations

#: Training-free baselines of the paper's tables (``selfcascade.baselines``).
BASELINE_MODES: tuple[str, ...] = ("attn-sf", "redilate", "hires-fix")
#: The methods users pick instead (``selfcascade.baselines.rivals``).
RIVAL_MODES: tuple[str, ...] = ("hidiffusion", "demofusion", "freescale", "deep-shrink")
MODES: tuple[str, ...] = ("tuning-free", "direct", "tuned", *BASELINE_MODES, *RIVAL_MODES)
#: The self-cascade itself: the modes that take a model's own pivot space and windowed final-stage attention.
CASCADE_MODES: tuple[str, ...] = ("tuning-free", "tuned")
#: Suffix naming a cascade mode with windowed final-stage attention where one word must say both (``evaluate``).
WINDOW_SUFFIX = "+window"
#: Modes for video models: attn-sf and redilate alter attention and convolutions chosen for image UNets
#: (attn-sf would also rescale the temporal attention over frames); the rivals patch image UNets.
VIDEO_MODES: tuple[str, ...] = tuple(m for m in MODES if m not in ("attn-sf", "redilate", *RIVAL_MODES))
#: One line per mode, for --help.
MODE_HELP: dict[str, str] = {
    "tuning-free": "the cascade", "direct": "baseline, one pass at the target size",
    "tuned": "the cascade with --upsamplers", "attn-sf": "direct with attention scaled as Jin et al. 2023",
    "redilate": "direct with ScaleCrafter's dilated convolutions",
    "hires-fix": "base sample, upscale, img2img at --strength",
    "hidiffusion": "direct with the hidiffusion package applied (SD 1.5/2.1/SDXL pipelines)",
    "demofusion": "DemoFusion: progressive upscaling, skip residuals, dilated and patch denoising",
    "freescale": "FreeScale: cascade with skip residuals, restrained dilation, scale fusion",
    "deep-shrink": "direct with the deep levels at half size for the first 35% of steps (Kohya)",
}
