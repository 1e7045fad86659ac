"""The quickstart behind a bare `uv run tnexp`, shrunk: W&B offline runs, output, plot."""

import json
import sys

import pytest
from wandb_offline import read_offline_run

from tnexp.cli import main

TINY = [
    "experiment=quickstart_fast",
    "method.methods=[local,hybrid]",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "data.image_size=8",
    "model.width=8",
]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "2026-01-01_00-00-00"
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")  # nothing leaves the machine
    # The training path of a bare `uv run tnexp` on a quiet 2-core machine: the default
    # thread policy (auto, not the tests' OMP_NUM_THREADS=1) starts on 2 threads and counts
    # each stage's first step with FlopCounterMode (issue 14: timed Tucker paths broke
    # backward inside that step while every test passed on 1 thread).
    mp.delenv("OMP_NUM_THREADS", raising=False)
    mp.setattr("tnexp.runtime.usable_cores", lambda: 2)
    mp.setattr("tnexp.runtime.others_busy_cores", lambda: 0.0)
    mp.setattr(sys, "argv", ["tnexp", *TINY, f"hydra.run.dir={out}"])
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main()
    mp.undo()
    return out, printed.getvalue()


def test_every_stage_is_an_offline_wandb_run_of_one_group(quickstart):
    out, printed = quickstart
    stages = {"teacher": ("teacher", "pretrain"), "cr0.5/local": ("cr0.5", "local"),
              "cr0.5/hybrid": ("cr0.5", "hybrid")}  # fmt: skip
    for folder, (tag, method) in stages.items():
        (run_dir,) = (out / folder / "wandb").glob("offline-run-*")
        run = read_offline_run(run_dir)
        assert run["group"] == "quickstart-2026-01-01_00-00-00"
        assert {"quickstart", tag, method} <= set(run["tags"])
        results = json.loads((out / folder / "results.json").read_text())
        # The W&B config is the stage's config; the summary holds results.json's metrics.
        assert run["config"]["method"]["name"] == method
        assert run["config"]["tensorize"].get("cr") == results["config"]["tensorize"].get("cr")
        assert run["summary"]["best/val/top1"] == pytest.approx(
            results["metrics"]["best"]["val/top1"]
        )
        if method != "pretrain":  # the student right after tensorization
            assert run["summary"]["before/val/top1"] == pytest.approx(
                results["metrics"]["before"]["val/top1"]
            )
    assert "uv run wandb sync" in printed and "offline-run-*" in printed


def test_output_counts_stages_and_does_not_wrap(quickstart):
    out, printed = quickstart
    log = (out / "tnexp.log").read_text()  # Hydra's log file of the run
    assert "stage 1/3: pretraining the teacher" in log
    assert "stage 3/3: hybrid CR 0.5" in log
    assert log.count("GPU available") == 1  # Lightning's hardware lines once, no tips
    assert "torch threads: 2 (auto" in log and "tiny step" in log  # the default policy ran
    assert "Tip" not in log
    # Not a terminal: one line per validation instead of a progress bar.
    assert "epoch 2/2: train/loss_step" in log and "val/top1" in log
    table = [line for line in printed.splitlines() if "│" in line]
    assert len(table) == 3 and all("0.50" in row for row in table[1:])  # one line per row


def test_a_stage_resumes_from_its_folder(quickstart, monkeypatch):
    out, _ = quickstart
    stage = out / "cr0.5" / "local"
    before = json.loads((stage / "results.json").read_text())
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setattr(sys, "argv", ["tnexp", f"hydra.run.dir={stage}", "resume=auto",
                                      "trainer.max_epochs=3", "logger=csv"])  # fmt: skip
    main()
    after = json.loads((stage / "results.json").read_text())
    assert after["method"] == "local" and after["config"]["model"]["width"] == 8
    assert after["epochs"] == 3 and after["global_step"] == before["global_step"] * 3 // 2


def test_plot_and_summary(quickstart):
    out, _ = quickstart
    assert (out / "accuracy_vs_time.png").stat().st_size > 10_000
    rows = json.loads((out / "summary.json").read_text())
    assert [r["method"] for r in rows] == ["dense teacher", "local", "hybrid"]


def test_recovery_curve_starts_before_recovery_and_marks_the_hybrid_switch():
    from matplotlib.figure import Figure

    from tnexp.plots import draw_recovery, hybrid_switch_epoch, share_y

    history = [
        {"epoch": e, "optimization_s": 2.0 * (e + 1), "value": v}
        for e, v in enumerate([60.0, 80.0, 90.0])
    ]
    results = {"method": "hybrid", "config": {"method": {"local_epochs": 2}}}
    assert hybrid_switch_epoch(results) == 1
    assert hybrid_switch_epoch({**results, "method": "local"}) is None
    fig = Figure()
    left, right = fig.subplots(1, 2)
    line = draw_recovery(left, history, before=10.0, switch_epoch=1, scale=2.0, label="hybrid")
    assert list(line.get_xdata()) == [0.0, 1.0, 2.0, 3.0]
    assert list(line.get_ydata()) == [10.0, 60.0, 80.0, 90.0]
    before, switch = left.collections  # the hollow time-0 marker, then the switch star
    assert before.get_offsets().tolist() == [[0.0, 10.0]]
    assert switch.get_offsets().tolist() == [[2.0, 80.0]]
    right.plot([0, 1], [95.0, 99.0])
    share_y([left, right])
    assert left.get_ylim() == right.get_ylim() and left.get_ylim()[0] < 10 < 99 < left.get_ylim()[1]
