"""The cost model that picks MLA's form per sequence length (docs/design.md, section 2)."""

# Roughly bf16 matrix FLOP/s over memory bytes/s on an H200 (~790 TFLOP/s / ~4.3 TB/s):
# the cost model charges one byte moved as this many FLOPs.
FLOPS_PER_BYTE = 200
# Query rows that share one on-chip expansion of a K/V tile in the fused-expansion kernel.
EXPANSION_ROWS_PER_TILE = 128
ACTIVATION_BYTES = 2  # bf16 activations


def mla_path_costs(seq_len, n_embd, n_head, latent_dim, value_dim):
    """Cost per token of one MLA forward in each form, in FLOP-equivalents (docs/design.md, section 2).

    absorbed: composed query (C -> nh r) and output (nh rv -> C) projections, attention
      over the latents at head dims r and rv.
    expanded: full q and output projections, attention at head size hs, plus the expansion
      of each K/V tile once per EXPANSION_ROWS_PER_TILE query rows (fused kernel).
    Bytes: the per-head activations each form writes and reads back (q and o).
    Causal attention sees seq_len / 2 keys per query on average. The latent projection is
    the same in both forms and left out.
    """
    C, nh, r, rv = n_embd, n_head, latent_dim, value_dim
    hs = C // nh
    keys = seq_len / 2
    absorbed_flops = 2 * C * nh * r + 2 * nh * (r + rv) * keys + 2 * nh * rv * C
    expansion_flops = 2 * nh * hs * (r + rv) * keys / EXPANSION_ROWS_PER_TILE
    expanded_flops = 4 * C * C + 4 * nh * hs * keys + expansion_flops
    absorbed_bytes = 2 * nh * (r + rv) * ACTIVATION_BYTES
    expanded_bytes = 4 * C * ACTIVATION_BYTES
    return {
        "absorbed": absorbed_flops + FLOPS_PER_BYTE * absorbed_bytes,
        "expanded": expanded_flops + FLOPS_PER_BYTE * expanded_bytes,
    }
