"""The thread policy (tnexp/runtime.py): decisions, configs, results.json, the load message."""

import json
import logging
import subprocess
import sys

import pytest
import torch
from stages import make_cfg

from tnexp.run import run_stage
from tnexp.runtime import (
    apply_thread_policy,
    choose_threads,
    current_choice,
    others_busy_cores,
    parse_threads,
    refine_for_work,
    usable_cores,
)
from tnexp.stages.prepare import prepare_stage


# ---------------------------------------------------------------- decisions (pure)
def test_auto_uses_every_usable_core_when_quiet():
    choice = choose_threads("auto", cores=8, env={})
    assert (choice.threads, choice.source) == (8, "auto")


def test_explicit_setting_wins_over_everything():
    choice = choose_threads(3, cores=2, jobs=2, others_busy=2.0, step_gflop=1e-3, env={})
    assert (choice.threads, choice.source) == (3, "runtime.threads")
    assert choose_threads("5", cores=2, env={"OMP_NUM_THREADS": "1"}).threads == 5


def test_omp_num_threads_is_respected_under_auto():
    choice = choose_threads("auto", cores=16, env={"OMP_NUM_THREADS": "3"})
    assert (choice.threads, choice.source) == (3, "OMP_NUM_THREADS")
    assert choose_threads("auto", cores=16, env={"OMP_NUM_THREADS": "4,2"}).threads == 4
    with pytest.raises(ValueError, match="OMP_NUM_THREADS"):
        choose_threads("auto", cores=16, env={"OMP_NUM_THREADS": "many"})


@pytest.mark.parametrize(
    ("cores", "jobs", "expected"), [(8, 2, 4), (8, 3, 2), (2, 2, 1), (2, 4, 1)]
)
def test_multirun_jobs_share_the_cores(cores, jobs, expected):
    assert choose_threads("auto", cores=cores, jobs=jobs, env={}).threads == expected


@pytest.mark.parametrize(("busy", "expected"), [(0.0, 2), (0.4, 2), (0.6, 1), (1.0, 1), (5.0, 1)])
def test_cores_other_processes_keep_busy_are_left_to_them(busy, expected):
    choice = choose_threads("auto", cores=2, others_busy=busy, env={})
    assert choice.threads == expected
    if expected == 1:
        assert "other processes" in choice.reason


def test_tiny_step_gets_one_thread_and_large_step_keeps_the_cores():
    tiny = choose_threads("auto", cores=8, step_gflop=0.01, tiny_step_gflop=0.5, env={})
    assert tiny.threads == 1 and "tiny step" in tiny.reason
    large = choose_threads("auto", cores=8, step_gflop=20.0, tiny_step_gflop=0.5, env={})
    assert large.threads == 8


@pytest.mark.parametrize("bad", [0, -1, "abc", "", None, True, 1.5, "2.5"])
def test_bad_settings_name_the_key_and_the_fix(bad):
    with pytest.raises(ValueError, match=r"runtime\.threads must be 'auto' or a whole number"):
        parse_threads(bad)


def test_usable_cores_follow_the_affinity(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert usable_cores() == 3


def test_a_busy_process_is_seen_as_busy():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        seen = others_busy_cores(0.5)
    finally:
        busy.kill()
        busy.wait()
    assert seen >= 0.5


# ---------------------------------------------------------------- applying it
def _quiet_two_cores(monkeypatch, load=0.05):
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr("tnexp.runtime.usable_cores", lambda: 2)
    monkeypatch.setattr("tnexp.runtime.others_busy_cores", lambda: 0.0)
    monkeypatch.setattr("os.getloadavg", lambda: (load, load, load))
    monkeypatch.setattr("os.cpu_count", lambda: 2)


def test_a_loaded_machine_is_reported_once_with_the_threads(monkeypatch, caplog):
    _quiet_two_cores(monkeypatch, load=3.2)
    monkeypatch.setattr("tnexp.runtime.others_busy_cores", lambda: 1.7)
    with caplog.at_level(logging.INFO, logger="tnexp"):
        _, choice = apply_thread_policy()
        apply_thread_policy()  # a later stage of the same process: no second message
    loaded = [r.getMessage() for r in caplog.records if "already loaded" in r.getMessage()]
    assert len(loaded) == 1
    assert "load average 3.20 on 2 usable cores" in loaded[0]
    assert "1 torch thread " in loaded[0]
    assert choice.threads == 1 and torch.get_num_threads() == 1
    chosen = [r for r in caplog.records if r.getMessage().startswith("torch threads: 1")]
    assert len(chosen) == 1  # the choice is logged once


@pytest.mark.parametrize("load", [0.05, 0.8])  # 0.8: e.g. the tail of a finished run
def test_a_quiet_machine_says_nothing_about_load(monkeypatch, caplog, load):
    _quiet_two_cores(monkeypatch, load=load)
    with caplog.at_level(logging.INFO, logger="tnexp"):
        _, choice = apply_thread_policy()
    assert choice.threads == 2 and torch.get_num_threads() == 2
    assert not [r for r in caplog.records if "already loaded" in r.getMessage()]


def test_runtime_config_composes_and_bad_values_are_clear(tmp_path):
    cfg = make_cfg(tmp_path, "method=global")
    assert cfg.runtime.threads == "auto" and cfg.runtime.tiny_step_gflop > 0
    prepare_stage(make_cfg(tmp_path, "method=global", "runtime.threads=3"))
    assert torch.get_num_threads() == 3
    assert current_choice().source == "runtime.threads"
    for bad in ("0", "abc"):
        with pytest.raises(ValueError, match=r"runtime\.threads must be .*runtime\.threads=1"):
            prepare_stage(make_cfg(tmp_path, "method=global", f"runtime.threads={bad}"))
    with pytest.raises(ValueError, match=r"runtime\.tiny_step_gflop"):
        prepare_stage(make_cfg(tmp_path, "method=global", "runtime.tiny_step_gflop=-1"))
    with pytest.raises(ValueError, match=r"replaced by runtime\.threads"):
        prepare_stage(make_cfg(tmp_path, "method=local", "+method.slice_jobs.threads_per_job=2"))


def test_cpu_ddp_ranks_share_the_cores(tmp_path, monkeypatch):
    _quiet_two_cores(monkeypatch)
    monkeypatch.setattr("tnexp.runtime.usable_cores", lambda: 8)
    cfg = make_cfg(tmp_path, "method=global", "trainer.accelerator=cpu", "trainer.devices=4")
    prepare_stage(cfg)
    assert torch.get_num_threads() == 2 and current_choice().jobs == 4


def test_data_workers_follow_the_policy(tmp_path, monkeypatch):
    _quiet_two_cores(monkeypatch)
    out = prepare_stage(make_cfg(tmp_path, "method=global", "data.num_workers=auto"))
    assert out.data.num_workers == 0  # both cores go to torch's threads
    monkeypatch.setattr("tnexp.runtime.usable_cores", lambda: 8)
    out = prepare_stage(make_cfg(tmp_path, "method=global", "data.num_workers=auto"))
    assert out.data.num_workers == 0  # 8 threads on 8 cores
    out = prepare_stage(
        make_cfg(tmp_path, "method=global", "data.num_workers=auto", "runtime.threads=2")
    )
    assert out.data.num_workers == 4 and current_choice().data_workers == 4
    with pytest.raises(ValueError, match=r"data\.num_workers"):
        prepare_stage(make_cfg(tmp_path, "method=global", "data.num_workers=-2"))


def test_stages_record_their_thread_choice_and_drop_to_one_for_tiny_work(tmp_path, monkeypatch):
    # auto on 2 quiet cores: 2 threads at the start; the first step of these tiny models
    # counts far below runtime.tiny_step_gflop, so the rest of each stage runs on 1.
    _quiet_two_cores(monkeypatch)
    teacher = tmp_path / "teacher"
    hybrid = ["method.local_epochs=1", "trainer.max_epochs=2", f"teacher.path={teacher}"]
    for out, overrides in (
        (teacher, ["method=pretrain"]),
        (tmp_path / "hy", ["method=hybrid", *hybrid]),
    ):
        results = run_stage(make_cfg(out, *overrides))
        recorded = json.loads((out / "results.json").read_text())["runtime"]
        assert recorded == results["runtime"]
        assert recorded["source"] == "auto" and recorded["cores"] == 2
        assert 0 < recorded["step_gflop"] < 0.1
        assert recorded["threads"] == 1 == recorded["threads_in_use"]
        assert "tiny step" in recorded["reason"]
        assert recorded["data_workers"] == 0


def test_timed_tucker_paths_train_while_the_first_step_is_counted(tmp_path, monkeypatch):
    # Issue 14: `uv run tnexp` with timed Tucker paths crashed in its local stage. The
    # policy counts the first step's FLOPs (FlopCounterMode, auto threads on 2 quiet
    # cores), and timing inside that step broke backward. Local and global modules, with
    # Tucker's order=auto timed (tensorize.order_timing=tucker).
    from tnexp.tn.timing import TIMED_CHOICES

    _quiet_two_cores(monkeypatch)
    TIMED_CHOICES.clear()
    teacher = tmp_path / "teacher"
    run_stage(make_cfg(teacher, "method=pretrain"))
    for method in ("local", "global"):
        out = tmp_path / method
        timed = "tensorize.order_timing=tucker"
        results = run_stage(make_cfg(out, f"method={method}", f"teacher.path={teacher}", timed))
        assert results["runtime"]["step_gflop"] > 0  # the first step was counted
        assert json.loads((out / "results.json").read_text())["epochs"] == 1
    timed = [key for key in TIMED_CHOICES._entries if key[0][0] == "TuckerConv2d"]
    assert any(key[1][3] for key in timed)  # later training steps timed their paths


def test_only_auto_choices_are_refined_by_the_measured_work(monkeypatch):
    _quiet_two_cores(monkeypatch)
    apply_thread_policy()
    assert refine_for_work(0.01, 0.5).threads == 1 and torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    apply_thread_policy()
    assert refine_for_work(0.01, 0.5) is None and torch.get_num_threads() == 2


def test_the_quickstart_summary_records_each_stages_threads():
    from tnexp.stages.quickstart import summary_rows

    def stage(method, threads, cr=None):
        return {
            "method": method,
            "task": {"monitor": "val/top1"},
            "params": {"student": 10},
            "metrics": {"best": {"val/top1": 90.0}, "final": {"val/top1": 89.0}},
            "time": {"optimization_s": 1.0, "time_to_best_s": 0.5},
            "config": {"tensorize": {"cr": cr}},
            "tensorize": {"totals": {"model_cr": 0.5}},
            "runtime": {"threads": threads},
        }

    rows = summary_rows(stage("pretrain", 2), [stage("local", 1, cr=0.5)])
    assert [r["threads"] for r in rows] == [2, 1]
