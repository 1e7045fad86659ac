"""Tensorization specs: which modules to replace and how (rules, exclusions, overall CR)."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tnexp.tn.datainit import (
    DEFAULT_DAMPING,
)
from tnexp.tn.errors import TensorizationError
from tnexp.tn.mpo import (
    CONTRACTION_ORDERS,
)
from tnexp.tn.ranks import (
    check_cr,
)
from tnexp.tn.tucker import TUCKER_ORDERS

METHODS = ("auto", "tucker", "mpo")
# svd: HOSVD (Tucker-2, paper eq. 13-15) / TT-SVD (MPO), the default: one pass, the
# paper's choice | hooi: HOSVD refined by alternating projections (Tucker-2 only; never a
# higher weight error) | random | whiten / als: data-aware (need input statistics).
INITS = ("svd", "hooi", "random", "whiten", "als")
DATA_INITS = ("whiten", "als")  # need input statistics of the teacher (tnexp.calibration)
LAYOUTS = ("balanced", "lowrank", "auto")
ALLOCATIONS = ("uniform", "adaptive")
# none: every output channel alike | fisher: output channels weighted by the teacher's
# diagonal output Fisher under the task loss (whitened low-rank layers and their ranks).
WEIGHTINGS = ("none", "fisher")


# =========================================================================== spec
@dataclass
class TensorizeRule:
    """Which modules to replace and how. ``pattern`` is a glob over module paths."""

    pattern: str
    method: str = "auto"  # tucker for Conv2d, mpo for Linear / Conv1D
    cr: float | None = None
    ranks: tuple[int, int] | None = None  # Tucker (r_out, r_in)
    bond_dim: int | None = None  # MPO
    num_sites: int = 2
    in_factors: list[int] | None = None
    out_factors: list[int] | None = None
    init: str = "svd"  # svd | hooi | random | whiten | als (the last two need input stats)
    layout: str = "balanced"  # MPO only: balanced | lowrank | auto

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise TensorizationError(
                f"rule {self.pattern!r}: method must be one of {METHODS}, got {self.method!r}."
            )
        if self.init not in INITS:
            raise TensorizationError(
                f"rule {self.pattern!r}: init must be one of {INITS}, got {self.init!r}."
            )
        if self.layout not in LAYOUTS:
            raise TensorizationError(
                f"rule {self.pattern!r}: layout must be one of {LAYOUTS}, got {self.layout!r}."
            )
        if self.layout != "balanced" and (self.in_factors or self.out_factors):
            raise TensorizationError(
                f"rule {self.pattern!r}: layout {self.layout!r} chooses the factors itself; "
                "remove in_factors/out_factors or use layout: balanced."
            )
        if self.layout != "balanced" and self.num_sites != 2:
            raise TensorizationError(
                f"rule {self.pattern!r}: layout {self.layout!r} is a 2-site MPO; remove "
                f"num_sites={self.num_sites} or use layout: balanced."
            )
        if self.cr is not None:
            self.cr = check_cr(self.cr, what=f"rule {self.pattern!r}: cr")
        if self.ranks is not None:
            self.ranks = tuple(int(r) for r in self.ranks)
        for attr in ("in_factors", "out_factors"):
            value = getattr(self, attr)
            if value is not None:
                setattr(self, attr, [int(v) for v in value])
        if sum(x is not None for x in (self.ranks, self.bond_dim)) > 1:
            raise TensorizationError(f"rule {self.pattern!r}: give ranks= or bond_dim=, not both.")
        if self.cr is not None and self.has_explicit_size:
            # Which one wins is not obvious, so neither is silently dropped.
            given = "ranks" if self.ranks is not None else "bond_dim"
            raise TensorizationError(
                f"rule {self.pattern!r}: cr={self.cr} and {given}= both set the layer size; "
                f"keep one of them (cr solves the {given} from the compression rate)."
            )

    @property
    def has_explicit_size(self) -> bool:
        return self.ranks is not None or self.bond_dim is not None


ORDER_TIMINGS: tuple[str, ...] = ("off", "tucker", "all")


@dataclass
class TensorizeSpec:
    """Rules (first match wins), exclusions, and an optional whole-model CR target.

    With ``overall_cr`` set, rules leave ``cr`` empty: one uniform per-layer CR is solved
    so that the whole model (every parameter, tensorized or not) loses ``overall_cr`` of
    its parameters.
    """

    rules: list[TensorizeRule]
    exclude: list[str] = field(default_factory=list)
    overall_cr: float | None = None
    contraction: str = "auto"
    # TuckerConv2d path: auto (per input shape) | factored (1x1 -> kxk -> 1x1) | merged
    # (one conv with the kernel rebuilt from the factors).
    tucker_order: str = "auto"
    # Which auto choices are timed once per input shape instead of taken from FLOPs:
    # tucker (default) | all (Tucker and the MPO contraction order) | off.
    order_timing: str = "off"
    # uniform: one per-layer CR; adaptive: per-layer ranks that minimise the summed
    # relative output error under the overall_cr budget (2-site MPO layers).
    allocation: str = "uniform"
    # none | fisher: whitened truncations minimise the output error weighted by the
    # teacher's output Fisher, and adaptive ranks compare layers by estimated loss increase
    # (needs calibration.fisher_batches > 0; docs/data_aware.md).
    weighting: str = "none"
    damping: float = DEFAULT_DAMPING  # of the input Gram, relative to its mean diagonal
    als_sweeps: int = 4
    als_tol: float = 1e-4

    def __post_init__(self) -> None:
        self.rules = [rule_from_config(r, i) for i, r in enumerate(self.rules)]
        self.exclude = [str(e) for e in self.exclude]
        if not self.rules:
            raise TensorizationError("a tensorization spec needs at least one rule.")
        if self.allocation not in ALLOCATIONS:
            raise TensorizationError(
                f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}."
            )
        if self.weighting not in WEIGHTINGS:
            raise TensorizationError(
                f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}."
            )
        if self.allocation == "adaptive" and self.overall_cr is None:
            raise TensorizationError(
                "allocation adaptive distributes an overall_cr budget across layers; set "
                "overall_cr (and no per-rule cr) or use allocation: uniform."
            )
        if not 0.0 <= float(self.damping) < 1e3:
            raise TensorizationError(f"damping must be >= 0, got {self.damping}.")
        if int(self.als_sweeps) < 1:
            raise TensorizationError(f"als_sweeps must be >= 1, got {self.als_sweeps}.")
        if self.contraction not in CONTRACTION_ORDERS:
            raise TensorizationError(
                f"contraction must be one of {CONTRACTION_ORDERS}, got {self.contraction!r}."
            )
        if self.tucker_order not in TUCKER_ORDERS:
            raise TensorizationError(
                f"tucker_order must be one of {TUCKER_ORDERS}, got {self.tucker_order!r}."
            )
        if self.order_timing not in ORDER_TIMINGS:
            raise TensorizationError(
                f"order_timing must be one of {ORDER_TIMINGS}, got {self.order_timing!r} "
                "(tucker: time TuckerConv2d's auto path; all: also the MPO order; off: FLOPs)."
            )
        if self.overall_cr is not None:
            self.overall_cr = check_cr(self.overall_cr, what="overall_cr")
            given = [r.pattern for r in self.rules if r.cr is not None]
            if given:
                raise TensorizationError(
                    f"overall_cr is set, so the per-layer CR is solved; remove cr from rules "
                    f"{given}."
                )
        else:
            missing = [r.pattern for r in self.rules if r.cr is None and not r.has_explicit_size]
            if missing:
                raise TensorizationError(
                    f"rules {missing} give neither cr, ranks nor bond_dim; set one of them or "
                    "set overall_cr for the whole model."
                )

    @classmethod
    def from_config(cls, cfg: Any) -> TensorizeSpec:
        """Build from a dict or an OmegaConf/Hydra config (``rules``, ``exclude``, ...)."""
        if isinstance(cfg, TensorizeSpec):
            return cfg
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:  # pragma: no cover - omegaconf ships with hydra
            pass
        if not isinstance(cfg, Mapping):
            raise TensorizationError(f"a tensorization spec must be a mapping, got {type(cfg)}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(cfg) - known - {"_target_"}
        if unknown:
            raise TensorizationError(
                f"unknown tensorization spec keys {sorted(unknown)}; known: {sorted(known)}."
            )
        if not isinstance(cfg.get("rules"), Sequence) or isinstance(cfg.get("rules"), str):
            raise TensorizationError(
                f"a tensorization spec needs a list of rules, got rules={cfg.get('rules')!r}; "
                "e.g. rules: [{pattern: 'layer*.*.conv*', cr: 0.5}]."
            )
        rules = [rule_from_config(r, i) for i, r in enumerate(cfg["rules"])]
        return cls(**{**{k: v for k, v in cfg.items() if k in known}, "rules": rules})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def rule_from_config(rule: Any, index: int = 0) -> TensorizeRule:
    """A :class:`TensorizeRule` from a mapping, refusing unknown keys and a missing pattern.

    Errors name the rule (its index and pattern) and list the keys a rule may have.
    """
    if isinstance(rule, TensorizeRule):
        return rule
    if not isinstance(rule, Mapping):
        raise TensorizationError(
            f"rule {index} must be a mapping such as {{pattern: 'layer*.*.conv*', cr: 0.5}}, "
            f"got {rule!r}."
        )
    known = [f.name for f in dataclasses.fields(TensorizeRule)]
    pattern = rule.get("pattern")
    label = f"rule {index} ({pattern!r})" if isinstance(pattern, str) else f"rule {index}"
    unknown = [k for k in rule if k not in known]
    if unknown:
        close = {k: difflib.get_close_matches(str(k), known, n=1) for k in unknown}
        hints = "; ".join(f"{k!r}: did you mean {c[0]!r}?" for k, c in close.items() if c)
        raise TensorizationError(
            f"{label}: unknown key(s) {unknown}{' (' + hints + ')' if hints else ''}. A rule "
            f"takes {known}."
        )
    if not isinstance(pattern, str) or not pattern or pattern.lower() in ("none", "null"):
        raise TensorizationError(
            f"{label}: pattern is missing or empty (got {pattern!r}); give a glob over module "
            "paths, e.g. pattern: 'layer*.*.conv*' or 'transformer.h.*.mlp.c_fc'."
        )
    try:
        return TensorizeRule(**dict(rule))
    except TensorizationError:
        raise
    except (TypeError, ValueError) as err:  # e.g. ranks: 3 or cr: "half"
        raise TensorizationError(
            f"{label}: {err}. Check the value types: cr a float in (0, 1), ranks [r_out, "
            "r_in], bond_dim an int, in_factors/out_factors lists of ints."
        ) from None
