"""Progress of a long loop, readable in a terminal and in a job's log file.

One helper for every long loop (training epochs and batches; decoding and extraction can use
it the same way). When stderr is a terminal it is a tqdm bar. Otherwise (a Snakemake job
whose stderr goes to its log, a test, a notebook) it writes log lines through ``logging``:
``<desc>: 12/40 (30%) 0.52 epoch/s, ETA 0:00:54 [loss=0.41]``, at most one line per
``every_s`` seconds and per ``every_fraction`` of the total, whichever comes later, plus a
last line when the loop ends, so a log holds at most ~12 lines per loop.

    with Progress(total=n_epochs, initial=start, desc="cace_net/full", unit="epoch") as bar:
        for epoch in range(start, n_epochs):
            ...
            bar.update(loss=f"{loss:.4f}")
"""
from __future__ import annotations

import datetime as _dt
import logging
import sys
import time
from typing import Any

log = logging.getLogger("avepipe.progress")


def _interactive() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # closed or replaced stream
        return False


class Progress:
    """A progress bar (terminal) or rate-limited progress log lines (anything else).

    ``total``: steps of the whole loop; ``initial``: steps already done (a resumed run), not
    counted in the rate. ``update(n=1, **postfix)`` after each step; ``postfix`` values
    (loss, best epoch...) are shown beside the count. ``interactive``: force a bar (True) or
    log lines (False); default: a bar when stderr is a terminal.
    """

    def __init__(self, total: int, *, desc: str, unit: str = "it", initial: int = 0,
                 every_s: float = 30.0, every_fraction: float = 0.10, logger: logging.Logger | None = None,
                 interactive: bool | None = None):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.done = self.start_done = int(initial)
        self.every_s, self.every_fraction = float(every_s), float(every_fraction)
        self.log = logger or log
        self.postfix: dict[str, Any] = {}
        self.t0 = self.t_last = time.monotonic()
        self.done_last = self.done
        self._closed = False
        self._bar = None
        if _interactive() if interactive is None else interactive:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=self.done, desc=desc, unit=unit, dynamic_ncols=True)

    # ------------------------------------------------------------------ use
    def update(self, n: int = 1, **postfix: Any) -> None:
        self.done += n
        self.postfix.update(postfix)
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(self.postfix, refresh=False)
            self._bar.update(n)
            return
        now = time.monotonic()
        due_time = now - self.t_last >= self.every_s
        due_share = self.total <= 0 or (self.done - self.done_last) >= self.every_fraction * self.total
        if due_time and due_share and self.done < self.total:
            self._line(now)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.done > self.done_last or self.done == self.start_done:
            self._line(time.monotonic())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ text
    def line(self, now: float | None = None) -> str:
        """The log line for the current state (also what the tests read)."""
        now = time.monotonic() if now is None else now
        elapsed = max(now - self.t0, 1e-9)
        new = self.done - self.start_done
        rate = new / elapsed
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total > 0 else ""
        text = f"{self.desc}: {self.done}/{self.total}{share}"
        if new > 0:
            text += f" {_rate(rate, self.unit)}"
            left = self.total - self.done
            text += f", ETA {_hms(left / rate)}" if left > 0 else f", {_hms(elapsed)} in all"
        if self.postfix:
            text += " [" + ", ".join(f"{k}={v}" for k, v in self.postfix.items()) + "]"
        return text

    def _line(self, now: float) -> None:
        self.log.info("%s", self.line(now))
        self.t_last, self.done_last = now, self.done


def _rate(rate: float, unit: str) -> str:
    if rate >= 1 or rate == 0:
        return f"{rate:.2f} {unit}/s"
    return f"{1 / rate:.1f} s/{unit}"


def _hms(seconds: float) -> str:
    return str(_dt.timedelta(seconds=int(round(seconds))))


__all__ = ["Progress"]
