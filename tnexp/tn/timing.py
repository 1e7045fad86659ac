"""Timing a layer's alternative execution paths once per input shape (order calibration).

The tensorized layers can compute the same output in several ways (a Tucker-2 conv as three
convolutions or as one conv with the reconstructed kernel; an MPO core-by-core or through its
dense weight). FLOP counts pick a path without running anything, but they mislead where a
path is bound by memory traffic or kernel launches (small 1x1 convolutions, one-token GEMVs).
:func:`fastest_path` runs each candidate on the real input, forward and, when gradients are
needed, backward, and returns the quickest. :data:`TIMED_CHOICES` caches that choice per
layer signature and input shape for the whole process: layers of the same shape (ResNet's
repeated blocks, a transformer's layers) are timed once, and a model built twice in one
process runs the same paths (timing noise cannot make two builds differ). A fresh process
may choose otherwise where two paths are about equally fast; the results then differ at
float-error level only, and deterministic mode skips timing altogether.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence

import torch

# Samples per candidate after one warm-up call; the minimum is kept (the least disturbed
# sample of a shared machine), and candidates take turns so drifts hit all of them alike.
TIMING_REPEATS = 3
# A path other than the preferred one (the FLOP choice) wins only when it was faster by
# more than this: within it either is within the 10% of the best that issue 14 asks for,
# and a disturbed sample on a loaded machine cannot flip the choice to a slower path.
PREFER_MARGIN = 0.10


class TimedChoices:
    """A bounded process-wide map from (layer signature, input key) to the timed path."""

    def __init__(self, max_entries: int = 4096):
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, str] = OrderedDict()

    def get(self, key: Hashable) -> str | None:
        choice = self._entries.get(key)
        if choice is not None:
            self._entries.move_to_end(key)
        return choice

    def put(self, key: Hashable, choice: str) -> None:
        self._entries[key] = choice
        if len(self._entries) > self.max_entries:  # shapes vary; keep it bounded
            self._entries.popitem(last=False)

    def items_for(self, signature: Hashable) -> dict[Hashable, str]:
        """The choices recorded for one layer signature, by input key."""
        return {key[1]: v for key, v in self._entries.items() if key[0] == signature}

    def clear(self) -> None:
        self._entries.clear()


TIMED_CHOICES = TimedChoices()


def input_key(x: torch.Tensor, size: Hashable, grad: bool) -> tuple:
    """What a timed choice depends on besides the layer: size, dtype, device, grad, autocast."""
    device = x.device.type
    autocast = str(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None
    return (size, x.dtype, str(x.device), grad, autocast)


def timing_allowed(x: torch.Tensor) -> bool:
    """Whether a layer may time its paths on ``x`` now; else it chooses by FLOPs.

    False in deterministic mode (``torch.use_deterministic_algorithms(True)``, Lightning's
    ``deterministic=True``: a timed choice could differ between two runs and change results
    at float-error level), while tracing, compiling or capturing a CUDA graph, and while
    something watches or rewrites the autograd graph being built, since the timing runs
    would then become part of what it watches (:func:`graph_is_watched`). Such a forward
    reuses a cached choice or picks by FLOPs without caching it, so a later plain forward
    of the same shape still times.
    """
    if torch.are_deterministic_algorithms_enabled():
        return False
    if graph_is_watched():
        return False
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return False
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and compiler.is_compiling():
        return False
    if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return not x.is_meta


def graph_is_watched() -> bool:
    """True under a torch function or dispatch mode, saved-tensor hooks, or in a backward.

    Modes: ``FlopCounterMode`` (Lightning callbacks count a step's FLOPs with it; its
    module tracker hooks every module input into the autograd graph, and a timing
    ``autograd.grad`` inside the step then fails with "A leaf node was passed to
    _will_engine_execute_node", issue 14), fake/meta tensor modes, debug modes. Saved-tensor
    hooks: non-reentrant activation checkpointing and ``save_on_cpu`` would pack the timing
    runs' tensors. In a backward: reentrant checkpointing recomputes the forward there.
    """
    if torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack():
        return True
    if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        return True
    return torch._C._current_graph_task_id() != -1


def fastest_path(
    paths: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
    x: torch.Tensor,
    params: Sequence[torch.Tensor],
    *,
    grad: bool,
    repeats: int = TIMING_REPEATS,
    prefer: str | None = None,
) -> tuple[str, dict[str, float]]:
    """The name of the quickest of ``paths`` on ``x`` and every path's time in seconds.

    ``prefer`` (the FLOP choice) is kept unless another path was more than
    :data:`PREFER_MARGIN` faster.

    With ``grad`` each sample is a forward plus ``torch.autograd.grad`` of the output with
    respect to ``params`` (and ``x`` when it requires grad), so nothing accumulates into
    ``.grad``; without, a forward under ``torch.no_grad()``. The samples run on a detached
    copy of ``x``, in a graph of their own; ``paths`` must not call modules (``module(x)``
    runs forward hooks, global ones too, that would see the timing runs): use functional
    calls. Callers check :func:`timing_allowed` first.
    """
    if not paths:
        raise ValueError("fastest_path needs at least one path.")
    sample = x.detach().requires_grad_(grad and x.requires_grad)
    targets = [p for p in params if p.requires_grad]
    if sample.requires_grad:
        targets.append(sample)
    grad = grad and bool(targets)

    def run(fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if grad:
            with torch.enable_grad():
                out = fn(sample)
                torch.autograd.grad(out, targets, torch.ones_like(out), allow_unused=True)
        else:
            with torch.no_grad():
                fn(sample)

    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    names = list(paths)
    best = dict.fromkeys(names, float("inf"))
    for name in names:  # warm-up (allocator, kernel selection)
        run(paths[name])
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            start = time.perf_counter()
            run(paths[name])
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    winner = min(best, key=best.__getitem__)
    if prefer in best and best[prefer] <= best[winner] * (1 + PREFER_MARGIN):
        winner = prefer
    return winner, best
