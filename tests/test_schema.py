"""The structured-config schemas (tnexp/schema.py) are the one source of the defaults of
their nodes: the composed configs hold them, the YAML files restate none, the Python
classes share them, and an unknown key is an error naming the node."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from tnexp.cli import user_error_message
from tnexp.config import CONFIG_DIR
from tnexp.errors import ConfigError
from tnexp.memory_bounded import BlockwiseConfig
from tnexp.modules import GlobalConfig, LocalConfig
from tnexp.modules.optim import OptimizerConfig
from tnexp.restore import ResumeConfigError, SavedRun, restore_config
from tnexp.schema import (
    CalibrationSettings,
    GlobalSettings,
    LocalSettings,
    MemoryBoundedSettings,
    OptimizerSettings,
    RuntimeSettings,
    SliceJobsSettings,
    is_schema_default,
    settings_dict,
)
from tnexp.stages.student import calibration_settings

TENSORIZE = ("tucker", "mpo_gpt2_mlp", "mpo_llama_mlp", "mpo_encoder_ffn", "mpo_vit_mlp")
# config node -> (its schema, the YAML files that place it)
NODES: dict[str, tuple[type, list[str]]] = {
    "local": (LocalSettings, ["method/parts/local_phase.yaml"]),
    "global": (
        GlobalSettings,
        ["method/global.yaml", "method/hybrid.yaml", "method/pretrain.yaml"],
    ),
    "slice_jobs": (SliceJobsSettings, ["method/local.yaml"]),
    "memory_bounded": (MemoryBoundedSettings, ["method/local.yaml"]),
    "runtime": (RuntimeSettings, ["runtime/default.yaml"]),
    "calibration": (
        CalibrationSettings,
        [f"tensorize/{t}.yaml" for t in TENSORIZE],
    ),
}


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def _defaults(schema: type) -> dict[str, Any]:
    return dataclasses.asdict(schema())


@pytest.mark.parametrize(
    ("method", "node", "schema"),
    [
        ("local", "method.local", LocalSettings),
        ("local", "method.slice_jobs", SliceJobsSettings),
        ("local", "method.memory_bounded", MemoryBoundedSettings),
        ("capture", "method.slice_jobs", SliceJobsSettings),
        ("assemble", "method.slice_jobs", SliceJobsSettings),
        ("quickstart", "runtime", RuntimeSettings),
        ("local", "tensorize.calibration", CalibrationSettings),
    ],
)
def test_composed_nodes_hold_every_schema_default(method, node, schema):
    cfg = _compose(f"method={method}")
    assert OmegaConf.to_container(OmegaConf.select(cfg, node)) == _defaults(schema)


def test_methods_set_only_their_choices_over_the_schema():
    local = _compose("method=hybrid").method
    assert OmegaConf.to_container(local.local) == _defaults(LocalSettings)
    choices = {"global": (16, 5.0e-4), "hybrid": (64, 5.0e-4), "pretrain": (None, 2.0e-3)}
    for method, (batch_size, lr) in choices.items():
        node = OmegaConf.to_container(_compose(f"method={method}").method["global"])
        assert set(node) == set(_defaults(GlobalSettings))
        assert set(node["optimizer"]) == set(_defaults(OptimizerSettings))
        assert (node["batch_size"], node["optimizer"]["lr"]) == (batch_size, lr)


def _restated(raw: Any, defaults: Any, path: str) -> list[str]:
    if isinstance(raw, dict) and isinstance(defaults, dict):
        return [
            hit
            for key, value in raw.items()
            if key in defaults
            for hit in _restated(value, defaults[key], f"{path}.{key}")
        ]
    return [f"{path}={raw!r}"] if raw == defaults else []


@pytest.mark.parametrize("node", sorted(NODES))
def test_yaml_files_restate_no_schema_default(node):
    """A YAML value equal to the schema's default would be a second source that can drift."""
    schema, files = NODES[node]
    for name in files:
        raw = OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / name))
        assert any(f"/schema/{node}@" in d for d in raw.get("defaults", [])), name
        body = raw if node == "runtime" else raw.get(node, {})
        assert isinstance(body, dict)
        assert _restated(body, _defaults(schema), node) == [], f"{name} restates defaults"


def test_python_classes_share_the_schema_defaults():
    assert dataclasses.asdict(LocalConfig()) == _defaults(LocalSettings)
    assert dataclasses.asdict(GlobalConfig()) == _defaults(GlobalSettings)
    assert dataclasses.asdict(OptimizerConfig()) == _defaults(OptimizerSettings)
    blockwise, bounded = BlockwiseConfig(), MemoryBoundedSettings()
    assert (blockwise.offload, blockwise.device, blockwise.verify) == (
        bounded.offload,
        bounded.device,
        bounded.verify,
    )
    # what a stage builds from the composed config is what the API gives without arguments
    cfg = _compose("method=local")
    assert LocalConfig(**settings_dict(cfg.method.local, LocalSettings, "method.local")) == (
        LocalConfig()
    )


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("method.local.batchsize=8", "batchsize"),
        ("method.local.optimizer.lrr=0.1", "lrr"),
        ("method.local.batch_size=abc", "batch_size"),
        ("method.memory_bounded.offlaod=disk", "offlaod"),
        ("runtime.thread=2", "thread"),
        ("tensorize.calibration.num_batch=8", "num_batch"),
    ],
)
def test_unknown_keys_and_wrong_types_are_composition_errors(override, expected):
    with pytest.raises(ConfigCompositionException) as info:
        _compose("method=local", override)
    message = user_error_message(info.value)
    assert message is not None and expected in message
    assert "(key: " in message  # the cause is named, not only "could not override"


@pytest.mark.parametrize("method", ["hybrid", "global", "pretrain"])
def test_only_local_methods_have_slice_jobs_and_memory_bounded(method):
    cfg = _compose(f"method={method}")
    assert "slice_jobs" not in cfg.method and "memory_bounded" not in cfg.method
    with pytest.raises(ConfigCompositionException, match="slice_jobs"):
        _compose(f"method={method}", "method.slice_jobs.dir=/tmp/jobs")


def test_a_key_forced_in_with_plus_is_refused_by_the_stage():
    cfg = _compose("method=local", "+method.local.batchsize=8")
    with pytest.raises(ConfigError, match=r"method\.local\.batchsize.*batch_size"):
        settings_dict(cfg.method.local, LocalSettings, "method.local")


def test_resume_accepts_a_run_saved_before_the_schemas(tmp_path):
    """A run folder saved before the schemas lacks their defaults (optimizer keys) and,
    for hybrid, still has the slice-job / memory-bounded nodes: `experiment=... resume=auto`
    continues it, while a real change is still refused."""
    experiment = "experiment=paper/cifar10/hybrid_cr0.7"
    cfg = _compose(experiment)
    old = OmegaConf.to_container(cfg, resolve=False)
    for phase in ("local", "global"):
        for key in ("weight_decay", "momentum", "scheduler", "warmup_steps"):
            old["method"][phase]["optimizer"].pop(key)
    old["method"]["local"].pop("log_slice_errors")
    old["method"]["slice_jobs"] = dataclasses.asdict(SliceJobsSettings())
    old["method"]["memory_bounded"] = dataclasses.asdict(MemoryBoundedSettings())
    saved = SavedRun(tmp_path, OmegaConf.create(old), [experiment], tmp_path / "config.yaml")
    restored = restore_config(cfg, saved, [experiment])
    assert OmegaConf.to_container(restored, resolve=False) == old
    old["method"]["local"]["optimizer"]["lr"] = 0.5  # another run: refused
    changed = SavedRun(tmp_path, OmegaConf.create(old), [experiment], tmp_path / "config.yaml")
    with pytest.raises(ResumeConfigError, match=r"method\.local\.optimizer\.lr"):
        restore_config(cfg, changed, [experiment])
    assert is_schema_default("method.local.optimizer.weight_decay", 0.0)
    assert not is_schema_default("method.local.optimizer.weight_decay", 0.1)
    assert not is_schema_default("method.local_epochs", 5)


@pytest.mark.parametrize("tensorize", TENSORIZE)
def test_calibration_settings_of_every_tensorize_option(tensorize):
    cfg = _compose("method=local", f"tensorize={tensorize}")
    cal = calibration_settings(cfg)
    assert cal is not None and set(dataclasses.asdict(cal)) == set(_defaults(CalibrationSettings))
    assert calibration_settings(_compose("tensorize=none")) is None
