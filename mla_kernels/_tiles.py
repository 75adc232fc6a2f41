"""How the Triton kernels of this package size their tiles and grids and scale their softmax."""
import torch

LOG2E = 1.4426950408889634  # log2(e): softmax in base 2, exp(x) = exp2(x * LOG2E)
MIN_TILE_DIM = 16  # tl.dot needs >= 16 along K: narrower dims are padded and masked


def tile_dim(d):
    """d padded to the power of two a kernel tiles it with, at least MIN_TILE_DIM."""
    return max(MIN_TILE_DIM, 1 << (d - 1).bit_length())


def num_sms(device):
    """Multiprocessors of a CUDA device; on the CPU (the interpreter) the H200's 132, so interpreter
    runs choose the grids the GPU would."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132
