"""The attention core of both layers, on the backend a layer runs: the Triton kernels of
`mla_kernels`, PyTorch's SDPA, or `mla_kernels.reference`.

Layout (B, T, heads, dim) throughout; k and v carry g <= nh heads (grouped queries).
"""
import torch
import torch.nn.functional as F

from mla_kernels import reference as ref
from mla_kernels.cache import QuantizedLatents

# The decode kernel packs the new queries of a step with the heads of a group into the rows of
# one tile; longer chunks (prefill) go to the flash kernel, whose query blocks fit them better.
DECODE_MAX_QUERIES = 16


def resolve_backend(backend, x):
    """The backend that runs on x: 'auto' -> 'triton' on CUDA, else 'sdpa' (the fastest exact path
    on a CPU); 'reference' stays for the tests."""
    if backend == "auto":
        return "triton" if x.is_cuda else "sdpa"
    return backend


def sdpa_attention(q, k, v, softmax_scale, q_offset, dropout_p=0.0):
    """PyTorch's fused attention on flash-attention's layout, causal mask aligned at q_offset.

    q (B, Tq, nh, D), k (B, Tk, g, D), v (B, Tk, g, Dv) -> (B, Tq, nh, Dv); g < nh through enable_gqa.
    q_offset: keys before query 0, an int, a 0-dim tensor, or a (B,) tensor (one per row).
    """
    Tq, Tk = q.size(1), k.size(1)
    d_qk, d_v = q.size(-1), v.size(-1)
    if d_qk < d_v:  # PyTorch's fused kernels need one head dim: zero columns change no score or output
        q, k = F.pad(q, (0, d_v - d_qk)), F.pad(k, (0, d_v - d_qk))
    elif d_v < d_qk:
        v = F.pad(v, (0, d_qk - d_v))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, D)
    options = dict(dropout_p=dropout_p, scale=softmax_scale, enable_gqa=k.size(1) != q.size(1))
    if isinstance(q_offset, int) and q_offset == 0 and Tq == Tk:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, **options)
    else:
        per_row = isinstance(q_offset, torch.Tensor) and q_offset.dim() == 1
        q_pos = torch.arange(Tq, device=q.device)[:, None] + (q_offset[:, None, None] if per_row else q_offset)
        mask = torch.arange(Tk, device=q.device) <= q_pos  # (Tq, Tk), or (B, Tq, Tk) per row
        if per_row:
            mask = mask[:, None]  # (B, 1, Tq, Tk): one mask for every head of a row
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **options)
    return y[..., :d_v].transpose(1, 2)  # (B, Tq, nh, Dv)


def causal_attention(q, k, v, softmax_scale, q_offset, backend):
    """GQA causal attention: q (B, Tq, nh, D), k (B, Tk, g, D), v (B, Tk, g, Dv) -> (B, Tq, nh, Dv)."""
    if backend == "triton":
        from mla_kernels.attention import flash_attention

        return flash_attention(q, k, v, softmax_scale=softmax_scale, q_offset=q_offset)
    if backend == "sdpa":
        return sdpa_attention(q, k, v, softmax_scale, q_offset)
    return ref.attention_ref(q, k, v, softmax_scale, q_offset)[0]


def dequantized(latents, dtype):
    """An fp8 cache's `QuantizedLatents` as a tensor in dtype; anything else unchanged."""
    return latents.dequantize(dtype) if isinstance(latents, QuantizedLatents) else latents


def cached_attention(q, k, v, input_pos, softmax_scale, backend):
    """New queries over a cache: q (B, T, nh, D); k (B, Tk, g, D); v (B, Tk, g, Dv), or None when
    the latent is joint (v = k); k and v are `QuantizedLatents` when the cache is fp8. Returns
    (B, T, nh, Dv).

    A tensor input_pos (static-shape decode, or one position per row) passes the whole cache
    with its valid length as cache_seqlens; so do short chunks on the kernels, which the decode
    kernel serves best. Only the decode kernel reads fp8 latents as they are stored; every
    other path attends over a dequantized copy.
    """
    B, T = q.shape[:2]
    kernels = backend == "triton"
    decode = backend != "sdpa" and (isinstance(input_pos, torch.Tensor) or (kernels and T <= DECODE_MAX_QUERIES))
    if not (decode and kernels):
        k, v = dequantized(k, q.dtype), dequantized(v, q.dtype)
    if backend == "sdpa":  # with a tensor input_pos its causal mask also hides the unfilled cache tail
        return sdpa_attention(q, k, k if v is None else v, softmax_scale, input_pos)
    if decode:
        seqlens = torch.full((B,), T, dtype=torch.int32, device=q.device) + input_pos  # (B,) int32
        if kernels:
            from mla_kernels.decode import latent_decode

            k, k_scale = k if isinstance(k, QuantizedLatents) else (k, None)
            v, v_scale = v if isinstance(v, QuantizedLatents) else (v, None)
            return latent_decode(q, k, v, seqlens, softmax_scale, check_seqlens=False, k_scale=k_scale,
                                 v_scale=v_scale)[0]
        return ref.latent_decode_ref(q, k, v, seqlens, softmax_scale)[0]
    return causal_attention(q, k, k if v is None else v, softmax_scale, input_pos, backend)
