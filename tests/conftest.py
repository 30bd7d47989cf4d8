import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # stages/ as a package
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A tiny teacher trained once per session (8x8 toy squares, ~20 s on 2 cores)."""
    from fewstep.config import validate
    from fewstep.train.teacher import train_teacher
    from tests.helpers import tiny_params, write_prepared

    d = tmp_path_factory.mktemp("tiny_teacher")
    torch.manual_seed(0)
    write_prepared(d / "data", n=128)
    p = validate(tiny_params(steps=300, lr=3e-3, checkpoint_every=300, log_every=50))
    train_teacher(p, d / "data", d / "teacher", d / "ck", torch.device("cpu"), progress=False)
    return d
