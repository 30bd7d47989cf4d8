"""Progress outside a terminal is a few log lines, not a carriage-return frame per step
(fewstep.progress); on a terminal it is a tqdm bar."""

from __future__ import annotations

import io

import torch
from tqdm.auto import tqdm

from fewstep.progress import LogProgress, progress


class _Clock:
    def __init__(self, step: float = 0.0) -> None:
        self.t, self.step = 0.0, step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_long_loop_outside_a_terminal_writes_about_ten_lines():
    out = io.StringIO()
    bar = progress(total=100_000, desc="teacher", stream=out)
    assert isinstance(bar, LogProgress)
    for i in range(100_000):
        bar.update(1)
        if i % 1000 == 0:
            bar.set_postfix(loss=f"{1 / (i + 1):.4f}")
    bar.close()
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and 10 <= len(lines) <= 11 and len(text) < 1500
    assert lines[0].startswith("teacher: 10000/100000 (10%)") and lines[-1].startswith("teacher: 100000/100000 (100%)")
    assert "loss=" in lines[-1]


def test_a_slow_loop_writes_a_line_every_30_seconds_and_resumes_from_initial():
    out = io.StringIO()
    bar = LogProgress(total=1000, desc="distill", initial=500, stream=out, clock=_Clock(step=10.0))
    for _ in range(9):  # 10 s per step: a line every third step, and none for the 10 % marks (50 steps each)
        bar.update(1)
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["503/1000", "506/1000", "509/1000"]


def test_iterating_writes_the_final_line_once_and_inner_loops_stay_silent():
    out = io.StringIO()
    assert list(progress(range(7), desc="shards", stream=out)) == list(range(7))
    assert out.getvalue().splitlines()[-1].startswith("shards: 7/7 (100%)")
    assert len(out.getvalue().splitlines()) == 7  # 10 % of 7 rounds to one step: at most one line each
    inner = io.StringIO()
    for _ in progress(range(1000), desc="ddim", leave=False, stream=inner):
        pass
    assert inner.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar_and_disabled_progress_writes_nothing():
    tty = _Tty()
    bar = progress(total=10, desc="x", stream=tty)
    assert isinstance(bar, tqdm)
    bar.close()
    quiet = io.StringIO()
    assert list(progress(range(3), enabled=False, stream=quiet)) == [0, 1, 2]
    assert quiet.getvalue() == ""


def test_a_library_loop_logs_a_few_lines_under_capture(tmp_path, capsys):
    """trajectories.write_shards, run as a DVC stage would run it: stderr is not a terminal."""
    from fewstep.math.schedules import cosine_schedule, timesteps
    from fewstep.testing import GMMDenoiser
    from fewstep.trajectories import write_shards

    sch = cosine_schedule(64)
    den = GMMDenoiser(sch, torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(0)))
    write_shards(tmp_path / "traj", den, range(200), (3, 4, 4), timesteps(64, 4), shard_size=1, batch_size=1,
                 device=torch.device("cpu"), meta={}, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("trajectories:")]
    assert 1 <= len(lines) <= 11 and lines[-1].startswith("trajectories: 200/200 (100%)")
