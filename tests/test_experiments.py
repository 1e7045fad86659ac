"""Paper experiment configs: the paper's hyperparameters, and every config run end to end
with ``debug=smoke`` (teacher -> profile -> tensorized runs) on data made in the real
formats; sweeps as real Hydra multiruns."""

import json
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from test_vision_data import make_fake_cifar10, make_fake_cifar100, make_fake_fashion

from tnexp.config import CONFIG_DIR, sensitive_layers
from tnexp.run import run

EXPERIMENTS = Path(CONFIG_DIR) / "experiment"
SHARED = {"common", "tensorized"}  # building blocks included by the experiments


def experiment_names() -> list[str]:
    return sorted(
        str(p.relative_to(EXPERIMENTS).with_suffix(""))
        for p in EXPERIMENTS.rglob("*.yaml")
        if p.stem not in SHARED
    )


def compose_experiment(name: str, *overrides: str, hydra_cfg: bool = False):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            "train",
            overrides=[f"experiment={name}", *overrides],
            return_hydra_config=hydra_cfg,
        )


# ---------------------------------------------------------------- the paper's numbers
# (experiment, dotted key) -> value, straight from the paper's text (section 4, app. B).
PAPER = {
    "paper/cifar10/local_cr0.5": {
        "tensorize.cr": 0.5,
        "data.train_subset": None,
        "method.local.batch_size": 8,
        "method.local.optimizer.lr": 1e-3,
        "method.local.optimizer.name": "adam",
        "tensorize.init": "random",
        "model._target_": "tnexp.models.cifar_resnet34",
    },
    "paper/cifar10/local_cr0.5_30k": {"data.train_subset": 30000},
    "paper/cifar10/local_cr0.5_10k": {"data.train_subset": 10000},
    "paper/cifar10/global_cr0.5": {
        "method.global.batch_size": 16,
        "method.global.optimizer.lr": 5e-4,
        "method.global.optimizer.name": "adam",
    },
    "paper/cifar10/local_cr0.7": {"tensorize.cr": 0.7, "method.local.batch_size": 8},
    "paper/cifar10/global_cr0.7": {"tensorize.cr": 0.7, "method.global.batch_size": 16},
    "paper/cifar100/local_cr0.5": {
        "method.local.batch_size": 8,
        "method.local.optimizer.lr": 5e-4,
        "data.info.num_classes": 100,
    },
    "paper/cifar100/global_cr0.5": {
        "method.global.batch_size": 64,
        "method.global.optimizer.lr": 5e-4,
    },
    "paper/cifar100/hybrid_cr0.7": {
        "tensorize.cr": 0.7,
        "method.name": "hybrid",
        "method.local_epochs": 5,
        "method.local.batch_size": 8,
        "method.local.optimizer.lr": 5e-4,
        "method.global.batch_size": 64,
        "method.global.optimizer.lr": 5e-4,
    },
    "paper/cifar10/profile": {"method.name": "profile", "method.k": 4, "tensorize.cr": 0.5},
    "paper/gpt2xl/local": {
        "model.name": "gpt2-xl",
        "tensorize.overall_cr": 0.3,
        "tensorize.rules.0.num_sites": 2,
        "tensorize.rules.0.pattern": "transformer.h.*.mlp.c_*",
        "data.num_sequences": 25000,
        "data.seq_len": 1024,
        "data.batch_size": 8,
        "method.local.batch_size": 8,
        "method.slicing": "block",
        "trainer.max_epochs": 1,
        "eval.lm_eval.tasks": ["piqa", "lambada_openai", "wikitext", "c4"],
    },
    "paper/gpt2xl/global": {"method.global.batch_size": 8, "trainer.max_epochs": 1},
}
SWEEPS = {
    "batch_size": "8,16,32,64,128",
    "lr": "1.0e-4,5.0e-4,1.0e-3",
}


def test_experiment_tree_covers_every_paper_table():
    names = set(experiment_names())
    for ds in ("cifar10", "cifar100"):
        for run_name in (
            "teacher",
            "profile",
            "local_cr0.5",
            "local_cr0.5_30k",
            "local_cr0.5_10k",
            "global_cr0.5",
            "local_cr0.7",
            "global_cr0.7",
            "hybrid_cr0.7",
        ):
            assert f"paper/{ds}/{run_name}" in names
        for method in ("local", "global"):
            for key in SWEEPS:
                assert f"paper/sweeps/{ds}_{method}_{key}" in names
    assert {f"paper/gpt2xl/{n}" for n in ("local", "global", "local_slices", "assemble")} <= names


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_hyperparameters(name):
    cfg = compose_experiment(name)
    for key, expected in PAPER[name].items():
        value = OmegaConf.select(cfg, key)
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        assert value == expected, f"{name}: {key} = {value!r}, the paper has {expected!r}"


@pytest.mark.parametrize("name", [n for n in experiment_names() if "/sweeps/" in n])
def test_sweeps_are_hydra_multiruns_over_the_paper_grid(name):
    cfg = compose_experiment(name, hydra_cfg=True)
    method, key = ("local" if "_local_" in name else "global"), name.rsplit("_", 1)[-1]
    key = "batch_size" if key == "size" else key
    params = dict(cfg.hydra.sweeper.params)
    leaf = "batch_size" if key == "batch_size" else "optimizer.lr"
    param = f"method.{method}.{leaf}"
    assert params == {param: SWEEPS[key]}
    assert cfg.method.name == method and cfg.tensorize.cr == 0.5


def test_runs_of_one_table_share_a_group_and_have_stable_folders():
    a = compose_experiment("paper/cifar10/local_cr0.5", hydra_cfg=True)
    b = compose_experiment("paper/cifar10/global_cr0.5", hydra_cfg=True)
    assert a.experiment_name == b.experiment_name == "cifar10_resnet34"
    assert a.logger.wandb.group == "cifar10_resnet34"
    assert a.hydra.run.dir != b.hydra.run.dir
    assert a.hydra.run.dir.endswith("cifar10_resnet34/local-cr0.5-50k")
    assert a.teacher.path.endswith("cifar10_resnet34/teacher")


@pytest.mark.parametrize("cr", ["0.5", "0.7"])
def test_analog_data_aware_rows_change_only_the_init(cr):
    """local_cr*_als is its random-init row with the ALS init and compensation, nothing else."""
    base = compose_experiment(f"analog/fashion_mnist/local_cr{cr}")
    als = compose_experiment(f"analog/fashion_mnist/local_cr{cr}_als")
    assert base.tensorize.init == "random" and not base.tensorize.calibration.compensate
    assert als.tensorize.init == "als" and als.tensorize.calibration.compensate is True
    assert als.run_name != base.run_name
    plain_base, plain_als = (OmegaConf.to_container(c, resolve=False) for c in (base, als))
    for c in (plain_base, plain_als):
        del c["run_name"], c["tensorize"]["init"], c["tensorize"]["calibration"]["compensate"]
    assert plain_als == plain_base


# ---------------------------------------------------------------- smoke
def test_smoke_shrinks_model_data_and_trainer():
    cfg = compose_experiment("paper/gpt2xl/local", "debug=smoke")
    assert cfg.smoke is True
    assert cfg.model._target_ == "tnexp.models.hf.smoke_gpt2" and cfg.model.n_layer == 2
    assert cfg.data.source == "stdlib" and cfg.data.num_sequences == 8
    assert cfg.trainer.limit_train_batches == 2 and cfg.trainer.max_epochs == 1
    assert cfg.eval.lm_eval.enabled is False
    hybrid = compose_experiment("paper/cifar100/hybrid_cr0.7", "debug=smoke")
    assert hybrid.model.width == 4
    assert hybrid.trainer.max_epochs == hybrid.method.local_epochs + 1  # reaches global
    off = compose_experiment("paper/cifar10/local_cr0.5")
    assert "smoke" not in off and "width" not in off.model and off.trainer.max_epochs == 20


def test_smoke_is_a_config_group_option():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="debug"):
        compose_experiment("paper/cifar10/local_cr0.5", "debug=maybe")


def test_missing_profile_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="profiling experiment"):
        sensitive_layers(str(tmp_path / "nothing"))
    (tmp_path / "profile.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a profile"):
        sensitive_layers(str(tmp_path))


def test_missing_profile_in_a_config_is_a_one_line_user_error(tmp_path):
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationResolutionError

    from tnexp.cli import user_error_message

    missing = tmp_path / "nothing"
    cfg = OmegaConf.create({"exclude": "${tnexp.sensitive_layers:" + str(missing) + ",4}"})
    with pytest.raises(InterpolationResolutionError) as info:
        OmegaConf.to_container(cfg, resolve=True)
    message = user_error_message(info.value)  # None would print a traceback as a bug
    assert message is not None and "run the profiling experiment first" in message


@pytest.fixture
def fake_data(tmp_path, monkeypatch):
    """CIFAR pickles and Fashion-MNIST idx files in the real formats under one data dir."""
    import torchvision.datasets.cifar as tv_cifar

    import tnexp.data.fashion_mnist as fm

    data = tmp_path / "data"
    make_fake_cifar10(data)
    make_fake_cifar100(data)
    make_fake_fashion(data / "fashion-mnist", n_train=100, n_test=40)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: Path(fpath).is_file())
    monkeypatch.setattr(fm, "SYSTEM_DATA_DIRS", ())
    return data


COMMON_SMOKE = ["debug=smoke", "logger=csv", "callbacks.progress_bar=none"]


def run_experiment(name: str, tmp: Path, data: Path, *overrides: str, job: str = "") -> dict:
    cfg = compose_experiment(
        name,
        *COMMON_SMOKE,
        f"paths.runs_dir={tmp / 'runs'}",
        f"paths.data_dir={data}",
        f"paths.cache_dir={tmp / 'cache'}",
        *overrides,
        hydra_cfg=True,
    )
    # What the `tnexp` command does: the output folder is the run folder Hydra made.
    out = Path(cfg.hydra.run.dir) / job  # a multirun job gets its own sub-folder
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.output_dir = str(out)
    run(cfg)
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow  # end to end: in `uv run pytest -m slow` (.ci/run), not the default suite
@pytest.mark.parametrize(
    "table", ["paper/cifar10", "paper/cifar100", "analog/fashion_mnist"], ids=lambda t: t
)
def test_every_table_runs_end_to_end_with_smoke(table, tmp_path, fake_data):
    names = [n for n in experiment_names() if n.startswith(table + "/")]
    rows = sorted(n.rsplit("/", 1)[1] for n in names)
    order = ["teacher", "profile", *(r for r in rows if r not in ("teacher", "profile"))]
    results = {name: run_experiment(f"{table}/{name}", tmp_path, fake_data) for name in order}
    assert results["teacher"]["method"] == "pretrain"
    excluded = results["profile"]["excluded"]
    assert len(excluded) == results["profile"]["config"]["method"]["k"]
    for name, res in results.items():
        if name in ("teacher", "profile"):
            continue
        assert res["method"] == name.split("_")[0]
        assert "val/top1" in res["metrics"]["final"], name
        # the profiled layers stayed dense, the rest was tensorized at the config's CR
        layers = {entry["name"] for entry in res["tensorize"]["layers"]}
        assert layers and not layers & set(excluded), name
        assert res["config"]["smoke"] is True
    small = results["local_cr0.5_10k"]
    assert small["data"]["train_samples"] == small["config"]["data"]["train_subset"]  # smoke


@pytest.mark.slow  # end to end: in `uv run pytest -m slow` (.ci/run), not the default suite
def test_gpt2xl_experiments_run_end_to_end_with_smoke(tmp_path):
    for name in ("paper/gpt2xl/local", "paper/gpt2xl/global"):
        res = run_experiment(name, tmp_path, tmp_path / "data")
        assert res["metrics"]["final_eval"]["token_ppl"] > 1
        crs = [layer["cr"] for layer in res["tensorize"]["layers"]]
        assert crs and all(cr == pytest.approx(0.48, abs=0.03) for cr in crs)
    # table 7's parallel row: one job per slice (the tiny smoke GPT-2 has 2), then assemble
    for job in range(2):
        res = run_experiment(
            "paper/gpt2xl/local_slices",
            tmp_path,
            tmp_path / "data",
            f"method.slice_jobs.job={job}",
            job=str(job),
        )
    assembled = run_experiment("paper/gpt2xl/assemble", tmp_path, tmp_path / "data")
    assert assembled["time"]["slice_jobs"]["count"] == 2
    assert assembled["metrics"]["final_eval"]["token_ppl"] > 1


@pytest.mark.slow  # end to end: in `uv run pytest -m slow` (.ci/run), not the default suite
def test_sweep_multirun_writes_one_run_per_value(tmp_path, fake_data, monkeypatch):
    """`tnexp -m experiment=paper/sweeps/...` through Hydra's own multirun machinery."""
    runs = tmp_path / "runs"
    for name in ("teacher", "profile"):
        run_experiment(f"paper/cifar10/{name}", tmp_path, fake_data)
    from tnexp.cli import _app

    argv = [
        "tnexp",
        "-m",
        "experiment=paper/sweeps/cifar10_local_batch_size",
        "method.local.batch_size=8,16",  # two of the five values, for speed
        *COMMON_SMOKE,
        f"paths.runs_dir={runs}",
        f"paths.data_dir={fake_data}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    _app()
    sweep = runs / "cifar10_resnet34" / "sweep-local-batchsize"
    found = sorted(sweep.glob("*/results.json"))
    assert len(found) == 2
    configs = [json.loads(p.read_text())["config"] for p in found]
    sizes = sorted(c["method"]["local"]["batch_size"] for c in configs)
    assert sizes == [8, 16]
    from tnexp.aggregate import aggregate

    result = aggregate([sweep], tmp_path / "report", tables="sweeps")
    (table,) = result.tables  # the two jobs form one sweep table, one row per batch size
    assert len(table.rows) == 2
    assert (tmp_path / "report" / "tables" / f"{table.name}.md").is_file()


@pytest.mark.parametrize("name", [n for n in experiment_names() if n.startswith("smollm2/")])
def test_smollm2_recovery_experiments_share_one_init_and_budget(name):
    cfg = compose_experiment(name, "student.path=/saved/init", hydra_cfg=True)
    assert cfg.experiment_name == "smollm2_data_aware"
    assert cfg.trainer.max_time == "00:00:30:00"  # the same wall budget for every method
    assert cfg.tensorize.calibration.compensate is True
    assert cfg.student.path == "/saved/init"
    assert cfg.hydra.run.dir.endswith(f"smollm2_data_aware/{name.split('/')[1]}-cr0.3")
