"""Slice-parallel local tensorization: per-slice jobs, skip-done reruns, assemble, launchers."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from safetensors.torch import load_file
from stages import FAST as BASE_FAST
from stages import make_cfg as make_base_cfg

from tnexp.config import CONFIG_DIR
from tnexp.modules import NonFiniteLossError
from tnexp.results import SCHEMA_VERSION
from tnexp.run import run, run_stage
from tnexp.slice_jobs import (
    RECORD_FILE,
    RUN_FILE,
    WEIGHTS_FILE,
    SliceJobsError,
    job_count,
    job_slice_indices,
    sweep_hint,
)
from tnexp.stages.prepare import prepare_stage

FAST = [*BASE_FAST, "trainer.max_epochs=2"]
# small_resnet has four residual blocks; groups of two make a 2-slice plan.
TWO_SLICES = ["method.slicing=group:2"]
# Per-slice jobs and the all-slices run are bitwise identical on CPU with the same thread
# count (checked below); across processes with other thread counts, float reductions may
# differ in the last bits, hence this tolerance for the multirun comparison.
CROSS_PROCESS_ATOL = 1e-5


def make_cfg(tmp: Path, *overrides: str, fast: bool = True):
    # jobs of one test share a feature cache beside their output folders
    epochs = ["trainer.max_epochs=2"] if fast else []
    return make_base_cfg(tmp, *epochs, *overrides, fast=fast, cache_dir=tmp.parent / "cache")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    run_stage(
        make_cfg(out, "method=pretrain", "trainer.max_epochs=1", "trainer.limit_train_batches=8")
    )
    return out


def _local(tmp: Path, teacher: Path, *overrides: str) -> list[str]:
    return ["method=local", f"teacher.path={teacher}", *TWO_SLICES, *overrides]


def _assemble(teacher: Path, jobs: Path) -> list[str]:
    return [
        "method=assemble",
        f"teacher.path={teacher}",
        *TWO_SLICES,
        f"method.slice_jobs.dir={jobs}",
    ]


def _student_state(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "student" / "model.safetensors"))


def _record(jobs: Path, name: str) -> dict:
    return json.loads((jobs / "slices" / name / RECORD_FILE).read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, teacher_dir):
    """Both slices trained as two per-slice jobs (both selection styles), online features."""
    root = tmp_path_factory.mktemp("jobs")
    jobs = root / "slices_run"
    run_stage(
        make_cfg(
            root / "job0",
            *_local(root, teacher_dir, f"method.slice_jobs.dir={jobs}", "method.slices=[0]"),
        )
    )
    run_stage(
        make_cfg(
            root / "job1",
            *_local(root, teacher_dir, f"method.slice_jobs.dir={jobs}", "method.slice_jobs.job=1"),
        )
    )
    return root, jobs


def test_two_slice_jobs_assemble_to_the_all_slices_run(trained, teacher_dir, tmp_path):
    _, jobs = trained
    full = run_stage(make_cfg(tmp_path / "full", *_local(tmp_path, teacher_dir)))
    assembled = run(make_cfg(tmp_path / "asm", *_assemble(teacher_dir, jobs)))
    a, b = _student_state(tmp_path / "full"), _student_state(tmp_path / "asm")
    assert a.keys() == b.keys()
    changed = 0
    for key in a:
        # Same process, same threads: the jobs reproduce the all-slices run bit for bit.
        assert torch.equal(a[key], b[key]), key
        changed += int("layer" in key)
    assert changed > 0
    teacher = load_file(str(teacher_dir / "teacher.safetensors"))
    assert not torch.equal(a["layer1.0.bn1.weight"], teacher["layer1.0.bn1.weight"])  # trained

    saved = json.loads((tmp_path / "asm" / "results.json").read_text())
    assert saved["method"] == assembled["method"] == "assemble"
    assert saved["metrics"]["final"]["val/top1"] == pytest.approx(
        full["metrics"]["final"]["val/top1"]
    )
    assert "val/top5" in saved["metrics"]["final"]
    # the one schema: what assemble lacked before (data, a version, a run name)
    assert saved["schema_version"] == SCHEMA_VERSION and saved["data"]["name"]
    assert saved["run_name"].startswith("assemble-cr")
    times = saved["time"]["slice_jobs"]
    assert times["count"] == 2 and times["jobs"] == 2
    per_job = [v["optimization_s"] for v in times["per_slice"].values()]
    assert times["sum_optimization_s"] == pytest.approx(sum(per_job))
    assert times["max_optimization_s"] == pytest.approx(max(per_job))
    assert min(per_job) > 0

    run_file = json.loads((jobs / RUN_FILE).read_text())
    names = [s["name"] for s in run_file["plan"]["slices"]]
    assert names == ["layer1.0+layer2.0", "layer3.0+layer4.0"]
    for index, name in enumerate(names):
        record = _record(jobs, name)
        assert record["status"] == "ok" and record["slice"]["index"] == index
        assert [e["epoch"] for e in record["loss"]["epochs"]] == [0, 1]
        assert [s[0] for s in record["loss"]["steps"]] == list(range(1, 7))
        assert record["time"]["optimization_s"] > 0
        assert record["features"]["mode"] == "online"
        assert record["spec_hash"] == run_file["identity"]["spec_hash"]
        assert record["teacher_fingerprint"] == run_file["identity"]["teacher_fingerprint"]
        assert record["seed"] == 0 and record["hostname"]
        weights = load_file(str(jobs / "slices" / name / WEIGHTS_FILE))
        assert all(k.startswith(tuple(p + "." for p in record["slice"]["paths"])) for k in weights)


def test_rerun_trains_only_missing_or_failed_slices(trained, teacher_dir, tmp_path):
    _, original = trained
    jobs = tmp_path / "jobs"
    shutil.copytree(original, jobs)
    first, second = "layer1.0+layer2.0", "layer3.0+layer4.0"
    (jobs / "slices" / second / RECORD_FILE).unlink()
    before = _record(jobs, first)
    mtime = (jobs / "slices" / first / WEIGHTS_FILE).stat().st_mtime_ns
    # One job covering both slices: it must train only the missing one.
    group = [
        f"method.slice_jobs.dir={jobs}",
        "method.slice_jobs.group=2",
        "method.slice_jobs.job=0",
    ]
    results = run_stage(make_cfg(tmp_path / "rerun", *_local(tmp_path, teacher_dir, *group)))
    assert not results.get("skipped")
    assert _record(jobs, first) == before
    assert (jobs / "slices" / first / WEIGHTS_FILE).stat().st_mtime_ns == mtime
    redone = _record(jobs, second)
    assert redone["status"] == "ok" and redone["job"]["slices"] == [second]
    # Deterministic: the retrained slice equals the one trained the first time.
    old = load_file(str(original / "slices" / second / WEIGHTS_FILE))
    new = load_file(str(jobs / "slices" / second / WEIGHTS_FILE))
    assert all(torch.equal(old[k], new[k]) for k in old)
    # Everything done now: the same job skips training.
    again = run_stage(make_cfg(tmp_path / "again", *_local(tmp_path, teacher_dir, *group)))
    assert again["skipped"] and not (tmp_path / "again" / "results.json").exists()
    assert _record(jobs, second) == redone


def test_assemble_refuses_missing_and_mismatched_slices(trained, teacher_dir, tmp_path):
    _, original = trained
    jobs = tmp_path / "jobs"
    shutil.copytree(original, jobs)
    (jobs / "slices" / "layer1.0+layer2.0" / WEIGHTS_FILE).unlink()
    base = _assemble(teacher_dir, jobs)
    with pytest.raises(SliceJobsError) as err:
        run(make_cfg(tmp_path / "a", *base))
    assert "weights file" in str(err.value) and "'layer1.0+layer2.0'" in str(err.value)
    assert "layer3.0+layer4.0" not in str(err.value)  # the intact slice is fine

    (jobs / "slices" / "layer3.0+layer4.0" / RECORD_FILE).unlink()
    with pytest.raises(SliceJobsError) as err:
        run(make_cfg(tmp_path / "b", *base, "tensorize.cr=0.7"))
    message = str(err.value)
    assert "another tensorization spec" in message  # the other CR changes every rank
    assert "slice 1 'layer3.0+layer4.0': missing" in message
    assert "run.json" in message and "identity.spec_hash" in message
    assert not (tmp_path / "b" / "results.json").exists()


def test_assemble_refuses_slices_from_another_feature_cache(teacher_dir, tmp_path):
    jobs = tmp_path / "jobs"
    cached = [
        "method.features=cached",
        "method.cache.dtype=float32",
        f"method.slice_jobs.dir={jobs}",
    ]
    run_stage(
        make_cfg(tmp_path / "j0", *_local(tmp_path, teacher_dir, *cached, "method.slices=[0]"))
    )
    assert _record(jobs, "layer1.0+layer2.0")["features"]["mode"] == "cached"
    # Capture a float16 cache of the same teacher (a different manifest), then assemble with it.
    summary = run(
        make_cfg(tmp_path / "cap", "method=capture", f"teacher.path={teacher_dir}", *TWO_SLICES)
    )
    assert summary["jobs"] == 2 and summary["cache"]["dtype"] == "float16"
    assert summary["sweep"] == "method.slice_jobs.group=1 method.slice_jobs.job=range(0,2)"
    asm = _assemble(teacher_dir, jobs)
    with pytest.raises(SliceJobsError) as err:
        run(make_cfg(tmp_path / "a", *asm, "method.features=cached", "method.cache.dtype=float16"))
    message = str(err.value)
    assert "'layer1.0+layer2.0': trained against other features" in message
    assert "(float32), current cache" in message and "(float16)" in message
    assert "'layer3.0+layer4.0': missing" in message
    with pytest.raises(SliceJobsError, match="other features"):
        run(make_cfg(tmp_path / "b", *asm))  # online vs cached


def test_run_file_refuses_a_job_with_other_settings(trained, teacher_dir, tmp_path):
    _, original = trained
    jobs = tmp_path / "jobs"
    shutil.copytree(original, jobs)
    cfg = make_cfg(
        tmp_path / "j",
        *_local(tmp_path, teacher_dir, f"method.slice_jobs.dir={jobs}", "method.slices=[0]"),
        "method.local.optimizer.lr=0.5",
    )
    with pytest.raises(SliceJobsError, match=r"differs in: .*training\.local\.optimizer\.lr"):
        run_stage(cfg)


def test_failed_job_records_the_error(teacher_dir, tmp_path):
    jobs = tmp_path / "jobs"
    cfg = make_cfg(
        tmp_path / "j",
        *_local(tmp_path, teacher_dir, f"method.slice_jobs.dir={jobs}", "method.slices=[1]"),
        "method.local.optimizer.lr=1e30",
    )
    with pytest.raises(NonFiniteLossError):
        run_stage(cfg)
    record = _record(jobs, "layer3.0+layer4.0")
    assert record["status"] == "failed" and "NonFiniteLossError" in record["error"]
    assert not (jobs / "slices" / "layer3.0+layer4.0" / WEIGHTS_FILE).exists()
    asm = _assemble(teacher_dir, jobs)
    with pytest.raises(SliceJobsError, match=r"slice 1 'layer3.0\+layer4.0': failed: NonFinite"):
        run(make_cfg(tmp_path / "a", *asm))


# ---------------------------------------------------------------- selection and launch checks
def test_job_ranges():
    assert job_count(8, 3) == 3
    assert job_slice_indices(8, 2, 3) == [6, 7]
    assert job_slice_indices(4, 1) == [1]
    with pytest.raises(ValueError, match=r"range\(0,3\)"):
        job_slice_indices(8, 3, 3)
    assert sweep_hint(8, 3).endswith("method.slice_jobs.job=range(0,3)")


def test_slices_and_job_are_exclusive(tmp_path):
    cfg = make_cfg(tmp_path, "method=local", "method.slices=[0]", "method.slice_jobs.job=1")
    with pytest.raises(ValueError, match="not both"):
        prepare_stage(cfg, run_mode="RUN", launcher=None)


def test_slice_jobs_need_local_teacher_inputs(tmp_path):
    # method=hybrid has no method.slice_jobs (configs/method/hybrid.yaml): composition
    # refuses the override, and a node forced in with `+` is refused by the stage.
    with pytest.raises(ConfigCompositionException, match="slice_jobs"):
        make_cfg(tmp_path, "method=hybrid", f"method.slice_jobs.dir={tmp_path}")
    cfg = make_cfg(tmp_path, "method=hybrid", f"+method.slice_jobs.dir={tmp_path}")
    with pytest.raises(ValueError, match="method=local"):
        prepare_stage(cfg, run_mode="RUN", launcher=None)
    cfg = make_cfg(
        tmp_path,
        "method=local",
        f"method.slice_jobs.dir={tmp_path}",
        "method.local.input_source=student",
    )
    with pytest.raises(ValueError, match="input_source=teacher"):
        prepare_stage(cfg, run_mode="RUN", launcher=None)


@pytest.mark.parametrize("trainer", ["ddp", "fsdp", "ddp_multinode"])
def test_distributed_trainers_refused_in_multiruns(tmp_path, trainer):
    cfg = make_cfg(tmp_path, "method=global", f"trainer={trainer}", fast=False)
    with pytest.raises(ValueError, match="inside a Hydra multirun"):
        prepare_stage(cfg, run_mode="MULTIRUN", launcher="joblib")
    prepare_stage(cfg, run_mode="RUN", launcher=None)  # a single run is fine


def test_multirun_detected_from_the_hydra_config(tmp_path):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["method=global", "trainer=ddp", "hydra/launcher=tnexp_joblib"],
            return_hydra_config=True,
        )
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
    instance = HydraConfig.instance()
    saved = instance.cfg
    try:
        instance.set_config(cfg)
        with pytest.raises(ValueError, match="inside a Hydra multirun"):
            prepare_stage(cfg)
    finally:
        instance.cfg = saved


def test_joblib_jobs_use_no_dataloader_workers_and_fewer_threads(tmp_path, monkeypatch):
    monkeypatch.setattr("tnexp.stages.prepare.joblib_n_jobs", lambda: 2)
    monkeypatch.setattr("tnexp.runtime.usable_cores", lambda: 8)
    monkeypatch.setattr("tnexp.runtime.others_busy_cores", lambda: 0.0)
    monkeypatch.delenv("OMP_NUM_THREADS")
    cfg = make_cfg(tmp_path, "method=local", "data.num_workers=3")
    out = prepare_stage(cfg, run_mode="MULTIRUN", launcher="joblib")
    assert out.data.num_workers == 0 and cfg.data.num_workers == 3
    assert torch.get_num_threads() == 4  # 8 cores / 2 concurrent jobs
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    prepare_stage(cfg, run_mode="MULTIRUN", launcher="submitit")
    assert torch.get_num_threads() == 6


# ---------------------------------------------------------------- configs
@pytest.mark.parametrize("trainer", ["ddp", "fsdp", "ddp_multinode"])
def test_distributed_trainer_configs_compose(tmp_path, trainer):
    cfg = make_cfg(tmp_path, "method=global", f"trainer={trainer}", fast=False)
    assert cfg.trainer.strategy in ("ddp", "fsdp")
    assert cfg.trainer.accelerator == "gpu"
    if trainer == "ddp_multinode":
        assert cfg.trainer.num_nodes == 2 and cfg.trainer.devices == 4
    if trainer == "ddp":  # builds on CPU with one device
        from lightning.pytorch.strategies import DDPStrategy

        from tnexp.callbacks import OptimizationTimer
        from tnexp.stages.build import build_task
        from tnexp.stages.trainer import build_trainer

        cpu = make_cfg(
            tmp_path,
            "method=global",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=1",
            "trainer.sync_batchnorm=false",
            "logger=csv",
            "callbacks.progress_bar=none",
            fast=False,
        )
        task = build_task(cpu)
        trainer_obj = build_trainer(cpu, tmp_path, [], OptimizationTimer(), task, reload=False)
        assert isinstance(trainer_obj.strategy, DDPStrategy)


@pytest.mark.parametrize(
    ("launcher", "target", "key", "value"),
    [
        ("tnexp_joblib", "JoblibLauncher", "n_jobs", 2),
        ("tnexp_slurm", "SlurmLauncher", "gpus_per_node", 1),
    ],
)
def test_launcher_presets_compose(launcher, target, key, value):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["method=local", f"hydra/launcher={launcher}"],
            return_hydra_config=True,
        )
    assert cfg.hydra.launcher._target_.endswith(target)
    assert cfg.hydra.launcher[key] == value
    if launcher == "tnexp_slurm":
        for field in ("partition", "cpus_per_task", "timeout_min", "mem_gb", "array_parallelism"):
            assert field in cfg.hydra.launcher


def test_method_configs_compose(tmp_path):
    for method in ("assemble", "capture"):
        cfg = make_cfg(tmp_path, f"method={method}", fast=False)
        assert cfg.method.name == method and "slice_jobs" in cfg.method
    assert make_cfg(tmp_path, "method=capture", fast=False).method.features == "cached"


def test_cache_lock_serialises_captures(tmp_path):
    import threading
    import time

    from tnexp.stages.feature_cache import cache_lock

    entered = threading.Event()

    def other_job():
        with cache_lock(tmp_path / "cache"):
            entered.set()

    with cache_lock(tmp_path / "cache"):
        thread = threading.Thread(target=other_job)
        thread.start()
        time.sleep(0.3)
        assert not entered.is_set()  # waits while the first capture holds the lock
    thread.join(timeout=10)
    assert entered.is_set()


# ---------------------------------------------------------------- a real multirun
@pytest.mark.slow  # three fresh Python processes importing torch: ~25-45 s on 2 cores
def test_joblib_multirun_writes_every_slice(trained, teacher_dir, tmp_path):
    _, reference = trained
    jobs = tmp_path / "jobs"
    command = [
        sys.executable,
        "-m",
        "tnexp.cli",
        "-m",
        *FAST,
        *_local(tmp_path, teacher_dir),
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"method.slice_jobs.dir={jobs}",
        "method.slice_jobs.job=0,1",
        "data.num_workers=2",  # must be forced to 0 inside loky workers
        "hydra/launcher=tnexp_joblib",
        "hydra.launcher.n_jobs=2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("layer1.0+layer2.0", "layer3.0+layer4.0"):
        record = _record(jobs, name)
        assert record["status"] == "ok"
        ours = load_file(str(jobs / "slices" / name / WEIGHTS_FILE))
        theirs = load_file(str(reference / "slices" / name / WEIGHTS_FILE))
        for key in theirs:  # other processes, one torch thread each: equal within tolerance
            torch.testing.assert_close(ours[key], theirs[key], atol=CROSS_PROCESS_ATOL, rtol=0)
    pids = {_record(jobs, n)["pid"] for n in ("layer1.0+layer2.0", "layer3.0+layer4.0")}
    assert os.getpid() not in pids
    assert len(list((tmp_path / "sweep").glob("*/results.json"))) == 2
