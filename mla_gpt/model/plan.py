"""Which form and attention core an MLA layer runs, from timings measured once per GPU kind.

An MLA layer computes the same attention in three forms (docs/design.md, section 2):
- 'absorbed': the core over the latents themselves (head dims r and rv, g KV heads), the
  expansions composed into the query and output projections;
- 'expanded': our fused kernel, which builds each K/V tile on chip from the latent tiles (once
  per query block: the recompute is in its measured time);
- 'materialized': K and V expanded once per layer by one GEMM each, the core at the head size.
Its core runs on our Triton kernel ('triton') or on PyTorch's SDPA restricted to cuDNN ('cudnn')
or FlashAttention-2 ('flash'), or with PyTorch's own pick ('sdpa').

`choose` takes the layer's shape, the sequence length, dtype, whether gradients flow and the GPU,
and returns the (form, core) the table of that GPU kind (`tables/<gpu kind>.json`, written by
`python bench/backends.py`) measured fastest at the nearest length. A shape or GPU the tables do
not hold gets the rule in `_rule`. The choice depends on nothing but these arguments, so it is
made before a CUDA graph is captured and stays the same for every replay; torch.compile traces
through it (the GPU's name is read once per device, outside the graph).
"""
import functools
import json
from pathlib import Path

import torch

from mla_gpt.model.costs import mla_form_costs

FORMS = ("absorbed", "expanded", "materialized")
CORES = ("triton", "cudnn", "flash", "sdpa")
TABLES_DIR = Path(__file__).with_name("tables")
# Our kernel beats cuDNN at core head dims up to this on the H200 (1.1-1.5x at 16 and 32, 0.76-0.93x
# at 64 and 128: bench/results/core_variants_h200.json). `_rule` applies it to other Hopper GPUs.
TRITON_MAX_HEAD_DIM = 32
TUNED_ARCH = 9  # compute capability major the kernels' tiles were chosen on (sm_90)


DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def layer_key(n_embd, n_head, head_size, latent_dim, value_dim, groups, joint, dtype):
    """The shape a table row is measured at, as a tuple: dims as ints, joint as a bool, dtype a name
    (a torch.dtype or its name)."""
    name = dtype if isinstance(dtype, str) else DTYPE_NAMES.get(dtype, "other")
    return (int(n_embd), int(n_head), int(head_size), int(latent_dim), int(value_dim), int(groups),
            bool(joint), name)


def _load_tables(directory=TABLES_DIR):
    """{gpu kind: {layer_key: [(T, {(form, core): (fwd_ms, fwd_bwd_ms)}), ...] by T}} from the files."""
    tables = {}
    for path in sorted(directory.glob("*.json")):
        by_shape = {}
        for row in json.loads(path.read_text()):
            if row.get("benchmark") != "backends" or row["metric"] not in ("fwd_ms", "fwd_bwd_ms"):
                continue
            key = layer_key(row["n_embd"], row["n_head"], row["head_size"], row["latent_dim"],
                            row["value_dim"], row["groups"], row["joint"], row["dtype"])
            per_t = by_shape.setdefault(key, {}).setdefault(int(row["T"]), {})
            form, core = row["provider"].split("/")
            times = per_t.setdefault((form, core), [None, None])
            times[row["metric"] == "fwd_bwd_ms"] = float(row["value"])
        tables[path.stem] = {key: sorted((t, {fc: tuple(ms) for fc, ms in plans.items()})
                                         for t, plans in per_t.items()) for key, per_t in by_shape.items()}
    return tables


TABLES = _load_tables()


@torch.compiler.assume_constant_result
def gpu_kind(index):
    """The table name of CUDA device `index`: its name in lower case, words joined by '_'
    ('NVIDIA H200' -> 'nvidia_h200'), then '@<compute capability major>' for `_rule`. Read once per
    device: eager layers ask at every call."""
    return _gpu_kind(index)


@functools.cache
def _gpu_kind(index):
    name = "_".join(torch.cuda.get_device_name(index).lower().replace("-", " ").split())
    return f"{name}@{torch.cuda.get_device_capability(index)[0]}"


def candidates(core, form):
    """(form, core) pairs a layer may run: core 'auto' allows every core; 'expanded' exists only
    on our kernel."""
    cores = CORES if core == "auto" else (core,)
    forms = FORMS if form == "auto" else (form,)
    return [(f, c) for f in forms for c in cores if f != "expanded" or c == "triton"]


def _nearest(entries, seq_len):
    """The entry measured at the length nearest seq_len by ratio (the longer one on a tie), in
    integer arithmetic, which torch.compile traces on a symbolic length too."""
    best = entries[0]
    for entry in entries[1:]:
        hi, lo = max(entry[0], seq_len), min(entry[0], seq_len)
        best_hi, best_lo = max(best[0], seq_len), min(best[0], seq_len)
        if hi * best_lo < best_hi * lo or (hi * best_lo == best_hi * lo and entry[0] > best[0]):
            best = entry
    return best


def cheapest_form(shape, seq_len, forms):
    """The form of `forms` the FLOP model (`costs.mla_form_costs`) finds cheapest for shape
    (`layer_key`) at seq_len; ties go to the first in FORMS."""
    n_embd, n_head, _, latent_dim, value_dim = shape[:5]
    costs = mla_form_costs(seq_len, n_embd, n_head, latent_dim, value_dim)
    best = None
    for form in FORMS:  # a loop, not min(key=): Dynamo breaks the graph on a keyed min
        if form in forms and (best is None or costs[form] < costs[best]):
            best = form
    return best


def _rule(pairs, shape, seq_len, arch):
    """The choice without a measured table: the form the FLOP model finds cheapest; its core ours
    where the core's head dim is at most TRITON_MAX_HEAD_DIM on the architecture the kernels were
    tuned on, PyTorch's SDPA (tuned by PyTorch for every GPU) otherwise."""
    head_size, latent_dim, value_dim = shape[2:5]
    form = cheapest_form(shape, seq_len, {f for f, _ in pairs})
    head_dim = max(latent_dim, value_dim) if form == "absorbed" else head_size
    ours = arch == TUNED_ARCH and head_dim <= TRITON_MAX_HEAD_DIM
    cores = [c for f, c in pairs if f == form]
    for core in (("triton", "sdpa") if ours else ("sdpa", "cudnn", "flash", "triton")):
        if core in cores:
            return form, core
    return form, cores[0]


def choose(shape, seq_len, training, kind, core="auto", form="auto"):
    """(form, core) for one MLA layer call on a CUDA GPU.

    shape: `layer_key(...)`; seq_len: the call's length; training: whether gradients flow (timed
    forward + backward, else forward alone); kind: `gpu_kind(device index)`; core, form: the
    layer's attn_backend ('auto', 'triton', 'cudnn', 'flash', 'sdpa') and mla_path ('auto' or a
    form), which narrow the candidates.
    """
    pairs = candidates(core, form)
    if not pairs:  # 'expanded' forced on a core that cannot fuse it: the layer runs the same math materialized
        return form, core
    name, arch = kind.rsplit("@", 1)
    entries = TABLES.get(name, {}).get(shape)
    if entries:
        plans = _nearest(entries, seq_len)[1]
        metric = 1 if training else 0  # (fwd_ms, fwd_bwd_ms)
        timed = [(plans[p][metric], p) for p in pairs if p in plans and plans[p][metric] is not None]
        if timed:
            return min(timed)[1]
    return _rule(pairs, shape, seq_len, int(arch))
