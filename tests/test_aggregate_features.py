"""tnexp-aggregate on feature-matching runs (task=features): their own table and figure.

The run folders are made here with results.json written through tnexp.results.Results, in
the layout the training stage writes (tnexp/stages/train.py, checked against a real
task=features run): metrics val/rel_err (monitored, min), val/cosine, val/sim_corr.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest

from tnexp.aggregate import aggregate, main
from tnexp.results import Results

BERT = "/models/tiny-bert"


def features_run(
    method: str,
    *,
    rel_err: float,
    cosine: float,
    sim_corr: float | None = None,
    output: str = "pooled",
    dataset: str = "stdlib_text",
    model: str = BERT,
    cr: float = 0.5,
    seed: int = 0,
    lr: float = 1e-3,
    opt_s: float = 120.0,
    before: bool = True,
) -> Results:
    """One task=features run's Results, as the training stage fills them."""

    def metrics(err: float, cos: float, corr: float | None) -> dict[str, float]:
        out = {"val/loss": err**2, "val/rel_err": err, "val/cosine": cos}
        if corr is not None:
            out["val/sim_corr"] = corr
        return out

    # three validations: the second is the best (lowest rel_err), the last slightly worse
    steps = [(1.5, 0.98), (1.0, 1.0), (1.1, 0.99)]
    history = []
    for i, (f_err, f_cos) in enumerate(steps):
        m = metrics(rel_err * f_err, cosine * f_cos, None if sim_corr is None else sim_corr * f_cos)
        history.append(
            {
                "step": 10 * (i + 1),
                "epoch": i,
                "optimization_s": opt_s * (i + 1) / 3,
                "wall_s": opt_s * (i + 1),
                "value": m["val/rel_err"],
                "metrics": m,
            }
        )
    if data_info := {"stdlib_text": {"name": "stdlib_text", "task": "causal_lm"}}.get(dataset):
        info: dict[str, Any] = data_info
    else:  # an image data set: its own task would be classification
        info = {"name": dataset, "num_classes": 10, "in_channels": 1}
    phase = {"batch_size": 8, "optimizer": {"name": "adam", "lr": lr}}
    return Results(
        method=method,
        experiment="enc",
        run_name=f"{method}-{seed}",
        task={"monitor": "val/rel_err", "mode": "min"},
        metrics={
            "final": history[-1]["metrics"],
            "best": {"val/rel_err": rel_err},
            **({"before": metrics(0.5, 0.8, 0.7 if sim_corr else None)} if before else {}),
        },
        time={
            "monitor": "val/rel_err",
            "mode": "min",
            "optimization_s": opt_s,
            "best_value": rel_err,
            "time_to_best_s": opt_s * 2 / 3,
            "step_at_best": 20,
            "history": history,
        },
        params={"student": 800, "teacher": 1000},
        tensorize={"totals": {"model_cr": cr * 0.9}},
        data={"name": dataset, "train_samples": 64},
        config={
            "seed": seed,
            "experiment_name": "enc",
            "run_name": f"{method}-{seed}",
            "paths": {"output_dir": f"/runs/{method}/{seed}"},
            "data": {"info": info, "batch_size": 8, "train_subset": None, "seed": seed},
            "model": {"_target_": "tnexp.models.hf.build_hf_model", "name": model},
            "task": {"name": "features", "output": output, "loss": "mse"},
            "tensorize": {"cr": cr, "overall_cr": None},
            "method": {"name": method, "local": phase, "global": phase},
            "teacher": {"path": None},
        },
    )


def write(root: Path, rel: str, results: Results) -> Path:
    folder = root / rel
    folder.mkdir(parents=True, exist_ok=True)
    results.write(folder)
    return folder


def only_table(result, name: str):
    (t,) = [t for t in result.tables if t.name == name]
    return t


@pytest.fixture
def feature_runs(tmp_path) -> Path:
    root = tmp_path / "enc"
    write(root, "local_s0", features_run("local", rel_err=0.20, cosine=0.90, sim_corr=0.80))
    write(root, "local_s1", features_run("local", rel_err=0.30, cosine=0.80, sim_corr=0.70, seed=1))
    write(root, "global", features_run("global", rel_err=0.40, cosine=0.70, sim_corr=0.60))
    write(root, "local_cr07", features_run("local", rel_err=0.10, cosine=0.95, cr=0.7))
    # hidden states compared token by token: no similarity correlation
    write(
        root,
        "hidden",
        features_run("local", rel_err=0.25, cosine=0.85, output="last_hidden_state"),
    )
    # a ViT on digits (whose own task would be classification)
    write(root, "vit", features_run("global", rel_err=0.15, cosine=0.97, dataset="digits"))
    return root


def test_feature_runs_get_their_table_and_figure(feature_runs, tmp_path):
    out = tmp_path / "out"
    result = aggregate([feature_runs], out)
    names = {t.name for t in result.tables}
    # tabulated as feature matching, never as a language model or a classifier
    assert names == {"features_stdlib_text", "features_digits", "runs"}
    text = only_table(result, "features_stdlib_text")
    rows = {(r["output"], r["method"], r.get("cr")): r for r in text.rows}
    assert [r["method"] for r in text.rows][:1] == ["dense (teacher)"]

    local = rows[("pooled", "local", 0.5)]
    assert local["n"] == 2  # two seeds of one setting: mean ± std
    assert local["rel_err"] == pytest.approx(0.25)
    assert local["rel_err_std"] == pytest.approx(0.0707, abs=1e-4)
    # cosine and sim_corr at the best validation (the history's second entry), not final
    assert local["cosine"] == pytest.approx(0.85)
    assert local["sim_corr"] == pytest.approx(0.75)
    assert local["before_rel_err"] == pytest.approx(0.5)
    assert local["before_cosine"] == pytest.approx(0.8)
    assert local["time_min"] == pytest.approx(80 / 60)
    assert local["model_cr"] == pytest.approx(0.45)
    assert rows[("pooled", "global", 0.5)]["rel_err"] == pytest.approx(0.40)
    assert rows[("pooled", "global", 0.5)]["rel_err_std"] is None  # one seed: no ±
    assert rows[("pooled", "local", 0.7)]["rel_err"] == pytest.approx(0.10)

    # the teacher: rel_err 0 and cosine 1 by definition; sim_corr only for embeddings
    dense = rows[("pooled", "dense (teacher)", None)]
    assert (dense["rel_err"], dense["cosine"], dense["sim_corr"]) == (0.0, 1.0, 1.0)
    hidden_dense = rows[("last_hidden_state", "dense (teacher)", None)]
    assert hidden_dense["sim_corr"] is None and hidden_dense["cosine"] == 1.0
    assert rows[("last_hidden_state", "local", 0.5)]["sim_corr"] is None
    # order: per (model, output) the teacher first, then by CR and method
    order = [(r["output"], r["method"], r.get("cr")) for r in text.rows]
    assert order == [
        ("last_hidden_state", "dense (teacher)", None),
        ("last_hidden_state", "local", 0.5),
        ("pooled", "dense (teacher)", None),
        ("pooled", "local", 0.5),
        ("pooled", "global", 0.5),
        ("pooled", "local", 0.7),
    ]

    (vit,) = [r for r in only_table(result, "features_digits").rows if r["method"] == "global"]
    assert vit["rel_err"] == pytest.approx(0.15) and vit["sim_corr"] is None

    md = (out / "tables" / "features_stdlib_text.md").read_text()
    assert md.startswith("### Feature matching on stdlib_text")
    assert "| 0.2500 ± 0.0707 |" in md and "| 0.0000 |" in md and "| 1.0000 |" in md
    with (out / "tables" / "features_stdlib_text.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert {"rel_err", "rel_err_std", "cosine", "sim_corr", "n"} <= set(csv_rows[0])
    assert [r["method"] for r in csv_rows][:2] == ["dense (teacher)", "local"]
    assert float(csv_rows[3]["rel_err"]) == pytest.approx(0.25)

    status = {r["run"]: (r["status"], r["monitor"]) for r in only_table(result, "runs").rows}
    assert status["enc/local_s0"] == ("ok", "val/rel_err")
    fig = out / "figures" / "fig_features_vs_time.png"
    assert [p.name for p in (out / "figures").iterdir()] == [fig.name]
    assert fig.stat().st_size > 5000


def test_feature_settings_sweeps_and_selection(tmp_path, capsys):
    root = tmp_path / "enc"
    # one multirun over the learning rate: a sweep table (min is best) ...
    for i, (lr, err) in enumerate(((1e-4, 0.3), (1e-3, 0.2))):
        write(root, f"sweep/{i}", features_run("local", rel_err=err, cosine=0.9, lr=lr))
    (root / "sweep" / "multirun.yaml").write_text("hydra: {mode: MULTIRUN}\n")
    result = aggregate([root], None)
    (sweep,) = [t for t in result.tables if t.name.startswith("sweep_")]
    assert [(r["local.lr"], r["best"]) for r in sweep.rows] == [(1e-4, 0.3), (1e-3, 0.2)]
    assert sweep.meta["monitor"] == "val/rel_err"
    # ... whose jobs stand in for the cell that no other run fills: the lower error wins
    (row,) = [r for r in only_table(result, "features_stdlib_text").rows if r["method"] == "local"]
    assert row["rel_err"] == pytest.approx(0.2)
    assert row["note"].startswith("best of 2 settings") and "from a sweep" in row["note"]

    rc = main([str(root), "--out", str(tmp_path / "o"), "--tables", "features", "--no-figures"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.startswith("### Feature matching on stdlib_text")
    assert "### All runs" not in printed and "Sweep" not in printed
    assert sorted(p.name for p in (tmp_path / "o" / "tables").iterdir()) == [
        "features_stdlib_text.csv",
        "features_stdlib_text.md",
    ]
