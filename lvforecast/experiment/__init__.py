"""What the entry points call: train(cfg), evaluate(cfg) and the Hydra sweep machinery.

Importing it registers the resolvers the configs use, so every entry point (``train.py``, ``evaluate.py``,
``study.py``) has them: ``${lv_unique:}`` and ``${lv_run_name:}`` (:mod:`lvforecast.experiment.rundir`, Hydra's run
and sweep directory names) and ``${lv_precision:}`` (:mod:`lvforecast.devices`, the trainer's precision).
"""

from lvforecast import devices as _devices  # noqa: F401 - registers the ${lv_precision:} resolver
from lvforecast.experiment import rundir as _rundir  # noqa: F401 - registers ${lv_unique:} and ${lv_run_name:}
