"""The GPT model: `from mla_gpt.model import GPT, GPTConfig`."""
from mla_gpt.model.attention import CausalSelfAttention, MultiHeadLatentAttention
from mla_gpt.model.config import GPTConfig
from mla_gpt.model.gpt import GPT

__all__ = ["GPT", "GPTConfig", "CausalSelfAttention", "MultiHeadLatentAttention"]
