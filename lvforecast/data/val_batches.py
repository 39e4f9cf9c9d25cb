"""``${lv_val_batches:WINDOWS}``: a fixed validation slice stated in windows, as ``trainer.limit_val_batches``.

Lightning limits validation in batches; stated in windows, the slice (and ``val/loss``) stays the same first
windows whatever ``data.val_batch_size`` (docs/clusters-and-gpus.md). Registered on import of
:mod:`lvforecast.experiment`.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from lvforecast.errors import UserError

RESOLVER = "lv_val_batches"


def val_batches(windows: Any, *, _root_: Any) -> int:
    """The batch count of the first ``windows`` validation windows at ``data.val_batch_size`` (``data.batch_size``
    when null) of the whole config ``_root_`` (OmegaConf passes it).

    Raises:
        UserError: ``windows`` is not a whole number of validation batches (the keys and the sizes that fit named).
    """
    data = _root_.data
    size = data.get("val_batch_size") or data.get("batch_size")
    if not isinstance(windows, int) or isinstance(windows, bool) or windows < 1:
        raise UserError(f"${{{RESOLVER}:{windows!r}}}: the windows validated must be an integer >= 1")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise UserError(f"data.val_batch_size={data.get('val_batch_size')!r} (data.batch_size="
                        f"{data.get('batch_size')!r}): must be an integer >= 1 to validate {windows} windows")
    if windows % size:
        fits = [d for d in range(1, windows + 1) if windows % d == 0]
        raise UserError(f"data.val_batch_size={size}: trainer.limit_val_batches validates the first {windows} windows "
                        f"(${{{RESOLVER}:{windows}}}), which is not a whole number of batches of {size}; allowed "
                        f"data.val_batch_size: {', '.join(map(str, fits))}")
    return windows // size


if not OmegaConf.has_resolver(RESOLVER):
    OmegaConf.register_new_resolver(RESOLVER, val_batches)
