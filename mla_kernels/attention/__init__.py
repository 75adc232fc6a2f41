"""Causal flash attention for MLA training: latent-space core and fused-expansion path.

Two entry points, both differentiable and registered as `torch.library.triton_op`s
(namespace `mla_kernels`) with autograd, so `torch.compile` traces through them without a
graph break and Inductor launches the Triton kernels from its own generated code, as it
launches its own (no per-call Python launcher, dispatcher or autotuner lookup inside a
compiled step). Eager calls go straight to the launchers through `autograd.Function`s.

- `flash_attention(q, k, v)`: causal grouped-query attention with separate qk / v head
  dims (the absorbed MLA core runs it with head dim r over the latents themselves).
- `mla_attention_expanded(q, c_k, c_v, w_uk, w_uv)`: attention whose K / V tiles are built
  on-chip from latent tiles (k = c^k W_uk^h, v = c^v W_uv^h), one of MLA's three forms when the
  latent width r exceeds the head size (`mla_gpt.model.plan` measures which form wins).

The package, as fla's ops are laid out: `kernels.py` holds the Triton kernels (flash attention v2,
base-2 softmax, the causal split into unmasked and diagonal blocks, a three-kernel backward) and
their tile candidates, `launch.py` their launchers, `op.py` the ops' registration, autograd, input
checks and these two functions. The ops register through `mla_kernels._register`, as decode and
append do.

Where the kernels run: CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 (the Triton
interpreter, used by the tests). Everywhere else (CPU without the interpreter, float64)
both entry points fall back to `mla_kernels.reference`, which autograd differentiates.
"""
from mla_kernels.attention.op import flash_attention, mla_attention_expanded

__all__ = ["flash_attention", "mla_attention_expanded"]
