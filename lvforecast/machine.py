"""What this machine must have for a run to start: the GPU a config asks for, and the model's weights.

:func:`check_machine` is called by ``train()`` and ``evaluate()`` right after their config checks, before a run
directory is claimed, FLOPs are reserved or a model loads, and only for a run that will execute here: a dry run,
the multirun pre-flight and a study's plan validate configs that may run on another machine (a GPU node planned
from a login node, the coursework study planned on a laptop), so they do not call it.
"""

from __future__ import annotations

from typing import Any

from lvforecast.errors import UserError


def machine_problems(model: Any, trainer: Any = None, device: str | None = None) -> list[str]:
    """Everything this machine lacks for the run, one message each (``[]`` when it can run it).

    Args:
        model: The ``model`` node: a Hugging Face model's weights must be a directory, cached, or downloadable.
        trainer: The ``trainer`` node of a training run: a GPU accelerator needs a GPU.
        device: An evaluation's ``device`` value.
    """
    from lvforecast.devices import accelerator_problems, resolve_device
    from lvforecast.model.source import source_problems

    problems: list[str] = []
    if trainer is not None:
        problems += accelerator_problems(trainer)
    if device is not None:
        try:
            resolve_device(device)
        except UserError as err:
            problems.append(str(err))
    return problems + source_problems(model)


def check_machine(model: Any, trainer: Any = None, device: str | None = None) -> None:
    """Raise one :class:`~lvforecast.errors.UserError` listing :func:`machine_problems`, if there are any."""
    problems = machine_problems(model, trainer, device)
    if problems:
        raise UserError("this machine cannot run the config:\n  - " + "\n  - ".join(problems))
