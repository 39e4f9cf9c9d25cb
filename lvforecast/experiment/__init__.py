"""What the entry points call (train, evaluate, sweeps); importing it registers the resolvers every config uses."""

from lvforecast import devices as _devices  # noqa: F401 - registers the ${lv_precision:} resolver
from lvforecast.experiment import config as _config  # noqa: F401 - registers the ${lv_val_batches:} resolver
from lvforecast.experiment import rundir as _rundir  # noqa: F401 - registers ${lv_unique:} and ${lv_run_name:}
