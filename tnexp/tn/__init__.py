"""Tensor-network layers, decompositions and rank / compression-rate solvers."""

from tnexp.tn.errors import TensorizationError
from tnexp.tn.mpo import CONTRACTION_ORDERS, MPOLinear, mpo_random, mpo_svd
from tnexp.tn.ranks import (
    balanced_factors,
    check_cr,
    compression_rate,
    mpo2_bond_dim_eq11,
    mpo_bond_dim_for_cr,
    mpo_params,
    tucker2_params,
    tucker2_ranks_for_cr,
)
from tnexp.tn.tucker import TuckerConv2d, tucker2_decompose

__all__ = [
    "CONTRACTION_ORDERS",
    "MPOLinear",
    "TensorizationError",
    "TuckerConv2d",
    "balanced_factors",
    "check_cr",
    "compression_rate",
    "mpo2_bond_dim_eq11",
    "mpo_bond_dim_for_cr",
    "mpo_params",
    "mpo_random",
    "mpo_svd",
    "tucker2_decompose",
    "tucker2_params",
    "tucker2_ranks_for_cr",
]
