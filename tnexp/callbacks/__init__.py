"""Lightning callbacks used across tnexp runs."""

from tnexp.callbacks.memory_format import MemoryFormat
from tnexp.callbacks.timer import OptimizationTimer

__all__ = ["MemoryFormat", "OptimizationTimer"]
