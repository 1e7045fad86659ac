"""Adaptive per-layer ranks: spend a whole-model parameter budget where it cuts most error.

Each layer ``l`` offers rank units ``j = 1..R_l``; unit ``j`` costs ``c_l`` parameters and
removes the energy ``e_{l,j} = s_{l,j}^2 / sum_j s_{l,j}^2`` from the layer's relative
(squared) error, ``s`` being the layer's singular values at its bond cut (whitened by the
input Gram when calibration statistics exist, so the energy is output energy). The energies
fall with ``j``, so taking units greedily by energy per parameter is optimal for the summed
relative error up to the last unit (a knapsack with concave gains).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tnexp.tn.errors import TensorizationError


def allocate_ranks(
    spectra: Sequence[torch.Tensor],
    unit_costs: Sequence[int],
    budget: float,
    *,
    max_ranks: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
    relative: bool = True,
) -> list[int]:
    """Ranks (>= 1 each) whose summed cost ``sum r_l c_l`` stays within ``budget``.

    ``relative``: each layer's energies as fractions of its total (summed relative error);
    ``False``: absolute (summed absolute error, e.g. Fisher-weighted loss estimates).
    """
    n = len(spectra)
    names = list(names or [f"layer {i}" for i in range(n)])
    caps = [min(len(s), int(m)) for s, m in zip(spectra, max_ranks or [10**12] * n, strict=True)]
    minimum = sum(unit_costs)
    if budget < minimum:
        raise TensorizationError(
            f"the parameter budget {budget:,.0f} is below rank 1 in every selected layer "
            f"({minimum:,}); lower overall_cr or select fewer layers."
        )
    gains: list[tuple[float, int, int]] = []
    for layer, (spectrum, cap) in enumerate(zip(spectra, caps, strict=True)):
        energy = spectrum.double().pow(2)
        total = float(energy.sum())
        if total <= 0.0:
            continue
        scale = total if relative else 1.0
        per_param = (energy[1:cap] / scale / unit_costs[layer]).tolist()
        gains.extend((g, layer, j) for j, g in enumerate(per_param, start=2))
    # Highest energy per parameter first; within a layer the rank order is kept.
    gains.sort(key=lambda t: (-t[0], t[1], t[2]))
    ranks = [1] * n
    left = budget - minimum
    closed: set[int] = set()
    for _, layer, j in gains:
        if layer in closed or j != ranks[layer] + 1:
            continue
        if unit_costs[layer] > left:
            closed.add(layer)  # later units of this layer carry less energy: skip them all
            continue
        ranks[layer] = j
        left -= unit_costs[layer]
    return ranks


def relative_tail_error(spectrum: torch.Tensor, rank: int) -> float:
    """``sqrt(sum_{j>r} s_j^2 / sum_j s_j^2)``: the relative error of a rank-r truncation."""
    energy = spectrum.double().pow(2)
    total = float(energy.sum())
    return float(energy[rank:].sum() / total) ** 0.5 if total > 0 else 0.0


__all__ = ["allocate_ranks", "relative_tail_error"]
