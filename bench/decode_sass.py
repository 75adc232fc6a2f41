"""Instructions the decode kernel issues per byte of cache it reads, compiled for Hopper on any machine.

    python bench/decode_sass.py [--out PATH.json]

Triton compiles `mla_kernels.decode._decode_partial_kernel` for sm_90 without a GPU (its bundled
ptxas and cuobjdump), specialized as its JIT would be at the decode benchmark's shapes (B 64,
L 4096, 12 heads, Tq 1: default g 12, r 32; joint g 1, r 256). For each cache dtype (bf16, fp8
with its float32 scales) and each tile candidate the autotuner would time, the SASS of the main
loop (the longest backward branch) is counted: warp instructions per iteration, per byte of
cache that iteration reads, the largest opcode groups, and registers and stack per thread.

Why: a decode step reads every cached byte once, so it runs at copy bandwidth only while each SM
can issue its instructions faster than its share of the bandwidth delivers bytes. An H200 SM
issues 4 warp instructions per cycle; at the measured copy rate (about 4.2 TB/s over 132 SMs at
1.98 GHz, 16 bytes per SM and cycle) that allows ISSUE_BUDGET = 0.25 warp instructions per byte,
less in practice. Kernels above it are bound by issue, not by memory. No timing: that needs the
GPU (`bench/decode.py`).
"""
import argparse
import os
import re
import subprocess
import tempfile
from pathlib import Path

import harness  # first: it puts the repository root on sys.path
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mla_kernels import decode

TARGET = GPUTarget("cuda", 90, 32)
ISSUE_BUDGET = 4 / (4.2e12 / 132 / 1.98e9)  # warp instructions per byte an H200 SM can issue at copy rate
NH, B, L, TQ = 12, 64, 4096, 1
LAYOUTS = {"default": dict(g=12, r=32, joint=False), "joint": dict(g=1, r=256, joint=True)}
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
FP8_SCALE_BYTES = 4
UNITS = {"loop_instructions": "", "warp_instructions_per_byte": "", "registers": "", "stack_bytes": "bytes",
         "top_opcodes": ""}


def argument_values(g, r):
    """The decode kernel's integer arguments at (B, L, NH, TQ) for group-major caches (B, g, L, r)."""
    return dict(stride_qb=TQ * NH * r, stride_qt=NH * r, stride_qh=r,
                stride_kb=g * L * r, stride_kl=r, stride_kg=L * r, stride_vb=g * L * r, stride_vl=r, stride_vg=L * r,
                stride_ksb=g * L, stride_ksl=1, stride_ksg=L, stride_vsb=g * L, stride_vsl=1, stride_vsg=L,
                stride_ob=TQ * NH * r, stride_ot=NH * r, stride_oh=r, stride_os=0,
                stride_lb=NH * TQ, stride_lh=TQ, stride_lt=1, stride_ls=0,
                NH=NH, G=g, TQ=TQ, D_K=r, D_V=r, NUM_SPLITS=1, NUM_M_BLOCKS=1)


def compile_kernel(g, r, joint, scaled, config):
    """The kernel compiled for TARGET, specialized as the JIT would: pointers and integers that are
    multiples of 16 carry that divisibility, integers equal to 1 become constants."""
    constants = dict(HPG=NH // g, BLOCK_M=decode.packed_block_m(NH // g, TQ, r), BLOCK_DK=r, BLOCK_DV=r, JOINT=joint,
                     SPLIT=False, IEEE_DOT=False, SCALED=scaled, **config.kwargs)
    ints = argument_values(g, r)
    pointers = {"Q": "*bf16", "K": "*fp8e4nv" if scaled else "*bf16", "V": "*fp8e4nv" if scaled else "*bf16",
                "KS": "*fp32" if scaled else "*i32", "VS": "*fp32" if scaled else "*i32", "SEQLENS": "*i32",
                "O": "*bf16", "LSE": "*fp32"}
    signature, attrs = {}, {}
    for i, name in enumerate(decode._decode_partial_kernel.arg_names):
        if name in constants or ints.get(name) == 1:
            signature[name] = "constexpr"
            constants.setdefault(name, 1)
        elif name in ints:
            signature[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in pointers:
            signature[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    source = ASTSource(fn=decode._decode_partial_kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=TARGET, options=dict(num_warps=config.num_warps, num_stages=config.num_stages))


def sass_of(compiled, work_dir):
    """(main-loop instructions, {opcode: count}, registers, stack bytes) of a compiled kernel."""
    cubin = Path(work_dir) / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    sass = subprocess.run([CUOBJDUMP, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    usage = subprocess.run([CUOBJDUMP, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    registers, stack = map(int, re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    instructions = [(int(a, 16), text) for a, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loop = []
    for address, text in instructions:  # the main loop: the longest backward branch
        branch = re.search(r"BRA 0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < address:
            body = [t for a, t in instructions if int(branch.group(1), 16) <= a <= address]
            loop = body if len(body) > len(loop) else loop
    opcodes = {}
    for text in loop:
        opcode = re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]
        opcodes[opcode] = opcodes.get(opcode, 0) + 1
    return len(loop), opcodes, registers, stack


def candidates(g, r, joint):
    """The tile candidates the autotuner would time at this shape (its own pruning)."""
    q = torch.empty(0, dtype=torch.bfloat16)
    return decode._prune_configs(decode._PARTIAL_CONFIGS, {"Q": q}, BLOCK_DK=r, BLOCK_DV=r, JOINT=joint,
                                 BLOCK_M=decode.packed_block_m(NH // g, TQ, r))


def report(work_dir):
    rows = []
    for layout, shape in LAYOUTS.items():
        g, r, joint = shape["g"], shape["r"], shape["joint"]
        for cache in ("bf16", "fp8"):
            scaled = cache == "fp8"
            latents = 1 if joint else 2
            bytes_per_position = latents * (r * (1 if scaled else 2) + (FP8_SCALE_BYTES if scaled else 0))
            for config in candidates(g, r, joint):
                n, opcodes, registers, stack = sass_of(compile_kernel(g, r, joint, scaled, config), work_dir)
                block_n = config.kwargs["BLOCK_N"]
                per_byte = n * config.num_warps / (block_n * bytes_per_position)
                top = dict(sorted(opcodes.items(), key=lambda kv: -kv[1])[:6])
                rows.append(dict(provider="ours", layout=layout, cache=cache, block_n=block_n,
                                 num_warps=config.num_warps, num_stages=config.num_stages, loop_instructions=n,
                                 warp_instructions_per_byte=per_byte, registers=registers, stack_bytes=stack,
                                 top_opcodes=top))
                print(f"{layout:8} {cache:5} BLOCK_N {block_n:3} warps {config.num_warps} stages {config.num_stages}: "
                      f"{n:5} per iteration, {per_byte:.3f} per byte ({per_byte / ISSUE_BUDGET:.1f}x the budget), "
                      f"{registers} registers, stack {stack}, {top}", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_out_argument(parser, "decode_sass")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("decode_sass.py compiles for the GPU: run it without TRITON_INTERPRET=1")
    print(f"issue budget at copy rate: {ISSUE_BUDGET:.3f} warp instructions per byte (H200)")
    with tempfile.TemporaryDirectory() as work_dir:
        rows = report(work_dir)
    settings = dict(target=f"{TARGET.backend} sm_{TARGET.arch}", issue_budget=ISSUE_BUDGET)  # gpu: what compiled
    env = harness.environment(torch.bfloat16)
    harness.write_results(harness.results_path(args.out, "decode_sass"),
                          harness.result_rows("decode_sass", rows, UNITS, env, settings))


if __name__ == "__main__":
    main()
