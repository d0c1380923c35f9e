"""Metric numerics: closed forms, zero on identical sets, growth under degradation, determinism."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from selfcascade.metrics import (FeatureExtractor, FeatureExtractorUnavailable, InceptionFeatures, SWDDescriptors,
                                 feature_statistics, frechet_distance, frechet_distance_from_stats,
                                 kernel_inception_distance, laplacian_pyramid, random_crops, resize_images,
                                 sliced_wasserstein_distance, sliced_wasserstein_from_descriptors)
from selfcascade.metrics import features as features_module


def _exact_moment_samples(mean: torch.Tensor, cov: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Samples whose sample mean and (unbiased) sample covariance equal ``mean`` and ``cov`` exactly."""
    z = torch.randn(n, mean.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(dim=0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T  # identity sample covariance
    return z @ torch.linalg.cholesky(cov).T + mean


def _smooth_images(n: int, seed: int, size: int = 64) -> torch.Tensor:
    """Cheap 'natural-ish' images: upsampled coarse colour fields plus a little texture."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=size, mode="bicubic", align_corners=False)
    return (coarse + 0.1 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)


# --- FID -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, d", [(200, 16), (10, 64)])  # the second has singular covariances
def test_frechet_identical_sets_is_zero(n, d):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3, d)
    assert frechet_distance(x, x) == pytest.approx(0, abs=1e-8)
    assert frechet_distance(x.numpy(), x.numpy()) == pytest.approx(0, abs=1e-8)


def test_frechet_matches_closed_form_for_non_commuting_gaussians():
    mu_a, mu_b = torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([2.0, -1.0], dtype=torch.float64)
    cov_a = torch.tensor([[2.0, 0.8], [0.8, 1.0]], dtype=torch.float64)
    cov_b = torch.tensor([[1.0, -0.3], [-0.3, 0.5]], dtype=torch.float64)
    # For 2x2 M with non-negative eigenvalues l1, l2: tr(M^1/2) = sqrt(l1) + sqrt(l2) = sqrt(tr M + 2 sqrt(det M)).
    product = cov_a @ cov_b
    tr_sqrt = math.sqrt(product.trace() + 2 * math.sqrt(torch.det(product)))
    expected = float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace()) - 2 * tr_sqrt
    assert frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) == pytest.approx(expected, rel=1e-10)
    feats_a = _exact_moment_samples(mu_a, cov_a, 50, seed=1)
    feats_b = _exact_moment_samples(mu_b, cov_b, 80, seed=2)
    assert frechet_distance(feats_a, feats_b) == pytest.approx(expected, rel=1e-9)


def test_frechet_diagonal_closed_form_and_statistics():
    var_a, var_b = torch.linspace(0.5, 4, 32, dtype=torch.float64), torch.linspace(3, 0.2, 32, dtype=torch.float64)
    mu_a, mu_b = torch.zeros(32, dtype=torch.float64), torch.full((32,), 0.25, dtype=torch.float64)
    expected = float((mu_a - mu_b).square().sum() + (var_a.sqrt() - var_b.sqrt()).square().sum())
    feats_a = _exact_moment_samples(mu_a, torch.diag(var_a), 100, seed=3)
    mean, cov = feature_statistics(feats_a)
    torch.testing.assert_close(mean, mu_a, atol=1e-12, rtol=0)
    torch.testing.assert_close(cov, torch.diag(var_a), atol=1e-12, rtol=0)
    feats_b = _exact_moment_samples(mu_b, torch.diag(var_b), 100, seed=4)
    assert frechet_distance(feats_a, feats_b) == pytest.approx(expected, rel=1e-9)


def test_frechet_grows_with_mean_shift():
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randn(300, 8, generator=torch.Generator().manual_seed(1))
    same, shifted, more_shifted = (frechet_distance(x, y + s) for s in (0.0, 0.5, 1.0))
    assert same < 0.2 < shifted < more_shifted


# --- KID -------------------------------------------------------------------------------------------

def test_kid_identical_sets_small_shifted_large():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 16, generator=g), torch.randn(200, 16, generator=g)
    # A set against itself is not exactly 0 for the unbiased estimator: with K the kernel matrix of
    # the m samples, it is 2 / (m - 1) * (mean(K) - mean(diag(K))), slightly negative.
    kernel = (x.double() @ x.double().T / 16 + 1) ** 3
    expected_self = 2 / 199 * float(kernel.mean() - kernel.diagonal().mean())
    self_mean, self_std = kernel_inception_distance(x, x, subsets=5, subset_size=200)
    assert self_mean == pytest.approx(expected_self, rel=1e-9) and self_mean < 0 and self_std < 1e-12
    same_mean, same_std = kernel_inception_distance(x, y, subsets=20, subset_size=100)
    shifted_mean, _ = kernel_inception_distance(x, y + 1.0, subsets=20, subset_size=100)
    assert abs(same_mean) < 0.1 and same_std > 0
    assert shifted_mean > 10 * abs(same_mean) and shifted_mean > 10 * abs(self_mean)


def test_kid_is_unbiased_and_can_be_negative():
    g = torch.Generator().manual_seed(0)
    values = torch.tensor([
        kernel_inception_distance(torch.randn(12, 4, generator=g), torch.randn(12, 4, generator=g),
                                  subsets=1, subset_size=12, seed=trial)[0]
        for trial in range(300)
    ])
    assert (values < 0).any()
    assert abs(values.mean()) < 3 * values.std() / math.sqrt(len(values))


def test_kid_seeded_and_subset_size_clipped():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 6, generator=g), torch.randn(20, 6, generator=g) + 0.3
    first = kernel_inception_distance(x, y, subsets=10, subset_size=1000, seed=7)  # clipped to 20
    assert first == kernel_inception_distance(x, y, subsets=10, subset_size=1000, seed=7)
    assert first != kernel_inception_distance(x, y, subsets=10, subset_size=1000, seed=8)
    assert kernel_inception_distance(x, y, subsets=1)[1] == 0.0
    with pytest.raises(ValueError, match="feature sizes"):
        kernel_inception_distance(x, torch.randn(20, 5))


# --- sliced Wasserstein ----------------------------------------------------------------------------

def test_swd_identical_zero_and_one_value_per_level():
    images = _smooth_images(8, seed=0)
    result = sliced_wasserstein_distance(images, images)
    assert result.resolutions == [64, 32, 16]
    assert len(result.per_level) == 3
    assert result.per_level == [0.0, 0.0, 0.0] and result.mean == 0.0
    assert len(sliced_wasserstein_distance(_smooth_images(4, 0, size=40), _smooth_images(4, 1, size=40)).per_level) == 2


def test_swd_detects_blur_and_noise_at_the_finest_level():
    a, b = _smooth_images(16, seed=0), _smooth_images(16, seed=1)
    blurred = resize_images(resize_images(b, 16), 64)
    noisy = (b + 0.1 * torch.randn(b.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    same = sliced_wasserstein_distance(a, b).per_level[0]
    assert sliced_wasserstein_distance(a, blurred).per_level[0] > 1.5 * same
    assert sliced_wasserstein_distance(a, noisy).per_level[0] > 1.3 * same


def test_swd_sets_of_different_counts_and_seeding():
    a, b = _smooth_images(6, seed=0, size=32), _smooth_images(4, seed=1, size=32)
    first = sliced_wasserstein_distance(a, b, seed=3)
    assert first == sliced_wasserstein_distance(a, b, seed=3)
    assert first.mean > 0 and len(first.per_level) == 2
    with pytest.raises(ValueError, match="sizes differ"):
        sliced_wasserstein_distance(a, _smooth_images(4, seed=1, size=64))


def test_swd_batch_size_changes_no_number():
    a, b = _smooth_images(7, seed=0, size=32), _smooth_images(5, seed=1, size=32)  # counts differ: subsampling
    whole = sliced_wasserstein_distance(a, b, batch_size=64)
    for batch_size in (1, 3):
        batched = sliced_wasserstein_distance(a, b, batch_size=batch_size)
        assert batched.resolutions == whole.resolutions
        assert batched.per_level == pytest.approx(whole.per_level, rel=1e-5, abs=1e-7)


def test_swd_descriptors_depend_on_image_index_not_on_order():
    a, b = _smooth_images(6, seed=0, size=32), _smooth_images(6, seed=1, size=32)
    forward, backward, other = SWDDescriptors(seed=3), SWDDescriptors(seed=3), SWDDescriptors(seed=3)
    forward.add(a)
    for start in (4, 2, 0):  # batches in reverse order, each told where it starts
        backward.add(a[start:start + 2], first_index=start)
    other.add(b)
    assert backward.count == 6 and backward.resolutions == [32, 16]
    ahead = sliced_wasserstein_from_descriptors(forward, other, seed=4)
    behind = sliced_wasserstein_from_descriptors(backward, other, seed=4)
    assert behind.per_level == pytest.approx(ahead.per_level, rel=1e-5, abs=1e-7)  # equal counts: no subsampling
    assert ahead == sliced_wasserstein_distance(a, b, seed=3)  # the in-memory function is this path
    same = SWDDescriptors(seed=3)
    same.add(a)
    assert sliced_wasserstein_from_descriptors(forward, same).per_level == [0.0, 0.0]  # common random numbers


def test_swd_descriptors_errors():
    descriptors = SWDDescriptors()
    with pytest.raises(ValueError, match="no images gathered"):
        sliced_wasserstein_from_descriptors(descriptors, descriptors)
    descriptors.add(_smooth_images(2, seed=0, size=32))
    with pytest.raises(ValueError, match="sizes differ"):
        descriptors.add(_smooth_images(2, seed=0, size=64))
    larger = SWDDescriptors()
    larger.add(_smooth_images(2, seed=0, size=64))
    with pytest.raises(ValueError, match="sizes differ"):
        sliced_wasserstein_from_descriptors(descriptors, larger)
    with pytest.raises(ValueError, match="smaller than min_size"):
        SWDDescriptors().add(_smooth_images(1, seed=0, size=8))
    with pytest.raises(ValueError, match="at least patch_size"):
        SWDDescriptors(patch_size=9, min_size=8)


def test_laplacian_pyramid_of_constant_image():
    images = torch.full((2, 3, 32, 32), 0.4)
    bands = laplacian_pyramid(images, 3)
    assert [band.shape[-1] for band in bands] == [32, 16, 8]
    for band in bands[:-1]:
        assert band.abs().max() < 1e-6  # no detail in a flat image
    torch.testing.assert_close(bands[-1], torch.full((2, 3, 8, 8), 0.4))


# --- image-set preparation -------------------------------------------------------------------------

def test_resize_images_shapes_and_range():
    images = _smooth_images(3, seed=0)
    assert resize_images(images, 16).shape == (3, 3, 16, 16)
    up = resize_images(images, (96, 128))
    assert up.shape == (3, 3, 96, 128) and up.min() >= 0 and up.max() <= 1
    torch.testing.assert_close(resize_images(torch.full((1, 3, 64, 64), 0.3), 8), torch.full((1, 3, 8, 8), 0.3))
    with pytest.raises(ValueError, match="expected images"):
        resize_images(images[:, :1], 16)


def test_random_crops_shapes_determinism_and_bounds():
    n, height, width, size = 3, 20, 30, 8
    rows = torch.arange(height, dtype=torch.float32).view(1, 1, height, 1).expand(n, 1, height, width)
    cols = torch.arange(width, dtype=torch.float32).view(1, 1, 1, width).expand(n, 1, height, width)
    index = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, height, width)
    images = torch.cat([rows, cols, index], dim=1)  # each pixel records where it came from
    crops = random_crops(images, size, crops_per_image=5, seed=0)
    assert crops.shape == (n * 5, 3, size, size)
    torch.testing.assert_close(crops, random_crops(images, size, crops_per_image=5, seed=0))
    assert not torch.equal(crops, random_crops(images, size, crops_per_image=5, seed=1))
    offsets = torch.arange(size, dtype=torch.float32)
    for k, crop in enumerate(crops):
        top, left = crop[0, 0, 0], crop[1, 0, 0]
        assert 0 <= top <= height - size and 0 <= left <= width - size
        torch.testing.assert_close(crop[0], (top + offsets).view(size, 1).expand(size, size))
        torch.testing.assert_close(crop[1], (left + offsets).view(1, size).expand(size, size))
        assert torch.all(crop[2] == k // 5)  # image-major order
    assert random_crops(images, (4, 6), crops_per_image=2, seed=0).shape == (n * 2, 3, 4, 6)
    with pytest.raises(ValueError, match="larger than the images"):
        random_crops(images, 21, crops_per_image=1, seed=0)


def test_random_crops_depend_on_image_index_not_on_batching():
    images = _smooth_images(5, seed=0, size=24)
    whole = random_crops(images, 8, crops_per_image=3, seed=2)
    pieces = [random_crops(images[start:start + 2], 8, crops_per_image=3, seed=2, first_index=start)
              for start in (4, 0, 2)]  # any batching, any order
    assert torch.equal(torch.cat([pieces[1], pieces[2], pieces[0]]), whole)
    assert not torch.equal(random_crops(images[1:], 8, crops_per_image=3, seed=2), whole[3:])  # index matters
    with pytest.raises(ValueError, match="non-negative"):
        random_crops(images, 8, crops_per_image=1, seed=-1)


# --- feature extractors ----------------------------------------------------------------------------

def test_inception_without_packages_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(FeatureExtractorUnavailable, match=r"selfcascade\[eval\]"):
        InceptionFeatures()


def test_inception_without_weights_fails_before_building(monkeypatch, tmp_path):
    built = []

    def never_built(**kwargs):
        built.append(kwargs)

    monkeypatch.setattr(features_module, "_inception_class_and_cached_weights",
                        lambda: (never_built, tmp_path / "weights-inception.pth"))
    with pytest.raises(FeatureExtractorUnavailable, match="not found.*allow_download=True"):
        InceptionFeatures()
    with pytest.raises(FeatureExtractorUnavailable, match="not found"):
        InceptionFeatures(weights_path=tmp_path / "elsewhere.pth", allow_download=True)
    assert not built


def test_inception_constructor_failure_is_reported(monkeypatch, tmp_path):
    weights = tmp_path / "weights-inception.pth"
    weights.write_bytes(b"not a checkpoint")

    def failing(**kwargs):
        raise RuntimeError("Error(s) in loading state_dict")

    monkeypatch.setattr(features_module, "_inception_class_and_cached_weights", lambda: (failing, weights))
    with pytest.raises(FeatureExtractorUnavailable, match="could not build.*loading state_dict") as info:
        InceptionFeatures()
    assert isinstance(info.value.__cause__, RuntimeError)


def test_inception_features_feed_uint8_299_and_batch(monkeypatch, tmp_path):
    weights = tmp_path / "weights-inception.pth"
    weights.touch()
    seen = []

    class FakeInception(torch.nn.Module):
        def __init__(self, name, features_list, feature_extractor_weights_path):
            super().__init__()
            assert features_list == ["2048"] and feature_extractor_weights_path == str(weights)

        def forward(self, x):
            seen.append((x.dtype, tuple(x.shape)))
            return (x.float().mean(dim=(2, 3)).repeat(1, 4),)  # tuple, as some torchmetrics versions return

    monkeypatch.setattr(features_module, "_inception_class_and_cached_weights", lambda: (FakeInception, weights))
    extractor = InceptionFeatures(batch_size=2)
    assert isinstance(extractor, FeatureExtractor) and extractor.input_size == 299
    feats = extractor(torch.full((5, 3, 32, 48), 0.4))
    assert feats.shape == (5, 12) and feats.dtype == torch.float32
    torch.testing.assert_close(feats, torch.full((5, 12), 102.0))  # round(0.4 * 255)
    assert seen == [(torch.uint8, (2, 3, 299, 299))] * 2 + [(torch.uint8, (1, 3, 299, 299))]
