"""The one tensorized-model factory.

``tensorize(model, spec)`` returns a tensorized deep copy of ``model`` (the teacher is never
modified) and a :class:`TensorizeReport`. Every training method in tnexp builds its student
through this function, and ``load_tensorized`` rebuilds a saved student through it too.

The package: :mod:`~tnexp.factory.spec` (rules and specs), :mod:`~tnexp.factory.patterns`
(module-path globs), :mod:`~tnexp.factory.planning` (selection and sizes),
:mod:`~tnexp.factory.build` (decomposition, data-free and data-aware),
:mod:`~tnexp.factory.report` and :mod:`~tnexp.factory.saving`.
"""

from tnexp.factory.build import (
    merge_for_inference,
    needs_input_stats,
    set_contraction,
    set_tucker_order,
    tensorize,
    tensorized_modules,
)
from tnexp.factory.patterns import compile_pattern, match_pattern
from tnexp.factory.planning import (
    count_parameters,
    lowrank_factors,
    plan_layers,
    solve_overall_cr,
    supported_kind,
)
from tnexp.factory.report import LayerReport, RuleMatch, TensorizeReport
from tnexp.factory.saving import SPEC_FILE, WEIGHTS_FILE, load_tensorized, save_tensorized
from tnexp.factory.spec import (
    ALLOCATIONS,
    DATA_INITS,
    INITS,
    LAYOUTS,
    METHODS,
    WEIGHTINGS,
    TensorizeRule,
    TensorizeSpec,
    rule_from_config,
)

__all__ = [
    "ALLOCATIONS",
    "DATA_INITS",
    "INITS",
    "LAYOUTS",
    "METHODS",
    "SPEC_FILE",
    "WEIGHTINGS",
    "WEIGHTS_FILE",
    "LayerReport",
    "RuleMatch",
    "TensorizeReport",
    "TensorizeRule",
    "TensorizeSpec",
    "compile_pattern",
    "count_parameters",
    "load_tensorized",
    "lowrank_factors",
    "match_pattern",
    "merge_for_inference",
    "needs_input_stats",
    "plan_layers",
    "rule_from_config",
    "save_tensorized",
    "set_contraction",
    "set_tucker_order",
    "solve_overall_cr",
    "supported_kind",
    "tensorize",
    "tensorized_modules",
]
