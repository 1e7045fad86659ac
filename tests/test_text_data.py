"""TextDataModule: sources, packing, split without overlap, determinism, clear errors."""

import json

import pytest
import torch
from tiny_lm import save_tiny_lm, train_tokenizer

from tnexp.data.text import DataNotAvailableError, TextDataModule, pack_blocks, stdlib_documents


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The same English text as a .txt file and as a .jsonl file (one doc per line)."""
    root = tmp_path_factory.mktemp("corpus")
    docs = stdlib_documents()[:30]
    (root / "corpus.txt").write_text("\n\n".join(docs), encoding="utf-8")
    with (root / "corpus.jsonl").open("w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, "text": doc}) + "\n")
    return root


def _all_blocks(dm, split):
    dataset = dm.train_set if split == "train" else dm.val_set
    return dataset.blocks.long()


def test_stdlib_source_batches_are_packed_dicts(tokenizer):
    dm = TextDataModule("stdlib", tokenizer, seq_len=64, batch_size=4, num_sequences=20)
    dm.setup("fit")
    assert len(dm.train_set) == 20
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape == (4, 64) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["attention_mask"], torch.ones(4, 64, dtype=torch.long))
    assert int(batch["input_ids"].max()) < len(tokenizer)
    val = next(iter(dm.val_dataloader()))
    assert val["input_ids"].shape[1] == 64
    # The documents are joined with eos between them.
    assert int((dm.train_tokens == tokenizer.eos_token_id).sum()) > 0


def test_split_before_packing_no_block_straddles_or_overlaps(tokenizer):
    dm = TextDataModule("stdlib", tokenizer, seq_len=100, val_fraction=0.2)
    dm.setup()
    train, val = _all_blocks(dm, "train"), _all_blocks(dm, "val")
    # Blocks are contiguous slices of their own part of the stream, in order ...
    assert torch.equal(train.reshape(-1), dm.train_tokens[: train.numel()].long())
    assert torch.equal(val.reshape(-1), dm.val_tokens[: val.numel()].long())
    # ... and the parts are disjoint halves of one stream: head for train, tail for val.
    n = dm.train_tokens.numel() + dm.val_tokens.numel()
    assert abs(dm.val_tokens.numel() / n - 0.2) < 1e-3
    assert len(train) == dm.train_tokens.numel() // 100
    assert len(val) == dm.val_tokens.numel() // 100


def test_deterministic_and_identity(tokenizer):
    a = TextDataModule("stdlib", tokenizer, seq_len=32, num_sequences=50, seed=3)
    b = TextDataModule("stdlib", tokenizer, seq_len=32, num_sequences=50, seed=3)
    a.setup(), b.setup()
    assert torch.equal(a.train_set.blocks, b.train_set.blocks)
    assert torch.equal(
        next(iter(a.train_dataloader()))["input_ids"], next(iter(b.train_dataloader()))["input_ids"]
    )
    ident = a.identity()
    assert ident == b.identity()
    subset = {k: ident[k] for k in ("source", "seq_len", "num_sequences", "seed")}
    assert subset == {"source": "stdlib", "seq_len": 32, "num_sequences": 50, "seed": 3}
    assert ident["split"]["val_fraction"] == 0.1
    assert TextDataModule("stdlib", tokenizer, seq_len=64).identity() != ident


def test_local_txt_and_jsonl_files(tokenizer, corpus, tmp_path):
    txt = TextDataModule("file", tokenizer, path=str(corpus / "corpus.txt"), seq_len=48)
    jsonl = TextDataModule("file", tokenizer, path=str(corpus / "corpus.jsonl"), seq_len=48)
    txt.setup(), jsonl.setup()
    assert len(txt.train_set) > 10 and len(jsonl.train_set) > 10
    assert txt.train_set[0]["input_ids"].shape == (48,)
    # jsonl puts eos between the 30 documents; the .txt file is one document.
    eos = tokenizer.eos_token_id
    n_eos = int((jsonl.train_tokens == eos).sum() + (jsonl.val_tokens == eos).sum())
    assert n_eos == 30
    assert txt.identity()["sha256"] != jsonl.identity()["sha256"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*'text'"):
        TextDataModule("file", tokenizer, path=str(bad), seq_len=4).setup()
    with pytest.raises(FileNotFoundError):
        TextDataModule("file", tokenizer, path=str(tmp_path / "none.txt")).setup()
    with pytest.raises(ValueError, match=r"data\.path"):
        TextDataModule("file", tokenizer).setup()


def test_tokenizer_by_path_uses_the_model_loader(tmp_path):
    directory = save_tiny_lm(tmp_path / "tiny")
    dm = TextDataModule("stdlib", str(directory), seq_len=32, num_sequences=4)
    dm.setup()
    assert dm.tokenizer.pad_token == dm.tokenizer.eos_token  # load_tokenizer's fix
    assert dm.identity()["tokenizer"] == str(directory)


def test_seq_len_above_context_and_bad_settings(tokenizer):
    with pytest.raises(ValueError, match="seq_len=2048 exceeds the model's context of 1024"):
        TextDataModule("stdlib", tokenizer, seq_len=2048, max_context=1024)
    with pytest.raises(ValueError, match="source"):
        TextDataModule("wiki", tokenizer)
    with pytest.raises(ValueError, match="num_sequences or num_documents"):
        TextDataModule("openwebtext", tokenizer)
    with pytest.raises(ValueError, match="blocks of seq_len"):
        TextDataModule("stdlib", tokenizer, seq_len=200_000).setup()


def test_openwebtext_offline_is_a_clear_error(tokenizer):
    dm = TextDataModule("openwebtext", tokenizer, num_sequences=10, seq_len=64)
    with pytest.raises(DataNotAvailableError) as info:
        dm.setup()
    message = str(info.value)
    assert "'Skylion007/openwebtext' is not available offline" in message
    assert "HF_HOME" in message and "text_file" in message
    assert info.value.__cause__ is None


@pytest.mark.parametrize("streaming", [True, False])
def test_hf_source_takes_seeded_random_documents(tokenizer, corpus, tmp_path, streaming):
    # The openwebtext code path on a local JSON dataset in the same record format.
    kwargs = {
        "hf_path": "json",
        "hf_kwargs": {
            "data_files": str(corpus / "corpus.jsonl"),
            "cache_dir": str(tmp_path / "hf"),
        },
        "streaming": streaming,
        "shuffle_buffer": 100,
        "seq_len": 32,
    }
    a = TextDataModule("hf", tokenizer, num_documents=5, seed=1, **kwargs)
    b = TextDataModule("hf", tokenizer, num_documents=5, seed=1, **kwargs)
    c = TextDataModule("hf", tokenizer, num_documents=5, seed=2, **kwargs)
    for dm in (a, b, c):
        dm.setup()
    assert a.num_documents_read == 5
    assert torch.equal(a.train_tokens, b.train_tokens)
    assert not torch.equal(a.train_tokens, c.train_tokens)
    # Without num_documents, reading stops once the requested blocks are filled.
    d = TextDataModule("hf", tokenizer, num_sequences=3, num_val_sequences=1, **kwargs)
    d.setup()
    assert len(d.train_set) == 3 and len(d.val_set) == 1


def test_pack_blocks_drops_the_remainder():
    blocks = pack_blocks(torch.arange(10), 4)
    assert blocks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert pack_blocks(torch.arange(10), 4, limit=1).shape == (1, 4)


def test_hydra_configs_build_text_datamodules(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tnexp.config import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for data, model in (
            ("stdlib_text", "tiny_gpt2"),
            ("openwebtext", "gpt2_xl"),
            ("text_file", "smollm2_135m"),
        ):
            cfg = compose("train", overrides=[f"data={data}", f"model={model}"])
            data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
            assert data_cfg.pop("info")["task"] == "causal_lm"
            assert data_cfg["tokenizer"] == cfg.model.tokenizer
            assert data_cfg["max_context"] == cfg.model.max_context
            dm = instantiate(data_cfg)  # lazy: nothing is read or downloaded here
            assert isinstance(dm, TextDataModule)
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match="exceeds the model's context"):
        instantiate({**data_cfg, "seq_len": 4096, "max_context": 1024})
