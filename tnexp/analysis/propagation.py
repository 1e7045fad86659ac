"""Error propagation across slices and the progressive replacement ablation.

Two questions the method paper left open: does each slice's error stay local, or does the
error that reaches a slice from earlier slices grow with depth; and how much of the end
metric each replaced slice costs.

* :func:`propagation_errors` measures, per slice, the relative output error and the cosine
  similarity to the teacher's slice output twice: with the **teacher's** slice input (the
  slice alone, what local distillation trains) and with the **student's** own input (what
  reaches it in the assembled student). Their ratio is the amplification.
* :func:`progressive_replacement` swaps the student's slices into the teacher one at a time
  (depth order, or largest slice error first) and records the end metric after each swap.
"""

from __future__ import annotations

import copy
import csv
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tnexp.analysis.report import new_figure
from tnexp.console import work_bar
from tnexp.features import FeatureCapture
from tnexp.integrity import atomic_write_json
from tnexp.slicing import SlicePlan

__all__ = [
    "ReplacementStep",
    "SliceError",
    "figure_propagation",
    "progressive_replacement",
    "propagation_errors",
    "propagation_record",
    "replacement_order",
    "write_propagation",
    "write_propagation_csv",
]


@dataclass
class SliceError:
    """One slice's errors against the teacher's slice output (relative Frobenius, cosine)."""

    slice: str
    depth: int
    input_error: float  # ||x_student - x_teacher|| / ||x_teacher||: what reaches the slice
    teacher_input_error: float  # the slice alone, fed the teacher's input
    teacher_input_cosine: float
    student_input_error: float  # the slice inside the student, fed the student's input
    student_input_cosine: float

    @property
    def amplification(self) -> float:
        """Student-input error over teacher-input error (> 1: earlier slices add error)."""
        return self.student_input_error / max(self.teacher_input_error, 1e-12)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "amplification": self.amplification}


@dataclass
class ReplacementStep:
    """The end metric with the first ``replaced`` slices of the order taken from the student."""

    replaced: int
    slice: str | None  # the slice swapped in at this step (None: the teacher alone)
    metric: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Sums:
    """Streaming sums for one slice: squared norms, dot products and per-sample cosines."""

    def __init__(self) -> None:
        self.ref = self.x_ref = 0.0
        self.x_diff = self.t_diff = self.s_diff = 0.0
        self.t_cos = self.s_cos = 0.0
        self.samples = 0

    @staticmethod
    def _flat(x: torch.Tensor) -> torch.Tensor:
        return x.detach().double().reshape(x.shape[0], -1)

    def add(
        self,
        x_t: torch.Tensor,
        x_s: torch.Tensor,
        y_t: torch.Tensor,
        y_ti: torch.Tensor,
        y_s: torch.Tensor,
    ) -> None:
        x_t, x_s = self._flat(x_t), self._flat(x_s)
        y_t, y_ti, y_s = self._flat(y_t), self._flat(y_ti), self._flat(y_s)
        self.ref += float((y_t**2).sum())
        self.x_ref += float((x_t**2).sum())
        self.x_diff += float(((x_s - x_t) ** 2).sum())
        self.t_diff += float(((y_ti - y_t) ** 2).sum())
        self.s_diff += float(((y_s - y_t) ** 2).sum())
        cos = torch.nn.functional.cosine_similarity
        self.t_cos += float(cos(y_ti, y_t, dim=1, eps=1e-12).sum())
        self.s_cos += float(cos(y_s, y_t, dim=1, eps=1e-12).sum())
        self.samples += int(y_t.shape[0])

    def row(self, name: str, depth: int) -> SliceError:
        ref, n = max(self.ref, 1e-30), max(self.samples, 1)
        return SliceError(
            slice=name,
            depth=depth,
            input_error=(self.x_diff / max(self.x_ref, 1e-30)) ** 0.5,
            teacher_input_error=(self.t_diff / ref) ** 0.5,
            teacher_input_cosine=self.t_cos / n,
            student_input_error=(self.s_diff / ref) ** 0.5,
            student_input_cosine=self.s_cos / n,
        )


@torch.no_grad()
def propagation_errors(
    teacher: nn.Module,
    student: nn.Module,
    plan: SlicePlan,
    batches: Iterable[Any],
    *,
    model_inputs: Callable[[Any], Any],
    num_batches: int,
    progress: bool = False,
) -> list[SliceError]:
    """Per-slice errors of ``student`` against ``teacher`` on ``num_batches`` batches.

    ``plan`` is the student's slice plan (its paths exist in both models, see
    :mod:`tnexp.slicing`); ``model_inputs(batch)`` gives the model input (a tensor or a dict
    of keyword arguments). Slices are run in the modules' own dtype and device.
    """
    if num_batches <= 0:
        raise ValueError(f"num_batches must be positive, got {num_batches}.")
    sums = {piece.name: _Sums() for piece in plan}
    was = teacher.training, student.training
    teacher.eval(), student.eval()
    # Both forwards stop after the last slice: the heads are not needed here.
    teacher_capture = FeatureCapture(teacher, plan, stop_after_last=True)
    student_capture = FeatureCapture(student, plan, stop_after_last=True)
    seen = 0
    iterator = iter(batches)
    try:
        with work_bar(progress, num_batches, "error propagation") as advance:
            while seen < num_batches:
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
                inputs = model_inputs(batch)
                taught, own = teacher_capture(inputs), student_capture(inputs)
                for piece in plan:
                    t, s = taught[piece.name], own[piece.name]
                    alone = piece.forward(student, t.input, **t.kwargs)
                    sums[piece.name].add(t.input, s.input, t.output, alone, s.output)
                seen += 1
                advance()
    finally:
        teacher.train(was[0]), student.train(was[1])
    if seen == 0:
        raise ValueError("no batch to measure error propagation on: the data loader is empty.")
    return [sums[piece.name].row(piece.name, depth) for depth, piece in enumerate(plan)]


def replacement_order(
    plan: SlicePlan, order: str = "depth", errors: Sequence[SliceError] | None = None
) -> list[str]:
    """Slice names in the order the ablation swaps them in.

    ``depth``: the network's order; ``error``: largest teacher-input error first (the
    slices local distillation fits worst), which needs ``errors``.
    """
    if order == "depth":
        return list(plan.names())
    if order == "error":
        if errors is None:
            raise ValueError("order 'error' needs the per-slice errors (propagation_errors).")
        ranked = sorted(errors, key=lambda e: -e.teacher_input_error)
        return [e.slice for e in ranked]
    raise ValueError(f"unknown replacement order {order!r}; use 'depth' or 'error'.")


@torch.no_grad()
def progressive_replacement(
    teacher: nn.Module,
    student: nn.Module,
    plan: SlicePlan,
    evaluate: Callable[[nn.Module], float],
    *,
    order: Sequence[str] | None = None,
    progress: bool = False,
) -> list[ReplacementStep]:
    """The end metric (``evaluate(model)``) as the student's slices replace the teacher's.

    Step 0 is the teacher; step ``k`` has the first ``k`` slices of ``order`` (default:
    depth order) from the student; the last step is the student's slices everywhere.
    The teacher is not modified (a copy is patched; the student's modules are shared).
    """
    names = list(order) if order is not None else list(plan.names())
    unknown = [n for n in names if n not in plan.names()]
    if unknown:
        raise ValueError(f"slices {unknown} are not in the plan ({', '.join(plan.names())}).")
    hybrid = copy.deepcopy(teacher).eval()
    steps = [ReplacementStep(0, None, float(evaluate(hybrid)))]
    with work_bar(progress, len(names), "progressive replacement") as advance:
        for k, name in enumerate(names, start=1):
            for path in plan[name].paths:
                _set_submodule(hybrid, path, student.get_submodule(path))
            steps.append(ReplacementStep(k, name, float(evaluate(hybrid))))
            advance()
    return steps


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


# --------------------------------------------------------------------------- outputs
def propagation_record(
    errors: Sequence[SliceError], steps: Sequence[ReplacementStep], metric: str
) -> dict[str, Any]:
    """The JSON record of one analysis: rows, ablation steps and a few headline numbers."""
    rows = [e.to_dict() for e in errors]
    return {
        "metric": metric,
        "slices": rows,
        "replacement": [s.to_dict() for s in steps],
        "summary": {
            "slices": len(rows),
            "teacher_input_error_mean": _mean(e.teacher_input_error for e in errors),
            "student_input_error_mean": _mean(e.student_input_error for e in errors),
            "amplification_mean": _mean(e.amplification for e in errors),
            "last_slice_amplification": errors[-1].amplification if errors else None,
            **(
                {"metric_teacher": steps[0].metric, "metric_all_replaced": steps[-1].metric}
                if steps
                else {}
            ),
        },
    }


def write_propagation_csv(errors: Sequence[SliceError], path: str | Path) -> Path:
    """One row per slice (the columns of :class:`SliceError` plus the amplification)."""
    path = Path(path)
    rows = [e.to_dict() for e in errors]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["slice"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def figure_propagation(
    errors: Sequence[SliceError],
    steps: Sequence[ReplacementStep],
    *,
    metric: str,
    title: str | None = None,
):
    """Left: relative error per slice with teacher vs student inputs; right: the ablation."""
    fig = new_figure(11.0, 4.0)
    left, right = fig.subplots(1, 2)
    depth = [e.depth for e in errors]
    left.plot(depth, [e.teacher_input_error for e in errors], "o-", label="teacher inputs")
    left.plot(depth, [e.student_input_error for e in errors], "s-", label="student inputs")
    left.plot(depth, [e.input_error for e in errors], ":", color="grey", label="input error")
    left.set_xlabel("slice (depth order)")
    left.set_ylabel("relative output error")
    left.set_yscale("log")
    left.legend()
    left.set_title("error per slice")
    if steps:
        right.plot([s.replaced for s in steps], [s.metric for s in steps], "o-")
        right.axhline(steps[0].metric, color="grey", linestyle=":", label="teacher")
        right.legend()
    right.set_xlabel("slices replaced by the student's")
    right.set_ylabel(metric)
    right.set_title("progressive replacement")
    if title:
        fig.suptitle(title)
    return fig


def write_propagation(
    errors: Sequence[SliceError],
    steps: Sequence[ReplacementStep],
    directory: str | Path,
    *,
    metric: str,
    title: str | None = None,
) -> dict[str, Path]:
    """``propagation.json``, ``propagation.csv`` and ``propagation.png`` in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "propagation_json": directory / "propagation.json",
        "propagation_csv": directory / "propagation.csv",
        "propagation_png": directory / "propagation.png",
    }
    atomic_write_json(paths["propagation_json"], propagation_record(errors, steps, metric))
    write_propagation_csv(errors, paths["propagation_csv"])
    figure_propagation(errors, steps, metric=metric, title=title).savefig(
        paths["propagation_png"], dpi=90
    )
    return paths


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None
