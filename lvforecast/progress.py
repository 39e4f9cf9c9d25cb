"""Progress of long work outside training (a forecast's decode steps, a baseline's fits, a simulation).

One mechanism, :class:`Progress`: on a terminal a tqdm bar on stderr; elsewhere (a log file, CI, a study's stage
log) a log line every :data:`LOG_EVERY_S` seconds and one at the end, instead of the thousands of carriage-return
updates a bar would write there. Work done in less than :data:`LOG_EVERY_S` logs nothing. Training shows Lightning's
bar on a terminal and these lines elsewhere (:class:`lvforecast.experiment.progress.StepProgressBar`).
"""

from __future__ import annotations

import logging
import sys
from time import monotonic
from typing import Any, TextIO

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

#: Seconds between two progress lines where stderr is not a terminal.
LOG_EVERY_S = 10.0


def time_left(elapsed: float, share: float) -> str | None:
    """``about 01:30 left``: the rate so far (``share`` of the work done in ``elapsed`` seconds) carried on; None
    before anything is done."""
    return f"about {tqdm.format_interval(elapsed * max(1 - share, 0) / share)} left" if share > 0 else None


class Progress:
    """``n`` of ``total`` units of work done, shown as the module docstring says; a context manager (closes).

    Args:
        total: Units of the whole work (>= 0); ``n`` never passes it.
        desc: What is running, e.g. ``forecasting``; ``unit``: one unit's name, e.g. ``step``.
        stream: Where a bar goes (default stderr); whether it is a terminal decides bar or log lines.
    """

    def __init__(self, total: int, desc: str, unit: str, stream: TextIO | None = None) -> None:
        stream = sys.stderr if stream is None else stream
        self.total, self.desc, self.unit = int(total), desc, unit
        self.n, self.note = 0, ""
        self.start = self._logged_at = monotonic()
        self._lines, self._shown = 0, (-1, "")  # lines logged; (n, note) of the last
        isatty = getattr(stream, "isatty", None)
        self.bar = tqdm(total=self.total, desc=desc, unit=unit, file=stream, dynamic_ncols=True, leave=True) \
            if isatty is not None and isatty() else None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """``n`` more units done."""
        self.advance_to(self.n + n)

    def advance_to(self, n: int, note: str | None = None) -> None:
        """``n`` units done in all (capped at ``total``); ``note``: what else to show, e.g. ``systems 2/4``."""
        self.n = min(int(n), self.total)
        if note is not None:
            self.note = note
        if self.bar is not None:
            if note is not None:
                self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(self.n - self.bar.n)
        elif monotonic() - self._logged_at >= LOG_EVERY_S:
            self._log()

    def close(self) -> None:
        """End the bar, or log the last line where an earlier one was logged (the reader saw the work start) and
        showed less."""
        if self.bar is not None:
            self.bar.close()
        elif self._lines and self._shown != (self.n, self.note):
            self._log()

    def line(self) -> str:
        """``forecasting: step 44 of 120 (37%), systems 0/4, 00:05 elapsed, about 00:09 left`` (``done in 00:14``
        at the end)."""
        elapsed = monotonic() - self.start
        share = self.n / self.total if self.total else 1.0
        if share >= 1:
            when = f"done in {tqdm.format_interval(elapsed)}"
        else:  # the rate so far, carried on
            when = f"{tqdm.format_interval(elapsed)} elapsed, {time_left(elapsed, share) or 'time left unknown'}"
        note = f", {self.note}" if self.note else ""
        return f"{self.desc}: {self.unit} {self.n} of {self.total} ({100 * share:.0f}%){note}, {when}"

    def _log(self) -> None:
        log.info("%s", self.line())
        self._lines, self._shown = self._lines + 1, (self.n, self.note)
        self._logged_at = monotonic()
