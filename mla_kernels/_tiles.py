"""How the Triton kernels of this package size their tiles and scale their softmax."""

LOG2E = 1.4426950408889634  # log2(e): softmax in base 2, exp(x) = exp2(x * LOG2E)
MIN_TILE_DIM = 16  # tl.dot needs >= 16 along K: narrower dims are padded and masked


def tile_dim(d):
    """d padded to the power of two a kernel tiles it with, at least MIN_TILE_DIM."""
    return max(MIN_TILE_DIM, 1 << (d - 1).bit_length())
