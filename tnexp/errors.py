"""The user-facing error family of tnexp.

Every error a user can fix by changing their input (a config value, a file, a folder)
derives from :class:`TnexpError`; its message names the problem and the fix. The ``tnexp``
command prints such an error as one message and exits with status 2 (the full traceback
with ``HYDRA_FULL_ERROR=1``); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["ConfigError", "InputFileError", "IntegrityError", "RunDirectoryError", "TnexpError"]


class TnexpError(Exception):
    """A problem with the user's input; the message says what is wrong and how to fix it."""


class ConfigError(TnexpError, ValueError):
    """A configuration value that is unknown, conflicting or out of range."""


class InputFileError(TnexpError, FileNotFoundError):
    """A file or directory the run needs is missing."""


class IntegrityError(TnexpError, ValueError):
    """A file on disk is truncated, corrupt or altered (checksum or format mismatch)."""


class RunDirectoryError(TnexpError, RuntimeError):
    """The run directory is in use by another run, or cannot be written."""
