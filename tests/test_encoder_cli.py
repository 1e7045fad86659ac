"""End to end through the CLI's stage runner: a tiny BertModel and a tiny ViT (model=hf,
saved folders, offline) compressed and recovered with task=features, local and global."""

import json

import pytest
from stages import FAST, make_cfg
from tiny_lm import train_tokenizer

from tnexp.models.hf import tiny_hf_model
from tnexp.run import run_stage

pytestmark = pytest.mark.slow

COMMON = [o for o in FAST if not o.startswith(("data.", "model."))] + ["task=features"]
TEXT = [
    "data=stdlib_text",
    "data.seq_len=16",
    "data.num_sequences=16",
    "data.num_val_sequences=8",
    "data.batch_size=4",
    "tensorize=mpo_encoder_ffn",
]
VISION = ["data=digits", "data.image_size=8", "tensorize=mpo_vit_mlp"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bert")
    tokenizer = train_tokenizer()
    model = tiny_hf_model(
        "bert",
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    tokenizer.save_pretrained(directory)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vit")
    model = tiny_hf_model(
        "vit",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=8,
        patch_size=4,
        num_channels=1,
    )
    model.save_pretrained(directory)
    return directory


def _check(results: dict, out, embedding: bool) -> None:
    assert results["status"] == "ok"
    on_disk = json.loads((out / "results.json").read_text())
    final = on_disk["metrics"]["final"]
    assert 0.0 <= final["val/rel_err"] < 1.0
    assert 0.0 < final["val/cosine"] <= 1.0
    assert ("val/sim_corr" in final) == embedding
    before = on_disk["metrics"]["before"]
    assert before["val/rel_err"] > 0.0  # the compressed student before recovery
    layers = on_disk["tensorize"]["layers"]
    assert layers and all(not layer["name"].startswith("bert.") for layer in layers)


@pytest.mark.parametrize("method", ["local", "global"])
def test_bert_features_end_to_end(bert_dir, tmp_path, method):
    extra = ["task.output=pooled"] if method == "global" else []
    cfg = make_cfg(
        tmp_path,
        f"method={method}",
        "model=hf",
        f"model.name={bert_dir}",
        *COMMON,
        *TEXT,
        *extra,
        fast=False,
    )
    results = run_stage(cfg)
    _check(results, tmp_path, embedding=method == "global")
    names = [layer["name"] for layer in results["tensorize"]["layers"]]
    assert names == [
        f"encoder.layer.{i}.{part}.dense" for i in (0, 1) for part in ("intermediate", "output")
    ]  # never the attention's output.dense


@pytest.mark.parametrize("method", ["local", "global"])
def test_vit_features_end_to_end(vit_dir, tmp_path, method):
    cfg = make_cfg(
        tmp_path,
        f"method={method}",
        "model=hf",
        f"model.name={vit_dir}",
        "task.output=pooled",
        *COMMON,
        *VISION,
        fast=False,
    )
    _check(run_stage(cfg), tmp_path, embedding=True)
