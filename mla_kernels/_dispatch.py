"""What every op of this package decides the same way.

Where an op runs (`on_kernel_device`), how its tensor arguments are checked (`check_tensors`,
`check_dtypes`, `check_ndim`), how autocast reaches it (`autocast_inputs`), and which path a
call takes (`traced_or_eager`: the registered op while torch.compile traces, the launcher
itself otherwise), whether an autotuned kernel times its tile candidates (`tuned_candidates`) and
how the decode step's kernels time them (`replayed_timing`).
The kernel files keep their own shape rules and their kernels.
"""
import os

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting():
    """True when TRITON_INTERPRET=1: kernels run on CPU tensors through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tuned_candidates(configs):
    """The tile candidates an autotuned kernel compiles and times for a new shape: all of them, or
    only the first when MLA_KERNELS_AUTOTUNE=0 (one compile instead of one per candidate, for
    runs where many shapes come once, as in the GPU tests) or inside a CUDA-graph capture (fewer
    timing launches captured; Triton still times a lone candidate once, so callers warm each
    shape up before capturing). Triton keys its on-disk autotune cache by the candidates it was
    given, so such a choice is never read back as a searched one by a later process; within a
    process the first choice for a shape stays."""
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    searching = os.environ.get("MLA_KERNELS_AUTOTUNE", "1") != "0" and not capturing
    return configs if searching else configs[:1]


TUNING_REP_MS = 20  # milliseconds of replays per candidate (do_bench_cudagraph's default)


def replayed_timing(kernel_call, quantiles):
    """An autotuner's timer (`triton.autotune(do_bench=replayed_timing)`): the quantiles, in ms, of
    kernel_call replayed from a CUDA graph. Plain `do_bench` times each launch between events, so a
    kernel of a few tens of microseconds whose launch takes as long on the host is timed as host
    time, and the search picks by noise (docs/decisions.md). Inside a CUDA-graph capture the one
    candidate left (`tuned_candidates`) needs no timing and gets none."""
    if torch.cuda.is_current_stream_capturing():
        return [0.0] * len(quantiles)
    import triton.testing

    return triton.testing.do_bench_cudagraph(kernel_call, rep=TUNING_REP_MS, quantiles=quantiles)


def on_kernel_device(t):
    """True where the Triton kernels can run for t: a CUDA tensor, or a CPU one under the
    interpreter. Elsewhere each op runs its reference from `mla_kernels.reference`."""
    return t.device.type == "cuda" or (t.device.type == "cpu" and interpreting())


def check_tensors(**named):
    """Each argument is a torch.Tensor, all on the first one's device."""
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    first_name, first = next(iter(named.items()))
    for name, t in named.items():
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}: all must share a device")


def check_dtypes(allowed=KERNEL_DTYPES, **named):
    """The first argument's dtype is one of `allowed`, and every other argument has it too."""
    first_name, first = next(iter(named.items()))
    if first.dtype not in allowed:
        raise TypeError(f"{first_name} dtype {first.dtype} not supported; allowed {allowed}")
    for name, t in named.items():
        if t.dtype != first.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from {first_name} dtype {first.dtype}")


def check_ndim(name, t, layout):
    """t has as many dims as `layout` names, e.g. layout "(B, T, nh, D)"."""
    if t.dim() != layout.count(",") + 1:
        raise ValueError(f"{name} must have {layout.count(',') + 1} dims {layout}, got shape {tuple(t.shape)}")


def check_fp8_scales(k_cache, v_cache, k_scale, v_scale):
    """A float8_e4m3fn cache comes with float32 scales, one per (row, position, group), shaped like
    k_cache's first three dims; a 16/32-bit cache with none. v_cache None or 0 wide: a joint latent,
    whose values share k_scale (no v_scale)."""
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    joint = v_cache is None or v_cache.shape[-1] == 0
    if v_cache is not None and (v_cache.dtype == torch.float8_e4m3fn) != fp8:
        raise TypeError(f"k_cache is {k_cache.dtype} and v_cache {v_cache.dtype}: both fp8 or neither")
    if joint and v_scale is not None:
        raise ValueError("v_scale goes with a value cache; a joint latent's values share k_scale")
    shape = tuple(k_cache.shape[:3])
    for name, scale in {"k_scale": k_scale, **({} if joint else {"v_scale": v_scale})}.items():
        if not fp8:
            if scale is not None:
                raise ValueError(f"{name} is only for an fp8 cache; this one is {k_cache.dtype}")
            continue
        if not isinstance(scale, torch.Tensor):
            raise TypeError(f"an fp8 cache needs {name}, a float32 tensor of shape {shape}; got {type(scale).__name__}")
        if tuple(scale.shape) != shape or scale.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 of shape {shape}, got {scale.dtype} {tuple(scale.shape)}")
        if scale.device != k_cache.device:
            raise ValueError(f"{name} is on {scale.device} but k_cache is on {k_cache.device}")


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


def traced_or_eager(op, eager):
    """`op` (the registered torch.library op) while torch.compile traces, so the graph holds
    it whole; `eager` (the launcher) otherwise, skipping the dispatcher's cost (~0.15 ms a call
    on the H200, launch_overhead_h200.json), paid per layer and token."""
    return op if torch.compiler.is_compiling() else eager
