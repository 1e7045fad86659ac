"""Drawing one recovery curve (accuracy vs optimisation time): quickstart and aggregation.

A curve starts at time 0 with the student as tensorized (``metrics.before`` of
results.json, before any recovery), follows every validation of the run, and marks where
a hybrid run switches from local to global. Panels share one y range so that methods at
different CRs compare at a glance.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["draw_recovery", "hybrid_switch_epoch", "share_y"]


def hybrid_switch_epoch(results: dict[str, Any]) -> int | None:
    """The last local epoch (0-based) of a hybrid run's results.json, else None."""
    if results.get("method") != "hybrid":
        return None
    local_epochs = ((results.get("config") or {}).get("method") or {}).get("local_epochs")
    return int(local_epochs) - 1 if local_epochs else None


def draw_recovery(
    ax: Any,
    history: Iterable[dict[str, Any]],
    *,
    before: float | None = None,
    switch_epoch: int | None = None,
    scale: float = 1.0,
    label: str | None = None,
    labels_done: set[str] | None = None,
    **line: Any,
) -> Any:
    """Plot one run's validation history on ``ax``; returns the line (for its colour).

    ``before`` (time 0) is drawn as a hollow black marker joined to the curve, ``switch_epoch``
    (the last local epoch of a hybrid run) as a star. ``labels_done`` collects the legend
    entries of these markers so that each appears once per panel.
    """
    labels_done = labels_done if labels_done is not None else set()
    points = [
        (h["optimization_s"] / scale, h["value"], h.get("epoch"))
        for h in history
        if h.get("value") is not None and h.get("optimization_s") is not None
    ]
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    if before is not None:
        xs, ys = [0.0, *xs], [before, *ys]
    (curve,) = ax.plot(xs, ys, marker="o", ms=3, label=label, **line)
    color = curve.get_color()
    if before is not None:
        name = "after tensorization (before recovery)"
        # Black, not the curve's colour: methods at one CR share this point.
        ax.scatter(
            [0.0], [before], s=45, facecolors="white", edgecolors="k", zorder=3,
            label=None if name in labels_done else name,
        )  # fmt: skip
        labels_done.add(name)
    if switch_epoch is not None:
        at = [(x, y) for x, y, epoch in points if epoch == switch_epoch]
        if at:
            name = "hybrid: local → global"
            ax.scatter(
                [at[-1][0]], [at[-1][1]], marker="*", s=140, color=color, edgecolors="k",
                zorder=4, label=None if name in labels_done else name,
            )  # fmt: skip
            labels_done.add(name)
    return curve


def share_y(axes: Sequence[Any], margin: float = 0.0) -> None:
    """One y range over every panel: the union of their (already padded) ranges."""
    limits = [ax.get_ylim() for ax in axes if ax.get_visible()]
    if not limits:
        return
    low = min(lo for lo, _ in limits)
    high = max(hi for _, hi in limits)
    pad = (high - low) * margin
    for ax in axes:
        ax.set_ylim(low - pad, high + pad)
