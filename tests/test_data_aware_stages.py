"""Data-aware tensorization inside stages: calibration once, reused, same init for every job."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from stages import make_cfg

from tnexp.calibration import FISHER_PREFIX, CalibrationError
from tnexp.run import run_stage
from tnexp.stages.build import build_datamodule, build_task, load_teacher
from tnexp.stages.student import build_student


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    run_stage(make_cfg(out, "method=pretrain", "trainer.limit_train_batches=8"))
    return out


def _student(cfg):
    datamodule, task = build_datamodule(cfg), build_task(cfg)
    return build_student(cfg, load_teacher(cfg), datamodule, task, progress=False)


def test_local_stage_with_als_init_reports_output_errors(teacher_dir, tmp_path):
    cache = tmp_path / "cache"
    overrides = [
        "method=local",
        f"teacher.path={teacher_dir}",
        "tensorize.init=als",
        "tensorize.calibration.num_batches=2",
        "tensorize.als_sweeps=2",
    ]
    run_stage(make_cfg(tmp_path / "run", *overrides, cache_dir=cache))
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    layers = saved["tensorize"]["layers"]
    assert all(0.0 <= layer["output_error"] < 1.0 for layer in layers)
    assert all(layer["als_sweeps"] >= 1 for layer in layers)
    metrics = next((tmp_path / "run" / "csv").glob("**/metrics.csv")).read_text()
    assert "val/slice_rel_err_mean" in metrics and "val/slice_rel_err/" in metrics
    files = list((cache / "calibration").glob("*.safetensors"))
    assert len(files) == 1  # collected once, saved for reruns and slice jobs


def test_every_job_reaches_the_same_init_and_rng(teacher_dir, tmp_path):
    cfg = make_cfg(
        tmp_path,
        "method=local",
        f"teacher.path={teacher_dir}",
        "tensorize.init=als",
        "tensorize.calibration.num_batches=2",
        "tensorize.als_sweeps=1",
    )
    torch.manual_seed(5)
    collected, report = _student(cfg)  # collects and saves the statistics
    after_collect = torch.rand(3)
    torch.manual_seed(5)
    loaded, _ = _student(cfg)  # loads them
    after_load = torch.rand(3)
    for (name, a), b in zip(collected.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(after_collect, after_load)  # calibration leaves the RNG untouched
    assert report.layers[0].output_error is not None


def test_data_aware_init_without_calibration_batches_is_a_clear_error(teacher_dir, tmp_path):
    cfg = make_cfg(
        tmp_path,
        "method=local",
        f"teacher.path={teacher_dir}",
        "tensorize.init=als",
        "tensorize.calibration.num_batches=0",
    )
    with pytest.raises(CalibrationError, match="num_batches"):
        _student(cfg)


def test_svd_init_needs_no_calibration(teacher_dir, tmp_path):
    cfg = make_cfg(tmp_path, "method=local", f"teacher.path={teacher_dir}", "tensorize.init=svd")
    _student(cfg)
    assert not (tmp_path / "cache" / "calibration").exists()


def test_statistics_of_an_older_format_are_recollected(teacher_dir, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg = make_cfg(
        tmp_path,
        "method=local",
        f"teacher.path={teacher_dir}",
        "tensorize.init=als",
        "tensorize.calibration.num_batches=1",
        "tensorize.als_sweeps=1",
    )
    _student(cfg)
    (path,) = (tmp_path / "cache" / "calibration").glob("*.safetensors")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, str(path), metadata={"format": "1"})  # what an older tnexp wrote
    _student(cfg)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == "2"


def test_compensation_in_the_build_is_deterministic_and_changes_only_later_layers(
    teacher_dir, tmp_path
):
    common = [
        "method=local",
        f"teacher.path={teacher_dir}",
        "tensorize.init=als",
        "tensorize.calibration.num_batches=2",
        "tensorize.als_sweeps=1",
    ]
    plain_cfg = make_cfg(tmp_path, *common)
    on_cfg = make_cfg(tmp_path, *common, "tensorize.calibration.compensate=true")
    torch.manual_seed(5)
    plain, _ = _student(plain_cfg)
    torch.manual_seed(5)
    first, _ = _student(on_cfg)
    after = torch.rand(3)
    torch.manual_seed(5)
    second, _ = _student(on_cfg)
    torch.manual_seed(5)
    _student(plain_cfg)
    assert torch.equal(torch.rand(3), after)  # compensation consumed no random numbers
    changed = set()
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name  # same student twice
        if not torch.equal(value, plain.state_dict()[name]):
            changed.add(name)
            assert ".conv2." in name, name  # conv1 saw the teacher's inputs: unchanged
    assert changed  # and the conv2 layers were refitted


def test_a_run_can_start_from_a_saved_student(teacher_dir, tmp_path):
    # One expensive data-aware init, saved once, reused by later runs (student.path).
    first = tmp_path / "first"
    overrides = ["method=global", f"teacher.path={teacher_dir}", "trainer.limit_train_batches=2"]
    aware = ["tensorize.init=als", "tensorize.als_sweeps=1", "tensorize.calibration.num_batches=2"]
    run_stage(make_cfg(first, *overrides, *aware, cache_dir=tmp_path / "cache"))
    trained = load_file(first / "student" / "model.safetensors")
    # tensorize.* is ignored when student.path is set: a different CR would not fit the weights.
    cfg = make_cfg(tmp_path / "second", *overrides, f"student.path={first}", "tensorize.cr=0.9")
    student, report = _student(cfg)
    assert report.layers and all(layer.init == "als" for layer in report.layers)
    for name, value in student.state_dict().items():
        if name in trained:
            assert torch.equal(value, trained[name]), name
    missing = make_cfg(tmp_path / "third", *overrides, f"student.path={tmp_path / 'nothing'}")
    with pytest.raises(Exception, match="holds no saved student"):
        _student(missing)


def _compensated_cfg(teacher_dir, tmp_path, *extra):
    return make_cfg(
        tmp_path,
        "method=local",
        f"teacher.path={teacher_dir}",
        "tensorize.init=als",
        "tensorize.calibration.num_batches=2",
        "tensorize.als_sweeps=1",
        "tensorize.calibration.compensate=true",
        *extra,
    )


def test_compensation_is_cached_and_a_rerun_loads_the_identical_student(
    teacher_dir, tmp_path, monkeypatch
):
    import tnexp.stages.student as student_stage

    cfg = _compensated_cfg(teacher_dir, tmp_path)
    torch.manual_seed(5)
    first, _ = _student(cfg)  # refits and saves the compensated layers
    after_first = torch.rand(3)
    folder = tmp_path / "cache" / "calibration" / "compensation"
    assert len(list(folder.glob("*.safetensors"))) == 1
    computed = student_stage.compensate_slices

    def no_teacher_pass(*args, **kwargs):
        raise AssertionError("compensation recomputed although its file exists")

    monkeypatch.setattr(student_stage, "compensate_slices", no_teacher_pass)
    torch.manual_seed(5)
    second, _ = _student(cfg)  # loads them
    assert torch.equal(torch.rand(3), after_first)  # loading leaves the RNG as computing did
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name
    # Another init (another student before the refit) is another file, not this one.
    monkeypatch.setattr(student_stage, "compensate_slices", computed)
    _student(_compensated_cfg(teacher_dir, tmp_path, "tensorize.als_sweeps=2"))
    assert len(list(folder.glob("*.safetensors"))) == 2


def test_damaged_or_stale_compensation_files_are_refused(teacher_dir, tmp_path):
    from tnexp.compensation import load_compensation

    cfg = _compensated_cfg(teacher_dir, tmp_path)
    student, _ = _student(cfg)
    (path,) = (tmp_path / "cache" / "calibration" / "compensation").glob("*.safetensors")
    with pytest.raises(CalibrationError, match="another key"):
        load_compensation(path, student, expect={"key": "not-this-one"})
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # same size, one flipped byte inside a tensor
    path.write_bytes(bytes(data))
    with pytest.raises(CalibrationError, match=f"damaged.*rm {path}"):
        _student(cfg)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CalibrationError, match=f"rm {path}"):
        _student(cfg)


def test_statistics_come_from_the_feature_cache_when_it_holds_every_layer_input(
    teacher_dir, tmp_path
):
    from tnexp.calibration import InputStats

    cfg = make_cfg(
        tmp_path,
        "method=local",
        f"teacher.path={teacher_dir}",
        "method.features=cached",
        "method.slicing=layer",  # every slice is one layer: its input is the layer's
        "method.cache.dtype=float32",
        "tensorize.init=als",
        "tensorize.als_sweeps=1",
        "tensorize.calibration.num_batches=2",
    )
    run_stage(cfg)  # statistics online (no cache yet), then the feature cache
    folder = tmp_path / "cache" / "calibration"
    (online_path,) = folder.glob("*.safetensors")
    online = InputStats.load(online_path)
    _student(cfg)  # online statistics exist: loaded, nothing new
    assert list(folder.glob("*.safetensors")) == [online_path]
    online_path.unlink()
    _student(cfg)  # none left: read from the cache, no teacher pass
    (cached_path,) = folder.glob("*.safetensors")
    cached = InputStats.load(cached_path)
    assert cached.meta["source"] == "feature_cache"
    assert cached.layers == online.layers
    assert cached.samples == online.samples
    # The cache's first samples (its capture order), not the online calibration batches:
    # the same distribution, other samples (test_datainit checks equality on equal samples).
    for name in online.layers:
        gap = (cached.gram(name) - online.gram(name)).norm() / online.gram(name).norm()
        assert gap < 0.25, (name, float(gap))


def test_stage_collects_saves_and_reloads_the_fisher(teacher_dir, tmp_path):
    overrides = [
        "method=local",
        f"teacher.path={teacher_dir}",
        "tensorize.init=als",
        "tensorize.als_sweeps=1",
        "tensorize.weighting=fisher",
        "tensorize.calibration.num_batches=2",
        "tensorize.calibration.fisher_batches=2",
    ]
    cfg = make_cfg(tmp_path, *overrides)
    collected, report = _student(cfg)
    files = list((tmp_path / "cache" / "calibration").glob("*.safetensors"))
    assert len(files) == 1
    with safe_open(str(files[0]), framework="pt") as f:
        fisher_keys = [k for k in f.keys() if k.startswith(FISHER_PREFIX)]  # noqa: SIM118
    assert len(fisher_keys) == len(report.layers)
    # Tucker-2 ALS has no weighted form: the report says the layers are unweighted.
    assert {layer.weighting for layer in report.layers} == {"none"}
    loaded, _ = _student(cfg)
    for (name, a), b in zip(collected.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(CalibrationError, match="fisher_batches"):
        _student(make_cfg(tmp_path / "zero", *overrides, "tensorize.calibration.fisher_batches=0"))
