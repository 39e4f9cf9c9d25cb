"""What the entry points call: train(cfg), evaluate(cfg) and the Hydra sweep machinery.

Importing it registers ``${lv_unique:}`` (:mod:`lvforecast.experiment.rundir`), which Hydra's run and sweep
directory names use, so every entry point (``train.py``, ``evaluate.py``, ``study.py``) has it.
"""

from lvforecast.experiment import rundir as _rundir  # noqa: F401 - registers the ${lv_unique:} resolver
