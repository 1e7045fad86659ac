"""Evaluations outside the fit loop: the student before recovery, LM perplexity, lm-eval."""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig

from tnexp.eval import evaluate_lm, sliding_window_perplexity
from tnexp.features import to_device
from tnexp.stages.build import Task, is_language_model

log = logging.getLogger("tnexp")

__all__ = ["evaluate_classification", "evaluate_language_model"]


def _eval_device(cfg: DictConfig, model: torch.nn.Module) -> torch.device:
    device = next(model.parameters()).device
    if torch.cuda.is_available() and device.type == "cpu" and cfg.trainer.accelerator != "cpu":
        device = torch.device("cuda")
    return device


def _val_batches(limit: Any, available: int) -> int:
    """Lightning's ``limit_val_batches``: None or 1.0 all, a float a fraction, an int a count."""
    if limit is None or (isinstance(limit, float) and limit == 1.0):
        return available
    if isinstance(limit, float):
        return int(available * limit)
    return min(int(limit), available)


def evaluate_classification(
    cfg: DictConfig, datamodule: Any, model: torch.nn.Module, task: Task
) -> dict[str, float]:
    """Validation metrics of ``model`` on the batches the fit loop validates on.

    Run on the freshly tensorized student: the accuracy right after tensorization, before
    any recovery (``metrics.before`` in results.json, time 0 of the accuracy-vs-time plots).
    """
    if is_language_model(cfg) or not cfg.eval.classification.before_training:
        return {}
    datamodule.setup("validate")
    loader = datamodule.val_dataloader()
    batches = _val_batches(cfg.trainer.get("limit_val_batches"), len(loader))
    home = next(model.parameters()).device
    device = _eval_device(cfg, model)
    was_training = model.training
    model.to(device).eval()
    metrics = task.make_metrics().to(device)
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i >= batches:
                break
            batch = to_device(batch, device)
            outputs = task.forward(model, batch)
            task.update_metrics(metrics, outputs, batch, task.loss(outputs, batch))
    model.to(home).train(was_training)
    values = {f"val/{k}": v for k, v in task.finalize(metrics.compute()).items()}
    log.info("before recovery: %s", ", ".join(f"{k} {v:.2f}" for k, v in values.items()))
    return values


def evaluate_language_model(
    cfg: DictConfig, datamodule: Any, model: torch.nn.Module, when: str
) -> dict[str, Any]:
    """Token perplexity (sliding window) and, if enabled, lm-eval tasks, for LM stages.

    ``when`` is ``before_training`` (the student as tensorized), ``final`` or ``teacher``.
    lm-eval runs only on the final student (and the teacher), never before training.
    """
    if not is_language_model(cfg):
        return {}
    ev = cfg.eval
    if when == "before_training" and not ev.perplexity.before_training:
        return {}
    if when == "teacher" and not ev.perplexity.teacher:
        return {}
    datamodule.setup("validate")
    device = _eval_device(cfg, model)
    results: dict[str, Any] = {}
    if ev.perplexity.enabled:
        tokens = datamodule.val_tokens
        if ev.perplexity.max_tokens:
            tokens = tokens[: int(ev.perplexity.max_tokens)]
        max_length = int(ev.perplexity.max_length or cfg.data.seq_len)
        stride = int(ev.perplexity.stride or max(1, max_length // 2))
        was_training = model.training
        model.eval()
        ppl = sliding_window_perplexity(
            model, tokens, max_length=max_length, stride=stride, device=device
        )
        model.train(was_training)
        results["token_ppl"] = float(ppl["ppl"])
        results["token_nll"] = float(ppl["nll"])
        results["ppl_tokens"] = int(ppl["tokens"])
        log.info("%s token perplexity: %.3f", when, results["token_ppl"])
    if ev.lm_eval.enabled and when != "before_training":
        try:
            scores = evaluate_lm(
                model,
                datamodule.tokenizer,
                tasks=list(ev.lm_eval.tasks),
                limit=ev.lm_eval.limit,
                batch_size=int(ev.lm_eval.batch_size),
                num_fewshot=ev.lm_eval.num_fewshot,
                include_path=ev.lm_eval.include_path,
                device=str(device),
            )
        except Exception as err:  # lm-eval needs datasets that may not be reachable
            raise RuntimeError(
                f"lm-eval failed ({err}). Its tasks need the HF hub or a local datasets "
                "cache; set eval.lm_eval.enabled=false or point HF_DATASETS_CACHE at one."
            ) from err
        results.update({f"lm_eval/{k}": v for k, v in scores.items()})
    return results
