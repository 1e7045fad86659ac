"""tnexp-aggregate: run folders -> paper tables (Markdown + CSV) and figures (PNG).

Real tiny stages on digits (pretrain, local, a two-job "multirun" of global) check the
whole path from results.json written by run_stage; synthetic results.json files in the
same layout check the paper-table, sweep, language-model and bad-input logic.
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path
from typing import Any

import pytest
from stages import make_cfg

from tnexp.aggregate import (
    AggregateError,
    Run,
    aggregate,
    find_runs,
    load_reference,
    main,
    makespan,
)
from tnexp.run import run_stage


def stage(out: Path, *overrides: str) -> dict[str, Any]:
    return run_stage(make_cfg(out, *overrides))


def table(result, name: str):
    matches = [t for t in result.tables if t.name == name]
    assert matches, f"no table {name}; have {[t.name for t in result.tables]}"
    return matches[0]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


# ============================================================== real stages on digits
@pytest.fixture(scope="module")
def real_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    stage(root / "pretrain", "method=pretrain", "trainer.limit_train_batches=8")
    stage(root / "local", "method=local", f"teacher.path={root / 'pretrain'}", "experiment_name=t")
    # A Hydra multirun's layout: <sweep>/multirun.yaml and one folder per job number.
    sweep = root / "multirun" / "sweep_global_bs"
    for job, bs in enumerate((16, 32)):
        stage(
            sweep / str(job),
            "method=global",
            f"teacher.path={root / 'pretrain'}",
            f"method.global.batch_size={bs}",
            "experiment_name=t",
        )
        (sweep / str(job) / ".hydra").mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {mode: MULTIRUN}\n")
    # A job that never finished: Hydra made its folder, no results.json.
    (sweep / "2" / ".hydra").mkdir(parents=True)
    return root


def test_real_runs_make_tables_and_figures(real_runs, tmp_path):
    out = tmp_path / "agg"
    result = aggregate([real_runs], out)
    sweep = real_runs / "multirun" / "sweep_global_bs"
    saved = {
        name: json.loads((folder / "results.json").read_text())
        for name, folder in [
            ("pretrain", real_runs / "pretrain"),
            ("local", real_runs / "local"),
            ("global0", sweep / "0"),
            ("global1", sweep / "1"),
        ]
    }
    acc = table(result, "accuracy_digits")
    by_method = {r["method"]: r for r in acc.rows}
    assert set(by_method) == {"dense (teacher)", "local", "global"}
    assert by_method["dense (teacher)"]["top1"] == pytest.approx(
        saved["pretrain"]["metrics"]["best"]["val/top1"]
    )
    local = by_method["local"]
    assert local["top1"] == pytest.approx(saved["local"]["metrics"]["best"]["val/top1"])
    # top-5 at the best validation, read from the timer's history
    assert local["top5"] == pytest.approx(
        saved["local"]["time"]["history"][-1]["metrics"]["val/top5"]
    )
    assert local["time_min"] == pytest.approx(saved["local"]["time"]["time_to_best_s"] / 60)
    assert local["cr"] == 0.5 and 0.4 < local["model_cr"] < 0.5
    # the two global jobs are two settings of one cell: the better one is shown
    g = [saved["global0"], saved["global1"]]
    assert by_method["global"]["top1"] == pytest.approx(
        max(r["metrics"]["best"]["val/top1"] for r in g)
    )
    assert by_method["global"]["note"].startswith("best of 2 settings")
    # no paper counterpart for digits
    assert all(r["paper_top1"] is None for r in acc.rows)

    # the multirun over two batch sizes is one sweep table with two rows
    sweeps = [t for t in result.tables if t.name.startswith("sweep_")]
    assert len(sweeps) == 1
    rows = sweeps[0].rows
    assert [r["global.batch_size"] for r in rows] == [16, 32]
    assert [r["best"] for r in rows] == pytest.approx([r["metrics"]["best"]["val/top1"] for r in g])

    # the unfinished job is listed, not tabulated
    assert [i.path.name for i in result.incomplete] == ["2"]
    runs = table(result, "runs")
    assert any(r["status"].startswith("incomplete") for r in runs.rows)
    assert sum(r["status"] == "ok" for r in runs.rows) == 4

    # files: Markdown + CSV per table, figures
    for t in result.tables:
        assert (out / "tables" / f"{t.name}.md").read_text().startswith("### ")
        assert (out / "tables" / f"{t.name}.csv").is_file()
    csv_rows = read_csv(out / "tables" / "accuracy_digits.csv")
    assert [r["method"] for r in csv_rows] == ["dense (teacher)", "local", "global"]
    assert float(csv_rows[1]["top1"]) == pytest.approx(local["top1"])
    names = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert names == ["fig2_top1_vs_time.png", f"{sweeps[0].name}.png"]
    assert all(p.stat().st_size > 5000 for p in (out / "figures").glob("*.png"))


def test_cli_prints_markdown_and_selects_tables(real_runs, tmp_path, capsys):
    rc = main([str(real_runs / "multirun"), "--out", str(tmp_path / "o"), "--tables", "sweeps"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.startswith("### Sweep: t — global on digits, CR 0.5")
    assert "| 16 |" in printed and "| 32 |" in printed
    assert "### All runs" not in printed
    assert sorted(p.name for p in (tmp_path / "o" / "tables").iterdir())[0].startswith(
        "sweep_t_global"
    )


def test_digits_compared_with_cifar10_on_request(real_runs):
    result = aggregate([real_runs], None, tables="table1,table2", compare_to="cifar10")
    t2 = table(result, "table2")
    ours = [r for r in t2.rows if r["dataset"] == "digits"]
    local = next(r for r in ours if r["method"] == "local")
    assert local["paper_top1"] == 94.70 and local["paper_time_min"] == 51.38
    assert local["delta_top1"] == pytest.approx(local["top1"] - 94.70)
    dense = next(r for r in ours if r["method"].startswith("dense"))
    assert dense["paper_top1"] == 95.04
    # paper rows without a run of ours are still listed (CR 0.7)
    assert {(r["cr"], r["method"]) for r in t2.rows if r["dataset"] == "(paper)"} == {
        (0.7, "local"),
        (0.7, "global"),
    }


# ============================================================== synthetic results.json
def fake(
    method: str,
    *,
    dataset: str = "cifar10",
    cr: float | None = 0.5,
    top1: float = 90.0,
    top5: float | None = 99.0,
    time_to_best: float = 600.0,
    seed: int = 0,
    train_subset: int | None = None,
    bs: int = 8,
    lr: float = 1e-3,
    experiment: str = "paper",
    compare_to: str | None = None,
    history_metrics: bool = True,
    teacher_path: str | None = None,
) -> dict[str, Any]:
    """A results.json as tnexp/run.py writes it (classification)."""
    history = []
    for i, frac in enumerate((0.5, 1.0, 0.9)):
        entry = {
            "step": 10 * (i + 1),
            "epoch": i,
            "optimization_s": time_to_best * (i + 1) / 2,
            "wall_s": time_to_best * (i + 1),
            "value": top1 * frac,
        }
        if history_metrics:
            entry["metrics"] = {"val/top1": top1 * frac, "val/top5": (top5 or 0) * frac}
        history.append(entry)
    phase = {"batch_size": bs, "optimizer": {"name": "adam", "lr": lr}}
    return {
        "method": method,
        "experiment": experiment,
        "task": {"monitor": "val/top1", "mode": "max"},
        "metrics": {
            "final": {"val/top1": top1 * 0.9, "val/top5": (top5 or 0) * 0.9, "val/loss": 1.0},
            "best": {"val/top1": top1},
        },
        "time": {
            "optimization_s": time_to_best * 1.5,
            "best_value": top1,
            "time_to_best_s": time_to_best,
            "step_at_best": 20,
            "history": history,
        },
        "params": {"student": 1000, "teacher": 2000},
        "tensorize": None if method == "pretrain" else {"totals": {"model_cr": (cr or 0) * 0.95}},
        "data": {"name": dataset, "train_samples": train_subset or 50000},
        "config": {
            "seed": seed,
            "experiment_name": experiment,
            "compare_to": compare_to,
            "smoke": False,
            "tags": [],
            "teacher": {"path": teacher_path},
            "paths": {"output_dir": f"/somewhere/{method}/{seed}"},
            "data": {
                "info": {"name": dataset, "num_classes": 10},
                "batch_size": 128,
                "train_subset": train_subset,
                "seed": seed,
            },
            "model": {"_target_": "tnexp.models.cifar_resnet34", "num_classes": 10},
            "tensorize": {"cr": cr, "overall_cr": None, "init": "random"},
            "method": {"name": method, "local": phase, "global": copy.deepcopy(phase)}
            if method != "pretrain"
            else {"name": method, "global": phase},
            "trainer": {"max_epochs": 10},
        },
    }


def write(root: Path, rel: str, results: dict[str, Any]) -> Path:
    folder = root / rel
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results))
    return folder


@pytest.fixture
def cifar10_runs(tmp_path) -> Path:
    root = tmp_path / "c10"
    write(root, "pretrain", fake("pretrain", cr=None, top1=94.0, top5=99.8, time_to_best=3000))
    write(root, "local_s0", fake("local", top1=94.0, seed=0))
    write(root, "local_s1", fake("local", top1=93.0, seed=1))
    write(root, "local_30k", fake("local", top1=93.5, train_subset=30000))
    write(root, "global", fake("global", top1=88.0, time_to_best=1200, bs=16, lr=5e-4))
    write(root, "local_cr07", fake("local", cr=0.7, top1=89.0, history_metrics=False))
    return root


def test_paper_tables_rows_and_deltas(cifar10_runs, tmp_path):
    result = aggregate([cifar10_runs], tmp_path / "out")
    t1 = table(result, "table1")
    rows = {(r["method"], r["samples"], r["dataset"]): r for r in t1.rows}
    # CR 0.5 only; seeds of one setting are averaged
    local = rows[("local", "full (50,000)", "cifar10")]
    assert local["n"] == 2 and local["top1"] == pytest.approx(93.5)
    assert local["top1_std"] == pytest.approx(0.7071, abs=1e-3)
    assert local["paper_top1"] == 94.70 and local["delta_top1"] == pytest.approx(93.5 - 94.70)
    assert local["time_min"] == pytest.approx(10.0)
    assert rows[("local", "30,000", "cifar10")]["paper_top1"] == 94.69
    # the paper's 10k row has no run of ours: listed as a paper-only row
    assert rows[("local", "10,000", "(paper)")]["paper_top1"] == 94.61
    assert rows[("global", "full (50,000)", "cifar10")]["paper_top1"] == 89.47
    dense = rows[("dense (teacher)", "full (50,000)", "cifar10")]
    assert dense["top1"] == 94.0 and dense["paper_top1"] == 95.04
    assert t1.rows[0]["method"] == "dense (teacher)"
    assert not any(r["cr"] == 0.7 for r in t1.rows)

    t2 = table(result, "table2")
    cr07 = next(r for r in t2.rows if r["cr"] == 0.7 and r["method"] == "local")
    assert cr07["paper_top1"] == 89.19 and cr07["paper_top5"] == 99.51
    # no per-validation metrics in this run's history: top-5 after training, flagged
    assert cr07["top5"] == pytest.approx(99.0 * 0.9) and "top-5 after training" in cr07["note"]
    local_t2 = next(r for r in t2.rows if r["cr"] == 0.5 and r["method"] == "local")
    assert local_t2["top5"] == pytest.approx(99.0)  # at the best validation, not final
    assert not any(r["samples"] == "30,000" for r in t2.rows)  # full data only
    md = (tmp_path / "out" / "tables" / "table2.md").read_text()
    assert "| 93.50 ± 0.71 |" in md and "94.70" in md and "-1.20" in md
    csv_rows = read_csv(tmp_path / "out" / "tables" / "table2.csv")
    assert {"top1", "top1_std", "paper_top1", "delta_top1"} <= set(csv_rows[0])
    # no CIFAR-100 runs: no tables 3 and 4
    assert not any(t.name in ("table3", "table4") for t in result.tables)
    assert (tmp_path / "out" / "figures" / "fig2_top1_vs_time.png").is_file()


def test_teacher_row_from_teacher_path(tmp_path):
    teacher = write(
        tmp_path / "elsewhere", "pre", fake("pretrain", dataset="cifar100", cr=None, top1=77.0)
    )
    root = tmp_path / "runs"
    write(
        root,
        "a",
        fake("local", dataset="cifar100", teacher_path=str(teacher / "teacher.safetensors")),
    )
    result = aggregate([root], None, tables="table3")
    dense = next(r for r in table(result, "table3").rows if r["method"].startswith("dense"))
    assert (
        dense["top1"] == 77.0 and dense["paper_top1"] == 79.79 and "teacher.path" in dense["note"]
    )


def test_analog_dataset_compared_with_paper(tmp_path):
    root = tmp_path / "fm"
    write(root, "l", fake("local", dataset="fashion_mnist", compare_to="cifar10", top1=91.0))
    write(root, "h", fake("hybrid", dataset="fashion_mnist", compare_to="cifar100", cr=0.7))
    write(root, "x", fake("local", dataset="fashion_mnist", cr=0.6))  # no compare_to
    result = aggregate([root], None, compare_to=None)
    t2 = table(result, "table2")
    ours = [r for r in t2.rows if r["dataset"] == "fashion_mnist"]
    assert len(ours) == 1 and ours[0]["paper_top1"] == 94.70 and ours[0]["vs"] == "CIFAR-10"
    hybrid = next(r for r in table(result, "table4").rows if r["dataset"] == "fashion_mnist")
    assert hybrid["method"] == "hybrid" and hybrid["paper_top1"] == 74.22
    every = table(result, "accuracy_fashion_mnist")
    assert len(every.rows) == 3
    assert next(r for r in every.rows if r["cr"] == 0.6)["paper_top1"] is None


def test_smoke_runs_keep_their_rows(tmp_path):
    # debug=smoke shrinks the 30k and the full-data run to the same tiny subset
    for run_name in ("local-cr0.5", "local-cr0.5-30k"):
        r = fake("local", train_subset=64)
        r["config"].update(smoke=True, run_name=run_name)
        write(tmp_path / "s", run_name, r)
    (t,) = aggregate([tmp_path / "s"], None, tables="accuracy").tables
    assert sorted(r["samples"] for r in t.rows) == [
        "64 (smoke: local-cr0.5)",
        "64 (smoke: local-cr0.5-30k)",
    ]


def test_sweeps_group_by_what_varies(tmp_path):
    root = tmp_path / "sw"
    for i, bs in enumerate((8, 16, 32)):
        write(root, f"bs/{i}", fake("local", bs=bs, top1=90 + i, experiment="sweep_bs"))
    write(root, "bs/3", fake("local", bs=8, top1=92, seed=1, experiment="sweep_bs"))
    for i, lr in enumerate((1e-4, 5e-4)):
        write(
            root,
            f"lr/{i}",
            fake("global", dataset="cifar100", bs=64, lr=lr, top1=40 + i, experiment="sweep_lr"),
        )
    # same experiment and method but another CR: a separate sweep
    for i, bs in enumerate((8, 16)):
        write(root, f"cr7/{i}", fake("local", cr=0.7, bs=bs, experiment="sweep_bs"))
    result = aggregate([root], tmp_path / "out", tables="sweeps")
    sweeps = {t.name: t for t in result.tables}
    assert set(sweeps) == {
        "sweep_sweep_bs_local_local_bs",
        "sweep_sweep_bs_local_local_bs_2",
        "sweep_sweep_lr_global_global_lr",
    }
    bs = next(t for t in sweeps.values() if len(t.rows) == 3)
    assert [r["local.batch_size"] for r in bs.rows] == [8, 16, 32]
    assert bs.rows[0]["n"] == 2 and bs.rows[0]["best"] == pytest.approx(91.0)  # seeds averaged
    assert [r["paper"] for r in bs.rows] == [94.71, 91.98, 94.34]  # appendix B.2, CIFAR-10
    lr = sweeps["sweep_sweep_lr_global_global_lr"]
    assert [r["global.lr"] for r in lr.rows] == [1e-4, 5e-4]
    assert [r["paper"] for r in lr.rows] == [37.46, 47.54]  # appendix B.3, CIFAR-100
    assert len(list((tmp_path / "out" / "figures").glob("sweep_*.png"))) == 3


def test_paper_layout_multiruns_are_separate_sweeps(tmp_path):
    # configs/experiment/paper: one experiment_name per data set; a table row is a single
    # run, each appendix-B sweep a multirun in <runs>/<experiment>/<run_name>/<job>.
    exp = tmp_path / "runs" / "cifar10_resnet34"
    name = "cifar10_resnet34"
    write(exp, "local-cr0.5", fake("local", top1=94.0, experiment=name))
    sweeps = {"sweep-local-batchsize": ("bs", (8, 16, 32)), "sweep-local-lr": ("lr", (1e-4, 1e-3))}
    for run_name, (key, values) in sweeps.items():
        for i, v in enumerate(values):
            write(exp, f"{run_name}/{i}", fake("local", top1=95.0 + i, experiment=name, **{key: v}))
        (exp / run_name / "multirun.yaml").write_text("hydra: {mode: MULTIRUN}\n")
    result = aggregate([exp.parent], None, tables="table1,sweeps")
    found = {t.meta["params"][0][1]: t for t in result.tables if t.name.startswith("sweep_")}
    assert set(found) == {"batch_size", "lr"}
    assert [r["local.batch_size"] for r in found["batch_size"].rows] == [8, 16, 32]
    assert [r["local.lr"] for r in found["lr"].rows] == [1e-4, 1e-3]
    # table 1 shows the table's own run, not the best sweep job
    local = next(
        r for r in table(result, "table1").rows if r["method"] == "local" and r.get("n") is not None
    )
    assert local["top1"] == 94.0 and local["n"] == 1
    assert "sweep run(s) in the sweep tables" in local["note"]


def test_sweep_grid_reads_paper_curve_at_paper_defaults(tmp_path):
    root = tmp_path / "grid"
    for i, (bs, lr) in enumerate([(8, 1e-3), (16, 1e-3), (8, 1e-4), (16, 1e-4)]):
        write(root, str(i), fake("local", bs=bs, lr=lr, top1=80 + i))
    (t,) = aggregate([root], None, tables="sweeps").tables
    paper = {(r["local.batch_size"], r["local.lr"]): r["paper"] for r in t.rows}
    # CIFAR-10 local: the paper chose bs 8, lr 1e-3
    assert paper == {(8, 1e-4): 93.88, (8, 1e-3): 94.71, (16, 1e-4): None, (16, 1e-3): 91.98}


# ============================================================== language models
SLICES = (400.0, 300.0, 200.0, 100.0)


def fake_lm(method: str, *, ppl: float, lambada_acc: float, opt_s: float, **extra) -> dict:
    phase = {"batch_size": 8, "optimizer": {"name": "adam", "lr": 1e-4}}
    r = {
        "method": method,
        "experiment": "gpt",
        "task": {"monitor": "val/ppl", "mode": "min"},
        "metrics": {
            "final": {"val/ppl": ppl * 1.1, "val/loss": 3.0},
            "best": {"val/ppl": ppl * 1.1},
            "before": {"token_ppl": 1e5},
            "final_eval": {
                "token_ppl": ppl,
                "token_nll": 3.0,
                "lm_eval/lambada_openai/perplexity": ppl * 2,
                "lm_eval/lambada_openai/acc": lambada_acc,
                "lm_eval/lambada_openai/acc_stderr": 0.01,
                "lm_eval/wikitext/word_perplexity": ppl * 3,
            },
            "teacher": {
                "token_ppl": 8.0,
                "lm_eval/lambada_openai/acc": 0.5,
                "lm_eval/wikitext/word_perplexity,none": 20.0,
            },
        },
        "time": {
            "optimization_s": opt_s,
            "time_to_best_s": opt_s,
            "best_value": ppl * 1.1,
            "history": [
                {"step": 5, "optimization_s": opt_s / 2, "value": ppl * 2},
                {"step": 10, "optimization_s": opt_s, "value": ppl * 1.1},
            ],
        },
        "tensorize": {"totals": {"model_cr": 0.3}},
        "config": {
            "seed": 0,
            "data": {"info": {"name": "stdlib_text", "task": "causal_lm"}, "batch_size": 8},
            "model": {"_target_": "tnexp.models.hf.build_causal_lm", "name": "smollm2-135m"},
            "tensorize": {"overall_cr": 0.3},
            "method": {"name": method, "local": phase, "global": phase},
        },
    }
    r.update(extra)
    return r


def test_language_model_tables_and_figure(tmp_path):
    root = tmp_path / "lm"
    write(root, "local", fake_lm("local", ppl=40.0, lambada_acc=0.30, opt_s=900))
    write(root, "global", fake_lm("global", ppl=60.0, lambada_acc=0.25, opt_s=600))
    assembled = fake_lm("assemble", ppl=45.0, lambada_acc=0.32, opt_s=1000.0)
    # time.slice_jobs as tnexp/slice_jobs.py writes it, plus an optional worker count
    per_slice = {f"s{i}": {"optimization_s": t, "job": f"j{i}"} for i, t in enumerate(SLICES)}
    assembled["time"] = {
        "optimization_s": 1000.0,
        "slice_jobs": {
            "count": 4,
            "jobs": 4,
            "workers": 2,
            "sum_optimization_s": 1000.0,
            "max_optimization_s": 400.0,
            "per_slice": per_slice,
        },
    }
    del assembled["metrics"]["best"]
    write(root, "assemble", assembled)
    result = aggregate([root], tmp_path / "out")
    t6 = table(result, "table6")
    rows = {r["metric"]: r for r in t6.rows}
    # assembled slice jobs are the local column (the paper's setting)
    assert rows["token_ppl"]["local"] == 45.0 and rows["token_ppl"]["global"] == 60.0
    assert rows["token_ppl"]["dense"] == 8.0 and rows["token_ppl"]["before"] == 1e5
    assert rows["lambada_openai/acc"]["local"] == pytest.approx(32.0)  # in %
    assert rows["lambada_openai/acc"]["paper_local"] == 42.38
    assert rows["lambada_openai/perplexity"]["paper_global"] == 35.5959
    assert rows["wikitext/word_perplexity"]["dense"] == 20.0  # ",none" filter dropped
    assert rows["piqa/acc"]["local"] is None and rows["piqa/acc"]["paper_dense"] == 70.51
    assert not any("stderr" in m for m in rows)

    t7 = table(result, "table7")
    settings = [(r["method"], r["setting"], r["workers"], r["time_min"]) for r in t7.rows]
    assert ("local", "one process, all slices together", 1, 15.0) in settings
    assert ("local", "serial (sum of 4 slice jobs)", 1, pytest.approx(1000 / 60)) in settings
    # 400+300+200+100 s of slice jobs on 2 workers: 500 s at best
    assert ("local", "ideal parallel (slowest worker)", 2, pytest.approx(500 / 60)) in settings
    assert ("global", "one process", 1, 10.0) in settings
    paper = {r["setting"]: r["paper_time_min"] for r in t7.rows}
    assert paper["ideal parallel (slowest worker)"] == 13.4
    assert paper["one process"] == 110.25
    assert (tmp_path / "out" / "figures" / "fig3_lm_vs_time.png").stat().st_size > 5000
    md = (tmp_path / "out" / "tables" / "table6.md").read_text()
    assert "wikitext/word_perplexity" in md and "token perplexity" in md


def test_language_model_seeds_give_mean_std_and_n(tmp_path):
    root = tmp_path / "lm"
    for seed, ppl in ((0, 40.0), (1, 44.0), (2, 48.0)):
        run = fake_lm("global", ppl=ppl, lambada_acc=0.3, opt_s=600)
        run["config"]["seed"] = seed
        write(root, f"global_s{seed}", run)
    write(root, "local", fake_lm("local", ppl=50.0, lambada_acc=0.3, opt_s=900))
    result = aggregate([root], tmp_path / "out")
    rows = {r["metric"]: r for r in table(result, "table6").rows}
    assert rows["token_ppl"]["global"] == pytest.approx(44.0)
    assert rows["token_ppl"]["global_std"] == pytest.approx(4.0)
    assert rows["token_ppl"]["local"] == 50.0 and rows["token_ppl"]["local_std"] is None
    md = (tmp_path / "out" / "tables" / "table6.md").read_text()
    assert "44.00 ± 4.00" in md or "44.0 ± 4.0" in md, md
    assert "(n=3)" in md and "(n=1)" in md


def test_slice_job_times_and_parts(tmp_path):
    # two jobs of two slices each (slice_jobs.group=2): each job's time counts once
    per_slice = {
        "a": {"optimization_s": 30.0, "job": "0"},
        "b": {"optimization_s": 30.0, "job": "0"},
        "c": {"optimization_s": 10.0, "job": "1"},
        "d": {"optimization_s": 10.0, "job": "1"},
    }
    jobs = {"count": 4, "jobs": 2, "sum_optimization_s": 40.0, "max_optimization_s": 30.0}
    r = fake("assemble", top1=91.0)
    r["time"] = {"optimization_s": 40.0, "slice_jobs": {**jobs, "per_slice": per_slice}}
    r["metrics"] = {"final": {"val/top1": 91.0, "val/top5": 99.0}}
    root = tmp_path / "sj"
    write(root, "assemble", r)
    # the per-slice jobs' own results (one slice trained): listed, never tabulated
    part = fake("local", top1=11.0)
    part["config"]["method"]["slice_jobs"] = {"dir": "/shared/jobs", "job": 0, "group": 2}
    write(root, "jobs/0", part)
    write(root, "skipped", {"method": "local", "skipped": True, "slice_jobs": {"dir": "/x"}})
    result = aggregate([root], None)
    run = next(x for x in result.runs if x.method == "assemble")
    assert run.slice_times == [30.0, 10.0] and run.workers == 2
    assert run.parallel_s() == 30.0 and run.optimization_s == 40.0
    (row,) = table(result, "accuracy_cifar10").rows
    assert row["method"] == "local" and row["top1"] == 91.0
    assert row["time_min"] == pytest.approx(40 / 60) and row["parallel_min"] == 0.5
    assert row["workers"] == 2 and "slice jobs" in row["note"]
    status = {r["run"]: r["status"] for r in table(result, "runs").rows}
    assert status["sj/jobs/0"].startswith("slice job")
    assert status["sj/skipped"].startswith("skipped")


def test_makespan():
    assert makespan([4, 3, 2, 1], 1) == 10
    assert makespan([4, 3, 2, 1], 2) == 5
    assert makespan([4, 3, 2, 1], 8) == 4
    with pytest.raises(ValueError):
        makespan([1.0], 0)


# ============================================================== bad input
def test_incomplete_and_unknown_layouts(tmp_path):
    root = tmp_path / "mixed"
    write(root, "good", fake("local"))
    (root / "crashed" / ".hydra").mkdir(parents=True)
    (root / "crashed" / "train.log").write_text("Traceback ...")
    (root / "corrupt").mkdir()
    (root / "corrupt" / "results.json").write_text('{"method": "loc')
    write(root, "odd", {"hello": 1})
    profile = {"method": "profile", "experiment": "p", "metrics": {"dense": {"val/top1": 90.0}}}
    write(root, "profile", {**profile, "excluded": ["layer1.0.conv1"], "config": {"seed": 0}})
    result = aggregate([root], tmp_path / "out")
    reasons = {i.path.name: i.reason for i in result.incomplete}
    assert "no results.json" in reasons["crashed"] and "train.log" in reasons["crashed"]
    assert "not valid JSON" in reasons["corrupt"]
    runs = {r["run"]: r["status"] for r in table(result, "runs").rows}
    assert runs["mixed/good"] == "ok"
    assert runs["mixed/profile"] == "ok"  # layer profiling: listed, not tabulated
    assert runs["mixed/odd"].startswith("unknown layout")
    assert runs["mixed/crashed"].startswith("incomplete")
    assert "Incomplete runs" in result.markdown
    assert len(table(result, "accuracy_cifar10").rows) == 1  # odd run left out


def test_clear_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AggregateError, match=r"no results\.json found"):
        find_runs([tmp_path / "empty"])
    with pytest.raises(AggregateError, match="does not exist"):
        find_runs([tmp_path / "nope"])
    write(tmp_path, "r", fake("local"))
    with pytest.raises(AggregateError, match="unknown table"):
        aggregate([tmp_path / "r"], None, tables="table5")
    with pytest.raises(AggregateError, match="not a paper data set"):
        aggregate([tmp_path / "r"], None, compare_to="imagenet")
    with pytest.raises(AggregateError, match="reference"):
        load_reference(tmp_path / "missing.yaml")
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no results.json found" in capsys.readouterr().err


def test_exit_status_is_an_error_when_no_run_finished(tmp_path, capsys):
    root = tmp_path / "failed"
    for name in ("a", "b"):
        (root / name / ".hydra").mkdir(parents=True)
    (root / "c").mkdir()
    (root / "c" / "results.json").write_text('{"method": "loc')  # killed while writing
    assert main([str(root), "--out", str(tmp_path / "o")]) == 1
    assert "none of the 3 run folder(s)" in capsys.readouterr().err
    write(root, "done", fake("local"))
    assert main([str(root), "--out", str(tmp_path / "o")]) == 0


def test_reference_file_matches_the_paper():
    ref = load_reference()
    assert ref.dense("cifar10")["top1"] == 95.04 and ref.dense("cifar100")["top1"] == 79.79
    assert ref.row("cifar100", 0.7, "hybrid", 50000)["top1"] == 74.22
    assert ref.row("cifar10", 0.5, "global", 50000)["time_min"] == 120.88
    assert ref.sweep("cifar100", "local", "batch_size")[128.0] == 19.93
    assert ref.sweep("cifar10", "global", "lr")[1e-3] == 84.19
    lm = ref.lm()
    assert lm["metrics"]["c4/word_perplexity"]["global"] == 100.6992
    assert lm["time_min"] == {
        "local_serial": 531.35,
        "local_parallel": 13.4,
        "local_parallel_workers": 48,
        "global": 110.25,
    }
    assert Run(Path("x"), {"method": "assemble"}).family == "local"


def test_load_run_record_is_the_one_reader(tmp_path: Path) -> None:
    from tnexp.aggregate import UnreadableRecord, load_run_record

    good = tmp_path / "results.json"
    good.write_text(json.dumps({"method": "local"}))
    record = load_run_record(good)  # an old unversioned file, read through tnexp.results
    assert record["method"] == "local" and record["schema_version"] == 1
    assert record["status"] == "ok"
    good.write_text("[1, 2]")
    with pytest.raises(UnreadableRecord, match="does not hold a JSON object"):
        load_run_record(good)
    good.write_text('{"method": "lo')
    with pytest.raises(UnreadableRecord, match="probably interrupted"):
        load_run_record(good)
