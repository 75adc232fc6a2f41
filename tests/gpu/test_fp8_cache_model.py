"""An fp8 latent cache against the bf16 cache, on a model this project trains (random weights'
logits tie, so only a trained model's greedy tokens say anything).

    PYTHONPATH=. python -m pytest tests/gpu/test_fp8_cache_model.py

A 6-layer MLA char model (r 32, the kernels) trains for TRAIN_ITERS iterations on the bundled
Shakespeare corpus; then, over val batches, the loss teacher-forced through the caches (a prefill of
PREFILL tokens, then one token per decode step) with an fp8 cache is within 0.5% of the bf16
cache's, and the greedy token at each step (both caches fed the same val tokens) agrees on most steps.
"""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import run_train

from mla_gpt.cli.checkpoint import CHECKPOINT_NAME, load_checkpoint, model_from_checkpoint
from mla_gpt.data import prepare
from mla_kernels.reference import FP8_DTYPE

REPO = Path(__file__).resolve().parents[2]

TRAIN_ITERS = 600
PREFILL, DECODE = 64, 128  # tokens prefilled, then fed one per step through the cache
BATCH = 16
LOSS_RTOL = 0.005  # the fp8 cache's bound: val loss within 0.5% of the bf16 cache's
GREEDY_AGREEMENT = 0.95  # teacher-forced greedy tokens equal to the bf16 cache's (98.7% for a small fp32
# model trained on the CPU)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("char-mla")
    args = [str(REPO / "config" / "train_shakespeare_char.py"), f"--out_dir={out_dir}", f"--max_iters={TRAIN_ITERS}",
            f"--lr_decay_iters={TRAIN_ITERS}", "--eval_interval=300", "--eval_iters=20", "--log_interval=100",
            "--use_mla=True", "--mla_latent_dim=32", "--dropout=0.0",
            "--compile=False"]  # the step is still captured as a CUDA graph: quick to start, quick to run
    summary = run_train(args)
    checkpoint = load_checkpoint(out_dir / CHECKPOINT_NAME, map_location="cpu")
    model = model_from_checkpoint(checkpoint, dropout=0.0).to("cuda", torch.bfloat16).eval()
    return model, summary


def _val_tokens():
    """BATCH windows of PREFILL + DECODE + 1 tokens of the val split the run prepared (fixed seed)."""
    data = np.memmap(prepare.PACKAGE_DIR / "shakespeare_char" / "val.bin", dtype=np.uint16, mode="r")
    rng = np.random.default_rng(0)
    starts = rng.integers(0, len(data) - PREFILL - DECODE - 1, BATCH)
    windows = np.stack([data[s : s + PREFILL + DECODE + 1].astype(np.int64) for s in starts])
    return torch.from_numpy(windows).cuda()  # (BATCH, PREFILL + DECODE + 1)


@torch.no_grad()
def _teacher_forced_logits(model, tokens, cache_dtype):
    """Logits (BATCH, DECODE, vocab), float32, of each token after the prefill, predicted through the
    caches from the val tokens before it (not from the model's own samples)."""
    caches = model.setup_caches(tokens.size(0), PREFILL + DECODE, cache_dtype)
    model(tokens[:, :PREFILL], caches=caches, input_pos=0)
    logits = [model(tokens[:, pos : pos + 1], caches=caches, input_pos=pos)[0][:, -1].float()
              for pos in range(PREFILL, PREFILL + DECODE)]  # each predicts token pos + 1
    return torch.stack(logits, dim=1)


def test_fp8_cache_val_loss_within_half_a_percent(trained):
    model, summary = trained
    assert summary["val_loss"] < 2.2, f"the model did not train (val loss {summary['val_loss']})"
    tokens = _val_tokens()
    targets = tokens[:, PREFILL + 1 :].reshape(-1)
    bf16, fp8 = (F.cross_entropy(_teacher_forced_logits(model, tokens, dtype).flatten(0, 1), targets).item()
                 for dtype in (None, FP8_DTYPE))
    assert math.isfinite(fp8) and abs(fp8 - bf16) <= LOSS_RTOL * bf16, f"fp8 {fp8:.4f} vs bf16 {bf16:.4f}"


def test_fp8_cache_greedy_tokens_agree_with_bf16(trained):
    """The greedy token at each step, both caches fed the same val tokens. Free-running generations
    are no measure: one early near-tie flip changes every token after it (on the H200, 65% of 64
    free-running tokens per prompt agreed, with the val loss within 0.5%)."""
    model, _ = trained
    tokens = _val_tokens()
    bf16, fp8 = (_teacher_forced_logits(model, tokens, dtype).argmax(-1) for dtype in (None, FP8_DTYPE))
    agreement = (bf16 == fp8).float().mean().item()
    assert agreement >= GREEDY_AGREEMENT, f"greedy tokens equal on {100 * agreement:.1f}%"
