"""LatentKVCache: a preallocated per-layer KV cache that stores latents, never expanded K/V."""
from typing import NamedTuple

import torch
from torch import nn

from mla_kernels.reference import FP8_DTYPE, dequantize_fp8, quantize_fp8


class QuantizedLatents(NamedTuple):
    """What an fp8 cache hands out: float8_e4m3fn values (B, L, g, d) and their float32 scales
    (B, L, g), one per position and group; latent = value * scale."""

    values: torch.Tensor
    scales: torch.Tensor

    def dequantize(self, dtype):
        return dequantize_fp8(self.values, self.scales, dtype)


class LatentKVCache(nn.Module):
    """Preallocated cache of one attention layer for up to (max_batch, max_seq) tokens.

    MLA stores the key latent c^k (max_batch, max_seq, n_groups, key_dim) and, unless the
    latent is joint, the value latent (max_batch, max_seq, n_groups, value_dim); under
    svd_mode='weight' the value latent is the rank-reduced z = c^v U_k, so value_dim is the
    SVD rank. Standard attention is the degenerate case n_groups = n_head,
    key_dim = value_dim = head_size (its K and V themselves).
    A container: `update` writes rows in place (nothing grows by concatenation), `latents` hands
    out views of them, `keep_rows` compacts the batch; the layers write decode steps' latents
    with `mla_kernels.append.project_append` into `.k` / `.v` themselves.

    dtype=torch.float8_e4m3fn stores the latents in fp8 with one float32 scale per (row,
    position, group) (`mla_kernels.reference.quantize_fp8`), quantized as they are written;
    `latents` then hands out `QuantizedLatents`, which `latent_decode` reads directly. Why this
    granularity (`bench/fp8_scales.py`): a position's latent is complete when it is written, so
    its scale never changes (a scale per tile of positions would have to rescale a tile's older
    positions whenever a new one raised its amax), and on the small trained models of that
    script's CPU run it kept the val loss within 0.02% of a bf16 cache's, as finer scales per
    16-32 latent columns did for up to 18% more bytes.

    Storage is group-major, (max_batch, n_groups, max_seq, dim), handed out as (batch, seqlen,
    g, dim) views (`k`, `v`), the layout every op of this package takes: the decode kernel's
    program for one (row, group) then streams one contiguous block of latents instead of
    dim-wide pieces strided by n_groups * dim.
    """

    def __init__(self, max_batch, max_seq, n_groups, key_dim, value_dim=None, *, dtype, device):
        super().__init__()
        for name, value in (("max_batch", max_batch), ("max_seq", max_seq), ("n_groups", n_groups),
                            ("key_dim", key_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if value_dim is not None and (not isinstance(value_dim, int) or value_dim < 1):
            raise ValueError(f"value_dim must be a positive int or None (joint latent), got {value_dim!r}")
        self.max_batch, self.max_seq = max_batch, max_seq
        self.joint = value_dim is None
        shape = (max_batch, n_groups, max_seq)
        self.register_buffer("k_cache", torch.zeros(*shape, key_dim, dtype=dtype, device=device),
                             persistent=False)
        value_shape = (*shape, 0 if self.joint else value_dim)
        self.register_buffer("v_cache", torch.zeros(value_shape, dtype=dtype, device=device),
                             persistent=False)
        self.quantized = dtype == FP8_DTYPE
        if self.quantized:  # one float32 scale per (row, group, position) of each latent
            self.register_buffer("k_scale", torch.ones(shape, device=device), persistent=False)
            self.register_buffer("v_scale", torch.ones(shape if not self.joint else (0, 0, 0), device=device),
                                 persistent=False)

    @property
    def k(self):
        """(max_batch, max_seq, n_groups, key_dim) view of the key latents."""
        return self.k_cache.transpose(1, 2)

    @property
    def v(self):
        """(max_batch, max_seq, n_groups, value_dim) view of the value latents (value_dim 0 when joint)."""
        return self.v_cache.transpose(1, 2)

    @property
    def k_scales(self):
        """(max_batch, max_seq, n_groups) view of an fp8 cache's key scales (None otherwise)."""
        return self.k_scale.transpose(1, 2) if self.quantized else None

    @property
    def v_scales(self):
        """(max_batch, max_seq, n_groups) view of an fp8 cache's value scales (None otherwise or joint)."""
        return self.v_scale.transpose(1, 2) if self.quantized and not self.joint else None

    @property
    def nbytes(self):
        """Bytes the cache holds: every preallocated slot, keys and values, and an fp8 cache's scales."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    @property
    def bytes_per_token(self):
        """Bytes one cached position of one sequence takes."""
        return self.nbytes // (self.max_batch * self.max_seq)

    def keep_rows(self, rows):
        """Move rows (a 1-D index tensor, in the order wanted) to the front of the cache.

        For batches whose sequences finish at different steps: the rows still generating then
        fill rows 0 .. len(rows) - 1, and the finished ones stop costing work.
        """
        n = rows.numel()
        for buf in self.buffers():  # values, and an fp8 cache's scales
            if buf.numel():
                buf[:n] = buf[rows]

    def update(self, cache_seqlens, k_new, v_new=None):
        """Write the latents of new tokens at positions cache_seqlens.. of rows 0 .. B - 1.

        cache_seqlens: tokens already in each row's cache, where its first new token goes: an
          int (the same for every row, checked against max_seq), or an integer tensor on the
          cache's device of shape () or (B,) (decode steps: not range-checked, that would
          synchronize with the device).
        k_new: (B, T, n_groups, key_dim); v_new: (B, T, n_groups, value_dim), None when joint.
        An fp8 cache quantizes them as it stores them. `latents` hands out what was written.
        """
        B, T = k_new.shape[:2]
        on_device = isinstance(cache_seqlens, torch.Tensor)
        if not on_device and (cache_seqlens < 0 or cache_seqlens + T > self.max_seq):
            raise ValueError(
                f"cache overflow: positions [{cache_seqlens}, {cache_seqlens + T}) do not fit max_seq={self.max_seq}"
            )
        if B > self.max_batch:
            raise ValueError(f"batch {B} exceeds the cache's max_batch={self.max_batch}")
        if (v_new is None) != self.joint:
            raise ValueError(f"v_new must be {'None' if self.joint else 'given'} for this cache")
        if on_device:  # (B, T) slots: each row from its own start
            rows = torch.arange(B, device=k_new.device)[:, None]  # (B, 1)
            slots = (rows, cache_seqlens.expand(B)[:, None] + torch.arange(T, device=k_new.device))
        else:
            slots = (slice(0, B), slice(cache_seqlens, cache_seqlens + T))
        for name, new, buf, scale_buf in (("k_new", k_new, self.k, self.k_scales),
                                          ("v_new", v_new, self.v, self.v_scales)):
            if new is None:
                continue
            if self.quantized:  # fp8 values and their scales, written side by side
                if new.device != buf.device:
                    raise ValueError(f"{name} is on {new.device}, the cache on {buf.device}")
                new, scale_buf[slots] = quantize_fp8(new)  # (B, T, g, dim), (B, T, g)
            if new.dtype != buf.dtype or new.device != buf.device:
                raise ValueError(
                    f"{name} is {new.dtype} on {new.device}, the cache holds {buf.dtype} on {buf.device}"
                )
            expected = (B, T, buf.shape[2], buf.shape[3])
            if tuple(new.shape) != expected:
                raise ValueError(f"{name} must be {expected}, got {tuple(new.shape)}")
            buf[slots] = new

    def latents(self, batch, length=None):
        """(k, v): views (batch, length, n_groups, dim) of rows 0 .. batch - 1 and positions
        0 .. length - 1 (length None: all max_seq), v None when joint; for an fp8 cache each is
        `QuantizedLatents` of such a view and its (batch, length) scales, as `latent_decode` reads them."""
        end = self.max_seq if length is None else length
        k, v = self.k[:batch, :end], None if self.joint else self.v[:batch, :end]  # (batch, end, g, dim) each
        if not self.quantized:
            return k, v
        k_scale = self.k_scales[:batch, :end]  # (batch, end, g)
        v_scale = None if self.joint else self.v_scales[:batch, :end]
        return QuantizedLatents(k, k_scale), None if self.joint else QuantizedLatents(v, v_scale)
