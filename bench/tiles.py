"""Which tile candidates of the attention kernels win, at the shapes the GPT trains on.

    python bench/tiles.py [--splits_only] [--out PATH.json]
    python bench/tiles.py --core [--out PATH.json]

With --core: a wider set of tile candidates (WIDE_CONFIGS, Hopper-sized: 128-row tiles, 8 warps) at
the core grid of bench/attention.py (12 heads, B * T = 16384, head dims 16-128, and MLA's absorbed
core with one KV head), each kernel's candidates timed by the autotuner, then the tuned kernels'
forward and forward + backward timed from CUDA-graph replay beside SDPA's cuDNN and flash backends.

Runs `flash_attention` forward and backward (bf16, eager, so Triton's own autotuner times every
candidate that fits: the search is forced at every head dim, where the kernels skip it below
`SEARCH_HEAD_DIM`) at each shape below, and reads each kernel's timings of its candidates. Prints,
per shape and kernel, every candidate's median time against the fastest, then per kernel the
candidate whose worst ratio over all shapes is the smallest: the evidence for pruning candidates
that never win (each one costs a compile in the first training step). Rows: one per shape,
kernel and candidate. Then, at the shapes with several query heads per KV head, the whole
attention backward timed with each number of programs the dK/dV kernel splits a group's heads over
(`dkdv_head_splits`), and the split its rule picks. Needs a GPU. bench/results/tiles_h200.json
holds the run that chose today's tile candidates, with the ones it dropped (commit 78845d0: before
the head splits).
"""
import argparse

import harness  # first: it puts the repository root on sys.path
import torch
import triton

from mla_gpt.model.core import sdpa_attention
from mla_kernels._tiles import num_sms
from mla_kernels.attention import flash_attention, kernels, launch

# (name, B, T, heads, kv groups, head dim): the absorbed MLA core at the char config and at GPT-2
# small (r 32, one latent group), then standard-attention shapes at head dims 64 and 128.
SHAPES = [
    ("char-mla", 64, 256, 6, 1, 32),
    ("gpt2s-mla-1k", 16, 1024, 12, 1, 32),
    ("gpt2s-mla-4k", 4, 4096, 12, 1, 32),
    ("gpt2s-mla-8k", 2, 8192, 12, 1, 32),
    ("gpt2s-mha-1k", 16, 1024, 12, 12, 64),
    ("d128-2k", 8, 2048, 16, 16, 128),
]
# (name, B, T, heads, kv groups, head dim) of --core: B * T = 16384 tokens, as in bench/attention.py.
CORE_SHAPES = [(f"d{d}-{T}", 16384 // T, T, 12, 12, d) for d in (16, 32, 64, 128) for T in (2048, 4096, 16384)]
CORE_SHAPES += [(f"mla-d{d}-g1-{T}", 16384 // T, T, 12, 1, d) for d in (32, 64) for T in (4096, 16384)]
# (BLOCK_M, BLOCK_N, num_warps, num_stages) --core times, the kernels' own candidates first.
WIDE_CONFIGS = {
    "fwd": [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (128, 32, 4, 4)],
    "dkdv": [(64, 64, 4, 3), (32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 4), (64, 128, 4, 3), (128, 128, 8, 2)],
    "dq": [(64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 32, 4, 4), (128, 128, 8, 2)],
}
KERNELS = {"fwd": kernels._fwd_kernel, "dkdv": kernels._bwd_dkdv_kernel, "dq": kernels._bwd_dq_kernel}


def label(config):
    kw = config.kwargs
    return f"M{kw['BLOCK_M']}-N{kw['BLOCK_N']}-w{config.num_warps}-s{config.num_stages}"


def timings_at(name, B, T, H, G, D):
    """{kernel: {candidate label: median ms}} from the autotuner's own timing at this shape."""
    for kernel in KERNELS.values():
        kernel.configs_timings = None
    q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # (B, T, H, D)
    k = torch.randn(B, T, G, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # (B, T, G, D)
    v = torch.randn(B, T, G, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # (B, T, G, D)
    flash_attention(q, k, v).backward(torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16))
    torch.cuda.synchronize()
    found = {}
    for kind, kernel in KERNELS.items():
        if kernel.configs_timings is None:  # its autotune key repeats an earlier shape's (fwd ignores REP)
            print(f"{name:14s} {kind:5s} tuned at an earlier shape with its key", flush=True)
            continue
        found[kind] = {label(c): t[0] if isinstance(t, (list, tuple)) else t for c, t in kernel.configs_timings.items()}
    return found


def split_timings(B, T, H, G, D):
    """{head splits: median ms of the whole attention backward} for every divisor of H / G."""
    q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)  # (B, T, H, D)
    k, v = (torch.randn(B, T, G, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))  # (B, T, G, D)
    out, lse = launch.attention_forward(q, k, v, D ** -0.5, 0)
    do = torch.randn_like(out)  # (B, T, H, D)
    rule = launch.dkdv_head_splits
    found = {}
    try:
        for splits in (s for s in range(1, H // G + 1) if (H // G) % s == 0):
            launch.dkdv_head_splits = lambda programs, rep, sms, query_blocks, splits=splits: splits
            backward = lambda: launch.attention_backward(do, q, k, v, out, lse, D ** -0.5, 0)  # noqa: E731
            backward()  # autotune outside the capture
            # replayed from a CUDA graph: called eagerly, the launcher's host time (~1 ms through PyTorch's
            # tracing wrapper for user kernels) hides the kernels
            found[splits] = harness.median_ms(backward, graph=True)
    finally:
        launch.dkdv_head_splits = rule
    return found


def tile_rows(shapes=SHAPES):
    """Every tile candidate of each kernel at every shape, timed by the autotuner (the search forced
    at every head dim), then per kernel the candidate whose worst ratio to the fastest is smallest."""
    kernels.SEARCH_HEAD_DIM = 0  # time every candidate at every head dim
    rows = []
    for name, B, T, H, G, D in shapes:
        for kind, candidates in timings_at(name, B, T, H, G, D).items():
            best = min(candidates.values())
            for cand, ms in candidates.items():
                rows.append(dict(provider=cand, shape=name, B=B, T=T, heads=H, groups=G, head_dim=D, kernel=kind,
                                 ms=ms, vs_best=ms / best))
            listed = "  ".join(f"{c} {ms:.3f} ({ms / best:.2f}x)" for c, ms in candidates.items())
            print(f"{name:14s} {kind:5s} {listed}", flush=True)
    for kind in KERNELS:
        worst = {}
        for r in rows:
            if r["kernel"] == kind:
                worst[r["provider"]] = max(worst.get(r["provider"], 0.0), r["vs_best"])
        pick = min(worst, key=worst.get)
        print(f"{kind}: one candidate for every shape: {pick}, at worst {worst[pick]:.3f}x the fastest; "
              "worst ratio of each: " + ", ".join(f"{c} {w:.2f}x" for c, w in worst.items()))
    return rows


def split_rows():
    """The whole backward at every dK/dV head split, at the shapes with several query heads per KV
    head, against the split the rule picks."""
    rows = []
    sms = num_sms(torch.device("cuda"))
    for name, B, T, H, G, D in SHAPES:
        if H == G:
            continue  # one query head per KV head: nothing to split
        timings = split_timings(B, T, H, G, D)
        best = min(timings.values())
        blocks = triton.cdiv(T, kernels.DKDV_BLOCK_N)
        chosen = launch.dkdv_head_splits(B * G * blocks, H // G, sms, blocks)
        for splits, ms in timings.items():
            rows.append(dict(provider=f"splits{splits}", shape=name, B=B, T=T, heads=H, groups=G, head_dim=D,
                             kernel="backward", ms=ms, vs_best=ms / best, chosen=splits == chosen))
        listed = "  ".join(f"{s} {ms:.3f} ({ms / best:.2f}x)" for s, ms in timings.items())
        print(f"{name:14s} backward by dK/dV head splits (the rule picks {chosen}): {listed}", flush=True)
    return rows


def _sdpa(backend):
    """The model's SDPA core restricted to one backend (`mla_gpt.model.core.sdpa_attention`: cuDNN
    gets a single KV head repeated, flash takes it as grouped heads), default scale."""
    def run(q, k, v):  # (B, T, heads, D) layouts, like flash_attention
        return sdpa_attention(q, k, v, q.shape[-1] ** -0.5, backend=backend)
    return run


def graphed_core_rows(shapes):
    """Forward and forward + backward of our core (tuned) and SDPA's cuDNN and flash backends, each
    replayed from a CUDA graph, at every shape: ms, TFLOP/s (causal: forward 2 B H T^2 (2 D) / 2,
    backward 2.5x that) and the ratio to cuDNN."""
    rows = []
    providers = {"triton": flash_attention, "cudnn": _sdpa("cudnn"), "flash": _sdpa("flash")}
    for name, B, T, H, G, D in shapes:
        fwd_flops = 2 * B * H * T * T * 2 * D / 2
        found, outputs = {}, {}
        q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # (B, T, H, D)
        k, v = (torch.randn(B, T, G, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                for _ in range(2))  # (B, T, G, D)
        dout = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)  # (B, T, H, D)
        for provider, fn in providers.items():

            def forward():
                with torch.no_grad():
                    fn(q, k, v)

            def forward_backward():
                fn(q, k, v).backward(dout)
            try:
                forward_backward()  # tunes ours outside the capture
                fwd = harness.median_ms(forward, graph=True)
                both = harness.median_ms(forward_backward, graph=True)
            except Exception as error:  # a peer that does not take this shape
                print(f"{name:16s} {provider:6s} failed: {str(error).splitlines()[0][:100]}", flush=True)
                continue
            found[provider] = (fwd, both)
            with torch.no_grad():
                outputs[provider] = fn(q, k, v).float()
        reference = outputs.get("cudnn", outputs.get("flash"))
        for provider, (fwd, both) in found.items():
            bwd = both - fwd
            row = dict(shape=name, B=B, T=T, heads=H, groups=G, head_dim=D, provider=provider,
                       fwd_ms=fwd, bwd_ms=bwd, fwd_bwd_ms=both, fwd_tflops=fwd_flops / fwd / 1e9,
                       bwd_tflops=2.5 * fwd_flops / bwd / 1e9, fwd_bwd_tflops=3.5 * fwd_flops / both / 1e9)
            if "cudnn" in found:
                row["vs_cudnn"] = found["cudnn"][1] / both
            if reference is not None:  # a wrong tile shows here: bf16 outputs agree to ~1e-2
                row["rel_err_vs_sdpa"] = ((outputs[provider] - reference).norm() / reference.norm()).item()
            rows.append(row)
            print(f"{name:16s} {provider:6s} fwd {fwd:7.3f} ms ({row['fwd_tflops']:5.0f} TF/s)  bwd {bwd:7.3f} ms "
                  f"({row['bwd_tflops']:5.0f} TF/s)  fwd+bwd {both:7.3f} ms  x cuDNN {row.get('vs_cudnn', 0):.2f}  "
                  f"err {row.get('rel_err_vs_sdpa', float('nan')):.1e}",
                  flush=True)
    return rows


def chosen_tiles():
    """The candidate the autotuner kept for each kernel at every tuned shape, as rows."""
    rows = []
    for kind, kernel in KERNELS.items():
        for key, config in kernel.cache.items():
            rows.append(dict(provider=label(config), kernel=kind, key=str(key), chosen=True))
            print(f"chosen {kind:5s} {label(config)} for {key}", flush=True)
    return rows


def core_rows(tiles):
    """--core: the wide candidates timed at CORE_SHAPES (with tiles), then the core against cuDNN and flash."""
    rows = []
    if tiles:
        for kind, kernel in KERNELS.items():
            kernel.configs = kernels._as_configs(WIDE_CONFIGS[kind])
        rows = tile_rows(CORE_SHAPES) + chosen_tiles()
    return rows + graphed_core_rows(CORE_SHAPES)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--splits_only", action="store_true", help="time only the dK/dV head splits")
    p.add_argument("--core", action="store_true", help="wide candidates at the core grid, against cuDNN and flash")
    p.add_argument("--no_tiles", action="store_true", help="with --core: only the core against cuDNN and flash")
    harness.add_out_argument(p, "tiles")
    args = p.parse_args()
    if not harness.on_gpu():
        raise SystemExit("tiles.py times the GPU kernels' candidates: it needs a CUDA device")
    if args.core:
        rows = core_rows(tiles=not args.no_tiles)
    else:
        rows = ([] if args.splits_only else tile_rows()) + split_rows()
    units = {"ms": "ms", "vs_best": "", "chosen": "", "fwd_ms": "ms", "bwd_ms": "ms", "fwd_bwd_ms": "ms",
             "fwd_tflops": "TFLOP/s", "bwd_tflops": "TFLOP/s", "fwd_bwd_tflops": "TFLOP/s", "vs_cudnn": "",
             "rel_err_vs_sdpa": ""}
    harness.write_results(harness.results_path(args.out, "tiles"),
                          harness.result_rows("tiles", rows, units, harness.environment(torch.bfloat16)))


if __name__ == "__main__":
    main()
