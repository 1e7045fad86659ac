"""Test inputs for the data-aware solvers: strongly non-isotropic data."""

import torch


def correlated_inputs(
    n: int, dim: int, *, seed: int = 0, decades: tuple[float, float] = (1.0, -2.0)
) -> torch.Tensor:
    """``n`` rows whose covariance has a few dominant directions (scales ``10^decades``)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(*decades, dim, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return (torch.randn(n, dim, generator=g, dtype=torch.float64) * scales) @ basis.T
