"""The randomized SVD's sync-free parts (Triton interpreter on CPU): the Jacobi eigensolver of
its small problem against torch.linalg.eigh in float64, and `capturable=True` against the
default path."""
import pytest
import torch

import mla_kernels.svd as svd
from mla_kernels._tiles import tile_dim

EIG_TOL = 1e-12  # float64 Jacobi: eigenvalues and reconstruction to ~1e-14 relative


def _gram(kind, batch, l, seed):
    """(batch, l, l) float64 symmetric positive semi-definite, of a given spectrum shape."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        X = torch.randn(batch, 3 * l, l, dtype=torch.float64, generator=g)
        return X.mT @ X
    if kind == "low-rank":  # rank l // 3: many zero eigenvalues
        X = torch.randn(batch, max(1, l // 3), l, dtype=torch.float64, generator=g)
        return X.mT @ X
    if kind == "clustered":  # eigenvalues 1 + 1e-9 i: tiny gaps, angles from near-equal diagonals
        Q = torch.linalg.qr(torch.randn(batch, l, l, dtype=torch.float64, generator=g))[0]
        return (Q * (1 + 1e-9 * torch.arange(l, dtype=torch.float64))) @ Q.mT
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["random", "low-rank", "clustered"])
@pytest.mark.parametrize("batch, l", [(2, 5), (2, 13), (1, 40), (1, 64)], ids=lambda v: str(v))
def test_jacobi_eig_matches_eigh(batch, l, kind):
    G = _gram(kind, batch, l, seed=l)
    LP = tile_dim(l)
    padded = torch.full((batch, LP, LP), float("nan"), dtype=torch.float64)  # only the (l, l) block is read
    padded[:, :l, :l] = G
    lam, V = svd._sym_eig(padded, l)
    assert lam.shape == (batch, l) and V.shape == (batch, l, l)
    ref = torch.linalg.eigvalsh(G).flip(-1)  # descending
    scale = ref.abs().amax(-1, keepdim=True)
    assert ((lam - ref).abs() / scale).max() <= EIG_TOL, "eigenvalues"
    assert (lam[:, 1:] <= lam[:, :-1]).all(), "eigenvalues descending"
    eye = torch.eye(l, dtype=torch.float64)
    assert (V.mT @ V - eye).abs().max() <= EIG_TOL, "eigenvectors orthonormal"
    rebuilt = (V * lam[:, None, :]) @ V.mT
    assert (torch.linalg.matrix_norm(rebuilt - G) / torch.linalg.matrix_norm(G)).max() <= EIG_TOL, "V diag(lam) V^T"


def _omega(n, l, seed):
    return torch.randn(n, l, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


@pytest.mark.parametrize("m, n, rank", [(48, 21, 6), (33, 70, 9)], ids=lambda v: str(v))
def test_capturable_matches_the_default_path(m, n, rank):
    M = torch.randn(3, m, n, dtype=torch.float32)
    omega = _omega(n, svd.sketch_width(rank, 8, m, n), seed=1)
    U = svd.top_left_singular_vectors(M, rank, omega=omega)
    U_capturable = svd.top_left_singular_vectors(M, rank, omega=omega, capturable=True)
    torch.testing.assert_close(U_capturable, U, rtol=0, atol=1e-6)


def test_capturable_keeps_zero_columns_past_the_rank_and_the_same_projection():
    """A rank-3 matrix asked for rank 5: the default path completes U by Householder QR, the
    capturable one leaves zero columns; U U^T M is M either way."""
    g = torch.Generator().manual_seed(2)
    M = torch.randn(2, 30, 3, generator=g) @ torch.randn(2, 3, 25, generator=g)  # (2, 30, 25), rank 3
    omega = _omega(25, 13, seed=3)
    U = svd.top_left_singular_vectors(M, 5, omega=omega, capturable=True)
    norms = U.norm(dim=-2)  # (2, 5)
    assert torch.allclose(norms[:, :3], torch.ones(2, 3), atol=1e-5)
    assert (norms[:, 3:] <= 1e-5).all()
    torch.testing.assert_close(U @ (U.mT @ M), M, rtol=0, atol=1e-4)


def test_capturable_refuses_a_sketch_wider_than_the_kernels_factor():
    M = torch.randn(100, 100)
    with pytest.raises(ValueError, match=r"capturable=True needs a sketch of at most 64 columns, got .* = 65"):
        svd.top_left_singular_vectors(M, 57, capturable=True)


@pytest.mark.parametrize("omega, message", [
    (torch.randn(20, 12), r"omega must be a float32 \(21, 13\) tensor .*, got torch.float32 \(20, 12\)"),
    (torch.randn(21, 13, dtype=torch.float64), r"got torch.float64 \(21, 13\)"),
], ids=["shape", "dtype"])
def test_bad_test_matrix_names_what_it_needs(omega, message):
    with pytest.raises(ValueError, match=message):
        svd.top_left_singular_vectors(torch.randn(40, 21), 5, omega=omega)
