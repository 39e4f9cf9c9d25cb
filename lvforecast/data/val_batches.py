"""``${lv_val_batches:WINDOWS}``: a fixed validation slice stated in windows, as ``trainer.limit_val_batches``.

Validation is forward-only, so it runs in larger batches than training (``data.val_batch_size``, 20 by default:
no gradients or optimizer state to hold, and fewer, fuller launches on a GPU). Lightning limits validation in
batches, so a limit written as a batch count would validate other windows whenever the validation batch size
changes, and ``val/loss`` (the token-weighted mean over the windows validated) would change with it. Written as
``limit_val_batches: ${lv_val_batches:100}`` it always covers the same first 100 windows (validation is not
shuffled), in ``100 / data.val_batch_size`` batches. Registered on import of :mod:`lvforecast.experiment`.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from lvforecast.errors import UserError

RESOLVER = "lv_val_batches"


def val_batches(windows: Any, *, _root_: Any) -> int:
    """The batch count of ``windows`` validation windows at the config's validation batch size.

    Args:
        windows: Windows each validation covers (the first ones of the validation set).
        _root_: The whole config (OmegaConf passes it): ``data.val_batch_size``, or ``data.batch_size`` when null.

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
