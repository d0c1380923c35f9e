"""Where pivots are re-noised to: the paper's K, carried over between noise schedules."""

from __future__ import annotations

import torch

#: The paper's intermediate step: pivots are diffused to K = 700 of T = 1000 (on Stable Diffusion's schedule).
DEFAULT_K = 700


def matched_k(alphas_cumprod: torch.Tensor) -> int:
    """The step of this noise schedule with the signal level of the paper's K=700 on SD's schedule.

    K=700 was chosen for Stable Diffusion's scaled-linear betas (0.00085..0.012), where sqrt(abar_700)
    = 0.287 of the pivot survives; on the DDPM linear betas (1e-4..0.02) step 700 keeps only 0.083, too
    little for the pivot to guide anything, and step 494 keeps the same 0.287.
    """
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    reference = torch.cumprod(1 - betas, 0)[DEFAULT_K]
    return int((alphas_cumprod.double() - reference).abs().argmin())
