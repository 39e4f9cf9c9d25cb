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


def test_training_outside_a_terminal_logs_lines_and_draws_no_bar(monkeypatch, caplog, capsys):
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader

    from lvforecast.experiment.progress import StepProgressBar

    class Line(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            loss = ((batch - self.w) ** 2).mean()
            self.log("train/loss", loss)
            return loss

        def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
            self.log("val/loss", ((batch - self.w) ** 2).mean(), prog_bar=True)  # as the module does

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)  # a line at every step
    caplog.set_level("INFO", logger="lvforecast.progress")
    data = DataLoader(torch.ones(8, 1), batch_size=2)
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, log_every_n_steps=2, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, callbacks=[StepProgressBar()], val_check_interval=2)
    trainer.fit(Line(), data, data)  # pytest captures stdout: not a terminal
    lines = [r.getMessage() for r in caplog.records if r.name == "lvforecast.progress"]
    assert [line.split(",")[0] for line in lines] == [f"training: step {n} of 4 ({25 * n}%)" for n in range(5)]
    assert "train/loss" in lines[2] and "val/loss" in lines[4] and "train/loss" not in lines[1]  # read at steps 2, 4
    out = capsys.readouterr()
    assert "\r" not in out.out + out.err and "it/s" not in out.out + out.err  # no tqdm bar, sanity check's included
