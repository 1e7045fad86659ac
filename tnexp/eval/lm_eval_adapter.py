"""lm-evaluation-harness on an in-memory model (dense or tensorized).

The model object is wrapped with ``lm_eval.models.huggingface.HFLM(pretrained=model,
tokenizer=tokenizer)``, so tensorized students are evaluated exactly as loaded, without
saving and re-loading. The paper's tasks are ``piqa``, ``lambada_openai``, ``wikitext``
and ``c4``; their data come from the hub (or the local HF datasets cache).

Results are flattened to ``"<task>/<metric>"`` with lm-eval's own metric names, e.g.
``lambada_openai/acc``, ``lambada_openai/perplexity`` (token-level on the last word),
``wikitext/word_perplexity``, ``c4/word_perplexity``. The wikitext/c4 figures are
*word* perplexities (the paper's "WikiText ppl" / "C4 ppl"); they are never renamed to a
plain ``ppl`` so they cannot be confused with tnexp's token perplexity.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["PAPER_TASKS", "evaluate_lm", "flatten_lm_eval_results"]

PAPER_TASKS = ("piqa", "lambada_openai", "wikitext", "c4")


def flatten_lm_eval_results(results: dict[str, Any]) -> dict[str, float]:
    """``simple_evaluate``'s ``results`` -> ``{"task/metric": value}`` (numbers only).

    lm-eval keys metrics as ``"metric,filter"``; the default filter ``none`` is dropped
    (``acc,none`` -> ``acc``), other filters are kept as ``metric@filter``. Stderr
    entries keep their names (``acc_stderr``); "N/A" values are skipped.
    """
    flat: dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if key == "alias" or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt in ("", "none") else f"{metric}@{filt}"
            flat[f"{task}/{name}"] = float(value)
    return flat


def evaluate_lm(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str | dict[str, Any]] = PAPER_TASKS,
    *,
    limit: int | float | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    num_fewshot: int | None = None,
    include_path: str | Path | Sequence[str | Path] | None = None,
    max_length: int | None = None,
    bootstrap_iters: int = 1000,
    random_seed: int = 0,
    return_raw: bool = False,
) -> dict[str, Any]:
    """Run lm-eval tasks on ``model`` and return flat metrics.

    Args:
        model: a Hugging Face ``PreTrainedModel`` (tensorized or not).
        tokenizer: its tokenizer (see :func:`tnexp.models.hf.load_tokenizer`).
        tasks: lm-eval task names (or inline task config dicts).
        limit: at most this many documents per task (a float < 1 is a fraction);
            lm-eval warns that limited results are not comparable with full runs.
        batch_size: requests per forward pass.
        device: the model is moved there first (HFLM uses the model's own device).
        num_fewshot: override the tasks' few-shot count.
        include_path: a directory (or list) of extra YAML task configs, registered with
            ``lm_eval.tasks.TaskManager(include_path=...)`` so custom tasks load by name.
        max_length: context length for lm-eval (default: from the model config).
        bootstrap_iters: bootstrap resamples for stderr (0 skips stderr, faster).
        random_seed: seeds lm-eval's Python/NumPy/torch/few-shot randomness.
        return_raw: also return lm-eval's full output under ``"raw"``.

    Returns:
        ``{"lambada_openai/acc": ..., "wikitext/word_perplexity": ..., ...}``, plus
        ``"raw"`` when ``return_raw``.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if device is not None:
        model = model.to(device)
    was_training = model.training
    model.eval()
    try:
        lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=batch_size,
            max_length=max_length,
        )
        paths = (
            None
            if include_path is None
            else [str(p) for p in include_path]
            if isinstance(include_path, list | tuple)
            else str(include_path)
        )
        task_manager = TaskManager(include_path=paths) if paths is not None else None
        output = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            bootstrap_iters=bootstrap_iters,
            task_manager=task_manager,
            log_samples=False,
            random_seed=random_seed,
            numpy_random_seed=random_seed,
            torch_random_seed=random_seed,
            fewshot_random_seed=random_seed,
        )
    finally:
        model.train(was_training)
    if output is None:  # only non-zero ranks of a distributed run get None
        return {}
    flat: dict[str, Any] = flatten_lm_eval_results(output)
    bad = [k for k, v in flat.items() if not math.isfinite(v) and "stderr" not in k]
    if bad:
        log.warning("non-finite lm-eval metrics: %s", bad)
    if return_raw:
        flat["raw"] = output
    return flat
