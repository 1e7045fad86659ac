"""Bond spectra and entanglement entropy (tnexp/analysis): math, writers, plots, stage."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from torch import nn

from tnexp.analysis import (
    analyze_spectra,
    energy_rank,
    entanglement_entropy,
    mpo_cut_spectra,
    read_json,
    truncation_error,
    tucker_mode_spectra,
    write_csv,
    write_json,
    write_plots,
)
from tnexp.analysis.report import figure_entropy_depth, figure_entropy_heatmap, figure_spectra
from tnexp.analysis.spectra import layer_group
from tnexp.factory import tensorize
from tnexp.models import small_resnet
from tnexp.tn.errors import TensorizationError
from tnexp.tn.mpo import MPOLinear


# --------------------------------------------------------------------------- math
def test_entropy_of_rank_one_is_zero_and_identity_is_log_n():
    u, v = torch.randn(7, 1), torch.randn(1, 5)
    assert entanglement_entropy(torch.linalg.svdvals(u @ v)) == pytest.approx(0.0, abs=1e-12)
    for n in (1, 4, 9):
        s = torch.linalg.svdvals(torch.eye(n, dtype=torch.float64))
        assert entanglement_entropy(s) == pytest.approx(math.log(n))
    assert entanglement_entropy(torch.zeros(3)) == 0.0


def test_identity_cut_of_an_mpo_has_entropy_log_n():
    # W = I_4 (x) I_4 on factors [4, 4] x [4, 4]: the site-major tensor is a product of
    # two site tensors, so the bond cut has rank 1; a "swap" weight has a maximal cut.
    eye = torch.eye(4, dtype=torch.float64)
    product = torch.kron(eye, eye)
    (s,) = mpo_cut_spectra(product, [4, 4], [4, 4])
    assert entanglement_entropy(s) == pytest.approx(0.0, abs=1e-9)
    # W[(i1,i2),(o1,o2)] = d(i1,o2) d(i2,o1): across the cut (i1,o1 | i2,o2) this is the
    # identity between (i1,o1) and (o2,i2): 16 equal singular values.
    swap = torch.einsum("ad,bc->abcd", eye, eye).reshape(16, 16)
    (s,) = mpo_cut_spectra(swap, [4, 4], [4, 4])
    assert entanglement_entropy(s) == pytest.approx(math.log(16))


def test_energy_rank_and_truncation_error():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert energy_rank(s, 0.5) == 1
    assert energy_rank(s, 0.9) == 2  # 13/14 = 0.93
    assert energy_rank(s, 0.99) == 3
    assert energy_rank(s, 1.0) == 3
    assert truncation_error(s, 1) == pytest.approx(math.sqrt(5 / 14))
    assert truncation_error(s, 3) == 0.0
    with pytest.raises(ValueError, match="fraction"):
        energy_rank(s, 0.0)


def test_lowrank_cut_reproduces_the_layers_singular_values():
    torch.manual_seed(0)
    w = torch.randn(12, 20, dtype=torch.float64)
    (s,) = mpo_cut_spectra(w, [12, 1], [1, 20])
    assert torch.allclose(s, torch.linalg.svdvals(w))
    mode0, mode1 = tucker_mode_spectra(torch.randn(6, 4, 3, 3))
    assert len(mode0) == 6 and len(mode1) == 4


def test_balanced_cut_matches_the_mpo_svd_bond():
    # Truncating at the bond the factory chooses leaves exactly the tail of this spectrum.
    torch.manual_seed(0)
    layer = nn.Linear(16, 24)
    (entry,) = analyze_spectra(nn.Sequential(layer), {"rules": [{"pattern": "0", "cr": 0.5}]})
    (cut,) = entry.cuts
    mpo = MPOLinear.from_linear(layer, cr=0.5)
    assert cut.rank == mpo.bond_dim and entry.in_factors == mpo.in_factors
    with torch.no_grad():
        err = float((mpo.weight_in_out() - layer.weight.t()).norm() / layer.weight.norm())
    assert cut.truncation_error == pytest.approx(err, rel=1e-4)
    assert entry.lowrank_rank is not None and entry.lowrank_weight_error is not None


def test_tensorized_model_uses_its_own_factors_and_bonds():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Conv2d(4, 6, 3))
    spec = {"rules": [{"pattern": "*", "cr": 0.5, "num_sites": 3}]}
    student, report = tensorize(dense, spec)
    layers = analyze_spectra(student)
    assert [layer.source for layer in layers] == ["tensorized", "tensorized"]
    mpo, tucker = layers
    assert len(mpo.cuts) == 2 and [c.rank for c in mpo.cuts] == report.layers[0].bonds
    # A tensorized weight has rank <= bond at each cut: truncating there loses nothing.
    assert all(c.truncation_error == pytest.approx(0.0, abs=1e-5) for c in mpo.cuts)
    assert [c.rank for c in tucker.cuts] == report.layers[1].ranks
    assert [c.cut for c in tucker.cuts] == ["mode-0 (out)", "mode-1 (in)"]


def test_no_tensorizable_layer_is_a_clear_error():
    with pytest.raises(TensorizationError, match="no tensorizable layer"):
        analyze_spectra(nn.Sequential(nn.ReLU()))


def test_whitened_spectrum_with_stats():
    from tnexp.calibration import InputStats

    torch.manual_seed(0)
    layer = nn.Linear(8, 6)
    x = torch.randn(200, 8) * torch.tensor([5.0, 1, 1, 1, 0.1, 0.1, 0.1, 0.1])
    stats = InputStats(grams={"0": (x.T @ x / len(x)).double()}, samples={"0": 200})
    (entry,) = analyze_spectra(
        nn.Sequential(layer), {"rules": [{"pattern": "0", "cr": 0.5}]}, stats=stats
    )
    assert entry.whitened is not None and entry.whitened.rank == entry.lowrank_rank
    assert 0.0 <= entry.whitened.truncation_error < 1.0


def test_layer_groups():
    assert layer_group("model.layers.12.mlp.up_proj") == "model.layers.*.mlp.up_proj"
    assert layer_group("layer1.0.conv1") == "layer1.*.conv1"
    assert layer_group("0") == "*"


# --------------------------------------------------------------------------- writers
@pytest.fixture(scope="module")
def resnet_layers():
    torch.manual_seed(0)
    model = small_resnet(num_classes=10, in_channels=1, width=8)
    spec = {"rules": [{"pattern": "layer*.*.conv*", "method": "tucker", "cr": 0.5}]}
    return analyze_spectra(model, spec)


def test_json_and_csv(resnet_layers, tmp_path):
    path = write_json(resnet_layers, tmp_path / "s.json")
    assert read_json(path) == list(resnet_layers)  # a lossless round trip
    data = json.loads(path.read_text())
    assert len(data["layers"]) == len(resnet_layers) == 8
    first = data["layers"][0]
    assert first["cuts"][0]["singular_values"] == sorted(
        first["cuts"][0]["singular_values"], reverse=True
    )
    rows = list(csv.DictReader(write_csv(resnet_layers, tmp_path / "s.csv").open()))
    assert len(rows) == 16  # two modes per convolution
    assert {r["cut"] for r in rows} == {"mode-0 (out)", "mode-1 (in)"}
    assert all(float(r["entropy"]) <= float(r["max_entropy"]) + 1e-9 for r in rows)
    assert all(int(r["rank_90"]) <= int(r["rank_99"]) for r in rows)


def test_figures_have_labelled_axes(resnet_layers, tmp_path):
    spectra = figure_spectra(resnet_layers)
    assert len(spectra.axes) == len({layer.group for layer in resnet_layers})
    for ax in spectra.axes:
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
        assert ax.get_yscale() == "log" and ax.lines
    depth = figure_entropy_depth(resnet_layers)
    for ax in depth.axes:
        assert ax.get_xlabel().startswith("depth") and ax.get_ylabel() and ax.get_title()
    heat = figure_entropy_heatmap(resnet_layers)
    ax = heat.axes[0]
    assert ax.get_xlabel() == "cut" and ax.get_ylabel() and ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["mode-0 (out)", "mode-1 (in)"]
    assert heat.axes[1].get_ylabel().startswith("S / log")  # the colour bar
    values = ax.images[0].get_array()
    assert values.min() > 0.0 and values.max() <= 1.0 + 1e-9  # relative entropy
    paths = write_plots(resnet_layers, tmp_path)
    for path in paths.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- stage
def test_stage_on_the_digits_model(tmp_path):
    from stages import make_cfg

    from tnexp.run import run, run_stage

    teacher_dir = tmp_path / "teacher"
    run_stage(make_cfg(teacher_dir, "method=pretrain"))
    out = tmp_path / "analyze"
    results = run(make_cfg(out, "method=analyze", f"teacher.path={teacher_dir}"))
    assert results["method"] == "analyze"
    for name in ("spectra.json", "spectra.csv", "spectra.png", "entropy_depth.png"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["summary"]["layers"] == 8 and on_disk["files"]["csv"] == "spectra.csv"
    assert on_disk["metrics"]["analysis"]["layers"] == 8
    # tnexp-aggregate lists an analysis run as complete, without a table row for it.
    from tnexp.aggregate import find_runs

    (found,), _ = find_runs([out])
    assert found.ok and found.kind == "analyze"
    rows = list(csv.DictReader((out / "spectra.csv").open()))
    assert all(r["rank"] and r["truncation_error"] for r in rows)  # sizes from cfg.tensorize

    # A trained student, analysed with the teacher's input statistics.
    local = tmp_path / "local"
    run_stage(make_cfg(local, "method=local", f"teacher.path={teacher_dir}", "tensorize.cr=0.5"))
    out = tmp_path / "analyze_student"
    results = run(
        make_cfg(
            out,
            "method=analyze",
            f"teacher.path={teacher_dir}",
            f"method.student_path={local}",
            "method.data_aware=true",
            "tensorize.calibration.num_batches=2",
            "method.propagation.enabled=true",
            "method.propagation.num_batches=2",
            "method.propagation.eval_batches=2",
        )
    )
    record = json.loads((out / "propagation.json").read_text())
    slices = len(record["slices"])
    assert slices == 4 and len(record["replacement"]) == slices + 1
    assert record["metric"] == "top1" and (out / "propagation.png").is_file()
    assert results["metrics"]["propagation"]["slices"] == slices
    first = record["slices"][0]
    assert first["input_error"] == 0.0  # nothing before the first slice
    assert first["student_input_error"] == pytest.approx(first["teacher_input_error"])
    assert results["data_aware"] and "tensorized student" in results["source"]
    layers = json.loads((out / "spectra.json").read_text())["layers"]
    assert len(layers) == 8 and all(layer["source"] == "tensorized" for layer in layers)
    assert all(layer["whitened"]["truncation_error"] is not None for layer in layers)
    from tnexp.analysis.report import figure_entropy_depth

    ax = figure_entropy_depth(read_json(out / "spectra.json")).axes[0]
    assert any("whitened" in line.get_label() for line in ax.lines)


def test_propagation_needs_a_student(tmp_path):
    from stages import make_cfg

    from tnexp.errors import ConfigError
    from tnexp.run import run

    cfg = make_cfg(tmp_path / "a", "method=analyze", "method.propagation.enabled=true")
    with pytest.raises(ConfigError, match=r"method\.student_path"):
        run(cfg)


def test_stage_logs_plots_to_wandb_offline(tmp_path, monkeypatch):
    from safetensors.torch import save_model
    from stages import make_cfg

    from tnexp.run import run

    monkeypatch.setenv("WANDB_SILENT", "true")
    save_model(
        small_resnet(num_classes=10, in_channels=1, width=8), str(tmp_path / "t.safetensors")
    )
    out = tmp_path / "analyze"
    cfg = make_cfg(
        out,
        "method=analyze",
        f"teacher.path={tmp_path / 't.safetensors'}",
        "logger=default",
        "logger.wandb.mode=offline",
    )
    run(cfg)
    (offline,) = (out / "wandb").glob("offline-run-*")
    images = sorted(p.name for p in offline.glob("files/media/images/analysis/*.png"))
    assert len(images) == 3 and any(name.startswith("spectra_") for name in images)
