"""What the Triton kernels of this package share: where they run and how they pad tiles."""
import os

import torch

LOG2E = 1.4426950408889634  # log2(e): softmax in base 2, exp(x) = exp2(x * LOG2E)
MIN_TILE_DIM = 16  # tl.dot needs >= 16 along K: narrower dims are padded and masked
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting():
    """True when TRITON_INTERPRET=1: kernels run on CPU tensors through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tile_dim(d):
    """d padded to the power of two a kernel tiles it with, at least MIN_TILE_DIM."""
    return max(MIN_TILE_DIM, 1 << (d - 1).bit_length())
