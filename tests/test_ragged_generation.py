"""Prompts of different lengths generated in one batch equal each prompt generated alone.

Greedy, float32 on a CPU (the kernels through the Triton interpreter), for standard attention
and every MLA cache layout, on each backend; rows that sample the stop token leave the batch.
"""
import pytest
import torch
from helpers import SMALL_GPT, SMALL_GPT_VARIANTS, small_gpt

LENGTHS = (3, 11, 6, 1)  # longer and shorter than the 16 queries a decode step takes at most
NEW_TOKENS = 7


def _prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, SMALL_GPT["vocab_size"], (n,), generator=g) for n in LENGTHS]


@pytest.mark.parametrize("variant", list(SMALL_GPT_VARIANTS))  # every backend and cache layout
def test_batch_of_different_lengths_equals_each_prompt_alone(variant):
    model, prompts = small_gpt(variant), _prompts()
    alone = [model.generate(p[None], NEW_TOKENS, temperature=0)[0] for p in prompts]
    together = model.generate(prompts, NEW_TOKENS, temperature=0)
    assert len(together) == len(prompts)
    for row, (got, want) in enumerate(zip(together, alone)):
        assert torch.equal(got, want), f"row {row} (prompt of {LENGTHS[row]} tokens): {got.tolist()} vs {want.tolist()}"


def test_padded_batch_with_lengths_equals_the_list():
    model, prompts = small_gpt("mla-kernels"), _prompts()
    padded = torch.full((len(prompts), max(LENGTHS)), 7)  # padding tokens past each length are ignored
    for row, p in enumerate(prompts):
        padded[row, : p.numel()] = p
    from_list = model.generate(prompts, NEW_TOKENS, temperature=0)
    from_padded = model.generate(padded, NEW_TOKENS, temperature=0, lengths=torch.tensor(LENGTHS))
    assert all(torch.equal(a, b) for a, b in zip(from_list, from_padded))


def test_rows_end_at_the_stop_token_and_the_rest_go_on():
    model, prompts = small_gpt("mla-kernels"), _prompts()
    alone = [model.generate(p[None], NEW_TOKENS, temperature=0)[0] for p in prompts]
    stop = int(alone[1][LENGTHS[1] + 2])  # row 1's third new token
    together = model.generate(prompts, NEW_TOKENS, temperature=0, stop_token=stop)
    for row, (got, want) in enumerate(zip(together, alone)):
        new = want[LENGTHS[row]:].tolist()
        cut = LENGTHS[row] + (new.index(stop) + 1 if stop in new else NEW_TOKENS)
        assert torch.equal(got, want[:cut]), f"row {row}: {got.tolist()} vs {want[:cut].tolist()}"
    assert together[1].numel() < LENGTHS[1] + NEW_TOKENS, "row 1 did not stop"


def test_finished_rows_leave_the_cache():
    """After a row stops, the decode steps run on fewer rows (the caches are compacted)."""
    model, prompts = small_gpt("mla-kernels"), _prompts()
    alone = model.generate(prompts[1][None], NEW_TOKENS, temperature=0)[0]
    stop = int(alone[LENGTHS[1]])  # row 1 stops at its first new token
    batch_sizes = []
    hook = model.transformer.h[0].attn.register_forward_pre_hook(lambda _, args: batch_sizes.append(args[0].size(0)))
    model.generate(prompts, NEW_TOKENS, temperature=0, stop_token=stop)
    hook.remove()
    assert batch_sizes[0] == len(prompts) and min(batch_sizes) < len(prompts)


@pytest.mark.parametrize("bad, message", [
    (dict(idx=[torch.tensor([1, 2]), torch.tensor([], dtype=torch.long)]), "non-empty 1-D token tensors"),
    (dict(idx=[torch.arange(30)]), r"the longest prompt \(30 tokens\) \+ max_new_tokens \(7\) must fit block_size=32"),
    (dict(idx=torch.zeros(2, 5, dtype=torch.long), lengths=[5, 6]), r"lengths must hold 2 values in \[1, 5\]"),
], ids=["empty-prompt", "past-block", "bad-lengths"])
def test_bad_batches_are_refused_with_the_reason(bad, message):
    model = small_gpt("mla-sdpa")
    with pytest.raises(ValueError, match=message):
        model.generate(max_new_tokens=NEW_TOKENS, temperature=0, **bad)
