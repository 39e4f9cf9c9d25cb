"""What the entry points call: train(cfg), evaluate(cfg) and the Hydra sweep machinery.

Importing it registers the resolvers the configs use, so every entry point (``train.py``, ``evaluate.py``,
``study.py``) has them: ``${lv_unique:}`` and ``${lv_run_name:}`` (:mod:`lvforecast.experiment.rundir`, Hydra's run
and sweep directory names), ``${lv_precision:}`` (:mod:`lvforecast.devices`, the trainer's precision) and
``${lv_val_batches:}`` (:mod:`lvforecast.data.val_batches`, validation slices in windows).
"""

from lvforecast import devices as _devices  # noqa: F401 - registers the ${lv_precision:} resolver
from lvforecast.data import val_batches as _val_batches  # noqa: F401 - registers the ${lv_val_batches:} resolver
from lvforecast.experiment import rundir as _rundir  # noqa: F401 - registers ${lv_unique:} and ${lv_run_name:}
