"""The per-GPU table from which `mla_gpt.model.plan` chooses each MLA layer's form and core.

    python bench/backends.py --out mla_gpt/model/tables/nvidia_h200.json     # on an H200
    python bench/backends.py --shapes gpt2-r32 --lengths 1024 4096           # a part of it

For every layer shape in SHAPES (the MLA layers of the shipped configs and of bench/train.py) and
every length T in LENGTHS (B = 16384 // T sequences, at least 1): `MultiHeadLatentAttention` with
its form (`mla_path`) and core (`attn_backend`) forced to each pair `plan.candidates('auto',
'auto')` allows but PyTorch's unrestricted pick ('sdpa'), float32 parameters under bf16 autocast as
the trainer runs them, dropout 0. Each is timed from CUDA-graph replay: the forward under no_grad
(eval, prefill) and forward + backward (a training micro-step). A pair that fails at a shape (a
backend that does not take it) prints its error and gets no row. Rows: provider 'form/core', the
layer's shape keys (`plan.layer_key`'s names), T, B, fwd_ms and fwd_bwd_ms; the file's name is the
GPU kind (`plan.gpu_kind` before its '@'). Without a GPU it times the reference at one small shape,
which says nothing about speed.
"""
import argparse

import harness  # first: it puts the repository root on sys.path
import torch

from mla_gpt.model import plan
from mla_gpt.model.attention import MultiHeadLatentAttention
from mla_gpt.model.config import GPTConfig

TOKENS = 16384  # B * T of every row
# name: the GPTConfig fields of one MLA layer
SHAPES = {
    "gpt2-r32": dict(n_embd=768, n_head=12),  # the default latent, r = hs / 2
    "gpt2-r192": dict(n_embd=768, n_head=12, mla_latent_dim=192),  # the custom config's attention without SVD
    "gpt2-joint-g1-r256": dict(n_embd=768, n_head=12, mla_latent_dim=256, mla_kv_groups=1, mla_joint_kv=True),
    "gpt2-r64": dict(n_embd=768, n_head=12, mla_latent_dim=64),  # r = hs
    "custom": dict(n_embd=768, n_head=12, mla_latent_dim=192, use_svd=True, svd_rank=32),  # config/train_mla_custom.py
    "char-r32": dict(n_embd=384, n_head=6),  # config/train_shakespeare_char.py with use_mla
    "char-r64": dict(n_embd=384, n_head=6, mla_latent_dim=64),  # bench/train.py's other latents at that width
    "char-r192": dict(n_embd=384, n_head=6, mla_latent_dim=192),
    "char-joint-g1-r256": dict(n_embd=384, n_head=6, mla_latent_dim=256, mla_kv_groups=1, mla_joint_kv=True),
    "test-r16": dict(n_embd=128, n_head=4, mla_latent_dim=16),  # config/train_mla_test.py
}
LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384)
SHAPE_LENGTHS = {"test-r16": (64, 128, 256)}  # the test config trains at T 64
REP_MS = 20  # graph replays per timing: about this many ms of work, ten times over (do_bench_cudagraph)


def layer_config(fields, form, core):
    return GPTConfig(block_size=max(LENGTHS), vocab_size=65, n_layer=1, dropout=0.0, bias=False,
                     use_mla=True, mla_path=form, attn_backend=core, **fields)


def shape_keys(layer):
    """The layer's shape as `plan.layer_key` names it, for the rows."""
    n_embd, n_head, head_size, latent_dim, value_dim, groups, joint, _ = plan.layer_key(
        layer.n_embd, layer.n_head, layer.head_size, layer.latent_dim, layer.value_dim, layer.n_groups,
        layer.joint_kv, torch.bfloat16)
    return dict(n_embd=n_embd, n_head=n_head, head_size=head_size, latent_dim=latent_dim,
                value_dim=value_dim, groups=groups, joint=joint)


def time_layer(layer, B, T, device, on_gpu):
    """(forward ms, forward + backward ms) of the layer at (B, T), from CUDA-graph replay on a GPU."""
    x = torch.randn(B, T, layer.n_embd, device=device, requires_grad=True)  # (B, T, C)
    dy = torch.randn(B, T, layer.n_embd, device=device, dtype=torch.bfloat16)  # (B, T, C)

    def forward():
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16):
            layer(x)

    def forward_backward():
        with torch.autocast(device.type, torch.bfloat16):
            y = layer(x)
        y.backward(dy)

    forward()  # autotunes and compiles outside the capture
    forward_backward()
    return (harness.median_ms(forward, graph=on_gpu, rep=REP_MS),
            harness.median_ms(forward_backward, graph=on_gpu, rep=REP_MS))


def measure(shapes, lengths, device, on_gpu):
    """Yield each job's measurements (one per pair that ran) as soon as its pairs are timed."""
    # PyTorch's own pick ('sdpa') is one of cuDNN, flash and its other kernels: the table times the
    # two it can be restricted to
    pairs = [p for p in plan.candidates("auto", "auto") if p[1] != "sdpa"] if on_gpu else [("absorbed", "reference")]
    jobs = [(name, T) for name in shapes for T in SHAPE_LENGTHS.get(name, LENGTHS) if T in lengths]
    for i, (name, T) in enumerate(jobs, 1):
        B = max(1, TOKENS // T)
        measured = []
        for form, core in pairs:
            torch.manual_seed(0)
            layer = MultiHeadLatentAttention(layer_config(SHAPES[name], form, core)).to(device)
            try:
                fwd, both = time_layer(layer, B, T, device, on_gpu)
            except Exception as error:  # a core that does not take this shape
                print(f"  {name} T{T} {form}/{core} failed: {str(error).splitlines()[0][:120]}", flush=True)
                continue
            measured.append(dict(provider=f"{form}/{core}", layer=name, **shape_keys(layer), T=T, B=B,
                                 fwd_ms=fwd, fwd_bwd_ms=both))
        ranked = sorted(measured, key=lambda m: m["fwd_bwd_ms"])
        listed = "  ".join(f"{m['provider']} {m['fwd_bwd_ms']:.3f}" for m in ranked)
        print(f"[{i}/{len(jobs)}] {name} T{T} B{B} fwd+bwd ms: {listed}", flush=True)
        yield measured


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--lengths", nargs="+", type=int, default=sorted({*LENGTHS, *SHAPE_LENGTHS["test-r16"]}),
                   help="only these of each shape's lengths")
    harness.add_out_argument(p, "backends")
    args = p.parse_args(argv)
    on_gpu = harness.on_gpu()
    device = torch.device("cuda" if on_gpu else "cpu")
    shapes, lengths = args.shapes, args.lengths
    if not on_gpu:
        print("no GPU: the reference at one small shape; these numbers say nothing about speed")
        shapes, lengths = ["test-r16"], [64]
    env, out, rows = harness.environment(torch.bfloat16), harness.results_path(args.out, "backends"), []
    for measured in measure(shapes, lengths, device, on_gpu):  # written after every job: a cut run keeps its rows
        rows += harness.result_rows("backends", measured, {"fwd_ms": "ms", "fwd_bwd_ms": "ms"}, env)
        harness.write_results(out, rows)


if __name__ == "__main__":
    main()
