"""Sweeps inside one FLOP budget: ``python train.py -m sweep=NAME``, and every search stage of a study.

- :mod:`~.jobs`: a sweep's jobs and axes, known before launch, and the job statuses.
- :mod:`~.halving`: successive halving's schedule, selection and worst case (pure).
- :mod:`~.plan`: the pre-flight plan (:class:`~.plan.BudgetPreflight`), also a study's stage plan.
- :mod:`~.job`: :func:`~.job.run_recorded`, the task wrapper recording each job's ``job_status.json``.
- :mod:`~.summary`: :class:`~.summary.SweepSummary`, the summary written when the multirun ends.
- :mod:`~.resolver`: ``${lv_best:PATH,KEY}``, a setting of an earlier sweep's best job (registered on import).
"""

from lvforecast.experiment.sweeps.job import run_recorded
from lvforecast.experiment.sweeps.plan import BudgetPreflight
from lvforecast.experiment.sweeps.resolver import best_from
from lvforecast.experiment.sweeps.summary import SweepSummary

__all__ = ["BudgetPreflight", "SweepSummary", "best_from", "run_recorded"]
