"""What a training run prints: a model summary with the analytic FLOPs, a progress bar counting optimizer steps.

They replace Lightning's (``conf/callbacks/progress.yaml``), which print ``Total Flops: 0`` (it counts FLOPs only
over an ``example_input_array``) and ``Epoch 0/-2`` for a step-based run (``max_epochs: -1``).
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelSummary, TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm
from pytorch_lightning.utilities.model_summary.model_summary import _format_summary_table, get_human_readable_count

from lvforecast.budget.formulas import forward_flops
from lvforecast.budget.shapes import ALPHABET_SIZE, Conventions, LoRASpec, shape_of
from lvforecast.progress import Progress

log = logging.getLogger(__name__)


class FlopModelSummary(ModelSummary):
    """Lightning's model summary without its FLOPs column, ending with the FLOPs of one ``batch_size`` x ``seq_len``
    training batch and step as the budget charges them under ``conventions`` (empty: the study brief's)."""

    def __init__(self, batch_size: int, seq_len: int, conventions: Mapping[str, Any], max_depth: int) -> None:
        super().__init__(max_depth=max_depth)
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.conventions = Conventions(**conventions)
        self.forward_flops = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = pl_module.model  # the LoRA-wrapped backbone of lvforecast's LightningModule
        lora = LoRASpec.from_peft(model, logit_bias=pl_module.logit_bias is not None,
                                  head_rows=ALPHABET_SIZE if pl_module.head == "alphabet" else None)
        self.forward_flops = forward_flops(shape_of(model), self.batch_size, self.seq_len, lora, self.conventions).total
        super().on_fit_start(trainer, pl_module)

    def summarize(self, summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int = 0,
                  **summarize_kwargs: Any) -> None:
        columns = [col for col in summary_data if col[0] != "FLOPs"]
        args: list[Any] = [total_parameters, trainable_parameters, model_size, total_training_modes]
        if "total_flops" in inspect.signature(_format_summary_table).parameters:  # Lightning >= 2.5
            args.append(0)
        lines = [line for line in _format_summary_table(*args, *columns).splitlines()
                 if not line.endswith("Total Flops")]
        lines.append(f"{get_human_readable_count(self.forward_flops):<10}Forward FLOPs per training batch "
                     f"({self.batch_size} x {self.seq_len} tokens, analytic)")
        lines.append(f"{get_human_readable_count(3 * self.forward_flops):<10}FLOPs per training step (3 x forward)")
        log.info("\n" + "\n".join(lines))


class StepProgressBar(TQDMProgressBar):
    """A tqdm progress bar whose training bar counts optimizer steps of ``max_steps`` (``step 40/150``), across
    epochs, from the step a resumed run starts at; its metrics are read only after a step that logged them.

    Where stdout is not a terminal (a log file, CI, a study's stage log) the bars are off and training logs a line
    every :data:`lvforecast.progress.LOG_EVERY_S` seconds instead (:class:`lvforecast.progress.Progress`): a bar
    there writes a carriage-return update per step and validation batch."""

    lines: Progress | None = None
    logs_lines = False

    STEP_BAR_FORMAT = "step {n_fmt}/{total_fmt} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}, " \
                      "{rate_noinv_fmt}{postfix}]"
    SHOWN = ("train/loss",)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Lightning's progress-bar metrics, with :data:`SHOWN` first (a host sync for each: call it at refresh)."""
        logged = trainer.callback_metrics
        shown = {k: float(logged[k]) for k in self.SHOWN if k in logged}
        return {**shown, **super().get_metrics(trainer, pl_module)}

    def init_train_tqdm(self) -> Tqdm:
        trainer = self.trainer
        # A resumed run starts at its checkpoint's step (restored before on_train_start, which calls this).
        return Tqdm(total=trainer.max_steps, initial=trainer.global_step, unit="step",
                    position=2 * self.process_position, disable=self.is_disabled, leave=True, dynamic_ncols=True,
                    file=sys.stdout, smoothing=0, bar_format=self.STEP_BAR_FORMAT)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.logs_lines = not sys.stdout.isatty() and trainer.is_global_zero
        if self.logs_lines:  # before the sanity check draws its bar
            self.disable()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.logs_lines:
            self.lines = Progress(trainer.max_steps, "training", "step", stream=sys.stdout)
            self.lines.advance_to(trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.lines is not None:
            self.lines.close()
        super().on_train_end(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        pass  # one bar over every epoch: Lightning's would start a new one here

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.lines is not None:  # not a terminal: the metrics go in the next line, read at logging steps only
            every = trainer.log_every_n_steps
            metrics = self.get_metrics(trainer, pl_module) if every and step % every == 0 else None
            note = None if metrics is None else ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                                          if isinstance(v, float) and "/" in k)
            self.lines.advance_to(step, note)
            return
        bar = self.train_progress_bar
        if bar is None or not self._should_update(step, bar.total):
            return
        bar.n = step
        every = trainer.log_every_n_steps
        # Reading a logged tensor is a host sync, and between logging steps there is nothing new to read.
        if (every and step % every == 0) or step == trainer.max_steps:  # the step that ended logged
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar
        else:
            bar.refresh()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.lines is None and not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
