"""Progress of long work: a bar on a terminal, a few log lines elsewhere, nothing for work done quickly."""

from __future__ import annotations

import io

from lvforecast import progress
from lvforecast.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _clock(monkeypatch, times: list[float]) -> None:
    """The clock lvforecast.progress reads returns ``times`` in turn."""
    ticks = iter(times)
    monkeypatch.setattr(progress, "monotonic", lambda: next(ticks))


def test_outside_a_terminal_a_line_every_interval_and_at_the_end(monkeypatch, caplog):
    caplog.set_level("INFO", logger="lvforecast.progress")
    stream = io.StringIO()  # not a terminal, like a log file or CI
    # start 0; updates at 4 s (< 10 s: no line), 30 s (a line; its text and its time read the clock again),
    # 35 s and 38 s (< 10 s after it: none); close at 60 s (a line, as one was logged before)
    _clock(monkeypatch, [0.0, 4.0, 30.0, 30.0, 30.0, 35.0, 38.0, 60.0, 60.0])
    with Progress(120, "simulating", "step", stream=stream) as bar:
        bar.advance_to(10)
        bar.advance_to(30, "systems 1/4")
        bar.advance_to(40)
        bar.advance_to(120)
    # 30 of 120 done in 30 s: 25%, the other 90 steps at that rate take 90 s (01:30).
    assert [r.getMessage() for r in caplog.records] == [
        "simulating: step 30 of 120 (25%), systems 1/4, 00:30 elapsed, about 01:30 left",
        "simulating: step 120 of 120 (100%), systems 1/4, done in 01:00"]
    assert stream.getvalue() == ""


def test_work_done_within_the_interval_logs_nothing(caplog):
    caplog.set_level("INFO", logger="lvforecast.progress")
    with Progress(3, "rm_fit", "system", stream=io.StringIO()) as bar:
        for _ in range(3):
            bar.update()
    assert caplog.records == []


def test_on_a_terminal_a_tqdm_bar_and_no_log_lines(caplog):
    caplog.set_level("INFO", logger="lvforecast.progress")
    stream = Terminal()
    with Progress(4, "forecasting", "step", stream=stream) as bar:
        bar.advance_to(4, "systems 2/2")
    assert "forecasting: 100%" in stream.getvalue() and "4/4" in stream.getvalue()
    assert "systems 2/2" in stream.getvalue() and caplog.records == []


def test_the_closing_line_is_not_a_repeat_of_the_last(monkeypatch, caplog):
    caplog.set_level("INFO", logger="lvforecast.progress")
    # start 0; the one update at 12 s is a line (its text and its time read the clock again); closing adds none
    _clock(monkeypatch, [0.0, 12.0, 12.0, 12.0])
    with Progress(2, "rm_fit", "system", stream=io.StringIO()) as bar:
        bar.advance_to(2)
    assert [r.getMessage() for r in caplog.records] == ["rm_fit: system 2 of 2 (100%), done in 00:12"]
