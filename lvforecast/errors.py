"""User errors: one ``error: ...`` block and a non-zero exit, never a traceback (docs/reliability.md).

A user error (:class:`UserError`, or what :func:`describe` recognises) is a problem the person running the command
can fix; its message names the key, file or value, what was found, what is allowed and the fix. Everything else is a
bug and keeps its traceback; ``HYDRA_FULL_ERROR=1`` (:data:`TRACEBACK_SWITCH`) shows every traceback.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from typing import Any

TRACEBACK_SWITCH = "HYDRA_FULL_ERROR"
HINT = f"(the full traceback: rerun with {TRACEBACK_SWITCH}=1)"


class UserError(ValueError):
    """A problem the user can fix; the message names the file / key / value, what was found and what is allowed."""


class DivergedError(UserError):
    """Training stopped on a non-finite loss: the run's status is ``diverged``, its FLOPs charged."""


def raise_problems(what: str, problems: list[str], listed: bool = False) -> None:
    """Raise one :class:`UserError` naming every problem found (none: return): ``what: p1; p2``, or with ``listed``
    one ``  - p`` line each after ``what:``."""
    if problems:
        raise UserError(f"{what}:" + ("\n  - " + "\n  - ".join(problems) if listed else " " + "; ".join(problems)))


_OS_FIXES = {
    errno.ENOSPC: "the disk is full: free space or write elsewhere (paths.root_dir=...)",
    errno.EDQUOT: "the disk quota is exceeded: free space or write elsewhere (paths.root_dir=...)",
    errno.EACCES: "permission denied: make it writable or choose another path (paths.root_dir=...)",
    errno.EPERM: "operation not permitted: make it writable or choose another path (paths.root_dir=...)",
    errno.EROFS: "the file system is read-only: choose another path (paths.root_dir=...)",
    errno.EISDIR: "it is a folder, a file is needed here",
    errno.ENOTDIR: "a part of the path is a file, a folder is needed there",
    errno.ENOENT: "no such file or folder",
}


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message (200 characters at most), or its type's name when it has none."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def describe(exc: BaseException) -> str | None:
    """The one message for a user error, or None when ``exc`` is a bug (it keeps its traceback): an OS error on a
    named path reads ``path: cause; fix``; a Hydra composition / override or OmegaConf key/type error, its message;
    an ``InstantiationException`` (a ``_target_`` constructor raised) is looked through to its cause."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, OSError) and exc.filename is not None:
        path = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
        fix = _OS_FIXES.get(exc.errno or -1)
        cause = exc.strerror or type(exc).__name__
        return f"{path}: {cause}" + (f"; {fix}" if fix and fix.split(":")[0].lower() != cause.lower() else "")
    from hydra import errors as hydra  # imported only for errors of another kind: cheap commands stay cheap
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, hydra.InstantiationException) and exc.__cause__ is not None:
        return describe(exc.__cause__)
    if not isinstance(exc, (hydra.ConfigCompositionException, hydra.MissingConfigException,
                            hydra.OverrideParseException, hydra.SearchPathException, OmegaConfBaseException)):
        return None
    text, cause = str(exc).strip(), str(exc.__cause__ or "").strip()
    return f"{text}\n{cause}" if cause and cause not in text else text


def print_user_error(exc: Exception, full_traceback: bool) -> None:
    """Write ``error: <message>`` (:func:`describe`, indented continuation lines) and the traceback hint to stderr;
    re-raise ``exc`` instead when it is a bug or ``full_traceback`` (``HYDRA_FULL_ERROR=1``) is set."""
    message = None if full_traceback else describe(exc)
    if message is None:
        raise exc
    first, *rest = message.strip().splitlines() or ["(no message)"]
    rest = [ln if ln.startswith(" ") else "  " + ln for ln in rest]
    sys.stderr.write("\n".join(["error: " + first, *rest, HINT]) + "\n")
    sys.stderr.flush()


def run_entry(main: Callable[[], Any]) -> Any:
    """Run an entry point's ``main()``; a user error prints one ``error:`` block and exits with status 1, a bug (or
    anything with ``HYDRA_FULL_ERROR=1`` already set) propagates with its traceback."""
    previous = os.environ.get(TRACEBACK_SWITCH)
    os.environ[TRACEBACK_SWITCH] = "1"  # Hydra re-raises (no trimmed traceback of its own): its errors arrive here
    try:
        return main()
    except Exception as exc:
        print_user_error(exc, full_traceback=previous == "1")
        raise SystemExit(1) from None
    finally:
        if previous is None:
            os.environ.pop(TRACEBACK_SWITCH, None)
        else:
            os.environ[TRACEBACK_SWITCH] = previous
