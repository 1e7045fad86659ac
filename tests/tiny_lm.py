"""A tiny GPT-2 and a BPE tokenizer trained on Python's own help texts (no downloads).

Shared by the LM tests: both are saved with ``save_pretrained`` so tests load them back
through the same code path users take for hub checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch

EOS = "<|endoftext|>"


def train_tokenizer(vocab_size: int = 400):
    """Byte-level BPE trained on ``pydoc_data.topics``, without a pad token (like GPT-2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tnexp.data.text import stdlib_documents

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(stdlib_documents()[:20], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS)


def tiny_gpt2(vocab_size: int, n_positions: int = 128, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def save_tiny_lm(directory: Path) -> Path:
    """Write a tiny tokenizer + GPT-2 into ``directory`` with ``save_pretrained``."""
    tokenizer = train_tokenizer()
    model = tiny_gpt2(len(tokenizer))
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    model.save_pretrained(directory)
    return directory


def small_gpt2(n_embd: int = 32, vocab_size: int = 50, n_layer: int = 2):
    """A randomly initialised GPT-2 (Conv1D MLPs) in eval mode, for factory/slicing tests."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_embd=n_embd, n_layer=n_layer, n_head=4, n_positions=64, vocab_size=vocab_size
    )
    return GPT2LMHeadModel(cfg).eval()


def small_llama(hidden_size: int = 32, intermediate_size: int = 64, vocab_size: int = 50):
    """A randomly initialised Llama (gate/up/down MLPs) in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()
