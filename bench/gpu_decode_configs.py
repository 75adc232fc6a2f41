"""Run the decode kernel with each autotuner config pinned, one process per config (GPU only).

    PYTHONPATH=. python bench/gpu_decode_configs.py [--out results.json]

Why: an H200 run crashed with an illegal memory access while the split kernel's tiles were
being tuned at (B 16, L 32k); the autotuner times every config on the first shape of a key, so
one bad config poisons the CUDA context for everything after it. Each config runs here in its
own process (a crash cannot spread), with CUDA_LAUNCH_BLOCKING=1, on the shapes of
bench/decode.py, and its output is compared with the float32 reference.
"""
import argparse
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

CASES = [  # (B, L, g, r, joint, num_splits)
    (16, 32768, 12, 32, False, 1),
    (16, 32768, 12, 32, False, 2),
    (64, 4096, 12, 32, False, 2),
    (16, 32768, 1, 256, True, 16),
    (64, 4096, 1, 256, True, 4),
]
NH, HS = 12, 64
PARALLEL = 4  # processes sharing the GPU at a time


def run_config(index):
    """In a child process: every case with config `index` pinned; prints one JSON line per case."""
    import torch

    from mla_kernels import decode as dec
    from mla_kernels.reference import latent_decode_ref

    config = dec._PARTIAL_CONFIGS[index]

    class Pinned:  # stands in for the autotuned kernel: launches with this one config
        def __getitem__(self, grid):
            def launch(*args, **meta):
                dec._decode_partial_kernel[grid](*args, **meta, **config.kwargs, num_warps=config.num_warps,
                                                 num_stages=config.num_stages)
            return launch

    dec._decode_partial_tuned = Pinned()
    for B, L, g, r, joint, splits in CASES:
        elt = 2
        row = B * L * g * (r if joint else 2 * r) * elt
        fits = config.num_stages * config.kwargs["BLOCK_N"] * (r if joint else 2 * r) * elt <= dec.SMEM_BUDGET
        case = dict(config=str(config), B=B, L=L, g=g, r=r, joint=joint, splits=splits, cache_bytes=row)
        if not fits:
            print(json.dumps({**case, "result": "pruned (shared memory)"}), flush=True)
            continue
        torch.manual_seed(0)
        ck = torch.randn(B, g, L, r, device="cuda", dtype=torch.bfloat16).transpose(1, 2)  # (B, L, g, r) group-major
        cv = None if joint else torch.randn(B, g, L, r, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        q = torch.randn(B, 1, NH, r, device="cuda", dtype=torch.bfloat16)
        lens = torch.full((B,), L, device="cuda", dtype=torch.int32)
        try:
            out, _ = dec.latent_decode(q, ck, cv, lens, 1 / math.sqrt(HS), num_splits=splits)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - the failure is the result
            print(json.dumps({**case, "result": f"error: {str(e).splitlines()[0][:160]}"}), flush=True)
            return
        ref, _ = latent_decode_ref(q[:2], ck[:2], None if cv is None else cv[:2], lens[:2], 1 / math.sqrt(HS))
        err = ((out[:2].float() - ref.float()).norm() / ref.float().norm()).item()
        print(json.dumps({**case, "result": "ok" if err < 1e-2 else "wrong", "rel_err_rows_0_1": err}), flush=True)
        del ck, cv, q
        torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return run_config(args.child)
    from mla_kernels import decode as dec

    env = {**os.environ, "CUDA_LAUNCH_BLOCKING": "1"}

    def child(index):
        proc = subprocess.run([sys.executable, __file__, "--child", str(index)], env=env, capture_output=True,
                              text=True, timeout=240)
        rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1][:200]
            rows.append(dict(config=str(dec._PARTIAL_CONFIGS[index]), result=f"process exit {proc.returncode}: {tail}"))
        return rows

    with ThreadPoolExecutor(PARALLEL) as pool:
        results = [row for rows in pool.map(child, range(len(dec._PARTIAL_CONFIGS))) for row in rows]
    for row in results:
        shape = f"B{row['B']} L{row['L']} g{row['g']} r{row['r']} S{row['splits']}" if "B" in row else ""
        print(f"{row['config']:60s} {shape:28s} {row['result']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
