"""Evaluation: token perplexity (sliding window) and the lm-eval harness adapter."""

from tnexp.eval.lm_eval_adapter import PAPER_TASKS, evaluate_lm, flatten_lm_eval_results
from tnexp.eval.perplexity import sliding_window_perplexity, sliding_windows

__all__ = [
    "PAPER_TASKS",
    "evaluate_lm",
    "flatten_lm_eval_results",
    "sliding_window_perplexity",
    "sliding_windows",
]
