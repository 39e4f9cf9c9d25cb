"""Sweeps inside one FLOP budget: ``python train.py -m sweep=NAME``, and every search stage of a study."""

from lvforecast.experiment.sweeps.job import SweepClaim, run_recorded
from lvforecast.experiment.sweeps.plan import BudgetPreflight
from lvforecast.experiment.sweeps.summary import SweepSummary, best_from

__all__ = ["BudgetPreflight", "SweepClaim", "SweepSummary", "best_from", "run_recorded"]
