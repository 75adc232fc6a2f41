"""GPT with nanoGPT's interface; its attention is standard or Multi-Head Latent Attention.

Generation keeps a preallocated per-layer cache (latents only for MLA): the prompt is
prefilled once, then each new token is one step over the cache.
"""
import inspect
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from mla_gpt.model.attention import CausalSelfAttention, LatentExpansion, MultiHeadLatentAttention
from mla_gpt.model.core import cache_seqlens

A100_BF16_PEAK_FLOPS = 312e12  # nanoGPT's reference peak for MFU


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate=config.gelu_approximate)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        attention = MultiHeadLatentAttention if config.use_mla else CausalSelfAttention
        self.attn = attention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, cache_seqlens=None):
        x = x + self.attn(self.ln_1(x), cache, cache_seqlens)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        # scaled init of the residual projections, per GPT-2
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def get_num_params(self, non_embedding=True):
        """Parameter count; the position embeddings are left out by default (the token
        embeddings count, since they are tied to the output layer)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, LatentExpansion):
            module.reset_parameters()

    def forward(self, idx, targets=None, caches=None, input_pos=0, logits_at=None):
        """idx (B, T) token ids -> (logits, loss).

        With targets (B, T): logits (B, T, vocab) and the mean cross-entropy (-1 ignored).
        Without: logits of the last position only (B, 1, vocab), loss None; or of position
        logits_at[b] in row b, with logits_at a (B,) tensor (rows of different lengths).
        caches: one LatentKVCache per layer (from `setup_caches`); idx then holds the tokens at
        positions input_pos .. input_pos + T - 1 of each row. input_pos: 0 (training, eval, a
        prefill into empty caches), another int, or a device tensor of shape () or (B,), one
        position per row (decode steps: CUDA graphs, prompts of different lengths), which the
        caller keeps inside block_size; without caches it must be 0. It is turned into the one
        form the layers take by `mla_gpt.model.core.cache_seqlens`, whose docstring holds the
        rule. Passing caches asks for generation, whose kernels (the fused cache append, the
        decode kernel) have no backward: call it under torch.no_grad() or torch.inference_mode().
        """
        if caches is not None and torch.is_grad_enabled():
            raise RuntimeError("caches are for generation, which has no backward: call the model under "
                               "torch.no_grad() or torch.inference_mode() when passing caches")
        b, t = idx.size()
        limit = ("block_size", self.config.block_size)
        if caches is not None and caches[0].max_seq < limit[1]:
            limit = ("the caches' max_seq", caches[0].max_seq)
        seqlens = cache_seqlens(input_pos, b, t, limit, idx.device)  # None, or (b,) int32
        if caches is None and seqlens is not None:
            raise ValueError(f"input_pos without caches must be 0 (the call holds its whole context), got {input_pos}")
        pos = torch.arange(t, dtype=torch.long, device=idx.device)  # (t,)
        if seqlens is not None:
            pos = seqlens[:, None] + pos  # (b, t): each row from its own position
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (b, t, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if caches is None else caches[i], seqlens)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        else:
            last = x[:, -1:, :] if logits_at is None else x[torch.arange(b, device=x.device), logits_at][:, None]
            logits = self.lm_head(last)  # (b, 1, vocab)
            loss = None
        return logits, loss

    def crop_block_size(self, block_size):
        """Shrink the context (e.g. to fine-tune a model with a smaller block)."""
        if not 1 <= block_size <= self.config.block_size:
            raise ValueError(f"block_size must be in [1, {self.config.block_size}], got {block_size}")
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; weight decay on every parameter of 2 or more dims (matmuls, embeddings)."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops=A100_BF16_PEAK_FLOPS):
        """Model FLOPs utilization (PaLM appendix B), as a fraction of peak_flops."""
        cfg = self.config
        N = self.get_num_params()
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.head_size, cfg.block_size
        flops_per_token = 6 * N + 12 * L * H * Q * T
        flops_per_iter = flops_per_token * T * fwdbwd_per_iter
        return flops_per_iter / dt / peak_flops

    # ---- generation ----------------------------------------------------------------------

    def setup_caches(self, max_batch, max_seq, dtype=None):
        """One preallocated cache per layer; dtype defaults to the dtype activations will have."""
        device = self.lm_head.weight.device
        if dtype is None:
            dtype = self.lm_head.weight.dtype
            if torch.is_autocast_enabled(device.type):
                dtype = torch.get_autocast_dtype(device.type)
        return [block.attn.make_cache(max_batch, max_seq, dtype, device) for block in self.transformer.h]

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, cuda_graph=False, cache_dtype=None):
        """Yield max_new_tokens sampled tokens, each (B, 1), continuing idx (B, T).

        temperature 0 or top_k 1 is greedy. The prompt is prefilled into the caches once, then
        each step feeds one token. Past block_size the context slides (as nanoGPT crops it), so
        each further step recomputes the last block_size tokens. svd_mode='activation' is not
        causal and keeps no cache: every step recomputes the whole context.
        cuda_graph: capture the one-token step once (static shapes) and replay it (CUDA only).
        cache_dtype: the caches' dtype, by default the activations'; torch.float8_e4m3fn keeps the
        latents in fp8 with a float32 scale per position and group (half of bf16's bytes plus
        the scales), read as they are by the decode kernel: more context or rows per GPU, but
        a slower decode step than bf16 today (docs/decisions.md).
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        if cuda_graph and idx.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device, got idx on {idx.device}")
        block_size = self.config.block_size
        cached = all(block.attn.supports_cache for block in self.transformer.h)
        if not cached:
            warnings.warn("svd_mode='activation' is not causal: generation recomputes the whole "
                          "context at every step, without a KV cache", stacklevel=2)
        caches = step = None
        if cached:
            caches = self.setup_caches(idx.size(0), min(block_size, idx.size(1) + max_new_tokens), cache_dtype)
        tokens = idx
        for i in range(max_new_tokens):
            if i > 0 and cached and tokens.size(1) <= block_size:
                if step is None:
                    step = _DecodeStep(self, caches, tokens[:, -1:], cuda_graph)
                logits = step(tokens[:, -1:], tokens.size(1) - 1)
            else:
                logits, _ = self(tokens[:, -block_size:], caches=caches)
            next_token = _sample(logits[:, -1, :], temperature, top_k)  # (B, 1)
            yield next_token
            tokens = torch.cat((tokens, next_token), dim=1)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, cuda_graph=False, lengths=None,
                 stop_token=None, cache_dtype=None):
        """idx (B, T) -> (B, T + max_new_tokens), sampled with the KV cache (see generate_stream).

        Prompts of different lengths, in one batch: idx a list of 1-D token tensors, or a padded
        (B, T) batch with `lengths` (B,) (tokens past a row's length are ignored). Each row then
        runs at its own position in the cache (the prompts are prefilled together, right-padded,
        and each decode step feeds every row's token at that row's position), and the result is
        a list of 1-D tensors, each prompt followed by its new tokens. A row that samples
        stop_token ends there (the stop token included); its cache row is dropped from the batch,
        so finished rows cost no more work. Every prompt plus max_new_tokens must fit block_size.
        cache_dtype: as in `generate_stream`.
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
            new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, cuda_graph, cache_dtype))
            return torch.cat([idx, *new], dim=1)
        return self._generate_rows(prompts, max_new_tokens, temperature, top_k, cuda_graph, stop_token, cache_dtype)

    def _generate_rows(self, prompts, max_new_tokens, temperature, top_k, cuda_graph, stop_token, cache_dtype):
        """`generate` for prompts of different lengths: a list of 1-D tensors in, the same out."""
        if not prompts or any(p.dim() != 1 or p.numel() == 0 for p in prompts):
            raise ValueError("prompts must be a non-empty list of non-empty 1-D token tensors")
        if not all(block.attn.supports_cache for block in self.transformer.h):
            raise ValueError("prompts of different lengths need a KV cache; svd_mode='activation' keeps none")
        lengths = [p.numel() for p in prompts]
        max_seq = max(lengths) + max_new_tokens
        if max_seq > self.config.block_size:
            raise ValueError(f"the longest prompt ({max(lengths)} tokens) + max_new_tokens ({max_new_tokens}) "
                             f"must fit block_size={self.config.block_size}")
        device = prompts[0].device
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device, got prompts on {device}")
        B = len(prompts)
        padded = torch.zeros(B, max(lengths), dtype=torch.long, device=device)  # (B, T), right-padded
        for row, prompt in enumerate(prompts):
            padded[row, : prompt.numel()] = prompt
        positions = torch.tensor(lengths, device=device)  # (B,) where each row's next token goes
        caches = self.setup_caches(B, max_seq, cache_dtype)
        logits, _ = self(padded, caches=caches, logits_at=positions - 1)  # (B, 1, vocab)
        rows = torch.arange(B, device=device)  # which prompt each cache row holds
        generated = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)  # (B, max_new_tokens)
        n_generated = [max_new_tokens] * B  # per prompt; a row that stops early has fewer
        steps = {}  # decode step per batch size
        for i in range(max_new_tokens):
            token = _sample(logits[:, -1, :], temperature, top_k)  # (n, 1)
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
                steps[n] = _DecodeStep(self, caches, token, cuda_graph, positions)
            logits = steps[n](token, positions)
            positions = positions + 1
        return [torch.cat([prompt, generated[row, :n]]) for row, (prompt, n) in enumerate(zip(prompts, n_generated))]


class _DecodeStep:
    """One token through the model over the caches: logits (B, 1, vocab).

    Plain: the position is an int and each layer attends over the filled prefix. With
    cuda_graph: static shapes (the position lives in a device tensor, attention reads the whole
    cache with its valid length), captured once as a CUDA graph and replayed every step.
    positions: a (B,) tensor for rows at different positions (one per row, `generate` with
    prompts of different lengths); the step then takes (B,) positions, not an int.
    """

    def __init__(self, model, caches, token, cuda_graph, positions=None):
        self.model, self.caches, self.graph = model, caches, None
        if not cuda_graph:
            return
        self.token = token.clone()  # (B, 1)
        shape = () if positions is None else positions.shape
        self.position = torch.zeros(shape, dtype=torch.long, device=token.device)
        self.position.fill_(caches[0].max_seq - 1)  # warm up on the last slot: overwritten before it is read
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(self.token, caches=caches, input_pos=self.position)  # compiles kernels, no capture
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits, _ = model(self.token, caches=caches, input_pos=self.position)

    def __call__(self, token, position):
        if self.graph is None:
            return self.model(token, caches=self.caches, input_pos=position)[0]
        self.token.copy_(token)
        if isinstance(position, torch.Tensor):
            self.position.copy_(position)
        else:
            self.position.fill_(position)
        self.graph.replay()
        return self.logits


def _sample(logits, temperature, top_k):
    """logits (B, V) -> next token (B, 1)."""
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1)
