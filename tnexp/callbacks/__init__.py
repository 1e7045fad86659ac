"""Lightning callbacks used across tnexp runs."""

from tnexp.callbacks.timer import OptimizationTimer

__all__ = ["OptimizationTimer"]
