"""Issue 18.7, ranking at 5%: the paired (joint-bootstrap) FD difference, KID's paired difference and
its standard error, on synthetic Gaussian features with known FD (seeded; no model)."""

from __future__ import annotations

import numpy as np
import pytest

from fewstep.evaluation import Resampled, paired_scores
from fewstep.math import metrics as M
from fewstep.ranking import compare, separated_pairs


def _reference(d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(d, d)) / np.sqrt(d)
    S = A @ A.T + 0.5 * np.eye(d)
    return np.zeros(d), S, np.linalg.cholesky(S)


def _generator(mu_ref, S_ref, L, shift: float, scale: float = 1.2):
    """N(mu_ref + shift, scale^2 S_ref) as (mean, cov, sampler of z -> x) and its true FD to the reference."""
    mu = mu_ref + shift
    S = scale**2 * S_ref
    return (lambda z: mu + scale * z @ L.T), M.frechet_distance(mu, S, mu_ref, S_ref)


def _shift_for(mu_ref, S_ref, L, target_fd: float) -> float:
    """The mean shift (every coordinate) that gives the generator a true FD of ``target_fd``."""
    _, fd0 = _generator(mu_ref, S_ref, L, 0.0)
    return float(np.sqrt((target_fd - fd0) / len(mu_ref)))


def _rerender(z, rng, noise: float = 0.1):
    """The same seeds' z, perturbed and rescaled to unit variance again: a correlated draw of the same law."""
    return (z + noise * rng.normal(size=z.shape)) / np.sqrt(1 + noise**2)


def _resampled(x, mu, S, seed=0, resamples=200):
    return Resampled(M.fd_resampled(x, mu, S, resamples=resamples, seed=seed), M.kid_influence(x, _Y[len(mu)]))


_Y = {d: np.random.default_rng(99).normal(size=(400, d)) @ _reference(d)[2].T for d in (8, 16)}


def test_the_paired_interval_is_narrower_than_the_two_intervals_for_correlated_rows():
    d, n = 8, 600
    mu, S, L = _reference(d)
    rng = np.random.default_rng(1)
    z = rng.normal(size=(n, d))
    gen_a, _ = _generator(mu, S, L, 0.05)
    gen_b, _ = _generator(mu, S, L, 0.08)
    xa, xb = gen_a(z), gen_b(z + 0.2 * rng.normal(size=(n, d)))  # image i of both from the same seed
    a, b = M.fd_resampled(xa, mu, S, seed=3), M.fd_resampled(xb, mu, S, seed=3)
    lo_a, hi_a = M.basic_interval(*a)
    lo_b, hi_b = M.basic_interval(*b)
    d_fd, lo, hi = M.fd_diff_interval(a, b)
    assert d_fd == pytest.approx(a[0] - b[0])
    assert (hi - lo) < 0.35 * ((hi_a - lo_a) + (hi_b - lo_b)) / 2  # several times narrower than one row's own
    # independent rows (different seeds): no gain, about sqrt(w_a^2 + w_b^2)
    xc = gen_b(rng.normal(size=(n, d)))
    c = M.fd_resampled(xc, mu, S, seed=3)
    _, lo_i, hi_i = M.fd_diff_interval(a, c)
    assert (hi_i - lo_i) > 0.8 * (hi_a - lo_a)
    with pytest.raises(ValueError, match="same resamples"):
        M.fd_diff_interval(a, (b[0], b[1][:10]))


def test_the_paired_interval_covers_the_true_fd_difference_of_two_gaussians():
    # 60 trials of a 95% interval: misses ~ Binomial(60, 0.05), mean 3; P(> 9) < 0.2%
    d, n = 8, 300
    mu, S, L = _reference(d)
    gen_a, fd_a = _generator(mu, S, L, 0.05)
    gen_b, fd_b = _generator(mu, S, L, 0.10, scale=1.25)
    rng = np.random.default_rng(2)
    hits = 0
    for t in range(60):
        z = rng.normal(size=(n, d))
        xa, xb = gen_a(z), gen_b(0.9 * z + np.sqrt(1 - 0.81) * rng.normal(size=(n, d)))
        _, lo, hi = M.fd_diff_interval(M.fd_resampled(xa, mu, S, resamples=100, seed=t),
                                       M.fd_resampled(xb, mu, S, resamples=100, seed=t))
        hits += lo <= fd_a - fd_b <= hi
    assert hits >= 51, hits


def test_the_kid_standard_error_covers_sampling_and_the_subsets_alone_do_not():
    d, n, trials = 8, 200, 40
    mu, S, L = _reference(d)
    gen, _ = _generator(mu, S, L, 0.1)
    rng = np.random.default_rng(4)
    full, infl, subset_mean, subset_se = [], [], [], []
    for _ in range(trials):
        x = gen(rng.normal(size=(n, d)))
        v, psi = M.kid_influence(x, _Y[d])
        full.append(v)
        infl.append(M.kid_se(psi))
        k, se = M.kid(x, _Y[d], subsets=10, subset_size=n // 2, seed=0)
        subset_mean.append(k)
        subset_se.append(se)
    sd = float(np.std(full, ddof=1))
    assert 0.7 * sd < np.mean(infl) < 1.4 * sd  # the influence s.e. is the spread over independent sample sets
    assert np.mean(subset_se) < 0.6 * np.std(subset_mean, ddof=1)  # the subsets' s.e. alone is far too small
    kyy = M.kid_reference_term(_Y[d])
    assert M.kid_influence(x, _Y[d], yy=kyy)[0] == pytest.approx(full[-1])


@pytest.mark.parametrize("rel, verdict", [(0.05, "worse"), (0.0, "within noise"), (-0.05, "better")])
def test_a_5_percent_fd_shift_is_claimed_paired_and_none_is_not(rel, verdict):
    """Rows at n = 2000 sharing seeds (image i of b is image i of a, re-rendered with small noise, the
    same law):
    a 5% FD difference either way is resolved by the paired comparison, equal FD is not; the
    unpaired intervals do not separate 5%."""
    d, n = 16, 2000
    mu, S, L = _reference(d)
    gen_ref, fd_ref = _generator(mu, S, L, 0.15)
    gen_b, fd_b = _generator(mu, S, L, _shift_for(mu, S, L, (1 + rel) * fd_ref))
    assert fd_b == pytest.approx((1 + rel) * fd_ref, rel=1e-6)
    rng = np.random.default_rng(5)
    z = rng.normal(size=(n, d))
    x_ref, x_b = gen_ref(z), gen_b(_rerender(z, rng))
    r_ref, r_b = _resampled(x_ref, mu, S), _resampled(x_b, mu, S)
    ref_row = {"n": n, "fd": r_ref.fd[0], "kid": r_ref.kid[0]}
    ref_row["fd_lo"], ref_row["fd_hi"] = M.basic_interval(*r_ref.fd)
    row = {"n": n, "fd": r_b.fd[0], "kid": r_b.kid[0], "paired": paired_scores(r_b, r_ref, "ref")}
    row["fd_lo"], row["fd_hi"] = M.basic_interval(*r_b.fd)
    assert compare(row, ref_row, "fd", ref="ref") == verdict
    if rel:
        assert compare({k: v for k, v in row.items() if k != "paired"}, ref_row, "fd") == "within noise"
    # the same rows through separated_pairs with the evaluation's paired_pairs entry
    pairs = [{"a": "b", "b": "ref", "n": n, **row["paired"]}]
    want = {"worse": [("ref", "b")], "better": [("b", "ref")], "within noise": []}[verdict]
    assert separated_pairs({"b": row, "ref": ref_row}, "fd", pairs) == want


def test_kid_claims_need_two_standard_errors_of_the_difference():
    d, n = 16, 1000
    mu, S, L = _reference(d)
    rng = np.random.default_rng(6)
    z = rng.normal(size=(n, d))
    gen_a, _ = _generator(mu, S, L, 0.15)
    gen_far, _ = _generator(mu, S, L, 0.3)
    a = _resampled(gen_a(z), mu, S)
    same = _resampled(gen_a(_rerender(z, rng)), mu, S)
    far = _resampled(gen_far(_rerender(z, rng)), mu, S)
    row = lambda r, p: {"n": n, "kid": r.kid[0], "kid_se": 1.0, "paired": p}  # noqa: E731 (huge unpaired s.e.)
    ref = {"n": n, "kid": a.kid[0], "kid_se": 1.0}
    assert compare(row(far, paired_scores(far, a, "a")), ref, "kid", ref="a") == "worse"
    assert compare(row(same, paired_scores(same, a, "a")), ref, "kid", ref="a") == "within noise"
    assert compare(row(far, None), ref, "kid") == "within noise"  # unpaired with s.e. 1: no claim
    with pytest.raises(ValueError, match="equal n"):
        M.kid_diff(far.kid, (a.kid[0], a.kid[1][:10]))
