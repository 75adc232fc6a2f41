"""Attention layers: nanoGPT's CausalSelfAttention and its drop-in, MultiHeadLatentAttention.

Both take x (B, T, C) and return (B, T, C). With `cache` (a LatentKVCache) and `cache_seqlens`
(`mla_gpt.model.core.cache_seqlens` says what it holds) they write the new tokens' keys and values
into the cache and attend over what it holds, for generation. Backends (`attn_backend`):
'triton' runs the kernels of `mla_kernels` (through the Triton interpreter on CPU when
TRITON_INTERPRET=1); 'sdpa' runs the attention core on PyTorch's `F.scaled_dot_product_attention`
(MLA on SDPA: the peer a user can write without a custom kernel), 'cudnn' and 'flash' the same
restricted to that kernel; 'reference' runs `mla_kernels.reference`. 'auto': MLA's form and core
per shape from the GPU's measured table (`mla_gpt.model.plan`), SDPA on a CPU; CausalSelfAttention
runs PyTorch's SDPA everywhere, nanoGPT's fast path.
"""
import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from mla_gpt.model import plan
from mla_gpt.model.core import (
    DECODE_MAX_QUERIES,
    SDPA_CORES,
    cached_attention,
    causal_attention,
    dequantized,
    resolve_backend,
    runs_decode_linear,
    sdpa_attention,
    write_cache,
)
from mla_gpt.model.memory import KVCacheReport
from mla_gpt.model.svd_values import WeightSVDValues, low_rank_per_sequence
from mla_kernels import reference as ref
from mla_kernels.append import fp8_append_supported, project_append
from mla_kernels.cache import LatentKVCache
from mla_kernels.linear import decode_linear

# A generation's composed weights, keyed by its cache (one per layer): (the layer, {dtype: weights}),
# dropped with the cache. Kept here rather than on the layer, which then pickles as any nn.Module.
_COMPOSED_PER_CACHE = weakref.WeakKeyDictionary()


class CausalSelfAttention(WeightSVDValues, KVCacheReport, nn.Module):
    """nanoGPT's multi-head causal self-attention; caches K and V when generating.

    With use_svd, the values are cut to svd_rank per head, in the same two modes as MLA's:
    'weight' stores z = v U_k with U_k the top-k left singular vectors of the head's value
    projection (hs, C), so the cache holds hs + k numbers per head instead of 2 hs; 'activation'
    is the per-sequence SVD of V, not causal, without a cache.
    """

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.head_size = config.head_size
        self.softmax_scale = 1.0 / math.sqrt(config.head_size)
        self.dropout = config.dropout
        self.backend = config.attn_backend
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.svd_mode = config.svd_mode if config.use_svd else None
        if self.svd_mode is not None:
            self.svd_rank = config.svd_rank or self.head_size
        if self.svd_mode == "weight":
            self._init_value_basis(self.n_head, self.head_size, self.svd_rank)

    def forward(self, x, cache=None, cache_seqlens=None):
        B, T, C = x.size()
        backend = resolve_backend(self.backend, x)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, self.head_size)  # (B, T, nh, hs)
        k = k.view(B, T, self.n_head, self.head_size)  # (B, T, nh, hs)
        v = v.view(B, T, self.n_head, self.head_size)  # (B, T, nh, hs)
        basis = None
        if self.svd_mode == "activation":
            if cache is not None:
                raise ValueError("svd_mode='activation' is not causal and cannot use a KV cache")
            v = low_rank_per_sequence(v, self.svd_rank, backend == "triton")
        elif self.svd_mode == "weight":
            basis = self._value_basis()  # (nh, hs, k)
            v = torch.einsum("bthd,hdk->bthk", v, basis)  # (B, T, nh, k): z = v U_k
        if cache is not None:
            k, v = write_cache(cache, cache_seqlens, k, v)  # (B, T, nh, .) as given, or (B, max_seq, nh, .)
        if self.backend == "auto" or backend in SDPA_CORES:  # standard attention's 'auto' is SDPA on any device
            dropout_p = self.dropout if self.training else 0.0
            y = sdpa_attention(q, dequantized(k, q.dtype), dequantized(v, q.dtype), self.softmax_scale, cache_seqlens,
                               dropout_p, backend if backend in SDPA_CORES else "sdpa")
        elif cache is not None:
            y = cached_attention(q, k, v, cache_seqlens, self.softmax_scale, backend)
        else:
            y = causal_attention(q, k, v, self.softmax_scale, backend)
        if basis is not None:
            y = torch.einsum("bthk,hdk->bthd", y, basis)  # (B, T, nh, hs): back through U_k^T
        return self.resid_dropout(self.c_proj(y.reshape(B, T, C)))

    def _value_source(self):
        return self.c_attn.weight

    def _value_maps(self):
        """Each head's value projection (nh, hs, C), the rows of c_attn that make v."""
        C = self.n_embd
        return self.c_attn.weight.detach()[2 * C :].view(self.n_head, self.head_size, C)

    @property
    def value_dim(self):
        """Width of the values the attention reads: svd_rank under svd 'weight', else hs."""
        return self.svd_rank if self.svd_mode == "weight" else self.head_size

    def make_cache(self, max_batch, max_seq, dtype, device):
        return LatentKVCache(max_batch, max_seq, self.n_head, self.head_size, self.value_dim,
                             dtype=dtype, device=device)

    def kv_cache_elements_per_token(self):
        return self.n_head * (self.head_size + self.value_dim)

    def get_compression_ratio(self):
        """Attention parameters of the standard layer over this layer's: 1 (SVD adds none)."""
        return 1.0

    @property
    def supports_cache(self):
        """svd 'activation' is not causal, so its outputs cannot be cached."""
        return self.svd_mode != "activation"


class LatentExpansion(nn.Module):
    """Per-head expansion of a latent: head h maps its group's latent (r) to hs by W_u^h.

    weight: (n_head, latent_dim, head_size). forward: c (B, T, g, r) -> (B, T, nh, hs).
    """

    def __init__(self, n_head, latent_dim, head_size):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_head, latent_dim, head_size))
        self.reset_parameters()

    def reset_parameters(self):
        # keeps |c W_u| at the size of |c|, so K and V start at the scale of standard attention
        nn.init.normal_(self.weight, mean=0.0, std=1.0 / math.sqrt(self.weight.size(1)))

    def forward(self, c):
        return ref.expand_latent(c, self.weight)


class MultiHeadLatentAttention(WeightSVDValues, KVCacheReport, nn.Module):
    """Multi-Head Latent Attention, a drop-in for CausalSelfAttention (docs/design.md, sections 2 and 4).

    q_proj: C -> C; kv_latent_proj: C -> (2 or 1) g r (separate or joint K/V latents);
    k_expand, v_expand: per-head (r, hs) expansions; c_proj: C -> C.
    The attention runs in latent space ('absorbed'), on K/V tiles our kernel expands on chip
    ('expanded') or on K/V expanded once in memory ('materialized'), its core on our kernel or
    SDPA: `choose_form` decides unless config.mla_path and attn_backend force them.
    Attention-probability dropout is not applied (the fused kernels have none); dropout
    acts on the output, as resid_dropout.
    """

    def __init__(self, config):
        super().__init__()
        C, nh = config.n_embd, config.n_head
        self.n_embd, self.n_head, self.head_size = C, nh, config.head_size
        self.latent_dim, self.n_groups = config.latent_dim, config.kv_groups
        self.joint_kv = config.mla_joint_kv
        self.backend, self.path = config.attn_backend, config.mla_path
        self.svd_mode = config.svd_mode if config.use_svd else None
        self.softmax_scale = 1.0 / math.sqrt(self.head_size)

        self.q_proj = nn.Linear(C, C, bias=config.bias)
        n_latents = 1 if self.joint_kv else 2
        self.kv_latent_proj = nn.Linear(C, n_latents * self.n_groups * self.latent_dim, bias=config.bias)
        self.k_expand = LatentExpansion(nh, self.latent_dim, self.head_size)
        self.v_expand = LatentExpansion(nh, self.latent_dim, self.head_size)
        self.c_proj = nn.Linear(C, C, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

        if self.svd_mode == "weight":
            self.svd_rank = config.svd_rank or self.latent_dim
            # top-svd_rank left singular vectors of each group's stacked value expansion
            self._init_value_basis(self.n_groups, self.latent_dim, self.svd_rank)  # (g, r, k)
        elif self.svd_mode == "activation":
            self.svd_rank = config.svd_rank or self.head_size

    # ---- sizes and reports -------------------------------------------------------------

    @property
    def value_dim(self):
        """Width of the value latent the attention reads: svd_rank under svd 'weight', else r."""
        return self.svd_rank if self.svd_mode == "weight" else self.latent_dim

    @property
    def caches_joint_latent(self):
        return self.joint_kv and self.svd_mode != "weight"

    def kv_cache_elements_per_token(self):
        g, r = self.n_groups, self.latent_dim
        return g * r if self.caches_joint_latent else g * (r + self.value_dim)

    def get_compression_ratio(self):
        """Attention parameters of the standard layer over this layer's."""
        C = self.n_embd
        with_bias = self.c_proj.bias is not None
        standard = 4 * C * C + (4 * C if with_bias else 0)
        return standard / sum(p.numel() for p in self.parameters())

    def make_cache(self, max_batch, max_seq, dtype, device):
        value_dim = None if self.caches_joint_latent else self.value_dim
        return LatentKVCache(max_batch, max_seq, self.n_groups, self.latent_dim, value_dim,
                             dtype=dtype, device=device)

    @property
    def supports_cache(self):
        """svd 'activation' is not causal, so its outputs cannot be cached."""
        return self.svd_mode != "activation"

    def choose_form(self, seq_len, x):
        """(form, core) of an uncached call of length seq_len on x: on a CUDA GPU from its measured
        table (`mla_gpt.model.plan`), elsewhere the backend the layer resolves to and, unless
        mla_path forces one, the form the FLOP model finds cheapest."""
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        shape = plan.layer_key(self.n_embd, self.n_head, self.head_size, self.latent_dim, self.value_dim,
                               self.n_groups, self.joint_kv, dtype)
        if x.is_cuda and self.backend != "reference":
            return plan.choose(shape, seq_len, torch.is_grad_enabled(), plan.gpu_kind(x.device.index),
                               self.backend, self.path)
        core = resolve_backend(self.backend, x)
        if self.path != "auto":
            return self.path, core
        forms = plan.FORMS if core in ("triton", "reference") else ("absorbed", "materialized")
        return plan.cheapest_form(shape, seq_len, forms), core

    # ---- svd 'weight': the value maps ------------------------------------------------------

    def _value_source(self):
        return self.v_expand.weight

    def _value_maps(self):
        """Each group's stacked value expansions [W_uv^h for h in group]: (g, r, nh/g * hs)."""
        w_uv = self.v_expand.weight.detach()  # (nh, r, hs)
        g, r = self.n_groups, self.latent_dim
        stacked = w_uv.view(g, self.n_head // g, r, self.head_size).transpose(1, 2)
        return stacked.reshape(g, r, -1)  # (g, r, nh/g * hs)

    # ---- forward ---------------------------------------------------------------------------

    def forward(self, x, cache=None, cache_seqlens=None):
        B, T, C = x.size()
        backend = resolve_backend(self.backend, x)
        if self.svd_mode == "activation":
            if cache is not None:
                raise ValueError("svd_mode='activation' is not causal and cannot use a KV cache")
            y = self._forward_activation_svd(x, backend)
            return self.resid_dropout(self.c_proj(y.reshape(B, T, C)))

        basis = self._value_basis() if self.svd_mode == "weight" else None  # (g, r, k)
        if cache is not None and cache_seqlens is not None:  # a decode step: latent space over the latent cache
            return self.resid_dropout(self._forward_absorbed(x, basis, cache, cache_seqlens, backend))
        # training, eval and a prefill (which also fills the cache) run the planned form: a prefill
        # is the forward pass of a training step's shape
        if cache is not None:  # a prefill starts a generation: its decode steps compose the weights afresh
            _COMPOSED_PER_CACHE.pop(cache, None)
        form, core = self.choose_form(T, x)
        if form == "absorbed":
            return self.resid_dropout(self._forward_absorbed(x, basis, cache, None, core))
        q = self.q_proj(x).view(B, T, self.n_head, self.head_size)  # (B, T, nh, hs)
        c_k, c_v = self._latents(self.kv_latent_proj(x), basis)  # (B, T, g, r), (B, T, g, rv)
        if cache is not None:  # the prefill's attention reads these latents as computed, not the cache's copy
            write_cache(cache, None, c_k, None if self.caches_joint_latent else c_v)
        w_uk, w_uv = self.k_expand.weight, self._value_expansion(basis)  # (nh, r, hs), (nh, rv, hs)
        if form == "expanded" and core == "triton":
            from mla_kernels.attention import mla_attention_expanded

            y = mla_attention_expanded(q, c_k, c_v, w_uk, w_uv, softmax_scale=self.softmax_scale)
        elif form == "expanded" and core == "reference":
            y = ref.mla_attention_expanded_ref(q, c_k, c_v, w_uk, w_uv, self.softmax_scale)[0]
        else:  # materialized, and 'expanded' on a core that cannot fuse the expansion: the same math
            k, v = ref.expand_latent(c_k, w_uk), ref.expand_latent(c_v, w_uv)  # (B, T, nh, hs) each
            y = causal_attention(q, k, v, self.softmax_scale, core)
        return self.resid_dropout(self.c_proj(y.reshape(B, T, C)))

    def _value_expansion(self, basis):
        """W_uv (nh, r, hs), or U_k^T W_uv (nh, k, hs) for the value latent z = c^v U_k."""
        if basis is None:
            return self.v_expand.weight
        head_basis = basis.repeat_interleave(self.n_head // self.n_groups, dim=0)  # (nh, r, k)
        return torch.einsum("hrk,hrd->hkd", head_basis, self.v_expand.weight)  # (nh, k, hs)

    def _absorbed_weights(self, basis, cache, cache_seqlens, dtype=None):
        """The composed weights of the absorbed form: (weight_in, bias_in, weight_out).

        weight_in (nh r + g r + g rv, C): q_proj composed with W_uk, then the key latent's
        rows of kv_latent_proj, then the value latent's (U_k composed in under svd 'weight';
        none for a cached joint latent); bias_in its bias or None; weight_out (C, nh rv):
        W_uv composed with c_proj. dtype: cast them to it (autocast's dtype for the fused
        cache append), None keeps the parameters' dtype.
        A generation (a cache, no autograd) composes them once per dtype and reuses them until
        its next prefill (cache_seqlens None) or another layer uses the cache: weights do not change
        while a model generates, and a graph captured over them keeps reading live tensors.
        Every other call composes them afresh. Nothing is reused on the strength of parameter
        version counters: a replayed CUDA graph (the trainer's captured step) updates weights
        without moving them.
        """
        if cache is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._compose_absorbed_weights(basis, dtype)
        owner, per_dtype = _COMPOSED_PER_CACHE.get(cache, (None, None))
        if cache_seqlens is None or owner is None or owner() is not self:
            per_dtype = {}
            _COMPOSED_PER_CACHE[cache] = (weakref.ref(self), per_dtype)
        if dtype not in per_dtype:
            per_dtype[dtype] = self._compose_absorbed_weights(basis, dtype)
        return per_dtype[dtype]

    def _compose_absorbed_weights(self, basis, dtype):
        C, nh, hs, r, g = self.n_embd, self.n_head, self.head_size, self.latent_dim, self.n_groups
        w_uk, w_uv = self.k_expand.weight, self._value_expansion(basis)  # (nh, r, hs), (nh, rv, hs)
        w_q = self.q_proj.weight.view(nh, hs, C)
        w_q_absorbed = torch.einsum("hrd,hdc->hrc", w_uk, w_q).reshape(nh * r, C)
        w_kv = self.kv_latent_proj.weight.view(-1, g, r, C)  # (2|1, g, r, C)
        b_kv = None if self.kv_latent_proj.bias is None else self.kv_latent_proj.bias.view(-1, g, r)
        rows, biases = [w_q_absorbed, w_kv[0].reshape(g * r, C)], None
        if b_kv is not None:
            b_q_absorbed = torch.einsum("hrd,hd->hr", w_uk, self.q_proj.bias.view(nh, hs)).reshape(-1)
            biases = [b_q_absorbed, b_kv[0].reshape(-1)]
        if basis is not None:  # value latent z = c^v U_k: its rows are U_k^T W_kv^v per group
            rows.append(torch.einsum("grk,grc->gkc", basis, w_kv[-1]).reshape(-1, C))  # (g k, C)
            if b_kv is not None:
                biases.append(torch.einsum("grk,gr->gk", basis, b_kv[-1]).reshape(-1))
        elif not self.joint_kv:
            rows.append(w_kv[1].reshape(g * r, C))
            if b_kv is not None:
                biases.append(b_kv[1].reshape(-1))
        weight_in = torch.cat(rows)  # (nh r + g r + g rv, C); no value rows for a joint latent
        bias_in = None if biases is None else torch.cat(biases)
        w_o = self.c_proj.weight.view(C, nh, hs)
        weight_out = torch.einsum("chd,hkd->chk", w_o, w_uv).reshape(C, -1)  # (C, nh rv)
        if dtype is not None:
            weight_in, weight_out = weight_in.to(dtype), weight_out.to(dtype)
            bias_in = None if bias_in is None else bias_in.to(dtype)
        return weight_in, bias_in, weight_out

    def _latents(self, latent, basis):
        """Split kv_latent_proj's output (B, T, (2|1) g r) into c^k (B, T, g, r) and the value latent.

        The value latent is c^v (B, T, g, r), or z = c^v U_k (B, T, g, k) under svd 'weight'.
        """
        B, T = latent.shape[:2]
        latent = latent.view(B, T, -1, self.n_groups, self.latent_dim)
        c_k = latent[:, :, 0]
        c_v = latent[:, :, -1]  # the same tensor as c_k for a joint latent
        if basis is not None:
            c_v = torch.einsum("btgr,grk->btgk", c_v, basis)
        return c_k, c_v

    def _forward_absorbed(self, x, basis, cache, cache_seqlens, backend):
        """Latent-space attention with the projections composed into one GEMM on each side.

        In: q_proj composed with W_uk (C -> nh r) beside kv_latent_proj, one matmul on x.
        Out: W_uv composed with c_proj (nh rv -> C), one matmul. Both run on cuBLAS, except in a
        decode step on the kernels: a Triton GEMM there stores the latents straight into the
        cache (2-3x faster than cuBLAS + the cache copy, docs/decisions.md), and the output side
        runs `decode_linear` where `runs_decode_linear` says (one kernel where cuBLAS runs
        split-K and a reduce).
        """
        B, T, C = x.shape
        nh, r, g = self.n_head, self.latent_dim, self.n_groups
        fused = cache_seqlens is not None and backend == "triton" and T <= DECODE_MAX_QUERIES  # a decode step
        if fused and cache.quantized:  # the kernel quantizes a group's latent within one tile
            fused = fp8_append_supported(nh * r, r, 0 if self.caches_joint_latent else self.value_dim)
        if fused:  # one kernel projects and writes the latents into the cache (mla_kernels.append)
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
            weight_in, bias_in, weight_out = self._absorbed_weights(basis, cache, cache_seqlens, dtype)
            q_lat = project_append(x if dtype is None else x.to(dtype), weight_in, bias_in, nh * r, cache.k, cache.v,
                                   cache_seqlens, cache.k_scales, cache.v_scales)  # (B, T, nh r)
            q_lat = q_lat.view(B, T, nh, r)  # (B, T, nh, r)
            c_k, c_v = cache.latents(B)  # (B, max_seq, g, .), c_v None when joint
        else:
            weight_in, bias_in, weight_out = self._absorbed_weights(basis, cache, cache_seqlens)
            projected = F.linear(x, weight_in, bias_in)  # (B, T, nh r + g r + g rv)
            q_lat = projected[..., : nh * r].view(B, T, nh, r)  # (B, T, nh, r)
            c_k = projected[..., nh * r : (nh + g) * r].view(B, T, g, r)  # (B, T, g, r)
            c_v = None  # a cached joint latent has no value rows
            if not self.caches_joint_latent:
                c_v = projected[..., (nh + g) * r :].view(B, T, g, -1)  # (B, T, g, rv)
            if cache is not None:
                c_k, c_v = write_cache(cache, cache_seqlens, c_k, c_v)  # (B, T or max_seq, g, .), c_v None if joint
        if cache is None:
            # The core takes the projection's strided slices as they are: contiguous copies ran its
            # own forward faster but the layer's training step no faster, with more memory
            # (docs/decisions.md)
            o_lat = causal_attention(q_lat, c_k, c_k if c_v is None else c_v, self.softmax_scale, backend)
        else:
            o_lat = cached_attention(q_lat, c_k, c_v, cache_seqlens, self.softmax_scale, backend)  # (B, T, nh, rv)
        if fused and runs_decode_linear(B * T):  # a decode step's few rows: no split-K reduce kernel
            return decode_linear(o_lat.reshape(B, T, -1), weight_out, self.c_proj.bias)
        return F.linear(o_lat.reshape(B, T, -1), weight_out, self.c_proj.bias)

    def _forward_activation_svd(self, x, backend):
        """The original design's SVD on the expanded values (`low_rank_per_sequence`): not causal."""
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_size)  # (B, T, nh, hs)
        c_k, c_v = self._latents(self.kv_latent_proj(x), None)
        k = self.k_expand(c_k)  # (B, T, nh, hs)
        v = low_rank_per_sequence(self.v_expand(c_v), self.svd_rank, backend == "triton")  # (B, T, nh, hs)
        return causal_attention(q, k, v, self.softmax_scale, backend)
