"""Error compensation inside slices: later layers refitted to the teacher from student inputs.

A data-aware init fits every layer to the *teacher's* inputs. Inside a slice, though, a
layer that follows another tensorized layer (``down_proj`` after ``gate_proj``/``up_proj``,
``conv2`` after ``conv1``) receives the student's already approximated activations.
Compensation refits such a layer to reproduce the teacher layer's output from those
student inputs, i.e. it minimises, on the calibration batches,

    ||X_s W' - X_t W||_F^2 = ||X_s (W' - W_ls)||_F^2 + const,
    W_ls = (X_s^T X_s)^{-1} X_s^T X_t W,

so the existing solvers apply unchanged with the student Gram ``G_ss`` and the target
``W_ls`` (whitened truncation for the low-rank layout, ALS from the current cores or
Tucker factors otherwise). This is the slice's local distillation objective restricted to
one layer, solved in closed form. Layers are processed stage by stage (stage ``k`` =
the ``k``-th distinct input tensor met inside the slice), each stage one pass over the
calibration batches with the earlier stages already refitted; the first stage sees the
teacher's inputs exactly and is left as it is. A refit that would raise a layer's error
is not applied.

With ``chain=True`` the slices are taken as a chain through the whole network (e.g. the
decoder layers of a transformer) and each one is compensated from the *student's own*
output of the slices before it, not from the teacher's slice input: every stage, the first
included, is refitted to the teacher's layer output given the inputs the compressed model
really produces, so the error an early slice leaves is partly absorbed by the later ones
(sequential calibration, as GPTQ / SVD-LLM do). It costs one teacher pass and, per slice,
one student pass per stage plus one to advance, over the calibration batches kept in
memory at the current slice boundary.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tnexp.calibration import CalibrationError, layer_input_rows, load_checked, save_checked
from tnexp.console import work_bar
from tnexp.features import FeatureCapture, to_device
from tnexp.slicing import SlicePlan, SlicePlanError
from tnexp.tn.datainit import (
    DEFAULT_DAMPING,
    conv_weight_matrix,
    input_on_first_site,
    mpo_als,
    mpo_contract,
    mpo_whiten,
    tucker2_als,
    tucker2_matrix,
)
from tnexp.tn.errors import TensorizationError
from tnexp.tn.mpo import MPOLinear, linear_weight_in_out
from tnexp.tn.tucker import TuckerConv2d

log = logging.getLogger("tnexp")

__all__ = [
    "CompensationResult",
    "compensate_slices",
    "load_compensation",
    "save_compensation",
    "slice_stages",
]
FORMAT_VERSION = 1


@dataclass
class CompensationResult:
    """Per refitted layer: its stage and relative output error before / after the refit.

    The error is ``||X_s W' - X_t W|| / ||X_t W||`` on the calibration batches: what the
    layer's output misses of the teacher's, given the student's own inputs.
    """

    layers: dict[str, dict[str, float]] = field(default_factory=dict)
    stages: int = 0
    batches: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "stages": self.stages, "batches": self.batches}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompensationResult:
        return cls(layers=data["layers"], stages=int(data["stages"]), batches=int(data["batches"]))


def save_compensation(
    path: str | Path, student: nn.Module, result: CompensationResult, meta: dict[str, Any]
) -> Path:
    """Write the refitted layers' tensors of ``student`` and ``result`` (safetensors with
    checksums, atomically) so that a rerun or another slice job loads them instead of
    repeating the teacher pass (:func:`load_compensation`)."""
    tensors = {
        f"{name}.{key}": value
        for name in result.layers
        for key, value in student.get_submodule(name).state_dict().items()
    }
    fields = {"result": result.to_dict(), "meta": meta}
    return save_checked(path, tensors, fields, version=FORMAT_VERSION)


@torch.no_grad()
def load_compensation(
    path: str | Path, student: nn.Module, *, expect: dict[str, Any]
) -> CompensationResult:
    """Copy the refitted tensors saved by :func:`save_compensation` into ``student``.

    Refuses a missing, damaged or stale file (``expect`` must match its ``meta``) and one
    whose tensors do not fit ``student``, naming the ``rm`` command; ``student`` is only
    changed once every tensor has been checked.
    """
    tensors, fields = load_checked(
        path, "compensated layers", version=FORMAT_VERSION, fields=("result", "meta"),
        expect=expect,
    )  # fmt: skip
    state = student.state_dict()
    misfit = [k for k, v in tensors.items() if k not in state or state[k].shape != v.shape]
    if misfit:
        raise CalibrationError(
            f"compensated layers {path} do not fit this student ({misfit[:3]}); delete the "
            f"file (rm {path}) and rerun to recompute them."
        )
    for key, value in tensors.items():
        state[key].copy_(value)
    return CompensationResult.from_dict(fields["result"])


class _Sums:
    """Running sums ``X_s^T X_s``, ``X_s^T X_t`` of one input group, and per layer of the
    group the squared norm of the teacher's output ``||X_t W||^2`` (the error's scale)."""

    def __init__(self) -> None:
        self.ss: torch.Tensor | None = None
        self.st: torch.Tensor | None = None
        self.reference: dict[str, float] = {}
        self.rows = 0

    def add(self, xs: torch.Tensor, xt: torch.Tensor, references: dict[str, float]) -> None:
        """One batch: student and teacher input rows, and per layer ``||X_t W||^2``."""
        if xs.shape != xt.shape:
            raise TensorizationError(
                f"student and teacher layer inputs differ in shape ({tuple(xs.shape)} vs "
                f"{tuple(xt.shape)}); compensation needs the same tokens / patches in both."
            )
        xs, xt = xs.float(), xt.float()  # one batch in float32, sums in float64
        ss, st = (xs.T @ xs).double(), (xs.T @ xt).double()
        if self.ss is None:
            self.ss, self.st = ss, st
        else:
            self.ss += ss
            self.st += st
        for name, value in references.items():
            self.reference[name] = self.reference.get(name, 0.0) + value
        self.rows += xs.shape[0]

    def means(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        n = max(self.rows, 1)
        return self.ss / n, self.st / n, {k: v / n for k, v in self.reference.items()}


def _tensorized_layers(model: nn.Module, plan: SlicePlan) -> dict[str, list[str]]:
    from tnexp.factory import tensorized_modules

    found = {}
    for piece in plan:
        names = []
        for path, module in zip(piece.paths, piece.modules(model)):
            names += [f"{path}.{sub}" if sub else path for sub in tensorized_modules(module)]
        found[piece.name] = names
    return found


@torch.no_grad()
def slice_stages(
    teacher: nn.Module, student: nn.Module, plan: SlicePlan, inputs: Any
) -> dict[str, list[list[str]]]:
    """Per slice, its tensorized layers grouped by shared input tensor, in execution order.

    Found by running each student slice once on the teacher's slice input of ``inputs``:
    layers called on the same tensor (``gate_proj``/``up_proj``, ``conv1``/``downsample``)
    form one group; the ``k``-th distinct input is stage ``k``.
    """
    layers = _tensorized_layers(student, plan)
    features = FeatureCapture(teacher, plan, stop_after_last=True)(inputs)
    stages: dict[str, list[list[str]]] = {}
    for piece in plan:
        grouping = _InputGroups()
        handles = [
            student.get_submodule(n).register_forward_pre_hook(grouping.hook(n))
            for n in layers[piece.name]
        ]
        try:
            f = features[piece.name]
            piece.forward(student, f.input, **f.kwargs)
        finally:
            for handle in handles:
                handle.remove()
        stages[piece.name] = grouping.groups
    return stages


class _InputGroups:
    """Layer names grouped by the input tensor they were called on, in order of first use."""

    def __init__(self) -> None:
        self.groups: list[list[str]] = []
        self._index: dict[tuple, int] = {}
        self._alive: list[torch.Tensor] = []  # no address reuse while the slice runs

    def hook(self, name: str) -> Callable:
        def record(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
            if key not in self._index:
                self._index[key] = len(self.groups)
                self.groups.append([])
                self._alive.append(x)
            group = self.groups[self._index[key]]
            if name not in group:
                group.append(name)

        return record


def _dense_matrix(module: nn.Module) -> torch.Tensor:
    """The teacher layer's weight as the ``(in, out)`` matrix its input rows multiply."""
    if isinstance(module, nn.Conv2d):
        return conv_weight_matrix(module.weight.detach().double())
    return linear_weight_in_out(module).double()


def _approx_matrix(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, MPOLinear):
        return mpo_contract([c.detach().double() for c in layer.cores])
    if isinstance(layer, TuckerConv2d):
        return tucker2_matrix(*(f.double() for f in _tucker_factors(layer)))
    raise TensorizationError(f"cannot compensate a {type(layer).__name__}.")


def _tucker_factors(layer: TuckerConv2d) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(core, U_out, U_in) of a TuckerConv2d, as tnexp.tn.datainit orders them."""
    return (
        layer.core.weight.detach(),
        layer.last.weight.detach()[:, :, 0, 0],
        layer.first.weight.detach()[:, :, 0, 0].t(),
    )


def _relative_error(
    approx: torch.Tensor, w: torch.Tensor, ss: torch.Tensor, st: torch.Tensor, reference: float
) -> float:
    """``||X_s W' - X_t W|| / ||X_t W||`` from the Gram sums (``reference = ||X_t W||^2``)."""
    value = (approx * (ss @ approx)).sum() - 2 * (approx * (st @ w)).sum() + reference
    return max(float(value), 0.0) ** 0.5 / max(reference, 1e-30) ** 0.5


def _refit(
    layer: nn.Module,
    target: torch.Tensor,
    gram: torch.Tensor,
    *,
    damping: float,
    sweeps: int,
    tol: float,
) -> Callable[[], None]:
    """The refit of ``layer`` to ``target`` under ``gram``, as a function that applies it."""
    if isinstance(layer, MPOLinear):
        if input_on_first_site(layer.in_factors):
            cores = mpo_whiten(
                target, gram, layer.in_factors, layer.out_factors, layer.bonds,
                damping=damping,
            )  # fmt: skip
        else:
            cores, _ = mpo_als(
                target,
                gram,
                [c.detach() for c in layer.cores],
                layer.in_factors,
                layer.out_factors,
                damping=damping,
                max_sweeps=sweeps,
                tol=tol,
            )
        return lambda: layer.set_cores(cores)
    core, u_out, u_in = _tucker_factors(layer)
    c_out = u_out.shape[0]
    kh, kw = core.shape[2:]
    kernel = target.reshape(-1, kh, kw, c_out).permute(3, 0, 1, 2)
    factors, _ = tucker2_als(
        kernel, gram, core, u_out, u_in, damping=damping, max_sweeps=sweeps, tol=tol
    )
    return lambda: layer.set_factors(*factors)


@torch.no_grad()
def compensate_slices(
    teacher: nn.Module,
    student: nn.Module,
    plan: SlicePlan,
    batches: Iterable[Any],
    *,
    model_inputs: Callable[[Any], Any],
    num_batches: int,
    damping: float = DEFAULT_DAMPING,
    als_sweeps: int = 4,
    als_tol: float = 1e-4,
    device: torch.device | str | None = None,
    progress: bool = False,
    chain: bool = False,
) -> CompensationResult:
    """Refit the later-stage tensorized layers of every slice of ``student`` (see module).

    ``batches`` is iterated once per stage after the first (the same ``num_batches``
    batches each time when the loader is deterministic); ``student`` is changed in place.
    ``chain=True``: the slices of ``plan`` must follow each other in the data flow (each
    one's input is the previous one's output; checked); every stage of every slice is
    refitted from the student's own inputs (see module).
    """
    if num_batches <= 0:
        raise ValueError(f"num_batches must be positive, got {num_batches}.")
    batches = list(_take(batches, num_batches))
    if not batches:
        raise TensorizationError("compensation got no calibration batch (empty data loader).")
    was = teacher.training, student.training
    teacher.eval(), student.eval()
    device = torch.device(device) if device is not None else next(student.parameters()).device
    try:
        stages = slice_stages(teacher, student, plan, to_device(model_inputs(batches[0]), device))
        if chain:
            result = _compensate_chain(
                teacher, student, plan, stages, batches, model_inputs, device,
                damping=damping, sweeps=als_sweeps, tol=als_tol, progress=progress,
            )  # fmt: skip
            return _logged(result)
        result = CompensationResult(
            stages=max(len(g) for g in stages.values()), batches=len(batches)
        )
        for stage in range(1, result.stages):
            groups = {s: g[stage] for s, g in stages.items() if len(g) > stage}
            sums = _accumulate(teacher, student, plan, groups, batches, model_inputs, device,
                               progress=progress, stage=stage)  # fmt: skip
            for slice_name, names in groups.items():
                _refit_group(teacher, student, names, sums[slice_name], stage, result,
                             damping=damping, sweeps=als_sweeps, tol=als_tol)  # fmt: skip
    finally:
        teacher.train(was[0]), student.train(was[1])
    return _logged(result)


def _logged(result: CompensationResult) -> CompensationResult:
    if result.layers:
        gains = [v["after"] / max(v["before"], 1e-30) for v in result.layers.values()]
        log.info(
            "compensation refitted %d layers (%d stages, %d batches): output error from student "
            "inputs x%.3f on average",
            len(result.layers),
            result.stages,
            result.batches,
            sum(gains) / len(gains),
        )
    return result


def _refit_group(
    teacher: nn.Module,
    student: nn.Module,
    names: list[str],
    sums: _Sums,
    stage: int,
    result: CompensationResult,
    *,
    damping: float,
    sweeps: int,
    tol: float,
) -> None:
    """Refit the student layers ``names`` (one shared input) to the teacher's outputs."""
    ss, st, references = sums.means()
    lam = damping * float(ss.diagonal().mean())
    eye = torch.eye(ss.shape[0], dtype=ss.dtype)
    for name in names:
        layer = student.get_submodule(name)
        w = _dense_matrix(teacher.get_submodule(name))
        before = _relative_error(_approx_matrix(layer), w, ss, st, references[name])
        # Ridge towards the teacher's own weight: directions the student's inputs never
        # excite keep W instead of collapsing to zero.
        target = torch.linalg.solve(ss + lam * eye, st @ w + lam * w)
        old = [p.detach().clone() for p in layer.parameters()]
        _refit(layer, target, ss, damping=damping, sweeps=sweeps, tol=tol)()
        after = _relative_error(_approx_matrix(layer), w, ss, st, references[name])
        if after > before:  # damping can make the fit worse: keep the old one
            for p, value in zip(layer.parameters(), old):
                p.copy_(value)
            after = before
        result.layers[name] = {"stage": stage, "before": before, "after": after}


def _compensate_chain(
    teacher: nn.Module,
    student: nn.Module,
    plan: SlicePlan,
    stages: dict[str, list[list[str]]],
    batches: list[Any],
    model_inputs: Callable[[Any], Any],
    device: torch.device,
    *,
    damping: float,
    sweeps: int,
    tol: float,
    progress: bool,
) -> CompensationResult:
    """Slice after slice, every stage refitted from the student's own propagated inputs.

    Per calibration batch the teacher's and the student's activations at the current slice
    boundary are kept (``teacher_x`` / ``student_x``); the teacher's layer input rows and
    output energies of the slice are taken in the same pass that advances ``teacher_x``.
    """
    capture = FeatureCapture(teacher, plan, chain=True, capture_outputs=False, stop_after_last=True)
    teacher_x, extras = [], []
    first = plan.slices[0].name
    for batch in batches:
        try:
            f = capture(to_device(model_inputs(batch), device))[first]
        except SlicePlanError as error:
            raise SlicePlanError(
                f"{error} Chained compensation (tensorize.calibration.compensate_chain) needs "
                "slices that follow each other through the network: set "
                "tensorize.calibration.compensate_slicing=decoder for a transformer."
            ) from None
        teacher_x.append(f.input)
        extras.append(f.kwargs)  # a chain shares the first slice's extra inputs
    student_x = list(teacher_x)
    result = CompensationResult(stages=max(len(g) for g in stages.values()), batches=len(batches))
    with work_bar(progress, len(plan), "compensation (chained slices)") as advance:
        for index, piece in enumerate(plan):
            groups = stages[piece.name]
            rows_t: list[dict[int, torch.Tensor]] = []
            energies: list[dict[str, float]] = []
            for b in range(len(batches)):  # teacher: rows of every stage, then advance
                rows: dict[int, torch.Tensor] = {}
                outputs: dict[str, torch.Tensor] = {}
                handles = [
                    _row_hook(teacher, names[0], rows, k, teacher.get_submodule(names[0]))
                    for k, names in enumerate(groups)
                ]
                handles += [_output_hook(teacher, n, outputs) for names in groups for n in names]
                try:
                    teacher_x[b] = piece.forward(teacher, teacher_x[b], **extras[b])
                finally:
                    for handle in handles:
                        handle.remove()
                rows_t.append(rows)
                energies.append({n: _energy(y) for n, y in outputs.items()})
            for k, names in enumerate(groups):
                if index == 0 and k == 0:
                    continue  # the teacher's own inputs: the init already fits them
                sums = _Sums()
                ref = teacher.get_submodule(names[0])
                for b in range(len(batches)):
                    rows_s: dict[int, torch.Tensor] = {}
                    handle = _row_hook(student, names[0], rows_s, k, ref)
                    try:
                        piece.forward(student, student_x[b], **extras[b])
                    finally:
                        handle.remove()
                    sums.add(rows_s[k], rows_t[b][k], {n: energies[b][n] for n in names})
                _refit_group(teacher, student, names, sums, k, result,
                             damping=damping, sweeps=sweeps, tol=tol)  # fmt: skip
            for b in range(len(batches)):
                student_x[b] = piece.forward(student, student_x[b], **extras[b])
            advance()
    return result


def _energy(y: torch.Tensor) -> float:
    """``||y||^2`` in float64 (a layer output's share of the error's scale)."""
    return float(y.double().square().sum())


def _accumulate(
    teacher: nn.Module,
    student: nn.Module,
    plan: SlicePlan,
    groups: dict[str, list[str]],
    batches: list[Any],
    model_inputs: Callable[[Any], Any],
    device: torch.device,
    *,
    progress: bool,
    stage: int,
) -> dict[str, _Sums]:
    """Student/teacher input Gram sums of each slice's ``groups`` layers (one shared input)."""
    sums = {s: _Sums() for s in groups}
    capture = FeatureCapture(teacher, plan, stop_after_last=True)
    with work_bar(progress, len(batches), f"compensation stage {stage}") as advance:
        for batch in batches:
            _accumulate_batch(teacher, student, plan, groups, batch, model_inputs, device,
                              capture, sums)  # fmt: skip
            advance()
    return sums


def _accumulate_batch(
    teacher: nn.Module,
    student: nn.Module,
    plan: SlicePlan,
    groups: dict[str, list[str]],
    batch: Any,
    model_inputs: Callable[[Any], Any],
    device: torch.device,
    capture: FeatureCapture,
    sums: dict[str, _Sums],
) -> None:
    """One calibration batch into ``sums``: teacher layer inputs and outputs, then each
    slice's student inputs from the teacher's slice input."""
    rows_t: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        _row_hook(teacher, names[0], rows_t, s, teacher.get_submodule(names[0]))
        for s, names in groups.items()
    ]
    handles += [_output_hook(teacher, name, outputs) for names in groups.values() for name in names]
    try:
        features = capture(to_device(model_inputs(batch), device))
    finally:
        for handle in handles:
            handle.remove()
    for slice_name, names in groups.items():
        rows_s: dict[str, torch.Tensor] = {}
        handle = _row_hook(student, names[0], rows_s, slice_name, teacher.get_submodule(names[0]))
        try:
            f = features[slice_name]
            plan[slice_name].forward(student, f.input, **f.kwargs)
        finally:
            handle.remove()
        if slice_name not in rows_t or slice_name not in rows_s:
            raise TensorizationError(
                f"{names[0]} did not run in slice {slice_name!r}; cannot compensate it."
            )
        sums[slice_name].add(
            rows_s[slice_name], rows_t[slice_name], {n: _energy(outputs[n]) for n in names}
        )


def _row_hook(
    model: nn.Module, name: str, out: dict[str, torch.Tensor], key: str, reference: nn.Module
) -> Any:
    """Store the input rows (tokens / patches) of ``model.<name>`` under ``out[key]``.

    ``reference`` is the teacher's dense layer: the student's tensorized layer takes the
    same input, and its rows are cut with the dense layer's geometry (kernel, stride).
    """
    module = model.get_submodule(name)

    def hook(_module: nn.Module, args: tuple) -> None:
        out.setdefault(key, layer_input_rows(reference, args[0].detach()))

    return module.register_forward_pre_hook(hook)


def _output_hook(model: nn.Module, name: str, out: dict[str, torch.Tensor]) -> Any:
    """Store ``model.<name>``'s output without its bias, i.e. ``X_t W`` (free: no extra GEMM)."""
    module = model.get_submodule(name)

    def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
        y = output.detach()
        bias = getattr(module, "bias", None)
        if bias is not None:
            y = y - (bias[:, None, None] if isinstance(module, nn.Conv2d) else bias)
        out.setdefault(name, y)

    return module.register_forward_hook(hook)


def _take(batches: Iterable[Any], n: int) -> Iterable[Any]:
    for i, batch in enumerate(batches):
        if i >= n:
            return
        yield batch
