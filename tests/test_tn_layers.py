import math

import pytest
import torch
from torch import nn

from tnexp.tn import (
    MPOLinear,
    TensorizationError,
    TuckerConv2d,
    balanced_factors,
    mpo2_bond_dim_eq11,
    mpo_bond_dim_for_cr,
    mpo_params,
    tucker2_decompose,
    tucker2_params,
    tucker2_ranks_for_cr,
)
from tnexp.tn.mpo import CONTRACTION_ORDERS
from tnexp.tn.timing import TIMED_CHOICES


# ---------------------------------------------------------------- Tucker
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, stride=1, padding=1, bias=False),
        dict(kernel_size=3, stride=2, padding=1, bias=True),
        dict(kernel_size=(3, 5), stride=(1, 2), padding=(2, 1), dilation=2, bias=True),
        dict(kernel_size=1, stride=2, padding=0, bias=False),
        dict(kernel_size=3, padding=1, padding_mode="reflect", bias=True),
    ],
)
def test_full_rank_tucker_reproduces_conv(kwargs):
    conv = nn.Conv2d(6, 10, **kwargs).double()
    tucker = TuckerConv2d.from_conv(conv, ranks=(10, 6))
    x = torch.randn(2, 6, 11, 13, dtype=torch.float64)
    torch.testing.assert_close(tucker(x), conv(x), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(tucker.to_dense(), conv.weight, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(tucker.to_conv()(x), conv(x), atol=1e-10, rtol=1e-10)


def test_full_rank_tucker_float32_within_1e5():
    conv = nn.Conv2d(16, 32, 3, padding=1)
    tucker = TuckerConv2d.from_conv(conv, ranks=(32, 16))
    x = torch.randn(2, 16, 8, 8)
    assert (tucker(x) - conv(x)).abs().max() < 1e-5


def test_tucker_param_count_and_cr():
    conv = nn.Conv2d(64, 128, 3, padding=1, bias=True)
    tucker = TuckerConv2d.from_conv(conv, cr=0.5)
    r_out, r_in = tucker.ranks
    weights = sum(p.numel() for n, p in tucker.named_parameters() if "bias" not in n)
    assert weights == tucker2_params(128, 64, (3, 3), (r_out, r_in))
    assert sum(p.numel() for p in tucker.parameters()) == weights + 128
    achieved = 1 - weights / conv.weight.numel()
    assert abs(achieved - 0.5) < 0.01


def test_tucker_svd_init_beats_random():
    torch.manual_seed(1)
    # A kernel with decaying channel spectrum, as trained kernels have.
    conv = nn.Conv2d(32, 32, 3)
    with torch.no_grad():
        u = torch.linalg.qr(torch.randn(32, 32))[0]
        conv.weight.mul_(torch.logspace(0, -2, 32)[:, None, None, None])
        conv.weight.copy_(torch.einsum("oa,aihw->oihw", u, conv.weight))
    err = {}
    for init in ("svd", "random"):
        t = TuckerConv2d.from_conv(conv, cr=0.5, init=init)
        err[init] = float((t.to_dense() - conv.weight).norm() / conv.weight.norm())
    assert err["svd"] < 0.5 * err["random"]


def test_tucker_random_init_keeps_variance():
    conv = nn.Conv2d(64, 64, 3)
    t = TuckerConv2d.from_conv(conv, cr=0.5, init="random")
    ratio = float(t.to_dense().var() / conv.weight.var())
    assert 0.7 < ratio < 1.4


def test_hooi_not_worse_than_hosvd_and_matches_tensorly():
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    kernel = torch.randn(24, 20, 3, 3, dtype=torch.float64)
    errors = {}
    for method in ("hosvd", "hooi"):
        core, u_out, u_in = tucker2_decompose(kernel, (8, 6), method=method, n_iter=200)
        rec = torch.einsum("abhw,oa,ib->oihw", core, u_out, u_in)
        errors[method] = float((rec - kernel).norm())
    assert errors["hooi"] <= errors["hosvd"] + 1e-9
    tl.set_backend("numpy")
    (core, factors), _ = partial_tucker(
        kernel.numpy(), rank=[8, 6], modes=[0, 1], n_iter_max=200, tol=1e-12
    )
    rec = tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1])
    tl_error = float((torch.from_numpy(rec) - kernel).norm())
    assert errors["hooi"] <= tl_error * (1 + 1e-4)


def test_tucker_bad_input():
    conv = nn.Conv2d(8, 16, 3)
    with pytest.raises(TensorizationError, match="exactly one"):
        TuckerConv2d.from_conv(conv)
    with pytest.raises(TensorizationError, match="exactly one"):
        TuckerConv2d.from_conv(conv, cr=0.5, ranks=(2, 2))
    with pytest.raises(TensorizationError, match="r_in <= 8"):
        TuckerConv2d.from_conv(conv, ranks=(4, 9))
    with pytest.raises(TensorizationError, match="strictly between 0 and 1"):
        TuckerConv2d.from_conv(conv, cr=1.5)
    with pytest.raises(TensorizationError, match="rank below 1"):
        TuckerConv2d.from_conv(conv, cr=0.999)
    with pytest.raises(TensorizationError, match="grouped"):
        TuckerConv2d.from_conv(nn.Conv2d(8, 16, 3, groups=2), cr=0.5)
    with pytest.raises(TensorizationError, match="not Linear"):
        TuckerConv2d.from_conv(nn.Linear(3, 3), cr=0.5)


def test_tucker_gradients_reach_every_factor():
    t = TuckerConv2d.from_conv(nn.Conv2d(8, 16, 3, padding=1), cr=0.5)
    t(torch.randn(2, 8, 6, 6)).square().sum().backward()
    for name, p in t.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------- rank solvers
@pytest.mark.parametrize("kwargs", [dict(padding=1, bias=True), dict(stride=2, padding=1)])
def test_tucker_paths_same_output_and_gradients(kwargs):
    conv = nn.Conv2d(6, 10, 3, **kwargs).double()
    tucker = TuckerConv2d.from_conv(conv, ranks=(4, 3))
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64, requires_grad=True)
    results = {}
    for order in ("factored", "merged"):
        tucker.order = order
        tucker.zero_grad()
        x.grad = None
        out = tucker(x)
        assert tucker.last_order == order
        out.sin().sum().backward()
        grads = [p.grad.clone() for p in tucker.parameters()] + [x.grad.clone()]
        assert all(g.abs().sum() > 0 for g in grads)
        results[order] = (out.detach(), grads)
    torch.testing.assert_close(results["merged"][0], results["factored"][0])
    for a, b in zip(results["merged"][1], results["factored"][1], strict=True):
        torch.testing.assert_close(a, b)


def test_tucker_auto_order_timed_once_per_shape(monkeypatch):
    import tnexp.tn.tucker as tucker_mod

    calls = []

    def fake_fastest(paths, x, params, *, grad, prefer):
        calls.append((tuple(x.shape), grad))
        return "merged", {name: 1.0 for name in paths}

    monkeypatch.setattr(tucker_mod, "fastest_path", fake_fastest)
    TIMED_CHOICES.clear()
    tucker = TuckerConv2d.from_conv(nn.Conv2d(8, 8, 3, padding=1), cr=0.5)
    x = torch.randn(2, 8, 6, 6)
    for _ in range(3):
        tucker(x).sum().backward()
    assert calls == [((2, 8, 6, 6), True)]
    assert tucker.last_order == "merged"
    with torch.no_grad():
        tucker(x)  # inference is a separate key: timed once more
        tucker(x)
    tucker(torch.randn(1, 8, 6, 6))
    assert len(calls) == 3
    assert set(tucker.cached_orders().values()) == {"merged"}
    # Another layer of the same shape reuses the timing (same paths in one process).
    twin = TuckerConv2d.from_conv(nn.Conv2d(8, 8, 3, padding=1), cr=0.5)
    twin(x)
    assert len(calls) == 3 and twin.last_order == "merged"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        twin(x)  # autocast runs other kernels: its own key
    assert len(calls) == 4
    TuckerConv2d.from_conv(nn.Conv2d(8, 8, 3, padding=1, stride=2), cr=0.5)(x)
    assert len(calls) == 5  # a different stride is a different signature
    # Deterministic mode never times: FLOPs decide (factored at CR 0.5), nothing cached.
    fresh = TuckerConv2d.from_conv(nn.Conv2d(8, 8, 3, padding=1), cr=0.5)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        fresh(torch.randn(3, 8, 6, 6))
    finally:
        torch.use_deterministic_algorithms(previous)
    assert len(calls) == 5 and fresh.last_order == "factored"


def test_tucker_forced_order_and_flop_fallback(monkeypatch):
    import tnexp.tn.tucker as tucker_mod

    def never(*args, **kwargs):
        raise AssertionError("a forced order or calibrate=False must not time anything")

    monkeypatch.setattr(tucker_mod, "fastest_path", never)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(2, 16, 8, 8)
    for order in ("factored", "merged"):
        layer = TuckerConv2d.from_conv(conv, cr=0.5, order=order)
        layer(x)
        assert layer.last_order == order
    # FLOPs: at CR 0.5 the factored path is cheaper; at full ranks the merged one.
    x = torch.randn(4, 16, 16, 16)
    for ranks, expected in (((5, 5), "factored"), ((16, 16), "merged")):
        layer = TuckerConv2d.from_conv(conv, ranks=ranks, calibrate=False)
        costs = layer.costs(x.shape)
        layer(x)
        assert layer.last_order == expected == min(costs, key=costs.get)
    with pytest.raises(TensorizationError, match="Tucker order"):
        TuckerConv2d.from_conv(conv, cr=0.5, order="fused")


def test_tucker_timing_picks_a_path_and_merge_export_unchanged():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    tucker = TuckerConv2d.from_conv(conv, cr=0.5)
    x = torch.randn(2, 8, 6, 6)
    out = tucker(x)
    assert tucker.last_order in ("factored", "merged")
    torch.testing.assert_close(tucker.to_conv()(x), out, atol=1e-5, rtol=1e-5)


def _timed_layers() -> list[nn.Module]:
    """A Tucker conv and an MPO linear, both choosing their path by timing."""
    return [
        TuckerConv2d.from_conv(nn.Conv2d(8, 8, 3, padding=1), cr=0.5, calibrate=True),
        MPOLinear.from_linear(nn.Linear(64, 48), cr=0.3, calibrate=True),
    ]


def _layer_input(layer: nn.Module) -> torch.Tensor:
    # Not a leaf, as inside a model: the step's graph reaches the layer's input.
    shape = (2, 8, 6, 6) if isinstance(layer, TuckerConv2d) else (5, 64)
    return torch.randn(shape, requires_grad=True) * 1.0


def _step(layer: nn.Module) -> None:
    layer(_layer_input(layer)).sum().backward()


@pytest.mark.parametrize("watch", ["flop_counter", "save_on_cpu", "checkpoint"])
def test_timed_paths_are_not_timed_while_the_graph_is_watched(watch):
    # Issue 14: a Lightning callback counts the first step's FLOPs with FlopCounterMode,
    # whose module tracker hooks every module input into the autograd graph; timing
    # inside that step made backward fail ("A leaf node was passed to
    # _will_engine_execute_node"). Such a forward picks by FLOPs and caches nothing.
    from torch.utils.checkpoint import checkpoint
    from torch.utils.flop_counter import FlopCounterMode

    for layer in _timed_layers():
        TIMED_CHOICES.clear()
        if watch == "flop_counter":
            with FlopCounterMode(display=False) as counter:
                _step(layer)
            layer.contraction = layer.order = layer.last_order  # the same path, forced
            with FlopCounterMode(display=False) as forced:
                _step(layer)
            layer.contraction = layer.order = "auto"
            assert counter.get_total_flops() == forced.get_total_flops()  # no timing runs
        elif watch == "save_on_cpu":
            with torch.autograd.graph.save_on_cpu():
                _step(layer)
        else:
            for reentrant in (False, True):
                checkpoint(layer, _layer_input(layer), use_reentrant=reentrant).sum().backward()
        # (The reentrant checkpoint's first forward runs without gradients: timed as such.)
        assert not [key for key in TIMED_CHOICES._entries if key[1][3]], watch
        _step(layer)  # unwatched: timed now, and cached
        assert [key for key in TIMED_CHOICES._entries if key[1][3]]


def test_timing_runs_do_not_reach_module_hooks():
    # Timing calls the convolutions functionally: hooks (a profiler's, a feature capture's,
    # torch's global module hooks) see the layer's real forward only.
    TIMED_CHOICES.clear()
    layer = TuckerConv2d.from_conv(nn.Conv2d(8, 8, 3, padding=1), cr=0.5, calibrate=True)
    seen = []
    hooks = [m.register_forward_hook(lambda *a: seen.append(1)) for m in layer.children()]
    handle = nn.modules.module.register_module_forward_hook(lambda *a: seen.append(2))
    try:
        layer(_layer_input(layer)).sum().backward()
    finally:
        handle.remove()
        for hook in hooks:
            hook.remove()
    assert len(TIMED_CHOICES._entries) == 1  # it did time
    # The real forward: the tucker layer (global hook), plus its three convs if factored.
    convs = 0 if layer.last_order == "merged" else 3
    assert (seen.count(1), seen.count(2)) == (convs, 1 + convs)


def test_tucker_ranks_hit_cr():
    for c_out, c_in in [(64, 64), (128, 64), (256, 256), (512, 512)]:
        for cr in (0.5, 0.7):
            r = tucker2_ranks_for_cr(c_out, c_in, (3, 3), cr)
            achieved = 1 - tucker2_params(c_out, c_in, (3, 3), r) / (c_out * c_in * 9)
            # One rank step changes params by about (c + r*9*c') ; stay within that.
            step = (max(c_out, c_in) + 9 * max(r)) / (c_out * c_in * 9)
            assert abs(achieved - cr) <= step, (c_out, c_in, cr, r, achieved)


def test_balanced_factors():
    assert balanced_factors(1600, 2) == [40, 40]
    assert balanced_factors(6400, 2) == [80, 80]
    assert balanced_factors(1536, 2) == [32, 48]
    assert balanced_factors(4096, 3) == [16, 16, 16]
    assert math.prod(balanced_factors(768 * 4, 3)) == 3072


def test_eq11_on_gpt2_xl_shapes():
    # GPT-2 XL MLP: 1600 -> 6400 (c_fc) and 6400 -> 1600 (c_proj), 2 sites, per-layer CR 0.48.
    for i, o in [((40, 40), (80, 80)), ((80, 80), (40, 40))]:
        real = mpo2_bond_dim_eq11(i, o, 0.48)
        assert real == pytest.approx(0.52 * 1600 * 6400 / (40 * 80 + 40 * 80))
        bond = mpo_bond_dim_for_cr(i, o, 0.48)
        assert bond in (math.floor(real), math.ceil(real))
        achieved = 1 - mpo_params(i, o, bond) / (1600 * 6400)
        assert abs(achieved - 0.48) <= 6400 / (1600 * 6400)  # one bond step
        assert bond == 832


def test_n_site_bond_solver_hits_target():
    i, o = [4, 8, 8], [8, 8, 12]
    dense = math.prod(i) * math.prod(o)
    for cr in (0.3, 0.5, 0.8):
        d = mpo_bond_dim_for_cr(i, o, cr)
        lower = mpo_params(i, o, max(d - 1, 1))
        upper = mpo_params(i, o, d + 1)
        target = (1 - cr) * dense
        assert lower <= target <= upper


def test_cr_needing_bond_below_one():
    with pytest.raises(TensorizationError, match="bond dimension below 1"):
        mpo_bond_dim_for_cr([2, 2], [2, 2], 0.99)


# ---------------------------------------------------------------- MPO
@pytest.mark.parametrize("sites", [1, 2, 3])
def test_full_bond_mpo_reproduces_linear(sites):
    layer = nn.Linear(24, 36).double()
    in_f = {1: [24], 2: [4, 6], 3: [2, 3, 4]}[sites]
    out_f = {1: [36], 2: [6, 6], 3: [3, 3, 4]}[sites]
    full = max(
        [1]
        + [
            min(
                math.prod(a * b for a, b in zip(in_f[: k + 1], out_f[: k + 1])),
                math.prod(a * b for a, b in zip(in_f[k + 1 :], out_f[k + 1 :])),
            )
            for k in range(sites - 1)
        ]
    )
    mpo = MPOLinear.from_linear(layer, bond_dim=full, in_factors=in_f, out_factors=out_f)
    x = torch.randn(5, 7, 24, dtype=torch.float64)
    for order in CONTRACTION_ORDERS:
        torch.testing.assert_close(mpo(x, order=order), layer(x), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(mpo.to_dense(), layer.weight, atol=1e-10, rtol=1e-10)


def test_full_bond_mpo_float32_within_1e5():
    layer = nn.Linear(64, 96)
    mpo = MPOLinear.from_linear(layer, bond_dim=64, in_factors=[8, 8], out_factors=[8, 12])
    x = torch.randn(4, 64)
    assert (mpo(x) - layer(x)).abs().max() < 1e-5


def test_mpo_hf_conv1d_layout():
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(48, 16).double()  # nf=out=48, nx=in=16; weight is (in, out)
    torch.nn.init.normal_(layer.bias)
    mpo = MPOLinear.from_linear(layer, bond_dim=24)  # full bond: min(4*6, 4*8)
    assert mpo.in_features == 16 and mpo.out_features == 48
    assert mpo.to_dense().shape == layer.weight.shape == (16, 48)
    x = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(mpo(x), layer(x), atol=1e-10, rtol=1e-10)


def test_mpo_param_count_exact():
    layer = nn.Linear(160, 640)
    mpo = MPOLinear.from_linear(layer, cr=0.48)
    d = mpo.bond_dim
    assert sum(c.numel() for c in mpo.cores) == mpo_params(mpo.in_factors, mpo.out_factors, d)
    assert (
        sum(p.numel() for p in mpo.parameters())
        == mpo_params(mpo.in_factors, mpo.out_factors, d) + 640
    )


def test_mpo_svd_beats_random():
    layer = nn.Linear(64, 64)
    with torch.no_grad():
        u, s, vh = torch.linalg.svd(layer.weight)
        layer.weight.copy_(u @ torch.diag(s * torch.logspace(0, -3, 64)) @ vh)
    errs = {}
    for init in ("svd", "random"):
        m = MPOLinear.from_linear(layer, cr=0.5, init=init)
        errs[init] = float((m.to_dense() - layer.weight).norm() / layer.weight.norm())
    assert errs["svd"] < 0.7 * errs["random"]


def test_mpo_random_init_keeps_output_variance():
    layer = nn.Linear(256, 256)
    m = MPOLinear.from_linear(layer, cr=0.5, init="random", num_sites=2)
    x = torch.randn(4096, 256)
    with torch.no_grad():
        ratio = float((m(x) - m.bias).var() / (layer(x) - layer.bias).var())
    assert 0.6 < ratio < 1.6


@pytest.mark.parametrize("sites", [2, 3])
def test_every_order_same_output_and_gradients(sites):
    layer = nn.Linear(64, 48).double()
    mpo = MPOLinear.from_linear(layer, cr=0.3, num_sites=sites)
    x = torch.randn(6, 64, dtype=torch.float64, requires_grad=True)
    reference = None
    for order in ("dense", "left_to_right", "right_to_left", "optimal", "auto"):
        mpo.zero_grad()
        x.grad = None
        out = mpo(x, order=order)
        (out.sin().sum()).backward()
        grads = [c.grad.clone() for c in mpo.cores] + [mpo.bias.grad.clone(), x.grad.clone()]
        for g in grads[:-1]:
            assert g.abs().sum() > 0  # every core receives a gradient
        if reference is None:
            reference = (out.detach(), grads)
        else:
            torch.testing.assert_close(out.detach(), reference[0])
            for a, b in zip(grads, reference[1]):
                torch.testing.assert_close(a, b)


def test_auto_order_depends_on_tokens():
    layer = nn.Linear(1600, 6400, device="meta")
    mpo = MPOLinear(in_factors=[40, 40], out_factors=[80, 80], bond_dim=832, device="meta")
    del layer
    costs_1 = mpo.contraction_costs(1)
    costs_big = mpo.contraction_costs(8192)
    assert min(costs_1, key=costs_1.get) != "dense"
    assert min(costs_big, key=costs_big.get) == "dense"


def test_mpo_calibrated_auto_times_once_per_token_count(monkeypatch):
    import tnexp.tn.mpo as mpo_mod

    calls = []

    def fake_fastest(paths, x, params, *, grad, prefer):
        calls.append((x.shape[0], grad, sorted(paths)))
        return "right_to_left", {name: 1.0 for name in paths}

    monkeypatch.setattr(mpo_mod, "fastest_path", fake_fastest)
    TIMED_CHOICES.clear()
    mpo = MPOLinear.from_linear(nn.Linear(64, 48), cr=0.3, calibrate=True)
    x = torch.randn(2, 5, 64)
    for _ in range(3):
        mpo(x).sum().backward()
    assert mpo.last_order == "right_to_left"  # the timed winner, not the FLOP choice
    assert len(calls) == 1 and calls[0][:2] == (10, True)
    assert "right_to_left" in calls[0][2]
    mpo(torch.randn(7, 64))
    assert len(calls) == 2 and set(mpo.timed_orders().values()) == {"right_to_left"}
    # A forced order is honoured and never timed.
    for order in ("dense", "left_to_right"):
        mpo(x, order=order)
        assert mpo.last_order == order
    assert len(calls) == 2


def test_mpo_calibrated_auto_real_timing_same_output():
    TIMED_CHOICES.clear()
    layer = nn.Linear(64, 48).double()
    timed = MPOLinear.from_linear(layer, cr=0.3, calibrate=True)
    plain = MPOLinear.from_linear(layer, cr=0.3)
    x = torch.randn(6, 64, dtype=torch.float64)
    torch.testing.assert_close(timed(x), plain(x))
    assert timed.last_order in CONTRACTION_ORDERS
    assert list(timed.timed_orders().values()) == [timed.last_order]
    costs = plain.contraction_costs(6)
    assert plain.last_order == min(costs, key=costs.get)  # uncalibrated: FLOPs


def test_merge_for_inference():
    layer = nn.Linear(32, 32)
    mpo = MPOLinear.from_linear(layer, cr=0.5)
    x = torch.randn(3, 32)
    expected = mpo(x).detach()
    mpo.eval()
    mpo.merge_for_inference()
    torch.testing.assert_close(mpo(x), expected, atol=1e-6, rtol=1e-5)
    assert mpo.last_order == "merged"
    mpo.train()
    with pytest.raises(RuntimeError, match="unmerge"):
        mpo(x)
    mpo.unmerge()
    mpo(x)


def test_mpo_bad_input():
    layer = nn.Linear(24, 36)
    with pytest.raises(TensorizationError, match="multiply to"):
        MPOLinear.from_linear(layer, cr=0.5, in_factors=[4, 5], out_factors=[6, 6])
    with pytest.raises(TensorizationError, match="exactly one"):
        MPOLinear.from_linear(layer)
    with pytest.raises(TensorizationError, match="exceeds the largest useful bond"):
        MPOLinear.from_linear(layer, bond_dim=1000)
    with pytest.raises(TensorizationError, match="strictly between"):
        MPOLinear.from_linear(layer, cr=0.0)
    with pytest.raises(TensorizationError, match="not Conv2d"):
        MPOLinear.from_linear(nn.Conv2d(3, 3, 1), cr=0.5)
    with pytest.raises(ValueError, match="last dimension 24"):
        MPOLinear.from_linear(layer, cr=0.5)(torch.randn(2, 23))


def test_forced_contraction_order_that_would_not_fit_is_refused():
    from tnexp.tn.mpo import MPOLinear

    layer = MPOLinear.from_linear(
        torch.nn.Linear(64, 64), bond_dim=64, in_factors=[8, 8], out_factors=[8, 8]
    )
    x = torch.randn(32, 64)
    planner = layer._planner
    # left_to_right keeps x*G1 (T, i2, o1, D) and the output (T, o1, o2) for the backward.
    assert planner.memory_elements(32, "left_to_right") == 32 * 8 * 8 * 64 + 32 * 64
    assert planner.memory_elements(32, "left_to_right", grad=False) == 32 * 8 * 8 * 64
    layer.memory_budget = 4 * 32 * 8 * 8 * 64 // 2  # half of what the order needs
    layer.contraction = "left_to_right"
    auto = planner.auto_order(32)
    with pytest.raises(TensorizationError, match=rf"left_to_right.*auto order here is '{auto}'"):
        layer(x)
    layer.contraction = "auto"  # auto is never refused (it is the cheapest plan)
    assert layer(x).shape == (32, 64)
    layer.contraction = "left_to_right"
    layer.memory_budget = None  # the free memory of the CPU: plenty for this layer
    assert layer(x).shape == (32, 64)


@pytest.mark.parametrize("shape", [(24, 96), (96, 24), (40, 40)])
def test_mpo_svd_init_reaches_the_truncated_svd_optimum(shape):
    """The Gram-eigenvector truncation gives the Eckart-Young error of a full SVD."""
    from tnexp.tn.datainit import mpo_contract
    from tnexp.tn.linalg import truncated_split
    from tnexp.tn.mpo import mpo_svd, site_major

    torch.manual_seed(0)
    in_dim, out_dim = shape
    weight = torch.randn(in_dim, out_dim, dtype=torch.float64) * torch.logspace(0, -3, out_dim)
    fin, fout = [4, in_dim // 4], [4, out_dim // 4]
    bond = 7
    approx = mpo_contract(mpo_svd(weight, fin, fout, [bond]))
    unfolded = site_major(weight, fin, fout).reshape(fin[0] * fout[0], -1)
    s = torch.linalg.svdvals(unfolded)
    optimum = float(s[bond:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())
    error = float((approx - weight).norm() / weight.norm())
    assert error == pytest.approx(optimum, rel=1e-9)
    for m, n in ((30, 50), (50, 30)):  # both branches: left factor orthonormal
        u, rest = truncated_split(torch.randn(m, n, dtype=torch.float64), 5)
        torch.testing.assert_close(u.T @ u, torch.eye(5, dtype=torch.float64))
        assert rest.shape == (5, n)


@pytest.mark.parametrize("rank", [3, 10, 20, 40])
def test_truncated_split_is_eckart_young_optimal_and_exact_at_full_rank(rank):
    """Subset (rank <= 40% of the Gram) and full eigensolver paths, and the exact split."""
    from tnexp.tn.linalg import leading_eigenvectors, truncated_split

    torch.manual_seed(1)
    mat = torch.randn(40, 64, dtype=torch.float64) * torch.logspace(0, -2, 64)
    s = torch.linalg.svdvals(mat)
    for m in (mat, mat.T):  # both branches of the split
        u, rest = truncated_split(m, rank)
        torch.testing.assert_close(u.T @ u, torch.eye(rank, dtype=torch.float64))
        error = float((u @ rest - m).norm())
        assert error == pytest.approx(float(s[rank:].pow(2).sum().sqrt()), rel=1e-9, abs=1e-12)
    gram = mat @ mat.T
    vecs = leading_eigenvectors(gram, rank)
    expected = torch.linalg.eigh(gram).eigenvectors[:, -rank:].flip(-1)
    # Same subspace either way (the subset solver runs while rank <= 40% of the 40 rows).
    torch.testing.assert_close(vecs @ vecs.T, expected @ expected.T)


def test_fastest_path_picks_the_quicker_and_leaves_grads_alone():
    import time

    from tnexp.tn.timing import fastest_path

    weight = nn.Parameter(torch.randn(4, 4))

    def slow(t):
        time.sleep(0.01)
        return t @ weight

    choice, seconds = fastest_path(
        {"slow": slow, "fast": lambda t: t @ weight}, torch.randn(3, 4), [weight], grad=True
    )
    assert choice == "fast" and seconds["slow"] >= 0.01 > seconds["fast"]
    assert weight.grad is None  # timing used autograd.grad, nothing accumulated


def test_fastest_path_keeps_the_preferred_path_unless_another_is_clearly_faster():
    import time

    from tnexp.tn.timing import PREFER_MARGIN, fastest_path

    def sleeper(seconds):
        def run(t):
            time.sleep(seconds)
            return t * 2

        return run

    x = torch.randn(3)
    # 10 ms vs 10.2 ms: a tie within the margin keeps the preferred (FLOP) choice.
    near = {"flops": sleeper(0.0102), "other": sleeper(0.010)}
    choice, seconds = fastest_path(near, x, [], grad=False, prefer="flops")
    if seconds["flops"] <= seconds["other"] * (1 + PREFER_MARGIN):  # sleep() can overshoot
        assert choice == "flops"
    # A clear win (5x) overrides it.
    far = {"flops": sleeper(0.02), "other": sleeper(0.004)}
    assert fastest_path(far, x, [], grad=False, prefer="flops")[0] == "other"
