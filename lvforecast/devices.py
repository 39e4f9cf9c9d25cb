"""Which device a run works on: an evaluation's ``device`` key, the trainer's accelerator and its precision, the
torch CPU thread count (the ``threads`` key, docs/configuration.md#threads); and what this machine must have for a
run to start (:func:`check_machine`).

``threads: auto`` is 1 thread for a model whose decoder layers hold fewer than :data:`SMALL_MODEL_PARAMETERS`
parameters (their matmuls are too small to split), else torch's default; an integer >= 1 sets the count.

Importing registers ``${lv_precision:${.accelerator}}`` (:func:`training_precision`, for ``conf/trainer/``) and
initialises no CUDA.
"""

from __future__ import annotations

import logging
import os
import platform
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from lvforecast.errors import UserError, raise_problems
from lvforecast.validate import int_at_least

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEVICE_CHOICES = "'auto' (the CUDA GPU when there is one, else the CPU), 'cpu', 'cuda', 'cuda:N'"
GPU_ACCELERATORS = ("gpu", "cuda")
PRECISION_RESOLVER = "lv_precision"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
SMALL_MODEL_PARAMETERS = 10_000_000


def device_problems(spec: Any, key: str = "device") -> list[str]:
    """The spelling of a ``device`` value (no hardware is looked at): ``[]`` or one message naming ``key``."""
    return [] if isinstance(spec, str) and _DEVICE.fullmatch(spec) else [f"{key}={spec!r}: allowed {DEVICE_CHOICES}"]


def no_gpu_reason() -> str:
    """Why this process sees no CUDA GPU, in words (a CPU-only torch build, or no device visible)."""
    import torch

    if torch.version.cuda is None:
        return f"this machine has no CUDA GPU (torch {torch.__version__} is a CPU-only build)"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (f"this machine has no CUDA GPU (torch {torch.__version__}, CUDA {torch.version.cuda}, none visible"
            + (f"; CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "") + ")")


def resolve_device(spec: str, key: str = "device") -> torch.device:
    """The ``torch.device`` a ``device`` value (:data:`DEVICE_CHOICES`) names on this machine.

    Raises:
        UserError: A misspelt value, or a GPU asked for where there is none (or ``cuda:N`` past the last one).
    """
    if problems := device_problems(spec, key):
        raise UserError(problems[0])
    import torch  # here, not at import: a config is checked before torch loads (a user error answers in seconds)

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise UserError(f"{key}={spec!r}: {no_gpu_reason()}; allowed here: {key}=cpu or {key}=auto")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise UserError(f"{key}={spec!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return device


def accelerator_problems(trainer: Any) -> list[str]:
    """What the ``trainer`` node (``accelerator``, ``devices``) asks for that this machine lacks, before a model
    loads (Lightning would say so only after); ``[]`` when it fits."""
    accelerator = str(trainer.get("accelerator", "auto")).lower()
    if accelerator not in GPU_ACCELERATORS:
        return []
    import torch

    if not torch.cuda.is_available():
        return [f"trainer.accelerator={accelerator!r} (e.g. trainer=gpu): {no_gpu_reason()}; allowed here: "
                f"trainer=cpu, or trainer=default (accelerator auto: the GPU where there is one, else the CPU)"]
    devices, count = trainer.get("devices", 1), torch.cuda.device_count()
    if int_at_least(devices, 1) and devices > count:
        return [f"trainer.devices={devices}: this machine has {count} CUDA GPU(s); allowed: 1 to {count} (or -1: all)"]
    return []


def check_machine(model: Any, trainer: Any = None, device: str | None = None) -> None:
    """Raise one :class:`UserError` listing everything this machine lacks: the ``model`` node's weights (a
    directory, cached, or downloadable), the GPU a training ``trainer`` node or an evaluation's ``device`` wants.

    Only ``train()`` and ``evaluate()`` call it, before a run directory is claimed, FLOPs are reserved or a model
    loads: a dry run, the multirun pre-flight and a study's plan validate configs that may run on another machine.
    """
    from lvforecast.model.source import source_problems

    problems = accelerator_problems(trainer) if trainer is not None else []
    if device is not None:
        try:
            resolve_device(device)
        except UserError as err:
            problems.append(str(err))
    problems += source_problems(model)
    raise_problems("this machine cannot run the config", problems, listed=True)


def training_precision(accelerator: Any) -> str:
    """``trainer.precision`` for ``trainer.accelerator``: ``bf16-mixed`` on a GPU, ``16-mixed`` on a GPU without
    native bfloat16 (before Ampere), ``32-true`` on the CPU; a GPU accelerator where none is visible (a config
    planned on a login node) gets the GPU's precision (:func:`accelerator_problems` refuses to run it here)."""
    name = str(accelerator).lower()
    if name not in (*GPU_ACCELERATORS, "auto"):  # the CPU: no torch import, so a config error answers sooner
        return "32-true"
    import torch

    if name == "auto" and not torch.cuda.is_available():
        return "32-true"
    native = not torch.cuda.is_available() or torch.cuda.is_bf16_supported(including_emulation=False)
    return "bf16-mixed" if native else "16-mixed"


def describe_device(device: torch.device | str) -> str:
    """``cuda:0 (NVIDIA H200)`` or ``cpu (x86_64)``: the device work ran on, for run records."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return f"{device.type} ({platform.machine()})"
    index = device.index if device.index is not None else 0
    try:
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    except (RuntimeError, AssertionError):  # a device torch cannot name (it fails to initialise CUDA)
        return f"cuda:{index}"


def layer_parameters(shape: Any) -> int:
    """Weights of the decoder layers of a :class:`~lvforecast.budget.shapes.ModelShape` (embeddings and head out)."""
    q, kv = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    return shape.n_layers * (2 * shape.hidden * q + 2 * shape.hidden * kv + 3 * shape.hidden * shape.intermediate)


def resolve_threads(setting: Any, shape: Any | None, default: int) -> int:
    """The thread count ``setting`` means for a model of ``shape`` (None: unknown, so ``default``).

    Raises:
        UserError: ``setting`` is neither ``auto`` nor an integer >= 1.
    """
    if setting == "auto":
        return 1 if shape is not None and layer_parameters(shape) < SMALL_MODEL_PARAMETERS else default
    if not int_at_least(setting, 1):
        raise UserError(f"threads={setting!r}: allowed 'auto' or an integer >= 1")
    return setting


@contextmanager
def torch_threads(setting: Any, shape: Any | None) -> Iterator[int]:
    """Run the block with :func:`resolve_threads`'s count, logged, then restore the previous count."""
    import torch

    before = torch.get_num_threads()
    count = resolve_threads(setting, shape, before)
    torch.set_num_threads(count)
    log.info("torch threads: %d (threads=%s)", count, setting)
    try:
        yield count
    finally:
        torch.set_num_threads(before)


if not OmegaConf.has_resolver(PRECISION_RESOLVER):
    OmegaConf.register_new_resolver(PRECISION_RESOLVER, training_precision)
