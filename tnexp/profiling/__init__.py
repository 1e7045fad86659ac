"""Layer profiling (paper appendix B.1): which layers suffer most from tensorization?

Each matching layer is tensorized *alone* (through the one factory, at the target CR) and
the accuracy drop of the otherwise dense model on the validation data is measured. The
``k`` layers with the largest drop are then left dense - the paper keeps the 4 most
sensitive convolutions of ResNet-34 dense.

Python::

    results = profile_layers(teacher, datamodule, cr=0.5)
    spec = {"rules": [...], **exclusion_spec(results, k=4)}

Command line (composes the Hydra config for the model and data; tnexp/stages/profile.py)::

    uv run python -m tnexp.profiling --teacher outputs/teacher/teacher.safetensors \\
        --model small_resnet --data digits --cr 0.5 --k 4 --out outputs/profile

writes ``profile.csv``, ``profile.json``, ``profile.png`` and a ``configs/tensorize``
snippet (``tensorize_profiled.yaml``) that excludes the ``k`` most sensitive layers.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tnexp.factory import TensorizeSpec, plan_layers, tensorize
from tnexp.features import to_device
from tnexp.integrity import atomic_write_bytes, atomic_write_json

__all__ = [
    "LayerSensitivity",
    "exclusion_spec",
    "most_sensitive",
    "plot_profile",
    "profile_layers",
    "top1_accuracy",
    "write_exclusion_yaml",
    "write_profile_csv",
    "write_profile_json",
]

EvaluateFn = Callable[[nn.Module, Iterable[Any]], float]


@dataclass
class LayerSensitivity:
    """One layer tensorized alone: its accuracy and the drop vs the dense model.

    ``drop`` is ``dense_accuracy - accuracy`` (percentage points when the evaluation
    returns percent); larger means more sensitive. ``cr`` is the achieved per-layer CR
    after rank rounding.
    """

    name: str
    dense_accuracy: float
    accuracy: float
    drop: float
    params_before: int
    params_after: int
    cr: float
    ranks: list[int] | None = None  # Tucker (r_out, r_in)
    bond_dim: int | None = None  # MPO

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------ evaluation
@torch.no_grad()
def top1_accuracy(model: nn.Module, batches: Iterable[Any]) -> float:
    """Top-1 accuracy in percent over ``(x, y)`` batches (on the model's device)."""
    device = next(model.parameters()).device
    model.eval()
    correct = total = 0
    for batch in batches:
        x, y = to_device(batch[0], device), to_device(batch[1], device)
        correct += int((model(x).argmax(dim=-1) == y).sum())
        total += int(y.numel())
    if total == 0:
        raise ValueError("the validation data yielded no samples")
    return 100.0 * correct / total


def _validation_batches(data: Any, max_batches: int | None) -> list[Any]:
    """Materialise the validation batches once: every layer is evaluated on the same data,
    and decoding/augmentation-free transforms are not repeated (L + 1) times."""
    if hasattr(data, "val_dataloader"):
        if hasattr(data, "setup"):
            data.setup("validate")
        data = data.val_dataloader()
    batches = []
    for i, batch in enumerate(data):
        if max_batches is not None and i >= max_batches:
            break
        batches.append(batch)
    if not batches:
        raise ValueError("the validation data yielded no batches")
    return batches


# ------------------------------------------------------------------ profiling
def profile_layers(
    teacher: nn.Module,
    datamodule_or_val_loader: Any,
    evaluate_fn: EvaluateFn | None = None,
    *,
    pattern: str = "layer*.*.conv*",
    cr: float = 0.5,
    init: str = "svd",
    method: str = "tucker",
    exclude: Sequence[str] = (),
    max_batches: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> list[LayerSensitivity]:
    """Tensorize each layer matching ``pattern`` alone and measure the accuracy drop.

    Args:
        teacher: the dense pretrained model (not modified).
        datamodule_or_val_loader: a LightningDataModule (its ``val_dataloader`` is used,
            after ``setup("validate")``) or any iterable of batches.
        evaluate_fn: ``(model, batches) -> score`` where higher is better; defaults to
            :func:`top1_accuracy` (percent) on ``(x, y)`` batches.
        pattern: glob over module paths selecting the candidate layers (factory syntax).
        cr: compression rate (fraction of parameters removed) of the single layer.
        init: ``svd`` (decomposition of the pretrained weight: measures how much the
            low-rank approximation itself hurts) or ``random``.
        method: factory method (``tucker`` for convolutions, ``mpo`` for linear layers).
        exclude: layers never to profile (factory exclusion globs).
        max_batches: evaluate on the first ``max_batches`` validation batches only.
        device: where to evaluate (default: the teacher's device).
        progress: show a rich progress bar over layers.

    Returns:
        One :class:`LayerSensitivity` per matching layer, in module order.
    """
    evaluate = evaluate_fn or top1_accuracy
    if device is not None:
        teacher = teacher.to(device)
    teacher.eval()
    # The factory's own planner decides which modules match, so profiling and the final
    # tensorization agree on the layer set (and on pattern errors).
    base_rule = {"pattern": pattern, "method": method, "cr": cr, "init": init}
    spec = TensorizeSpec.from_config({"rules": [base_rule], "exclude": list(exclude)})
    names = [item.name for item in plan_layers(teacher, spec)]
    batches = _validation_batches(datamodule_or_val_loader, max_batches)
    dense = float(evaluate(teacher, batches))

    results: list[LayerSensitivity] = []
    for name in _progress(names, progress):
        student, report = tensorize(teacher, {"rules": [{**base_rule, "pattern": name}]})
        student.eval()
        accuracy = float(evaluate(student, batches))
        layer = report.layers[0]
        results.append(
            LayerSensitivity(
                name=name,
                dense_accuracy=dense,
                accuracy=accuracy,
                drop=dense - accuracy,
                params_before=layer.params_before,
                params_after=layer.params_after,
                cr=layer.cr,
                ranks=layer.ranks,
                bond_dim=layer.bond_dim,
            )
        )
        del student  # one extra model copy at a time
    return results


def _progress(names: list[str], enabled: bool) -> Iterable[str]:
    if not enabled:
        yield from names
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    columns = (
        TextColumn("profiling {task.fields[layer]:<24}"),
        BarColumn(),
        MofNCompleteColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("profiling", total=len(names), layer="")
        for name in names:
            bar.update(task, layer=name)
            yield name
            bar.advance(task)


# ------------------------------------------------------------------ selection
def most_sensitive(results: Sequence[LayerSensitivity], k: int) -> list[str]:
    """Names of the ``k`` layers with the largest accuracy drop (ties: module order)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    bad = [r.name for r in results if not math.isfinite(r.drop)]
    if bad:
        raise ValueError(f"non-finite accuracy drop for {bad}; cannot rank layers")
    order = sorted(range(len(results)), key=lambda i: (-results[i].drop, i))
    return [results[i].name for i in order[:k]]


def exclusion_spec(results: Sequence[LayerSensitivity], k: int) -> dict[str, list[str]]:
    """``{"exclude": [...]}`` for the factory spec: keep the ``k`` most sensitive dense."""
    return {"exclude": most_sensitive(results, k)}


def write_exclusion_yaml(
    results: Sequence[LayerSensitivity],
    k: int,
    path: str | Path,
    *,
    base: str = "tucker",
) -> Path:
    """Write a ``configs/tensorize/<name>.yaml`` that extends ``base`` with the exclusions.

    Copy it into ``configs/tensorize/`` and select it with ``tensorize=<name>``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = most_sensitive(results, k)
    drops = {r.name: r.drop for r in results}
    crs = [r.cr for r in results] or [float("nan")]
    dense = results[0].dense_accuracy if results else float("nan")
    lines = [
        "# Generated by tnexp.profiling (paper appendix B.1): the base tensorization minus the",
        f"# {k} most sensitive layers, ranked by the accuracy drop when each layer alone was",
        f"# tensorized (achieved CR {min(crs):.3f}-{max(crs):.3f}; dense score {dense:.2f}).",
        *(f"#   {n}: drop {drops[n]:.3f}" for n in names),
        "defaults:",
        f"  - {base}",
        "  - _self_",
        "exclude:" if names else "exclude: []",
        *(f'  - "{n}"' for n in names),
    ]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path


# ------------------------------------------------------------------ outputs
_CSV_FIELDS = (
    "rank",
    "name",
    "dense_accuracy",
    "accuracy",
    "drop",
    "params_before",
    "params_after",
    "cr",
    "ranks",
    "bond_dim",
)


def write_profile_csv(results: Sequence[LayerSensitivity], path: str | Path) -> Path:
    """One row per layer in module order; ``rank`` 1 is the most sensitive."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rank = {n: i + 1 for i, n in enumerate(most_sensitive(results, len(results)))}
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_CSV_FIELDS)
        writer.writeheader()
        for r in results:
            row = {**r.to_dict(), "rank": rank[r.name]}
            row["ranks"] = "x".join(str(v) for v in r.ranks) if r.ranks else ""
            writer.writerow(row)
    return path


def write_profile_json(results: Sequence[LayerSensitivity], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, [r.to_dict() for r in results])
    return path


def plot_profile(
    results: Sequence[LayerSensitivity],
    path: str | Path,
    *,
    k: int = 0,
    title: str | None = None,
) -> Path:
    """Bar plot of the accuracy drop per layer (module order); the ``k`` most sensitive
    layers are highlighted. Rendered with the Agg canvas, no display needed."""
    # Figure + FigureCanvasAgg instead of pyplot: no global backend switch, no GUI.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    top = set(most_sensitive(results, k)) if k else set()
    fig = Figure(figsize=(max(6.0, 0.35 * len(results) + 2.0), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = range(len(results))
    colors = ["tab:red" if r.name in top else "tab:blue" for r in results]
    ax.bar(xs, [r.drop for r in results], color=colors)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(list(xs), [r.name for r in results], rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("accuracy drop (dense - tensorized)")
    if title is None and results:
        title = f"layer sensitivity, one layer tensorized at CR {results[0].cr:.2f}"
    ax.set_title(title or "layer sensitivity", fontsize=10)
    if top:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color="tab:red", label=f"{k} most sensitive (kept dense)")])
    fig.savefig(path, dpi=120)
    return path
