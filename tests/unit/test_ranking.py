"""Issue 18.7: FD intervals, the ranking helper, the duplicate check and the blur check (synthetic
features, no training)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewstep.math import metrics as M
from fewstep.ranking import IncomparableError, claim, compare, separated, separated_pairs


def _gaussians(d: int, seed: int = 0):
    """Two known Gaussians: the generator N(mu1, S1), the reference N(0, S2), and their true FD."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(d, d)) / np.sqrt(d)
    S2 = A @ A.T + 0.5 * np.eye(d)
    mu1, S1 = np.full(d, 0.15), 1.3 * S2
    return mu1, np.linalg.cholesky(S1), np.zeros(d), S2, M.frechet_distance(mu1, S1, np.zeros(d), S2)


def _coverage(d: int, n: int, trials: int, resamples: int = 100) -> tuple[float, float]:
    mu1, L1, mu2, S2, true = _gaussians(d)
    rng = np.random.default_rng(1)
    hits, widths = 0, []
    for t in range(trials):
        f = mu1 + rng.normal(size=(n, d)) @ L1.T
        lo, hi = M.fd_bootstrap(f, mu2, S2, resamples=resamples, seed=t)
        hits += lo <= true <= hi
        widths.append(hi - lo)
    return hits / trials, float(np.mean(widths))


def test_fd_interval_covers_the_true_fd_of_two_gaussians_at_about_95_percent():
    # 80 trials of a 95% interval: the count of misses is Binomial(80, 0.05) (mean 4; P(> 11) < 0.1%).
    # d = 8 at n = 300: FD's small-sample bias (~0.1) exceeds its spread, so the plain percentile
    # interval would miss the true FD most of the time; the basic bootstrap does not.
    cover, _ = _coverage(d=8, n=300, trials=80)
    assert cover >= 69 / 80, cover


def test_fd_interval_shrinks_with_n_and_matches_fd_of_a_resample():
    _, w_small = _coverage(d=4, n=200, trials=8)
    _, w_large = _coverage(d=4, n=1600, trials=8)
    assert w_large < w_small / 2  # ~ 1/sqrt(n): 8x the samples, about 1/2.8 the width
    # the vectorised resample FD is the ordinary FD of the resampled set: one resample, level ~0
    mu1, L1, mu2, S2, _ = _gaussians(4)
    f = mu1 + np.random.default_rng(3).normal(size=(50, 4)) @ L1.T
    idx = np.random.default_rng(7).integers(0, 50, 50)
    fd_b = M.frechet_distance(*M.mean_cov(f[idx]), mu2, S2)
    fd0 = M.frechet_distance(*M.mean_cov(f), mu2, S2)
    lo, hi = M.fd_bootstrap(f, mu2, S2, resamples=2, seed=7, level=1e-9)
    rng = np.random.default_rng(7)
    vals = [M.frechet_distance(*M.mean_cov(f[rng.integers(0, 50, 50)]), mu2, S2) for _ in range(2)]
    assert vals[0] == pytest.approx(fd_b, rel=1e-9)
    assert 2 * fd0 - np.median(vals) == pytest.approx((lo + hi) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="resamples"):
        M.fd_bootstrap(f, mu2, S2, resamples=1)


def _row(fd, lo, hi, n=2000, kid=0.1, kid_se=0.01):
    return {"n": n, "fd": fd, "fd_lo": lo, "fd_hi": hi, "kid": kid, "kid_se": kid_se}


def test_separated_claims_an_order_only_when_the_intervals_do_not_overlap():
    teacher, close, far = _row(30.4, 29.0, 31.8), _row(29.8, 28.5, 31.0), _row(36.0, 34.6, 37.5)
    assert not separated(close, teacher) and compare(close, teacher) == "within noise"
    assert separated(far, teacher) and separated(teacher, far)
    assert compare(teacher, far) == "better" and compare(far, teacher) == "worse"
    assert claim(close, teacher, "teacher") == "within noise of teacher"
    assert claim(far, teacher, "teacher").startswith("1.18x teacher's FD (worse)")
    assert separated_pairs({"t": teacher, "c": close, "f": far}) == [("c", "f"), ("t", "f")]
    # KID: mean +- 1.96 SE
    assert separated(_row(1, 0, 2, kid=0.10, kid_se=0.01), _row(1, 0, 2, kid=0.15, kid_se=0.01), "kid")
    assert not separated(_row(1, 0, 2, kid=0.10, kid_se=0.02), _row(1, 0, 2, kid=0.15, kid_se=0.02), "kid")
    # no interval (old metrics): never an order
    assert not separated({"n": 500, "fd": 1.0}, {"n": 500, "fd": 9.0})
    with pytest.raises(IncomparableError, match="equal sample counts"):
        separated(_row(30, 29, 31, n=500), _row(40, 39, 41, n=2000))


def test_a_collapsed_generator_has_a_high_duplicate_rate_and_low_recall():
    rng = np.random.default_rng(0)
    d, n = 16, 400
    real_cal, real, pool = (rng.normal(size=(n, d)) for _ in range(3))
    thr = M.duplicate_threshold(real_cal, 0.01)
    collapsed = pool[rng.integers(0, 8, n)] + 1e-3 * rng.normal(size=(n, d))  # copies of 8 images
    assert M.duplicate_rate(real, thr) < 0.05
    assert M.duplicate_rate(collapsed, thr) > 0.95
    _, rec_real = M.precision_recall(real_cal, real)
    _, rec_collapsed = M.precision_recall(real_cal, collapsed)
    assert rec_collapsed < 0.1 < 0.5 < rec_real


def test_blur_is_visible_to_fd_and_the_rmse_interval_covers_rmse():
    from fewstep.evaluation import gaussian_blur

    x = torch.rand(4, 3, 8, 8) * 2 - 1
    flat = torch.full((1, 3, 8, 8), 0.3)
    assert torch.allclose(gaussian_blur(flat, 1.0), flat, atol=1e-6)  # a normalised kernel
    b = gaussian_blur(x, 1.0)
    assert b.shape == x.shape and b.std() < x.std()
    assert (gaussian_blur(x, 0.5) - x).abs().mean() < (b - x).abs().mean()
    a = np.random.default_rng(0).normal(size=(64, 3, 4, 4))
    lo, hi = M.rmse_interval(a, 0 * a, resamples=200)
    assert lo < M.rmse(a, 0 * a) < hi < 1.2


def test_the_report_ranks_at_one_n_and_states_what_fd_can_see():
    from fewstep.reports import evaluation_markdown

    def row(nfe, fd, lo, hi, **kw):
        block = {"n": 2000, "fd": fd, "fd_lo": lo, "fd_hi": hi, "kid": 0.1, "kid_se": 0.01, "precision": 0.7,
                 "recall": 0.6, "dup_rate": 0.01, "rmse": 0.1, "rmse_lo": 0.09, "rmse_hi": 0.11, "psnr": 20.0}
        return {**block, "n": 500, "headline": block, "nfe": nfe, "gflops": 1.0, "images_per_s": 1.0, **kw}

    results = {"teacher ddim 64": row(64, 30.4, 29.5, 31.3, is_reference=True),
               "student-4 ddim 4": row(4, 30.9, 29.9, 31.9), "teacher ddim 4": row(4, 53.6, 51.0, 56.0),
               "diffusers unipc 4": {**row(4, 40.0, 39.0, 41.0)}}
    del results["diffusers unipc 4"]["headline"]
    meta = {"fd_floor": {"n": 500, "fd": 1.0, "fd_lo": 0.5, "fd_hi": 1.5, "kid": 0.0, "kid_se": 0.001},
            "fd_blur": {"0.5": {"n": 500, "fd": 9.0, "fd_lo": 8.0, "fd_hi": 10.0, "kid": 0.1, "kid_se": 0.01}},
            "dup_threshold": {"500": 1.0, "2000": 0.9}, "dup_quantile": 0.01}
    md = evaluation_markdown(results, [], 500, "0.8", 64, meta)
    ranked = md.split("## Ranked rows (2000 samples each)")[1].split("## FD sensitivity")[0]
    assert "diffusers unipc 4" not in ranked  # not a ranked row: only in the table at n=500
    line = lambda name: next(ln for ln in ranked.splitlines() if ln.startswith(f"| {name} |"))  # noqa: E731
    assert "within noise of teacher ddim 64" in line("student-4 ddim 4")
    assert "1.76x teacher ddim 64's FD (worse)" in line("teacher ddim 4")
    assert "student-4 ddim 4 < teacher ddim 4" in ranked and "30.900 [29.900, 31.900]" in ranked
    assert "| blurred, sigma 0.5 px | 9.000 [8.000, 10.000]" in md and "## All rows (500 samples each)" in md
