"""Batched randomized SVD (Halko, Martinsson, Tropp 2011) with Triton kernels.

Same algorithm as `mla_kernels.reference.randomized_svd_ref`: a Gaussian test matrix
Omega (n, l), l = min(rank + oversample, m, n), drawn with torch from `generator`;
Q = orth(A Omega); `n_iter` subspace iterations Q = orth(A orth(A^T Q)); then the
small problem for B = Q^T A. What runs where:

- Products with A (A X, A^T Q, and B^T = A^T Q) are Triton kernels that load A in
  its own dtype (bf16 / fp16 / fp32 / fp64) and compute in float32 on the tensor
  cores with 3xTF32 (`_DOT_PRECISION`), close to full float32 accuracy.
- Orthonormalization is Cholesky-QR2 (twice Cholesky-QR) with the Gram matrices
  accumulated in float64 (mixed-precision Cholesky-QR: Y in float32, Y^T Y in float64,
  stable for cond(Y) up to about 1 / eps32 rather than 1 / sqrt(eps32)). For l <= 64
  (`_MAX_KERNEL_SKETCH`) the Cholesky factorization and its inverse are computed in
  the kernel by Gram-Schmidt on the Gram matrix (`_gram_factor`); a pivot at or below
  `_DROP_TOL` times the largest diagonal entry means the column is numerically in the
  span of the earlier ones, and it is set to zero rather than divided by a noise-level
  pivot (the limit of a diagonal shift that goes to zero). Q then has orthonormal
  columns plus zero columns; if the final Q keeps fewer than `rank` columns, those
  matrices are recomputed with Householder QR (`_householder_rsvd`, same Omega).
  For l > 64 the Cholesky-QR2 runs through torch.linalg (float64 Gram and factor) and
  falls back to Householder QR (torch.linalg.qr) for the batch if a Cholesky fails.
- The small problem: M = B B^T = Z^T Z with Z = A^T Q (n, l), Gram in float64, then its
  eigenvectors: for l <= 64 by cyclic Jacobi in a kernel (`_sym_eig_kernel`, one program per
  matrix), wider by torch.linalg.eigh (float64); S = sqrt(eigenvalues), U = Q V,
  Vh = diag(1 / S) V^T Z^T.
- For l <= 64 nothing waits on the host but the finiteness check and the rank-deficiency
  fallback below; `capturable=True` skips both, so the SVD records into a CUDA graph (the
  training step replays the model's value-basis update that way).

Two kernel layouts: for l <= 64 and matrices of at most `_FUSED_MAX_ELEMENTS`
elements, one program per matrix runs the whole range finder and the Gram of B^T in
one launch (`_rsvd_fused_kernel`); otherwise tiled batched products (`_bmm_kernel`)
and one orthonormalization launch per step.

CPU tensors without TRITON_INTERPRET=1 fall back to `randomized_svd_ref` (Householder
QR and torch.linalg.svd on B); the tests force the Triton path on CPU with the
interpreter.
"""

import torch
import triton
import triton.language as tl

from mla_kernels._dispatch import on_kernel_device
from mla_kernels._tiles import tile_dim

from .reference import randomized_svd_ref

_DOT_PRECISION = "tf32x3"  # three TF32 products per float32 product: ~float32 accuracy on tensor cores
_MAX_KERNEL_SKETCH = 64  # largest sketch width whose l x l fp64 tiles the kernels factor in registers
_FUSED_MAX_ELEMENTS = 1 << 20  # one program streams a matrix of up to 4 MB (fp32) 2 + 4 n_iter times
_DROP_TOL = (64 * torch.finfo(torch.float32).eps) ** 2  # pivot / max diag below this: column is rounding noise
MAX_CAPTURABLE_SKETCH = _MAX_KERNEL_SKETCH  # wider sketches factor through torch.linalg, which syncs
_FUSED_BLOCK = 64  # rows and reduction chunk of the fused kernel's tiles
_GRAM_FP64 = True  # Gram products in float64 (mixed-precision Cholesky-QR); False: float32 products
_FACTOR_WARPS = 4  # warps of the one-program-per-matrix kernels
# Jacobi stops when the off-diagonal part is below float64 rounding of a 64 x 64 matrix; it converges
# quadratically (random, low-rank and clustered 40-64 wide Grams reached it within 8 sweeps, timed in
# the interpreter), so the cap is a guard; tests/test_svd_eig.py checks the results against eigh
_JACOBI_TOL_SQ = (64 * torch.finfo(torch.float64).eps) ** 2
_JACOBI_MAX_SWEEPS = 15


@triton.jit
def _gram_factor(G, l, drop_tol, LP: tl.constexpr):
    """T (LP, LP) float64 upper triangular with T^T G T = I on the kept columns.

    G: (LP, LP) float64 symmetric positive semi-definite Gram matrix, zero beyond l.
    Gram-Schmidt on G: column j is normalized by its current pivot and removed from
    the later columns by congruence, so T = R^{-1} for the Cholesky factor R of G.
    Columns whose pivot is <= drop_tol * max(diag(G)) are zeroed. Returns (T, kept).
    """
    rows = tl.arange(0, LP)[:, None]
    cols = tl.arange(0, LP)[None, :]
    vec_r = tl.arange(0, LP)
    eye = rows == cols
    T = tl.where(eye & (rows < l), 1.0, 0.0).to(tl.float64)  # (LP, LP), zero beyond l
    threshold = drop_tol * tl.max(tl.sum(tl.where(eye, G, 0.0), axis=1))
    kept = 0
    for j in range(l):
        g_r = tl.sum(tl.where(cols == j, G, 0.0), axis=1)  # (LP,) G[:, j] along rows
        g_c = tl.sum(tl.where(rows == j, G, 0.0), axis=0)  # (LP,) G[j, :] along columns
        pivot = tl.sum(tl.where(vec_r == j, g_r, 0.0))
        keep = pivot > threshold
        s = tl.where(keep, 1.0 / tl.sqrt(tl.where(keep, pivot, 1.0)), 0.0)
        kept += keep.to(tl.int32)
        scale_r = tl.where(vec_r == j, s, 1.0)  # (LP,)
        G = G * scale_r[:, None] * scale_r[None, :]  # row and column j scaled: G[j, j] -> 1 (or 0)
        g_r = g_r * scale_r * s  # scaled column j: g_r[j] = pivot s^2
        g_c = g_c * scale_r * s
        c_r = tl.where(vec_r > j, g_r, 0.0)  # (LP,) coefficients of the later columns on column j
        c_c = tl.where(vec_r > j, g_c, 0.0)
        g_jj = pivot * s * s
        G = G - g_r[:, None] * c_c[None, :] - c_r[:, None] * g_c[None, :] + g_jj * c_r[:, None] * c_c[None, :]
        t_j = tl.sum(tl.where(cols == j, T, 0.0), axis=1) * s  # (LP,) column j of T, normalized
        T = tl.where(cols == j, t_j[:, None], T) - t_j[:, None] * c_c[None, :]
    return T, kept


@triton.jit
def _gram_update(G, y, GRAM64: tl.constexpr, PREC: tl.constexpr):
    """G + y^T y, G (LP, LP) float64, y (BM, LP) float32. GRAM64: the products in float64
    (mixed-precision Cholesky-QR); else in float32 (PREC), then widened."""
    if GRAM64:
        y64 = y.to(tl.float64)
        return tl.dot(tl.trans(y64), y64, G, input_precision="ieee", out_dtype=tl.float64)
    else:
        return G + tl.dot(tl.trans(y), y, input_precision=PREC).to(tl.float64)


@triton.jit
def _apply(a_ptr, s_r, s_k, x_ptr, out_ptr, n_rows, n_red,
           LP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, GRAM64: tl.constexpr):
    """out = Aop @ X with Aop[r, k] = a[r * s_r + k * s_k] (n_rows, n_red), X (n_red, LP)
    float32 contiguous, out (n_rows, LP) float32 contiguous. Returns out^T out (LP, LP) float64."""
    offs_c = tl.arange(0, LP)
    G = tl.zeros((LP, LP), dtype=tl.float64)
    for r0 in range(0, n_rows, BM):
        offs_r = r0 + tl.arange(0, BM)
        acc = tl.zeros((BM, LP), dtype=tl.float32)
        for k0 in range(0, n_red, BK):
            offs_k = k0 + tl.arange(0, BK)
            a = tl.load(a_ptr + offs_r[:, None] * s_r + offs_k[None, :] * s_k,
                        mask=(offs_r[:, None] < n_rows) & (offs_k[None, :] < n_red), other=0.0)  # (BM, BK)
            x = tl.load(x_ptr + offs_k[:, None] * LP + offs_c[None, :],
                        mask=offs_k[:, None] < n_red, other=0.0)  # (BK, LP)
            acc = tl.dot(a.to(tl.float32), x, acc, input_precision=PREC)
        tl.store(out_ptr + offs_r[:, None] * LP + offs_c[None, :], acc, mask=offs_r[:, None] < n_rows)
        G = _gram_update(G, acc, GRAM64, PREC)
    return G


@triton.jit
def _gram(y_ptr, n_rows, LP: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr, GRAM64: tl.constexpr):
    """Y^T Y (LP, LP) float64 of Y (n_rows, LP) float32 contiguous."""
    offs_c = tl.arange(0, LP)
    G = tl.zeros((LP, LP), dtype=tl.float64)
    for r0 in range(0, n_rows, BM):
        offs_r = r0 + tl.arange(0, BM)
        y = tl.load(y_ptr + offs_r[:, None] * LP + offs_c[None, :], mask=offs_r[:, None] < n_rows, other=0.0)
        G = _gram_update(G, y, GRAM64, PREC)
    return G


@triton.jit
def _orthonormalize(y_ptr, G, n_rows, l, drop_tol,
                    LP: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr, GRAM64: tl.constexpr):
    """Cholesky-QR2 of Y (n_rows, LP) float32 contiguous, in place; G = Y^T Y float64.

    Q1 = Y T1, Q = Q1 T2 with T1, T2 from `_gram_factor`; Q1 is recomputed in the last
    pass with the same operations, so it is the Q1 whose Gram gave T2. Returns the
    number of kept (orthonormal) columns of Q.
    """
    offs_c = tl.arange(0, LP)
    T1, kept1 = _gram_factor(G, l, drop_tol, LP)
    T1 = T1.to(tl.float32)
    G2 = tl.zeros((LP, LP), dtype=tl.float64)
    for r0 in range(0, n_rows, BM):
        offs_r = r0 + tl.arange(0, BM)
        y = tl.load(y_ptr + offs_r[:, None] * LP + offs_c[None, :], mask=offs_r[:, None] < n_rows, other=0.0)
        q1 = tl.dot(y, T1, input_precision=PREC)  # (BM, LP)
        G2 = _gram_update(G2, q1, GRAM64, PREC)
    T2, kept = _gram_factor(G2, l, drop_tol, LP)
    T2 = T2.to(tl.float32)
    for r0 in range(0, n_rows, BM):
        offs_r = r0 + tl.arange(0, BM)
        ptrs = y_ptr + offs_r[:, None] * LP + offs_c[None, :]
        y = tl.load(ptrs, mask=offs_r[:, None] < n_rows, other=0.0)
        q1 = tl.dot(y, T1, input_precision=PREC)
        q = tl.dot(q1, T2, input_precision=PREC)  # (BM, LP)
        tl.debug_barrier()
        tl.store(ptrs, q, mask=offs_r[:, None] < n_rows)
    tl.debug_barrier()
    return kept


@triton.jit
def _rsvd_fused_kernel(a_ptr, omega_ptr, q_ptr, z_ptr, gram_ptr, kept_ptr,
                       m, n, l, n_iter, s_ab, s_am, s_an, drop_tol,
                       LP: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr, GRAM64: tl.constexpr):
    """Whole range finder for one matrix per program.

    a: (batch, m, n) any float dtype, strided; omega: (n, LP) float32, zero beyond l;
    q: (batch, m, LP) and z: (batch, n, LP) float32 scratch, on return Q and
    Z = A^T Q = B^T; gram: (batch, LP, LP) float64, Z^T Z = B B^T; kept: (batch,) int32.
    """
    b = tl.program_id(0).to(tl.int64)
    a_ptr += b * s_ab
    q_ptr += b * m * LP
    z_ptr += b * n * LP
    G = _apply(a_ptr, s_am, s_an, omega_ptr, q_ptr, m, n, LP, BM, BM, PREC, GRAM64)  # Y = A Omega
    tl.debug_barrier()
    kept = _orthonormalize(q_ptr, G, m, l, drop_tol, LP, BM, PREC, GRAM64)
    for _ in range(n_iter):
        G = _apply(a_ptr, s_an, s_am, q_ptr, z_ptr, n, m, LP, BM, BM, PREC, GRAM64)  # A^T Q
        tl.debug_barrier()
        _orthonormalize(z_ptr, G, n, l, drop_tol, LP, BM, PREC, GRAM64)
        G = _apply(a_ptr, s_am, s_an, z_ptr, q_ptr, m, n, LP, BM, BM, PREC, GRAM64)  # A W
        tl.debug_barrier()
        kept = _orthonormalize(q_ptr, G, m, l, drop_tol, LP, BM, PREC, GRAM64)
    G = _apply(a_ptr, s_an, s_am, q_ptr, z_ptr, n, m, LP, BM, BM, PREC, GRAM64)  # Z = A^T Q = B^T
    offs = tl.arange(0, LP)
    tl.store(gram_ptr + b * LP * LP + offs[:, None] * LP + offs[None, :], G)
    tl.store(kept_ptr + b, kept)


@triton.jit
def _cholqr2_kernel(y_ptr, kept_ptr, n_rows, l, drop_tol,
                    LP: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr, GRAM64: tl.constexpr):
    """Cholesky-QR2 in place of y (batch, n_rows, LP) float32, one matrix per program."""
    b = tl.program_id(0).to(tl.int64)
    y_ptr += b * n_rows * LP
    G = _gram(y_ptr, n_rows, LP, BM, PREC, GRAM64)
    tl.debug_barrier()
    kept = _orthonormalize(y_ptr, G, n_rows, l, drop_tol, LP, BM, PREC, GRAM64)
    tl.store(kept_ptr + b, kept)


@triton.jit
def _bmm_kernel(a_ptr, x_ptr, out_ptr, R, K, N,
                s_ab, s_ar, s_ak, s_xb, s_xk, s_ob, s_or,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """out[b] = Aop[b] @ X[b] in float32: Aop[b, r, k] = a[b * s_ab + r * s_ar + k * s_ak]
    (R, K) any float dtype; X (K, N) float32 with unit column stride; out (R, N) float32."""
    b = tl.program_id(0).to(tl.int64)  # the batch on the first axis: the others hold at most 65535
    pid_r = tl.program_id(1)
    pid_n = tl.program_id(2)
    offs_r = (pid_r * BM + tl.arange(0, BM)).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    a_ptr += b * s_ab
    x_ptr += b * s_xb
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        a = tl.load(a_ptr + offs_r[:, None] * s_ar + offs_k[None, :] * s_ak,
                    mask=(offs_r[:, None] < R) & (offs_k[None, :] < K), other=0.0)  # (BM, BK)
        x = tl.load(x_ptr + offs_k[:, None] * s_xk + offs_n[None, :],
                    mask=(offs_k[:, None] < K) & (offs_n[None, :] < N), other=0.0)  # (BK, BN)
        acc = tl.dot(a.to(tl.float32), x, acc, input_precision=PREC)
    tl.store(out_ptr + b * s_ob + offs_r[:, None] * s_or + offs_n[None, :], acc,
             mask=(offs_r[:, None] < R) & (offs_n[None, :] < N))


@triton.jit
def _sym_eig_kernel(gram_ptr, evals_ptr, evecs_ptr, l, tol_sq, LP: tl.constexpr, MAX_SWEEPS: tl.constexpr):
    """Eigen-decomposition of one symmetric (LP, LP) float64 matrix per program, by cyclic Jacobi.

    gram: (batch, LP, LP) float64 contiguous, only its leading (l, l) block is read.
    Each sweep runs LP - 1 rounds of the round-robin pairing (the circle method): a round
    rotates LP / 2 disjoint index pairs at once, G <- J^T G J and V <- V J with J the product of
    their plane rotations (Golub and Van Loan, algorithm 8.5.1, per pair). Sweeps stop once the
    off-diagonal part holds at most tol_sq of ||G||_F^2, or after MAX_SWEEPS. Padding beyond l
    holds zeros, so its rotations are the identity. evals (batch, LP) float64 descending
    (padding last), evecs (batch, LP, LP) float64 with the matching eigenvectors as columns.
    """
    b = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, LP)[:, None]
    cols = tl.arange(0, LP)[None, :]
    idx = tl.arange(0, LP)
    eye = rows == cols
    inside = (rows < l) & (cols < l)
    G = tl.load(gram_ptr + b * LP * LP + rows * LP + cols, mask=inside, other=0.0).to(tl.float64)  # (LP, LP)
    G = 0.5 * (G + tl.trans(G))  # exactly symmetric: both members of a pair compute one rotation
    V = tl.where(eye, 1.0, 0.0).to(tl.float64)  # (LP, LP)
    total = tl.sum(tl.sum(G * G, axis=1), axis=0)  # ||G||_F^2, kept by the rotations
    off_sq = tl.sum(tl.sum(tl.where(eye, 0.0, G * G), axis=1), axis=0)
    sweep = 0
    while (sweep < MAX_SWEEPS) & (off_sq > tol_sq * total):
        for t in range(LP - 1):
            # partner of each index in round t: LP - 1 meets t, the others meet (2t - i) mod (LP - 1)
            partner = tl.where(idx == LP - 1, t, tl.where(idx == t, LP - 1, (2 * t - idx + 2 * (LP - 1)) % (LP - 1)))
            pairs = cols == partner[:, None]  # (LP, LP): [i, j] = j is i's partner
            diag = tl.sum(tl.where(eye, G, 0.0), axis=1)  # (LP,)
            diag_partner = tl.sum(tl.where(pairs, diag[None, :], 0.0), axis=1)
            off = tl.sum(tl.where(pairs, G, 0.0), axis=1)  # (LP,) G[i, partner(i)]
            first = idx < partner  # i is the pair's p (p < q)
            a_pp = tl.where(first, diag, diag_partner)
            a_qq = tl.where(first, diag_partner, diag)
            rotate = off != 0.0
            tau = (a_qq - a_pp) / (2.0 * tl.where(rotate, off, 1.0))
            big = tl.abs(tau) > 1e100  # tau^2 would overflow: tan = 1 / (2 tau) to working precision
            root = tl.sqrt(1.0 + tl.where(big, 0.0, tau * tau))
            tan = tl.where(big, 0.5 / tl.where(big, tau, 1.0),
                           tl.where(tau >= 0.0, 1.0, -1.0) / (tl.abs(tau) + root))
            tan = tl.where(rotate, tan, 0.0)
            cos = 1.0 / tl.sqrt(1.0 + tan * tan)
            sin = tan * cos
            J = tl.where(eye, cos[:, None], 0.0) + tl.where(pairs, tl.where(first, sin, -sin)[:, None], 0.0)
            G = tl.dot(tl.trans(J), tl.dot(G, J, input_precision="ieee", out_dtype=tl.float64),
                       input_precision="ieee", out_dtype=tl.float64)
            G = 0.5 * (G + tl.trans(G))
            V = tl.dot(V, J, input_precision="ieee", out_dtype=tl.float64)
        off_sq = tl.sum(tl.sum(tl.where(eye, 0.0, G * G), axis=1), axis=0)
        sweep += 1
    diag = tl.sum(tl.where(eye, G, 0.0), axis=1)  # (LP,) eigenvalues
    key = tl.where(idx < l, diag, float("-inf"))  # padding sorts last
    # rank of each eigenvalue in descending order, ties broken by index
    order = tl.sum(((key[None, :] > key[:, None]) | ((key[None, :] == key[:, None]) & (cols < rows))).to(tl.int32),
                   axis=1)  # (LP,)
    to_sorted = tl.where(order[:, None] == cols, 1.0, 0.0).to(tl.float64)  # (LP, LP): [i, r] = rank of i is r
    V = tl.dot(V, to_sorted, input_precision="ieee", out_dtype=tl.float64)
    evals = tl.sum(to_sorted * diag[:, None], axis=0)  # (LP,) descending
    tl.store(evals_ptr + b * LP + idx, evals)
    tl.store(evecs_ptr + b * LP * LP + rows * LP + cols, V)


def _range_fused(A, omega, l, n_iter):
    """One launch: Q (b, m, LP), Z = A^T Q (b, n, LP), Gram Z^T Z (b, LP, LP) fp64, kept (b,)."""
    batch, m, n = A.shape
    LP = omega.shape[1]
    q = torch.empty(batch, m, LP, device=A.device, dtype=torch.float32)
    z = torch.empty(batch, n, LP, device=A.device, dtype=torch.float32)
    gram = torch.empty(batch, LP, LP, device=A.device, dtype=torch.float64)
    kept = torch.empty(batch, device=A.device, dtype=torch.int32)
    _rsvd_fused_kernel[(batch,)](
        A, omega, q, z, gram, kept, m, n, l, n_iter, *A.stride(), _DROP_TOL,
        LP=LP, BM=_FUSED_BLOCK, PREC=_DOT_PRECISION, GRAM64=_GRAM_FP64, num_warps=_FACTOR_WARPS,
    )
    return q, z, gram, kept


def _bmm(A, X, transpose_a):
    """A @ X or A^T @ X for A (b, m, n) any float dtype, X (b or 1, K, N) float32 -> (b, R, N) float32."""
    batch, m, n = A.shape
    s_ab, s_am, s_an = A.stride()
    R, K, s_ar, s_ak = (n, m, s_an, s_am) if transpose_a else (m, n, s_am, s_an)
    X = X.contiguous()
    N = X.shape[-1]
    out = torch.empty(batch, R, N, device=A.device, dtype=torch.float32)
    s_xb = 0 if X.shape[0] == 1 else X.stride(0)
    BM, BN, BK = 128, 64, 32
    grid = (batch, triton.cdiv(R, BM), triton.cdiv(N, BN))
    _bmm_kernel[grid](A, X, out, R, K, N, s_ab, s_ar, s_ak, s_xb, X.stride(1), out.stride(0), out.stride(1),
                      BM=BM, BN=BN, BK=BK, PREC=_DOT_PRECISION, num_warps=4, num_stages=3)
    return out


def _orth_tiled(Y, l):
    """Orthonormal columns spanning Y (b, R, l or LP) float32 -> (Q, kept (b,) int32).

    l <= 64: `_cholqr2_kernel` on the padded (b, R, LP) buffer. Wider: Cholesky-QR2
    through torch.linalg with float64 Grams; Householder QR if a Cholesky fails.
    """
    batch = Y.shape[0]
    if l <= _MAX_KERNEL_SKETCH:
        kept = torch.empty(batch, device=Y.device, dtype=torch.int32)
        _cholqr2_kernel[(batch,)](Y, kept, Y.shape[1], l, _DROP_TOL, LP=Y.shape[2], BM=_FUSED_BLOCK,
                                  PREC=_DOT_PRECISION, GRAM64=_GRAM_FP64, num_warps=_FACTOR_WARPS)
        return Y, kept
    Q = Y
    for _ in range(2):
        gram = Q.double().mT @ Q.double()  # (b, l, l)
        chol, info = torch.linalg.cholesky_ex(gram, upper=True)
        if bool((info != 0).any()):
            Q = torch.linalg.qr(Y)[0]
            break
        Q = torch.linalg.solve_triangular(chol, Q.double(), upper=True, left=False).float()  # (b, R, l)
    return Q, torch.full((batch,), l, device=Y.device, dtype=torch.int32)


def _range_tiled(A, omega, l, n_iter):
    """Tiled launches: Q (b, m, l'), Z = A^T Q (b, n, l'), Gram fp64, kept; l' = LP if l <= 64 else l."""
    Q, kept = _orth_tiled(_bmm(A, omega[None], transpose_a=False), l)
    for _ in range(n_iter):
        W, _ = _orth_tiled(_bmm(A, Q, transpose_a=True), l)
        Q, kept = _orth_tiled(_bmm(A, W, transpose_a=False), l)
    Z = _bmm(A, Q, transpose_a=True)  # (b, n, l')
    gram = Z.double().mT @ Z.double()  # (b, l', l')
    return Q, Z, gram, kept


def _sym_eig(gram, l):
    """Eigenvalues (b, l) descending and eigenvectors (b, l, l) float64 of the symmetric leading
    (l, l) blocks of gram (b, LP, LP) float64, l <= 64: one `_sym_eig_kernel` program each."""
    batch, LP = gram.shape[0], tile_dim(l)
    gram = gram[:, :LP, :LP].contiguous()
    evals = torch.empty(batch, LP, device=gram.device, dtype=torch.float64)
    evecs = torch.empty(batch, LP, LP, device=gram.device, dtype=torch.float64)
    _sym_eig_kernel[(batch,)](gram, evals, evecs, l, _JACOBI_TOL_SQ, LP=LP, MAX_SWEEPS=_JACOBI_MAX_SWEEPS,
                              num_warps=_FACTOR_WARPS)
    return evals[:, :l], evecs[:, :l, :l]


def _householder_rsvd(A, omega, rank, n_iter):
    """The reference algorithm on float32 A (b, m, n) with a given Omega (n, l):
    Householder QR at every step, SVD of B. Used where Cholesky-QR kept < rank columns."""
    Q = torch.linalg.qr(A @ omega)[0]  # (b, m, l)
    for _ in range(n_iter):
        W = torch.linalg.qr(A.mT @ Q)[0]  # (b, n, l)
        Q = torch.linalg.qr(A @ W)[0]
    U_small, S, Vh = torch.linalg.svd(Q.mT @ A, full_matrices=False)
    return (Q @ U_small)[..., :rank], S[..., :rank], Vh[..., :rank, :]


def _small_svd(Q, Z, gram, l, rank):
    """Rayleigh-Ritz on the sketch: the eigenvectors V of M = B B^T (float64), U = Q V,
    Vh = diag(1 / S) V^T B. Q (b, m, >= l), Z = B^T (b, n, >= l), gram (b, >= l, >= l).

    l <= 64: `_sym_eig_kernel` (Jacobi, no host synchronization); wider: torch.linalg.eigh."""
    if l <= _MAX_KERNEL_SKETCH:
        lam, V = _sym_eig(gram, l)  # descending, float64
    else:
        lam, V = torch.linalg.eigh(gram[:, :l, :l])  # ascending, float64
        lam, V = lam.flip(-1), V.flip(-1)
    lam = lam[:, :rank]  # (b, rank) descending
    V = V[:, :l, :rank].float()  # (b, l, rank)
    S = lam.clamp_min(0).sqrt().float()  # (b, rank)
    U = Q[:, :, :l] @ V  # (b, m, rank)
    inv_s = torch.where(S > 0, 1.0 / S, torch.zeros_like(S))
    Vh = (Z[:, :, :l] @ V).mT * inv_s[:, :, None]  # (b, rank, n)
    return U, S, Vh


def _validate(A, rank, oversample, n_iter, name, check_finite):
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(A).__name__}")
    if not A.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {A.dtype}")
    if A.dim() < 2:
        raise ValueError(f"{name} must have shape (..., m, n) with at least 2 dims, got shape {tuple(A.shape)}")
    m, n = A.shape[-2:]
    for arg, value, low in (("rank", rank, 1), ("oversample", oversample, 0), ("n_iter", n_iter, 0)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{arg} must be an int, got {type(value).__name__} {value!r}")
        if value < low:
            raise ValueError(f"{arg} must be >= {low}, got {value}")
    if rank > min(m, n):
        raise ValueError(f"rank must be <= min(m, n) = {min(m, n)} for {name} of shape {tuple(A.shape)}, got {rank}")
    if check_finite and A.numel() and not bool(torch.isfinite(A).all()):  # one device sync
        raise ValueError(f"{name} must be finite, got NaN or inf entries ({name} of shape {tuple(A.shape)})")


def sketch_width(rank, oversample, m, n):
    """Columns l of the Gaussian test matrix for a rank-`rank` SVD of (m, n) matrices."""
    return min(rank + oversample, m, n)


def _check_test_matrix(omega, n, l, device):
    if not isinstance(omega, torch.Tensor) or omega.dtype != torch.float32 or omega.shape != (n, l):
        got = f"{omega.dtype} {tuple(omega.shape)}" if isinstance(omega, torch.Tensor) else type(omega).__name__
        raise ValueError(f"omega must be a float32 ({n}, {l}) tensor (n, rank + oversample), got {got}")
    if omega.device != device:
        raise ValueError(f"omega must be on the matrices' device {device}, got {omega.device}")


def _randomized_svd(A, rank, oversample, n_iter, generator, name, check_finite=True, omega=None, capturable=False):
    _validate(A, rank, oversample, n_iter, name, check_finite and not capturable)
    *batch_shape, m, n = A.shape
    l = sketch_width(rank, oversample, m, n)
    if capturable and l > MAX_CAPTURABLE_SKETCH:
        raise ValueError(f"capturable=True needs a sketch of at most {MAX_CAPTURABLE_SKETCH} columns, got "
                         f"min(rank + oversample, m, n) = {l} (rank {rank}, oversample {oversample}, {name} {m} x {n})")
    if omega is not None:
        _check_test_matrix(omega, n, l, A.device)
    if not on_kernel_device(A):
        U, S, Vh = randomized_svd_ref(A, rank, oversample, n_iter, generator, omega)
        return U.float(), S.float(), Vh.float()
    A3 = A.reshape(-1, m, n)  # (b, m, n)
    batch = A3.shape[0]
    if batch == 0:
        return (A.new_empty(*batch_shape, m, rank, dtype=torch.float32),
                A.new_empty(*batch_shape, rank, dtype=torch.float32),
                A.new_empty(*batch_shape, rank, n, dtype=torch.float32))
    if omega is None:
        omega = torch.randn(n, l, generator=generator, device=A.device, dtype=torch.float32)  # as the reference does
    if l <= _MAX_KERNEL_SKETCH:
        LP = tile_dim(l)
        omega = torch.nn.functional.pad(omega, (0, LP - l))  # (n, LP), zero columns beyond l
    if l <= _MAX_KERNEL_SKETCH and m * n <= _FUSED_MAX_ELEMENTS:
        Q, Z, gram, kept = _range_fused(A3, omega, l, n_iter)
    else:
        Q, Z, gram, kept = _range_tiled(A3, omega, l, n_iter)
    U, S, Vh = _small_svd(Q, Z, gram, l, rank)
    if not capturable:
        # Vh = Z V / S is noise divided by noise where S is rounding noise. Cholesky-QR counts the
        # columns it keeps; torch.linalg's QR (sketches wider than the kernels take) keeps every
        # column, so the singular values are counted too, with the same tolerance.
        above_noise = (S.double().square() > _DROP_TOL * S[:, :1].double().square()).sum(-1)
        deficient = torch.minimum(kept, above_noise) < rank
        if bool(deficient.any()):  # one device sync
            idx = deficient.nonzero()[:, 0]
            U[idx], S[idx], Vh[idx] = _householder_rsvd(A3[idx].float(), omega[:, :l], rank, n_iter)
    return U.reshape(*batch_shape, m, rank), S.reshape(*batch_shape, rank), Vh.reshape(*batch_shape, rank, n)


def randomized_svd(A, rank, oversample=8, n_iter=2, generator=None):
    """Rank-`rank` randomized SVD of every matrix of A.

    A: (..., m, n) float16 / bfloat16 / float32 / float64, any strides; math in float32.
    rank: 1 <= rank <= min(m, n). oversample: extra sketch columns (sketch width
    l = min(rank + oversample, m, n)). n_iter: subspace iterations.
    generator: torch.Generator on A's device; the Gaussian test matrix is drawn from it
    exactly as `randomized_svd_ref` draws it, so a given generator state gives the
    same result.
    Returns U (..., m, rank), S (..., rank) descending, Vh (..., rank, n), float32.
    """
    return _randomized_svd(A, rank, oversample, n_iter, generator, "A")


def low_rank_approx(A, rank, oversample=8, n_iter=2, generator=None):
    """U diag(S) Vh of `randomized_svd`: rank-`rank` approximation (..., m, n) in A's dtype."""
    U, S, Vh = _randomized_svd(A, rank, oversample, n_iter, generator, "A")
    return ((U * S[..., None, :]) @ Vh).to(A.dtype)


def top_left_singular_vectors(M, rank, oversample=8, n_iter=2, generator=None, check_finite=True, omega=None,
                              capturable=False):
    """Top-`rank` left singular vectors U (..., m, rank) float32 of M (..., m, n).

    check_finite=False skips the NaN / inf check and its device sync, for callers whose input
    cannot hold them or who check elsewhere (the model, once per training step or forward).
    omega: the Gaussian test matrix (n, l) float32 on M's device, l = min(rank + oversample, m, n);
    drawn from `generator` when None.
    capturable=True: no host synchronization, so the call can be recorded in a CUDA graph (pass
    omega: a graph cannot draw from a generator of its own). It needs l <= 64, skips the finiteness
    check, and leaves a rank-deficient matrix's U with zero columns past its numerical rank instead
    of completing them by Householder QR; U U^T M is the same best approximation either way.
    """
    return _randomized_svd(M, rank, oversample, n_iter, generator, "M", check_finite, omega, capturable)[0]
