"""The FLOP model of MLA's three forms: the rule `plan.choose` falls back to where no table measured
the layer (docs/design.md, section 2)."""

# Roughly bf16 matrix FLOP/s over memory bytes/s on an H200 (~790 TFLOP/s / ~4.3 TB/s):
# the cost model charges one byte moved as this many FLOPs.
FLOPS_PER_BYTE = 200
# Query rows that share one on-chip expansion of a K/V tile: the fused kernel's query tile (BLOCK_M).
EXPANSION_ROWS_PER_TILE = 64
ACTIVATION_BYTES = 2  # bf16 activations


def mla_form_costs(seq_len, n_embd, n_head, latent_dim, value_dim):
    """Cost per token of one MLA forward in each form, in FLOP-equivalents.

    absorbed: composed query (C -> nh r) and output (nh rv -> C) projections, attention over the
      latents at head dims r and rv.
    expanded: full q and output projections, attention at head size hs, plus the expansion of
      each K/V tile once per EXPANSION_ROWS_PER_TILE query rows (the fused kernel's recompute).
    materialized: full q and output projections, K and V expanded once (two GEMMs, written to
      memory and read back), attention at head size hs.
    Bytes: the per-head activations each form writes and reads back. Causal attention sees
    seq_len / 2 keys per query on average. The latent projection is the same in all forms and
    left out.
    """
    C, nh, r, rv = n_embd, n_head, latent_dim, value_dim
    hs = C // nh
    keys = seq_len / 2
    absorbed_flops = 2 * C * nh * r + 2 * nh * (r + rv) * keys + 2 * nh * rv * C
    full_flops = 4 * C * C + 4 * nh * hs * keys
    expansion_flops = 2 * nh * hs * (r + rv)
    return {
        "absorbed": absorbed_flops + FLOPS_PER_BYTE * 2 * nh * (r + rv) * ACTIVATION_BYTES,
        "expanded": full_flops + expansion_flops * keys / EXPANSION_ROWS_PER_TILE
        + FLOPS_PER_BYTE * 4 * C * ACTIVATION_BYTES,
        "materialized": full_flops + expansion_flops + FLOPS_PER_BYTE * 8 * C * ACTIVATION_BYTES,
    }
