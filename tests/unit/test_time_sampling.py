"""The teacher's noise-level distribution: uniform t (default) or log-normal log-SNR (teacher.t_sampling)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewstep.config import validate
from fewstep.math.schedules import make_schedule
from fewstep.train.teacher import logsnr_normal_t, logsnr_to_index, time_sampling, uniform_t
from tests.helpers import tiny_params

S = make_schedule("cosine", 1024, logsnr_min=-20.0, logsnr_max=20.0)


def test_index_is_the_nearest_grid_point() -> None:
    lam = torch.linspace(-25.0, 25.0, 997, dtype=torch.float64)
    idx = logsnr_to_index(S, lam, 1, 1024).numpy()
    assert idx.min() >= 1 and idx.max() <= 1024
    grid = S.logsnr
    err = np.abs(grid[idx] - lam.numpy())
    for d in (-1, 1):  # no neighbour inside the range is nearer
        nb = np.clip(idx + d, 1, 1024)
        assert np.all(err <= np.abs(grid[nb] - lam.numpy()) + 1e-12)


def test_index_respects_the_range() -> None:
    lam = torch.tensor([30.0, 0.0, -30.0], dtype=torch.float64)
    idx = logsnr_to_index(S, lam, 300, 700)
    assert idx.tolist()[0] == 300 and idx.tolist()[2] == 700
    assert 300 < idx.tolist()[1] < 700


def test_log_normal_draws_have_the_asked_moments() -> None:
    g = torch.Generator().manual_seed(0)
    t = logsnr_normal_t(S, 1, 1024, 2.4, 2.4, torch.device("cpu"))(200_000, g)
    lam = S.logsnr[t.numpy()]
    assert abs(lam.mean() - 2.4) < 0.05 and abs(lam.std() - 2.4) < 0.05
    # the uniform default puts half its steps below log-SNR 0 (cosine); this one about 16%
    u = uniform_t(1, 1024, torch.device("cpu"))(200_000, torch.Generator().manual_seed(0))
    assert abs((S.logsnr[u.numpy()] < 0).mean() - 0.5) < 0.01
    assert abs((lam < 0).mean() - 0.16) < 0.01


def test_params_uniform_is_the_default_and_hashes_the_same() -> None:
    base = validate(tiny_params(t_sampling=None))
    uni = validate(tiny_params(t_sampling={"kind": "uniform"}))
    ln = validate(tiny_params(t_sampling={"kind": "logsnr_normal", "mean": 1.0, "std": 2.0}))
    assert uni.teacher.model_dump() == base.teacher.model_dump()
    assert time_sampling(uni.teacher) is None
    assert time_sampling(ln.teacher) == (1.0, 2.0)
    assert ln.teacher.model_dump() != base.teacher.model_dump()  # a different run: a different hash


def test_params_refuse_a_bad_distribution() -> None:
    from fewstep.config import ParamsError

    with pytest.raises(ParamsError, match="std"):
        validate(tiny_params(t_sampling={"kind": "logsnr_normal", "std": 0.0}))
    with pytest.raises(ParamsError, match="kind"):
        validate(tiny_params(t_sampling={"kind": "edm"}))


def test_a_narrow_range_gets_the_truncated_normal_not_a_pile_on_its_end() -> None:
    """A split model's high-noise side (log-SNR below -1.39) under N(2.4, 2.4^2): 94% of a plain
    normal's mass lies outside it; the truncated draw spreads over the side instead."""
    lo = S.index_of_logsnr(-1.386) + 1  # the first index below the boundary
    g = torch.Generator().manual_seed(0)
    t = logsnr_normal_t(S, lo, 1024, 2.4, 2.4, torch.device("cpu"))(50_000, g)
    assert int(t.min()) >= lo and int(t.max()) <= 1024
    counts = torch.bincount(t - lo)
    assert counts.max() / len(t) < 0.01  # no index holds the mass
    lam = S.logsnr[t.numpy()]
    assert lam.max() < -1.38 and (lam > -4.0).mean() > 0.5  # densest near the boundary, as the normal is there


def test_a_range_the_normal_misses_is_refused() -> None:
    with pytest.raises(ValueError, match="no mass"):
        logsnr_normal_t(S, 1000, 1024, 30.0, 0.1, torch.device("cpu"))
