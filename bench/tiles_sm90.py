"""Shared memory of every attention tile candidate, compiled for Hopper (sm_90) on any machine.

    python bench/tiles_sm90.py [--head_dims 64 128 256] [--out PATH.json]

Triton compiles the training attention kernels (`mla_kernels.attention`: the forward, with and
without the fused expansion, dK/dV and dQ) for sm_90 without a GPU, with its bundled ptxas,
specialized as its JIT would be at a shape whose strides and lengths are multiples of 16 and one
query head per KV head (what the bf16 GPU tests run: there the loads are pipelined through shared
memory in `num_stages` buffers, the widest case). For each padded head dim and candidate: the
shared memory a program needs, whether the prune hook keeps the candidate at that head dim, and
whether it fits an H200 (227 KB per program). A candidate that is
kept but does not fit fails at launch with OutOfResources; the script exits with status 1 if there
is one. No timing: that needs the GPU (`bench/tiles.py`).
"""
import argparse
import os
import sys

import harness  # first: it puts the repository root on sys.path
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mla_kernels.attention import kernels, op

TARGET = GPUTarget("cuda", 90, 32)
MAX_SHARED_BYTES = 227 * 1024  # an H200's (sm_90) shared memory per thread block, opted in
POINTERS = {"lse_ptr": "*fp32", "delta_ptr": "*fp32"}  # the others are bf16 tensors
FLOATS = {"qk_scale", "sm_scale"}
INTEGERS = {"Tq", "Tk", "NH", "G", "REP", "SPLITS", "TQ_BUCKET", "TK_BUCKET", "q_offset"}
EQUAL_TO_ONE = {"REP"}  # one query head per KV head: the JIT makes it a constant
BF16_BYTES = 2


def kernel_cases(padded_dim):
    """(name, kernel, its constexprs) at one padded head dim. The expanded forward's latents are
    that wide and its heads as wide as MAX_RESIDENT_WEIGHT_BYTES allows (at most 256), the widest
    expansion that runs fused."""
    dims = dict(DQ=padded_dim, DV=padded_dim, DQ_P=padded_dim, DV_P=padded_dim, PREC="tf32")
    core_fwd = dict(dims, DO=padded_dim, DO_P=padded_dim, DK_IN=padded_dim, DV_IN=padded_dim,
                    DK_P=padded_dim, EXPAND=False)
    head = min(op.MAX_HEAD_DIM, op.MAX_RESIDENT_WEIGHT_BYTES // (2 * padded_dim * BF16_BYTES))
    expand_fwd = dict(core_fwd, DQ=head, DQ_P=head, DO=head, DO_P=head, EXPAND=True)
    return [("fwd", kernels._fwd_kernel, core_fwd), ("fwd-expand", kernels._fwd_kernel, expand_fwd),
            ("dkdv", kernels._bwd_dkdv_kernel, dims), ("dq", kernels._bwd_dq_kernel, dims)]


def compile_sm90(kernel, constexprs, config):
    """The autotuned kernel's JIT function compiled for TARGET with one candidate's tile."""
    fn = kernel.fn
    constexprs = {**constexprs, **config.kwargs}
    signature, attrs, constants = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr or name in EQUAL_TO_ONE:
            signature[name] = "constexpr"
            constants[name] = constexprs.get(name, 1)
        elif name in FLOATS:
            signature[name] = "fp32"
        elif name in INTEGERS or name.startswith("s"):  # lengths, counts and strides
            signature[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = POINTERS.get(name, "*bf16")
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=TARGET, options=dict(num_warps=config.num_warps, num_stages=config.num_stages))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--head_dims", nargs="+", type=int, default=[32, 64, 128, 256],
                   help="padded head dims (powers of two, at most 256)")
    harness.add_out_argument(p, "tiles_sm90")
    args = p.parse_args()
    os.environ["MLA_KERNELS_AUTOTUNE"] = "1"  # the prune hook's full choice, as the autotuner sees it
    rows = []
    for padded_dim in args.head_dims:
        for name, kernel, constexprs in kernel_cases(padded_dim):
            configs = kernels.gpu_configs(name.split("-")[0])
            kept = kernels._prune(configs, {}, **constexprs)
            for config in configs:
                shared = compile_sm90(kernel, constexprs, config).metadata.shared
                rows.append(dict(provider=name, head_dim=padded_dim, BLOCK_M=config.kwargs["BLOCK_M"],
                                 BLOCK_N=config.kwargs["BLOCK_N"], num_warps=config.num_warps,
                                 num_stages=config.num_stages, shared_bytes=shared,
                                 kept=config in kept, fits=shared <= MAX_SHARED_BYTES))
                r = rows[-1]
                verdict = ("kept" if r["kept"] else "dropped") + ("" if r["fits"] else ", does not fit")
                print(f"d {padded_dim:3d} {name:10s} {r['BLOCK_M']:3d}x{r['BLOCK_N']:<3d} w{r['num_warps']} "
                      f"s{r['num_stages']}: {shared / 1024:5.0f} KB of shared memory: {verdict}", flush=True)
    units = {"shared_bytes": "bytes", "kept": "", "fits": ""}
    harness.write_results(harness.results_path(args.out, "tiles_sm90"),
                          harness.result_rows("tiles_sm90", rows, units, harness.environment()))
    too_big = [r for r in rows if r["kept"] and not r["fits"]]
    if too_big:
        print(f"{len(too_big)} kept candidates do not fit {MAX_SHARED_BYTES} bytes of shared memory", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
