"""Hydra plugins of lvforecast: the ``sweep`` config group, served from ``multirun_sweeps/``."""
