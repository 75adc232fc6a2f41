"""Compare standard attention, MLA at several latent dims and MLA + SVD, on this machine.

    cd examples && python example_mla_usage.py [--n_embd 768 --n_head 12 --seq_len 256 --batch 4]

For each layer: parameters, KV cache bytes per token (bf16), parameter compression and KV
cache savings against standard attention, and forward time (median of a few runs). The last
row is SVD of the values on standard attention (use_mla=False, use_svd=True).
"""
import argparse
import time

import torch

from mla_gpt.model import GPTConfig
from mla_gpt.model.attention import CausalSelfAttention, MultiHeadLatentAttention


def forward_ms(module, x, repeats):
    with torch.no_grad():
        module(x)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            module(x)
            if x.is_cuda:
                torch.cuda.synchronize()
            times.append(1e3 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_embd", type=int, default=768)
    parser.add_argument("--n_head", type=int, default=12)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = dict(n_embd=args.n_embd, n_head=args.n_head, block_size=args.seq_len, bias=False)
    hs = args.n_embd // args.n_head
    variants = [("standard attention", dict())]
    for r in (hs // 4, hs // 2, hs, 3 * hs):
        variants.append((f"MLA r={r}", dict(use_mla=True, mla_latent_dim=r)))
    variants.append((f"MLA r={4 * hs} g=1 joint (DeepSeek-V2)",
                     dict(use_mla=True, mla_latent_dim=4 * hs, mla_kv_groups=1, mla_joint_kv=True)))
    variants.append((f"MLA r={hs // 2} + SVD k={hs // 4} (weight)",
                     dict(use_mla=True, mla_latent_dim=hs // 2, use_svd=True, svd_rank=hs // 4)))
    variants.append((f"MLA r={hs // 2} + SVD k={hs // 4} (activation)",
                     dict(use_mla=True, mla_latent_dim=hs // 2, use_svd=True, svd_rank=hs // 4,
                          svd_mode="activation")))
    # SVD on standard attention, as the original design's example: GPTConfig(use_mla=False, use_svd=True, svd_rank=8)
    variants.append((f"standard + SVD k={hs // 8} (weight)", dict(use_svd=True, svd_rank=hs // 8)))

    x = torch.randn(args.batch, args.seq_len, args.n_embd, device=device)
    header = f"{'layer':<34} {'params':>10} {'KV B/token':>11} {'param ratio':>12} {'KV savings':>11} {'fwd ms':>8}"
    print(f"C={args.n_embd}, nh={args.n_head}, hs={hs}, B={args.batch}, T={args.seq_len}, device={device}")
    print(header)
    print("-" * len(header))
    for name, overrides in variants:
        config = GPTConfig(**base, **overrides)
        module = (MultiHeadLatentAttention if config.use_mla else CausalSelfAttention)(config).to(device).eval()
        params = sum(p.numel() for p in module.parameters())
        kv_bytes = 2 * module.kv_cache_elements_per_token()  # bf16
        ratio = f"{module.get_compression_ratio():.2f}x"
        savings = f"{module.get_memory_savings(sequence_length=args.seq_len):.2f}x"
        ms = forward_ms(module, x, args.repeats)
        print(f"{name:<34} {params:>10,} {kv_bytes:>11,} {ratio:>12} {savings:>11} {ms:>8.2f}")


if __name__ == "__main__":
    main()
