"""Token-level perplexity of a causal LM over a long token stream (sliding window).

The standard Hugging Face method (``docs/transformers/perplexity``): windows of
``max_length`` tokens start every ``stride`` tokens; each window scores only the tokens
that no earlier window scored, and the tokens before them serve as context (labels
-100). ``stride == max_length`` gives disjoint windows (fast, less context);
``stride < max_length`` gives every scored token at least ``max_length - stride``
tokens of context. The first token of the stream has no context and is never scored,
and neither is the first token of each disjoint window, exactly as in the HF recipe.

This is *token* perplexity in the model's own tokenization; lm-eval's wikitext/c4
figures are *word* perplexities and are not comparable with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["sliding_window_perplexity", "sliding_windows"]


def sliding_windows(num_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` per window; labels ``first_scored..end-1`` are scored.

    Label position ``t`` means "predict token ``t`` from tokens ``begin..t-1``".
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    windows = []
    prev_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        # A window's first token has no context inside the window, so it cannot be scored.
        first = max(prev_end, begin + 1)
        if first < end:
            windows.append((begin, end, first))
        prev_end = end
        if end == num_tokens:
            break
    return windows


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def sliding_window_perplexity(
    model: nn.Module,
    token_ids: torch.Tensor | Sequence[int],
    *,
    max_length: int,
    stride: int,
    batch_size: int = 1,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Perplexity of ``model`` on one token stream with the sliding-window method.

    Args:
        model: a causal LM whose ``forward(input_ids=...)`` returns ``.logits``.
        token_ids: the 1-D token stream (tensor or list of ints).
        max_length: tokens per window (at most the model's context length).
        stride: tokens between window starts (``max_length`` = disjoint windows).
        batch_size: windows per forward pass (windows of equal length are batched).
        device: where to run; defaults to the model's device (the model is not moved).

    Returns:
        ``{"nll": mean NLL per scored token (nats), "nll_sum", "tokens": number of scored
        tokens, "ppl": exp(nll), "windows", "max_length", "stride"}``.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    if ids.numel() < 2:
        raise ValueError("need at least 2 tokens to compute a perplexity")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    windows = sliding_windows(ids.numel(), int(max_length), int(stride))
    run_device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    nll_sum = torch.zeros((), dtype=torch.float64)
    tokens = 0
    try:
        i = 0
        while i < len(windows):
            # Batch consecutive windows of the same length (all but possibly the last).
            length = windows[i][1] - windows[i][0]
            group = [windows[i]]
            while (
                len(group) < batch_size
                and i + len(group) < len(windows)
                and windows[i + len(group)][1] - windows[i + len(group)][0] == length
            ):
                group.append(windows[i + len(group)])
            i += len(group)
            inputs = torch.stack([ids[b:e] for b, e, _ in group]).to(run_device)
            labels = inputs.clone()
            for row, (begin, _, first) in enumerate(group):
                labels[row, : first - begin] = -100  # context only: not scored again
            logits = model(input_ids=inputs).logits
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()  # log-softmax over a large vocabulary needs fp32
            # Shift: logits at position t predict token t+1.
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            nll_sum += loss.double().cpu()
            tokens += int((labels[:, 1:] != -100).sum())
    finally:
        model.train(was_training)
    nll = float(nll_sum / tokens)
    return {
        "nll": nll,
        "nll_sum": float(nll_sum),
        "tokens": tokens,
        "ppl": float(torch.exp(torch.tensor(nll, dtype=torch.float64))),
        "windows": len(windows),
        "max_length": int(max_length),
        "stride": int(stride),
    }
