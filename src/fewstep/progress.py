"""Progress of long loops: a tqdm bar on a terminal, plain log lines anywhere else.

Outside a terminal (DVC's logs, Prefect workers, CI) a tqdm bar redraws with a carriage return on
every step: one teacher stage wrote ~180,000 characters of frames. There, :func:`progress` writes
one line whenever another ~10 % of the total is done or 30 s have passed since the last line, and
one when the loop ends: a few dozen lines for any loop length. An inner loop (``leave=False``, as
tqdm would erase it) writes only the 30 s lines, so a short one writes nothing.

    for batch in progress(batches, desc="trajectories", enabled=show):
        ...
    bar = progress(total=steps, initial=start, desc="teacher")
    bar.update(1); bar.set_postfix(loss="0.0312"); bar.close()
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Iterable, Iterator, TextIO

from tqdm.auto import tqdm

EVERY_FRACTION = 0.1  # a line per 10 % of the total ...
EVERY_SECONDS = 30.0  # ... or per 30 s, whichever comes first


class LogProgress:
    """The tqdm calls the library uses (iteration, update, set_postfix, close, a context manager) as
    plain lines: ``desc: 300/1000 (30%) 12s loss=0.0312``."""

    def __init__(self, iterable: Iterable[Any] | None = None, total: int | None = None, desc: str = "",
                 initial: int = 0, stream: TextIO | None = None, every_fraction: float = EVERY_FRACTION,
                 every_seconds: float = EVERY_SECONDS, clock: Callable[[], float] = time.monotonic,
                 leave: bool = True) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.n = iterable, total, desc, initial
        self.stream = stream if stream is not None else sys.stderr
        self.every_fraction, self.every_seconds, self.clock = every_fraction, every_seconds, clock
        self.leave = leave  # False (an inner loop): only the 30 s lines, so short loops stay silent
        self.postfix = ""
        self.lines = 0
        self.closed = False
        self._t0 = self._last_t = clock()
        self._last_n = initial

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("LogProgress without an iterable: use update()")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _due(self, now: float) -> bool:
        if now - self._last_t >= self.every_seconds:
            return True
        if self.total and self.leave:
            step = max(1, int(self.total * self.every_fraction))
            return self.n // step > self._last_n // step or (self.n >= self.total > self._last_n)
        return False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if self._due(now):
            self._write(now)

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in kw.items())

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.leave and (self.n != self._last_n or self.lines == 0) or not self.leave and self.lines:
            self._write(self.clock())

    def _write(self, now: float) -> None:
        done = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        tail = f" {self.postfix}" if self.postfix else ""
        self.stream.write(f"{self.desc or 'progress'}: {done} {now - self._t0:.0f}s{tail}\n")
        self.stream.flush()
        self.lines += 1
        self._last_t, self._last_n = now, self.n


def is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
             enabled: bool = True, initial: int = 0, leave: bool = True, stream: TextIO | None = None,
             **tqdm_kwargs: Any) -> Any:
    """A progress reporter over ``iterable`` (or driven by ``update``): nothing when ``enabled`` is
    False, a tqdm bar when ``stream`` (default stderr) is a terminal, else :class:`LogProgress`."""
    stream = stream if stream is not None else sys.stderr
    if not enabled:
        return tqdm(iterable, total=total, initial=initial, disable=True)
    if is_terminal(stream):
        return tqdm(iterable, total=total, desc=desc, initial=initial, leave=leave, file=stream, **tqdm_kwargs)
    return LogProgress(iterable, total=total, desc=desc, initial=initial, stream=stream, leave=leave)
