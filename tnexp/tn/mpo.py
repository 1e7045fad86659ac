"""MPO (tensor-train matrix) linear layer.

A weight matrix ``W`` of shape ``(in, out)`` with ``in = prod(i_k)`` and ``out = prod(o_k)``
is a chain of cores ``G_k`` of shape ``(D_{k-1}, i_k, o_k, D_k)`` with ``D_0 = D_N = 1``::

    W[(i_1..i_N), (o_1..o_N)] = sum_{a} G_1[1, i_1, o_1, a_1] G_2[a_1, i_2, o_2, a_2] ... G_N[.., 1]

The forward pass contracts the input with the cores in the order that is cheapest for the
actual number of tokens (see :class:`ContractionPlanner`): rebuilding the dense weight costs
a fixed amount per step and wins for large batches, core-by-core wins for a few tokens.
FLOPs can mislead (memory-bound GEMVs, a loaded machine): with ``calibrate=True`` the
``auto`` order is instead the quickest of the plausible orders, timed once per token count
(dtype, device, gradient mode) and cached process-wide (:mod:`tnexp.tn.timing`).
"""

from __future__ import annotations

import math
import string
from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

import opt_einsum
import torch
from torch import nn

from tnexp.tn.errors import TensorizationError
from tnexp.tn.linalg import truncated_split
from tnexp.tn.ranks import (
    balanced_factors,
    check_factors,
    mpo_bond_dim_for_cr,
    mpo_bonds,
    mpo_max_bonds,
)
from tnexp.tn.timing import TIMED_CHOICES, fastest_path, input_key, timing_allowed

ContractionOrder = Literal["auto", "dense", "left_to_right", "right_to_left", "optimal"]
CONTRACTION_ORDERS: tuple[str, ...] = ("auto", "dense", "left_to_right", "right_to_left", "optimal")
# A calibrated ``auto`` times only orders within this factor of the fewest FLOPs (the FLOP
# model is off by well under this; the rest would only lengthen the first call).
TIMED_FLOP_RATIO = 8.0


def is_hf_conv1d(layer: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2), whose weight is stored as ``(in, out)``."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but keep tnexp.tn importable alone
        return False
    return isinstance(layer, Conv1D)


def linear_weight_in_out(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as an ``(in, out)`` matrix, for ``nn.Linear`` and HF ``Conv1D``."""
    if isinstance(layer, nn.Linear):
        return layer.weight.detach().t()
    if is_hf_conv1d(layer):
        return layer.weight.detach()
    raise TensorizationError(
        f"MPOLinear replaces nn.Linear or transformers' Conv1D, not {type(layer).__name__}. "
        "Use a Tucker rule for convolutions or exclude this module."
    )


class ContractionPlanner:
    """Chooses and caches the contraction order of input and MPO cores per input shape.

    Candidate orders are costed in FLOPs by opt_einsum on the real shapes: ``dense``
    (contract the cores into the weight, then one GEMM), ``left_to_right`` and
    ``right_to_left`` (the input meets one core at a time) and ``optimal`` (opt_einsum's
    best pairwise order). ``auto`` runs the cheapest; the choice is cached per token count.
    """

    def __init__(self, in_factors: Sequence[int], out_factors: Sequence[int], bonds: Sequence[int]):
        self.in_factors = list(in_factors)
        self.out_factors = list(out_factors)
        self.bonds = [1, *bonds, 1]
        n = len(self.in_factors)
        letters = iter(string.ascii_letters)
        self._batch = next(letters)
        in_l = [next(letters) for _ in range(n)]
        out_l = [next(letters) for _ in range(n)]
        bond_l = [next(letters) for _ in range(n + 1)]
        self._core_terms = [bond_l[k] + in_l[k] + out_l[k] + bond_l[k + 1] for k in range(n)]
        self._input_term = self._batch + "".join(in_l)
        self._output_term = self._batch + "".join(out_l)
        # Rebuilding the weight directly in (in..., out...) order avoids a permute copy.
        self._weight_term = "".join(in_l) + "".join(out_l)
        self._core_shapes = [
            (self.bonds[k], self.in_factors[k], self.out_factors[k], self.bonds[k + 1])
            for k in range(n)
        ]
        weight_eq = ",".join(self._core_terms) + "->" + self._weight_term
        self.weight_expr = opt_einsum.contract_expression(
            weight_eq, *self._core_shapes, optimize="optimal" if n <= 6 else "dp"
        )
        self.weight_flops = (
            opt_einsum.contract_path(
                weight_eq, *self._core_shapes, shapes=True, optimize="optimal" if n <= 6 else "dp"
            )[1].opt_cost
            if n > 1
            else 0
        )
        self._cache: OrderedDict[tuple[int, str], tuple[str, object, int]] = OrderedDict()

    @property
    def num_sites(self) -> int:
        return len(self.in_factors)

    def _input_equation(self) -> str:
        return ",".join([self._input_term, *self._core_terms]) + "->" + self._output_term

    def _explicit_path(self, order: str) -> list[tuple[int, int]]:
        n = self.num_sites
        # opt_einsum appends every intermediate at the end of the operand list.
        if order == "left_to_right":  # operands: x, G1..GN; contract x with G1, then G2, ...
            return [(0, 1)] + [(0, n - k) for k in range(1, n)]
        # right_to_left: x with GN first, then G_{N-1}, ...
        return [(0, n)] + [(n - 1 - k, n - k) for k in range(1, n)]

    def costs(self, tokens: int) -> dict[str, int]:
        """FLOPs of every forced order for ``tokens`` input rows."""
        in_dim, out_dim = math.prod(self.in_factors), math.prod(self.out_factors)
        shapes = [(tokens, *self.in_factors), *self._core_shapes]
        eq = self._input_equation()
        result = {"dense": self.weight_flops + 2 * tokens * in_dim * out_dim}
        for order in ("left_to_right", "right_to_left"):
            path = self._explicit_path(order)
            result[order] = opt_einsum.contract_path(eq, *shapes, shapes=True, optimize=path)[
                1
            ].opt_cost
        optimal = "optimal" if self.num_sites <= 4 else "dp"
        result["optimal"] = opt_einsum.contract_path(eq, *shapes, shapes=True, optimize=optimal)[
            1
        ].opt_cost
        return result

    def memory_elements(self, tokens: int, order: str, *, grad: bool = True) -> int:
        """Elements the intermediates of ``order`` hold for ``tokens`` input rows.

        With ``grad`` autograd keeps every intermediate for the backward pass (their sum);
        without, only the largest one is alive at a time.
        """
        in_dim, out_dim = math.prod(self.in_factors), math.prod(self.out_factors)
        if order == "dense":
            return in_dim * out_dim + tokens * out_dim
        shapes = [(tokens, *self.in_factors), *self._core_shapes]
        optimize = (
            self._explicit_path(order)
            if order in ("left_to_right", "right_to_left")
            else ("optimal" if self.num_sites <= 4 else "dp")
        )
        info = opt_einsum.contract_path(
            self._input_equation(), *shapes, shapes=True, optimize=optimize
        )[1]
        return int(sum(info.size_list)) if grad else int(info.largest_intermediate)

    def auto_order(self, tokens: int) -> str:
        """The order ``auto`` runs for ``tokens`` input rows (fewest FLOPs)."""
        costs = self.costs(tokens)
        return min(costs, key=costs.__getitem__)

    def plan(self, tokens: int, order: str) -> tuple[str, object]:
        """Return ``(resolved_order, expression_or_None)`` for this token count."""
        key = (tokens, order)
        if key in self._cache:
            self._cache.move_to_end(key)
            resolved, expr, _ = self._cache[key]
            return resolved, expr
        costs = self.costs(tokens)
        resolved = min(costs, key=costs.__getitem__) if order == "auto" else order
        expr = None
        if resolved != "dense":
            shapes = [(tokens, *self.in_factors), *self._core_shapes]
            optimize = (
                self._explicit_path(resolved)
                if resolved in ("left_to_right", "right_to_left")
                else ("optimal" if self.num_sites <= 4 else "dp")
            )
            expr = opt_einsum.contract_expression(
                self._input_equation(), *shapes, optimize=optimize
            )
        self._cache[key] = (resolved, expr, costs[resolved])
        if len(self._cache) > 128:  # sequence lengths vary; keep the cache bounded
            self._cache.popitem(last=False)
        return resolved, expr


class MPOLinear(nn.Module):
    """A linear layer whose weight is a matrix product operator.

    Build one from a dense layer with :meth:`from_linear`. Works as a drop-in replacement
    for ``nn.Linear`` and for transformers' ``Conv1D`` (``to_dense`` returns the weight in
    the replaced layer's own layout).
    """

    def __init__(
        self,
        in_factors: Sequence[int],
        out_factors: Sequence[int],
        bond_dim: int,
        *,
        bias: bool = True,
        weight_layout: Literal["linear", "conv1d"] = "linear",
        contraction: str = "auto",
        calibrate: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if len(in_factors) != len(out_factors) or len(in_factors) < 1:
            raise TensorizationError(
                f"in_factors {list(in_factors)} and out_factors {list(out_factors)} must have "
                "the same number of sites (>= 1)."
            )
        if bond_dim < 1:
            raise TensorizationError(f"bond_dim must be >= 1, got {bond_dim}.")
        self.in_factors = [int(f) for f in in_factors]
        self.out_factors = [int(f) for f in out_factors]
        self.in_features = math.prod(self.in_factors)
        self.out_features = math.prod(self.out_factors)
        self.bond_dim = int(bond_dim)
        self.bonds = mpo_bonds(self.in_factors, self.out_factors, self.bond_dim)
        self.weight_layout = weight_layout
        self.contraction = contraction
        # auto by timing once per (tokens, dtype, device, grad) instead of by FLOPs.
        self.calibrate = bool(calibrate)
        full = [1, *self.bonds, 1]
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(full[k], i, o, full[k + 1], device=device, dtype=dtype))
            for k, (i, o) in enumerate(zip(self.in_factors, self.out_factors, strict=True))
        )
        self.bias = (
            nn.Parameter(torch.zeros(self.out_features, device=device, dtype=dtype))
            if bias
            else None
        )
        self.register_buffer("merged_weight", None, persistent=False)
        self._planner = ContractionPlanner(self.in_factors, self.out_factors, self.bonds)
        self.last_order: str | None = None
        # Bytes a forced contraction order may use for its intermediates (None: the free
        # memory of the input's device, measured when a new input size is first planned).
        self.memory_budget: int | None = None
        self._memory_checked: set[tuple[int, str, bool]] = set()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(
        cls,
        layer: nn.Module,
        *,
        cr: float | None = None,
        bond_dim: int | None = None,
        num_sites: int = 2,
        in_factors: Sequence[int] | None = None,
        out_factors: Sequence[int] | None = None,
        init: Literal["svd", "random"] = "svd",
        contraction: str = "auto",
        calibrate: bool = False,
        name: str = "linear",
    ) -> MPOLinear:
        """Replace ``nn.Linear`` / HF ``Conv1D`` by an MPO at a CR or an explicit bond dimension.

        ``init="svd"`` runs the paper's algorithm 1 (sequential truncated SVD of the
        pretrained weight, in float64); ``init="random"`` draws cores whose product has the
        dense weight's variance, so the output variance of the layer is kept.
        """
        weight = linear_weight_in_out(layer)
        in_dim, out_dim = weight.shape
        if in_factors is not None:
            num_sites = len(in_factors)
        elif out_factors is not None:
            num_sites = len(out_factors)
        in_factors = (
            check_factors(in_dim, in_factors, what=f"{name}: input")
            if in_factors is not None
            else balanced_factors(in_dim, num_sites)
        )
        out_factors = (
            check_factors(out_dim, out_factors, what=f"{name}: output")
            if out_factors is not None
            else balanced_factors(out_dim, num_sites)
        )
        if len(in_factors) != len(out_factors):
            raise TensorizationError(
                f"{name}: in_factors {in_factors} and out_factors {out_factors} differ in length."
            )
        if (cr is None) == (bond_dim is None):
            raise TensorizationError(f"{name}: give exactly one of cr= or bond_dim=.")
        if bond_dim is None:
            bond_dim = mpo_bond_dim_for_cr(in_factors, out_factors, cr, name=name)
        elif bond_dim < 1:
            raise TensorizationError(f"{name}: bond_dim must be >= 1, got {bond_dim}.")
        elif bond_dim > max(mpo_max_bonds(in_factors, out_factors), default=1):
            raise TensorizationError(
                f"{name}: bond_dim {bond_dim} exceeds the largest useful bond "
                f"{max(mpo_max_bonds(in_factors, out_factors))} for factors in={in_factors} "
                f"out={out_factors}. Use a bond dimension <= that value."
            )
        layout = "conv1d" if is_hf_conv1d(layer) else "linear"
        has_bias = getattr(layer, "bias", None) is not None
        mpo = cls(
            in_factors,
            out_factors,
            bond_dim,
            bias=has_bias,
            weight_layout=layout,
            contraction=contraction,
            calibrate=calibrate,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            if init == "svd":
                cores = mpo_svd(weight, in_factors, out_factors, mpo.bonds)
            elif init == "random":
                cores = mpo_random(weight, in_factors, out_factors, mpo.bonds)
            else:
                raise TensorizationError(f"{name}: init must be 'svd' or 'random', got {init!r}.")
            for param, core in zip(mpo.cores, cores, strict=True):
                param.copy_(core)
            if has_bias:
                mpo.bias.copy_(layer.bias.detach())
        return mpo

    @classmethod
    def empty_like(
        cls,
        layer: nn.Module,
        *,
        bond_dim: int,
        in_factors: Sequence[int],
        out_factors: Sequence[int],
        contraction: str = "auto",
        calibrate: bool = False,
    ) -> MPOLinear:
        """An uninitialised MPO shaped to replace ``layer`` (bias copied); fill with set_cores.

        Draws no random numbers, so data-aware inits leave the RNG stream untouched.
        """
        weight = linear_weight_in_out(layer)
        has_bias = getattr(layer, "bias", None) is not None
        mpo = cls(
            check_factors(weight.shape[0], in_factors, what="input"),
            check_factors(weight.shape[1], out_factors, what="output"),
            bond_dim,
            bias=has_bias,
            weight_layout="conv1d" if is_hf_conv1d(layer) else "linear",
            contraction=contraction,
            calibrate=calibrate,
            device=weight.device,
            dtype=weight.dtype,
        )
        if has_bias:
            with torch.no_grad():
                mpo.bias.copy_(layer.bias.detach())
        return mpo

    @torch.no_grad()
    def set_cores(self, cores: Sequence[torch.Tensor]) -> None:
        """Load cores ``(D_{k-1}, i_k, o_k, D_k)`` (cast to this layer's dtype and device)."""
        if len(cores) != len(self.cores):
            raise TensorizationError(f"expected {len(self.cores)} cores, got {len(cores)}.")
        for param, core in zip(self.cores, cores, strict=True):
            if tuple(param.shape) != tuple(core.shape):
                raise TensorizationError(
                    f"core shape {tuple(core.shape)} does not fit {tuple(param.shape)}."
                )
            param.copy_(core)

    # ------------------------------------------------------------------ weights
    def weight_in_out(self) -> torch.Tensor:
        """The dense ``(in, out)`` weight represented by the cores (differentiable)."""
        if len(self.cores) == 2:
            # Two sites: one GEMM over the bond, then one permute copy. 5-10% quicker
            # fwd+bwd than opt_einsum's tensordot path (docs/benchmarks.md, peer baseline).
            first, second = self.cores
            bond = first.shape[-1]
            (i1, i2), (o1, o2) = self.in_factors, self.out_factors
            pairs = first.reshape(-1, bond) @ second.reshape(bond, -1)  # (i1 o1, i2 o2)
            dense = pairs.reshape(i1, o1, i2, o2).permute(0, 2, 1, 3)
            return dense.reshape(self.in_features, self.out_features)
        dense = self._planner.weight_expr(*self.cores, backend="torch")
        return dense.reshape(self.in_features, self.out_features)

    def to_dense(self) -> torch.Tensor:
        """Reconstructed weight in the replaced layer's layout (``(out, in)`` for nn.Linear)."""
        weight = self.weight_in_out()
        return weight if self.weight_layout == "conv1d" else weight.t()

    @torch.no_grad()
    def merge_for_inference(self) -> None:
        """Store the dense weight so inference costs one GEMM; :meth:`unmerge` before training."""
        self.merged_weight = self.weight_in_out().detach().contiguous()

    def unmerge(self) -> None:
        self.merged_weight = None

    # ------------------------------------------------------------------ forward
    def contraction_costs(self, tokens: int) -> dict[str, int]:
        """FLOPs of each contraction order for ``tokens`` input rows (for inspection)."""
        return self._planner.costs(tokens)

    def forward(self, x: torch.Tensor, order: str | None = None) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"MPOLinear expects inputs with last dimension {self.in_features}, got "
                f"shape {tuple(x.shape)}."
            )
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        if self.merged_weight is not None:
            if self.training and torch.is_grad_enabled():
                raise RuntimeError(
                    "MPOLinear is merged for inference; call unmerge() before training it."
                )
            out = self._gemm(flat, self.merged_weight)
            self.last_order = "merged"
            return out.reshape(*lead, self.out_features)
        order = order or self.contraction
        if order != "auto":
            self._check_memory(flat, order)
        elif self.calibrate:
            order = self._timed_order(flat)
        out, self.last_order = self._contract(flat, order)
        return out.reshape(*lead, self.out_features)

    def _contract(self, flat: torch.Tensor, order: str) -> tuple[torch.Tensor, str]:
        """``flat @ W + b`` in ``order`` (``auto``: by FLOPs); returns the order it ran."""
        resolved, expr = self._planner.plan(flat.shape[0], order)
        if resolved == "dense":
            return self._gemm(flat, self.weight_in_out()), resolved
        out = expr(flat.reshape(-1, *self.in_factors), *self.cores, backend="torch")
        out = out.reshape(-1, self.out_features)
        if self.bias is not None:
            out = out + self.bias
        return out, resolved

    def _timed_order(self, flat: torch.Tensor) -> str:
        """The quickest plausible order for this many tokens, timed once and cached."""
        grad = torch.is_grad_enabled() and (
            flat.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        tokens = flat.shape[0]
        key = (self._signature(), input_key(flat, tokens, grad))
        cached = TIMED_CHOICES.get(key)
        if cached is not None:
            return cached
        by_flops = self._planner.plan(tokens, "auto")[0]
        if not timing_allowed(flat):
            return by_flops  # not cached as timed
        costs = self._planner.costs(tokens)
        cheapest = float(min(costs.values()))
        budget = self.memory_budget if self.memory_budget is not None else free_memory(flat)
        candidates = [
            o
            for o, cost in costs.items()
            if float(cost) <= TIMED_FLOP_RATIO * cheapest
            and (
                budget is None
                or self._planner.memory_elements(tokens, o, grad=grad) * flat.element_size()
                <= budget
            )
        ] or [min(costs, key=costs.__getitem__)]
        paths = {o: (lambda t, o=o: self._contract(t, o)[0]) for o in candidates}
        params = list(self.parameters())
        order, _ = fastest_path(paths, flat, params, grad=grad, prefer=by_flops)
        TIMED_CHOICES.put(key, order)
        return order

    def _signature(self) -> tuple:
        """What the orders' speed depends on besides the input (shared timing cache)."""
        return (
            type(self).__name__,
            tuple(self.in_factors),
            tuple(self.out_factors),
            tuple(self.bonds),
            self.bias is not None,
        )

    def timed_orders(self) -> dict[tuple, str]:
        """The timed order per (tokens, dtype, device, grad) for MPO layers of this shape."""
        return TIMED_CHOICES.items_for(self._signature())

    def _check_memory(self, flat: torch.Tensor, order: str) -> None:
        """Refuse a forced order whose intermediates would not fit (once per input size)."""
        grad = torch.is_grad_enabled() and any(c.requires_grad for c in self.cores)
        key = (flat.shape[0], order, grad)
        if key in self._memory_checked:
            return
        budget = self.memory_budget if self.memory_budget is not None else free_memory(flat)
        tokens, itemsize = flat.shape[0], flat.element_size()
        need = self._planner.memory_elements(tokens, order, grad=grad) * itemsize
        if budget is not None and need > budget:
            auto = self._planner.auto_order(tokens)
            auto_need = self._planner.memory_elements(tokens, auto, grad=grad) * itemsize
            raise TensorizationError(
                f"contraction order {order!r} for {tokens} input rows of this MPO layer "
                f"({self.in_features}->{self.out_features}, bonds {self.bonds}) needs about "
                f"{_gib(need)} for its intermediates{' (kept for backward)' if grad else ''}, "
                f"but only {_gib(budget)} is free on {flat.device}. The auto order here is "
                f"{auto!r} (about {_gib(auto_need)}): set contraction: auto, or use fewer "
                "tokens per batch."
            )
        if len(self._memory_checked) > 256:  # sequence lengths vary; keep it bounded
            self._memory_checked.clear()
        self._memory_checked.add(key)

    def _gemm(self, flat: torch.Tensor, weight_in_out: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return flat @ weight_in_out
        return torch.addmm(self.bias, flat, weight_in_out)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features} ({'x'.join(map(str, self.in_factors))}), "
            f"out={self.out_features} ({'x'.join(map(str, self.out_factors))}), "
            f"bonds={self.bonds}, bias={self.bias is not None}, contraction={self.contraction}"
            + (" (timed)" if self.calibrate and self.contraction == "auto" else "")
        )


def free_memory(x: torch.Tensor) -> int | None:
    """Free bytes on ``x``'s device (CUDA: the allocator's view; CPU: available RAM)."""
    try:
        if x.device.type == "cuda":
            free = torch.cuda.mem_get_info(x.device)[0]
            # Memory PyTorch's allocator holds but does not use is free for this too.
            cached = torch.cuda.memory_reserved(x.device) - torch.cuda.memory_allocated(x.device)
            return int(free + cached)
        if x.device.type == "cpu":
            import psutil

            return int(psutil.virtual_memory().available)
    except (ImportError, RuntimeError):  # no estimate: do not guess
        return None
    return None


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.2f} GiB"


def site_major(
    weight_in_out: torch.Tensor, in_factors: Sequence[int], out_factors: Sequence[int]
) -> torch.Tensor:
    """Reshape an (in, out) matrix to (i1, o1, i2, o2, ...): the MPO's site order.

    Its unfolding ``(prod sites <= k, prod sites > k)`` is the matrix whose rank bounds
    bond ``k`` (sequential SVD here, bond spectra in :mod:`tnexp.analysis`).
    """
    n = len(in_factors)
    t = weight_in_out.reshape(*in_factors, *out_factors)
    perm = [p for k in range(n) for p in (k, n + k)]
    return t.permute(*perm)


@torch.no_grad()
def mpo_svd(
    weight_in_out: torch.Tensor,
    in_factors: Sequence[int],
    out_factors: Sequence[int],
    bonds: Sequence[int],
) -> list[torch.Tensor]:
    """Paper algorithm 1: sequential truncated SVDs, left to right.

    Returns cores of shape ``(D_{k-1}, i_k, o_k, D_k)``; the singular values are carried
    to the right, so the last core holds the scale (as in the paper). Each unfolding is
    truncated through its Gram matrix's leading eigenvectors in float64
    (:func:`tnexp.tn.linalg.truncated_split`; docs/benchmarks.md, "MPO SVD init").
    """
    in_factors, out_factors = list(in_factors), list(out_factors)
    dtype = weight_in_out.dtype
    rest = site_major(weight_in_out.double(), in_factors, out_factors)
    cores = []
    left = 1
    for k, bond in enumerate(bonds):
        site = in_factors[k] * out_factors[k]
        u, rest = truncated_split(rest.reshape(left * site, -1), bond)
        cores.append(u.reshape(left, in_factors[k], out_factors[k], bond))
        left = bond
    cores.append(rest.reshape(left, in_factors[-1], out_factors[-1], 1))
    return [c.to(dtype).contiguous() for c in cores]


@torch.no_grad()
def mpo_random(
    weight_in_out: torch.Tensor,
    in_factors: Sequence[int],
    out_factors: Sequence[int],
    bonds: Sequence[int],
) -> list[torch.Tensor]:
    """Gaussian cores whose contracted weight has the dense weight's entry variance.

    An entry of the product is a sum over ``prod(D_k)`` products of one entry per core, so
    with core variances ``s_k^2`` its variance is ``prod(s_k^2) * prod(D_k)``; each core gets
    the N-th root of ``var(W) / prod(D_k)``.
    """
    target_var = float(weight_in_out.double().var()) or 1.0 / weight_in_out.shape[0]
    n = len(in_factors)
    per_core_std = (target_var / math.prod(bonds)) ** (1.0 / (2 * n))
    full = [1, *bonds, 1]
    return [
        torch.randn(
            full[k], i, o, full[k + 1], dtype=weight_in_out.dtype, device=weight_in_out.device
        )
        * per_core_std
        for k, (i, o) in enumerate(zip(in_factors, out_factors, strict=True))
    ]
