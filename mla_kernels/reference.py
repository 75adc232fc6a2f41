"""Plain-PyTorch reference for every op in `mla_kernels`: the ground truth of the tests.

Every function works in any floating dtype, float64 included, and computes in
float32 or wider (float64 stays float64). Layouts follow flash-attention: tensors are
(batch, seqlen, heads, dim). Notation (docs/design.md, section 2): nh query heads, g latent
(KV) groups, nh % g == 0, head h reads group h // (nh // g); hs the head size, r the
latent width.
"""
import math

import torch
import torch.nn.functional as F


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_ref(q, k, v, softmax_scale=None, q_offset=None):
    """Causal attention with grouped KV heads and separate qk / v head dims.

    q: (B, Tq, nh, Dqk); k: (B, Tk, g, Dqk); v: (B, Tk, g, Dv); nh % g == 0.
    softmax_scale: defaults to 1 / sqrt(Dqk).
    q_offset: absolute position of query 0 among the keys; query i attends keys
      j <= q_offset + i. Default Tk - Tq (bottom-right aligned, as in cached prefill).
    Returns out (B, Tq, nh, Dv) in q's dtype and logsumexp (B, nh, Tq) in float32
    (float64 for float64 input), natural log, of the scaled, masked scores.
    """
    B, Tq, nh, Dqk = q.shape
    Tk, g = k.shape[1], k.shape[2]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(Dqk)
    if q_offset is None:
        q_offset = Tk - Tq
    cdt = _compute_dtype(q.dtype)
    rep = nh // g
    qf = q.to(cdt).transpose(1, 2)  # (B, nh, Tq, Dqk)
    kf = k.to(cdt).transpose(1, 2).repeat_interleave(rep, dim=1)  # (B, nh, Tk, Dqk)
    vf = v.to(cdt).transpose(1, 2).repeat_interleave(rep, dim=1)  # (B, nh, Tk, Dv)
    scores = (qf @ kf.transpose(-1, -2)) * softmax_scale  # (B, nh, Tq, Tk)
    q_pos = torch.arange(Tq, device=q.device)[:, None] + q_offset
    k_pos = torch.arange(Tk, device=q.device)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, nh, Tq)
    probs = torch.exp(scores - lse[..., None])
    out = probs @ vf  # (B, nh, Tq, Dv)
    return out.transpose(1, 2).to(q.dtype), lse


def absorb_query(q, w_uk):
    """q'_h = q_h (W_uk^h)^T. q: (B, T, nh, hs), w_uk: (nh, r, hs) -> (B, T, nh, r)."""
    return torch.einsum("bthd,hrd->bthr", q, w_uk)


def expand_latent(c, w_u):
    """Per-head expansion c_{grp(h)} W_u^h. c: (B, T, g, r), w_u: (nh, r, hs) -> (B, T, nh, hs)."""
    nh, g = w_u.shape[0], c.shape[2]
    c = c.repeat_interleave(nh // g, dim=2)  # (B, T, nh, r)
    return torch.einsum("bthr,hrd->bthd", c, w_u)


def mla_attention_expanded_ref(q, c_k, c_v, w_uk, w_uv, softmax_scale=None, q_offset=None):
    """MLA attention with K and V expanded from the latents (docs/design.md, section 2).

    q: (B, Tq, nh, hs); c_k: (B, Tk, g, r); c_v: (B, Tk, g, rv) (pass c_k again for
    a joint latent); w_uk: (nh, r, hs); w_uv: (nh, rv, hs). softmax_scale defaults
    to 1 / sqrt(hs). Returns out (B, Tq, nh, hs) and logsumexp (B, nh, Tq).
    """
    k = expand_latent(c_k, w_uk)  # (B, Tk, nh, hs)
    v = expand_latent(c_v, w_uv)  # (B, Tk, nh, hs)
    return attention_ref(q, k, v, softmax_scale, q_offset)


def mla_attention_absorbed_ref(q, c_k, c_v, w_uk, w_uv, softmax_scale=None, q_offset=None):
    """MLA attention in latent space: same arguments and result as the expanded form.

    q' = q W_uk^T (B, Tq, nh, r); GQA attention of q' over c_k / c_v with the scale
    of the expanded form, 1 / sqrt(hs); o = o' W_uv.
    """
    hs = q.shape[-1]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(hs)
    q_lat = absorb_query(q, w_uk)  # (B, Tq, nh, r)
    o_lat, lse = attention_ref(q_lat, c_k, c_v, softmax_scale, q_offset)  # (B, Tq, nh, rv)
    out = torch.einsum("bthr,hrd->bthd", o_lat, w_uv)  # (B, Tq, nh, hs)
    return out, lse


FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def quantize_fp8(x):
    """x (..., d) -> (values (..., d) float8_e4m3fn, scales (...) float32), x ~ values * scales.

    One scale per vector of the last dim, amax / FP8_MAX, so every vector uses fp8's whole range
    (3 mantissa bits: a relative error up to 2^-4 per value). An all-zero vector gets scale 1.
    """
    amax = x.detach().abs().amax(dim=-1).float()  # (...)
    scales = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    values = (x.float() / scales[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return values, scales


def dequantize_fp8(values, scales, dtype):
    """values (..., d) float8 and scales (...) -> values * scales in dtype (float32 math, or float64)."""
    math_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return (values.to(math_dtype) * scales[..., None].to(math_dtype)).to(dtype)


def latent_decode_ref(q_lat, cache_k, cache_v, cache_seqlens, softmax_scale, k_scale=None, v_scale=None):
    """New absorbed queries over a latent KV cache with per-row lengths.

    q_lat: (B, Tq, nh, r) absorbed queries of the Tq newest tokens of each row;
    cache_k: (B, L, g, r); cache_v: (B, L, g, rv) or None for a joint latent, where V
      is the first rv = r columns of the same latent;
    cache_seqlens: (B,) integers, valid cached length of each row, the new tokens
      included: query i of row b sits at position cache_seqlens[b] - Tq + i and sees
      positions <= that one. Slots at or beyond cache_seqlens[b] are never read.
    k_scale, v_scale: (B, L, g) scales of an fp8 cache (`quantize_fp8`); the latents are
      dequantized to q_lat's dtype first. A joint fp8 latent passes k_scale only.
    Returns o_lat (B, Tq, nh, rv) in q_lat's dtype and logsumexp (B, nh, Tq).
    """
    B, Tq = q_lat.shape[:2]
    if k_scale is not None:
        cache_k = dequantize_fp8(cache_k, k_scale, q_lat.dtype)
        if cache_v is not None:
            cache_v = dequantize_fp8(cache_v, v_scale, q_lat.dtype)
    if cache_v is None:
        cache_v = cache_k
    outs, lses = [], []
    for b in range(B):
        length = int(cache_seqlens[b])
        o, lse = attention_ref(
            q_lat[b : b + 1], cache_k[b : b + 1, :length], cache_v[b : b + 1, :length],
            softmax_scale, q_offset=length - Tq,
        )
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def project_append_ref(x, weight, bias, query_dim, k_cache, v_cache, cache_seqlens, k_scale=None, v_scale=None):
    """y = x weight^T + bias split into [q' | c^k | c^v]; the latents are written into the cache.

    x: (B, T, C); weight: (query_dim + g r + g rv, C); bias: (same,) or None;
    k_cache: (max_batch, max_seq, g, r), v_cache: (max_batch, max_seq, g, rv), rv = 0 for a
    joint latent; cache_seqlens: the tokens already cached (token 0 goes to that position), an
    int or an integer tensor of shape () or (B,) (per row). Writes k_cache[b, cache_seqlens[b]
    + t] and v_cache likewise for b < B, in the caches' dtype. Returns q' (B, T, query_dim) in
    x's dtype. fp8 caches: each (token, group) latent is quantized (`quantize_fp8`) and its
    scale written to k_scale / v_scale (max_batch, max_seq, g) at the same place.
    """
    B, T, _ = x.shape
    g, r, rv = k_cache.shape[2], k_cache.shape[3], v_cache.shape[3]
    cdt = _compute_dtype(x.dtype)
    y = x.to(cdt) @ weight.to(cdt).T  # (B, T, N)
    if bias is not None:
        y = y + bias.to(cdt)
    q, c_k, c_v = y.split([query_dim, g * r, g * rv], dim=-1)
    starts = torch.as_tensor(cache_seqlens, device=x.device).expand(B)  # (B,)
    rows = torch.arange(B, device=x.device)[:, None]  # (B, 1)
    positions = starts[:, None] + torch.arange(T, device=x.device)  # (B, T)
    for cache, scale, latent, dim in ((k_cache, k_scale, c_k, r), (v_cache, v_scale, c_v, rv)):
        if not dim:
            continue
        latent = latent.reshape(B, T, g, dim)  # (B, T, g, dim)
        if cache.dtype == FP8_DTYPE:
            latent, scale[rows, positions] = quantize_fp8(latent)
        cache[rows, positions] = latent.to(cache.dtype)
    return q.to(x.dtype)


def add_layer_norm_dtypes(x, y):
    """(sum dtype, norm dtype) of `add_layer_norm`, as `x + y` then `F.layer_norm` give them: the
    sum promotes x and y; the norm is float32 inside CUDA autocast (layer_norm is on its float32
    list; CPU autocast leaves it alone), else the sum's dtype."""
    sum_dtype = torch.result_type(x, y)
    cuda_autocast = x.device.type == "cuda" and torch.is_autocast_enabled("cuda")
    return sum_dtype, torch.float32 if cuda_autocast else sum_dtype


def add_layer_norm_ref(x, y, weight, bias=None, eps=1e-5, norm_dtype=None):
    """(x + y, layer_norm(x + y)) over the last dim.

    x, y: (..., C); weight, bias: (C,) (bias may be None). The sum is `x + y` (rounded to the
    promoted dtype); its norm is computed in float32 or wider from the sum as rounded and returned
    in norm_dtype (default: `add_layer_norm_dtypes`' norm dtype).
    """
    total = x + y
    cdt = _compute_dtype(total.dtype)
    with torch.autocast(x.device.type, enabled=False):
        normed = F.layer_norm(total.to(cdt), weight.shape, weight.to(cdt), None if bias is None else bias.to(cdt), eps)
    return total, normed.to(norm_dtype or add_layer_norm_dtypes(x, y)[1])


ACTIVATIONS = (None, "gelu", "gelu_tanh")  # `decode_linear`'s: none, nn.GELU(), nn.GELU(approximate='tanh')


def linear_ref(x, weight, bias=None, activation=None):
    """act(x weight^T + bias): x (..., K), weight (N, K), bias (N,) or None -> (..., N) in x's dtype.

    weight and bias are first rounded to x's dtype (as autocast casts them); the product is summed
    in float32 or wider, rounded to x's dtype, and the activation (one of ACTIVATIONS) runs on
    the rounded value in float32 or wider, as F.linear followed by F.gelu computes it.
    """
    cdt = _compute_dtype(x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        b = None if bias is None else bias.to(x.dtype).to(cdt)
        y = F.linear(x.to(cdt), weight.to(x.dtype).to(cdt), b).to(x.dtype)
        if activation is not None:
            y = F.gelu(y.to(cdt), approximate="tanh" if activation == "gelu_tanh" else "none").to(x.dtype)
    return y


def randomized_svd_ref(A, rank, oversample=8, n_iter=2, generator=None, omega=None):
    """Batched randomized SVD (Halko, Martinsson, Tropp 2011, algorithms 4.4 and 5.1).

    A: (..., m, n) float tensor. Gaussian test matrix Omega (n, rank + oversample);
    Q = orth(A Omega), then n_iter subspace iterations Q = orth(A orth(A^T Q)); the
    small matrix B = Q^T A is factored exactly. Math in float32 (float64 kept).
    Returns U (..., m, rank), S (..., rank) descending, Vh (..., rank, n) in A's
    compute dtype. generator: a torch.Generator on A's device for a reproducible Omega;
    omega: the test matrix itself (n, min(rank + oversample, m, n)), instead of drawing one.
    """
    m, n = A.shape[-2:]
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [1, min(m, n)] = [1, {min(m, n)}] for ({m}, {n}) matrices, got {rank}")
    cdt = _compute_dtype(A.dtype)
    A = A.to(cdt)
    sketch = min(rank + oversample, m, n)
    if omega is None:
        omega = torch.randn(n, sketch, generator=generator, device=A.device, dtype=cdt)
    omega = omega.to(cdt)
    Q, _ = torch.linalg.qr(A @ omega)  # (..., m, sketch)
    for _ in range(n_iter):
        W, _ = torch.linalg.qr(A.transpose(-1, -2) @ Q)  # (..., n, sketch)
        Q, _ = torch.linalg.qr(A @ W)  # (..., m, sketch)
    B_small = Q.transpose(-1, -2) @ A  # (..., sketch, n)
    U_small, S, Vh = torch.linalg.svd(B_small, full_matrices=False)
    U = Q @ U_small  # (..., m, sketch)
    return U[..., :rank], S[..., :rank], Vh[..., :rank, :]


def low_rank_approx_ref(A, rank, oversample=8, n_iter=2, generator=None):
    """Rank-`rank` approximation U diag(S) Vh of each matrix of A (..., m, n), in A's dtype."""
    U, S, Vh = randomized_svd_ref(A, rank, oversample, n_iter, generator)
    return ((U * S[..., None, :]) @ Vh).to(A.dtype)
