"""Loss-aware (Fisher-weighted) data-aware tensorization: statistics, whitening, ranks."""

import matrices
import pytest
import torch
from torch import nn

from tnexp.calibration import (
    CalibrationError,
    InputStats,
    collect_input_stats,
)
from tnexp.factory import tensorize
from tnexp.fisher import collect_output_fisher
from tnexp.tn.allocation import allocate_ranks
from tnexp.tn.datainit import (
    fisher_weights,
    mpo_contract,
    mpo_whiten,
    output_error,
    whitened_spectrum,
)
from tnexp.tn.errors import TensorizationError
from tnexp.tn.ranks import mpo_bonds


def correlated_inputs(n: int, dim: int, *, seed: int = 0) -> torch.Tensor:
    return matrices.correlated_inputs(n, dim, seed=seed, decades=(1.0, -1.0))


class Readout(nn.Module):
    """Two linears; the loss reads the first strongly and the second barely, and of the
    first only a few output channels."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(dim, dim, bias=False)
        self.b = nn.Linear(dim, dim, bias=False)
        mask = torch.full((dim,), 0.05)
        mask[:4] = 1.0
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) * self.mask + 0.05 * self.b(x)


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, target = batch
    return (model(x) - target).pow(2).mean()


def _batches(model: nn.Module, n: int = 3, rows: int = 64, dim: int = 16):
    out = []
    for s in range(n):
        x = correlated_inputs(rows, dim, seed=s).float()
        with torch.no_grad():
            target = model(x) + 0.3 * torch.randn(
                rows, dim, generator=torch.Generator().manual_seed(s)
            )
        out.append((x, target))
    return out


def _stats(model: nn.Module, batches, names=("a", "b")) -> InputStats:
    stats = collect_input_stats(
        model, list(names), batches, model_inputs=lambda b: b[0], num_batches=len(batches)
    )
    stats.fisher = collect_output_fisher(
        model, list(names), batches, loss_fn=_loss, num_batches=len(batches)
    )
    return stats


# ------------------------------------------------------------------ the statistics
def test_output_fisher_equals_the_hand_computed_gradients_and_leaves_the_model_alone():
    model = Readout()
    batches = _batches(model)
    fisher = collect_output_fisher(model, ["a", "b"], batches, loss_fn=_loss, num_batches=2)
    expected = {
        "a": torch.zeros(16, dtype=torch.float64),
        "b": torch.zeros(16, dtype=torch.float64),
    }
    for x, target in batches[:2]:
        ya = (x @ model.a.weight.T).detach().requires_grad_(True)
        yb = (x @ model.b.weight.T).detach().requires_grad_(True)
        loss = (ya * model.mask + 0.05 * yb - target).pow(2).mean()
        ga, gb = torch.autograd.grad(loss, [ya, yb])
        expected["a"] += ga.double().pow(2).sum(0) / 2
        expected["b"] += gb.double().pow(2).sum(0) / 2
    for name in ("a", "b"):
        assert torch.allclose(fisher[name], expected[name], rtol=1e-5), name
    assert fisher["a"][:4].mean() > 100 * fisher["a"][4:].mean()  # the loss reads a[:4]
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_fisher_of_a_loss_without_gradient_and_no_batches_are_clear_errors():
    model = Readout()
    batches = _batches(model)
    with pytest.raises(CalibrationError, match="zero gradient"):
        collect_output_fisher(
            model, ["a"], batches, loss_fn=lambda m, b: (m(b[0]) * 0).sum(), num_batches=1
        )
    with pytest.raises(CalibrationError, match="fisher_batches"):
        collect_output_fisher(model, ["a"], batches, loss_fn=_loss, num_batches=0)
    with pytest.raises(CalibrationError, match="loss is nan"):
        collect_output_fisher(
            model,
            ["a"],
            batches,
            loss_fn=lambda m, b: _loss(m, b) * float("nan"),
            num_batches=1,
        )


def test_fisher_round_trips_through_the_statistics_file(tmp_path):
    model = Readout()
    stats = _stats(model, _batches(model))
    path = stats.save(tmp_path / "stats.safetensors")
    back = InputStats.load(path)
    assert set(back.fisher) == {"a", "b"} and set(back.grams) == set(stats.grams)
    assert torch.equal(back.output_fisher("a"), stats.fisher["a"])
    with pytest.raises(CalibrationError, match="fisher_batches"):
        InputStats(stats.grams, stats.samples).output_fisher("a")


# ------------------------------------------------------------------ weighted whitening
def test_weighted_whitening_reaches_the_optimum_of_the_weighted_objective():
    torch.manual_seed(1)
    w = torch.randn(12, 20, dtype=torch.float64)
    x = correlated_inputs(400, 12)
    gram = x.T @ x / 400
    weights = fisher_weights(torch.rand(20, dtype=torch.float64) ** 4, damping=0.0)
    fin, fout = [12, 1], [1, 20]
    for rank in (2, 5, 8):
        bonds = mpo_bonds(fin, fout, rank)
        weighted = mpo_contract(
            mpo_whiten(w, gram, fin, fout, bonds, damping=0.0, out_weights=weights)
        )
        plain = mpo_contract(mpo_whiten(w, gram, fin, fout, bonds, damping=0.0))
        err_weighted = output_error(w, weighted, gram, weights)
        # The Eckart-Young bound of the weighted problem is reached ...
        spectrum = whitened_spectrum(w, gram, damping=0.0, out_weights=weights).pow(2)
        assert err_weighted == pytest.approx(float(spectrum[rank:].sum() / spectrum.sum()) ** 0.5)
        # ... and the unweighted whitening, optimal for the other objective, does worse.
        assert err_weighted < output_error(w, plain, gram, weights)
        assert output_error(w, plain, gram) <= output_error(w, weighted, gram) + 1e-12


def test_weighting_needs_the_output_on_one_site_and_fisher_weights_are_safe():
    w, gram = torch.randn(4, 6, dtype=torch.float64), torch.eye(4, dtype=torch.float64)
    with pytest.raises(TensorizationError, match="one MPO site"):
        mpo_whiten(w, gram, [4, 1], [2, 3], [1, 2, 1], out_weights=torch.ones(6))
    assert torch.equal(fisher_weights(torch.zeros(5)), torch.ones(5, dtype=torch.float64))
    d = fisher_weights(torch.tensor([0.0, 1.0, 3.0]), damping=0.01)
    assert d.min() == pytest.approx(0.01) and d.mean() == pytest.approx(1.01)


# ------------------------------------------------------------------ ranks
def test_absolute_allocation_compares_layers_by_scale():
    falling = torch.linspace(3.0, 1.0, 8)
    relative = allocate_ranks([falling, 10 * falling], [4, 4], budget=40)
    absolute = allocate_ranks([falling, 10 * falling], [4, 4], budget=40, relative=False)
    assert relative == [5, 5]  # same relative spectra: an even split
    assert absolute == [2, 8]  # the 100x energy of layer 1 first, the rest to layer 0


# ------------------------------------------------------------------ the factory
def test_fisher_weighting_lowers_the_loss_the_compressed_model_pays():
    model = Readout()
    batches = _batches(model)
    stats = _stats(model, batches)
    rule = {"pattern": "*", "cr": 0.6, "init": "whiten", "layout": "lowrank"}
    plain, plain_report = tensorize(model, {"rules": [rule]}, stats=stats)
    weighted, report = tensorize(model, {"rules": [rule], "weighting": "fisher"}, stats=stats)
    assert {layer.weighting for layer in report.layers} == {"fisher"}
    assert {layer.weighting for layer in plain_report.layers} == {"none"}
    assert report.weighting == "fisher" and report.to_dict()["weighting"] == "fisher"
    with torch.no_grad():
        base = sum(float(_loss(model, b)) for b in batches)
        loss_plain = sum(float(_loss(plain, b)) for b in batches) - base
        loss_weighted = sum(float(_loss(weighted, b)) for b in batches) - base
    assert loss_weighted < 0.5 * loss_plain


def test_fisher_adaptive_ranks_follow_the_loss_and_hit_the_budget():
    model = Readout(dim=32)
    batches = _batches(model, dim=32)
    stats = _stats(model, batches)
    rules = [{"pattern": "*", "init": "whiten", "layout": "lowrank"}]
    spec = {"rules": rules, "overall_cr": 0.5, "allocation": "adaptive"}
    _, relative = tensorize(model, spec, stats=stats)
    _, fisher = tensorize(model, {**spec, "weighting": "fisher"}, stats=stats)
    ranks = {layer.name: layer.bond_dim for layer in fisher.layers}
    assert ranks["a"] > ranks["b"]  # the loss barely reads b
    rel_ranks = {layer.name: layer.bond_dim for layer in relative.layers}
    assert ranks["a"] > rel_ranks["a"]
    assert fisher.model_params_after <= 0.5 * fisher.model_params_before
    assert fisher.model_cr == pytest.approx(0.5, abs=64 / 2048)


def test_fisher_weighting_without_fisher_or_with_balanced_adaptive_is_refused():
    model = Readout()
    batches = _batches(model)
    grams_only = collect_input_stats(
        model, ["a", "b"], batches, model_inputs=lambda b: b[0], num_batches=1
    )
    rule = {"pattern": "*", "cr": 0.5, "init": "whiten", "layout": "lowrank"}
    with pytest.raises(CalibrationError, match="fisher_batches"):
        tensorize(model, {"rules": [rule], "weighting": "fisher"}, stats=grams_only)
    with pytest.raises(TensorizationError, match="weighting"):
        tensorize(model, {"rules": [rule], "weighting": "hessian"})
    balanced = {"rules": [{"pattern": "*", "init": "als"}], "overall_cr": 0.5}
    with pytest.raises(TensorizationError, match="layout lowrank"):
        tensorize(
            model,
            {**balanced, "allocation": "adaptive", "weighting": "fisher"},
            stats=_stats(model, batches),
        )


def test_fisher_weighting_without_any_statistics_is_a_clear_error():
    rule = {"pattern": "*", "cr": 0.5, "init": "svd", "layout": "lowrank"}
    with pytest.raises(TensorizationError, match="fisher_batches"):
        tensorize(Readout(), {"rules": [rule], "weighting": "fisher"})


def test_spectra_of_a_fisher_spec_without_statistics_use_the_unweighted_sizes():
    from tnexp.analysis import analyze_spectra
    from tnexp.factory import TensorizeSpec

    rules = [{"pattern": "*", "init": "whiten", "layout": "lowrank"}]
    spec = {"rules": rules, "overall_cr": 0.5, "allocation": "adaptive"}
    weighted = analyze_spectra(
        Readout(), TensorizeSpec.from_config({**spec, "weighting": "fisher"})
    )
    plain = analyze_spectra(Readout(), TensorizeSpec.from_config(spec))
    assert [layer.extra["cr"] for layer in weighted] == [layer.extra["cr"] for layer in plain]


def test_output_weights_of_the_wrong_length_are_refused():
    w, gram = torch.randn(4, 6, dtype=torch.float64), torch.eye(4, dtype=torch.float64)
    with pytest.raises(TensorizationError, match="another model"):
        mpo_whiten(w, gram, [4, 1], [1, 6], [1, 2, 1], out_weights=torch.ones(5))
    with pytest.raises(TensorizationError, match="another model"):
        whitened_spectrum(w, gram, out_weights=torch.ones(7))
