"""The attention core of both layers, on the backend a layer runs: the Triton kernels of
`mla_kernels`, PyTorch's SDPA, or `mla_kernels.reference`; and the one form a position takes
inside the model (`cache_seqlens`).

Layout (B, T, heads, dim) throughout; k and v carry g <= nh heads (grouped queries).
"""
import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mla_kernels import reference as ref
from mla_kernels.cache import QuantizedLatents

# The decode kernel packs the new queries of a step with the heads of a group into the rows of
# one tile; longer chunks go through cuBLAS and a cache copy instead of the fused cache append.
DECODE_MAX_QUERIES = 16
# Rows (B x new tokens) up to which a decode step's linear layers (the MLP, MLA's output projection)
# run `mla_kernels.linear.decode_linear` instead of cuBLAS, on the 'auto' and 'triton' backends.
# 0 (off) until bench/linear.py and `bench/generate.py --linears` have measured it against cuBLAS on
# a GPU (docs/decisions.md); at most mla_kernels.linear.MAX_ROWS.
DECODE_LINEAR_ROWS = 0


def runs_decode_linear(rows):
    """Whether a generation call's linear layers over `rows` rows take `decode_linear`."""
    return rows <= DECODE_LINEAR_ROWS


def cache_seqlens(input_pos, batch, new_tokens, limit, device):
    """The position of a call, in the one form every layer takes: None or a (batch,) int32 tensor.

    The rule, for every call into the model:
    - None: every row starts at position 0. Training and eval (no caches) and a prefill (the
      prompt into empty caches) take it: shapes and offsets are known on the host, attention is
      causal over the call's own tokens (flash attention's q_offset 0), and nothing is allocated.
    - a (batch,) int32 tensor on the device: the tokens each row's cache holds before the call
      (flash-attn's `cache_seqlens`). Decode steps take it: attention reads the whole cache with
      each row's length, nothing reads the tensor on the host, so a step never waits on the
      device and replays from a CUDA graph.

    input_pos: what the caller passed `GPT.forward`: an int (on the host; 0 gives None, any other
      is checked against max_seq and copied to the device), or an integer tensor of shape () or
      (batch,) on the device, used as it is (not range-checked: that would synchronize).
    new_tokens: the call's length; limit: (name, n), the most positions a row may reach (the
      model's block_size, or its caches' max_seq): the call must end there (with an int input_pos)
      or hold no more tokens (with a tensor).
    """
    name, max_seq = limit
    if new_tokens > max_seq:
        raise ValueError(f"sequence of length {new_tokens} exceeds {name}={max_seq}")
    if isinstance(input_pos, torch.Tensor):
        if input_pos.dtype not in (torch.int32, torch.int64) or input_pos.shape not in ((), (batch,)):
            raise ValueError(f"input_pos as a tensor must be int32 or int64 of shape () or ({batch},), got "
                             f"{input_pos.dtype} of shape {tuple(input_pos.shape)}")
        return input_pos.to(torch.int32).expand(batch).contiguous()  # (batch,) int32: no copy if it is one
    if not isinstance(input_pos, int) or isinstance(input_pos, bool):
        raise TypeError(f"input_pos must be an int or an integer tensor, got {type(input_pos).__name__}")
    if input_pos < 0 or input_pos + new_tokens > max_seq:
        raise ValueError(f"sequence of length {input_pos + new_tokens} (input_pos={input_pos} + {new_tokens} "
                         f"tokens) exceeds {name}={max_seq}")
    if input_pos == 0:
        return None
    return torch.full((batch,), input_pos, dtype=torch.int32, device=device)  # (batch,) int32


def resolve_backend(backend, x):
    """The backend that runs on x: 'auto' -> 'triton' on CUDA, else 'sdpa' (the fastest exact path
    on a CPU); 'reference' stays for the tests."""
    if backend == "auto":
        return "triton" if x.is_cuda else "sdpa"
    return backend


SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
SDPA_CORES = ("sdpa", *SDPA_BACKENDS)  # the backends that run PyTorch's SDPA


def sdpa_attention(q, k, v, softmax_scale, cache_seqlens=None, dropout_p=0.0, backend="sdpa"):
    """PyTorch's fused attention on flash-attention's layout, causal.

    q (B, Tq, nh, D), k (B, Tk, g, D), v (B, Tk, g, Dv) -> (B, Tq, nh, Dv); g < nh through enable_gqa.
    cache_seqlens (`cache_seqlens`): None, the queries are the keys' positions (Tq = Tk); or
    (B,) int32, row b's query i sits at position cache_seqlens[b] + i and sees the keys up to it
    (a mask, which also hides a cache's unfilled tail).
    backend: 'sdpa' lets PyTorch pick its kernel; 'cudnn' or 'flash' allows only that one (cuDNN
    takes no grouped KV heads: they are repeated for it, as a user of it would) for the causal call;
    a masked one (cache_seqlens given, a decode step) goes to whichever kernel PyTorch has for it.
    """
    if cache_seqlens is not None:
        backend = "sdpa"
    Tq, Tk = q.size(1), k.size(1)
    d_qk, d_v = q.size(-1), v.size(-1)
    if d_qk < d_v:  # PyTorch's fused kernels need one head dim: zero columns change no score or output
        q, k = F.pad(q, (0, d_v - d_qk)), F.pad(k, (0, d_v - d_qk))
    elif d_v < d_qk:
        v = F.pad(v, (0, d_qk - d_v))
    if backend == "cudnn" and k.size(2) != q.size(2):
        k, v = (t.repeat_interleave(q.size(2) // k.size(2), dim=2) for t in (k, v))  # (B, Tk, nh, .)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, D)
    options = dict(dropout_p=dropout_p, scale=softmax_scale, enable_gqa=k.size(1) != q.size(1))
    restricted = sdpa_kernel([SDPA_BACKENDS[backend]]) if backend in SDPA_BACKENDS else contextlib.nullcontext()
    if cache_seqlens is None:
        if Tq != Tk:
            raise ValueError(f"without cache_seqlens the queries are the keys' positions: Tq={Tq} != Tk={Tk}")
        with restricted:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, **options)
    else:
        q_pos = torch.arange(Tq, device=q.device)[:, None] + cache_seqlens[:, None, None]  # (B, Tq, 1)
        mask = torch.arange(Tk, device=q.device) <= q_pos  # (B, Tq, Tk)
        with restricted:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], **options)  # one mask per row
    return y[..., :d_v].transpose(1, 2)  # (B, Tq, nh, Dv)


def causal_attention(q, k, v, softmax_scale, backend):
    """GQA causal attention over the call's own tokens (Tq = Tk, position 0 first):
    q (B, T, nh, D), k (B, T, g, D), v (B, T, g, Dv) -> (B, T, nh, Dv)."""
    if backend == "triton":
        from mla_kernels.attention import flash_attention

        return flash_attention(q, k, v, softmax_scale=softmax_scale, q_offset=0)
    if backend == "reference":
        return ref.attention_ref(q, k, v, softmax_scale, 0)[0]
    return sdpa_attention(q, k, v, softmax_scale, backend=backend)


def dequantized(latents, dtype):
    """An fp8 cache's `QuantizedLatents` as a tensor in dtype; anything else unchanged."""
    return latents.dequantize(dtype) if isinstance(latents, QuantizedLatents) else latents


def write_cache(cache, cache_seqlens, k_new, v_new):
    """Store a call's new keys and values, k_new (B, T, g, dk) and v_new (B, T, g, dv) or None
    (a joint latent), in cache (a `LatentKVCache`) at cache_seqlens (`cache_seqlens`), and return
    what `cached_attention` reads: for a prefill (cache_seqlens None) k_new and v_new themselves,
    so that every caller (each MLA form, standard attention) attends over what it computed (an fp8
    cache's rounded copy serves the decode steps); for a decode step views of the whole cache
    (B, max_seq, g, .)."""
    if cache_seqlens is None:
        cache.update(0, k_new, v_new)
        return k_new, v_new
    cache.update(cache_seqlens, k_new, v_new)
    return cache.latents(k_new.shape[0])


def cached_attention(q, k, v, cache_seqlens, softmax_scale, backend):
    """New queries over a cache: q (B, T, nh, D); k (B, L, g, D); v (B, L, g, Dv), or None when
    the latent is joint (v = k); in a decode step k and v are `QuantizedLatents` when the cache is
    fp8. Returns (B, T, nh, Dv).

    cache_seqlens (`cache_seqlens`): None for a prefill, whose k and v are the latents it just
    computed and stored (L = T): causal attention as in training. A (B,) int32 tensor for a decode step,
    whose k and v are the whole cache (L = max_seq): each row attends over its cache_seqlens + T
    positions (the decode kernel on the kernels, the only path that reads fp8 latents as they
    are stored; every other path attends over a dequantized copy).
    """
    kernels = backend == "triton"
    if cache_seqlens is None or not kernels:
        k, v = dequantized(k, q.dtype), dequantized(v, q.dtype)
        v = k if v is None else v
    if cache_seqlens is None:
        return causal_attention(q, k, v, softmax_scale, backend)
    if backend in SDPA_CORES:
        return sdpa_attention(q, k, v, softmax_scale, cache_seqlens, backend=backend)
    seqlens = cache_seqlens + q.size(1)  # (B,) int32: the valid length of each row, new tokens included
    if kernels:
        from mla_kernels.decode import latent_decode

        k, k_scale = k if isinstance(k, QuantizedLatents) else (k, None)
        v, v_scale = v if isinstance(v, QuantizedLatents) else (v, None)
        return latent_decode(q, k, v, seqlens, softmax_scale, check_seqlens=False, k_scale=k_scale,
                             v_scale=v_scale)[0]
    return ref.latent_decode_ref(q, k, v, seqlens, softmax_scale)[0]
