"""What the entry points call: train(cfg), evaluate(cfg) and the Hydra sweep machinery.

Importing it registers the resolvers the configs use, so every entry point has them.
"""

from lvforecast import devices as _devices  # noqa: F401 - registers the ${lv_precision:} resolver
from lvforecast.data import val_batches as _val_batches  # noqa: F401 - registers the ${lv_val_batches:} resolver
from lvforecast.experiment import rundir as _rundir  # noqa: F401 - registers ${lv_unique:} and ${lv_run_name:}
