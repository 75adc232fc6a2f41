"""cuda_graphs='step': the whole training iteration replayed as one CUDA graph trains exactly as
the uncaptured step does.

    PYTHONPATH=. python -m pytest tests/gpu/test_graphed_step.py

Two copies of one model (float32, no autocast, so both runs use the same kernels in the same
order) draw the same batches and follow the same changing learning rate, one through the
uncaptured `TrainStep`, one through the captured one. Losses and weights must agree to float32
rounding at every iteration, including those after the capture (the first CAPTURE_AFTER_ITERS run
uncaptured), so a learning rate or batch frozen into the graph would show. An eval before and after
training (as the trainer's) must agree too: a replayed graph updates weights without moving their
version counters, so anything cached on those counters would go stale in the graphed model only.
"""
import copy
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from mla_gpt.model import GPT, GPTConfig
from mla_gpt.train.batches import Batches
from mla_gpt.train.runtime import Runtime
from mla_gpt.train.step import TrainStep, capturable_optimizer, set_learning_rate

ITERS = TrainStep.CAPTURE_AFTER_ITERS + 4
VARIANTS = {
    "mha": dict(use_mla=False),
    "mla-kernels": dict(use_mla=True, attn_backend="triton"),
    "mla-kernels-expanded": dict(use_mla=True, attn_backend="triton", mla_path="expanded"),
    "mla-sdpa": dict(use_mla=True, attn_backend="sdpa"),
}


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens") / "train.bin"
    np.random.default_rng(0).integers(0, 97, 50_000, dtype=np.uint16).tofile(path)
    return path


def _trainer(model, token_file, cuda_graphs, grad_accum):
    rt = Runtime("cuda", "cuda", torch.float32, False, 0, 0, 1)
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cuda")
    if cuda_graphs == "step":
        capturable_optimizer(optimizer, "cuda")
    batches = Batches(token_file, 3, 77, "cuda", seed=0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    step = TrainStep(model, optimizer, scaler, batches, nullcontext(), grad_accum, 1.0, rt, cuda_graphs)
    return step, optimizer


def _eval_loss(model, tokens):
    """The loss of model in eval mode without autograd on tokens (B, T + 1), as the trainer's eval."""
    model.eval()
    with torch.no_grad():
        loss = model(tokens[:, :-1], tokens[:, 1:])[1].item()
    model.train()
    return loss


@pytest.mark.parametrize("grad_accum", [1, 2], ids=lambda n: f"accum{n}")
@pytest.mark.parametrize("variant", VARIANTS)
def test_graphed_step_trains_as_the_uncaptured_one(variant, grad_accum, token_file):
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=4, n_embd=96, vocab_size=97, block_size=77, dropout=0.0,
                       **VARIANTS[variant])
    reference_model = GPT(config).cuda()
    graphed_model = copy.deepcopy(reference_model)
    reference, reference_opt = _trainer(reference_model, token_file, "off", grad_accum)
    graphed, graphed_opt = _trainer(graphed_model, token_file, "step", grad_accum)
    val_tokens = torch.randint(0, 97, (3, 78), device="cuda")  # (B, T + 1)
    assert _eval_loss(graphed_model, val_tokens) == pytest.approx(_eval_loss(reference_model, val_tokens), rel=1e-5)
    for it in range(ITERS):
        lr = 1e-3 * (1 + it) / ITERS  # changes every iteration: must reach the captured optimizer step
        set_learning_rate(reference_opt, lr)
        set_learning_rate(graphed_opt, lr)
        want, got = reference().item(), graphed().item()
        assert got == pytest.approx(want, rel=1e-5), f"iteration {it}"
    assert graphed.graph is not None, "the step was never captured"
    for (name, want), got in zip(reference_model.named_parameters(), graphed_model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    want, got = _eval_loss(reference_model, val_tokens), _eval_loss(graphed_model, val_tokens)
    assert got == pytest.approx(want, rel=1e-4), "eval after the graphed steps"
