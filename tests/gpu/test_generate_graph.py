"""Generation with its decode step replayed from a CUDA graph equals it run eagerly.

    PYTHONPATH=. python -m pytest tests/gpu/test_generate_graph.py

Greedy, float32 weights on the kernels (the fused cache append and the decode kernel in each
step): the same tokens with cuda_graph=True as without, for prompts of one length (past
block_size too, where the context slides) and of different lengths with a stop token (a new
graph per batch size as rows finish), on bf16 and fp8 caches.
"""
import pytest
import torch
from helpers import SMALL_GPT, SMALL_GPT_VARIANTS

from mla_gpt.model import GPT, GPTConfig
from mla_kernels.reference import FP8_DTYPE

DEVICE = "cuda"
VARIANTS = ["standard-kernels", "mla-kernels", "mla-g1-joint-kernels", "mla-svd-weight-kernels"]


def _model(variant):
    torch.manual_seed(0)
    return GPT(GPTConfig(**SMALL_GPT, **SMALL_GPT_VARIANTS[variant])).to(DEVICE).eval()


@pytest.mark.parametrize("cache_dtype", [None, FP8_DTYPE], ids=["cache-default", "cache-fp8"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_graphed_generation_equals_eager(variant, cache_dtype):
    if cache_dtype is not None and variant != "mla-kernels":
        pytest.skip("the fp8 cache is checked on the default MLA layout")
    model = _model(variant)
    prompt = torch.randint(0, SMALL_GPT["vocab_size"], (3, 9), device=DEVICE)
    new = SMALL_GPT["block_size"] - 9 + 4  # 4 tokens past block_size: the sliding window after the graph
    eager = model.generate(prompt, new, temperature=0, cache_dtype=cache_dtype)
    graphed = model.generate(prompt, new, temperature=0, cuda_graph=True, cache_dtype=cache_dtype)
    assert torch.equal(graphed, eager), f"{graphed.tolist()} vs {eager.tolist()}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_graphed_rows_of_different_lengths_equal_eager(variant):
    model = _model(variant)
    prompts = [torch.randint(0, SMALL_GPT["vocab_size"], (n,), device=DEVICE) for n in (3, 11, 6, 1)]
    first = model.generate(prompts, 8, temperature=0)
    stop = int(first[1][11 + 2])  # row 1 stops at its third new token, so the batch shrinks
    eager = model.generate(prompts, 8, temperature=0, stop_token=stop)
    graphed = model.generate(prompts, 8, temperature=0, stop_token=stop, cuda_graph=True)
    for row, (got, want) in enumerate(zip(graphed, eager)):
        assert torch.equal(got, want), f"row {row}: {got.tolist()} vs {want.tolist()}"
