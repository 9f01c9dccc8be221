"""Fréchet distance against a scipy reference, float64 statistics, and the real-statistics cache."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from videoar_megatron.evaluation.fvd import FeatureStats, RealStatsCache, frechet_distance


def reference_fd(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """StyleGAN-V's compute_fvd written out independently: np.cov + scipy sqrtm of the product."""
    mu1, mu2 = feats1.mean(0), feats2.mean(0)
    s1, s2 = np.cov(feats1, rowvar=False), np.cov(feats2, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sqrtm warns on singular products; the value is what we compare
        root = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.real(np.square(mu1 - mu2).sum() + np.trace(s1 + s2 - 2 * root)))


def stats_of(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return feats.mean(0), np.cov(feats, rowvar=False)


def features(rng: np.random.Generator, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + rng.normal(size=d) * 0.1 + shift


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
@pytest.mark.parametrize("n, d", [(600, 64), (2000, 400)])
def test_matches_scipy_reference_on_random_features(method, n, d):
    rng = np.random.default_rng(n + d)
    a, b = features(rng, n, d), features(rng, n, d, shift=0.3)
    ours = frechet_distance(*stats_of(a), *stats_of(b), method=method)
    assert ours == pytest.approx(reference_fd(a, b), rel=1e-9)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_matches_scipy_reference_when_covariances_are_singular(method):
    # 40 clips of 64-d features: rank-39 covariances, the regime of a small evaluation run.
    rng = np.random.default_rng(1)
    a, b = features(rng, 40, 64), features(rng, 40, 64, shift=0.2)
    # sqrtm of a singular product is only accurate to ~sqrt(machine eps) relative; 1e-6 is the
    # agreement both methods reach with the reference here.
    ours = frechet_distance(*stats_of(a), *stats_of(b), method=method)
    assert np.isfinite(ours) and ours > 0
    assert ours == pytest.approx(reference_fd(a, b), rel=1e-6)


def test_constant_feature_dimensions_give_the_reference_value():
    # Exactly singular covariances (4 dead dimensions in both sets): the eps/real-part handling
    # must not change the value.
    rng = np.random.default_rng(2)
    a, b = features(rng, 300, 16), features(rng, 300, 16, shift=0.1)
    a[:, :4] = 0.0
    b[:, :4] = 0.0
    ref = reference_fd(a, b)
    for method in ("sqrtm", "eigh"):
        assert frechet_distance(*stats_of(a), *stats_of(b), method=method) == pytest.approx(ref, rel=1e-8)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_identical_sets_give_zero(method):
    rng = np.random.default_rng(3)
    a = features(rng, 1000, 128)
    mu, sigma = stats_of(a)
    fd = frechet_distance(mu, sigma, mu, sigma, method=method)
    assert abs(fd) < 1e-9 * np.trace(sigma)


def test_distance_grows_with_mean_shift():
    rng = np.random.default_rng(4)
    a, b = features(rng, 800, 32), features(rng, 800, 32)
    mu_b, sigma_b = stats_of(b)
    mu_a, sigma_a = stats_of(a)
    direction = rng.normal(size=32)
    direction /= np.linalg.norm(direction)
    shifts = [0.0, 0.5, 1.0, 2.0, 4.0]
    fds = [frechet_distance(mu_a + s * direction, sigma_a, mu_b, sigma_b) for s in shifts]
    assert all(x < y for x, y in zip(fds, fds[1:]))
    # Only the mean term moves: FD(shift) - FD(0) = ||mu_a + s·u - mu_b||² - ||mu_a - mu_b||².
    base = mu_a - mu_b
    for s, fd in zip(shifts, fds):
        expected = fds[0] + np.sum((base + s * direction) ** 2) - np.sum(base ** 2)
        assert fd == pytest.approx(expected, rel=1e-10)


def test_a_tiny_imaginary_part_from_rounding_is_dropped():
    # A covariance with an eigenvalue of -1e-12 (rounding in a real run) makes sqrtm complex with
    # an imaginary diagonal of 1e-6: below the 1e-3 bound, so the real part is used.
    mu = np.zeros(2)
    rounded = np.diag([1.0, -1e-12])
    fd = frechet_distance(mu, rounded, mu, np.eye(2), method="sqrtm")
    assert isinstance(fd, float) and fd == pytest.approx(1.0, abs=1e-9)  # (1 + 0) + 2 - 2·(1 + 0)


def test_a_degenerate_covariance_with_a_large_imaginary_root_is_an_error():
    mu = np.zeros(2)
    not_psd = np.diag([-1.0, 1.0])  # sqrtm gives i on the diagonal: not a covariance
    with pytest.raises(ValueError, match="imaginary component"):
        frechet_distance(mu, not_psd, mu, np.eye(2), method="sqrtm")


def test_feature_stats_equal_numpy_mean_and_unbiased_cov_in_float64():
    # A large common offset is where sum-of-outer-products statistics lose digits in float32.
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3000, 50)) * 2.0 + 10.0
    stats = FeatureStats(50)
    for chunk in np.array_split(x, 7):
        stats.update(torch.from_numpy(chunk).float())  # extractor output is fp32; sums are fp64
    x32 = x.astype(np.float32).astype(np.float64)
    mu, cov = stats.mean_cov()
    assert stats.n == 3000 and mu.dtype == np.float64
    np.testing.assert_allclose(mu, x32.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x32, rowvar=False), rtol=0, atol=1e-10)


def test_merged_stats_equal_stats_of_the_union():
    rng = np.random.default_rng(6)
    x = torch.from_numpy(rng.normal(size=(500, 20)))
    whole, part1, part2 = FeatureStats(20), FeatureStats(20), FeatureStats(20)
    whole.update(x)
    part1.update(x[:123])
    part2.update(x[123:])
    merged = part1.merge(part2)
    assert merged.n == whole.n
    np.testing.assert_allclose(merged.mean_cov()[1], whole.mean_cov()[1], rtol=1e-12, atol=1e-14)


def test_non_finite_features_are_refused():
    stats = FeatureStats(3)
    with pytest.raises(FloatingPointError):
        stats.update(torch.tensor([[1.0, float("nan"), 0.0]]))


def test_cache_round_trips_and_keys_on_every_field(tmp_path):
    cache = RealStatsCache(tmp_path)
    stats = FeatureStats(4)
    stats.update(torch.randn(10, 4, dtype=torch.float64))
    fields = {"num_frames": 17, "resolution": 128, "extractor": {"weights_sha256": "ab"}, "count": 10}
    assert cache.load(fields) is None
    cache.save(fields, stats)
    loaded = cache.load(fields)
    assert loaded.n == 10 and torch.equal(loaded.outer_DD, stats.outer_DD) and torch.equal(loaded.sum_D, stats.sum_D)
    other = {**fields, "num_frames": 16}
    assert cache.paths(other) != cache.paths(fields) and cache.load(other) is None
    nested = {**fields, "extractor": {"weights_sha256": "cd"}}
    assert cache.load(nested) is None


def test_cache_refuses_a_file_made_for_other_fields(tmp_path):
    cache = RealStatsCache(tmp_path)
    stats = FeatureStats(2)
    stats.update(torch.randn(3, 2, dtype=torch.float64))
    fields = {"count": 3}
    _, meta = cache.paths(fields)
    cache.save(fields, stats)
    meta.write_text('{"fields": {"count": 4}, "n": 3}')
    with pytest.raises(RuntimeError, match="other settings"):
        cache.load(fields)
