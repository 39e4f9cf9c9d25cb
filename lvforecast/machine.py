"""What this machine must have for a run to start: the GPU a config asks for, and the model's weights.

Only ``train()`` and ``evaluate()`` check it, before a run directory is claimed, FLOPs are reserved or a model
loads: a dry run, the multirun pre-flight and a study's plan validate configs that may run on another machine.
"""

from __future__ import annotations

from typing import Any

from lvforecast.errors import UserError


def check_machine(model: Any, trainer: Any = None, device: str | None = None) -> None:
    """Raise one :class:`UserError` listing everything this machine lacks: the ``model`` node's weights (a
    directory, cached, or downloadable), the GPU a training ``trainer`` node or an evaluation's ``device`` wants."""
    from lvforecast.devices import accelerator_problems, resolve_device
    from lvforecast.model.source import source_problems

    problems = accelerator_problems(trainer) if trainer is not None else []
    if device is not None:
        try:
            resolve_device(device)
        except UserError as err:
            problems.append(str(err))
    problems += source_problems(model)
    if problems:
        raise UserError("this machine cannot run the config:\n  - " + "\n  - ".join(problems))
