"""MPO and Tucker-2 SVD-init speed against TensorLy-Torch, at the same rank and error.

MPO: for each weight size, a random matrix with a decaying spectrum (like trained weights)
is decomposed into a 2-site MPO (balanced factors) at the bond dimension of CR 0.5 by:

* ``tnexp``: :func:`tnexp.tn.mpo.mpo_svd` (float64; the truncation through the Gram
  matrix's leading eigenvectors, :func:`tnexp.tn.linalg.truncated_split`);
* ``tnexp (full SVD)``: the first implementation, a full float64 SVD of the unfolding;
* ``tltorch``: ``tltorch.TensorizedTensor.new(..., factorization="blocktt")`` and
  ``init_from_tensor`` on the float32 weight (TensorLy's ``tensor_train_matrix``).

Tucker-2: a ``(c, c, 3, 3)`` kernel with decaying channel spectra at the ranks of CR 0.5
(spatial modes kept) by ``tnexp hosvd`` / ``tnexp hooi``
(:func:`tnexp.tn.tucker.tucker2_decompose`) and ``tltorch`` (``TuckerTensor`` with rank
``(r_out, r_in, 3, 3)``, ``init_from_tensor``: TensorLy's ``tucker``, HOOI from an SVD init).

The ``tltorch`` rows need the optional ``bench`` group (``uv sync --group bench``) and are
skipped without it. Reported per method: the best of ``--rounds`` wall times (one torch
thread) and the relative weight error ``||W - W'|| / ||W||`` in float64.

Usage::

    uv run --group bench python benchmarks/bench_init_speed.py \
        [--sizes 768x3072 1024x4096] [--convs 256 512] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from tnexp.tn.datainit import mpo_contract
from tnexp.tn.mpo import mpo_svd, site_major
from tnexp.tn.ranks import balanced_factors, mpo_bond_dim_for_cr, mpo_bonds, tucker2_ranks_for_cr
from tnexp.tn.tucker import tucker2_decompose


def decaying(in_dim: int, out_dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(in_dim, in_dim, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(out_dim, in_dim, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -2, in_dim, dtype=torch.float64)
    return ((u * s) @ v.T).float()  # (in, out), float32 like a checkpoint


def decaying_kernel(channels: int, seed: int = 0) -> torch.Tensor:
    """A ``(c, c, 3, 3)`` float32 kernel whose channel unfoldings have decaying spectra."""
    g = torch.Generator().manual_seed(seed)
    out_basis, _ = torch.linalg.qr(
        torch.randn(channels, channels, generator=g, dtype=torch.float64)
    )
    in_basis, _ = torch.linalg.qr(torch.randn(channels, channels, generator=g, dtype=torch.float64))
    scale = torch.logspace(0, -2, channels, dtype=torch.float64)
    core = torch.randn(channels, channels, 3, 3, generator=g, dtype=torch.float64)
    core = core * scale[:, None, None, None] * scale[None, :, None, None]
    return torch.einsum("abhw,oa,ib->oihw", core, out_basis, in_basis).float()


def have_tltorch() -> bool:
    try:
        import tltorch  # noqa: F401
    except ImportError:
        print("tensorly-torch is not installed (uv sync --group bench): its rows are skipped")
        return False
    return True


def full_svd_cores(weight, in_factors, out_factors, bonds) -> list[torch.Tensor]:
    """The previous tnexp init: a full float64 SVD of each unfolding."""
    rest = site_major(weight.double(), in_factors, out_factors)
    cores, left = [], 1
    for k, bond in enumerate(bonds):
        mat = rest.reshape(left * in_factors[k] * out_factors[k], -1)
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        cores.append(u[:, :bond].reshape(left, in_factors[k], out_factors[k], bond))
        rest, left = s[:bond, None] * vh[:bond], bond
    cores.append(rest.reshape(left, in_factors[-1], out_factors[-1], 1))
    return cores


def tltorch_tucker(kernel: torch.Tensor, ranks: tuple[int, int]) -> torch.Tensor:
    import tltorch

    tucker = tltorch.TuckerTensor.new(tuple(kernel.shape), rank=(*ranks, *kernel.shape[2:]))
    tucker.init_from_tensor(kernel)
    return tucker.to_tensor().detach()


def tnexp_tucker(kernel: torch.Tensor, ranks: tuple[int, int], method: str) -> torch.Tensor:
    core, u_out, u_in = tucker2_decompose(kernel, ranks, method=method)
    return torch.einsum("abhw,oa,ib->oihw", core, u_out, u_in)


def tltorch_weight(weight, in_factors, out_factors, bond) -> torch.Tensor:
    import tltorch

    tt = tltorch.TensorizedTensor.new(
        (tuple(in_factors), tuple(out_factors)), rank=(1, bond, 1), factorization="blocktt"
    )
    tt.init_from_tensor(weight.reshape(*in_factors, *out_factors))
    return tt.to_matrix().detach()


def timed(fn, rounds: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(rounds):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def bench_size(size: str, rounds: int) -> list[dict[str, Any]]:
    rows = []
    in_dim, out_dim = (int(v) for v in size.split("x"))
    weight = decaying(in_dim, out_dim)
    fin, fout = balanced_factors(in_dim, 2), balanced_factors(out_dim, 2)
    bond = mpo_bond_dim_for_cr(fin, fout, 0.5)
    bonds = mpo_bonds(fin, fout, bond)
    ref = weight.double()

    def error(approx: torch.Tensor) -> float:
        return float((approx.double() - ref).norm() / ref.norm())

    methods = {
        "tnexp": lambda: mpo_contract(mpo_svd(weight, fin, fout, bonds)),
        "tnexp (full SVD)": lambda: mpo_contract(full_svd_cores(weight, fin, fout, bonds)),
    }
    if have_tltorch():
        methods["tltorch"] = lambda: tltorch_weight(weight, fin, fout, bond)
    for name, fn in methods.items():
        seconds, approx = timed(fn, rounds)
        row = {"size": size, "bond": bond, "method": name, "seconds": seconds}
        row["rel_error"] = error(approx.reshape(in_dim, out_dim))
        rows.append(row)
        print(f"{size} D={bond} {name:18s} {seconds:7.2f} s  error {row['rel_error']:.6f}")
    return rows


def bench_conv(channels: int, rounds: int) -> list[dict[str, Any]]:
    kernel = decaying_kernel(channels)
    ranks = tuple(tucker2_ranks_for_cr(channels, channels, (3, 3), 0.5))
    ref = kernel.double()
    methods = {
        "tnexp hosvd": lambda: tnexp_tucker(kernel, ranks, "hosvd"),
        "tnexp hooi": lambda: tnexp_tucker(kernel, ranks, "hooi"),
    }
    if have_tltorch():
        methods["tltorch tucker"] = lambda: tltorch_tucker(kernel, ranks)
    rows = []
    size = f"conv {channels}x{channels}x3x3"
    for name, fn in methods.items():
        seconds, approx = timed(fn, rounds)
        error = float((approx.double() - ref).norm() / ref.norm())
        rows.append({"size": size, "ranks": list(ranks), "method": name, "seconds": seconds})
        rows[-1]["rel_error"] = error
        print(f"{size} r={ranks} {name:15s} {seconds:7.3f} s  error {error:.6f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["768x3072", "1024x4096"])
    parser.add_argument("--convs", nargs="*", type=int, default=[256, 512])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="docs/benchmarks/init_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [row for size in args.sizes for row in bench_size(size, args.rounds)]
    rows += [row for channels in args.convs for row in bench_conv(channels, args.rounds)]
    payload = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": 1},
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
