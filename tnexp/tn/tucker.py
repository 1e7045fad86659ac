"""Tucker-2 convolution: the channel modes of a kernel are decomposed, spatial modes kept.

``W[o, i, h, w] = sum_{a, b} U_out[o, a] C[a, b, h, w] U_in[i, b]`` runs as three
convolutions: 1x1 ``c_in -> r_in`` (``U_in^T``), the kxk core ``r_in -> r_out`` carrying
stride, padding and dilation, and 1x1 ``r_out -> c_out`` (``U_out``) carrying the bias
(``factored``), or as one kxk convolution with the kernel reconstructed from the factors
(``merged``; differentiable, so training works in both). At small channel counts the two
1x1 convolutions are bound by memory traffic and the merged kernel is as fast or faster
although it costs more FLOPs. ``order="auto"`` times both once per input shape (dtype,
device, gradient mode) and caches the quicker one process-wide (:mod:`tnexp.tn.timing`);
with ``calibrate=False`` (or while tracing/compiling, in deterministic mode, or while
the autograd graph is watched: :func:`tnexp.tn.timing.timing_allowed`) it picks by FLOPs
instead (:meth:`TuckerConv2d.costs`). Timing keeps the FLOP choice unless the other path
was more than 10% faster.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from tnexp.tn.errors import TensorizationError
from tnexp.tn.linalg import leading_eigenvectors
from tnexp.tn.ranks import tucker2_ranks_for_cr
from tnexp.tn.timing import TIMED_CHOICES, fastest_path, input_key, timing_allowed

TuckerOrder = Literal["auto", "factored", "merged"]
TUCKER_ORDERS: tuple[str, ...] = ("auto", "factored", "merged")


def _leading_left_singular(mat: torch.Tensor, rank: int) -> torch.Tensor:
    """Leading ``rank`` left singular vectors of a wide matrix.

    They are the top eigenvectors of the small ``rows x rows`` Gram matrix, which is far
    cheaper than an SVD of the ``rows x (other modes)`` unfolding (ResNet-34's 512-channel
    kernels unfold to 512 x 4608). A rank above ``rows`` cannot occur (rank <= channels).
    """
    return leading_eigenvectors(mat @ mat.T, rank)


@torch.no_grad()
def tucker2_decompose(
    kernel: torch.Tensor,
    ranks: Sequence[int],
    *,
    method: Literal["hosvd", "hooi"] = "hosvd",
    n_iter: int = 10,
    tol: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 of a ``(c_out, c_in, kh, kw)`` kernel over modes 0 and 1, in float64.

    HOSVD (paper eq. 13-15): leading left singular vectors of the two mode unfoldings and
    the projected core. HOOI refines the factors by alternating projections (never worse
    than HOSVD). Returns ``(core, u_out, u_in)`` in the kernel's dtype.
    """
    r_out, r_in = ranks
    w = kernel.double()
    c_out, c_in = w.shape[:2]
    u_out = _leading_left_singular(w.reshape(c_out, -1), r_out)
    u_in = _leading_left_singular(w.transpose(0, 1).reshape(c_in, -1), r_in)
    if method == "hooi":
        norm_sq = float(w.pow(2).sum())
        previous = None
        for _ in range(n_iter):
            # Project onto the other mode's subspace, then take this mode's leading vectors.
            y = torch.einsum("oihw,ib->obhw", w, u_in)
            u_out = _leading_left_singular(y.reshape(c_out, -1), r_out)
            y = torch.einsum("oihw,oa->ihwa", w, u_out)
            u_in = _leading_left_singular(y.reshape(c_in, -1), r_in)
            core = torch.einsum("oihw,oa,ib->abhw", w, u_out, u_in)
            error = max(norm_sq - float(core.pow(2).sum()), 0.0)
            if previous is not None and abs(previous - error) <= tol * norm_sq:
                break
            previous = error
    elif method != "hosvd":
        raise TensorizationError(f"Tucker method must be 'hosvd' or 'hooi', got {method!r}.")
    core = torch.einsum("oihw,oa,ib->abhw", w, u_out, u_in)
    dtype = kernel.dtype
    return core.to(dtype), u_out.to(dtype), u_in.to(dtype)


def check_tucker_order(order: str) -> str:
    if order not in TUCKER_ORDERS:
        raise TensorizationError(
            f"Tucker order must be one of {TUCKER_ORDERS}, got {order!r} (auto: timed per "
            "input shape; factored: 1x1 -> kxk -> 1x1; merged: one conv, rebuilt kernel)."
        )
    return order


class TuckerConv2d(nn.Module):
    """Tucker-2 factorised ``nn.Conv2d`` (1x1 -> kxk core -> 1x1). Build with :meth:`from_conv`.

    ``order`` selects the execution path (``auto`` | ``factored`` | ``merged``, see the
    module docstring); ``calibrate`` lets ``auto`` time the two paths once per input shape
    (else FLOPs decide). ``last_order`` is the path the latest forward ran.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int],
        ranks: Sequence[int],
        *,
        stride: Sequence[int] = (1, 1),
        padding: Sequence[int] | str = (0, 0),
        dilation: Sequence[int] = (1, 1),
        padding_mode: str = "zeros",
        bias: bool = True,
        order: str = "auto",
        calibrate: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.order = check_tucker_order(order)
        self.calibrate = bool(calibrate)
        self.last_order: str | None = None
        r_out, r_in = (int(r) for r in ranks)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = tuple(kernel_size)
        self.ranks = (r_out, r_in)
        kw = {"device": device, "dtype": dtype}
        self.first = nn.Conv2d(in_channels, r_in, 1, bias=False, **kw)
        self.core = nn.Conv2d(
            r_in,
            r_out,
            self.kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            padding_mode=padding_mode,
            bias=False,
            **kw,
        )
        self.last = nn.Conv2d(r_out, out_channels, 1, bias=bias, **kw)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        *,
        cr: float | None = None,
        ranks: Sequence[int] | None = None,
        init: Literal["svd", "random"] = "svd",
        method: Literal["hosvd", "hooi"] = "hosvd",
        order: str = "auto",
        calibrate: bool = True,
        name: str = "conv",
    ) -> TuckerConv2d:
        """Tucker-2 replacement of ``conv`` at a CR or explicit ranks ``(r_out, r_in)``.

        ``init="svd"`` decomposes the pretrained kernel (HOSVD, paper eq. 13-15; HOOI with
        ``method="hooi"``); ``init="random"`` (the paper's CIFAR choice) draws orthonormal factors
        and a Gaussian core scaled so the reconstructed kernel keeps the dense variance.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TensorizationError(
                f"{name}: TuckerConv2d replaces nn.Conv2d, not {type(conv).__name__}. Use an "
                "MPO rule for linear layers or exclude this module."
            )
        if conv.groups != 1:
            raise TensorizationError(
                f"{name}: grouped/depthwise convolutions (groups={conv.groups}) are not "
                "supported by Tucker-2; exclude this layer from the tensorization spec."
            )
        c_out, c_in = conv.out_channels, conv.in_channels
        if (cr is None) == (ranks is None):
            raise TensorizationError(f"{name}: give exactly one of cr= or ranks=.")
        if ranks is None:
            ranks = tucker2_ranks_for_cr(c_out, c_in, conv.kernel_size, cr, name=name)
        ranks = tuple(int(r) for r in ranks)
        if len(ranks) != 2:
            raise TensorizationError(f"{name}: Tucker-2 ranks are (r_out, r_in), got {ranks}.")
        if not (1 <= ranks[0] <= c_out and 1 <= ranks[1] <= c_in):
            raise TensorizationError(
                f"{name}: ranks {ranks} must satisfy 1 <= r_out <= {c_out} and "
                f"1 <= r_in <= {c_in} (the channel counts of this convolution)."
            )
        weight = conv.weight.detach()
        layer = cls(
            c_in,
            c_out,
            conv.kernel_size,
            ranks,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            padding_mode=conv.padding_mode,
            bias=conv.bias is not None,
            order=order,
            calibrate=calibrate,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            if init == "svd":
                core, u_out, u_in = tucker2_decompose(weight, ranks, method=method)
            elif init == "random":
                core, u_out, u_in = _tucker2_random(weight, ranks)
            else:
                raise TensorizationError(f"{name}: init must be 'svd' or 'random', got {init!r}.")
            layer.set_factors(core, u_out, u_in)
            if conv.bias is not None:
                layer.last.bias.copy_(conv.bias.detach())
        return layer

    @torch.no_grad()
    def set_factors(self, core: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor) -> None:
        """Load a Tucker-2 factorisation (core ``(r_out, r_in, kh, kw)``, ``U_out``, ``U_in``)."""
        self.first.weight.copy_(u_in.t()[:, :, None, None])
        self.core.weight.copy_(core)
        self.last.weight.copy_(u_out[:, :, None, None])

    def to_dense(self) -> torch.Tensor:
        """The ``(c_out, c_in, kh, kw)`` kernel this layer represents (differentiable)."""
        return torch.einsum(
            "oa,abhw,bi->oihw",
            self.last.weight[:, :, 0, 0],
            self.core.weight,
            self.first.weight[:, :, 0, 0],
        )

    def to_conv(self) -> nn.Conv2d:
        """A dense ``nn.Conv2d`` with the reconstructed kernel (e.g. for inference export)."""
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.core.stride,
            padding=self.core.padding,
            dilation=self.core.dilation,
            padding_mode=self.core.padding_mode,
            bias=self.last.bias is not None,
            device=self.core.weight.device,
            dtype=self.core.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.to_dense())
            if self.last.bias is not None:
                conv.bias.copy_(self.last.bias)
        return conv

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        order = self.order
        if order == "auto":
            order = self._auto_order(x)
        self.last_order = order
        return self._run(x, order)

    def _run(self, x: torch.Tensor, order: str, *, hooks: bool = True) -> torch.Tensor:
        """The output by ``order``. ``hooks=False`` (timing) bypasses the three convs'
        ``__call__`` and with it any module hooks (which must not see timing runs)."""
        if order == "merged":
            return self.core._conv_forward(x, self.to_dense(), self.last.bias)
        if hooks:
            return self.last(self.core(self.first(x)))
        mid = self.first._conv_forward(x, self.first.weight, None)
        mid = self.core._conv_forward(mid, self.core.weight, None)
        return self.last._conv_forward(mid, self.last.weight, self.last.bias)

    def _auto_order(self, x: torch.Tensor) -> str:
        grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        if self.calibrate:
            key = (self._signature(), input_key(x, tuple(x.shape), grad))
            cached = TIMED_CHOICES.get(key)
            if cached is not None:
                return cached
        costs = self.costs(tuple(x.shape), grad=grad)
        by_flops = min(costs, key=costs.__getitem__)
        if self.calibrate and timing_allowed(x):
            paths = {
                o: (lambda t, o=o: self._run(t, o, hooks=False)) for o in ("factored", "merged")
            }
            params = list(self.parameters())
            order, _ = fastest_path(paths, x, params, grad=grad, prefer=by_flops)
            TIMED_CHOICES.put(key, order)
            return order
        return by_flops

    def _signature(self) -> tuple:
        """What the two paths' speed depends on besides the input (shared timing cache)."""
        core = self.core
        return (
            type(self).__name__,
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.ranks,
            core.stride,
            core.padding,
            core.dilation,
            core.padding_mode,
            self.last.bias is not None,
        )

    def cached_orders(self) -> dict[tuple, str]:
        """The timed path per (input shape, dtype, device, grad) for layers of this shape."""
        return TIMED_CHOICES.items_for(self._signature())

    def costs(self, input_shape: Sequence[int], *, grad: bool = True) -> dict[str, int]:
        """FLOPs of the ``factored`` and ``merged`` paths for an ``(N, C, H, W)`` input.

        A convolution's backward costs about twice its forward (input and weight
        gradients); the merged kernel's reconstruction runs once per call, and its
        backward is counted the same way.
        """
        n, _, h, w = (int(d) for d in input_shape)
        out_h, out_w = self._output_size(h, w)
        kh, kw = self.kernel_size
        r_out, r_in = self.ranks
        c_in, c_out = self.in_channels, self.out_channels
        pixels_in, pixels_out = n * h * w, n * out_h * out_w
        factored = 2 * (
            pixels_in * c_in * r_in + pixels_out * (r_in * r_out * kh * kw + r_out * c_out)
        )
        rebuild = 2 * kh * kw * r_in * (c_out * r_out + c_out * c_in)
        merged = rebuild + 2 * pixels_out * c_out * c_in * kh * kw
        scale = 3 if grad else 1
        return {"factored": scale * factored, "merged": scale * merged}

    def _output_size(self, h: int, w: int) -> tuple[int, int]:
        padding = self.core.padding
        if isinstance(padding, str):  # "same" keeps the size (stride 1), "valid" pads none
            if padding == "same":
                return h, w
            padding = (0, 0)
        sizes = []
        for size, k, s, p, d in zip(
            (h, w),
            self.kernel_size,
            self.core.stride,
            padding,
            self.core.dilation,
            strict=True,
        ):
            sizes.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
        return sizes[0], sizes[1]

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}->{self.out_channels}, kernel={self.kernel_size}, "
            f"ranks(out, in)={self.ranks}, order={self.order}"
        )


def _random_orthonormal(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64, device=like.device))
    return q.to(like.dtype)


def _tucker2_random(kernel: torch.Tensor, ranks: Sequence[int]):
    """Orthonormal random factors and a core whose reconstruction has the kernel's variance.

    With orthonormal ``U`` (``c x r``), an entry of the reconstruction has variance
    ``var(C) * (r_out / c_out) * (r_in / c_in)`` on average, so the core is scaled by its
    inverse.
    """
    r_out, r_in = ranks
    c_out, c_in, kh, kw = kernel.shape
    target_var = float(kernel.double().var()) or 1.0 / (c_in * kh * kw)
    core_std = math.sqrt(target_var * c_out * c_in / (r_out * r_in))
    core = torch.randn(r_out, r_in, kh, kw, dtype=kernel.dtype, device=kernel.device) * core_std
    return core, _random_orthonormal(c_out, r_out, kernel), _random_orthonormal(c_in, r_in, kernel)
