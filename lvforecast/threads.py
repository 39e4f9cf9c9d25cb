"""The torch CPU thread count of a run: the ``threads`` key (docs/configuration.md#threads).

``auto`` is 1 thread for a model whose decoder layers hold fewer than :data:`SMALL_MODEL_PARAMETERS` parameters
(their matmuls are too small to split), else torch's default; an integer >= 1 sets the count.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lvforecast.errors import UserError
from lvforecast.validate import int_at_least

log = logging.getLogger(__name__)

SMALL_MODEL_PARAMETERS = 10_000_000


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
