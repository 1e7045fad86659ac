"""The teacher's diagonal output Fisher per layer: how much the task loss feels an error in
each output channel (``weighting: fisher``, docs/data_aware.md).

One forward and backward of the teacher per batch with the task's loss gives, for every
selected layer, ``f_o = sum over rows of (dL/dy_o)^2`` (mean over batches; rows: tokens,
or output pixels of a convolution). Whitened truncations then minimise
``||X (W - W') diag(f)^(1/2)||`` instead of treating every output channel alike, and
adaptive ranks compare layers by their estimated loss increase. The result is stored in
:class:`tnexp.calibration.InputStats` (``stats.fisher``) and saved with the Grams.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from tnexp.calibration import CalibrationError, teacher_pass
from tnexp.console import work_bar


def _output_rows(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """``y`` (an output or its gradient) as rows of output channels."""
    if isinstance(module, nn.Conv2d):
        return y.movedim(1, -1).reshape(-1, y.shape[1])
    return y.reshape(-1, y.shape[-1])


class FisherAccumulator:
    """Forward hooks that make each named layer's output part of the autograd graph (plus
    a zero that requires grad, so no parameter needs one) and remember it; after the
    loss, :meth:`add_gradients` adds every output channel's summed squared gradient."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.model = model
        self.names = list(names)
        self.sums: dict[str, torch.Tensor] = {}
        self.batches = 0
        self._outputs: list[tuple[str, nn.Module, torch.Tensor]] = []
        self._handles: list[Any] = []

    def __enter__(self) -> FisherAccumulator:
        for name in self.names:
            module = self.model.get_submodule(name)
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs.clear()

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, _args: tuple, output: Any) -> Any:
            if not isinstance(output, torch.Tensor):
                raise CalibrationError(f"layer {name!r} returned no tensor; it has no Fisher.")
            zero = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
            tracked = output + zero
            self._outputs.append((name, module, tracked))
            return tracked

        return hook

    def add_gradients(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` to the remembered outputs only (no parameter gradients)."""
        outputs = [t for _, _, t in self._outputs]
        grads = torch.autograd.grad(loss, outputs, allow_unused=True)
        for (name, module, _), grad in zip(self._outputs, grads, strict=True):
            if grad is None:
                continue
            rows = _output_rows(module, grad.detach()).double()
            total = rows.pow(2).sum(0)
            self.sums[name] = self.sums[name] + total if name in self.sums else total
        self._outputs.clear()
        self.batches += 1

    def fisher(self) -> dict[str, torch.Tensor]:
        missing = [n for n in self.names if n not in self.sums]
        if missing:
            raise CalibrationError(
                f"layers {missing[:5]} got no gradient from the task loss; their output "
                "Fisher is undefined. Exclude them or use tensorize.weighting=none."
            )
        fisher = {n: (s / max(self.batches, 1)).cpu() for n, s in self.sums.items()}
        if all(float(f.sum()) == 0.0 for f in fisher.values()):
            raise CalibrationError(
                "the task loss has zero gradient on every layer of the teacher (a task that "
                "compares the model with the teacher, such as task=features, is already at "
                "its optimum there); weighting 'fisher' needs a task with labels. Use "
                "tensorize.weighting=none."
            )
        return fisher


def collect_output_fisher(
    teacher: nn.Module,
    layer_names: Sequence[str],
    batches: Iterable[Any],
    *,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    num_batches: int,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Per layer, the diagonal empirical Fisher of its outputs under the task loss.

    ``loss_fn(model, batch)`` returns the scalar loss of one batch (the task's mean loss).
    The result for layer ``l`` is ``f_o = mean over batches of sum over rows (dL/dy_o)^2``
    (rows: tokens, or pixels of a convolution's output); one forward and one backward per
    batch, gradients only for the layers' outputs, the teacher's parameters untouched.
    """
    from tnexp.features import to_device

    if num_batches < 1:
        raise CalibrationError(
            f"the output Fisher needs at least one batch, got fisher_batches={num_batches}; "
            "set tensorize.calibration.fisher_batches to a positive number."
        )
    with (
        teacher_pass(teacher, device),
        torch.enable_grad(),
        FisherAccumulator(teacher, layer_names) as acc,
        work_bar(progress, num_batches, "output Fisher") as advance,
    ):
        for batch in batches:
            if acc.batches >= num_batches:
                break
            loss = loss_fn(teacher, to_device(batch, device))
            if not torch.isfinite(loss):
                raise CalibrationError(
                    f"the task loss is {float(loss.detach())} on a calibration batch; the "
                    "teacher or the data is broken (check the teacher's perplexity / accuracy)."
                )
            acc.add_gradients(loss)
            advance()
    if acc.batches == 0:
        raise CalibrationError(
            "the calibration data yielded no batch for the output Fisher; check the data set."
        )
    return acc.fisher()


__all__ = ["FisherAccumulator", "collect_output_fisher"]
