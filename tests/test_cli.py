"""The `tnexp` command as a new user meets it: help, mistakes, resume from a run folder."""

import json
import re
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from stages import FAST, make_cfg

from tnexp.cli import main
from tnexp.config import CONFIG_DIR, UnknownExperimentError, check_experiment_overrides, unique_path
from tnexp.restore import ResumeConfigError
from tnexp.run import run_stage


def _tnexp(monkeypatch, *args: str) -> None:
    """Run the `tnexp` entry point in this process (errors raised, not printed)."""
    monkeypatch.setattr(sys, "argv", ["tnexp", *args])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    main()


# ---------------------------------------------------------------- experiment names
def test_unknown_experiment_names_close_ones_and_starts_nothing(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        _tnexp(monkeypatch, "experiment=paper/cifar10/local_cr05_typo")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'paper/cifar10/local_cr05_typo'" in err
    assert "paper/cifar10/local_cr0.5" in err  # the closest names are offered
    assert not (tmp_path / "outputs").exists()  # no run folder for a run that cannot run


def test_experiment_overrides_in_sweep_syntax_are_checked():
    ok = ["experiment=paper/cifar10/local_cr0.5,paper/cifar10/global_cr0.5", "x=1"]
    check_experiment_overrides([*ok, "experiment=glob(paper/*)", "+experiment=null"], CONFIG_DIR)
    with pytest.raises(UnknownExperimentError, match=r"paper/cifar100/local_cr0\.7"):
        check_experiment_overrides(
            ["experiment=choice(paper/cifar10/local_cr0.5,paper/cifar100/locl_cr0.7)"],
            CONFIG_DIR,
        )


def test_composing_an_unknown_experiment_fails_in_python_too():
    # The config default is not `optional`: hydra.compose (tests, notebooks) fails as well.
    with (
        initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"),
        pytest.raises((MissingConfigException, ConfigCompositionException)),
    ):
        compose("train", overrides=["experiment=paper/cifar10/nope"])


# ---------------------------------------------------------------- help and run folders
def test_help_describes_tnexp_with_groups_that_exist(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        _tnexp(monkeypatch, "--help")
    assert exit_.value.code in (0, None)
    text = capsys.readouterr().out
    assert "tensorization" in text and "Examples:" in text
    examples = [line for line in text.splitlines() if line.strip().startswith("tnexp")]
    assert len(examples) >= 5
    # Every option the help lists for a group exists: the page cannot drift from configs/.
    listed = re.findall(r"^  (method|data|model|tensorize|trainer|debug)\s+(.+)$", text, re.M)
    assert len(listed) == 6
    for group, options in listed:
        for option in re.split(r",\s*", options.split("  ")[0].strip()):
            assert (Path(CONFIG_DIR) / group / f"{option}.yaml").is_file(), (group, option)


def test_default_run_folder_names_the_method_once():
    assert unique_path("quickstart", "quickstart") == "quickstart"
    assert unique_path("table1", "local") == "table1/local"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
        run_dir = cfg.hydra.run.dir
        assert re.fullmatch(r"outputs/quickstart/[\d_-]+", run_dir), run_dir
        local = compose("train", overrides=["method=local"], return_hydra_config=True)
        assert local.hydra.run.dir.startswith("outputs/local/")


# ---------------------------------------------------------------- resume from a folder
@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    run_stage(make_cfg(out, "method=pretrain", "trainer.limit_train_batches=8"))
    return out


def _results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def test_resume_from_the_run_folder_alone(monkeypatch, teacher_dir, tmp_path):
    """The README command: `tnexp hydra.run.dir=<run dir> resume=auto`, nothing else."""
    run = tmp_path / "run"
    _tnexp(
        monkeypatch,
        *FAST,
        "method=global",
        f"teacher.path={teacher_dir}",
        "tensorize.cr=0.7",  # a student shape the defaults (CR 0.5) cannot load
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run}",
    )
    first = _results(run)
    # Resume with more epochs (a run stopped after its first epoch continues the same way).
    _tnexp(monkeypatch, f"hydra.run.dir={run}", "resume=auto", "trainer.max_epochs=2")
    second = _results(run)
    assert second["global_step"] == 2 * first["global_step"]
    assert second["config"]["tensorize"]["cr"] == 0.7
    assert second["config"]["method"]["name"] == "global"
    assert len(second["time"]["history"]) == 2
    # The folder stays resumable: its saved config is the restored one, with the new epochs.
    saved = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    assert saved["tensorize"]["cr"] == 0.7 and saved["trainer"]["max_epochs"] == 2
    overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    assert "tensorize.cr=0.7" in overrides and "trainer.max_epochs=2" in overrides
    # Repeating an original override is fine; changing what the run is is refused.
    with pytest.raises(ResumeConfigError, match=r"tensorize\.cr \(saved: 0\.7, given: 0\.5\)"):
        _tnexp(monkeypatch, f"hydra.run.dir={run}", "resume=auto", "tensorize.cr=0.5")
    with pytest.raises(ResumeConfigError, match="method"):
        _tnexp(monkeypatch, f"hydra.run.dir={run}", "resume=auto", "method=local")
    assert _results(run)["global_step"] == second["global_step"]  # nothing ran


def test_resume_a_stage_folder_without_hydra_files(monkeypatch, teacher_dir, tmp_path):
    # Quickstart stages and Python-run stages have results.json but no .hydra/.
    run = tmp_path / "stage"
    first = run_stage(
        make_cfg(run, "method=local", f"teacher.path={teacher_dir}", "tensorize.cr=0.7")
    )
    _tnexp(monkeypatch, f"hydra.run.dir={run}", "resume=auto", "trainer.max_epochs=2")
    second = _results(run)
    assert second["method"] == "local"
    assert second["global_step"] == 2 * first["global_step"]
    assert second["tensorize"]["totals"]["model_cr"] == first["tensorize"]["totals"]["model_cr"]


def test_smoke_run_through_the_cli_runs_what_cfg_job_shows(monkeypatch, capsys, tmp_path):
    """The default suite's one CLI smoke run (the end-to-end experiment runs are slow)."""
    args = [
        "method=pretrain",
        "debug=smoke",
        "logger=csv",
        "callbacks.progress_bar=none",
        "trainer.accelerator=cpu",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    _tnexp(monkeypatch, *args, "--cfg", "job")
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["smoke"] is True and shown["trainer"]["limit_train_batches"] == 2
    _tnexp(monkeypatch, *args)
    ran = _results(tmp_path / "run")
    assert ran["config"]["smoke"] is True
    for key in ("data", "trainer"):
        for name, value in shown[key].items():
            if not (isinstance(value, str) and "${" in value):  # interpolations: resolved
                assert ran["config"][key][name] == value, (key, name)
    assert ran["global_step"] == 2  # one epoch of two steps
