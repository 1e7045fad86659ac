"""Loading causal LMs and tokenizers: local save_pretrained dirs, offline errors, SmolLM2."""

import logging
import math

import pytest
import torch
from tiny_lm import EOS, save_tiny_lm

from tnexp.models.hf import (
    SHORT_NAMES,
    ModelNotAvailableError,
    build_causal_lm,
    context_length,
    load_causal_lm,
    load_tokenizer,
    resolve_model_source,
)

# A hub id that no cache can hold (the hub forbids this name), so the error path is certain.
UNCACHEABLE = "tnexp-tests/no-such-model--offline"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


def test_local_directory_roundtrip_gives_same_logits(tiny_dir):
    from transformers import GPT2LMHeadModel

    reference = GPT2LMHeadModel.from_pretrained(tiny_dir).eval()
    model = load_causal_lm(str(tiny_dir))
    tokenizer = load_tokenizer(str(tiny_dir))
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    ids = tokenizer("The assert statement is a convenient way", return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 3
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    assert context_length(model) == 128


def test_missing_pad_token_is_set_to_eos_and_logged(tiny_dir, caplog):
    with caplog.at_level(logging.INFO, logger="tnexp.models.hf"):
        tokenizer = load_tokenizer(str(tiny_dir))
    assert tokenizer.pad_token == EOS == tokenizer.eos_token
    assert "no pad token" in caplog.text
    kept = load_tokenizer(str(tiny_dir), pad_to_eos=False)
    assert kept.pad_token is None


def test_build_causal_lm_checks_declared_context(tiny_dir):
    model = build_causal_lm(str(tiny_dir), dtype="float32", max_context=128, tokenizer="x")
    assert isinstance(model, torch.nn.Module)
    with pytest.raises(ValueError, match="max_context=1024"):
        build_causal_lm(str(tiny_dir), max_context=1024)
    with pytest.raises(ValueError, match="dtype"):
        load_causal_lm(str(tiny_dir), dtype="float8")


def test_uncached_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = [
        (load_causal_lm, "model", {}),  # offline through HF_HUB_OFFLINE (set in conftest)
        (load_causal_lm, "model", {"local_files_only": True}),
        (load_tokenizer, "tokenizer", {"local_files_only": True}),
    ]
    for loader, what, kwargs in cases:
        with pytest.raises(ModelNotAvailableError) as info:
            loader(UNCACHEABLE, **kwargs)
        message = str(info.value)
        assert f"{what} '{UNCACHEABLE}' is not available offline" in message
        assert "HF_HOME" in message and "local directory" in message
        assert info.value.__cause__ is None and info.value.__suppress_context__


def test_missing_local_path_is_not_mistaken_for_a_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_causal_lm(str(tmp_path / "nothing-here"))
    with pytest.raises(FileNotFoundError):
        resolve_model_source(str(tmp_path / "model.gguf"))


def test_smollm2_short_name_resolves_to_packaged_gguf():
    source = resolve_model_source("smollm2-135m")
    assert source.gguf_file == SHORT_NAMES["smollm2-135m"].filename
    assert source.gguf_file.endswith(".gguf") and source.is_local
    # Hub ids pass through untouched.
    assert resolve_model_source("gpt2-xl").location == "gpt2-xl"
    assert not resolve_model_source("gpt2").is_local

    from gguf import GGUFReader

    reader = GGUFReader(f"{source.location}/{source.gguf_file}")
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "llama"


@pytest.mark.slow  # 30-70 s on 2 shared CPU cores: GGUF parsing, dequantisation, 2 windows
def test_smollm2_gguf_loads_and_has_plausible_perplexity():
    from tnexp.data.text import stdlib_documents
    from tnexp.eval import sliding_window_perplexity

    tokenizer = load_tokenizer("smollm2-135m")
    model = load_causal_lm("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token is not None
    text = "\n\n".join(stdlib_documents())
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][:1024]
    result = sliding_window_perplexity(model, ids, max_length=512, stride=512)
    assert math.isfinite(result["ppl"])
    # English technical prose: the design notes quote ~10.6 on English text.
    assert 3.0 < result["ppl"] < 40.0, result
