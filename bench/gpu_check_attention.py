"""bf16 correctness of the attention kernels on the GPU, against the float64 reference.

    MLA_ATTENTION_AUTOTUNE=0 python bench/gpu_check_attention.py --out bench/results/attention_check.json

For each shape: our kernel's error and PyTorch's own bf16 error (SDPA on bf16 inputs; for the
fused-expansion path, the plain-PyTorch expansion followed by SDPA) against the float64
reference on the same bf16 inputs, for out and every gradient. Error = ||x - ref|| / ||ref||.
A shape passes when each of ours is <= 2x PyTorch's + 1e-4 (the additive term covers
outputs where PyTorch's error is near zero). Exit status 1 if any shape fails.
"""
import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mla_kernels import reference  # noqa: E402
from mla_kernels.attention import flash_attention, mla_attention_expanded  # noqa: E402

ERR_FACTOR, ERR_FLOOR = 2.0, 1e-4

# (B, T, nh, g, Dqk, Dv)
CORE_SHAPES = [(2, 1000, 12, 12, 64, 64), (1, 4096, 12, 12, 32, 32), (1, 8192, 12, 12, 64, 64),
               (1, 8192, 16, 2, 32, 32), (2, 2047, 12, 4, 48, 48), (1, 4096, 12, 1, 128, 128),
               (1, 1500, 8, 8, 96, 96), (1, 2048, 8, 8, 192, 192), (4, 513, 12, 12, 16, 16)]
# (B, T, nh, g, hs, r)
EXPANDED_SHAPES = [(1, 4096, 12, 12, 64, 96), (2, 1023, 12, 3, 32, 96), (1, 8192, 12, 12, 64, 192)]


def _rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def _grads(fn, inputs, dout):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return [out.detach()] + [x.grad for x in leaves]


def _sdpa(q, k, v):
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, enable_gqa=k.shape[2] != q.shape[2])
    return o.transpose(1, 2)


def check(kind, shape, ours, torch_bf16, ref64, inputs, names, out_shape):
    dout = torch.randn(out_shape, device=inputs[0].device)
    res_ours = _grads(ours, inputs, dout)
    res_torch = _grads(torch_bf16, inputs, dout)
    res_ref = _grads(ref64, [x.double() for x in inputs], dout.double())
    row = dict(kind=kind, shape=shape, passed=True)
    for name, a, b, r in zip(("out",) + names, res_ours, res_torch, res_ref):
        e_ours, e_torch = _rel(a, r), _rel(b, r)
        ok = math.isfinite(e_ours) and e_ours <= ERR_FACTOR * e_torch + ERR_FLOOR
        row[name] = dict(ours=e_ours, torch=e_torch, ok=ok)
        row["passed"] &= ok
    del res_ours, res_torch, res_ref
    torch.cuda.empty_cache()
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join("bench", "results", "attention_check.json"))
    p.add_argument("--max-t", type=int, default=8192)
    args = p.parse_args()
    dev, bf = "cuda", torch.bfloat16
    torch.manual_seed(0)
    rows = []
    for B, T, nh, g, dqk, dv in CORE_SHAPES:
        if T > args.max_t:
            continue
        q = torch.randn(B, T, nh, dqk, device=dev, dtype=bf)
        k = torch.randn(B, T, g, dqk, device=dev, dtype=bf)
        v = torch.randn(B, T, g, dv, device=dev, dtype=bf)
        rows.append(check("core", [B, T, nh, g, dqk, dv], flash_attention, _sdpa,
                          lambda q, k, v: reference.attention_ref(q, k, v)[0], [q, k, v], ("dq", "dk", "dv"), (B, T, nh, dv)))
        print(json.dumps(rows[-1]), flush=True)
    for B, T, nh, g, hs, r in EXPANDED_SHAPES:
        if T > args.max_t:
            continue
        q = torch.randn(B, T, nh, hs, device=dev, dtype=bf)
        c_k = torch.randn(B, T, g, r, device=dev, dtype=bf)
        c_v = torch.randn(B, T, g, r, device=dev, dtype=bf)
        w_uk = (torch.randn(nh, r, hs, device=dev) / math.sqrt(r)).to(bf)
        w_uv = (torch.randn(nh, r, hs, device=dev) / math.sqrt(r)).to(bf)

        def torch_path(q, c_k, c_v, w_uk, w_uv):
            return _sdpa(q, reference.expand_latent(c_k, w_uk), reference.expand_latent(c_v, w_uv))

        rows.append(check("expanded", [B, T, nh, g, hs, r], mla_attention_expanded, torch_path,
                          lambda *a: reference.mla_attention_expanded_ref(*a)[0],
                          [q, c_k, c_v, w_uk, w_uv], ("dq", "dc_k", "dc_v", "dw_uk", "dw_uv"), (B, T, nh, hs)))
        print(json.dumps(rows[-1]), flush=True)
    import triton

    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                criterion=f"rel err <= {ERR_FACTOR} x torch bf16 rel err + {ERR_FLOOR}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    failed = [r["shape"] for r in rows if not r["passed"]]
    print(f"{len(rows) - len(failed)} of {len(rows)} shapes pass; failed: {failed}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
