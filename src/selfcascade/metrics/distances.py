"""Distances between two sets of image features: FID and KID (the paper's FID_*/KID_* columns).

Both take plain ``[N, D]`` feature arrays so they can be checked against closed forms and reused
with any :class:`~selfcascade.metrics.features.FeatureExtractor`. Everything runs in float64:
with 2048-dimensional Inception features, float32 covariance products lose several digits of FID.
"""

from __future__ import annotations

import numpy as np
import torch

Features = torch.Tensor | np.ndarray


def _as_features(feats: Features, name: str) -> torch.Tensor:
    x = torch.as_tensor(feats).detach().to("cpu", torch.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"{name} must be [N, D] with N >= 2, got shape {tuple(x.shape)}")
    return x


def feature_statistics(feats: Features) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance of ``[N, D]`` features, float64.

    Exposed so a reference set's statistics can be computed once and cached (as clean-fid does).
    """
    x = _as_features(feats, "feats")
    return x.mean(dim=0), torch.cov(x.T, correction=1).reshape(x.shape[1], x.shape[1])


def _psd_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a symmetric PSD matrix, eigenvalues below rounding level set to 0.

    With fewer samples than dimensions most true eigenvalues are 0 but come out as +-1e-13 or so;
    their square roots (~1e-7 each, thousands of them) would otherwise add up to a visible error.
    The cut-off is the usual numerical-rank tolerance, largest eigenvalue * size * machine epsilon.
    """
    eigvals, eigvecs = torch.linalg.eigh((matrix + matrix.T) / 2)
    tol = eigvals.abs().max() * eigvals.numel() * torch.finfo(eigvals.dtype).eps
    return torch.where(eigvals > tol, eigvals, 0), eigvecs


def frechet_distance_from_stats(mu_a: Features, sigma_a: Features, mu_b: Features, sigma_b: Features) -> float:
    """Fréchet distance between N(mu_a, sigma_a) and N(mu_b, sigma_b) (Heusel et al. 2017).

    d^2 = |mu_a - mu_b|^2 + tr(sigma_a + sigma_b - 2 (sigma_a sigma_b)^(1/2)).

    tr((sigma_a sigma_b)^(1/2)) is computed as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix A sigma_b A with A = sigma_a^(1/2), which is similar to sigma_a sigma_b. Unlike
    ``scipy.linalg.sqrtm`` of the non-symmetric product, this never returns complex parts and
    needs no diagonal offset when the covariances are singular (fewer samples than dimensions).
    Two eigen-decompositions of D x D: a few seconds for D = 2048 on one CPU core.
    """
    mu_a, mu_b = (torch.as_tensor(m).to("cpu", torch.float64) for m in (mu_a, mu_b))
    sigma_a, sigma_b = (torch.as_tensor(s).to("cpu", torch.float64) for s in (sigma_a, sigma_b))
    eigvals_a, eigvecs_a = _psd_eigh(sigma_a)
    root_a = (eigvecs_a * eigvals_a.sqrt()) @ eigvecs_a.T
    tr_covmean = _psd_eigh(root_a @ sigma_b @ root_a)[0].sqrt().sum()
    diff = mu_a - mu_b
    return float(diff @ diff + sigma_a.trace() + sigma_b.trace() - 2 * tr_covmean)


def frechet_distance(feats_a: Features, feats_b: Features) -> float:
    """FID between two feature sets ``[N_a, D]`` and ``[N_b, D]``: Gaussian fits, then Fréchet distance.

    FID is biased upwards for small N (Binkowski et al. 2018, Chong & Forsyth 2020): only compare
    values computed with the same number of samples, and prefer KID for a few hundred images.
    """
    return frechet_distance_from_stats(*feature_statistics(feats_a), *feature_statistics(feats_b))


def _polynomial_mmd2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 with the cubic kernel k(a, b) = (a.b / d + 1)^3 (Binkowski et al. 2018, eq. 3)."""
    m, d = x.shape
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    off_diagonal = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return off_diagonal - 2 * k_xy.mean()


def kernel_inception_distance(feats_a: Features, feats_b: Features, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID: mean and standard deviation of the unbiased polynomial-kernel MMD^2 over random subsets.

    Follows Binkowski et al. 2018 as implemented by torchmetrics and clean-fid: ``subsets`` times,
    draw ``subset_size`` rows of each set without replacement (clipped to the smaller set) and
    average the unbiased estimator, whose expectation is exactly 0 when both sets come from one
    distribution, so a single value can be negative. A set compared with itself scores
    2 / (m - 1) * (mean(K) - mean(diag K)) <= 0 for its kernel matrix K, not exactly 0: the
    estimator treats the two copies as independent samples. The std is the population std over subsets
    (as torchmetrics reports it); it measures subset-sampling spread, not a confidence interval.
    """
    x = _as_features(feats_a, "feats_a")
    y = _as_features(feats_b, "feats_b")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: {x.shape[1]} vs {y.shape[1]}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")
    generator = torch.Generator().manual_seed(seed)
    scores = torch.stack([
        _polynomial_mmd2(x[torch.randperm(x.shape[0], generator=generator)[:m]],
                         y[torch.randperm(y.shape[0], generator=generator)[:m]])
        for _ in range(subsets)
    ])
    return float(scores.mean()), float(scores.std(correction=0))
