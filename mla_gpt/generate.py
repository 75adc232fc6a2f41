"""Generation with a GPT: the prompt is prefilled into preallocated caches once, then each new
token is one decode step over them (gpt-fast's layout: `prefill`, `decode_one_token`,
`decode_n_tokens`, `generate`).

Positions follow `mla_gpt.model.core.cache_seqlens`: a prefill starts every row at 0, a decode
step takes a (B,) int32 device tensor of each row's cached tokens, advanced on the device, so no
step waits on the host. `CUDAGraphed` captures a decode step once and replays it.
"""
import warnings

import torch
import torch.nn.functional as F


def sample(logits, temperature, top_k):
    """logits (B, V) -> next token (B, 1) int64; temperature 0 or top_k 1 is greedy."""
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1)


def prefill(model, idx, caches, logits_at=None):
    """idx (B, T) into empty caches (None: a model without them) -> logits (B, 1, vocab) of the
    last position, or of position logits_at[b] in row b (a (B,) tensor: right-padded prompts)."""
    return model(idx, caches=caches, logits_at=logits_at)[0]


def decode_one_token(model, caches, token, positions):
    """token (B, 1) at positions (B,) int32 (each row's cached tokens) -> logits (B, 1, vocab)."""
    return model(token, caches=caches, input_pos=positions)[0]


class CUDAGraphed:
    """fn captured once as a CUDA graph over static copies of its tensor inputs, then replayed.

    The first run happens on the given inputs, outside the capture (it compiles and autotunes the
    kernels, which a capture cannot); calling copies new inputs of the same shapes into the static
    ones and replays. The output is the captured one, overwritten by the next replay.
    """

    def __init__(self, fn, *inputs):
        self.inputs = [t.clone() for t in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = fn(*self.inputs)

    def __call__(self, *inputs):
        for static, new in zip(self.inputs, inputs, strict=True):
            static.copy_(new)
        self.graph.replay()
        return self.output


def decode_step(model, caches, token, positions, cuda_graph):
    """`decode_one_token` over these caches as a function of (token (B, 1), positions (B,)); with
    cuda_graph, captured for this batch size from the given token and positions, then replayed.
    A decode step writes the same cache slots it reads, so the capture's first run is a real step."""
    def step(token, positions):
        return decode_one_token(model, caches, token, positions)

    return CUDAGraphed(step, token, positions) if cuda_graph else step


def decode_n_tokens(model, caches, token, positions, n, temperature, top_k, cuda_graph):
    """Yield n tokens (B, 1), each sampled from a decode step on the one before, starting from
    token (B, 1) at positions (B,) int32 (advanced in place)."""
    step = decode_step(model, caches, token, positions, cuda_graph)
    for _ in range(n):
        logits = step(token, positions)
        positions += 1
        token = sample(logits[:, -1, :], temperature, top_k)  # (B, 1)
        yield token


def _check_sampling(temperature, top_k, cuda_graph, device, what):
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, got {what} on {device}")


def _next_from_context(model, tokens, caches, temperature, top_k):
    """The token after tokens (B, T), from a prefill of its last block_size: (B, 1)."""
    logits = prefill(model, tokens[:, -model.config.block_size:], caches)  # (B, 1, vocab)
    return sample(logits[:, -1, :], temperature, top_k)


@torch.no_grad()
def generate_stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, cuda_graph=False, cache_dtype=None):
    """Yield max_new_tokens sampled tokens, each (B, 1), continuing idx (B, T).

    temperature 0 or top_k 1 is greedy. The prompt is prefilled into the caches once, then each
    token is one decode step. Past block_size the context slides (as nanoGPT crops it): each
    further token prefills the last block_size tokens afresh. svd_mode='activation' is not causal
    and keeps no cache: every token recomputes the whole context.
    cuda_graph: capture the decode step once (static shapes) and replay it (CUDA only).
    cache_dtype: the caches' dtype, by default the activations'; torch.float8_e4m3fn keeps the
    latents in fp8 with a float32 scale per position and group (half of bf16's bytes plus the
    scales), read as they are by the decode kernel: more context or rows per GPU, and a faster
    decode step with one latent per head, a slower one with a joint latent (docs/decisions.md).
    """
    _check_sampling(temperature, top_k, cuda_graph, idx.device, "idx")
    if max_new_tokens < 1:
        return
    block_size = model.config.block_size
    cached = all(block.attn.supports_cache for block in model.transformer.h)
    if not cached:
        warnings.warn("svd_mode='activation' is not causal: generation recomputes the whole "
                      "context at every step, without a KV cache", stacklevel=2)
    B, T = idx.shape
    caches = model.setup_caches(B, min(block_size, T + max_new_tokens), cache_dtype) if cached else None
    token = _next_from_context(model, idx, caches, temperature, top_k)  # (B, 1)
    yield token
    tokens = torch.cat((idx, token), dim=1)  # (B, T + 1)
    decoded = max(0, min(max_new_tokens - 1, block_size - T)) if cached else 0  # tokens inside block_size
    if decoded:
        positions = torch.full((B,), T, dtype=torch.int32, device=idx.device)  # (B,) where the token goes
        for token in decode_n_tokens(model, caches, token, positions, decoded, temperature, top_k, cuda_graph):
            yield token
            tokens = torch.cat((tokens, token), dim=1)
    for _ in range(max_new_tokens - 1 - decoded):  # past block_size (or without caches)
        token = _next_from_context(model, tokens, caches, temperature, top_k)
        yield token
        tokens = torch.cat((tokens, token), dim=1)


@torch.no_grad()
def generate_rows(model, prompts, max_new_tokens, temperature=1.0, top_k=None, cuda_graph=False, stop_token=None,
                  cache_dtype=None):
    """Prompts of different lengths in one batch: a list of 1-D token tensors in, the same out,
    each prompt followed by its new tokens.

    The prompts are prefilled together, right-padded; each decode step feeds every row's token
    at that row's own position in the cache. A row that samples stop_token ends there (the stop
    token included); its cache row is dropped from the batch, so finished rows cost no more work.
    Every prompt plus max_new_tokens must fit block_size.
    """
    if not prompts or any(p.dim() != 1 or p.numel() == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty 1-D token tensors")
    if not all(block.attn.supports_cache for block in model.transformer.h):
        raise ValueError("prompts of different lengths need a KV cache; svd_mode='activation' keeps none")
    lengths = [p.numel() for p in prompts]
    max_seq = max(lengths) + max_new_tokens
    if max_seq > model.config.block_size:
        raise ValueError(f"the longest prompt ({max(lengths)} tokens) + max_new_tokens ({max_new_tokens}) "
                         f"must fit block_size={model.config.block_size}")
    device = prompts[0].device
    _check_sampling(temperature, top_k, cuda_graph, device, "prompts")
    B = len(prompts)
    padded = torch.zeros(B, max(lengths), dtype=torch.long, device=device)  # (B, T), right-padded
    for row, prompt in enumerate(prompts):
        padded[row, : prompt.numel()] = prompt
    positions = torch.tensor(lengths, dtype=torch.int32, device=device)  # (B,) where each row's next token goes
    caches = model.setup_caches(B, max_seq, cache_dtype)
    logits = prefill(model, padded, caches, logits_at=positions - 1)  # (B, 1, vocab)
    rows = torch.arange(B, device=device)  # which prompt each cache row holds
    generated = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)  # (B, max_new_tokens)
    n_generated = [max_new_tokens] * B  # per prompt; a row that stops early has fewer
    steps = {}  # decode step per batch size
    for i in range(max_new_tokens):
        token = sample(logits[:, -1, :], temperature, top_k)  # (n, 1)
        generated[rows, i] = token[:, 0]  # on the device: no host work per row and token
        if i == max_new_tokens - 1:
            break
        if stop_token is not None:
            going = token[:, 0] != stop_token  # (n,)
            if not bool(going.all()):  # one sync per step, only when stopping is asked for
                for row in rows[~going].tolist():
                    n_generated[row] = i + 1  # its stop token included
                keep = going.nonzero()[:, 0]  # (n',)
                if keep.numel() == 0:
                    break
                for cache in caches:
                    cache.keep_rows(keep)
                rows, positions, token = rows[keep], positions[keep], token[keep]
        n = rows.numel()
        if n not in steps:
            steps[n] = decode_step(model, caches, token, positions, cuda_graph)
        logits = steps[n](token, positions)  # (n, 1, vocab)
        positions = positions + 1
    return [torch.cat([prompt, generated[row, :n]]) for row, (prompt, n) in enumerate(zip(prompts, n_generated))]


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, cuda_graph=False, lengths=None,
             stop_token=None, cache_dtype=None):
    """idx (B, T) -> (B, T + max_new_tokens), sampled with the KV cache (`generate_stream`).

    Prompts of different lengths, in one batch: idx a list of 1-D token tensors, or a padded
    (B, T) batch with `lengths` (B,) (tokens past a row's length are ignored); the result is then
    a list of 1-D tensors, each prompt followed by its new tokens (`generate_rows`, which a
    stop_token also takes). cache_dtype: as in `generate_stream`.
    """
    if isinstance(idx, (list, tuple)):
        if lengths is not None:
            raise ValueError("lengths goes with a padded (B, T) batch; a list of prompts carries its own")
        prompts = list(idx)
    elif lengths is not None or stop_token is not None:
        lengths = [idx.size(1)] * idx.size(0) if lengths is None else torch.as_tensor(lengths).tolist()
        if len(lengths) != idx.size(0) or not all(1 <= n <= idx.size(1) for n in lengths):
            raise ValueError(f"lengths must hold {idx.size(0)} values in [1, {idx.size(1)}], got {lengths}")
        prompts = [row[:n] for row, n in zip(idx, lengths)]
    else:
        new = list(generate_stream(model, idx, max_new_tokens, temperature, top_k, cuda_graph, cache_dtype))
        return torch.cat([idx, *new], dim=1)
    return generate_rows(model, prompts, max_new_tokens, temperature, top_k, cuda_graph, stop_token, cache_dtype)
