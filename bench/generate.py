"""End-to-end generation speed: tokens/s of GPT.generate with the latent KV cache.

    python bench/generate.py [--batch_sizes 1 32] [--prompt 128] [--new_tokens 256]

A GPT-2-small-shaped model (12 layers, 12 heads, 768 wide, block 1024, random weights) samples
greedily. Rows:
- mla-latent-cache: MLA (default r = hs/2) with its latent cache, one token per step;
- mla-latent-cache-graph: the same decode step captured once as a CUDA graph and replayed
  (standard-kv-cache-graph likewise); mla-latent-cache-graph-unfused: the same with the
  latent projection as a cuBLAS GEMM followed by a cache copy, instead of one kernel that
  writes the latents into the cache (mla_kernels.append);
- standard-kv-cache: the same GPT with standard attention caching full K and V, i.e. the
  cache an expanded MLA would keep (2 nh hs per token), on PyTorch's SDPA;
- mla-recompute: nanoGPT's generation, the whole context through the model every step.
Eager rows run only up to --eager_max_batch: each step launches every kernel from Python
(and standard attention's SDPA meets a new key length, a new cuDNN plan, at every step).
Also checks that the first --check_tokens greedy tokens from the kernels equal those of the
reference path in the same dtype (reported, not asserted: bf16 argmax ties can differ). Writes
bench/results/generate_<device>.json and a bar chart beside it (.png);
`python bench/generate.py --replot RESULTS.json` redraws the chart of an earlier run.
"""
import argparse
import json
import os
import platform
import time

import torch

from mla_gpt.model import GPT, GPTConfig

WARMUP_TOKENS = 4
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def recompute_generate(model, idx, new_tokens):
    for _ in range(new_tokens):
        logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def unfused_generate(model, idx, new_tokens):
    """CUDA-graph generation with each layer's latents projected by cuBLAS, then copied into the cache."""
    layers = [block.attn for block in model.transformer.h]
    for layer in layers:
        layer.fused_cache_append = False
    try:
        return model.generate(idx, new_tokens, top_k=1, cuda_graph=True)
    finally:
        for layer in layers:
            layer.fused_cache_append = True


def timed(fn, new_tokens, device):
    """fn(n) generates n tokens; returns (fn(new_tokens), seconds), after a short warm-up."""
    fn(WARMUP_TOKENS)  # kernel compilation and tuning, allocator
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(new_tokens)
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def plot(result, path):
    """Tokens/s per provider, one group of bars per batch size (log scale: they span 3 decades)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "tokens_per_s" in r]
    batches = sorted({r["batch"] for r in rows})
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(providers)
    for i, name in enumerate(providers):
        speeds = {r["batch"]: r["tokens_per_s"] for r in rows if r["provider"] == name}
        xs = [j + i * width for j, b in enumerate(batches) if b in speeds]
        ax.bar(xs, [speeds[b] for b in batches if b in speeds], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"B {b}" for b in batches])
    ax.set_yscale("log")
    ax.set_ylabel("generated tokens / s (higher is better)")
    info = result["info"]
    ax.set_title(f"GPT.generate, {info['shape']['n_layer']} layers x {info['shape']['n_embd']}, "
                 f"{info['device']}, {info['dtype'].removeprefix('torch.')}")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--n_layer", type=int, default=12)
    parser.add_argument("--n_head", type=int, default=12)
    parser.add_argument("--n_embd", type=int, default=768)
    parser.add_argument("--eager_max_batch", type=int, default=1, help="largest batch for the eager rows")
    parser.add_argument("--check_tokens", type=int, default=32, help="tokens compared with the reference path")
    parser.add_argument("--out", default=None, help="results JSON (default bench/results/generate_<device>.json)")
    parser.add_argument("--replot", default=None, metavar="RESULTS.json", help="only redraw the chart of a results file")
    args = parser.parse_args()
    if args.replot:
        with open(args.replot) as f:
            plot(json.load(f), os.path.splitext(args.replot)[0] + ".png")
        return

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cpu":
        print("no GPU: running a small CPU configuration; kernel timings need a GPU")
    shape = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=1024,
                 vocab_size=50304, bias=False)
    torch.manual_seed(0)
    mla = GPT(GPTConfig(**shape, use_mla=True)).to(device, dtype).eval()
    standard = GPT(GPTConfig(**shape)).to(device, dtype).eval()
    mla_reference = GPT(GPTConfig(**shape, use_mla=True, attn_backend="reference")).to(device, dtype).eval()
    mla_reference.load_state_dict(mla.state_dict())
    rows = []
    for batch in args.batch_sizes:
        prompt = torch.randint(0, 50257, (batch, args.prompt), device=device)
        runs = {"mla-recompute": lambda n: recompute_generate(mla, prompt, n)}
        if batch <= args.eager_max_batch:
            runs["mla-latent-cache"] = lambda n: mla.generate(prompt, n, top_k=1)
            runs["standard-kv-cache"] = lambda n: standard.generate(prompt, n, top_k=1)
        if device == "cuda":
            runs["mla-latent-cache-graph"] = lambda n: mla.generate(prompt, n, top_k=1, cuda_graph=True)
            runs["mla-latent-cache-graph-unfused"] = lambda n: unfused_generate(mla, prompt, n)
            runs["standard-kv-cache-graph"] = lambda n: standard.generate(prompt, n, top_k=1, cuda_graph=True)
        outputs = {}
        for name, fn in runs.items():
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            outputs[name], seconds = timed(fn, args.new_tokens, device)
            peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
            rows.append(dict(provider=name, batch=batch, prompt=args.prompt, new_tokens=args.new_tokens,
                             seconds=seconds, tokens_per_s=batch * args.new_tokens / seconds, peak_mb=peak))
            print(f"B {batch:>3}  {name:<30} {seconds * 1e3:>9.1f} ms  "
                  f"{batch * args.new_tokens / seconds:>10.1f} tok/s" + (f"  peak {peak:.0f} MB" if peak else ""))
        checked = min(args.check_tokens, args.new_tokens)
        reference_tokens = mla_reference.generate(prompt, checked, top_k=1)[:, args.prompt:]
        for name, tokens in outputs.items():
            if name.startswith("mla"):
                same = (tokens[:, args.prompt : args.prompt + checked] == reference_tokens).float().mean().item()
                print(f"B {batch:>3}  {name:<30} first {checked} tokens equal to the {dtype} reference path: "
                      f"{100 * same:.1f}%")
                rows.append(dict(provider=name, batch=batch, check="tokens_equal_reference", tokens=checked,
                                 fraction=same))

    info = dict(device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, dtype=str(dtype), shape=shape)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    out = args.out or os.path.join(RESULTS, f"generate_{device}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(info=info, rows=rows), f, indent=1)
    plot(dict(info=info, rows=rows), os.path.splitext(out)[0] + ".png")
    print(f"wrote {out} and its .png")


if __name__ == "__main__":
    main()
