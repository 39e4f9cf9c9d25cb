"""What this machine must have for a run to start: the GPU a config asks for, and the model's weights.

Only ``train()`` and ``evaluate()`` check it, before a run directory is claimed, FLOPs are reserved or a model
loads: a dry run, the multirun pre-flight and a study's plan validate configs that may run on another machine.
"""

from __future__ import annotations

from typing import Any

from lvforecast.errors import UserError


def check_machine(model: Any, trainer: Any = None, device: str | None = None) -> None:
    """Raise one error listing everything this machine lacks for the run.

    Args:
        model: The ``model`` node: a Hugging Face model's weights must be a directory, cached, or downloadable.
        trainer: The ``trainer`` node of a training run: a GPU accelerator needs a GPU.
        device: An evaluation's ``device`` value.

    Raises:
        UserError: Something is missing; one line per problem.
    """
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
