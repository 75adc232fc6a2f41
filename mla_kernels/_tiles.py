"""What the Triton kernels of this package share: where they run, how they pad tiles, autocast."""
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


def autocast_inputs(*tensors):
    """The tensors as a matmul-like op sees them under autocast on their device.

    Inside `torch.autocast(device_type, dtype)`, PyTorch's own attention and matmul cast every
    floating input except float64 to `dtype`; the kernels' entry points do the same, so a
    float32 weight meets a bfloat16 activation as it would in `F.linear`. The casts are
    differentiable: gradients reach float32 parameters in float32. Outside autocast the
    tensors are returned unchanged.
    """
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors)
