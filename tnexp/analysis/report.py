"""Writers for spectra analyses: JSON (everything), CSV (one row per layer and cut), PNGs.

Figures are built on matplotlib's Agg canvas (no pyplot global state, no display), and
the ``figure_*`` functions return them so that callers and tests can inspect the axes.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tnexp.analysis.spectra import CutSpectrum, LayerSpectrum
from tnexp.integrity import atomic_write_json

__all__ = [
    "CSV_FIELDS",
    "figure_entropy_depth",
    "figure_entropy_heatmap",
    "figure_spectra",
    "read_json",
    "summarize",
    "write_csv",
    "write_json",
    "write_plots",
]

CSV_FIELDS = (
    "name",
    "group",
    "kind",
    "source",
    "cut",
    "num_singular_values",
    "rank",
    "entropy",
    "max_entropy",
    "rank_90",
    "rank_99",
    "truncation_error",
    "lowrank_rank",
    "lowrank_weight_error",
    "whitened_entropy",
    "whitened_rank_90",
    "whitened_output_error",
)


# --------------------------------------------------------------------------- tables
def write_json(layers: Sequence[LayerSpectrum], path: str | Path) -> Path:
    """Every layer with every singular value (the full record; CSV is the summary)."""
    payload = {"summary": summarize(layers), "layers": [layer.to_dict() for layer in layers]}
    return atomic_write_json(path, payload, indent=1)


def read_json(path: str | Path) -> list[LayerSpectrum]:
    """The layers of a ``spectra.json`` (e.g. to redraw the plots without recomputing)."""
    layers = []
    for entry in json.loads(Path(path).read_text())["layers"]:
        entry = {k: v for k, v in entry.items() if k != "group"}  # derived from the name
        entry["cuts"] = [CutSpectrum(**c) for c in entry["cuts"]]
        if entry.get("whitened") is not None:
            entry["whitened"] = CutSpectrum(**entry["whitened"])
        layers.append(LayerSpectrum(**entry))
    return layers


def write_csv(layers: Sequence[LayerSpectrum], path: str | Path) -> Path:
    """One row per (layer, cut); the whitened low-rank cut is in the columns of each row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for layer in layers:
            w = layer.whitened
            for cut in layer.cuts:
                writer.writerow(
                    {
                        "name": layer.name,
                        "group": layer.group,
                        "kind": layer.kind,
                        "source": layer.source,
                        "cut": cut.cut,
                        "num_singular_values": len(cut.singular_values),
                        "rank": cut.rank,
                        "entropy": cut.entropy,
                        "max_entropy": cut.max_entropy,
                        "rank_90": cut.rank_90,
                        "rank_99": cut.rank_99,
                        "truncation_error": cut.truncation_error,
                        "lowrank_rank": layer.lowrank_rank,
                        "lowrank_weight_error": layer.lowrank_weight_error,
                        "whitened_entropy": None if w is None else w.entropy,
                        "whitened_rank_90": None if w is None else w.rank_90,
                        "whitened_output_error": None if w is None else w.truncation_error,
                    }
                )
    return path


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def summarize(layers: Sequence[LayerSpectrum]) -> dict[str, Any]:
    """Per layer group (role) and cut: mean entropy, 90%-energy rank, chosen rank, error."""
    groups: dict[tuple[str, str], list[CutSpectrum]] = {}
    whitened: dict[str, list[CutSpectrum]] = {}
    for layer in layers:
        for cut in layer.cuts:
            groups.setdefault((layer.group, cut.cut), []).append(cut)
        if layer.whitened is not None:
            whitened.setdefault(layer.group, []).append(layer.whitened)
    for group, cuts in whitened.items():
        groups[(group, cuts[0].cut)] = cuts
    rows = [
        {
            "group": group,
            "cut": cut,
            "layers": len(cuts),
            "num_singular_values": len(cuts[0].singular_values),
            "entropy_mean": _mean([c.entropy for c in cuts]),
            "entropy_min": min(c.entropy for c in cuts),
            "entropy_max": max(c.entropy for c in cuts),
            "max_entropy": cuts[0].max_entropy,
            "rank_90_mean": _mean([c.rank_90 for c in cuts]),
            "rank_99_mean": _mean([c.rank_99 for c in cuts]),
            "rank_mean": _mean([c.rank for c in cuts]),
            "truncation_error_mean": _mean([c.truncation_error for c in cuts]),
        }
        for (group, cut), cuts in groups.items()
    ]
    return {"layers": len(layers), "groups": rows}


# --------------------------------------------------------------------------- figures
def new_figure(width: float, height: float):
    # Figure + FigureCanvasAgg instead of pyplot: no global backend switch, no GUI.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _by_group(layers: Sequence[LayerSpectrum]) -> dict[str, list[LayerSpectrum]]:
    groups: dict[str, list[LayerSpectrum]] = {}
    for layer in layers:
        groups.setdefault(layer.group, []).append(layer)
    return groups


def _central(layer: LayerSpectrum) -> CutSpectrum:
    """The middle bond of an MPO (the largest), mode-0 of a Tucker-2 kernel."""
    return layer.cuts[(len(layer.cuts) - 1) // 2]


def figure_spectra(layers: Sequence[LayerSpectrum], *, title: str | None = None):
    """Normalised spectra ``s_k / s_1`` at each layer's central cut, one panel per role,
    coloured by depth; a dot marks the chosen rank."""
    from matplotlib import colormaps

    groups = _by_group(layers)
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig = new_figure(4.2 * ncols, 3.2 * nrows)
    cmap = colormaps["viridis"]
    for index, (group, members) in enumerate(groups.items()):
        ax = fig.add_subplot(nrows, ncols, index + 1)
        for depth, layer in enumerate(members):
            cut = _central(layer)
            s = cut.singular_values
            if not s or s[0] <= 0:
                continue
            color = cmap(depth / max(1, len(members) - 1))
            ax.semilogy(range(1, len(s) + 1), [v / s[0] for v in s], color=color, lw=0.9)
            if cut.rank is not None and cut.rank <= len(s):
                ax.plot([cut.rank], [s[cut.rank - 1] / s[0]], "o", color=color, ms=3)
        ax.set_xlabel("singular value index k")
        ax.set_ylabel("s_k / s_1")
        ax.set_title(f"{group}\n{_central(members[0]).cut}, {len(members)} layers", fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
    fig.suptitle(
        title or "bond spectra (colour: depth, dark = first; dot: chosen rank)", fontsize=10
    )
    return fig


def figure_entropy_depth(layers: Sequence[LayerSpectrum], *, title: str | None = None):
    """Left: entanglement entropy per cut vs depth, one line per role and cut (dotted: the
    whitened low-rank cut, with input statistics). Right: the rank holding 90% of the
    energy at the central cut vs the chosen rank."""
    fig = new_figure(11.0, 4.2)
    ax_s, ax_r = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for group, members in _by_group(layers).items():
        depth = range(len(members))
        for k, cut in enumerate(members[0].cuts):
            ys = [m.cuts[k].entropy if k < len(m.cuts) else float("nan") for m in members]
            label = group if len(members[0].cuts) == 1 else f"{group} {cut.cut}"
            (line,) = ax_s.plot(depth, ys, marker="o", ms=3, label=label)
        if all(m.whitened is not None for m in members):
            # Same colour, dotted: the low-rank cut as the layer's inputs see it.
            ax_s.plot(
                depth,
                [m.whitened.entropy for m in members],
                ls=":",
                marker=".",
                color=line.get_color(),
                label=f"{group} whitened (in|out)",
            )
        (line,) = ax_r.plot(
            depth, [_central(m).rank_90 for m in members], marker="o", ms=3, label=f"{group} 90%"
        )
        if all(m.whitened is not None for m in members):
            ax_r.plot(
                depth,
                [m.whitened.rank_90 for m in members],
                ls=":",
                marker=".",
                color=line.get_color(),
                label=f"{group} whitened 90%",
            )
        chosen = [_central(m).rank for m in members]
        if any(r is not None for r in chosen):
            ax_r.plot(
                depth,
                [float("nan") if r is None else r for r in chosen],
                ls="--",
                color=line.get_color(),
                label=f"{group} chosen",
            )
    ax_s.set_xlabel("depth (layer index within its role)")
    ax_s.set_ylabel("entanglement entropy S (nats)")
    ax_s.set_title("entropy across depth", fontsize=10)
    ax_r.set_xlabel("depth (layer index within its role)")
    ax_r.set_ylabel("rank")
    ax_r.set_title("rank for 90% energy (solid; dotted: whitened) vs chosen (dashed)", fontsize=10)
    for ax in (ax_s, ax_r):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, framealpha=0.6)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def figure_entropy_heatmap(layers: Sequence[LayerSpectrum], *, title: str | None = None):
    """Entropy relative to its maximum ``log(#singular values)`` as a layer x cut heat map
    (blank where a layer has no such cut). Relative, because cuts of different sizes have
    different maxima: 1 is a flat spectrum, 0 a rank-1 cut."""
    import numpy as np

    cuts: list[str] = []
    for layer in layers:
        for cut in layer.cuts:
            if cut.cut not in cuts:
                cuts.append(cut.cut)
    grid = np.full((len(layers), len(cuts)), np.nan)
    for row, layer in enumerate(layers):
        for cut in layer.cuts:
            if cut.max_entropy > 0:
                grid[row, cuts.index(cut.cut)] = cut.entropy / cut.max_entropy
    fig = new_figure(max(4.5, 1.2 * len(cuts) + 3.5), max(3.0, 0.11 * len(layers) + 1.5))
    ax = fig.add_subplot()
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="magma")
    ax.set_xticks(range(len(cuts)), cuts, fontsize=8)
    ax.set_yticks(range(len(layers)), [layer.name for layer in layers], fontsize=5)
    ax.set_xlabel("cut")
    ax.set_ylabel("layer (module order)")
    ax.set_title(title or "relative entanglement entropy per layer and cut", fontsize=10)
    fig.colorbar(image, ax=ax, label="S / log(number of singular values)")
    return fig


def write_plots(
    layers: Sequence[LayerSpectrum],
    directory: str | Path,
    *,
    title: str | None = None,
    dpi: int = 90,
) -> dict[str, Path]:
    """``spectra.png``, ``entropy_depth.png`` and ``entropy_heatmap.png`` in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    figures = {
        "spectra": figure_spectra(layers, title=title and f"{title}: bond spectra"),
        "entropy_depth": figure_entropy_depth(layers, title=title),
        "entropy_heatmap": figure_entropy_heatmap(
            layers, title=title and f"{title}: relative entanglement entropy"
        ),
    }
    paths = {}
    for name, fig in figures.items():
        paths[name] = directory / f"{name}.png"
        fig.savefig(paths[name], dpi=dpi)
    return paths
