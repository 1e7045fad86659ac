"""Sliding-window perplexity checked against hand computations on a tiny GPT-2."""

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_lm import tiny_gpt2

from tnexp.eval import sliding_window_perplexity, sliding_windows

VOCAB = 97
N = 61  # not a multiple of the window sizes: the last window is shorter


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2(VOCAB, n_positions=32, seed=1).double()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (N,), generator=torch.Generator().manual_seed(0))


def test_disjoint_windows_are_the_token_weighted_mean_of_window_losses(model, ids):
    length = 16
    total, count = 0.0, 0
    with torch.no_grad():
        for begin in range(0, N, length):
            chunk = ids[begin : begin + length].unsqueeze(0)
            loss = model(chunk, labels=chunk).loss  # HF: mean over the chunk's len-1 targets
            total += float(loss) * (chunk.shape[1] - 1)
            count += chunk.shape[1] - 1
    result = sliding_window_perplexity(model, ids, max_length=length, stride=length)
    assert result["tokens"] == count == N - math.ceil(N / length)
    # HF's loss computes in float32 even for a float64 model.
    assert result["nll"] == pytest.approx(total / count, rel=1e-6)
    assert result["ppl"] == pytest.approx(math.exp(total / count), rel=1e-6)


def test_strided_windows_match_a_brute_force_loop(model, ids):
    max_length, stride = 16, 5
    # Brute force: the window that first reaches token t is the one that scores it, and
    # token t is predicted from the tokens between that window's start and t.
    nll, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, N, stride):
            end = min(begin + max_length, N)
            for t in range(max(prev_end, begin + 1), end):
                logits = model(ids[begin:t].unsqueeze(0)).logits[0, -1]
                nll -= float(F.log_softmax(logits, -1)[ids[t]])
                count += 1
            prev_end = end
            if end == N:
                break
    result = sliding_window_perplexity(model, ids.tolist(), max_length=max_length, stride=stride)
    assert count == result["tokens"] == N - 1  # every token but the first, exactly once
    assert result["nll"] == pytest.approx(nll / count, rel=1e-10)  # float64 throughout


def test_hf_recipe_with_labels_and_batching(model, ids):
    # The transformers docs' loop, with the model's own label handling.
    max_length, stride = 12, 7
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, N, stride):
            end = min(begin + max_length, N)
            trg_len = end - prev_end
            inputs = ids[begin:end].unsqueeze(0)
            target = inputs.clone()
            target[:, :-trg_len] = -100
            valid = int((target[:, 1:] != -100).sum())
            nll_sum += float(model(inputs, labels=target).loss) * valid
            n_tokens += valid
            prev_end = end
            if end == N:
                break
    single = sliding_window_perplexity(model, ids, max_length=max_length, stride=stride)
    batched = sliding_window_perplexity(
        model, ids, max_length=max_length, stride=stride, batch_size=3
    )
    assert single["tokens"] == batched["tokens"] == n_tokens
    assert single["nll"] == pytest.approx(nll_sum / n_tokens, rel=1e-6)
    assert batched["nll"] == pytest.approx(single["nll"], rel=1e-10)


def test_one_window_is_the_plain_model_loss(model, ids):
    with torch.no_grad():
        expected = float(model(ids[:30].unsqueeze(0), labels=ids[:30].unsqueeze(0)).loss)
    result = sliding_window_perplexity(model, ids[:30], max_length=32, stride=8)
    assert result["windows"] == 1 and result["tokens"] == 29
    assert result["nll"] == pytest.approx(expected, rel=1e-6)
    assert model.training is False


def test_windows_and_argument_errors(model):
    assert sliding_windows(10, 4, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    assert sliding_windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(10, 4, 5)
    with pytest.raises(ValueError, match="2 tokens"):
        sliding_window_perplexity(model, [3], max_length=4, stride=4)
