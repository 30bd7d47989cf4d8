import math

import numpy as np
import pytest

from fewstep.math.metrics import fd_from_features, frechet_distance, kid, mean_cov, precision_recall, psnr, rmse


def test_fd_of_a_set_with_itself_is_zero():
    f = np.random.default_rng(0).normal(size=(500, 16))
    assert fd_from_features(f, f) == pytest.approx(0.0, abs=1e-8)


def test_fd_closed_forms():
    d = 8
    mu = np.zeros(d)
    shift = np.arange(d, dtype=float) / 4
    assert frechet_distance(mu, np.eye(d), mu + shift, np.eye(d)) == pytest.approx((shift**2).sum())
    # N(0, I) vs N(0, s^2 I): d (1 - s)^2
    assert frechet_distance(mu, np.eye(d), mu, 4 * np.eye(d)) == pytest.approx(d * (1 - 2) ** 2)
    # grows with the shift
    rng = np.random.default_rng(1)
    a = rng.normal(size=(2000, d))
    fds = [fd_from_features(a, rng.normal(size=(2000, d)) + s) for s in (0.0, 0.5, 1.0)]
    assert fds[0] < fds[1] < fds[2]
    assert fds[2] == pytest.approx(d * 1.0, rel=0.1)


def test_fd_is_stable_for_singular_covariances():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(10, 32))  # n < d: rank-deficient covariance
    fd = fd_from_features(a, a + 1e-3)
    assert math.isfinite(fd) and fd >= 0


def brute_mmd(x, y):
    k = lambda a, b: (a @ b / len(a) + 1) ** 3
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_brute_force():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(12, 5)), rng.normal(size=(12, 5)) + 0.3
    mean, se = kid(x, y, subsets=1, subset_size=12)
    assert mean == pytest.approx(brute_mmd(x, y), rel=1e-10)
    m2, se2 = kid(x, y, subsets=20, subset_size=8)
    assert se2 > 0


def test_precision_recall_separate_quality_from_coverage():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(400, 4))
    collapsed = rng.normal(size=(400, 4)) * 0.1  # inside the real manifold, covers little of it
    p, r = precision_recall(real, collapsed)
    assert p > 0.9 and r < 0.5
    p2, r2 = precision_recall(real, rng.normal(size=(400, 4)) + 6)  # far away
    assert p2 < 0.05


def test_rmse_psnr_known_values():
    a = np.zeros((2, 3, 4, 4))
    b = np.full((2, 3, 4, 4), 0.5)
    assert rmse(a, b) == pytest.approx(0.5)
    assert psnr(a, b) == pytest.approx(20 * math.log10(2 / 0.5))
    assert psnr(a, a) == math.inf
    with pytest.raises(ValueError):
        mean_cov(np.zeros((1, 3)))
