"""GPT with nanoGPT's interface; its attention is standard or Multi-Head Latent Attention.

Generation (`mla_gpt.generate`) keeps a preallocated per-layer cache (latents only for MLA),
made by `GPT.setup_caches`: the prompt is prefilled once, then each new token is one step over
the cache.
"""
import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from mla_gpt import generate as generation
from mla_gpt.model import core
from mla_gpt.model.attention import CausalSelfAttention, LatentExpansion, MultiHeadLatentAttention
from mla_gpt.model.core import cache_seqlens
from mla_kernels.layer_norm import add_layer_norm
from mla_kernels.linear import decode_linear

A100_BF16_PEAK_FLOPS = 312e12  # nanoGPT's reference peak for MFU
# Backends whose generation fuses each residual add with the next layer norm (`add_layer_norm`);
# the others ('sdpa', 'cudnn', 'flash', 'reference') stay plain PyTorch, the peers it is measured against
FUSED_NORM_BACKENDS = ("auto", "triton")


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim, bias, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate=config.gelu_approximate)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))

    def generation_step(self, x):
        """The MLP of a generation call, x (B, T, C) -> (B, T, C): a decode step's few rows
        (`core.runs_decode_linear`) through `decode_linear`, GELU fused into c_fc (2 kernels
        instead of cuBLAS's 3-4); other calls through forward."""
        if not core.runs_decode_linear(x.numel() // x.shape[-1]) or (self.training and self.dropout.p > 0):
            return self.forward(x)
        activation = "gelu_tanh" if self.gelu.approximate == "tanh" else "gelu"
        h = decode_linear(x, self.c_fc.weight, self.c_fc.bias, activation)  # (B, T, 4C)
        return decode_linear(h, self.c_proj.weight, self.c_proj.bias)


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

    def generation_step(self, x, h, cache, cache_seqlens, next_norm):
        """The block over cached tokens. x: (B, T, C) the residual stream, h: (B, T, C) = ln_1(x).
        Returns (x after the block, next_norm of it), each (B, T, C), each residual add fused with
        the layer norm after it (`add_layer_norm`); ln_2 and next_norm are read, not called; the
        MLP is `MLP.generation_step`."""
        x, h = add_layer_norm(x, self.attn(h, cache, cache_seqlens), self.ln_2.weight, self.ln_2.bias, self.ln_2.eps)
        return add_layer_norm(x, self.mlp.generation_step(h), next_norm.weight, next_norm.bias, next_norm.eps)


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
        On the 'auto' and 'triton' backends generation runs `Block.generation_step`, which fuses
        each residual add with the next layer norm: Block.forward and the norms after the first
        ln_1 are not called as modules then (their hooks do not fire; the attention and MLP are).
        """
        if caches is not None and torch.is_grad_enabled():
            raise RuntimeError("caches are for generation, which has no backward: call the model under "
                               "torch.no_grad() or torch.inference_mode() when passing caches")
        if caches is not None and len(caches) != self.config.n_layer:
            raise ValueError(f"caches must hold one cache per layer (n_layer={self.config.n_layer}), got {len(caches)}")
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
        if caches is not None and self.config.attn_backend in FUSED_NORM_BACKENDS:
            x = self._generation_blocks(x, caches, seqlens)
        else:
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

    def _generation_blocks(self, x, caches, seqlens):
        """x (B, T, C) through the blocks over their caches, each residual add fused with the layer
        norm after it (`Block.generation_step`): 2 kernels per block fewer than add, then norm.
        -> ln_f of the last block's output, (B, T, C)."""
        blocks = self.transformer.h
        next_norms = [block.ln_1 for block in blocks[1:]] + [self.transformer.ln_f]
        h = blocks[0].ln_1(x)
        for block, cache, next_norm in zip(blocks, caches, next_norms):
            x, h = block.generation_step(x, h, cache, seqlens, next_norm)
        return h

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

    # ---- generation (mla_gpt.generate) --------------------------------------------------------

    def setup_caches(self, max_batch, max_seq, dtype=None):
        """One preallocated cache per layer; dtype defaults to the dtype activations will have."""
        device = self.lm_head.weight.device
        if dtype is None:
            dtype = self.lm_head.weight.dtype
            if torch.is_autocast_enabled(device.type):
                dtype = torch.get_autocast_dtype(device.type)
        return [block.attn.make_cache(max_batch, max_seq, dtype, device) for block in self.transformer.h]

    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, cuda_graph=False, cache_dtype=None):
        """Yield max_new_tokens sampled tokens, each (B, 1), continuing idx (B, T):
        `mla_gpt.generate.generate_stream` on this model, which documents the arguments."""
        return generation.generate_stream(self, idx, max_new_tokens, temperature, top_k, cuda_graph, cache_dtype)

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, cuda_graph=False, lengths=None,
                 stop_token=None, cache_dtype=None):
        """idx (B, T) -> (B, T + max_new_tokens), or a list of prompts of different lengths -> a list:
        `mla_gpt.generate.generate` on this model, which documents the arguments."""
        return generation.generate(self, idx, max_new_tokens, temperature, top_k, cuda_graph, lengths, stop_token,
                                   cache_dtype)
