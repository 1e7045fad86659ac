"""Errors raised for bad tensorization input: each message names the problem and the fix."""


class TensorizationError(ValueError):
    """A tensorization request that cannot be carried out as given."""
