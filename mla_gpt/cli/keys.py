"""The training config keys: their types, defaults and help, written once, here.

TrainConfig holds the run's keys and ModelKeys the model's (GPTConfig's fields, with GPTConfig's
defaults). `python -m mla_gpt.cli.train --help` prints them from these dataclasses, and
tests/test_keys.py checks that README's key tables list the same keys and defaults.
"""

from dataclasses import dataclass, field
from typing import Optional

from mla_gpt.cli.configurator import ConfigError
from mla_gpt.model import GPTConfig

PRETRAINED_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # init_from through transformers
# Keys of GPTConfig that may differ between a checkpoint and the run resuming it (runtime choices).
RUNTIME_MODEL_KEYS = ("dropout", "attn_backend", "mla_path")


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = field(default="out", metadata={"help": "checkpoint, metrics and plot folder"})
    eval_interval: int = field(default=2000, metadata={"help": "iterations between evals and checkpoints"})
    log_interval: int = field(default=1, metadata={"help": "iterations between log lines"})
    eval_iters: int = field(default=200, metadata={"help": "batches per split in each eval"})
    eval_only: bool = field(default=False, metadata={"help": "evaluate once and exit"})
    always_save_checkpoint: bool = field(
        default=True, metadata={"help": "save at every eval, not only on a new best val loss"}
    )
    init_from: str = field(
        default="scratch",
        metadata={
            "help": "'scratch', 'resume' (from out_dir/ckpt.pt), 'gpt2' ... 'gpt2-xl' (through transformers) "
            "or 'hf:PATH' (a saved GPT-2 or nanoGPT folder)"
        },
    )
    # data
    dataset: str = field(
        default="shakespeare_char",
        metadata={"help": "'shakespeare_char', 'shakespeare' (BPE) or a name with data_dir"},
    )
    data_dir: str = field(
        default="", metadata={"help": "folder with train.bin/val.bin; '' -> mla_gpt/data/<dataset>"}
    )
    encoding: str = field(default="gpt2", metadata={"help": "tiktoken encoding of the BPE dataset"})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "micro-steps per iteration, over all processes"}
    )
    batch_size: int = field(default=12, metadata={"help": "sequences per micro-step and process"})
    # AdamW
    learning_rate: float = field(default=6e-4, metadata={"help": "peak learning rate"})
    max_iters: int = field(default=600000, metadata={"help": "training iterations"})
    weight_decay: float = field(default=1e-1, metadata={"help": "AdamW decay of 2-D weights"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip; 0 disables"})
    # learning-rate schedule: linear warmup, then cosine decay to min_lr
    decay_lr: bool = field(
        default=True, metadata={"help": "warmup + cosine decay; False keeps learning_rate"}
    )
    warmup_iters: int = field(default=2000, metadata={"help": "linear warmup iterations"})
    lr_decay_iters: int = field(
        default=600000, metadata={"help": "iteration where the cosine reaches min_lr"}
    )
    min_lr: float = field(default=6e-5, metadata={"help": "final learning rate"})
    # system
    backend: str = field(
        default="auto", metadata={"help": "DDP backend; 'auto' -> nccl on CUDA, gloo on CPU"}
    )
    device: str = field(
        default="auto", metadata={"help": "'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', 'mps'"}
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "'auto' (bfloat16 on capable GPUs, float16 on others, float32 on CPU), 'float32', "
            "'bfloat16', 'float16'"
        },
    )
    compile: Optional[bool] = field(
        default=None, metadata={"help": "torch.compile the model; None -> on for CUDA, off on CPU"}
    )
    cuda_graphs: Optional[str] = field(
        default=None,
        metadata={
            "help": "'step': capture the whole training step (forward, backward, clip, AdamW) as one CUDA "
            "graph, replayed each iteration; 'compiler': torch.compile's mode 'reduce-overhead' (forward "
            "and backward graphs, the rest eager); 'off'. None -> 'step' on one CUDA process where the "
            "model allows it (not float16, no SVD sketch over 64 columns, no plain-PyTorch SVD), else "
            "'compiler' when compiling, else 'off'"
        },
    )
    seed: int = field(default=1337, metadata={"help": "seed of weights, dropout and batch sampling"})
    progress_bar: Optional[bool] = field(default=None, metadata={"help": "tqdm bar; None -> on for CPU runs"})


def model_key(name, help):
    """A ModelKeys field: GPTConfig's default of `name`, with the key's help."""
    return field(default=GPTConfig.__dataclass_fields__[name].default, metadata={"help": help})


@dataclass
class ModelKeys(GPTConfig):
    """GPTConfig's fields as config keys, with their help; vocab_size None -> the dataset's meta.pkl.

    The types repeat GPTConfig's (a dataclass field needs its annotation); tests/test_keys.py
    checks that they and the defaults stay GPTConfig's.
    """

    block_size: int = model_key("block_size", "context length in tokens")
    vocab_size: Optional[int] = field(
        default=None, metadata={"help": "None -> from the dataset's meta.pkl (50304 without one)"}
    )
    n_layer: int = model_key("n_layer", "transformer blocks")
    n_head: int = model_key("n_head", "attention heads")
    n_embd: int = model_key("n_embd", "model width")
    dropout: float = model_key("dropout", "dropout probability")
    bias: bool = model_key("bias", "biases in Linear and LayerNorm layers")
    gelu_approximate: str = model_key("gelu_approximate", "the MLP's GELU: 'none' (erf) or 'tanh' (GPT-2's)")
    use_mla: bool = model_key("use_mla", "Multi-Head Latent Attention instead of standard attention")
    mla_latent_dim: Optional[int] = model_key("mla_latent_dim", "latent width r; None -> head size // 2")
    mla_kv_groups: Optional[int] = model_key("mla_kv_groups", "latent groups g; None -> n_head")
    mla_joint_kv: bool = model_key("mla_joint_kv", "one latent for K and V (DeepSeek-V2 style)")
    use_svd: bool = model_key(
        "use_svd", "SVD compression of the values (MLA's value latents, or standard attention's values)"
    )
    svd_rank: Optional[int] = model_key("svd_rank", "kept rank; None -> full")
    svd_mode: str = model_key("svd_mode", "'weight' (causal, cached) or 'activation' (per sequence, not causal)")
    attn_backend: str = model_key(
        "attn_backend", "'auto' (MLA: the GPU's table; else SDPA), 'triton', 'sdpa', 'cudnn', 'flash', 'reference'"
    )
    mla_path: str = model_key("mla_path", "'auto' (the GPU's measured table), 'absorbed', 'expanded', 'materialized'")

    def __post_init__(self):
        """Values are checked by the configurator here and by GPTConfig when the model is built."""


def check_train_config(cfg, rt):
    """ConfigError for values that are well typed but unusable (rt: the run's Runtime)."""
    for key in (
        "eval_interval",
        "log_interval",
        "eval_iters",
        "gradient_accumulation_steps",
        "batch_size",
        "block_size",
    ):
        if cfg[key] < 1:
            raise ConfigError(f"{key} must be >= 1, got {cfg[key]}")
    if cfg["init_from"] not in ("scratch", "resume", *PRETRAINED_NAMES) and not cfg["init_from"].startswith("hf:"):
        raise ConfigError(f"init_from expects 'scratch', 'resume', one of {', '.join(PRETRAINED_NAMES)} "
                          f"or 'hf:PATH'; got {cfg['init_from']!r}")
    if cfg["gradient_accumulation_steps"] % rt.world_size:
        raise ConfigError(
            f"gradient_accumulation_steps={cfg['gradient_accumulation_steps']} must be a multiple of the "
            f"number of processes ({rt.world_size})"
        )
