"""End-to-end training throughput of the GPT, through the trainer's own step.

    python bench/train.py                                  # every shape, variant, mode
    python bench/train.py --shapes char --modes step_graph --out /tmp/train.json

Each row builds the project's GPT, its optimizer (`configure_optimizers`: fused AdamW on CUDA)
and the step `python -m mla_gpt.cli.train` runs (`mla_gpt.cli.train.TrainStep`: forward and
backward under bf16 autocast, gradient clip 1.0, optimizer step, the next batch drawn by the
trainer's `Batches` while the device works), then times it as the trainer runs it: the loss is
read once per `--steps` steps, as train.py reads it once per log line (`log_interval`).

Variants, measured in one process: mha (standard attention on PyTorch's SDPA, nanoGPT), and for
each MLA latent (`--latents`: r32 = head size / 2, the default; r64 = the head size; r192, the
custom config's attention without its SVD; g1-r256, one joint latent group):
- mla-<latent>: MLA as a user gets it, `attn_backend='auto'` (form and core per `mla_gpt.model.plan`);
- mla_triton-<latent>: every core on this project's Triton kernels (`attn_backend='triton'`);
- mla_sdpa_absorbed-<latent>, mla_sdpa_materialized-<latent>: the same MLA written in plain PyTorch
  on F.scaled_dot_product_attention, latent-space (absorbed) or over K/V expanded by one GEMM each
  (materialized): the peers a user can write without a custom kernel.
Modes, the trainer's step modes: eager (compile=False), compile (torch.compile's default mode),
compiler_graphs (torch.compile's 'reduce-overhead': forward and backward as CUDA graphs, the
optimizer eager), step_graph (compiled, the whole iteration captured as one CUDA graph: train.py's
default on one CUDA GPU) and eager_step_graph (the same capture of the uncompiled model).
Shapes: char (config/train_shakespeare_char.py's model: 6 L, 6 H, 384, T 256, B 64), gpt2s-char
(GPT-2 small, 12 L 768, with the character vocabulary the CLI trains on: the rows to judge
attention by) and gpt2s (the same with GPT-2's 50304-word vocabulary, whose LM head adds FLOPs no
attention saves), each at T 256 to 16384 with B * T = 16384. Dropout 0 everywhere (MLA's fused
kernels have no attention dropout; MHA's SDPA would pay for it).

Each row carries its FLOP ceiling against MHA (`flop_ceiling`: the model's FLOPs per token with
standard attention over those with MLA in its cheaper form, linear layers at 3x their forward
and attention at 3.5x for forward + backward) beside the measured ratio.
Per row: ms/step (wall time per step, median over `--rounds` rounds of `--steps` steps), tokens/s,
device ms/step (profiler: the summed durations of the device-side events, kernels and copies, over
profiled steps), host-bound share
(1 - device / wall), peak memory, MFU (the model's FLOP count, `GPT.estimate_mfu`, against the
bf16 matmul rate measured in the same run), seconds to the first step and through the startup steps
(compile, autotuning and the CUDA-graph capture included). Writes a JSON list of rows (merged into
an existing --out file: rows of other shapes, modes and variants are kept) and a PNG beside it. On a
CPU it runs tiny shapes that only show the script works: the numbers need a GPU.
"""
import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import harness  # first: it puts the repository root on sys.path
import numpy as np
import torch

from mla_gpt.model import GPT, GPTConfig
from mla_gpt.train.batches import Batches
from mla_gpt.train.runtime import Runtime
from mla_gpt.train.step import TrainStep, capturable_optimizer, compile_for_training
from mla_kernels._register import OP_KIND

VARIANTS = {  # name -> GPTConfig settings of an MLA variant, beside "mha"
    "mla": dict(attn_backend="auto"),
    "mla_triton": dict(attn_backend="triton"),
    "mla_sdpa_absorbed": dict(attn_backend="sdpa", mla_path="absorbed"),
    "mla_sdpa_materialized": dict(attn_backend="sdpa", mla_path="materialized"),
}
DEFAULT_VARIANTS = ["mha", "mla", "mla_sdpa_absorbed", "mla_sdpa_materialized"]
LATENTS = {
    "r32": dict(mla_latent_dim=32),
    "r64": dict(mla_latent_dim=64),
    "r192": dict(mla_latent_dim=192),
    "g1-r256": dict(mla_latent_dim=256, mla_kv_groups=1, mla_joint_kv=True),
}
MODES = {  # name -> the trainer's (compile, cuda_graphs) settings
    "eager": (False, "off"),
    "compile": (True, "off"),
    "compiler_graphs": (True, "compiler"),
    "step_graph": (True, "step"),
    "eager_step_graph": (False, "step"),
}
LENGTHS = [(T, 16384 // T) for T in (256, 1024, 4096, 8192, 16384)]  # (T, B): 16384 tokens a step
CHAR = dict(n_layer=6, n_head=6, n_embd=384, vocab_size=65)
GPT2S_CHAR = dict(n_layer=12, n_head=12, n_embd=768, vocab_size=65)
GPT2S = dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304)
# name -> (model settings, [(T, B), ...])
GPU_SHAPES = {"char": (CHAR, [(256, 64)]), "gpt2s-char": (GPT2S_CHAR, LENGTHS), "gpt2s": (GPT2S, LENGTHS)}
CPU_SHAPES = {"char": (dict(n_layer=2, n_head=2, n_embd=64, vocab_size=65), [(64, 4)]),
              "gpt2s-char": (dict(n_layer=2, n_head=4, n_embd=128, vocab_size=65), [(128, 2)]),
              "gpt2s": (dict(n_layer=2, n_head=4, n_embd=128, vocab_size=512), [(128, 2)])}
CPU_LATENTS = {"r32": dict(mla_latent_dim=8), "r64": dict(mla_latent_dim=16), "r192": dict(mla_latent_dim=48),
               "g1-r256": dict(mla_latent_dim=64, mla_kv_groups=1, mla_joint_kv=True)}
STARTUP_STEPS = TrainStep.CAPTURE_AFTER_ITERS + 1  # compile, autotune and CUDA-graph capture happen in these
MATMUL_N = 8192  # the bf16 matmul rate is measured on N x N x N
TOKEN_FILE_TOKENS = 2_000_000  # random tokens the batches are drawn from


def model_flops_per_token(config, T):
    """FLOPs per token of one training step (forward + backward) of the GPT: matmuls at 3x their
    forward, causal attention (T / 2 keys per query on average) at 3.5x. MLA counts its cheaper
    form: absorbed (composed projections C -> nh r and nh rv -> C, the core at head dims r, rv)
    or materialized (full q / output projections, the expansions as GEMMs, the core at hs)."""
    C, nh, hs, L, keys = config.n_embd, config.n_head, config.head_size, config.n_layer, T / 2
    mlp_and_head = L * 2 * (2 * C * 4 * C) + 2 * C * config.vocab_size
    if not config.use_mla:
        return 3 * (mlp_and_head + L * 2 * 4 * C * C) + 3.5 * L * 4 * C * keys
    r, g = config.latent_dim, config.kv_groups
    rv = config.svd_rank if config.use_svd and config.svd_mode == "weight" else r
    latent_proj = 2 * C * g * (r if config.mla_joint_kv else r + rv)
    absorbed = 3 * (2 * C * nh * r + latent_proj + 2 * nh * rv * C) + 3.5 * 2 * nh * (r + rv) * keys
    materialized = 3 * (4 * C * C + latent_proj + 2 * nh * hs * (r + rv)) + 3.5 * 4 * C * keys
    return 3 * mlp_and_head + L * min(absorbed, materialized)


def flop_ceiling(config, T):
    """The most MLA can gain over MHA by FLOPs at this shape: MHA's FLOPs per token over MLA's."""
    mha = GPTConfig(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
                    vocab_size=config.vocab_size, block_size=config.block_size)
    return model_flops_per_token(mha, T) / model_flops_per_token(config, T)


def matmul_rate(device):
    """Measured bf16 matmul FLOP/s (MATMUL_N^3 on random data, median of CUDA-event timings)."""
    a, b = (torch.randn(MATMUL_N, MATMUL_N, device=device, dtype=torch.bfloat16) for _ in range(2))
    ms = harness.median_ms(lambda: a @ b, warmup=100, rep=500)
    return 2 * MATMUL_N**3 / (ms * 1e-3)


def token_file(directory, vocab_size, n_tokens):
    """A uint16 token file of random ids, read through the trainer's Batches."""
    path = Path(directory) / f"tokens_{vocab_size}.bin"
    if not path.exists():
        rng = np.random.default_rng(0)
        rng.integers(0, vocab_size, n_tokens, dtype=np.uint16).tofile(path)
    return path


def device_ms_per_step(step, n_steps, host_table=False, device_table=0):
    """Device time per step (`harness.device_time`); host_table: also print the ops that took the
    most host time (where an idle GPU waits); device_table: this many kernels by device time."""
    device_us, prof = harness.device_time(lambda: run_steps(step, n_steps), n_steps, device_table)
    if host_table:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), flush=True)
    return device_us / 1000 / n_steps


def run_steps(step, n_steps):
    """n_steps trainer steps and one loss read at the end: seconds per step."""
    start = time.perf_counter()
    for _ in range(n_steps):
        loss = step()
    loss.item()
    return (time.perf_counter() - start) / n_steps


def print_first_step_profile(profiler, limit, name):
    """Where the first step's seconds went: Dynamo's phase times and the `limit` functions with the
    most cumulative host time, then half as many by own time (cProfile; compile workers in other
    processes show as waits)."""
    print(f"first step of {name}: compile phases (torch._dynamo.utils.compile_times)", flush=True)
    print(torch._dynamo.utils.compile_times(repr="str", aggregate=True), flush=True)
    print(harness.profile_table(profiler, limit, "cumulative"), harness.profile_table(profiler, limit // 2),
          sep="\n", flush=True)


def variant_settings(variant, latents):
    """GPTConfig settings of a variant name: 'mha', or '<MLA variant>-<latent>' (e.g. 'mla-r192')."""
    if variant == "mha":
        return dict(use_mla=False)
    name, latent = variant.split("-", 1)
    return dict(use_mla=True, **VARIANTS[name], **latents[latent])


def run_row(variant, mode, shape, model_args, T, B, args, rt, data_dir, peak_flops, latents):
    """Build one variant in one step mode at one shape, time its steps, return its measurement."""
    torch._dynamo.reset()  # each row compiles afresh: no dynamic-shape recompiles across rows
    torch.manual_seed(0)
    config = GPTConfig(**model_args, **variant_settings(variant, latents), block_size=T, dropout=0.0)
    model = GPT(config).to(rt.device)
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), rt.device_type)
    compile_model, cuda_graphs = MODES[mode]
    stepped = compile_for_training(model, cuda_graphs) if compile_model else model
    if cuda_graphs == "step":
        capturable_optimizer(optimizer, rt.device)
    batches = Batches(token_file(data_dir, config.vocab_size, TOKEN_FILE_TOKENS), B, T, rt.device, seed=0)
    autocast = torch.autocast(rt.device_type, dtype=rt.ptdtype) if rt.ptdtype != torch.float32 else nullcontext()
    scaler = torch.amp.GradScaler(rt.device_type, enabled=False)
    step = TrainStep(stepped, optimizer, scaler, batches, autocast, 1, 1.0, rt, cuda_graphs)
    if rt.device_type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if args.first_step_profile:
        first_step_s, profiler = harness.profiled(run_steps, step, 1)
        print_first_step_profile(profiler, args.first_step_profile, f"{shape} T {T} {mode} {variant}")
    else:
        first_step_s = run_steps(step, 1)
    startup_s = first_step_s + run_steps(step, STARTUP_STEPS - 1) * (STARTUP_STEPS - 1)
    if args.warmup:
        run_steps(step, args.warmup)
    wall_ms = statistics.median(run_steps(step, args.steps) for _ in range(args.rounds)) * 1000
    device_ms = (device_ms_per_step(step, args.profile_steps, args.host_table, args.device_table)
                 if rt.device_type == "cuda" and args.profile_steps else None)
    row = dict(
        provider=variant, shape=shape, T=T, B=B, mode=mode,
        ms_per_step=wall_ms, tokens_per_s=B * T / wall_ms * 1000,
        device_ms_per_step=device_ms,
        host_bound_share=None if device_ms is None else max(0.0, 1 - device_ms / wall_ms),
        peak_memory_mb=torch.cuda.max_memory_allocated() / 2**20 if rt.device_type == "cuda" else None,
        mfu=None if peak_flops is None else model.estimate_mfu(B, wall_ms / 1000, peak_flops),
        first_step_s=first_step_s, startup_s=startup_s, flop_ceiling_vs_mha=flop_ceiling(config, T),
        op_kind=OP_KIND,
        params=model.get_num_params(), n_layer=config.n_layer, n_embd=config.n_embd,
        latent_dim=config.latent_dim if config.use_mla else 0,
    )
    del step, stepped, model, optimizer
    return row


UNITS = {"ms_per_step": "ms", "tokens_per_s": "tokens/s", "device_ms_per_step": "ms", "host_bound_share": "",
         "peak_memory_mb": "MB", "mfu": "", "first_step_s": "s", "startup_s": "s", "flop_ceiling_vs_mha": ""}


def row_key(row):
    """What a measurement is of: a new one replaces an earlier one with the same key."""
    return row["shape"], row["T"], row["mode"], row["provider"]


def print_table(rows):
    """Each measurement, with its tokens/s against MHA and against the faster plain-PyTorch MLA
    (SDPA, absorbed or materialized) of the same latent, at the same shape and mode, and its FLOP
    ceiling against MHA."""
    print(f"{'shape':10} {'T':>5} {'B':>3} {'mode':16} {'variant':28} {'ms/step':>8} {'tok/s':>10} "
          f"{'dev ms':>7} {'MB':>7} {'1st s':>6} {'vs mha':>7} {'ceiling':>7} {'vs sdpa':>7}")
    by_key = {row_key(r): r for r in rows}
    fmt = lambda v, spec: format("-", ">" + spec.split(".")[0]) if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        key = r["shape"], r["T"], r["mode"]
        mha = by_key.get((*key, "mha"))
        latent = r["provider"].split("-", 1)[1] if "-" in r["provider"] else None
        peers = [by_key.get((*key, f"{name}-{latent}")) for name in ("mla_sdpa_absorbed", "mla_sdpa_materialized")]
        peers = [p for p in peers if p]
        sdpa = max(peers, key=lambda p: p["tokens_per_s"]) if peers else None
        ratio = lambda peer: f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}x" if peer else "-"  # noqa: E731
        print(f"{r['shape']:10} {r['T']:5d} {r['B']:3d} {r['mode']:16} {r['provider']:28} {r['ms_per_step']:8.2f} "
              f"{r['tokens_per_s']:10,.0f} {fmt(r.get('device_ms_per_step'), '7.2f')} "
              f"{fmt(r.get('peak_memory_mb'), '7.0f')} {r['first_step_s']:6.1f} {ratio(mha):>7} "
              f"{fmt(r.get('flop_ceiling_vs_mha'), '6.2f')}x {ratio(sdpa):>7}")


KIND_STYLES = {  # the plot's line of each MLA variant kind; mla (what a user gets) broad, under peers it may equal
    "mla": dict(label="mla (auto)", color="C0", marker="o", lw=4, ms=8, alpha=0.45),
    "mla_triton": dict(label="mla_triton", color="C1", marker="s", ms=4),
    "mla_sdpa_absorbed": dict(label="mla_sdpa_absorbed", color="C2", marker="^", ms=5),
    "mla_sdpa_materialized": dict(label="mla_sdpa_materialized", color="C3", marker="v", ms=5),
}


def variant_parts(variant):
    """(kind, latent) of a variant name '<kind>-<latent>' (e.g. ('mla', 'g1-r256')); latent '' for mha
    and for names from before the latents."""
    kind, _, latent = variant.partition("-")
    return kind, latent


def panel_order(panel):
    """Panels by shape and mode, then by latent as LATENTS lists them (names it lacks last)."""
    shape, mode, latent = panel
    return shape, mode, list(LATENTS).index(latent) if latent in LATENTS else len(LATENTS), latent


def plot_panel(ax, panel, rows, by_key, styles):
    """One (shape, mode, latent): each MLA kind's tokens/s over MHA's at the same T, the latent's FLOP
    ceiling dashed, MHA at 1."""
    shape, mode, latent = panel
    ceiling = {}
    for kind, style in styles.items():
        measured = [r for r in rows
                    if (r["shape"], r["mode"], variant_parts(r["provider"])) == (shape, mode, (kind, latent))]
        points = sorted((r["T"], r["tokens_per_s"] / mha["tokens_per_s"]) for r in measured
                        if (mha := by_key.get((shape, r["T"], mode, "mha"))))
        ceiling.update((r["T"], r["flop_ceiling_vs_mha"]) for r in measured if r.get("flop_ceiling_vs_mha") is not None)
        if points:
            ax.plot(*zip(*points), **style)
    if ceiling:
        ax.plot(*zip(*sorted(ceiling.items())), ls="--", marker="_", ms=16, mew=1.5, color="gray", label="FLOP ceiling")
    ax.axhline(1.0, color="black", lw=0.8, zorder=1, label="MHA")
    ax.set_xscale("log", base=2)
    ts = sorted({r["T"] for r in rows if (r["shape"], r["mode"]) == (shape, mode)})
    ax.set_xticks(ts, [f"{t // 1024}k" if t >= 1024 else str(t) for t in ts])
    ax.minorticks_off()
    ax.set_xlabel("T", fontsize=8)
    ax.set_title(", ".join(filter(None, panel)), fontsize=9)
    ax.grid(alpha=0.3)


def plot(rows, path):
    """tokens/s of each MLA variant relative to MHA at the same shape, mode and T: one panel per shape,
    mode and latent, one line per variant kind (a colour each across panels), the latent's FLOP
    ceiling dashed grey, T on the x axis, y shared."""
    plt = harness.pyplot()
    older = sorted({variant_parts(r["provider"])[0] for r in rows} - {"mha", *KIND_STYLES})  # names before the latents
    styles = {**KIND_STYLES, **{kind: dict(label=kind, color=f"C{4 + i}", marker="D", ms=4)
                                for i, kind in enumerate(older)}}
    panels = sorted({(r["shape"], r["mode"], variant_parts(r["provider"])[1]) for r in rows
                     if r["provider"] != "mha"}, key=panel_order)
    columns = min(4, len(panels))
    grid_rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(grid_rows, columns, figsize=(3.4 * columns, 2.8 * grid_rows + 0.9), dpi=110,
                             sharey=True, squeeze=False, layout="constrained")
    by_key = {row_key(r): r for r in rows}
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, panels):
        plot_panel(ax, panel, rows, by_key, styles)
    for ax in axes[:, 0]:
        ax.set_ylabel("tokens/s / MHA's", fontsize=8)
    labelled = {label: handle for ax in axes.flat for handle, label in zip(*ax.get_legend_handles_labels())}
    order = [label for label in (*(s["label"] for s in styles.values()), "FLOP ceiling", "MHA") if label in labelled]
    fig.legend([labelled[label] for label in order], order, loc="outside lower center", ncols=len(order), fontsize=8)
    fig.suptitle(f"GPT training step, {rows[0]['gpu']}", fontsize=10)
    fig.savefig(path)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(GPU_SHAPES), choices=list(GPU_SHAPES))
    p.add_argument("--T", nargs="+", type=int, default=None, help="only these sequence lengths")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=["mha", *VARIANTS])
    p.add_argument("--latents", nargs="+", default=list(LATENTS), choices=list(LATENTS))
    p.add_argument("--modes", nargs="+", default=["step_graph"], choices=list(MODES))
    p.add_argument("--steps", type=int, default=10, help="steps per timed round, one loss read per round")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per row (median)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps after the startup ones")
    p.add_argument("--profile_steps", type=int, default=5, help="profiled steps for the device time")
    p.add_argument("--host_table", action="store_true", help="print each row's ops by host time (profiler)")
    p.add_argument("--device_table", type=int, default=0, metavar="N",
                   help="print each row's N device kernels that took the most time (profiler)")
    p.add_argument("--first_step_profile", type=int, default=0, metavar="N",
                   help="print the first step's compile phases and its N costliest functions (cProfile)")
    harness.add_out_argument(p, "train")
    args = p.parse_args()

    on_gpu = harness.on_gpu()
    device = "cuda" if on_gpu else "cpu"
    rt = Runtime(device, device, torch.bfloat16 if on_gpu else torch.float32, False, 0, 0, 1)
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        print("no GPU: tiny shapes on the CPU, eager only; these numbers say nothing about speed")
        args.modes = ["eager"]
    shapes, latents = (GPU_SHAPES, LATENTS) if on_gpu else (CPU_SHAPES, CPU_LATENTS)
    variants = [v if v == "mha" else f"{v}-{latent}" for v in args.variants
                for latent in ([None] if v == "mha" else args.latents)]
    peak_flops = matmul_rate(device) if on_gpu else None
    env = harness.environment(rt.ptdtype)
    settings = {"bf16_matmul_tflops": None if peak_flops is None else peak_flops / 1e12}
    out = harness.results_path(args.out, "train")
    earlier = harness.read_rows(out) if Path(out).exists() else []
    earlier = earlier if harness.is_result_rows(earlier) else []  # a file in another layout is replaced
    rows, failed = [], []
    with tempfile.TemporaryDirectory() as data_dir:
        jobs = [(shape, T, B, mode, variant) for shape in args.shapes for T, B in shapes[shape][1]
                if not args.T or T in args.T for mode in args.modes for variant in variants]
        for i, (shape, T, B, mode, variant) in enumerate(jobs, 1):
            try:
                row = run_row(variant, mode, shape, shapes[shape][0], T, B, args, rt, data_dir, peak_flops, latents)
            except Exception as e:  # a failed row is reported as one, and the others still run
                print(f"[{i}/{len(jobs)}] FAILED {shape} T {T} {mode} {variant}: {type(e).__name__}: {e}", flush=True)
                failed.append((shape, T, mode, variant))
                continue
            rows.append(row)
            print(f"[{i}/{len(jobs)}] {shape} T {T} B {B} {mode} {variant}: {row['ms_per_step']:.2f} ms/step, "
                  f"{row['tokens_per_s']:,.0f} tokens/s, first step {row['first_step_s']:.1f} s", flush=True)
            write(out, earlier, rows, env, settings, plot=None)  # each row kept as soon as it is measured
    if rows:
        kept = write(out, earlier, rows, env, settings, plot=plot)
        print_table(harness.measurements(kept))
    if failed:
        raise SystemExit(f"{len(failed)} row(s) failed: {failed}")


def write(out, earlier, measured, env, settings, plot):
    """The results file: the earlier rows this run did not measure again, then this run's. Returns all rows."""
    remeasured = {row_key(m) for m in measured}
    rows = [r for r in earlier if row_key(r) not in remeasured]
    rows += harness.result_rows("train", measured, UNITS, env, settings)
    harness.write_results(out, rows, plot)
    return rows


if __name__ == "__main__":
    main()
