"""What several test files share: closeness checks, the low-precision error rule, NaN poisoning,
the small generation GPT and a tiny training run.

`from helpers import ...` works in tests/ and tests/gpu alike: pytest puts this folder on sys.path
when it loads tests/conftest.py (its default `prepend` import mode), and `python test_x.py` from
tests/ has it there already.
"""
import torch

from mla_gpt.cli import train as train_cli
from mla_gpt.cli.configurator import load_config
from mla_gpt.cli.keys import ModelKeys, TrainConfig
from mla_gpt.data import prepare
from mla_gpt.model import GPT, GPTConfig


def dtype_name(dtype):
    """'float16' for torch.float16: the dtype part of a test id."""
    return str(dtype).removeprefix("torch.")


# ---- comparing with a reference ------------------------------------------------------------------

def assert_close(what, got, ref, atol, rtol, equal_nan=False):
    """Elementwise |got - ref| <= atol + rtol |ref|, compared in float64, shapes equal.

    A NaN fails, unless equal_nan and the reference holds a NaN there too (a poisoned slot that
    must stay unwritten). The message counts the elements off and names the first few."""
    got, ref = got.double(), ref.double()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)}, reference {tuple(ref.shape)}"
    err = (got - ref).abs()
    bad = ~(err <= atol + rtol * ref.abs())
    if equal_nan:
        bad &= ~(got.isnan() & ref.isnan())
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        worst = err[bad].nan_to_num(float("inf")).max().item()
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements off (the worst by {worst:.3e}; "
                             f"atol {atol}, rtol {rtol}); first at {idx}")


def rel_err(x, ref):
    """||x - ref|| / ||ref|| over the whole tensor, in float64."""
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm()).item()


def grads_by_name(model):
    """{parameter name: gradient} of the parameters that got one."""
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


# ---- the GPU tests' rule for low precision (flash-attention's criterion) -------------------------

ERR_FACTOR = 2.0  # ours may be off float64 by up to twice PyTorch's own low-precision result
ERR_FLOOR = {torch.bfloat16: 1e-4, torch.float16: 1e-5, torch.float32: 1e-6}  # relative: for tensors
# PyTorch happens to compute almost exactly


def assert_within_torch_error(checks):
    """checks: {name: (got, want64, torch_low, floor)}. Each got is finite and
    rel_err(got, want64) <= ERR_FACTOR x rel_err(torch_low, want64) + floor; on failure the
    message lists every check, the failing ones marked."""
    width = max(map(len, checks))
    rows, passed = [], True
    for name, (got, want64, torch_low, floor) in checks.items():
        e_got, e_torch = rel_err(got, want64), rel_err(torch_low, want64)
        ok = bool(torch.isfinite(got).all()) and e_got <= ERR_FACTOR * e_torch + floor
        passed &= ok
        rows.append(f"{name:>{width}}: ours {e_got:.3e}, torch {e_torch:.3e}, floor {floor:.0e}"
                    + ("" if ok else "  FAIL"))
    assert passed, f"relative error vs float64 (need ours <= {ERR_FACTOR} x torch + floor):\n" + "\n".join(rows)


# ---- poisoned inputs -----------------------------------------------------------------------------

def poison_past_lengths(lengths, *tensors):
    """NaN in every slot a kernel must not read: positions lengths[b]: of row b of each tensor
    (B, L, ...), in place; None entries (a joint latent's missing values) are skipped."""
    for b, n in enumerate(lengths):
        for t in tensors:
            if t is not None:
                t[b, n:] = float("nan")


# ---- the small GPT of the CPU generation tests ---------------------------------------------------

SMALL_GPT = dict(n_embd=64, n_head=4, n_layer=2, block_size=32, vocab_size=53, bias=True, dropout=0.0)
# every attention kind the generation path serves, by backend and latent cache layout
SMALL_GPT_VARIANTS = {
    "standard-sdpa": dict(use_mla=False, attn_backend="sdpa"),
    "standard-kernels": dict(use_mla=False, attn_backend="triton"),
    "mla-kernels": dict(use_mla=True, attn_backend="triton"),
    "mla-sdpa": dict(use_mla=True, attn_backend="sdpa"),
    "mla-reference": dict(use_mla=True, attn_backend="reference"),
    "mla-g1-joint-kernels": dict(use_mla=True, mla_kv_groups=1, mla_joint_kv=True, mla_latent_dim=24,
                                 attn_backend="triton"),
    "mla-svd-weight-kernels": dict(use_mla=True, use_svd=True, svd_rank=6, attn_backend="triton"),
}


def small_gpt(variant):
    """SMALL_GPT with SMALL_GPT_VARIANTS[variant], float32, eval mode, the weights of seed 0."""
    torch.manual_seed(0)
    return GPT(GPTConfig(**SMALL_GPT, **SMALL_GPT_VARIANTS[variant])).eval()


# ---- training runs -------------------------------------------------------------------------------

def prepare_corpus_slice(directory, chars):
    """shakespeare_char in `directory` from the first `chars` characters of the bundled corpus; its meta."""
    return prepare.prepare_char(directory, prepare.CORPUS_PATH.read_text()[:chars])


def run_train(args):
    """`train` on command-line arguments (a config file, --key=value): its summary."""
    return train_cli.train(load_config(args, TrainConfig, ModelKeys))
