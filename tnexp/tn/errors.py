"""Errors raised for bad tensorization input: each message names the problem and the fix."""

from tnexp.errors import TnexpError


class TensorizationError(TnexpError, ValueError):
    """A tensorization request that cannot be carried out as given."""
