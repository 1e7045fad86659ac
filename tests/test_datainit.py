"""Data-aware tensorization: input statistics, whitened / ALS inits, layouts, adaptive ranks."""

import itertools
import math

import pytest
import torch
from matrices import correlated_inputs
from torch import nn

from tnexp.calibration import CalibrationError, InputStats, collect_input_stats
from tnexp.factory import TensorizeSpec, load_tensorized, save_tensorized, tensorize
from tnexp.tn.allocation import allocate_ranks
from tnexp.tn.datainit import (
    conv_weight_matrix,
    damped,
    fisher_weights,
    mpo_als,
    mpo_contract,
    mpo_whiten,
    output_error,
    tucker2_als,
    tucker2_matrix,
)
from tnexp.tn.errors import TensorizationError
from tnexp.tn.mpo import mpo_svd
from tnexp.tn.ranks import mpo_bonds
from tnexp.tn.tucker import tucker2_decompose


class TwoHeads(nn.Module):
    """Two linears reading the same input (like Llama's gate/up) and one after them."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(12, 16)
        self.up = nn.Linear(12, 16)
        self.down = nn.Linear(16, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.gate(x)) * self.up(x))


# ------------------------------------------------------------------ calibration
def test_gram_accumulation_equals_direct_gram_and_shares_inputs():
    torch.manual_seed(0)
    model = TwoHeads().double()
    batches = [torch.randn(5, 3, 12, dtype=torch.float64) for _ in range(4)]
    stats = collect_input_stats(
        model, ["gate", "up", "down"], batches, model_inputs=lambda b: b, num_batches=3
    )
    x = torch.cat([b.reshape(-1, 12) for b in batches[:3]])
    assert torch.allclose(stats.gram("gate"), x.T @ x / x.shape[0])
    assert stats.owner("up") == "gate" and "up" not in stats.grams  # one shared Gram
    hidden = torch.cat(
        [(torch.relu(model.gate(b)) * model.up(b)).reshape(-1, 16) for b in batches[:3]]
    ).detach()
    assert torch.allclose(stats.gram("down"), hidden.T @ hidden / hidden.shape[0])
    assert stats.samples["gate"] == 45 and stats.meta["batches"] == 3


def test_conv_patch_gram_gives_the_exact_output_error():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, stride=2, bias=False).double()
    x = torch.randn(4, 3, 9, 9, dtype=torch.float64)
    stats = collect_input_stats(conv, [""], [x], model_inputs=lambda b: b, num_batches=1)
    delta = torch.randn_like(conv.weight) * 0.1
    with torch.no_grad():
        direct = (nn.functional.conv2d(x, delta, stride=2, padding=1)).pow(2).sum()
    rows = stats.samples[""]
    dm = conv_weight_matrix(delta)
    assert torch.allclose((dm * (stats.gram("") @ dm)).sum() * rows, direct)


def test_calibration_without_batches_is_a_clear_error():
    model = TwoHeads()
    with pytest.raises(CalibrationError, match="num_batches"):
        collect_input_stats(model, ["gate"], [], model_inputs=lambda b: b, num_batches=0)
    with pytest.raises(CalibrationError, match="no batch"):
        collect_input_stats(model, ["gate"], [], model_inputs=lambda b: b, num_batches=4)


def test_stats_round_trip_and_refusals(tmp_path):
    stats = InputStats({"a": torch.eye(3, dtype=torch.float64)}, {"a": 7}, {"b": "a"}, {"x": 1})
    path = stats.save(tmp_path / "stats.safetensors")
    back = InputStats.load(path, expect={"x": 1})
    assert torch.equal(back.gram("b"), torch.eye(3, dtype=torch.float64))
    with pytest.raises(CalibrationError, match="another x"):
        InputStats.load(path, expect={"x": 2})
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # same size, one flipped byte inside the Gram
    path.write_bytes(bytes(data))
    with pytest.raises(CalibrationError, match="damaged"):
        InputStats.load(path)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CalibrationError, match="rm "):
        InputStats.load(path)
    with pytest.raises(CalibrationError, match="no input statistics"):
        stats.gram("c")


# ------------------------------------------------------------------ whitening
@pytest.mark.parametrize("weighted", [False, True])
def test_whiten_at_full_rank_reproduces_the_layer(weighted):
    torch.manual_seed(0)
    w = torch.randn(10, 14, dtype=torch.float64)
    x = correlated_inputs(200, 10)
    gram = x.T @ x
    fin, fout = [10, 1], [1, 14]
    # Fisher weighting (skewed output-channel weights) is undone exactly on the output site.
    weights = fisher_weights(torch.rand(14, dtype=torch.float64) ** 3) if weighted else None
    cores = mpo_whiten(w, gram, fin, fout, mpo_bonds(fin, fout, 10), out_weights=weights)
    assert torch.allclose(mpo_contract(cores), w, atol=1e-9)


def test_whiten_and_als_beat_svd_on_non_isotropic_inputs():
    torch.manual_seed(1)
    w = torch.randn(16, 12, dtype=torch.float64)
    x = correlated_inputs(500, 16)
    gram = x.T @ x / 500
    fin, fout = [16, 1], [1, 12]
    bonds = mpo_bonds(fin, fout, 4)
    svd = output_error(w, mpo_contract(mpo_svd(w, fin, fout, bonds)), gram)
    white = output_error(w, mpo_contract(mpo_whiten(w, gram, fin, fout, bonds, damping=0)), gram)
    assert white < 0.5 * svd  # strictly (and far) lower on this made example
    # balanced 2-site MPO: ALS from the SVD init
    fin, fout = [4, 4], [3, 4]
    bonds = mpo_bonds(fin, fout, 3)
    start = mpo_svd(w, fin, fout, bonds)
    cores, result = mpo_als(w, gram, start, fin, fout, damping=0.0, max_sweeps=6, tol=0)
    assert output_error(w, mpo_contract(cores), gram) < output_error(w, mpo_contract(start), gram)
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(result.history))


def test_als_three_sites_is_monotone_and_uses_cg_for_large_cores(monkeypatch):
    import tnexp.tn.datainit as datainit

    torch.manual_seed(2)
    w = torch.randn(24, 18, dtype=torch.float64)
    x = correlated_inputs(400, 24)
    gram = x.T @ x / 400
    fin, fout = [2, 3, 4], [3, 3, 2]
    bonds = mpo_bonds(fin, fout, 3)
    start = mpo_svd(w, fin, fout, bonds)
    _, r1 = mpo_als(w, gram, start, fin, fout, damping=1e-3, max_sweeps=3, tol=0)
    monkeypatch.setattr(datainit, "MAX_DIRECT_UNKNOWNS", 0)  # force conjugate gradients
    _, r2 = mpo_als(w, gram, start, fin, fout, damping=1e-3, max_sweeps=3, tol=0)
    for history in (r1.history, r2.history):
        assert all(b <= a + 1e-12 for a, b in itertools.pairwise(history))
        assert history[-1] < history[0]
    assert math.isclose(r1.history[-1], r2.history[-1], rel_tol=0.05)


def test_tucker_als_is_monotone_and_beats_hosvd():
    torch.manual_seed(3)
    kernel = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    x = correlated_inputs(300, 45).reshape(300, 45)
    gram = x.T @ x / 300
    core, u_out, u_in = tucker2_decompose(kernel, (3, 2))
    (c2, uo2, ui2), result = tucker2_als(
        kernel, gram, core, u_out, u_in, damping=0.0, max_sweeps=5, tol=0
    )
    w = conv_weight_matrix(kernel)
    before = output_error(w, tucker2_matrix(core, u_out, u_in), gram)
    after = output_error(w, tucker2_matrix(c2, uo2, ui2), gram)
    assert after < before
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(result.history))


def test_singular_or_empty_gram_is_damped_not_a_crash():
    w = torch.randn(8, 6, dtype=torch.float64)
    dead = torch.zeros(8, 8, dtype=torch.float64)
    dead[0, 0] = 1.0  # one live input, seven dead ones; two samples' worth of rank
    fin, fout = [8, 1], [1, 6]
    bonds = mpo_bonds(fin, fout, 3)
    for gram in (dead, torch.zeros(8, 8, dtype=torch.float64)):
        cores = mpo_whiten(w, gram, fin, fout, bonds)
        assert all(torch.isfinite(c).all() for c in cores)
    assert torch.equal(damped(torch.zeros(3, 3), 0.01), torch.eye(3, dtype=torch.float64))
    with pytest.raises(TensorizationError, match="NaN"):
        damped(torch.full((3, 3), float("nan")), 0.01)


# ------------------------------------------------------------------ allocation
def test_adaptive_allocation_spends_on_the_hard_layer():
    easy = torch.tensor([10.0, 0.1, 0.1, 0.1, 0.1, 0.1])
    hard = torch.ones(6)
    ranks = allocate_ranks([easy, hard], [10, 10], budget=60)
    assert ranks[0] == 1 and ranks[1] == 5 and sum(ranks) * 10 <= 60


class Pair(nn.Module):
    """An easy layer (nearly rank one) and a hard one (flat spectrum), same input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.easy = nn.Linear(32, 32, bias=False)
        self.hard = nn.Linear(32, 32, bias=False)
        with torch.no_grad():
            u, v = torch.randn(32, 1), torch.randn(1, 32)
            self.easy.weight.copy_(u @ v + 0.01 * torch.randn(32, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hard(x) + self.easy(x)


def _summed_error(report) -> float:
    """What adaptive allocation minimises: the summed squared relative output errors."""
    return sum(layer.output_error**2 for layer in report.layers)


def test_adaptive_hits_overall_cr_and_beats_uniform():
    model = Pair()
    x = torch.randn(256, 32)
    stats = collect_input_stats(
        model, ["easy", "hard"], [x], model_inputs=lambda b: b, num_batches=1
    )
    spec = {"rules": [{"pattern": "*", "init": "whiten", "layout": "lowrank"}], "overall_cr": 0.5}
    _, uniform = tensorize(model, spec, stats=stats)
    _, adaptive = tensorize(model, {**spec, "allocation": "adaptive"}, stats=stats)
    assert abs(adaptive.model_cr - 0.5) <= 64 / 2048  # one rank unit of rounding
    assert adaptive.model_params_after <= 0.5 * 2048
    assert _summed_error(adaptive) < _summed_error(uniform)
    ranks = {layer.name: layer.bond_dim for layer in adaptive.layers}
    assert ranks["easy"] < ranks["hard"]
    assert all(layer.predicted_error is not None for layer in adaptive.layers)


# ------------------------------------------------------------------ factory
def test_factory_data_inits_lower_output_error_on_every_layer(tmp_path):
    torch.manual_seed(0)
    model = TwoHeads()
    xs = [torch.from_numpy(correlated_inputs(64, 12, seed=s).numpy()).float() for s in range(3)]
    stats = collect_input_stats(
        model, ["gate", "up", "down"], xs, model_inputs=lambda b: b, num_batches=3
    )
    base = {"rules": [{"pattern": "*", "cr": 0.5}]}
    _, svd = tensorize(model, base, stats=stats)
    _, als = tensorize(model, {"rules": [{"pattern": "*", "cr": 0.5, "init": "als"}]}, stats=stats)
    for a, s in zip(als.layers, svd.layers, strict=True):
        assert a.output_error <= s.output_error + 1e-9, a.name
    student, low = tensorize(
        model,
        {"rules": [{"pattern": "*", "cr": 0.5, "init": "whiten", "layout": "auto"}]},
        stats=stats,
    )
    assert {layer.layout for layer in low.layers} <= {"lowrank", "balanced"}
    save_tensorized(student, low, tmp_path / "s")
    loaded, _ = load_tensorized(tmp_path / "s", base=TwoHeads())
    x = torch.randn(4, 12)
    assert torch.allclose(loaded(x), student(x))


def test_factory_refuses_data_inits_without_stats_and_whiten_for_tucker():
    with pytest.raises(TensorizationError, match="collect_input_stats"):
        tensorize(TwoHeads(), {"rules": [{"pattern": "*", "cr": 0.5, "init": "whiten"}]})
    conv = nn.Sequential(nn.Conv2d(4, 4, 3))
    stats = collect_input_stats(
        conv, ["0"], [torch.randn(2, 4, 6, 6)], model_inputs=lambda b: b, num_batches=1
    )
    with pytest.raises(TensorizationError, match="als"):
        tensorize(conv, {"rules": [{"pattern": "*", "cr": 0.5, "init": "whiten"}]}, stats=stats)
    with pytest.raises(TensorizationError, match="layout"):
        tensorize(conv, {"rules": [{"pattern": "*", "layout": "diagonal", "cr": 0.5}]})
    with pytest.raises(TensorizationError, match="overall_cr"):
        tensorize(conv, {"rules": [{"pattern": "*", "cr": 0.5}], "allocation": "adaptive"})


def test_tucker_als_through_the_factory():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1))
    x = torch.randn(8, 6, 7, 7)
    x[:, 3:] *= 0.01  # most of the signal in three channels
    stats = collect_input_stats(conv, ["0"], [x], model_inputs=lambda b: b, num_batches=1)
    _, svd = tensorize(conv, {"rules": [{"pattern": "*", "cr": 0.6}]}, stats=stats)
    _, als = tensorize(conv, {"rules": [{"pattern": "*", "cr": 0.6, "init": "als"}]}, stats=stats)
    assert als.layers[0].output_error < svd.layers[0].output_error
    assert als.layers[0].als_sweeps >= 1


class Twice(nn.Module):
    """One layer called twice per forward, then a head the calibration does not need."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)
        self.head_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.head_calls += 1
        return self.head(self.lin(torch.tanh(self.lin(x))))


def test_calibration_stops_after_the_last_layer_and_counts_repeated_calls():
    torch.manual_seed(0)
    model = Twice().double()
    head_calls = []
    model.head.register_forward_hook(lambda *_: head_calls.append(1))
    batches = [torch.randn(4, 6, dtype=torch.float64) for _ in range(3)]
    stats = collect_input_stats(model, ["lin"], batches, model_inputs=lambda b: b, num_batches=3)
    rows = torch.cat([torch.cat([b, torch.tanh(model.lin(b))]) for b in batches]).detach()
    assert torch.allclose(stats.gram("lin"), rows.T @ rows / rows.shape[0])
    assert len(head_calls) == 1  # only the first batch ran the head


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_language_model_mlps_whitened_low_rank(family):
    from tiny_lm import small_llama, tiny_gpt2

    model = (small_llama() if family == "llama" else tiny_gpt2(vocab_size=64)).eval()
    pattern = "model.layers.*.mlp.*_proj" if family == "llama" else "transformer.h.*.mlp.c_*"
    spec = {"rules": [{"pattern": pattern, "cr": 0.5, "init": "whiten", "layout": "lowrank"}]}
    from tnexp.factory import plan_layers

    names = [p.name for p in plan_layers(model, TensorizeSpec.from_config(spec))]
    vocab = model.config.vocab_size
    batches = [
        {"input_ids": torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(i))}
        for i in range(2)
    ]
    stats = collect_input_stats(model, names, batches, model_inputs=lambda b: b, num_batches=2)
    if family == "llama":
        assert any(stats.owner(n) != n for n in names)  # gate/up share one Gram
    _, svd = tensorize(model, {"rules": [{**spec["rules"][0], "init": "svd"}]}, stats=stats)
    _, white = tensorize(model, spec, stats=stats)
    for w, s in zip(white.layers, svd.layers, strict=True):
        assert w.layout == "lowrank" and w.in_factors[1] == 1
        assert w.output_error <= s.output_error + 1e-6, w.name


def _als_vs_svd(model, pattern, batches, model_inputs, cr, **rule):
    from tnexp.factory import plan_layers

    spec = {"rules": [{"pattern": pattern, "cr": cr, **rule}], "als_sweeps": 2}
    names = [p.name for p in plan_layers(model, TensorizeSpec.from_config(spec))]
    stats = collect_input_stats(
        model, names, batches, model_inputs=model_inputs, num_batches=len(batches)
    )
    _, svd = tensorize(model, {**spec, "rules": [{**spec["rules"][0], "init": "svd"}]}, stats=stats)
    _, als = tensorize(model, {**spec, "rules": [{**spec["rules"][0], "init": "als"}]}, stats=stats)
    return svd.layers, als.layers


@pytest.mark.parametrize("which", ["resnet_tucker", "llama_balanced_mpo"])
def test_als_is_never_worse_than_svd_on_any_layer_of_a_whole_model(which):
    """Issue 10's target: per-layer output error of init als <= init svd on every layer."""
    torch.manual_seed(0)
    if which == "resnet_tucker":
        from tnexp.models import small_resnet

        model = small_resnet(num_classes=10, in_channels=1, width=8).eval()
        images = torch.randn(16, 1, 16, 16)
        images[:, :, :, 8:] *= 0.1  # a non-isotropic input
        batches, inputs = [images[:8], images[8:]], (lambda b: b)
        svd, als = _als_vs_svd(model, "layer*.*.conv*", batches, inputs, 0.5)
    else:
        from tiny_lm import small_llama

        model = small_llama(hidden_size=48, intermediate_size=128)
        g = torch.Generator().manual_seed(0)
        batches = [{"input_ids": torch.randint(0, 50, (2, 24), generator=g)} for _ in range(2)]
        svd, als = _als_vs_svd(
            model, "model.layers.*.mlp.*_proj", batches, lambda b: b, 0.5, layout="balanced"
        )
    assert len(als) == len(svd) >= 6
    worse = [
        (a.name, a.output_error, s.output_error)
        for a, s in zip(als, svd, strict=True)
        if a.output_error > s.output_error + 1e-9
    ]
    assert not worse, worse
    assert sum(a.output_error for a in als) < sum(s.output_error for s in svd)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_grams_from_the_feature_cache_equal_the_online_ones(tmp_path, dtype):
    from tnexp.calibration import input_stats_from_feature_cache
    from tnexp.features import open_feature_cache, write_feature_cache
    from tnexp.models import small_resnet
    from tnexp.slicing import make_slice_plan

    torch.manual_seed(0)
    teacher = small_resnet(num_classes=10, in_channels=1, width=8).eval()
    student, _ = tensorize(teacher, {"rules": [{"pattern": "layer*.*.conv*", "cr": 0.5}]})
    plan = make_slice_plan(student, "block")  # a residual block's input is its conv1's
    images = [torch.randn(4, 1, 16, 16) for _ in range(3)]
    write_feature_cache(
        tmp_path / "cache", teacher, plan, images, dataset_identity={"name": "made"},
        dtype=dtype, progress=False,
    )  # fmt: skip
    cache = open_feature_cache(tmp_path / "cache")
    first = [f"{p.paths[0]}.conv1" for p in plan]
    cached = input_stats_from_feature_cache(teacher, first, cache, num_batches=2, batch_size=4)
    online = collect_input_stats(teacher, first, images, model_inputs=lambda b: b, num_batches=2)
    assert cached.meta["source"] == "feature_cache" and cached.meta["batches"] == 2
    assert cached.samples == online.samples
    tol = 1e-6 if dtype == "float32" else 2e-3  # a float16 cache rounds the inputs
    for name in first:
        assert torch.allclose(cached.gram(name), online.gram(name), rtol=tol, atol=tol), name
    # conv2 reads conv1's output, which the cache does not hold: a clear error.
    with pytest.raises(CalibrationError, match=r"layer1\.0\.conv2.*teacher pass"):
        input_stats_from_feature_cache(
            teacher, [*first, "layer1.0.conv2"], cache, num_batches=1, batch_size=4
        )
