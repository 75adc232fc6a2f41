"""End-to-end generation speed: tokens/s of GPT.generate with the latent KV cache.

    python bench/generate.py [--batch_sizes 1 32] [--prompt 128] [--new_tokens 256] [--out PATH.json]

A GPT-2-small-shaped model (12 layers, 12 heads, 768 wide, block 1024, random weights) samples
greedily; without a GPU a 2-layer, 128-wide one generates a few tokens (the numbers need a GPU).
Rows (key `table`: speed or check):
- mla-latent-cache: MLA (default r = hs/2) with its latent cache, one token per step;
- mla-latent-cache-graph: the same decode step captured once as a CUDA graph and replayed
  (standard-kv-cache-graph likewise). What writing the latents from the projection kernel itself
  is worth against a cuBLAS GEMM and a cache copy is measured per op by bench/append.py (and,
  end to end, 8-11% in docs/decisions.md, from the run before the model lost its switch for it);
- standard-kv-cache: the same GPT with standard attention caching full K and V, i.e. the
  cache an expanded MLA would keep (2 nh hs per token), on PyTorch's SDPA;
- mla-recompute: nanoGPT's generation, the whole context through the model every step;
- ...-ragged: the batch's prompts cut to different lengths (half the prompt to all of it, spread
  over the rows) and generated together, each row at its own cache position (`GPT.generate`
  with a list of prompts); tokens/s counts the same batch x new tokens;
- mla-fp8-cache-graph: the graphed MLA step over an fp8 latent cache (a float32 scale per position
  and group), written by the fused append and read as stored by the decode kernel.
Eager rows run only up to --eager_max_batch: each step launches every kernel from Python
(and standard attention's SDPA meets a new key length, a new cuDNN plan, at every step).
With --caches, instead: the cache table. For each prompt in --prompts and batch in --batch_sizes, every
cache in CACHES (standard K/V, MLA's default latent, the same in fp8, one joint g 1 r 256 latent), each
model built with a block just long enough, generating --new_tokens with the decode step replayed from
a CUDA graph: tokens/s end to end (prefill included), the decode step's ms ((t(N) - t(2)) / (N - 2):
two tokens already hold the prefill, the step's first eager run and its capture, so only replays
remain), the cache bytes per token and layer, and the GB/s those bytes make at the
step's mean filled length. A batch that does not fit is reported and skipped. --norms fused unfused
measures each row twice in one process: as shipped, and with generation's residual adds and layer
norms as PyTorch's two ops instead of `mla_kernels.layer_norm.add_layer_norm` (`<cache>-unfused-norm`,
plotted against the standard cache measured the same way); --linears fused cublas likewise runs a
decode step's linear layers (the MLP with its GELU, MLA's output projection) on
`mla_kernels.linear.decode_linear` (`<cache>-decode-linear`) and on cuBLAS (`<cache>-cublas-linear`),
whatever the model ships (`mla_gpt.model.core.DECODE_LINEAR_ROWS`). --profile_kernels N
also prints, per row, the N kernels one decode step spends its device time in (projections, the
decode kernel, the merge of split partials, the output projection), and records the step's device ms.
Also checks that the first --check_tokens greedy tokens from the kernels equal those of the
reference path in the same dtype (reported, not asserted: bf16 argmax ties can differ). Writes
the results JSON and a bar chart beside it (.png), which `python bench/plot.py RESULTS.json` redraws.
"""
import argparse
import contextlib
import time
from unittest import mock

import harness  # first: it puts the repository root on sys.path
import torch

from mla_gpt.generate import decode_step, prefill
from mla_gpt.model import GPT, GPTConfig
from mla_gpt.model import core as core_module
from mla_gpt.model import gpt as gpt_module
from mla_kernels.linear import MAX_ROWS as DECODE_LINEAR_MAX_ROWS

BLOCK_SIZE, VOCAB_SIZE, GPT2_VOCAB = 1024, 50304, 50257  # GPT-2's vocabulary, padded to a multiple of 64
GPU_SETTINGS = dict(batch_sizes=[1, 32, 128], prompt=128, new_tokens=256, n_layer=12, n_head=12, n_embd=768)
CPU_SETTINGS = dict(batch_sizes=[1], prompt=16, new_tokens=8, n_layer=2, n_head=4, n_embd=128)
UNITS = {"seconds": "s", "tokens_per_s": "tokens/s", "peak_mb": "MB", "fraction": "", "step_ms": "ms",
         "cache_bytes_per_token_layer": "bytes", "cache_GBps": "GB/s", "step_device_ms": "ms"}
UNFUSED_SUFFIX = "-unfused-norm"  # --caches --norms unfused: the provider of a cache without fused norms
# --caches --linears: the provider suffix of a cache whose decode linears are as shipped, decode_linear's, cuBLAS's
LINEAR_SUFFIXES = {"shipped": "", "fused": "-decode-linear", "cublas": "-cublas-linear"}
PROFILED_STEPS = 10  # decode steps profiled per row with --profile_kernels
# --caches: name -> (GPTConfig settings, cache dtype; None: the model's)
CACHES = {
    "standard": (dict(), None),
    "mla": (dict(use_mla=True), None),
    "mla-fp8": (dict(use_mla=True), torch.float8_e4m3fn),
    "mla-joint-g1-r256": (dict(use_mla=True, mla_kv_groups=1, mla_joint_kv=True, mla_latent_dim=256), None),
}
CPU_CACHES = {**CACHES, "mla-joint-g1-r256": (dict(use_mla=True, mla_kv_groups=1, mla_joint_kv=True,
                                                   mla_latent_dim=64), None)}


def recompute_generate(model, idx, new_tokens):
    """nanoGPT's generation: the whole context through the model for every new token."""
    for _ in range(new_tokens):
        logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def ragged_prompts(prompt):
    """The rows of prompt (B, T) cut to lengths spread from T // 2 to T: a list of 1-D prompts."""
    B, T = prompt.shape
    lengths = torch.linspace(T // 2, T, B).round().long().tolist() if B > 1 else [T]
    return [row[:n] for row, n in zip(prompt, lengths)]


def timed(fn, new_tokens):
    """fn(n) generates n tokens; returns (fn(new_tokens), seconds), after one untimed identical run.

    The warm-up generates as many tokens as the timed run: the cache length picks the decode
    kernel's split count (and its autotuned tile) and cuDNN's plan, so a shorter warm-up would
    leave their compilation inside the timed run.
    """
    fn(new_tokens)
    harness.synchronize()
    start = time.perf_counter()
    out = fn(new_tokens)
    harness.synchronize()
    return out, time.perf_counter() - start


def plot(rows, path):
    """Tokens/s per provider, one group of bars per batch size (log scale: they span 3 decades);
    for the cache table, each cache's decode-step speed against the standard cache's, per prompt."""
    plt = harness.pyplot()
    if any(r["table"] == "caches" for r in rows):
        return plot_caches(plt, [r for r in rows if r["table"] == "caches"], path)
    rows = [r for r in rows if r["table"] == "speed"]
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
    first = rows[0]
    ax.set_title(f"GPT.generate, {first['n_layer']} layers x {first['n_embd']}, {first['gpu']}, {first['dtype']}")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_caches(plt, rows, path):
    """Decode-step speed of each cache over the standard cache's, by prompt length, one line per batch."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_key = {(r["provider"], r["batch"], r["prompt"]): r for r in rows}
    for name in dict.fromkeys(r["provider"] for r in rows):
        variant = next(r.get("variant") for r in rows if r["provider"] == name)  # the suffix: same ops as it
        if variant is None:  # files from before the variant key: only --norms
            variant = UNFUSED_SUFFIX if name.endswith(UNFUSED_SUFFIX) else ""
        baseline = "standard" + variant
        for batch in sorted({r["batch"] for r in rows}):
            points = sorted((r["prompt"], standard["step_ms"] / r["step_ms"]) for r in rows
                            if (r["provider"], r["batch"]) == (name, batch)
                            and (standard := by_key.get((baseline, batch, r["prompt"]))))
            if points and name != baseline:
                ax.plot(*zip(*points), marker="o", label=f"{name}, B {batch}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("decode step speed / the standard cache's")
    first = rows[0]
    ax.set_title(f"Decode step by cache, {first['n_layer']} layers x {first['n_embd']}, {first['gpu']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def profile_decode(model, prompt, cache_dtype, n_steps, kernels):
    """Print the kernels one decode step over a filled cache spends its device time in (graphed on
    a GPU): `kernels` of them, by device time per step. Returns the step's device ms."""
    gpu = prompt.is_cuda
    caches = model.setup_caches(prompt.shape[0], prompt.shape[1] + n_steps + 1, cache_dtype)
    with torch.no_grad():
        token = prefill(model, prompt, caches)[:, -1:].argmax(-1)  # (B, 1)
        positions = torch.full((prompt.shape[0],), prompt.shape[1], dtype=torch.int32, device=prompt.device)
        step = decode_step(model, caches, token, positions, cuda_graph=gpu)

        def steps():
            for _ in range(n_steps):
                step(token, positions)  # the same slot each time: the cache's length stays the prompt's
            harness.synchronize()

        device_us, _ = harness.device_time(steps, n_steps, kernels)
    return device_us / 1000 / n_steps


def fused_norms(norms):
    """A context in which generation fuses its residual adds with the layer norms ('fused', as
    shipped) or runs them as PyTorch's add, then layer norm ('unfused', the A/B's other side)."""
    return contextlib.nullcontext() if norms == "fused" else mock.patch.object(gpt_module, "FUSED_NORM_BACKENDS", ())


def decode_linears(linears):
    """A context in which a decode step's linear layers run `mla_kernels.linear.decode_linear` up
    to its MAX_ROWS ('fused') or cuBLAS through F.linear and nn.GELU ('cublas'), whatever the
    model ships (`mla_gpt.model.core.DECODE_LINEAR_ROWS`), or as shipped ('shipped')."""
    if linears == "shipped":
        return contextlib.nullcontext()
    return mock.patch.object(core_module, "DECODE_LINEAR_ROWS", DECODE_LINEAR_MAX_ROWS if linears == "fused" else 0)


def variants(args):
    """(provider suffix, context) of every --norms x --linears combination, the shipped one first."""
    for norms in args.norms:
        for linears in args.linears:
            suffix = ("" if norms == "fused" else UNFUSED_SUFFIX) + LINEAR_SUFFIXES[linears]
            yield suffix, (norms, linears)


def cache_rows(args, shape, device, dtype):
    """--caches: yield the row of every cache at every prompt length, batch size and --norms as it is measured."""
    gpu = device == "cuda"
    for prompt_len in args.prompts:
        block = prompt_len + args.new_tokens
        for name, (settings, cache_dtype) in (CACHES if gpu else CPU_CACHES).items():
            torch.manual_seed(0)
            model = GPT(GPTConfig(**{**shape, "block_size": block}, **settings)).to(device, dtype).eval()
            per_token = model.transformer.h[0].attn.make_cache(1, 1, cache_dtype or dtype, "meta").bytes_per_token
            for batch in args.batch_sizes:
                prompt = torch.randint(0, GPT2_VOCAB, (batch, prompt_len), device=device)
                for suffix, (norms, linears) in variants(args):
                    provider = name + suffix
                    with fused_norms(norms), decode_linears(linears):
                        row = cache_row(args, model, prompt, cache_dtype, provider, gpu)
                    if row is None:
                        continue
                    row["variant"] = suffix
                    cache_gb = per_token * args.n_layer * batch * (prompt_len + args.new_tokens / 2) / 1e9
                    row.update(cache_bytes_per_token_layer=per_token, cache_GBps=cache_gb / (row["step_ms"] / 1e3))
                    print(f"prompt {prompt_len:>6}  B {batch:>3}  {provider:<44} step {row['step_ms']:8.3f} ms  "
                          f"{row['tokens_per_s']:>10.1f} tok/s  {per_token:>5} B/token/layer  "
                          f"{row['cache_GBps']:8.1f} GB/s", flush=True)
                    yield row


def cache_row(args, model, prompt, cache_dtype, provider, gpu):
    """One --caches row: graphed generation of --new_tokens after prompt, timed by difference; None
    (printed) when it does not fit."""
    batch, prompt_len = prompt.shape
    run = lambda n: model.generate(prompt, n, top_k=1, cuda_graph=gpu, cache_dtype=cache_dtype)  # noqa: E731
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        _, two = timed(run, 2)  # the prefill, the decode step's eager first run, its capture, one replay
        _, seconds = timed(run, args.new_tokens)
    except torch.OutOfMemoryError:
        print(f"prompt {prompt_len:>6}  B {batch:>3}  {provider:<44} does not fit", flush=True)
        return None
    step_s = (seconds - two) / (args.new_tokens - 2)  # replays only
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if gpu else None
    device_ms = None
    if args.profile_kernels:
        print(f"prompt {prompt_len:>6}  B {batch:>3}  {provider:<44} kernels of one decode step:", flush=True)
        device_ms = profile_decode(model, prompt, cache_dtype, PROFILED_STEPS, args.profile_kernels)
        device_ms = device_ms if gpu else None  # no device events on a CPU
    return dict(table="caches", provider=provider, batch=batch, prompt=prompt_len, new_tokens=args.new_tokens,
                tokens_per_s=batch * args.new_tokens / seconds, step_ms=step_s * 1e3, step_device_ms=device_ms,
                peak_mb=peak_mb)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_sizes", type=int, nargs="+")
    parser.add_argument("--prompt", type=int, help="prompt tokens")
    parser.add_argument("--new_tokens", type=int)
    parser.add_argument("--n_layer", type=int)
    parser.add_argument("--n_head", type=int)
    parser.add_argument("--n_embd", type=int)
    parser.add_argument("--eager_max_batch", type=int, default=1, help="largest batch for the eager rows")
    parser.add_argument("--check_tokens", type=int, default=32, help="tokens compared with the reference path")
    parser.add_argument("--caches", action="store_true", help="the cache table instead (see above)")
    parser.add_argument("--prompts", type=int, nargs="+", default=[1024, 8192, 32768],
                        help="with --caches: prompt lengths")
    parser.add_argument("--norms", nargs="+", choices=["fused", "unfused"], default=["fused"],
                        help="with --caches: generation's residual adds fused with the layer norms (as shipped), "
                             "or PyTorch's add then layer norm; both: an A/B in one process")
    parser.add_argument("--linears", nargs="+", choices=["shipped", "fused", "cublas"], default=["shipped"],
                        help="with --caches: a decode step's linear layers as the model ships them, on "
                             "mla_kernels' decode_linear, or on cuBLAS; fused cublas: an A/B in one process")
    parser.add_argument("--profile_kernels", type=int, default=0, metavar="N",
                        help="with --caches: print each row's N kernels by device time in one decode step")
    harness.add_out_argument(parser, "generate")
    args = parser.parse_args()
    defaults = GPU_SETTINGS if harness.on_gpu() else CPU_SETTINGS
    for key, value in defaults.items():  # unset options take the device's settings (see __doc__)
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def generation_runs(models, prompt, batch, eager_max_batch, gpu):
    """name -> fn(n) generating n tokens after the prompt, for one batch."""
    mla, standard = models["mla"], models["standard"]
    ragged = ragged_prompts(prompt)
    runs = {"mla-recompute": lambda n: recompute_generate(mla, prompt, n)}
    if batch <= eager_max_batch:
        runs["mla-latent-cache"] = lambda n: mla.generate(prompt, n, top_k=1)
        runs["standard-kv-cache"] = lambda n: standard.generate(prompt, n, top_k=1)
        runs["mla-latent-cache-ragged"] = lambda n: mla.generate(ragged, n, top_k=1)
    if gpu:
        runs["mla-latent-cache-graph"] = lambda n: mla.generate(prompt, n, top_k=1, cuda_graph=True)
        runs["standard-kv-cache-graph"] = lambda n: standard.generate(prompt, n, top_k=1, cuda_graph=True)
        runs["mla-latent-cache-graph-ragged"] = lambda n: mla.generate(ragged, n, top_k=1, cuda_graph=True)
        runs["mla-fp8-cache-graph"] = lambda n: mla.generate(prompt, n, top_k=1, cuda_graph=True,
                                                             cache_dtype=torch.float8_e4m3fn)
        runs["standard-kv-cache-graph-ragged"] = lambda n: standard.generate(ragged, n, top_k=1, cuda_graph=True)
    return runs


def bench_batch(models, batch, args, device, dtype):
    """Speed rows of every run at one batch size, then check rows of the MLA runs' first tokens."""
    gpu = device == "cuda"
    prompt = torch.randint(0, GPT2_VOCAB, (batch, args.prompt), device=device)
    rows, outputs = [], {}
    for name, fn in generation_runs(models, prompt, batch, args.eager_max_batch, gpu).items():
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        outputs[name], seconds = timed(fn, args.new_tokens)
        peak = torch.cuda.max_memory_allocated() / 2**20 if gpu else None
        rows.append(dict(table="speed", provider=name, batch=batch, prompt=args.prompt, new_tokens=args.new_tokens,
                         seconds=seconds, tokens_per_s=batch * args.new_tokens / seconds, peak_mb=peak))
        print(f"B {batch:>3}  {name:<30} {seconds * 1e3:>9.1f} ms  "
              f"{batch * args.new_tokens / seconds:>10.1f} tok/s" + (f"  peak {peak:.0f} MB" if peak else ""))
    checked = min(args.check_tokens, args.new_tokens)
    reference_tokens = models["mla_reference"].generate(prompt, checked, top_k=1)[:, args.prompt:]
    for name, tokens in outputs.items():
        if name.startswith("mla") and not name.endswith("ragged"):  # tests/test_ragged_generation.py checks those
            same = (tokens[:, args.prompt : args.prompt + checked] == reference_tokens).float().mean().item()
            print(f"B {batch:>3}  {name:<30} first {checked} tokens equal to the {dtype} reference path: "
                  f"{100 * same:.1f}%")
            rows.append(dict(table="check", provider=name, batch=batch, check="tokens_equal_reference",
                             tokens=checked, fraction=same))
    return rows


def main():
    args = parse_args()
    device = "cuda" if harness.on_gpu() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cpu":
        print("no GPU: running a small CPU configuration; kernel timings need a GPU")
    shape = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=BLOCK_SIZE,
                 vocab_size=VOCAB_SIZE, bias=False)
    if args.caches:
        if args.new_tokens < 3:
            raise SystemExit(f"--caches times the decode step by difference: --new_tokens must be >= 3, got "
                             f"{args.new_tokens}")
        out, env = harness.results_path(args.out, "generate"), harness.environment(dtype)
        settings = {k: v for k, v in shape.items() if k != "block_size"}
        rows = []
        for row in cache_rows(args, shape, device, dtype):  # written after every row: a crashed run keeps its rows
            rows.append(row)
            harness.write_results(out, harness.result_rows("generate", rows, UNITS, env, settings))
        harness.write_results(out, harness.result_rows("generate", rows, UNITS, env, settings), plot)
        return
    torch.manual_seed(0)
    mla = GPT(GPTConfig(**shape, use_mla=True)).to(device, dtype).eval()
    mla_reference = GPT(GPTConfig(**shape, use_mla=True, attn_backend="reference")).to(device, dtype).eval()
    mla_reference.load_state_dict(mla.state_dict())
    models = dict(mla=mla, mla_reference=mla_reference,
                  standard=GPT(GPTConfig(**shape)).to(device, dtype).eval())
    rows = []
    for batch in args.batch_sizes:
        rows += bench_batch(models, batch, args, device, dtype)
    harness.write_results(harness.results_path(args.out, "generate"),
                          harness.result_rows("generate", rows, UNITS, harness.environment(dtype), shape), plot)


if __name__ == "__main__":
    main()
