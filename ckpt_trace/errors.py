"""Every error a user can cause, in one place.

Each class is also a built-in exception (``ValueError``, ``OSError``) so that callers
who do not know ckpt-trace can still catch it. Messages name the bad value and what
would be valid; the command line prints them as one line and exits with status 2.
"""

from __future__ import annotations


class CkptTraceError(Exception):
    """Base class of the errors caused by input: a bad path, name, option or file."""


class ConfigError(CkptTraceError, ValueError):
    """An option has a value outside its valid range or choices."""


class UnsupportedArchitectureError(CkptTraceError, ValueError):
    """The model's architecture has no adapter."""


class SourceError(CkptTraceError, OSError):
    """A checkpoint source (directory, repo, revision) does not exist or holds no model."""


class SelectionError(CkptTraceError, ValueError):
    """A revision selection matches nothing or cannot be parsed."""


class CalibrationError(CkptTraceError, ValueError):
    """A calibration set is empty, unreadable, or does not fit the model."""


class StoreError(CkptTraceError, OSError):
    """The store directory cannot be used as one."""


class PushError(CkptTraceError, OSError):
    """The Hub refused a push: no token, no rights, or a repo id it does not take."""


REVISION_ERRORS = (CkptTraceError, OSError, RuntimeError)
"""What scoring one revision may fail with for a reason of its own (bad weights, a download, out of memory): a scan
records it and, with --keep-going, goes on; anything else is a bug that stops the scan."""


def one_line(message: object, most: int | None = None) -> str:
    """A message (an error's, say) on one line, its whitespace folded; cut to `most` characters where given."""
    folded = " ".join(str(message).split())
    return folded if most is None else folded[:most]
