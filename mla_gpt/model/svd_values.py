"""SVD of the attention values: a rank-k basis of the value maps (svd 'weight'), or each
sequence's values cut to rank k (svd 'activation', the original design's). docs/design.md,
section 4, says why 'weight' is the default."""
import functools

import torch

from mla_gpt.model.core import resolve_backend
from mla_kernels import reference as ref
from mla_kernels import svd

OVERSAMPLE = 8  # extra sketch columns of the randomized SVD (mla_kernels.svd's default)


@functools.cache
def _test_matrix(n, sketch, device):
    """The Gaussian test matrix (n, sketch) float32 for `device`, drawn once from seed 0: every basis
    update uses the same one, so a forward is reproducible and a CUDA graph can replay it."""
    generator = torch.Generator(device=device).manual_seed(0)
    return torch.randn(n, sketch, generator=generator, device=device, dtype=torch.float32)


def capturable_svd(rank, m, n):
    """Whether the kernels' SVD of (m, n) matrices at `rank` records into a CUDA graph (sketch <= 64)."""
    return svd.sketch_width(rank, OVERSAMPLE, m, n) <= svd.MAX_CAPTURABLE_SKETCH


def svd_capture_blocker(config):
    """Why a CUDA graph cannot hold the SVD of a model with this GPTConfig, or None.

    The basis update (svd 'weight': value maps (r, nh/g * hs) under MLA, (hs, C) per head in
    standard attention) and the per-sequence SVD (svd 'activation': (hs, T)) record into a graph
    when their sketch is at most 64 columns; wider ones factor through torch.linalg, which waits
    on the host.
    """
    if not config.use_svd:
        return None
    if config.svd_mode == "activation":
        m = n = config.head_size  # (hs, T): the sketch is at most hs wide, however long T is
        rank = config.svd_rank or config.head_size
    elif config.use_mla:
        m, n = config.latent_dim, config.n_head // config.kv_groups * config.head_size
        rank = config.svd_rank or config.latent_dim
    else:
        m, n = config.head_size, config.n_embd
        rank = config.svd_rank or config.head_size
    if capturable_svd(rank, m, n):
        return None
    return (f"svd_rank={rank} needs a randomized-SVD sketch of {svd.sketch_width(rank, OVERSAMPLE, m, n)} columns; "
            f"up to {svd.MAX_CAPTURABLE_SKETCH} factor in a kernel a CUDA graph can hold (svd_rank <= "
            f"{svd.MAX_CAPTURABLE_SKETCH - OVERSAMPLE})")


@torch.compiler.disable  # the randomized SVD's kernels and small factorizations run outside compiled graphs
def _top_left_singular_vectors(matrices, rank, kernels):
    """(..., m, n) -> the top-`rank` left singular vectors (..., m, rank), by randomized SVD.

    No gradient flows through them; the test matrix is fixed, so a forward is reproducible. On
    the kernels and a sketch of at most 64 columns nothing waits on the host, so a CUDA graph
    of the training step can hold the update.
    """
    m, n = matrices.shape[-2:]
    if kernels:
        omega = _test_matrix(n, svd.sketch_width(rank, OVERSAMPLE, m, n), matrices.device)
        # weights and activations are finite while the loss is (the trainer stops on a NaN loss)
        return svd.top_left_singular_vectors(matrices.detach(), rank, OVERSAMPLE, omega=omega, check_finite=False,
                                             capturable=capturable_svd(rank, m, n))
    generator = torch.Generator(device=matrices.device).manual_seed(0)
    return ref.randomized_svd_ref(matrices.detach(), rank, OVERSAMPLE, generator=generator)[0]


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
        """Top-k left singular vectors of each value map: (groups, dim, k), no gradient. In the
        maps' own dtype whatever autocast says: PyTorch's QR (the path off the kernels) takes no
        bfloat16, and a basis is a property of the weights, not of the activations' precision."""
        maps = self._value_maps()
        kernels = resolve_backend(self.backend, maps) == "triton"
        with torch.autocast(maps.device.type, enabled=False):
            return _top_left_singular_vectors(maps, self.svd_rank, kernels).to(self._value_source().dtype)

    def _value_basis(self):
        """The projector basis U_k (groups, dim, k): follows the weights while training, frozen in eval."""
        if self.training:
            self._refresh_value_basis()
        return self.value_basis
