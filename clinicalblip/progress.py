"""Progress for long work: a bar on a terminal, plain interval lines anywhere else.

When stderr is not a terminal (a log file, CI, a cluster scheduler), a tqdm bar's carriage-return updates turn
`./train.sh > log` into a wall of `\\r`. There a `Progress` writes one plain line per interval instead
(``desc: n/total (pct) elapsed, rate``), as Hugging Face's ``disable_tqdm`` does for logs.

CLINICALBLIP_PROGRESS chooses: ``auto`` (default: a bar on a terminal, lines elsewhere), ``bar``, ``plain``
or ``off``. CLINICALBLIP_PROGRESS_INTERVAL sets the seconds between plain lines (default 30).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable


def mode() -> str:
    chosen = os.environ.get("CLINICALBLIP_PROGRESS", "auto").strip().lower()
    if chosen in ("bar", "plain", "off"):
        return chosen
    return "bar" if sys.stderr.isatty() else "plain"


def write(message: str) -> None:
    """A log line that does not break a running bar (tqdm.write on a terminal, a plain print elsewhere)."""
    if mode() == "bar":
        from tqdm.auto import tqdm

        tqdm.write(message)
    else:
        print(message, flush=True)


class _Lines:
    """The subset of tqdm the project uses, writing a line every `interval` seconds and one at the end."""

    def __init__(self, iterable=None, total=None, initial=0, desc="", unit="it", interval=None, **_):
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.initial, self.desc, self.unit = initial, initial, desc, unit
        self.interval = float(interval if interval is not None else os.environ.get("CLINICALBLIP_PROGRESS_INTERVAL", 30))
        self.start = self.last = time.monotonic()
        self.postfix = ""
        self.closed = False
        self.shown = initial

    def _line(self) -> None:
        elapsed = time.monotonic() - self.start
        done = self.n - self.initial
        rate = f", {done / elapsed:.2f} {self.unit}/s" if elapsed > 0 and done else ""
        of = f"/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else ""
        post = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}{of} {self.unit}, {elapsed:.0f} s{rate}{post}", file=sys.stderr, flush=True)
        self.last, self.shown = time.monotonic(), self.n

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.interval:
            self._line()

    def set_postfix(self, **kwargs) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in kwargs.items())

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def close(self) -> None:
        if not self.closed and self.n != self.shown:
            self._line()
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Off(_Lines):
    def _line(self) -> None:
        pass


def progress(iterable: Iterable | None = None, *, disable: bool = False, **kwargs):
    """A tqdm bar, plain interval lines, or nothing (see the module docstring). Same arguments as tqdm."""
    chosen = mode()
    if disable or chosen == "off":
        return _Off(iterable, **kwargs)
    if chosen == "plain":
        return _Lines(iterable, **kwargs)
    from tqdm.auto import tqdm

    return tqdm(iterable, dynamic_ncols=True, **kwargs)
