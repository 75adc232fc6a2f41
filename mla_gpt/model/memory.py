"""KV cache bytes of an attention layer, against standard attention's."""
import torch


class KVCacheReport:
    """KV cache bytes of an attention layer against standard attention's 2 C per token.

    The layer provides n_embd, n_head and make_cache(); the bytes are those of the cache it
    makes (an fp8 cache's scales included), counted on the meta device.
    """

    def get_memory_savings(self, sequence_length=1024, batch_size=1):
        """KV cache bytes of the standard layer over this layer's, for one layer and dtype."""
        report = self.memory_report(sequence_length=sequence_length, batch_size=batch_size)
        return report["standard_bytes_per_layer"] / report["mla_bytes_per_layer"]

    def memory_report(self, sequence_length=1024, batch_size=1, n_layer=1, dtype=torch.bfloat16):
        """KV cache bytes, standard attention vs this layer, per token, per layer and per sequence.

        Per layer: batch_size sequences of sequence_length tokens in one layer.
        Per sequence: one sequence of sequence_length tokens through n_layer layers.
        Under svd 'activation' generation keeps no cache; the figures are what a cache of this
        layer would hold. The `mla_` keys are this layer's, MLA or not. dtype=torch.float8_e4m3fn
        counts one float32 scale per position and group (standard attention: per head) too.
        """
        for name, value in (("sequence_length", sequence_length), ("batch_size", batch_size),
                            ("n_layer", n_layer)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        elem = torch.empty((), dtype=dtype).element_size()
        cache = self.make_cache(1, 1, dtype, "meta")
        scale_bytes = torch.finfo(torch.float32).bits // 8 if cache.quantized else 0
        standard_token = 2 * self.n_embd * elem + 2 * self.n_head * scale_bytes  # K and V of every head
        mla_token = cache.bytes_per_token
        return {
            "dtype": str(dtype).replace("torch.", ""),
            "sequence_length": sequence_length,
            "batch_size": batch_size,
            "n_layer": n_layer,
            "standard_bytes_per_token": standard_token,
            "mla_bytes_per_token": mla_token,
            "standard_bytes_per_layer": standard_token * sequence_length * batch_size,
            "mla_bytes_per_layer": mla_token * sequence_length * batch_size,
            "standard_bytes_per_sequence": standard_token * sequence_length * n_layer,
            "mla_bytes_per_sequence": mla_token * sequence_length * n_layer,
            "savings": standard_token / mla_token,
        }
