"""OLSS: optimal linear subspace search (Duan et al., CIKM 2023, arXiv 2305.14677).

A deterministic N-step reference run (DDIM, eta = 0, unclipped) gives latents X[0..N]
(X[0] = x_T, X[N] = the clean result) and per-step basis outputs E[0..N-1]. An n-step OLSS
sampler on a path p_0 = 0 < p_1 < ... < p_{n-1} of reference indices computes

    x_{i+1} = wx[i] x_T + sum_{j<=i} we[i, j] e_j,     e_j = the network at (x_j, tau[p_j])

with scalar weights fitted by least squares (float64, SVD-based, rank revealing) to the reference
latent at the next path index (the last step targets X[N]). The path comes from Algorithms 1-3:
the furthest next index whose projection error is <= D (binary search), feasibility with at most n
steps, and bisection on D. Degenerate cases are explicit (see search_path).

The basis (OLSSScheduler.basis) is one of

    "output"  e_j is the network's own output in its parameterisation (eps for an eps model, v for a
              v model, x for an x model): the paper's basis (its SD 2.1 runs use v).
    "x"       e_j is x_hat(x_j, tau[p_j]), the model's x prediction (beyond the paper).

For the sampler's own latents the two spans are equal: x_j lies in span{x_T, e_0..e_{j-1}} and
x_hat = (z - sigma eps) / alpha, v = (eps - sigma z) / alpha, so by induction span{x_T, x_hat_0..i}
= span{x_T, eps_0..i} = span{x_T, v_0..i}. The fit and the path search are not on those latents:
they are teacher-forced, every e_j evaluated on the reference latent X[p_j], which went through the
reference's intermediate steps and is not in span{x_T, E[p_0..p_{j-1}]}. So the least-squares
problems differ with the basis, and so do the searched paths and the weights; which one samples
better is measured (fewstep.olss_fit fits both and keeps the better on held-out seeds as olss-N),
not assumed. Measured on the analytic 8-mode mixture of tests/unit/test_olss.py (64-step
reference, float64, 32 fitting and 64 held-out seeds; `python benchmarks/olss_variants.py mixture`):
n = 4 paths [0, 14, 29, 42] (x) vs [0, 13, 29, 42] (eps), held-out RMSE 0.075 (x) vs 0.118 (eps).

Conditioning: the cosine table's first index has alpha_T = sqrt(sigmoid(logsnr_min = -20)) =
4.5e-5, so 1/alpha_T = 2.2e4. In the eps basis eps_0 ~ x_T (nearly collinear) and the fitted
weights reach that size (max |we| 2.2e4 on the mixture above, cancelling); in the x and v bases
DDIM's coefficients are sigma ratios and alphas, all in [-1, 1] (max |we| 0.89 for x, 0.66 for v).

Arrays: X (N+1, M) latents and E (N, M) the basis outputs (either basis: the search, the fit and
ProjectionCache take whichever E they are given), M = flattened elements (images x pixels), any
float dtype; every solve casts its columns to float64.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from fewstep.math.guidance import check_fitted_scale
from fewstep.math.param import Denoiser, predict_x_eps

BASES = ("x", "output")  # OLSSScheduler.basis: x_hat, or the network's own output (the paper)


# --------------------------------------------------------------------------------------------
# least squares


@dataclass
class Solve:
    w: torch.Tensor  # (k,) float64
    mse: float  # mean squared residual over the M elements (no ridge term)
    cond: float  # condition number of the basis (ratio of extreme singular values)


RCOND = 1e-10  # singular values below RCOND * largest count as zero (rank-revealing cut)


def lstsq(cols: Sequence[torch.Tensor], y: torch.Tensor, ridge: float = 0.0, with_cond: bool = True) -> Solve:
    """min_w ||A w - y||^2 + ridge * M * ||w||^2 with A = stack(cols, 1), in float64.

    SVD driver with a relative cut RCOND: a rank-deficient basis gets the minimum-norm solution
    instead of huge weights that cancel on the fitting data and explode anywhere else."""
    A = torch.stack([c.reshape(-1).double() for c in cols], 1)
    b = y.reshape(-1).double()
    M, k = A.shape
    if ridge > 0:
        A_s = torch.cat([A, math.sqrt(ridge * M) * torch.eye(k, dtype=torch.float64)])
        b_s = torch.cat([b, torch.zeros(k, dtype=torch.float64)])
    else:
        A_s, b_s = A, b
    w = torch.linalg.lstsq(A_s.cpu(), b_s.cpu(), rcond=RCOND, driver="gelsd").solution
    cond = float("nan")
    if with_cond:
        sv = torch.linalg.svdvals(A.cpu())
        cond = float(sv[0] / sv[-1]) if sv[-1] > 0 else float("inf")
    mse = float(((A.cpu() @ w - b.cpu()) ** 2).mean())
    return Solve(w, mse, cond)


# --------------------------------------------------------------------------------------------
# the path search's least squares, through cached inner products


GRAM_COND_MAX = 1e6  # basis condition number (of the column-scaled basis) above which the Gram solve defers to SVD
CANCEL_REL = 1e-9  # a Gram residual below CANCEL_REL * ||y||^2 is cancellation noise: recompute it on the data
CACHE_BYTES = 512 << 20  # float64 copies of the most recently used reference vectors


class ProjectionCache:
    """Every least-squares problem of the path search, solved on its small Gram system.

    The search asks ~n * 30 * log2(N) times for the projection error of a reference latent X[j]
    onto span{X[c], E[p_0..p_i]}. All of them need only inner products between rows of X and E,
    so each pair's inner product is computed once (float64, from float64 copies of the vectors kept
    in a bounded LRU) and kept; a solve is then a (k x k) problem: equilibrate the Gram matrix,
    eigendecompose it (rank revealing), and read the residual off the normal equations,
    ||y - A w||^2 = y.y - 2 b.w + w.G w.

    Gram squares the condition number, so the fast path is taken only while the column-scaled
    basis has cond <= GRAM_COND_MAX (Gram cond <= 1e12, well inside float64); a worse basis is
    solved on the data by ``lstsq`` (SVD), exactly as before. A residual small enough to be lost to
    cancellation (<= CANCEL_REL * ||y||^2) is measured on the data, ||y - A w||^2 in float64 with
    the Gram weights (their error enters the residual only to second order). ``stats`` counts
    each case and keeps the largest condition number seen."""

    def __init__(self, X: torch.Tensor, E: torch.Tensor, cond_max: float = GRAM_COND_MAX,
                 cache_bytes: int = CACHE_BYTES):
        if X.shape[0] != E.shape[0] + 1 or X.shape[1:] != E.shape[1:]:
            raise ValueError(f"need X (N+1, M) and E (N, M), got {tuple(X.shape)} and {tuple(E.shape)}")
        self.X, self.E, self.N = X, E, E.shape[0]
        self.M = int(X[0].numel())
        self.cond_max = cond_max
        self._dot: dict[tuple[int, int], float] = {}
        self._mse: dict[tuple[tuple[int, ...], int], float] = {}
        self._v64: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._v64_max = max(2, cache_bytes // (8 * self.M))
        self.stats = {"solves": 0, "cached": 0, "gram": 0, "svd_ill_conditioned": 0, "residual_on_data": 0,
                      "dots": 0, "max_cond": 0.0}

    # vectors are numbered 0..N for X[0..N] and N+1+p for E[p]
    def vec(self, i: int) -> torch.Tensor:
        return self.X[i] if i <= self.N else self.E[i - self.N - 1]

    def vec64(self, i: int) -> torch.Tensor:
        """Vector i flattened in float64 (LRU cache of recent ones)."""
        v = self._v64.get(i)
        if v is None:
            v = self.vec(i).reshape(-1).to("cpu", torch.float64)
            self._v64[i] = v
            if len(self._v64) > self._v64_max:
                self._v64.popitem(last=False)
        else:
            self._v64.move_to_end(i)
        return v

    def gram(self, idx: Sequence[int]) -> np.ndarray:
        """Inner products <v_a, v_b> for a, b in idx, computing only the missing ones."""
        idx = list(idx)
        for i, a in enumerate(idx):
            for b in idx[i:]:
                key = (min(a, b), max(a, b))
                if key not in self._dot:
                    self._dot[key] = float(torch.dot(self.vec64(a), self.vec64(b)))
                    self.stats["dots"] += 1
        return np.array([[self._dot[(min(a, b), max(a, b))] for b in idx] for a in idx])

    def solve(self, basis: Sequence[int], target: int) -> Solve:
        """lstsq(basis vectors, target vector) through the Gram system (SVD fallback)."""
        self.stats["solves"] += 1
        G = self.gram(list(basis) + [target])
        A, b, yy = G[:-1, :-1], G[:-1, -1], G[-1, -1]
        d = np.sqrt(np.diag(A))
        cond = math.inf
        if np.all(d > 0):
            lam, Q = np.linalg.eigh(A / np.outer(d, d))
            cond = math.sqrt(lam[-1] / lam[0]) if lam[0] > 0 else math.inf
        self.stats["max_cond"] = max(self.stats["max_cond"], cond)
        if cond > self.cond_max:
            self.stats["svd_ill_conditioned"] += 1
            return self._svd(basis, target, cond)
        w = (Q @ ((Q.T @ (b / d)) / lam)) / d
        rss = yy - 2.0 * b @ w + w @ A @ w
        if rss <= CANCEL_REL * yy:  # too small to trust after cancellation: measure it on the data
            self.stats["residual_on_data"] += 1
            r = self.vec64(target).clone()
            for a, wa in zip(basis, w.tolist()):
                r.add_(self.vec64(a), alpha=-wa)
            return Solve(torch.from_numpy(w), float(torch.dot(r, r)) / self.M, cond)
        self.stats["gram"] += 1
        return Solve(torch.from_numpy(w), float(rss) / self.M, cond)

    def _svd(self, basis: Sequence[int], target: int, cond: float) -> Solve:
        s = lstsq([self.vec(a) for a in basis], self.vec(target), with_cond=False)
        return Solve(s.w, s.mse, cond)

    def projection_mse(self, path: Sequence[int], j: int) -> float:
        """Algorithm 1's error: X[j] projected onto span{X[path[-1]], E[p] for p in path}, cached
        per (path, j)."""
        key = (tuple(path), j)
        if key in self._mse:
            self.stats["cached"] += 1
            return self._mse[key]
        mse = self.solve([path[-1]] + [self.N + 1 + p for p in path], j).mse
        self._mse[key] = mse
        return mse


# --------------------------------------------------------------------------------------------
# Algorithms 1-3


def next_index(X: torch.Tensor, E: torch.Tensor, path: list[int], D: float,
               cache: ProjectionCache | None = None) -> int:
    """Algorithm 1: furthest j in (c, N] whose projection onto span{X[c], E[p] for p in path}
    has mse <= D (binary search; assumes error grows with j). The one-index step c+1 is always
    allowed: it is the finest step the reference offers. ``cache`` reuses inner products and
    solves across calls (search_path passes one); without it every solve is an SVD on the data."""
    N = E.shape[0]
    c = path[-1]
    basis = [X[c]] + [E[p] for p in path]
    lo, hi = c + 1, N
    while hi > lo:
        mid = (lo + hi + 1) // 2
        err = cache.projection_mse(path, mid) if cache is not None else lstsq(basis, X[mid], with_cond=False).mse
        if err > D:
            hi = mid - 1
        else:
            lo = mid
    return lo


def feasible_path(X: torch.Tensor, E: torch.Tensor, n: int, D: float,
                  cache: ProjectionCache | None = None) -> list[int] | None:
    """Algorithm 2: a path of at most n model evaluations whose every jump has error <= D."""
    N = E.shape[0]
    path = [0]
    for _ in range(n):
        j = next_index(X, E, path, D, cache)
        if j >= N:
            return path
        path.append(j)
    return None


def uniform_path(N: int, n: int) -> list[int]:
    """OLSS-P: n evaluations spread evenly over the N reference steps (no search).
    round(linspace) instead of arange(0, N, N // n) so no long last jump appears when n does not divide N."""
    if not 1 <= n <= N:
        raise ValueError(f"need 1 <= n <= N, got n={n}, N={N}")
    return sorted(set(np.round(np.linspace(0, N, n + 1)[:-1]).astype(int).tolist()))


def fill_path(path: list[int], n: int, N: int) -> list[int]:
    """Use the whole budget: split the largest jump until the path has n entries (or cannot grow)."""
    path = list(path)
    while len(path) < n:
        ends = path + [N]
        gaps = [(ends[i + 1] - ends[i], i) for i in range(len(path))]
        gap, i = max(gaps)
        if gap < 2:
            break
        path.insert(i + 1, ends[i] + gap // 2)
    return path


@dataclass
class PathSearch:
    path: list[int]
    D: float | None
    note: str  # "searched", "searched+filled", "full" or "uniform-fallback"
    stats: dict[str, Any] = field(default_factory=dict)  # the search's solver counts and largest condition number


def search_path(X: torch.Tensor, E: torch.Tensor, n: int, iters: int = 30, D_hi: float | None = None,
                fast: bool = True) -> PathSearch:
    """Algorithm 3: the smallest D (bisection) for which a path with <= n steps exists.

    Explicit cases the released code gets wrong: n >= N returns the full path (OLSS == DDIM);
    a path shorter than n is filled by splitting its largest jumps (more evaluations, never a
    crash); when no D up to the largest single-jump error works, the uniform path is used and
    the note says so. ``fast`` solves the search's least squares through one ProjectionCache
    (same answers, see its docstring); False solves each on the data by SVD.
    """
    N = E.shape[0]
    if n < 1:
        raise ValueError(f"an OLSS scheduler needs at least 1 step, got n={n}")
    if n >= N:
        return PathSearch(list(range(N)), 0.0, "full")
    hi = D_hi if D_hi is not None else max(1e-12, float(lstsq([X[0], E[0]], X[N], with_cond=False).mse) * 4.0 + 10.0)
    cache = ProjectionCache(X, E) if fast else None
    if feasible_path(X, E, n, hi, cache) is None:
        return PathSearch(uniform_path(N, n), None, "uniform-fallback")
    lo = 0.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if feasible_path(X, E, n, mid, cache) is None:
            lo = mid
        else:
            hi = mid
    path = feasible_path(X, E, n, hi, cache)
    assert path is not None
    stats = dict(cache.stats) if cache is not None else {}
    if len(path) < n:
        return PathSearch(fill_path(path, n, N), hi, "searched+filled", stats)
    return PathSearch(path, hi, "searched", stats)


# --------------------------------------------------------------------------------------------
# weights and the scheduler artifact


@dataclass
class OLSSScheduler:
    """The artifact: timesteps (schedule indices), weights, and what it was fitted on."""

    timesteps: list[int]
    wx: list[float]
    we: list[list[float]]  # row i has i+1 entries
    fit_mse: list[float]
    cond: list[float]
    path: list[int]
    meta: dict[str, Any] = field(default_factory=dict)
    basis: str = "x"  # what e_j is: "x" = x_hat, "output" = the network's own output (BASES); absent in old files = "x"

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "OLSSScheduler":
        d = json.loads(text)
        s = cls(**d)
        s.validate()
        return s

    def validate(self) -> None:
        n = len(self.timesteps)
        if n < 1 or len(self.wx) != n or len(self.we) != n or any(len(r) != i + 1 for i, r in enumerate(self.we)):
            raise ValueError("malformed OLSS scheduler: need n timesteps, n wx and a lower-triangular we")
        if any(a <= b for a, b in zip(self.timesteps, self.timesteps[1:])):
            raise ValueError("OLSS timesteps must be strictly descending")
        if not all(math.isfinite(v) for v in self.wx + [w for r in self.we for w in r]):
            raise ValueError("OLSS weights are not finite")
        if self.basis not in BASES:
            raise ValueError(f"unknown OLSS basis {self.basis!r}; expected one of {BASES}")


def basis_output(denoiser: Denoiser, z: torch.Tensor, t: torch.Tensor, basis: str) -> torch.Tensor:
    """e for latent z at schedule indices t, in z's dtype: x_hat ("x") or the raw network output
    in its own parameterisation ("output"), one evaluation, never clipped."""
    if basis == "output":
        return denoiser(z, t).to(z.dtype)
    if basis == "x":
        return predict_x_eps(denoiser, z, t, clip=False)[0]
    raise ValueError(f"unknown OLSS basis {basis!r}; expected one of {BASES}")


def fit_weights(
    X: torch.Tensor, E: torch.Tensor, path: list[int], t_path: Sequence[int], ridge: float = 0.0,
    basis: str = "x",
) -> OLSSScheduler:
    """Fit per-step weights on basis [x_T, e_{p_0}..e_{p_i}], target X[p_{i+1}] (last: X[N]),
    teacher-forced (E holds the reference run's outputs of kind ``basis``, recorded in the result)."""
    if basis not in BASES:
        raise ValueError(f"unknown OLSS basis {basis!r}; expected one of {BASES}")
    N = E.shape[0]
    targets = [X[p] for p in path[1:]] + [X[N]]
    wx, we, mse, cond = [], [], [], []
    for i in range(len(path)):
        s = lstsq([X[0]] + [E[p] for p in path[: i + 1]], targets[i], ridge)
        w = s.w.tolist()
        wx.append(w[0])
        we.append(w[1:])
        mse.append(s.mse)
        cond.append(s.cond)
    return OLSSScheduler([int(t_path[p]) for p in path], wx, we, mse, cond, list(path), basis=basis)


@torch.no_grad()
def refit_closed_loop(
    denoiser: Denoiser, x_T: torch.Tensor, targets: Sequence[torch.Tensor], sched: OLSSScheduler, ridge: float = 0.0
) -> OLSSScheduler:
    """Beyond the paper: refit step by step on the sampler's own trajectory. Step i's basis uses
    e_j evaluated on the OLSS latents x_j (not the reference's), so the weights see at fit time
    what they will see at sampling time (no teacher forcing). ``targets[i]`` is the reference
    latent the i-th step must reach (same x_T), as in fit_weights. The basis is ``sched.basis``."""
    x = x_T.double()
    hist: list[torch.Tensor] = []
    wx, we, mse, cond = [], [], [], []
    for i, t in enumerate(sched.timesteps):
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        hist.append(basis_output(denoiser, x.to(x_T.dtype), tt, sched.basis).double())
        s = lstsq([x_T.double()] + hist, targets[i], ridge)
        w = s.w.to(x.device)
        x = w[0] * x_T.double() + sum(w[j + 1] * hist[j] for j in range(len(hist)))
        wx.append(float(w[0]))
        we.append(w[1:].tolist())
        mse.append(s.mse)
        cond.append(s.cond)
    return OLSSScheduler(list(sched.timesteps), wx, we, mse, cond, list(sched.path), dict(sched.meta), sched.basis)


# --------------------------------------------------------------------------------------------
# the sampler


@torch.no_grad()
def sample_olss(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    sched: OLSSScheduler,
    clip: bool = True,
    callback: Callable[[dict], None] | None = None,
    allow_scale_mismatch: bool = False,
) -> torch.Tensor:
    """n model evaluations; e_j is ``sched.basis``'s output at x_j (x_hat, or the raw network
    output); the linear combination is accumulated in float64 whatever dtype the network runs in,
    and cast back to x_T's dtype at the end. ``callback`` gets i, t, z (input) and e per step.
    A scheduler fitted at one classifier-free guidance scale (``meta["guidance"]``) is refused for
    a denoiser guided at another unless ``allow_scale_mismatch`` (then it warns)."""
    check_fitted_scale(sched.meta, denoiser, "this OLSS scheduler", allow_scale_mismatch)
    x0 = x_T.double()
    x = x_T
    hist: list[torch.Tensor] = []
    for i, t in enumerate(sched.timesteps):
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        e = basis_output(denoiser, x, tt, sched.basis)
        hist.append(e.double())
        nxt = sched.wx[i] * x0
        for j, w in enumerate(sched.we[i]):
            nxt = nxt + w * hist[j]
        if callback is not None:
            callback({"i": i, "t": t, "z": x, "e": e})
        x = nxt.to(x_T.dtype)
    return x.clamp(-1, 1) if clip else x
