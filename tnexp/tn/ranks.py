"""Compression-rate bookkeeping and rank / bond-dimension solvers.

Throughout tnexp a compression rate (CR) has the paper's meaning: the relative
*reduction* of parameters, ``CR = 1 - params_after / params_before``. CR 0.7 keeps 30%.
Per-layer CRs are computed on the weight tensor that is decomposed (paper eq. 9); biases
are kept dense and are counted only in whole-model totals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from tnexp.tn.errors import TensorizationError


def check_cr(cr: float, *, what: str = "compression rate") -> float:
    """Validate that ``cr`` lies strictly inside (0, 1) and return it as a float."""
    try:
        value = float(cr)
    except (TypeError, ValueError):
        raise TensorizationError(f"{what} must be a number in (0, 1), got {cr!r}.") from None
    if not 0.0 < value < 1.0:
        raise TensorizationError(
            f"{what} must lie strictly between 0 and 1 (the fraction of parameters removed: "
            f"0.7 keeps 30%), got {value}. If you meant the fraction kept, pass 1 - {value}."
        )
    return value


def compression_rate(params_before: int, params_after: int) -> float:
    """Relative reduction of parameters (the paper's CR)."""
    return 1.0 - params_after / params_before


# --------------------------------------------------------------------------- Tucker-2
def tucker2_params(c_out: int, c_in: int, kernel_size: Sequence[int], ranks: Sequence[int]) -> int:
    """Weight parameters of a Tucker-2 conv: 1x1 (c_in->r_in), kxk core, 1x1 (r_out->c_out)."""
    r_out, r_in = ranks
    k = math.prod(kernel_size)
    return c_in * r_in + r_in * r_out * k + r_out * c_out


def tucker2_ranks_for_cr(
    c_out: int, c_in: int, kernel_size: Sequence[int], cr: float, *, name: str = "conv"
) -> tuple[int, int]:
    """Tucker-2 ranks ``(r_out, r_in)`` with parameters closest to ``(1-cr)`` of the kernel.

    Ranks are kept proportional to the channel counts (``r = a * c``), which turns the
    budget into a quadratic in ``a``; the real root is rounded and the integer pairs
    around it are searched for the one closest to the target.
    """
    cr = check_cr(cr)
    k = math.prod(kernel_size)
    dense = c_out * c_in * k
    budget = (1.0 - cr) * dense
    # a^2 * (c_out c_in k) + a * (c_out^2 + c_in^2) - budget = 0
    qa, qb = c_out * c_in * k, c_out**2 + c_in**2
    a = (-qb + math.sqrt(qb * qb + 4 * qa * budget)) / (2 * qa)
    best: tuple[float, tuple[int, int]] | None = None
    for r_out in _around(a * c_out, c_out):
        for r_in in _around(a * c_in, c_in):
            gap = abs(tucker2_params(c_out, c_in, kernel_size, (r_out, r_in)) - budget)
            if best is None or gap < best[0]:
                best = (gap, (r_out, r_in))
    assert best is not None
    r_out, r_in = best[1]
    if a * min(c_out, c_in) < 0.5:
        raise TensorizationError(
            f"{name}: CR {cr} needs a Tucker rank below 1 for a {c_out}x{c_in} convolution "
            f"(solved rank fraction {a:.4f}). Lower the CR for this layer or exclude it."
        )
    return r_out, r_in


def _around(x: float, upper: int) -> list[int]:
    centre = round(x)
    return sorted({min(max(r, 1), upper) for r in (centre - 1, centre, centre + 1)})


# --------------------------------------------------------------------------- MPO
def balanced_factors(n: int, num_sites: int) -> list[int]:
    """Factor ``n`` into ``num_sites`` integers as equal as possible (ascending).

    1600 -> [40, 40]; 6400 -> [80, 80]; 1536 -> [32, 48]. Balanced factorisations give
    the best compression for a given bond dimension, as the paper chooses.
    """
    if n < 1 or num_sites < 1:
        raise TensorizationError(f"cannot factor {n} into {num_sites} sites")
    if num_sites == 1:
        return [n]
    best: list[int] | None = None
    for d in _divisors(n):
        if d**num_sites > n:
            break
        rest = balanced_factors(n // d, num_sites - 1)
        candidate = sorted([d, *rest])
        if best is None or _imbalance(candidate) < _imbalance(best):
            best = candidate
    assert best is not None
    return best


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _imbalance(factors: Sequence[int]) -> float:
    return max(factors) / min(factors)


def check_factors(dim: int, factors: Sequence[int], *, what: str) -> list[int]:
    """Validate an explicit factorisation of a dimension."""
    factors = [int(f) for f in factors]
    if any(f < 1 for f in factors) or math.prod(factors) != dim:
        raise TensorizationError(
            f"{what} factors {factors} multiply to {math.prod(factors)}, but the dimension is "
            f"{dim}. Give factors whose product is {dim} "
            f"(e.g. {balanced_factors(dim, len(factors))})"
            " or leave them unset for a balanced factorisation."
        )
    return factors


def mpo_max_bonds(in_factors: Sequence[int], out_factors: Sequence[int]) -> list[int]:
    """Largest useful bond at each cut: the rank bound of the matrix unfolding there."""
    sites = [i * o for i, o in zip(in_factors, out_factors, strict=True)]
    return [
        min(math.prod(sites[: k + 1]), math.prod(sites[k + 1 :])) for k in range(len(sites) - 1)
    ]


def mpo_bonds(in_factors: Sequence[int], out_factors: Sequence[int], bond_dim: int) -> list[int]:
    """Bond dimensions of every cut for a uniform ``bond_dim`` (capped at the rank bound)."""
    return [min(bond_dim, m) for m in mpo_max_bonds(in_factors, out_factors)]


def mpo_params(in_factors: Sequence[int], out_factors: Sequence[int], bond_dim: int) -> int:
    """Parameters of an MPO with uniform bond dimension (paper eq. 8 for two sites)."""
    bonds = [1, *mpo_bonds(in_factors, out_factors, bond_dim), 1]
    return sum(
        bonds[k] * i * o * bonds[k + 1]
        for k, (i, o) in enumerate(zip(in_factors, out_factors, strict=True))
    )


def mpo2_bond_dim_eq11(in_factors: Sequence[int], out_factors: Sequence[int], cr: float) -> float:
    """Paper eq. 11: real-valued bond dimension of a 2-site MPO at compression rate ``cr``.

    ``D = (1 - CR) * I * O / (i1 * o1 + i2 * o2)`` with ``I = i1 i2`` and ``O = o1 o2``.
    """
    (i1, i2), (o1, o2) = in_factors, out_factors
    return (1.0 - cr) * (i1 * i2) * (o1 * o2) / (i1 * o1 + i2 * o2)


def mpo_bond_dim_for_cr(
    in_factors: Sequence[int], out_factors: Sequence[int], cr: float, *, name: str = "linear"
) -> int:
    """Uniform bond dimension whose MPO parameter count is closest to ``(1-cr)`` of the matrix.

    Two sites: eq. 11 rounded to the nearest integer. N sites: the parameter count is
    monotone in the bond dimension, so the real solution is found by bisection and rounded.
    """
    cr = check_cr(cr)
    dense = math.prod(in_factors) * math.prod(out_factors)
    budget = (1.0 - cr) * dense
    max_bond = max(mpo_max_bonds(in_factors, out_factors))
    if len(in_factors) == 2 and max(mpo2_bond_dim_eq11(in_factors, out_factors, cr), 1) <= min(
        mpo_max_bonds(in_factors, out_factors)
    ):
        real = mpo2_bond_dim_eq11(in_factors, out_factors, cr)
    else:
        real = _bisect_bond(in_factors, out_factors, budget, max_bond)
    if real < 0.5:
        raise TensorizationError(
            f"{name}: CR {cr} needs an MPO bond dimension below 1 (solved {real:.3f}) for "
            f"factors in={list(in_factors)} out={list(out_factors)}. Lower the CR or use "
            "fewer sites."
        )
    candidates = {max(1, math.floor(real)), max(1, math.ceil(real))}
    return min(candidates, key=lambda d: (abs(mpo_params(in_factors, out_factors, d) - budget), d))


def _bisect_bond(
    in_factors: Sequence[int], out_factors: Sequence[int], budget: float, max_bond: int
) -> float:
    """Real bond dimension D with params(D) == budget, params linearly interpolated in D."""
    lo, hi = 0, max_bond
    if mpo_params(in_factors, out_factors, hi) <= budget:
        return float(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if mpo_params(in_factors, out_factors, mid) <= budget:
            lo = mid
        else:
            hi = mid
    p_lo = mpo_params(in_factors, out_factors, lo) if lo else 0
    p_hi = mpo_params(in_factors, out_factors, hi)
    return lo + (budget - p_lo) / (p_hi - p_lo)
