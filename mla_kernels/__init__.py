"""Triton kernels for Multi-Head Latent Attention, each with a PyTorch reference beside it."""
