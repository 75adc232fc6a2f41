from setuptools import find_packages, setup

setup(
    name="mla-kernels",
    version="0.1.0",
    description="Multi-Head Latent Attention: Triton kernels and a nanoGPT-style GPT on top of them",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mla_kernels", "mla_kernels.*", "mla_gpt", "mla_gpt.*"]),
    package_data={"mla_gpt": ["data/*/*.txt", "data/*/*.md", "model/tables/*.json"]},
    python_requires=">=3.10",
    # Ranges that both the CPU machines (torch 2.13 CPU build, triton 3.6.0) and the GPU
    # machine (torch 2.11, triton 3.6, nothing installable) satisfy.
    install_requires=[
        "torch>=2.6,<3",  # torch.library.triton_op
        "triton>=3.2,<4",
        "numpy>=1.24,<2.4",  # triton 3.6's interpreter fails under numpy >= 2.4 (docs/design.md, section 6)
        "tiktoken>=0.6",
        "tqdm>=4.60",  # progress bar of CPU training runs
        "matplotlib>=3.6",  # loss-curve and benchmark plots
        "pytest>=7",  # runs tests/test_mla_implementation.py as a plain script, as the original design does
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-xdist>=3", "ruff>=0.5"],  # ruff: the lint CI runs (ruff.toml); xdist: -n
        "hf": ["transformers>=4.40", "safetensors>=0.4"],  # Hugging Face GPT-2 weights: init_from=gpt2, convert
    },
)
