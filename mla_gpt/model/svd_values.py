"""SVD of the attention values: a rank-k basis of the value maps (svd 'weight'), or each
sequence's values cut to rank k (svd 'activation', the original design's). docs/design.md,
section 5, says why 'weight' is the default."""
import torch

from mla_gpt.model.core import resolve_backend
from mla_kernels import reference as ref


@torch.compiler.disable  # the randomized SVD syncs with the host: it runs outside compiled graphs
def _top_left_singular_vectors(matrices, rank, kernels):
    """(..., m, n) -> the top-`rank` left singular vectors (..., m, rank), by randomized SVD.

    No gradient flows through them; the test matrix is seeded, so a forward is reproducible.
    """
    generator = torch.Generator(device=matrices.device).manual_seed(0)
    if kernels:
        from mla_kernels import svd

        # weights and activations are finite while the loss is (the trainer stops on a NaN loss)
        return svd.top_left_singular_vectors(matrices.detach(), rank, generator=generator, check_finite=False)
    return ref.randomized_svd_ref(matrices.detach(), rank, generator=generator)[0]


def low_rank_per_sequence(v, rank, kernels):
    """The original design's SVD of the values: each sequence's V (T, hs) per head cut to rank `rank`.

    v: (B, T, nh, hs) -> (B, T, nh, hs). Not causal: the projector comes from all T positions.
    V_low = V V_k V_k^T with the top right singular vectors V_k (hs, k) detached, so gradients
    flow through V only.
    """
    T, hs = v.shape[1], v.shape[3]
    if rank >= min(T, hs):
        return v
    per_head = v.transpose(1, 2)  # (B, nh, T, hs)
    right = _top_left_singular_vectors(per_head.transpose(-1, -2), rank, kernels).to(v.dtype)  # (B, nh, hs, k)
    per_head = (per_head @ right) @ right.transpose(-1, -2)  # (B, nh, T, hs)
    return per_head.transpose(1, 2)


class WeightSVDValues:
    """svd_mode='weight' for an attention layer: a rank-k basis of its value maps.

    U_k (groups, dim, k) holds the top-k left singular vectors of each group's value map
    (dim, n) from `_value_maps()`; values are stored and attended as z = v U_k (k numbers instead
    of dim), which is causal and cacheable, and mapped back by U_k^T after attention. The basis
    follows the weights while training (recomputed when `_value_source()` changed, no gradient
    through it) and is frozen in eval; it lives in the buffer `value_basis`, so checkpoints
    carry it.
    """

    def _init_value_basis(self, groups, dim, rank):
        self.register_buffer("value_basis", torch.zeros(groups, dim, rank))  # (groups, dim, k)
        self._basis_stamp = None  # (storage, version) of the source parameter the basis came from

    def train(self, mode=True):
        """Entering eval freezes the value basis from the current weights (svd 'weight'), always
        recomputed: weights updated by a replayed CUDA graph keep their version counters."""
        super().train(mode)
        if not mode and self.svd_mode == "weight":
            self._refresh_value_basis(always=True)
        return self

    @torch.compiler.disable  # reads parameter versions; the randomized SVD runs outside graphs
    def _refresh_value_basis(self, always=False):
        """Recompute the basis into its buffer if the source weights changed since the last time.

        A parameter's version counter moves with every eager in-place update (optimizer steps,
        load_state_dict), so micro-steps of one accumulated step share one SVD.
        """
        weight = self._value_source()
        stamp = (weight.data_ptr(), weight._version)
        if always or stamp != self._basis_stamp:
            with torch.no_grad():
                self.value_basis.copy_(self._compute_value_basis())
            self._basis_stamp = stamp

    def _compute_value_basis(self):
        """Top-k left singular vectors of each value map: (groups, dim, k), no gradient."""
        maps = self._value_maps()
        kernels = resolve_backend(self.backend, maps) == "triton"
        return _top_left_singular_vectors(maps, self.svd_rank, kernels).to(self._value_source().dtype)

    def _value_basis(self):
        """The projector basis U_k (groups, dim, k): follows the weights while training, frozen in eval."""
        if self.training:
            self._refresh_value_basis()
        return self.value_basis
