"""Layer profiling (paper appendix B.1) on a narrow ResNet and a tiny fake dataset."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tnexp.factory import tensorize
from tnexp.models import small_resnet
from tnexp.profiling import (
    LayerSensitivity,
    exclusion_spec,
    most_sensitive,
    plot_profile,
    profile_layers,
    write_exclusion_yaml,
    write_profile_csv,
)
from tnexp.stages.profile import main

CONVS = [f"layer{s}.0.conv{c}" for s in range(1, 5) for c in (1, 2)]
RULE = {"pattern": "layer*.*.conv*", "method": "tucker", "cr": 0.5}


@pytest.fixture(scope="module")
def teacher_and_loader():
    torch.manual_seed(0)
    teacher = small_resnet(num_classes=10, in_channels=3, width=8).eval()
    x = torch.randn(48, 3, 16, 16)
    with torch.no_grad():
        y = teacher(x).argmax(dim=1)  # labels = the teacher's predictions: dense = 100%
    return teacher, DataLoader(TensorDataset(x, y), batch_size=16)


@pytest.fixture(scope="module")
def profile(teacher_and_loader):
    teacher, loader = teacher_and_loader
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    results = profile_layers(teacher, loader, cr=0.5, progress=False)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    return results


def fake(drops: list[float]) -> list[LayerSensitivity]:
    return [
        LayerSensitivity(f"l{i}", 90.0, 90.0 - d, d, 100, 50, 0.5, [2, 2])
        for i, d in enumerate(drops)
    ]


def test_one_result_per_matching_layer(profile):
    assert [r.name for r in profile] == CONVS  # module order; downsample convs excluded
    for r in profile:
        assert r.dense_accuracy == 100.0
        assert math.isfinite(r.drop) and math.isfinite(r.accuracy)
        assert r.drop == pytest.approx(r.dense_accuracy - r.accuracy)
        assert r.params_after < r.params_before and 0.3 < r.cr < 0.7
        assert r.ranks is not None and len(r.ranks) == 2
    assert any(r.drop > 0 for r in profile)  # SVD truncation at CR 0.5 costs something


def test_datamodule_and_custom_evaluation(teacher_and_loader):
    teacher, loader = teacher_and_loader

    class TinyDataModule:
        def __init__(self) -> None:
            self.stages: list[str | None] = []

        def setup(self, stage=None):
            self.stages.append(stage)

        def val_dataloader(self):
            return loader

    seen: list[int] = []

    def n_batches(model, batches):  # any "higher is better" score works
        seen.append(len(batches))
        return 1.0

    dm = TinyDataModule()
    res = profile_layers(
        teacher, dm, n_batches, pattern="layer4.*.conv*", max_batches=2, progress=False
    )
    assert dm.stages == ["validate"]
    assert [r.name for r in res] == ["layer4.0.conv1", "layer4.0.conv2"]
    assert seen == [2, 2, 2] and all(r.drop == 0.0 for r in res)


def test_most_sensitive_order_and_exclusion_spec():
    results = fake([0.5, 3.0, -0.2, 3.0, 1.0])
    assert most_sensitive(results, 3) == ["l1", "l3", "l4"]  # ties keep module order
    assert most_sensitive(results, 0) == []
    assert most_sensitive(results, 10) == ["l1", "l3", "l4", "l0", "l2"]
    assert exclusion_spec(results, 2) == {"exclude": ["l1", "l3"]}
    with pytest.raises(ValueError, match="k must be"):
        most_sensitive(results, -1)
    with pytest.raises(ValueError, match="non-finite"):
        most_sensitive(fake([1.0, float("nan")]), 1)


def test_exclusion_spec_is_accepted_by_the_factory(profile, teacher_and_loader):
    teacher, _ = teacher_and_loader
    spec = {"rules": [RULE], **exclusion_spec(profile, 3)}
    _, report = tensorize(teacher, spec)
    kept_dense = set(most_sensitive(profile, 3))
    assert {layer.name for layer in report.layers} == set(CONVS) - kept_dense


def test_csv_png_and_yaml_written(profile, tmp_path):
    csv_path = write_profile_csv(profile, tmp_path / "out" / "profile.csv")
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["name"] for r in rows] == CONVS
    assert sorted(int(r["rank"]) for r in rows) == list(range(1, 9))
    top = next(r["name"] for r in rows if r["rank"] == "1")
    assert top == most_sensitive(profile, 1)[0]
    png = plot_profile(profile, tmp_path / "out" / "profile.png", k=2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The YAML snippet composes as a tensorize option on top of tucker.yaml.
    from hydra import compose, initialize_config_dir

    from tnexp.config import CONFIG_DIR
    from tnexp.stages.student import tensorize_spec

    configs = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, configs)
    write_exclusion_yaml(profile, 2, configs / "tensorize" / "profiled.yaml")
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        cfg = compose("train", overrides=["tensorize=profiled", "tensorize.cr=0.7"])
    assert list(cfg.tensorize.exclude) == most_sensitive(profile, 2)
    spec = tensorize_spec(cfg)
    assert spec.rules[0].pattern == "layer*.*.conv*" and spec.rules[0].cr == 0.7


def test_cli_end_to_end(tmp_path, capsys):
    from safetensors.torch import save_model

    teacher = small_resnet(num_classes=10, in_channels=1, width=8)
    save_model(teacher, str(tmp_path / "teacher.safetensors"))
    out = tmp_path / "profile"
    results = main(
        [
            "--teacher", str(tmp_path / "teacher.safetensors"),
            "--model", "small_resnet", "--data", "digits",
            "--cr", "0.5", "--k", "2", "--out", str(out), "--max-batches", "2",
            "model.width=8", "data.image_size=8",
        ]
    )  # fmt: skip
    assert [r.name for r in results] == CONVS
    for name in ("profile.csv", "profile.json", "profile.png", "tensorize_profiled.yaml"):
        assert (out / name).is_file(), name
    text = (out / "tensorize_profiled.yaml").read_text()
    assert all(f'"{n}"' in text for n in most_sensitive(results, 2))
    assert "exclusion spec" in capsys.readouterr().out


def test_pattern_that_matches_nothing_is_the_factory_error(teacher_and_loader):
    from tnexp.tn.errors import TensorizationError

    teacher, loader = teacher_and_loader
    with pytest.raises(TensorizationError, match="matches no"):
        profile_layers(teacher, loader, pattern="block*.conv", progress=False)


def test_plot_handles_negative_drops(tmp_path):
    path = plot_profile(fake([0.5, -1.0, 2.0]), Path(tmp_path) / "p.png", k=1, title="t")
    assert path.stat().st_size > 0
