"""Triton kernels for Multi-Head Latent Attention, each with a PyTorch reference beside it.

Every op takes tensors laid out as flash-attention takes them, (batch, seqlen, heads, dim),
runs its Triton kernel on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1) and its
reference from `mla_kernels.reference` elsewhere. A position is always counted the same way:
`cache_seqlens` is how many tokens a row's cache holds (`q_offset` of the attention ops is the
same count for an uncached call: the keys before query 0). docs/design.md has the math.

Training (differentiable, `torch.compile` traces them without a graph break):
- `flash_attention(q, k, v)`: causal grouped-query attention, separate qk / v head dims.
- `mla_attention_expanded(q, c_k, c_v, w_uk, w_uv)`: attention over latents expanded on-chip.
Generation over a latent KV cache:
- `LatentKVCache`: preallocated latents of one layer; `.k`, `.v` are the views the ops take.
- `project_append(x, weight, bias, query_dim, k_cache, v_cache, cache_seqlens)`: the latent
  projection, written straight into the cache.
- `latent_decode(q_lat, cache_k, cache_v, cache_seqlens, softmax_scale)`: split-KV decoding
  over the cached latents.
- `add_layer_norm(x, y, weight, bias)`: a block's residual add and the layer norm after it.
- `decode_linear(x, weight, bias, activation)`: a linear layer (GELU fused) for a step's few rows.
Randomized SVD:
- `randomized_svd`, `low_rank_approx`, `top_left_singular_vectors`.
"""
from mla_kernels import reference
from mla_kernels.append import project_append
from mla_kernels.attention import flash_attention, mla_attention_expanded
from mla_kernels.cache import LatentKVCache
from mla_kernels.decode import latent_decode
from mla_kernels.layer_norm import add_layer_norm
from mla_kernels.linear import decode_linear
from mla_kernels.svd import low_rank_approx, randomized_svd, top_left_singular_vectors

__all__ = [
    "LatentKVCache",
    "add_layer_norm",
    "decode_linear",
    "flash_attention",
    "latent_decode",
    "low_rank_approx",
    "mla_attention_expanded",
    "project_append",
    "randomized_svd",
    "reference",
    "top_left_singular_vectors",
]
