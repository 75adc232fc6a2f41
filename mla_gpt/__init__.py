"""A nanoGPT-style GPT with Multi-Head Latent Attention, trained and sampled on mla_kernels."""
