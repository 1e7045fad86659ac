"""Data-aware initialisation: truncations that minimise the *output* error ``||X (W - W')||``.

Data-free truncation minimises ``||W - W'||_F``; what a network feels is the error on its
real inputs. With the input Gram matrix ``G = X^T X`` (streamed from the teacher, see
:mod:`tnexp.calibration`) the output error of a linear map is the quadratic
``tr((W - W')^T G (W - W'))``, which is exactly the local-distillation MSE of a single
linear slice fed with teacher inputs. Here:

* :func:`mpo_whiten` — exact optimum when the whole input index sits on the first MPO
  site (low-rank layout): truncate ``L^T W`` (``G = L L^T``) and undo ``L^T`` on core 1
  (SVD-LLM-style whitening).
* :func:`mpo_als` — any MPO: a DMRG-style sweep that solves each core in closed form
  for the quadratic given the others (direct solve, or conjugate gradients for large
  cores). Each accepted update never increases the objective.
* :func:`tucker2_als` — Tucker-2 convolutions over the unfolded input patches: closed
  form for ``U_out`` and the core, conjugate gradients for ``U_in``.

Everything runs in float64. ``G`` is damped by ``damping * mean(diag(G))`` so that
input directions the calibration data never visited fall back to the weight-space fit
(and so that few samples or dead inputs never make a solve singular).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from tnexp.tn.errors import TensorizationError
from tnexp.tn.mpo import mpo_svd

DEFAULT_DAMPING = 0.01
# Local problems up to this many unknowns per output column are solved directly; larger
# ones by conjugate gradients (a dense Hessian of 8192^2 float64 is 512 MiB).
MAX_DIRECT_UNKNOWNS = 6144


def damped(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """``G + damping * mean(diag G) * I`` in float64 (a zero Gram becomes the identity)."""
    g = gram.double()
    scale = float(torch.diagonal(g).mean()) if g.numel() else 0.0
    if not math.isfinite(scale):
        raise TensorizationError("the input Gram matrix holds NaN/Inf; recollect calibration.")
    if scale <= 0.0:  # no signal at all: fall back to the data-free (weight-space) objective
        return torch.eye(g.shape[0], dtype=torch.float64, device=g.device)
    return g + (damping * scale) * torch.eye(g.shape[0], dtype=torch.float64, device=g.device)


_CHOLESKY_CACHE: dict[tuple[int, int, float], tuple[torch.Tensor, torch.Tensor]] = {}


def stable_cholesky(gram: torch.Tensor, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """Lower Cholesky factor of the damped Gram; raises the damping until it succeeds.

    The last few factors are cached by Gram identity: layers sharing an input (gate/up)
    and the adaptive allocation's spectra reuse one factorisation.
    """
    key = (id(gram), gram.data_ptr(), float(damping))
    hit = _CHOLESKY_CACHE.get(key)
    if hit is not None and hit[0] is gram:
        return hit[1]
    factor = _cholesky(gram, damping)
    if len(_CHOLESKY_CACHE) >= 8:
        _CHOLESKY_CACHE.pop(next(iter(_CHOLESKY_CACHE)))
    _CHOLESKY_CACHE[key] = (gram, factor)
    return factor


def _cholesky(gram: torch.Tensor, damping: float) -> torch.Tensor:
    for attempt in range(8):
        factor, info = torch.linalg.cholesky_ex(damped(gram, damping * (10.0**attempt)))
        if int(info) == 0:
            return factor
    raise TensorizationError(
        "the input Gram matrix is not positive definite even with strong damping; its "
        "calibration statistics are probably corrupt. Recollect them."
    )


def fisher_weights(fisher: torch.Tensor, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """Output-channel weights ``f / mean(f) + damping`` from a diagonal output Fisher.

    Normalised to mean about 1 so that weighted and unweighted errors are on one scale;
    the damping keeps channels the calibration loss never felt in the fit (a zero weight
    would let the truncation ignore them entirely). A Fisher of zeros gives equal weights.
    """
    f = fisher.double().clamp_min(0.0)
    scale = float(f.mean()) if f.numel() else 0.0
    if not math.isfinite(scale):
        raise TensorizationError("the output Fisher holds NaN/Inf; recollect calibration.")
    if scale <= 0.0:
        return torch.ones_like(f)
    return f / scale + damping


def _weighted_columns(
    matrix_in_out: torch.Tensor, out_weights: torch.Tensor, name: str = "linear"
) -> torch.Tensor:
    """``matrix diag(out_weights)^(1/2)``, refusing weights of the wrong length."""
    if out_weights.shape != (matrix_in_out.shape[1],):
        raise TensorizationError(
            f"{name}: {tuple(out_weights.shape)} output weights for a layer with "
            f"{matrix_in_out.shape[1]} outputs; the statistics belong to another model. "
            "Recollect calibration."
        )
    return matrix_in_out * out_weights.double().sqrt().to(matrix_in_out.device)


def output_error(
    weight_in_out: torch.Tensor,
    approx_in_out: torch.Tensor,
    gram: torch.Tensor,
    out_weights: torch.Tensor | None = None,
) -> float:
    """Relative output error ``||X (W - W')|| / ||X W||`` from the Gram ``X^T X``; with
    ``out_weights`` each output channel's squared error is weighted (Fisher weighting)."""
    w, d, g = weight_in_out.double(), (weight_in_out - approx_in_out).double(), gram.double()
    if out_weights is not None:
        w, d = _weighted_columns(w, out_weights), _weighted_columns(d, out_weights)
    num = float((d * (g @ d)).sum())
    den = float((w * (g @ w)).sum())
    if den <= 0.0:
        return 0.0 if num <= 0.0 else float("inf")
    return math.sqrt(max(num, 0.0) / den)


def weight_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """Relative weight-space error ``||W - W'||_F / ||W||_F``."""
    den = float(weight.double().norm())
    return float((weight.double() - approx.double()).norm()) / den if den > 0 else 0.0


# =========================================================================== MPO
def mpo_contract(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The dense ``(in, out)`` matrix of MPO cores ``(D_{k-1}, i_k, o_k, D_k)``."""
    env = cores[0].new_ones(1, 1, 1)  # (I, O, bond)
    for core in cores:
        env = torch.einsum("IOa,aiob->IiOob", env, core)
        s = env.shape
        env = env.reshape(s[0] * s[1], s[2] * s[3], s[4])
    return env[:, :, 0]


def input_on_first_site(in_factors: Sequence[int]) -> bool:
    """True when the whole input index lives on site 1 (whitening is then exact)."""
    return all(f == 1 for f in in_factors[1:])


def mpo_whiten(
    weight_in_out: torch.Tensor,
    gram: torch.Tensor,
    in_factors: Sequence[int],
    out_factors: Sequence[int],
    bonds: Sequence[int],
    *,
    damping: float = DEFAULT_DAMPING,
    out_weights: torch.Tensor | None = None,
    name: str = "linear",
) -> list[torch.Tensor]:
    """Whitened truncation: SVD of ``L^T W`` (``G = L L^T``), then ``L^{-T}`` on core 1.

    For a 2-site low-rank layout (``in_factors=[in, 1]``) this is the exact minimiser of
    ``||X (W - W')||_F`` at the given rank. With ``out_weights`` (:func:`fisher_weights`)
    it minimises ``||X (W - W') diag(out_weights)^(1/2)||_F`` instead: the SVD of
    ``L^T W diag(w)^(1/2)``, with the weighting undone on the site that holds the output
    (which must then be one site, as in the low-rank layout).
    """
    if not input_on_first_site(in_factors):
        raise TensorizationError(
            f"{name}: init 'whiten' needs the whole input on the first MPO site (layout "
            f"lowrank, in_factors [in, 1, ...]); got in_factors {list(in_factors)}. Use "
            "init 'als' for balanced MPOs, or layout lowrank / auto."
        )
    out_site = _output_site(out_factors, out_weights, name)
    chol = stable_cholesky(gram, damping)
    whitened = chol.T @ weight_in_out.double()
    if out_weights is not None:
        whitened = _weighted_columns(whitened, out_weights, name)
    cores = mpo_svd(whitened, in_factors, out_factors, bonds)  # float64 in, float64 out
    first = cores[0]  # (1, in, o1, D1): undo the whitening on the input index
    flat = first.reshape(first.shape[1], -1)
    flat = torch.linalg.solve_triangular(chol.T, flat, upper=True)
    cores[0] = flat.reshape(first.shape)
    if out_weights is not None:  # undo the output weighting on the output's site
        root = out_weights.double().sqrt().to(cores[out_site].device)
        cores[out_site] = cores[out_site] / root.view(1, 1, -1, 1)
    return cores


def _output_site(out_factors: Sequence[int], out_weights: torch.Tensor | None, name: str) -> int:
    """The site holding the whole output index (only needed with output weights)."""
    if out_weights is None:
        return -1
    sites = [k for k, f in enumerate(out_factors) if f != 1]
    if len(sites) > 1:
        raise TensorizationError(
            f"{name}: output weighting (weighting: fisher) needs the whole output on one MPO "
            f"site (layout lowrank); got out_factors {list(out_factors)}. Use layout lowrank "
            "or weighting: none."
        )
    return sites[0] if sites else len(out_factors) - 1


def whitened_spectrum(
    weight_in_out: torch.Tensor,
    gram: torch.Tensor,
    *,
    damping: float = DEFAULT_DAMPING,
    out_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Singular values of ``L^T W`` (times ``diag(out_weights)^(1/2)``): squared tails are
    the (weighted) output error of each rank."""
    chol = stable_cholesky(gram, damping)
    whitened = chol.T @ weight_in_out.double()
    if out_weights is not None:
        whitened = _weighted_columns(whitened, out_weights)
    return torch.linalg.svdvals(whitened)


@dataclass
class ALSResult:
    """Objective (damped, relative squared) before and after each sweep."""

    history: list[float] = field(default_factory=list)

    @property
    def sweeps(self) -> int:
        return max(0, len(self.history) - 1)


def _objective(w: torch.Tensor, approx: torch.Tensor, g: torch.Tensor, norm: float) -> float:
    d = w - approx
    return float((d * (g @ d)).sum()) / norm


def _solve_spd(h: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve ``H x = rhs`` for a symmetric PSD ``H``, with a tiny ridge if singular."""
    scale = float(torch.diagonal(h).abs().mean()) or 1.0
    for ridge in (0.0, 1e-12, 1e-9, 1e-6):
        eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        factor, info = torch.linalg.cholesky_ex(h + ridge * scale * eye)
        if int(info) == 0:
            return torch.cholesky_solve(rhs, factor)
    return torch.linalg.lstsq(h, rhs).solution


def conjugate_gradient(
    hvp: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    x0: torch.Tensor,
    *,
    max_iter: int = 60,
    tol: float = 1e-7,
) -> torch.Tensor:
    """CG for ``H x = rhs`` (``H`` symmetric PSD given as a product) from ``x0``.

    Every CG iterate lowers the quadratic ``x^T H x / 2 - rhs^T x`` from the warm start,
    so an ALS step by CG never increases the objective.
    """
    x = x0.clone()
    r = rhs - hvp(x)
    p = r.clone()
    rs = float((r * r).sum())
    stop = tol * tol * max(float((rhs * rhs).sum()), 1e-300)
    for _ in range(max_iter):
        if rs <= stop:
            break
        hp = hvp(p)
        curvature = float((p * hp).sum())
        if curvature <= 0.0:
            break
        alpha = rs / curvature
        x = x + alpha * p
        r = r - alpha * hp
        rs_new = float((r * r).sum())
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x


def _left_env(cores: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    env = cores[0].new_ones(1, 1, 1)  # (I<, O<, a)
    for core in cores[:k]:
        env = torch.einsum("IOa,aiob->IiOob", env, core)
        s = env.shape
        env = env.reshape(s[0] * s[1], s[2] * s[3], s[4])
    return env


def _right_env(cores: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    env = cores[0].new_ones(1, 1, 1)  # (b, I>, O>)
    for core in reversed(cores[k + 1 :]):
        env = torch.einsum("aiob,bIO->aiIoO", core, env)
        s = env.shape
        env = env.reshape(s[0], s[1] * s[2], s[3] * s[4])
    return env


def _solve_mpo_core(
    cores: list[torch.Tensor],
    k: int,
    g: torch.Tensor,
    gw: torch.Tensor,
    in_factors: Sequence[int],
    out_factors: Sequence[int],
) -> torch.Tensor:
    """Core ``k`` minimising ``tr((W - W')^T G (W - W'))`` with the other cores fixed."""
    left, right = _left_env(cores, k), _right_env(cores, k)
    i_lt, o_lt, a = left.shape
    b, i_gt, o_gt = right.shape
    ik, ok = in_factors[k], out_factors[k]
    g6 = g.reshape(i_lt, ik, i_gt, i_lt, ik, i_gt)
    # rhs[a, i, b, o] = sum L[I<, O<, a] (G W)[I<, i, I>, O<, o, O>] R[b, I>, O>]
    gw6 = gw.reshape(i_lt, ik, i_gt, o_lt, ok, o_gt)
    rhs = torch.einsum("POa,PiQOoR,bQR->aibo", left, gw6, right)
    unknowns = a * ik * b
    current = cores[k].permute(0, 1, 3, 2).reshape(unknowns, ok)  # (a i b, o)
    rhs = rhs.reshape(unknowns, ok)
    if unknowns <= MAX_DIRECT_UNKNOWNS:
        pl = torch.einsum("POa,QOc->PaQc", left, left)
        pr = torch.einsum("bSR,dTR->bSdT", right, right)
        hess = torch.einsum("PaQc,PiSQjT,bSdT->aibcjd", pl, g6, pr).reshape(unknowns, unknowns)
        solution = _solve_spd(hess, rhs)
    else:

        def hvp(x: torch.Tensor) -> torch.Tensor:
            core = x.reshape(a, ik, b, ok)
            approx = torch.einsum("POa,aibo,bQR->PiQOoR", left, core, right)
            g_approx = g @ approx.reshape(i_lt * ik * i_gt, -1)
            g6a = g_approx.reshape(i_lt, ik, i_gt, o_lt, ok, o_gt)
            return torch.einsum("POa,PiQOoR,bQR->aibo", left, g6a, right).reshape(unknowns, ok)

        solution = conjugate_gradient(hvp, rhs, current)
    return solution.reshape(a, ik, b, ok).permute(0, 1, 3, 2).contiguous()


def _move_gauge(cores: list[torch.Tensor], k: int, direction: int) -> None:
    """QR-orthogonalise core ``k`` and push the remainder to its neighbour (W' unchanged)."""
    core = cores[k]
    d0, i, o, d1 = core.shape
    if direction > 0:
        q, r = torch.linalg.qr(core.reshape(d0 * i * o, d1))
        cores[k] = q.reshape(d0, i, o, q.shape[1])
        cores[k + 1] = torch.einsum("ab,bioc->aioc", r, cores[k + 1])
    else:
        q, r = torch.linalg.qr(core.reshape(d0, i * o * d1).T)
        cores[k] = q.T.reshape(q.shape[1], i, o, d1)
        cores[k - 1] = torch.einsum("aiob,cb->aioc", cores[k - 1], r)


def mpo_als(
    weight_in_out: torch.Tensor,
    gram: torch.Tensor,
    cores: Sequence[torch.Tensor],
    in_factors: Sequence[int],
    out_factors: Sequence[int],
    *,
    damping: float = DEFAULT_DAMPING,
    max_sweeps: int = 4,
    tol: float = 1e-4,
) -> tuple[list[torch.Tensor], ALSResult]:
    """Data-aware ALS over MPO cores, starting from ``cores`` (e.g. the SVD init).

    One sweep solves every core left to right, then right to left. A core update is kept
    only if the (damped) objective does not increase, so the history is monotone. Stops
    when a sweep improves the relative objective by less than ``tol``.
    """
    w = weight_in_out.double()
    g = damped(gram, damping)
    gw = g @ w
    norm = float((w * gw).sum()) or 1.0
    cores = [c.double().clone() for c in cores]
    n = len(cores)
    for k in range(n - 1, 0, -1):  # right-canonical start: the sweep begins at core 0
        _move_gauge(cores, k, -1)
    result = ALSResult([_objective(w, mpo_contract(cores), g, norm)])
    if n == 1:  # a single core is the dense matrix: nothing to sweep
        return [c.to(weight_in_out.dtype) for c in cores], result
    order = [*range(n), *range(n - 2, -1, -1)]
    for _ in range(max_sweeps):
        best = result.history[-1]
        for step, k in enumerate(order):
            previous = cores[k]
            cores[k] = _solve_mpo_core(cores, k, g, gw, in_factors, out_factors)
            value = _objective(w, mpo_contract(cores), g, norm)
            if value > best:
                cores[k] = previous
            else:
                best = value
            direction = 1 if step < n - 1 else -1
            if 0 <= k + direction < n and step < len(order) - 1:
                _move_gauge(cores, k, direction)
        result.history.append(best)
        if result.history[-2] - best <= tol * max(result.history[-2], 1e-30):
            break
    return cores, result


# =========================================================================== Tucker-2
def conv_weight_matrix(kernel: torch.Tensor) -> torch.Tensor:
    """A ``(c_out, c_in, kh, kw)`` kernel as the ``(c_in*kh*kw, c_out)`` patch matrix."""
    return kernel.permute(1, 2, 3, 0).reshape(-1, kernel.shape[0])


def tucker2_matrix(core: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor) -> torch.Tensor:
    """Patch matrix ``(c_in*kh*kw, c_out)`` of a Tucker-2 factorisation."""
    kernel = torch.einsum("oa,abhw,ib->oihw", u_out, core, u_in)
    return conv_weight_matrix(kernel)


def tucker2_als(
    kernel: torch.Tensor,
    gram: torch.Tensor,
    core: torch.Tensor,
    u_out: torch.Tensor,
    u_in: torch.Tensor,
    *,
    damping: float = DEFAULT_DAMPING,
    max_sweeps: int = 4,
    tol: float = 1e-4,
    cg_iter: int = 40,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ALSResult]:
    """Data-aware ALS for Tucker-2 with the patch Gram ``G`` (``c_in*kh*kw`` square).

    ``U_out`` and the core have closed forms; ``U_in`` is solved by conjugate gradients
    from its current value (its Hessian is ``(c_in r_in)^2``, too large to form).
    """
    c_out, c_in, kh, kw = kernel.shape
    hw = kh * kw
    w = conv_weight_matrix(kernel.double())
    g = damped(gram, damping)
    if g.shape[0] != c_in * hw:
        raise TensorizationError(
            f"Tucker ALS needs the {c_in * hw}x{c_in * hw} patch Gram of this convolution, "
            f"got {tuple(g.shape)}; recollect calibration statistics."
        )
    gw = g @ w
    norm = float((w * gw).sum()) or 1.0
    core, u_out, u_in = core.double().clone(), u_out.double().clone(), u_in.double().clone()
    r_out, r_in = core.shape[:2]
    g4 = g.reshape(c_in, hw, c_in, hw)

    def value(c, uo, ui) -> float:
        return _objective(w, tucker2_matrix(c, uo, ui), g, norm)

    result = ALSResult([value(core, u_out, u_in)])
    for _ in range(max_sweeps):
        best = result.history[-1]
        # U_out: W' = M U_out^T with M[(i,hw), a] = sum_b U_in[i,b] C[a,b,hw]
        m = torch.einsum("ib,abh->iha", u_in, core.reshape(r_out, r_in, hw)).reshape(-1, r_out)
        gm = g @ m
        candidate = _solve_spd(m.T @ gm, gm.T @ w).T
        if (v := value(core, candidate, u_in)) <= best:
            u_out, best = candidate, v
        # core: W' = (U_in x I) C~ U_out^T with C~[(b,hw), a]
        h = torch.einsum("ib,ihjk,jc->bhck", u_in, g4, u_in).reshape(r_in * hw, r_in * hw)
        rhs = torch.einsum("ib,ihO,Oa->bha", u_in, gw.reshape(c_in, hw, c_out), u_out)
        rhs = rhs.reshape(r_in * hw, r_out)
        ctilde = _solve_spd(h, rhs) @ torch.linalg.pinv(u_out.T @ u_out)
        candidate = ctilde.reshape(r_in, kh, kw, r_out).permute(3, 0, 1, 2).contiguous()
        if (v := value(candidate, u_out, u_in)) <= best:
            core, best = candidate, v
        # U_in: W'[(i,hw), o] = sum_b U_in[i,b] N[b,hw,o], N = sum_a C[a,b,hw] U_out[o,a]
        nmat = torch.einsum("abh,oa->bho", core.reshape(r_out, r_in, hw), u_out)

        def hvp(x: torch.Tensor, nmat=nmat) -> torch.Tensor:
            approx = torch.einsum("ib,bho->iho", x, nmat).reshape(c_in * hw, c_out)
            return torch.einsum("iho,bho->ib", (g @ approx).reshape(c_in, hw, c_out), nmat)

        rhs_in = torch.einsum("iho,bho->ib", gw.reshape(c_in, hw, c_out), nmat)
        candidate = conjugate_gradient(hvp, rhs_in, u_in, max_iter=cg_iter)
        if (v := value(core, u_out, candidate)) <= best:
            u_in, best = candidate, v
        result.history.append(best)
        if result.history[-2] - best <= tol * max(result.history[-2], 1e-30):
            break
    dtype = kernel.dtype
    return (core.to(dtype), u_out.to(dtype), u_in.to(dtype)), result


__all__ = [
    "DEFAULT_DAMPING",
    "ALSResult",
    "conjugate_gradient",
    "conv_weight_matrix",
    "damped",
    "fisher_weights",
    "input_on_first_site",
    "mpo_als",
    "mpo_contract",
    "mpo_whiten",
    "output_error",
    "stable_cholesky",
    "tucker2_als",
    "tucker2_matrix",
    "weight_error",
    "whitened_spectrum",
]
