"""Truncated factorisations shared by the SVD inits (MPO algorithm 1, Tucker-2 HOSVD/HOOI).

Both inits need only the leading ``rank`` singular vectors of an unfolding. They are the
top eigenvectors of the unfolding's smaller Gram matrix (a GEMM and a symmetric
eigensolver instead of an SVD), and when ``rank`` is a small part of the Gram's size a
subset eigensolver (LAPACK ``syevr`` through SciPy) computes only those: at 2048 x 2048,
rank 512, one thread, about 2x faster than the SVD in float32 (docs/benchmarks.md,
"MPO SVD init"). Everything runs in float64, so the Gram's squared condition number costs
no accuracy in the kept directions.
"""

from __future__ import annotations

import torch

# A subset eigensolver wins while the requested eigenvectors are below ~40% of the matrix
# (measured at n = 512 / 1152 / 2048, one thread); above that the full divide-and-conquer
# solver is faster.
SUBSET_FRACTION = 0.4


def leading_eigenvectors(gram: torch.Tensor, rank: int) -> torch.Tensor:
    """The eigenvectors of the ``rank`` largest eigenvalues of a symmetric matrix, largest first.

    Returns an ``(n, rank)`` matrix with orthonormal columns, in ``gram``'s dtype and device.
    """
    n = gram.shape[0]
    if gram.device.type == "cpu" and 0 < rank <= SUBSET_FRACTION * n:
        from scipy.linalg import eigh

        _, vecs = eigh(
            gram.double().numpy(), subset_by_index=[n - rank, n - 1], driver="evr"
        )  # ascending eigenvalues
        return torch.from_numpy(vecs[:, ::-1].copy()).to(gram.dtype)
    _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues
    return vecs[:, -rank:].flip(-1)


def truncated_split(mat: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``mat ~ U @ rest`` with orthonormal ``U`` (m x rank): the rank-``rank`` truncated SVD.

    The leading subspace comes from the smaller Gram matrix's eigenvectors in float64;
    ``rest = U^T mat`` carries the singular values to the right as the SVD does (up to a
    rotation within the bond, which leaves the product unchanged). A ``rank`` that
    truncates nothing is an exact factorisation by an SVD (no Gram: full rank would keep
    its small, squared eigenvalues too). Returned in ``mat``'s dtype.
    """
    m, n = mat.shape
    work = mat.double()
    if rank >= min(m, n):
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
        u, rest = u[:, :rank], s[:rank, None] * vh[:rank]
    elif m <= n:
        u = leading_eigenvectors(work @ work.T, rank)
        rest = u.T @ work
    else:
        v = leading_eigenvectors(work.T @ work, rank)
        u, r = torch.linalg.qr(work @ v)  # an orthonormal basis of the same leading subspace
        rest = r @ v.T
    return u.to(mat.dtype), rest.to(mat.dtype)
