"""Bad input, hostile files and unlucky runs: a checked list (docs/reliability.md).

Every case asserts the error type, that the message names the problem *and* a fix, and,
where an earlier run's files are around, that none of them was damaged. Stages are the
fast digits runs of tests/stages.py; keep this file quick (it runs in the default suite).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file
from stages import make_cfg
from torch.utils.data import DataLoader, TensorDataset

from tnexp.cli import main, user_error_message
from tnexp.config import CONFIG_DIR
from tnexp.errors import ConfigError, IntegrityError, RunDirectoryError, TnexpError
from tnexp.factory import TensorizeSpec, load_tensorized, save_tensorized, tensorize
from tnexp.features import (
    FeatureCacheError,
    FeatureCacheIntegrityError,
    clean_partials,
    open_feature_cache,
    write_feature_cache,
)
from tnexp.integrity import file_checksum
from tnexp.models import small_resnet
from tnexp.models.builders import MODEL_BUILDERS
from tnexp.modules import DivergenceGuard, NonFiniteLossError, TrainingDivergedError
from tnexp.run import run, run_stage
from tnexp.rundir import LOCK_FILE, run_directory_lock
from tnexp.slice_jobs import RECORD_FILE, WEIGHTS_FILE, SliceJobsError
from tnexp.slicing import make_slice_plan
from tnexp.tn import TensorizationError

SPEC = {"rules": [{"pattern": "layer*.*.conv*", "cr": 0.5}]}


# ----------------------------------------------------------------------- helpers
def snapshot(directory: Path) -> dict[str, str]:
    """Checksum of every file below ``directory`` (to prove nothing was damaged)."""
    return {
        str(p.relative_to(directory)): file_checksum(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def says(err: pytest.ExceptionInfo | BaseException, *patterns: str) -> str:
    """Assert the message matches every pattern (the problem, then the fix); return it."""
    message = str(err.value if isinstance(err, pytest.ExceptionInfo) else err)
    for pattern in patterns:
        assert re.search(pattern, message, re.S), f"{pattern!r} not in: {message}"
    return message


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    run_stage(make_cfg(out, "method=pretrain", "trainer.limit_train_batches=4"))
    return out


@pytest.fixture(scope="module")
def saved_student(tmp_path_factory):
    """A saved tensorized model whose base is built from its tensorize.json."""
    out = tmp_path_factory.mktemp("saved")
    base_config = {"_target_": "tnexp.models.small_resnet", "num_classes": 10, "width": 8}
    student, report = tensorize(small_resnet(width=8), SPEC)
    save_tensorized(student, report, out, base_config=base_config)
    return out


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def cli(monkeypatch):
    """Run ``tnexp`` in this process; Hydra's logging setup is undone afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def call(*args: str) -> int:
        monkeypatch.setattr(sys, "argv", ["tnexp", *args])
        try:
            main()
        except SystemExit as exit_:
            return int(exit_.code or 0)
        finally:
            os.environ.pop("HYDRA_FULL_ERROR", None)  # main() sets it for Hydra
        return 0

    yield call
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


# ====================================================== 1. nothing runs from a model folder
@pytest.mark.parametrize(
    "target, args",
    [
        ("builtins.open", {"file": "MARKER", "mode": "w"}),
        ("shutil.copyfile", {"src": __file__, "dst": "MARKER"}),
        ("torch.load", {"f": "MARKER", "weights_only": False}),
        ("tnexp.models.small_resnet", {"_args_": ["MARKER"]}),
    ],
)
def test_crafted_base_config_never_runs(saved_student, tmp_path, target, args):
    folder = copy_of(saved_student, tmp_path / "shared")
    marker = tmp_path / "marker"
    args = {k: (str(marker) if v == "MARKER" else v) for k, v in args.items()}
    spec = json.loads((folder / "tensorize.json").read_text())
    spec["base_config"] = {"_target_": target, **args}
    (folder / "tensorize.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError) as err:
        load_tensorized(folder)
    says(err, "refusing", r"base=model")
    assert not marker.exists()


def test_remote_code_from_a_model_folder_is_refused(saved_student, tmp_path):
    folder = copy_of(saved_student, tmp_path / "shared")
    spec = json.loads((folder / "tensorize.json").read_text())
    spec["base_config"] = {
        "_target_": "tnexp.models.hf.build_causal_lm",
        "name": str(tmp_path),
        "trust_remote_code": True,
    }
    (folder / "tensorize.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError) as err:
        load_tensorized(folder)
    says(err, "trust_remote_code", "refusing", "base=")


def test_every_model_config_target_is_an_allowed_builder():
    paths = [*Path(CONFIG_DIR, "model").glob("*.yaml")]
    paths += Path(CONFIG_DIR, "debug", "smoke", "model").glob("*.yaml")
    for path in paths:
        cfg = yaml.safe_load(path.read_text())
        if "_target_" in cfg:
            assert cfg["_target_"] in MODEL_BUILDERS, path


# ====================================================== 7. saved models: integrity
def test_saved_model_round_trip_is_verified(saved_student):
    model, report = load_tensorized(saved_student)
    assert len(report.layers) == 8 and model is not None
    spec = json.loads((saved_student / "tensorize.json").read_text())
    assert spec["weights_checksum"].startswith("xxh3_128:")


@pytest.mark.parametrize("damage", ["flip", "truncate", "json", "json_keys"])
def test_damaged_saved_model_is_refused(saved_student, tmp_path, damage):
    folder = copy_of(saved_student, tmp_path / "m")
    weights, spec = folder / "model.safetensors", folder / "tensorize.json"
    if damage == "flip":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x01
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "json":
        spec.write_text(spec.read_text()[:50])
    else:
        spec.write_text(json.dumps({"base_config": None}))
    with pytest.raises(IntegrityError) as err:
        load_tensorized(folder)
    says(err, re.escape(str(folder)), "re-save the model")


def test_truncated_weights_without_checksum_name_the_file(saved_student, tmp_path):
    # Files from before checksums were recorded: safetensors' own error becomes ours.
    folder = copy_of(saved_student, tmp_path / "m")
    spec = json.loads((folder / "tensorize.json").read_text())
    del spec["weights_checksum"]
    (folder / "tensorize.json").write_text(json.dumps(spec))
    (folder / "model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(IntegrityError) as err:
        load_tensorized(folder)
    says(err, "model.safetensors is not a readable safetensors", "re-save")


def test_missing_model_files(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_tensorized(tmp_path)
    says(err, "is missing", "save_tensorized")


# ====================================================== 8. rules and settings
@pytest.mark.parametrize(
    "rule, problem, fix",
    [
        ({"pattern": "layer*", "cr": 0.5, "ranks": [4, 4]}, "cr=0.5 and ranks", "keep one"),
        ({"pattern": "fc", "cr": 0.5, "bond_dim": 4}, "cr=0.5 and bond_dim", "keep one"),
        ({"pattern": "layer*", "cr": 0.5, "rnaks": [4, 4]}, "rule 0 .*'rnaks'", "'ranks'"),
        ({"pattern": None, "cr": 0.5}, "pattern is missing", "glob"),
        ({"pattern": "None", "cr": 0.5}, "pattern is missing", "glob"),
        ({"cr": 0.5}, "pattern is missing", "glob"),
        (
            {"pattern": "fc", "cr": 0.5, "in_factors": [8, 8], "out_factors": [2, 5, 1]},
            "fc \\(rule 'fc'\\).*different lengths",
            "equal length",
        ),
        ({"pattern": "layer*", "cr": "half"}, "rule 'layer\\*'", "number in \\(0, 1\\)"),
    ],
)
def test_conflicting_or_broken_rules(rule, problem, fix):
    with pytest.raises(TensorizationError) as err:
        tensorize(torchvision.models.resnet18(num_classes=10), {"rules": [rule]})
    says(err, problem, fix)


@pytest.mark.parametrize(
    "spec, problem, fix",
    [  # cases that were already handled: still one clear error each
        ({"rules": [{"pattern": "layer9.*", "cr": 0.5}]}, "matches no", "patterns are globs"),
        ({"rules": [{"pattern": "layer*", "cr": 1.5}]}, "between 0 and 1", "0.5|strictly"),
        ({"rules": [{"pattern": "layer1.0.conv1", "ranks": [65, 8]}]}, "r_out <= 64", ""),
        ({"rules": [{"pattern": "fc", "cr": 0.5, "in_factors": [7, 73]}]}, "multiply", "e.g."),
    ],
)
def test_already_handled_spec_errors(spec, problem, fix):
    with pytest.raises(TensorizationError) as err:
        tensorize(torchvision.models.resnet18(num_classes=10), spec)
    says(err, problem, fix)


def test_mismatched_factors_name_the_layer():
    spec = {"rules": [{"pattern": "fc", "cr": 0.5, "in_factors": [16, 16]}]}
    with pytest.raises(TensorizationError) as err:
        tensorize(torchvision.models.resnet18(num_classes=10), spec)
    says(err, "fc: input factors", "product is 512")


def test_grouped_conv_is_refused():
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, groups=2))
    with pytest.raises(TensorizationError) as err:
        tensorize(model, {"rules": [{"pattern": "0", "cr": 0.5}]})
    says(err, "grouped", "exclude|pattern")


def test_spec_from_config_names_unknown_keys():
    with pytest.raises(TensorizationError) as err:
        TensorizeSpec.from_config({"rules": [{"pattern": "fc", "cr": 0.5, "bonddim": 3}]})
    says(err, "'bonddim'", "did you mean 'bond_dim'")


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_smoke_keeps_command_line_overrides():
    overrides = ["experiment=paper/cifar10/local_cr0.5", "debug=smoke", "trainer.max_epochs=3"]
    cfg = _compose(*overrides, "data.train_subset=24")
    assert cfg.trainer.max_epochs == 3  # explicit beats debug=smoke
    assert cfg.data.train_subset == 24
    assert cfg.model.width == 4  # the rest of debug=smoke applies
    assert cfg.trainer.limit_train_batches == 2


def test_smoke_refuses_an_override_it_cannot_keep():
    from tnexp.stages.build import build_model

    cfg = _compose("experiment=paper/gpt2xl/local", "debug=smoke", "model.gguf_file=x.gguf")
    with pytest.raises(Exception) as err:  # Hydra's InstantiationException around it
        build_model(cfg)
    cause = err.value.__cause__  # what the CLI prints (tnexp.cli.user_error_message)
    assert isinstance(cause, ConfigError)
    says(cause, "model.gguf_file", "Drop the override|without debug=smoke")


def test_old_smoke_spelling_is_refused_with_the_new_one():
    from tnexp.config import check_experiment_overrides

    with pytest.raises(ConfigError, match="debug=smoke"):
        check_experiment_overrides(["smoke=true"], CONFIG_DIR)


def test_unknown_config_option_is_one_message(tmp_path, cli, capsys):
    assert cli("data=nope", f"hydra.run.dir={tmp_path}") == 2
    last = capsys.readouterr().err.strip()
    assert last.startswith("tnexp: error:") and "data/nope" in last and "digits" in last
    assert "search path" not in last


# ====================================================== 10. the command's error output
def test_cli_prints_tnexp_errors_last_with_exit_2(tmp_path, cli, capsys):
    assert cli("method=global", "teacher.path=/nonexistent", f"hydra.run.dir={tmp_path}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tnexp: error: teacher checkpoint /nonexistent does not exist")
    assert "method=pretrain" in err[-1] and "Traceback" not in "\n".join(err)


def test_cli_names_an_unwritable_run_directory(tmp_path, cli, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert cli(f"hydra.run.dir={blocker}/run") == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cannot write the run directory" in last and "hydra.run.dir" in last
    assert "NotADirectoryError" in last


def test_hydra_logging_failure_is_reported_with_its_cause():
    try:
        try:
            raise PermissionError(13, "Permission denied", "/x/run/train.log")
        except PermissionError as cause:
            raise ValueError("Unable to configure handler 'file'") from cause
    except ValueError as err:
        message = user_error_message(err)
    assert message is not None and "PermissionError" in message and "hydra.run.dir" in message


def test_unwritable_run_directory_in_a_stage(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    with pytest.raises(RunDirectoryError) as err:
        run_stage(make_cfg(blocker / "run", "method=pretrain"))
    says(err, "cannot write the run directory", "hydra.run.dir")
    assert blocker.read_text() == "keep"


# ====================================================== 5. one run per run directory
def test_second_run_in_a_live_run_directory_is_refused(teacher_dir, tmp_path):
    before = snapshot(teacher_dir)
    with run_directory_lock(teacher_dir):  # a live run (this process) holds it
        with pytest.raises(RunDirectoryError) as err:
            run_stage(make_cfg(teacher_dir, "method=pretrain"))
        says(err, f"PID {os.getpid()}", "this host", "another directory", "rm ")
    assert snapshot(teacher_dir) == before
    assert not (teacher_dir / LOCK_FILE).exists()  # released


def test_cli_refuses_a_live_run_directory_before_hydra_writes(teacher_dir, cli, capsys):
    before = snapshot(teacher_dir)
    with run_directory_lock(teacher_dir):
        assert cli("method=pretrain", f"hydra.run.dir={teacher_dir}") == 2
    assert "in use by another tnexp run" in capsys.readouterr().err.strip().splitlines()[-1]
    assert snapshot(teacher_dir) == before  # not even Hydra's .hydra/ files or log


def test_lock_of_another_host_is_refused(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(RunDirectoryError) as err, run_directory_lock(tmp_path):
        pass
    says(err, "PID 1 on host elsewhere", f"rm {tmp_path / LOCK_FILE}")


def test_stale_lock_is_reported_and_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / LOCK_FILE
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with caplog.at_level("WARNING", logger="tnexp"), run_directory_lock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"stale lock of PID {dead.pid}" in caplog.text
    assert not lock.exists()


# ====================================================== 3. divergence and 4. resume
def test_divergence_guard_thresholds():
    guard = DivergenceGuard(factor=100.0)
    for value in (2.3, 1.0, 0.5):
        guard.check(torch.tensor(value), phase="global", what="loss", step=0, epoch=0)
    guard.check(torch.tensor(40.0), phase="global", what="loss", step=1, epoch=0)  # < 100 x
    guard.check(torch.tensor(1e3), phase="local", what="loss", step=2, epoch=0)  # new phase
    with pytest.raises(TrainingDivergedError) as err:
        guard.check(torch.tensor(6e15), phase="global", what="loss", step=3, epoch=1)
    says(err, "step 3 .*epoch 1, global phase", "6e\\+15", "method.global.optimizer.lr")
    with pytest.raises(NonFiniteLossError) as err:
        guard.check(torch.tensor(float("inf")), phase="local", what="x", step=4, epoch=1)
    says(err, "inf", "lower the learning rate")
    with pytest.raises(ValueError, match="divergence_factor must be > 1"):
        DivergenceGuard(factor=0.5)


def test_exploding_global_run_fails_and_says_so(teacher_dir, tmp_path):
    cfg = make_cfg(
        tmp_path,
        "method=global",
        f"teacher.path={teacher_dir}",
        "method.global.optimizer.lr=1e6",
        "trainer.limit_train_batches=6",
        "guard.divergence_factor=100",
    )
    with pytest.raises(TrainingDivergedError) as err:
        run_stage(cfg)
    says(err, "global phase", "Lower the learning rate")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "failed" and "metrics" not in results
    assert results["error"]["type"] in ("TrainingDivergedError", "NonFiniteLossError")
    assert not (tmp_path / "student").exists()  # no diverged model saved as a result


def test_nan_local_loss_names_the_slice():
    teacher = small_resnet(width=8).eval()
    student, _ = tensorize(teacher, SPEC)
    from tnexp.modules import LocalDistillation
    from tnexp.tasks import ClassificationTask

    plan = make_slice_plan(student, "block")
    module = LocalDistillation(student, ClassificationTask(10), teacher=teacher, plan=plan)
    module.setup("fit")
    batch = (torch.full((2, 1, 8, 8), float("nan")), torch.zeros(2, dtype=torch.long))
    with pytest.raises(NonFiniteLossError) as err:
        module._local_step(batch)
    says(err, "slice 'layer1.0'", "step 0", "lower the learning rate")


def test_resume_appends_to_the_metrics(teacher_dir, tmp_path):
    common = ["method=global", f"teacher.path={teacher_dir}"]
    run_stage(make_cfg(tmp_path, *common))
    csv = next((tmp_path / "csv").glob("**/metrics.csv"))
    first = csv.read_text().splitlines()
    run_stage(make_cfg(tmp_path, *common, "trainer.max_epochs=2", "resume=auto"))
    rows = csv.read_text().splitlines()
    assert rows[1 : len(first)] == first[1:] or set(first[1:]) <= set(rows)  # epoch 0 kept
    epochs = {line.split(",")[csv_column(rows[0], "epoch")] for line in rows[1:]}
    assert {"0", "1"} <= {e.split(".")[0] for e in epochs if e}
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "ok"


def test_resume_continues_the_wandb_run(tmp_path):
    from tnexp.stages.loggers import wandb_run_id as _wandb_run_id

    first = _wandb_run_id(tmp_path, resuming=False)
    assert _wandb_run_id(tmp_path, resuming=True) == first  # resume: the same W&B run
    assert _wandb_run_id(tmp_path, resuming=False) != first  # a fresh run: a new one


def csv_column(header: str, name: str) -> int:
    return header.split(",").index(name)


# ====================================================== 2./9. feature cache
def _images(n: int = 24):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


def _write(directory: Path, teacher, plan, images, **kw):
    loader = DataLoader(TensorDataset(*images), batch_size=8)
    kw.setdefault("shard_size", 8)
    return write_feature_cache(
        directory, teacher, plan, loader, dataset_identity={"n": 24}, progress=False, **kw
    )


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    teacher = small_resnet(width=8).eval()
    student, _ = tensorize(teacher, SPEC)
    return teacher, make_slice_plan(student, "block")


def test_same_size_damage_to_a_shard_is_caught_by_default(resnet, tmp_path):
    teacher, plan = resnet
    cache = tmp_path / "cache"
    _write(cache, teacher, plan, _images())
    shard = cache / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # same size: the size check cannot see it
    shard.write_bytes(bytes(data))
    dataset = open_feature_cache(cache)  # default settings
    dataset[0]  # shard 0 intact
    with pytest.raises(FeatureCacheIntegrityError) as err:
        dataset[8]
    says(err, "shard_00001.safetensors fails its checksum", "method.cache.overwrite=true", "rm -rf")


def test_caches_from_before_tensor_checksums_verify_the_whole_shard(resnet, tmp_path):
    teacher, plan = resnet
    cache = tmp_path / "cache"
    _write(cache, teacher, plan, _images())
    manifest = json.loads((cache / "manifest.json").read_text())
    for shard in manifest["shards"]:
        del shard["checksums"]  # the layout written by older tnexp versions
    (cache / "manifest.json").write_text(json.dumps(manifest))
    open_feature_cache(cache)[0]  # intact: reads
    shard = cache / "shard_00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(FeatureCacheIntegrityError) as err:
        open_feature_cache(cache)[20]
    says(err, "shard_00002.safetensors fails its checksum", "rm -rf")


def test_nan_features_are_refused_at_capture(resnet, tmp_path):
    teacher, plan = resnet
    x, y = _images()
    x[9] = float("nan")
    with pytest.raises(FeatureCacheIntegrityError) as err:
        _write(tmp_path / "cache", teacher, plan, (x, y))
    says(err, "NaN or Inf", "batch 1", "Check the teacher and the data")
    assert not (tmp_path / "cache").exists()
    assert not list(tmp_path.glob("cache.partial-*"))


def test_float16_overflow_is_refused_with_the_dtype_fix(resnet, tmp_path):
    teacher, plan = resnet
    x, y = _images()
    with pytest.raises(FeatureCacheIntegrityError) as err:
        _write(tmp_path / "cache", teacher, plan, (x * 1e6, y), dtype="float16")
    says(err, "NaN or Inf", "float32")


def test_stale_cache_offers_options_that_exist(resnet, tmp_path):
    teacher, plan = resnet
    cache = tmp_path / "cache"
    _write(cache, teacher, plan, _images())
    before = snapshot(cache)
    other = small_resnet(width=8).eval()  # another teacher
    with pytest.raises(FeatureCacheError) as err:
        _write(cache, other, plan, _images())
    message = says(err, "stale feature cache", "method.cache.overwrite=true", f"rm -rf {cache}")
    assert "overwrite=true" in message
    assert snapshot(cache) == before
    _write(cache, other, plan, _images(), overwrite=True)  # the option named above works
    local = yaml.safe_load(Path(CONFIG_DIR, "method", "parts", "local_phase.yaml").read_text())
    assert local["cache"]["overwrite"] is False  # and exists in the config


def test_leftovers_of_a_killed_capture_are_cleaned(tmp_path, caplog):
    cache = tmp_path / "cache"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname().replace("-", "_")
    killed = tmp_path / f"cache.partial-{host}-{dead.pid}-abcd1234"
    foreign = tmp_path / "cache.partial-otherhost-1-abcd1234"
    for leftover in (killed, foreign):
        leftover.mkdir()
        (leftover / "shard_00000.safetensors").write_bytes(b"x")
    with pytest.raises(FeatureCacheError) as err:
        open_feature_cache(cache)
    says(err, "incomplete capture", "cache.partial-", "Re-run the capture")
    with caplog.at_level("WARNING", logger="tnexp"):
        assert clean_partials(cache) == [killed]
    assert not killed.exists() and foreign.exists()
    assert f"rm -rf {foreign}" in caplog.text


def test_missing_data_set_says_where_and_how(tmp_path):
    fast = ["trainer.accelerator=cpu", "logger=csv", "callbacks.progress_bar=none"]
    cfg = make_cfg(
        tmp_path,
        "method=pretrain",
        "data=cifar10",
        f"data.root={tmp_path / 'nodata'}",
        *fast,
        fast=False,
    )
    with pytest.raises(FileNotFoundError) as err:
        run_stage(cfg)
    assert isinstance(err.value, TnexpError)
    says(err, "nodata", "download=true")


def test_missing_and_wrong_teacher(teacher_dir, tmp_path):
    with pytest.raises(ConfigError) as err:
        run_stage(make_cfg(tmp_path / "a", "method=local"))
    says(err, "needs a pretrained teacher", "teacher.path")
    with pytest.raises(FileNotFoundError) as err:
        run_stage(make_cfg(tmp_path / "b", "method=local", f"teacher.path={tmp_path}/none"))
    says(err, "does not exist", "method=pretrain")
    with pytest.raises(ConfigError) as err:
        run_stage(
            make_cfg(
                tmp_path / "c", "method=local", f"teacher.path={teacher_dir}", "model.width=16"
            )
        )
    says(err, "does not match model", "same model and data settings")


# ====================================================== 6. slice jobs
def test_corrupt_slice_weights_are_retrained_not_skipped(teacher_dir, tmp_path):
    two = [
        "method=local",
        f"teacher.path={teacher_dir}",
        "method.slicing=group:2",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
    ]
    jobs = tmp_path / "jobs"
    run_stage(make_cfg(tmp_path / "job", *two, f"method.slice_jobs.dir={jobs}"))
    name = "layer3.0+layer4.0"
    weights = jobs / "slices" / name / WEIGHTS_FILE
    good = load_file(str(weights))
    data = bytearray(weights.read_bytes())
    data[-2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assemble = ["method=assemble", f"teacher.path={teacher_dir}", "method.slicing=group:2"]
    with pytest.raises(SliceJobsError) as err:
        run(make_cfg(tmp_path / "asm", *assemble, f"method.slice_jobs.dir={jobs}"))
    message = says(err, f"slice 1 '{re.escape(name)}'.*fails its checksum", r"method\.slices=\[1\]")
    assert "[0]" not in message.split("Retrain")[1]  # the intact slice is not retrained
    intact = snapshot(jobs / "slices" / "layer1.0+layer2.0")
    again = run_stage(make_cfg(tmp_path / "rerun", *two, f"method.slice_jobs.dir={jobs}"))
    assert not again.get("skipped")
    record = json.loads((jobs / "slices" / name / RECORD_FILE).read_text())
    assert record["weights"]["checksum"] == file_checksum(weights)
    assert set(load_file(str(weights))) == set(good)  # a complete, readable file again
    assert snapshot(jobs / "slices" / "layer1.0+layer2.0") == intact


def test_missing_slice_at_assemble(teacher_dir, tmp_path):
    jobs = tmp_path / "jobs"
    (jobs / "slices").mkdir(parents=True)
    cfg = make_cfg(
        tmp_path / "asm",
        "method=assemble",
        f"teacher.path={teacher_dir}",
        "method.slicing=group:2",
        f"method.slice_jobs.dir={jobs}",
    )
    with pytest.raises(SliceJobsError) as err:
        run(cfg)
    says(err, "slice 0 .*missing", r"method\.slices=\[0\],\[1\]")
