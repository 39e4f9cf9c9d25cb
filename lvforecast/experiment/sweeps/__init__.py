"""Hydra multirun studies inside one FLOP budget.

A study is a sequence of sweeps (``multirun_sweeps/*.yaml``, the config group ``sweep``), launched as
``python train.py -m sweep=NAME [overrides]``. One concern per module:

- :mod:`~lvforecast.experiment.sweeps.resolver`: ``${lv_best:PATH,KEY}`` (:func:`best_from`), a setting of an
  earlier sweep's best job; registered on import of this package.
- :mod:`~lvforecast.experiment.sweeps.job`: :func:`run_recorded`, the task wrapper of ``train.py`` that records
  each multirun job's ``job_status.json``, and the job statuses.
- :mod:`~lvforecast.experiment.sweeps.jobs`: a multirun's jobs and axes, known before launch.
- :mod:`~lvforecast.experiment.sweeps.preflight`: :class:`BudgetPreflight`, the pre-launch budget check.
- :mod:`~lvforecast.experiment.sweeps.summary`: :class:`SweepSummary`, the summary written when the multirun
  ends, and ``summarize_command`` to rebuild it.
"""

from lvforecast.experiment.sweeps.job import run_recorded
from lvforecast.experiment.sweeps.preflight import BudgetPreflight
from lvforecast.experiment.sweeps.resolver import best_from
from lvforecast.experiment.sweeps.summary import SweepSummary

__all__ = ["BudgetPreflight", "SweepSummary", "best_from", "run_recorded"]
