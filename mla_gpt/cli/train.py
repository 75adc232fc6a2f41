"""Train a GPT (standard or MLA attention) on a prepared dataset, nanoGPT style.

    python -m mla_gpt.cli.train config/train_mla_test.py [--key=value ...]
    torchrun --standalone --nproc_per_node=4 -m mla_gpt.cli.train config/train_shakespeare_char.py

`python -m mla_gpt.cli.train --help` lists every key with its default. Model keys are the fields of
GPTConfig; the rest are the fields of TrainConfig below. Everything is written to out_dir: ckpt.pt
(atomic), metrics.jsonl (one record per log line and per eval) and loss.png.
"""

import json
import math
import os
import random
import re
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from mla_gpt.cli.configurator import ConfigError, help_text, load_config
from mla_gpt.data.prepare import ensure_prepared, load_meta
from mla_gpt.model import GPT, GPTConfig
from mla_gpt.model.gpt import A100_BF16_PEAK_FLOPS

CHECKPOINT_NAME = "ckpt.pt"
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"
CHECKPOINT_FORMAT = 1  # bumped when the checkpoint layout changes
EVAL_NOTICE_S = 30  # an eval projected to take longer than this is announced, with how to shorten it
MFU_WARMUP_ITERS = 5  # the first iterations include allocator and compile warm-up; nanoGPT skips them too
# Dense bf16 tensor-core peaks from the vendors' datasheets (SXM parts), by device-name fragment:
# the MFU of a run is reported against the GPU it runs on, or not at all.
BF16_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": A100_BF16_PEAK_FLOPS, "L40S": 362e12, "L4": 121e12,
                   "A10G": 70e12}
# Keys of GPTConfig that may differ between a checkpoint and the run resuming it (runtime choices).
RUNTIME_MODEL_KEYS = ("dropout", "attn_backend", "mla_path")
PRETRAINED_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # init_from through transformers


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
            "help": "'auto' (bfloat16 on capable GPUs, float16 on others, float32 on CPU), 'float32', 'bfloat16', 'float16'"
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
            "model allows it (no SVD, no float16), else 'compiler' when compiling, else 'off'"
        },
    )
    seed: int = field(default=1337, metadata={"help": "seed of weights, dropout and batch sampling"})
    progress_bar: Optional[bool] = field(default=None, metadata={"help": "tqdm bar; None -> on for CPU runs"})


@dataclass
class ModelKeys(GPTConfig):
    """GPTConfig's fields as config keys; vocab_size None -> taken from the dataset's meta.pkl."""

    vocab_size: Optional[int] = None

    def __post_init__(self):
        """Values are checked by the configurator here and by GPTConfig when the model is built."""


MODEL_KEY_HELP = {
    "block_size": "context length in tokens",
    "vocab_size": "None -> from the dataset's meta.pkl (50304 without one)",
    "n_layer": "transformer blocks",
    "n_head": "attention heads",
    "n_embd": "model width",
    "dropout": "dropout probability",
    "bias": "biases in Linear and LayerNorm layers",
    "gelu_approximate": "the MLP's GELU: 'none' (erf) or 'tanh' (GPT-2's)",
    "use_mla": "Multi-Head Latent Attention instead of standard attention",
    "mla_latent_dim": "latent width r; None -> head size // 2",
    "mla_kv_groups": "latent groups g; None -> n_head",
    "mla_joint_kv": "one latent for K and V (DeepSeek-V2 style)",
    "use_svd": "SVD compression of the values (MLA's value latents, or standard attention's values)",
    "svd_rank": "kept rank; None -> full",
    "svd_mode": "'weight' (causal, cached) or 'activation' (per sequence, not causal)",
    "attn_backend": "'auto' (Triton on CUDA, SDPA elsewhere), 'triton', 'sdpa', 'reference'",
    "mla_path": "'auto' (cost model), 'absorbed', 'expanded'",
}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is left in place."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or not from this tool."""


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path, checkpoint):
    """torch.save to a temporary file in the same folder, then os.replace: never a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path, map_location="cpu"):
    """Load and validate an mla_gpt checkpoint; CheckpointError with the reason otherwise."""
    return check_checkpoint(read_checkpoint_file(path, map_location), path)


def read_checkpoint_file(path, map_location="cpu"):
    """torch.load of a checkpoint file (tensors only); CheckpointError if it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {str(path)!r}; train first (python -m mla_gpt.cli.train ...)"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or unreadable ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from e


def check_checkpoint(checkpoint, path):
    """checkpoint if it is an mla_gpt checkpoint of this version's format; CheckpointError otherwise."""
    missing = [
        k
        for k in ("format", "model", "model_args", "iter_num")
        if not isinstance(checkpoint, dict) or k not in checkpoint
    ]
    if missing:
        raise CheckpointError(f"{str(path)!r} is not an mla_gpt checkpoint (missing {', '.join(missing)})")
    if checkpoint["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{str(path)!r} has checkpoint format {checkpoint['format']}; this version reads format {CHECKPOINT_FORMAT}"
        )
    return checkpoint


def model_from_checkpoint(checkpoint, **runtime_args):
    """Build GPT from checkpoint['model_args'] (with runtime_args such as dropout overriding) and load its weights."""
    model_args = {**checkpoint["model_args"], **runtime_args}
    known = {f.name for f in fields(GPTConfig)}
    unknown = sorted(set(model_args) - known)
    if unknown:
        raise CheckpointError(f"checkpoint model_args has keys this GPTConfig lacks: {unknown}")
    model = GPT(GPTConfig(**model_args))
    state_dict = {k.removeprefix("_orig_mod."): v for k, v in checkpoint["model"].items()}
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit the model they describe: {e}") from e
    return model


def _numpy_state():
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": pos,
        "has_gauss": has_gauss,
        "cached_gaussian": cached,
    }


def _set_numpy_state(state):
    np.random.set_state(
        (
            state["name"],
            state["keys"].cpu().numpy().astype(np.uint32),
            state["pos"],
            state["has_gauss"],
            state["cached_gaussian"],
        )
    )


# ----------------------------------------------------------------------------- setup


@dataclass
class Runtime:
    """Where and how this process runs."""

    device: str
    device_type: str
    ptdtype: torch.dtype
    ddp: bool
    rank: int
    local_rank: int
    world_size: int

    @property
    def master(self):
        return self.rank == 0


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def available_devices():
    """The device names this machine can run on: 'cpu', then 'cuda', 'cuda:1', ... and 'mps'."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names


def resolve_device(device):
    """'auto' -> 'cuda' when a GPU is there, else 'cpu'; a device this machine lacks is a ConfigError."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    available = available_devices()
    if device not in available:
        raise ConfigError(f"device {device!r} is not available on this machine; available: {', '.join(available)}")
    return device


def resolve_dtype(dtype, device_type):
    """'auto' -> bfloat16 on GPUs that have it, float16 on other GPUs, float32 elsewhere."""
    if dtype == "auto":
        if device_type == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "float32"
    if dtype not in DTYPES:
        raise ConfigError(f"dtype expects one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def resolve_runtime(cfg):
    """Pick device and dtype, start torch.distributed when launched by torchrun."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    device = resolve_device(cfg["device"])
    rank, local_rank, world_size = 0, 0, 1
    if ddp:
        rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        backend = (
            cfg["backend"] if cfg["backend"] != "auto" else ("nccl" if device.startswith("cuda") else "gloo")
        )
        dist.init_process_group(backend=backend)
    device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
    dtype = resolve_dtype(cfg["dtype"], device_type)
    return Runtime(device, device_type, dtype, ddp, rank, local_rank, world_size)


def check_train_config(cfg, rt):
    """ConfigError for values that are well typed but unusable."""
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


def learning_rate(it, cfg):
    """Linear warmup for warmup_iters, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not cfg["decay_lr"]:
        return cfg["learning_rate"]
    if it < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (it + 1) / (cfg["warmup_iters"] + 1)
    if it > cfg["lr_decay_iters"]:
        return cfg["min_lr"]
    ratio = (it - cfg["warmup_iters"]) / max(1, cfg["lr_decay_iters"] - cfg["warmup_iters"])
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return cfg["min_lr"] + coeff * (cfg["learning_rate"] - cfg["min_lr"])


class Batches:
    """Random windows of a uint16 token file, drawn with a torch.Generator whose state is checkpointed.

    `prefetch()` draws the next batch ahead (host work the trainer does while the device runs the
    current step); `next()` then returns it, and `get_state()` is the state before it was drawn.
    """

    def __init__(self, path, batch_size, block_size, device, seed):
        self.path, self.batch_size, self.block_size, self.device = path, batch_size, block_size, device
        self.n_tokens = os.path.getsize(path) // np.dtype(np.uint16).itemsize
        if self.n_tokens <= block_size:
            raise ConfigError(
                f"block_size={block_size} does not fit the data: {path} holds {self.n_tokens:,} tokens, so "
                f"block_size must be at most {self.n_tokens - 1:,}"
            )
        self.generator = torch.Generator().manual_seed(seed)
        self.pending = None  # (generator state before drawing it, batch)

    def next(self):
        """(x, y): (batch_size, block_size) int64 on device; y is x shifted by one token."""
        if self.pending is not None:
            batch, self.pending = self.pending[1], None
            return batch
        return self._draw()

    def prefetch(self):
        self.pending = (self.generator.get_state(), self._draw())

    def get_state(self):
        return self.generator.get_state() if self.pending is None else self.pending[0]

    def set_state(self, state):
        self.pending = None
        self.generator.set_state(state)

    def _draw(self):
        data = np.memmap(self.path, dtype=np.uint16, mode="r")  # re-opened per batch: avoids a memmap leak
        ix = torch.randint(self.n_tokens - self.block_size, (self.batch_size,), generator=self.generator)
        windows = torch.stack(
            [torch.from_numpy(data[i : i + self.block_size + 1].astype(np.int64)) for i in ix.tolist()]
        )  # (B, T + 1), read once for inputs and targets
        if self.device.startswith("cuda"):
            windows = windows.pin_memory().to(self.device, non_blocking=True)
        else:
            windows = windows.to(self.device)
        return windows[:, :-1], windows[:, 1:]  # (B, T) each


# ----------------------------------------------------------------------------- metrics


class Metrics:
    """Appends JSON records to out_dir/metrics.jsonl and redraws out_dir/loss.png."""

    def __init__(self, out_dir, resume_iter):
        self.path = Path(out_dir) / METRICS_NAME
        self.plot_path = Path(out_dir) / PLOT_NAME
        records = self.read(self.path) if resume_iter is not None and self.path.exists() else []
        self.records = [
            r for r in records if r["iter"] < (resume_iter or 0)
        ]  # drop what the resumed run redoes
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    @staticmethod
    def read(path):
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line]

    def add(self, record):
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self, title):
        """Train loss per logged iteration and train/val loss per eval; skipped without matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        steps = [r for r in self.records if r["kind"] == "train"]
        evals = [r for r in self.records if r["kind"] == "eval"]
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
        ax.plot(
            [r["iter"] for r in steps], [r["loss"] for r in steps], lw=0.8, alpha=0.6, label="train (batch)"
        )
        ax.plot([r["iter"] for r in evals], [r["train_loss"] for r in evals], "o-", label="train (eval)")
        ax.plot([r["iter"] for r in evals], [r["val_loss"] for r in evals], "s-", label="val (eval)")
        ax.set_xlabel("iteration")
        ax.set_ylabel("cross-entropy loss")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.plot_path)
        plt.close(fig)


# ----------------------------------------------------------------------------- the step


CUDA_GRAPH_MODES = ("step", "compiler", "off")


def step_capture_blocker(model_args, rt):
    """Why the whole step cannot be captured as one CUDA graph with these settings, or None."""
    if model_args["use_svd"]:
        return "use_svd=True recomputes its SVD basis outside graphs"
    if rt.ptdtype == torch.float16:
        return "float16 training reads its GradScaler's inf check on the host every step"
    return None


def use_cuda_graphs(cfg, rt, compile_model, model_args):
    """The cuda_graphs mode of this run: 'step', 'compiler' or 'off' (None picks, see the key's help)."""
    mode = cfg["cuda_graphs"]
    if mode is None:
        if rt.device_type != "cuda" or rt.ddp:  # DDP's hooks run between the graphs
            return "off"
        if step_capture_blocker(model_args, rt) is None:
            return "step"
        return "compiler" if compile_model else "off"
    if mode not in CUDA_GRAPH_MODES:
        raise ConfigError(f"cuda_graphs must be one of {', '.join(map(repr, CUDA_GRAPH_MODES))} or None; got {mode!r}")
    if mode == "off":
        return mode
    if rt.device_type != "cuda":
        raise ConfigError(f"cuda_graphs={mode!r} needs a CUDA device; this run is on {rt.device}")
    if rt.ddp:
        raise ConfigError(f"cuda_graphs={mode!r} runs in one process; this run has {rt.world_size} (DDP)")
    if mode == "compiler" and not compile_model:
        raise ConfigError("cuda_graphs='compiler' needs compile=True; cuda_graphs='step' captures an uncompiled step")
    if mode == "step" and (blocker := step_capture_blocker(model_args, rt)):
        raise ConfigError(f"cuda_graphs='step' cannot capture this run: {blocker}; use 'compiler' or 'off'")
    return mode


def compile_for_training(model, cuda_graphs):
    """torch.compile; cuda_graphs='compiler' replays its forward and backward graphs as CUDA graphs."""
    return torch.compile(model, mode="reduce-overhead" if cuda_graphs == "compiler" else None)


def capturable_optimizer(optimizer, device):
    """Make an AdamW's step recordable in a CUDA graph: capturable, its learning rate a device tensor.

    A captured step replays the values it was recorded with, so a float learning rate would stay
    frozen; a tensor one is refilled each iteration (`set_learning_rate`). Call after loading a
    checkpoint's optimizer state, which brings back the saved groups.
    """
    for group in optimizer.param_groups:
        group["capturable"] = True
        group["lr"] = torch.tensor(float(group["lr"]), device=device)


def portable_optimizer_state(optimizer):
    """optimizer.state_dict() with float learning rates and capturable off, as a checkpoint keeps it.

    A run that resumes elsewhere (a CPU, another step mode) gets the plain settings; a graphed
    run makes its optimizer capturable again after loading.
    """
    state = optimizer.state_dict()
    for group in state["param_groups"]:  # copies: the live optimizer keeps its own groups
        group["lr"] = float(group["lr"])
        if "capturable" in group:
            group["capturable"] = False
    return state


def set_learning_rate(optimizer, lr):
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)  # in place: a captured step reads it from this memory
        else:
            group["lr"] = lr


class TrainStep:
    """One optimizer step, as `train` runs it and bench/train.py times it.

    grad_accum micro-steps of forward and backward under autocast, then the gradient clip and the
    optimizer step. Each next batch is drawn once the device has the work before it queued (after
    a micro-step's backward, and after the optimizer step for the next iteration), so the host's
    data work runs while the device computes. Calling it returns the iteration's mean loss as a
    0-dim device tensor, unread: in bf16 or float32 nothing in the step waits for the device (a
    float16 run's GradScaler reads its inf check each step, and svd 'weight' its new basis).

    cuda_graphs='step': the iteration's batches are copied into fixed input buffers and the whole
    iteration (every micro-step, the clip and the optimizer step) replays as one CUDA graph, so
    the host's cost per step is one graph launch whatever the model's size. The first
    CAPTURE_AFTER_ITERS iterations run uncaptured, on a side stream as PyTorch's CUDA-graph notes
    ask, so compilation, autotuning and the optimizer's state happen before the capture. The
    optimizer must be `capturable_optimizer`.
    """

    CAPTURE_AFTER_ITERS = 3

    def __init__(self, model, optimizer, scaler, batches, autocast, grad_accum, grad_clip, rt, cuda_graphs):
        self.model, self.optimizer, self.scaler, self.batches = model, optimizer, scaler, batches
        self.autocast, self.grad_accum, self.grad_clip = autocast, grad_accum, grad_clip
        self.rt, self.cuda_graphs = rt, cuda_graphs
        self.iters_run, self.graph, self.inputs, self.graph_loss = 0, None, None, None

    def __call__(self):
        if self.cuda_graphs == "step":
            return self._graphed_step()
        loss_sum = torch.zeros((), device=self.rt.device)
        for micro_step in range(self.grad_accum):
            x, y = self.batches.next()
            if self.cuda_graphs == "compiler":  # a new micro-step: the graphs may reuse the last one's outputs
                torch.compiler.cudagraph_mark_step_begin()
            if self.rt.ddp:  # all-reduce the gradients once per iteration, on the last micro-step
                self.model.require_backward_grad_sync = micro_step == self.grad_accum - 1
            with self.autocast:
                _, loss = self.model(x, y)
                loss = loss / self.grad_accum
            loss_sum += loss.detach()
            self.scaler.scale(loss).backward()
            if micro_step < self.grad_accum - 1:
                self.batches.prefetch()
        if self.rt.ddp:
            dist.all_reduce(loss_sum)
            loss_sum /= self.rt.world_size
        if self.grad_clip != 0.0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.batches.prefetch()
        return loss_sum

    def _graphed_step(self):
        for micro_step in range(self.grad_accum):  # the batches in the order the uncaptured step draws them
            x, y = self.batches.next()  # (B, T) each
            if self.inputs is None:
                self.inputs = tuple(torch.empty((self.grad_accum, *t.shape), dtype=t.dtype, device=t.device)
                                    for t in (x, y))  # (grad_accum, B, T) each, read by the graph
            self.inputs[0][micro_step].copy_(x)
            self.inputs[1][micro_step].copy_(y)
            if micro_step < self.grad_accum - 1:
                self.batches.prefetch()
        if self.graph is None and self.iters_run >= self.CAPTURE_AFTER_ITERS:
            self._capture()
        if self.graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss_sum = self._iteration()
                self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.current_stream().wait_stream(side)
        else:
            self.graph.replay()
            loss_sum = self.graph_loss.clone()  # the next replay writes over graph_loss
        self.iters_run += 1
        self.batches.prefetch()
        return loss_sum

    def _iteration(self):
        """Every micro-step on the input buffers, the clip and the optimizer step: what is captured."""
        loss_sum = torch.zeros((), device=self.rt.device)
        for micro_step in range(self.grad_accum):
            with self.autocast:
                _, loss = self.model(self.inputs[0][micro_step], self.inputs[1][micro_step])
                loss = loss / self.grad_accum
            loss_sum += loss.detach()
            loss.backward()
        if self.grad_clip != 0.0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        return loss_sum

    def _capture(self):
        # Gradients start as None, so the first micro-step's backward allocates them in the graph's
        # memory and every replay overwrites them there: no zeroing inside the graph.
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.graph_loss = self._iteration()
        except RuntimeError as e:
            raise RuntimeError(
                f"capturing the training step as one CUDA graph failed ({e}); cuda_graphs='compiler' or 'off' "
                f"trains without it"
            ) from e
        self.graph = graph


def reads_loss_every_step(rt):
    """On a CPU there is no device work to overlap: read (and show) every step's loss."""
    return rt.device_type == "cpu"


def bf16_peak(device):
    """(name, FLOP/s) of the device's datasheet bf16 peak, or None where none is known (CPU too)."""
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    for model, flops in BF16_PEAK_FLOPS.items():
        if re.search(rf"\b{model}\b", name):  # whole words: "L4" is not "L40"
            return name, flops
    return None


# ----------------------------------------------------------------------------- training


def build_model(cfg, model_keys, vocab_size, checkpoint, log):
    """Model args from the config (scratch) or the checkpoint (resume), and the model."""
    if checkpoint is None:
        model_args = {k: cfg[k] for k in model_keys}
        model_args["vocab_size"] = cfg["vocab_size"] or vocab_size
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # logged as one line each below
                config = GPTConfig(**model_args)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model keys: {e}") from e
        for message in config.inactive_settings():
            log(f"warning: {message}")
        return GPT(config), model_args
    model_args = dict(checkpoint["model_args"])
    defaults = {f.name: f.default for f in fields(ModelKeys)}
    changed = [  # keys the config sets (to a value other than the default) that the checkpoint has otherwise
        k for k in model_keys
        if k not in RUNTIME_MODEL_KEYS and k != "vocab_size" and cfg[k] != defaults[k] and cfg[k] != model_args[k]
    ]
    if changed:
        log(
            f"resume: keeping the checkpoint's {', '.join(f'{k}={model_args[k]!r}' for k in changed)} over the config"
        )
    runtime = {k: cfg[k] for k in RUNTIME_MODEL_KEYS}
    model_args.update(runtime)
    return model_from_checkpoint(checkpoint, **runtime), model_args


def train(cfg):
    """Run one training job described by cfg (a dict from load_config).

    Returns {'iter_num', 'train_loss', 'val_loss' (last eval), 'best_val_loss', 'out_dir', 'model'}.

    Raises TrainingDiverged when the loss becomes NaN/inf, CheckpointError on a bad checkpoint to resume.
    """
    rt = resolve_runtime(cfg)
    try:
        return _train(cfg, rt)
    finally:
        if rt.ddp:
            dist.destroy_process_group()


def _train(cfg, rt):
    check_train_config(cfg, rt)
    out_dir = Path(cfg["out_dir"])
    model_keys = [f.name for f in fields(GPTConfig)]
    show_bar = cfg["progress_bar"] if cfg["progress_bar"] is not None else rt.device_type == "cpu"
    bar = None

    def log(message):
        if rt.master:
            if bar is not None:
                bar.write(message)
            else:
                print(message, flush=True)  # flushed: logs piped to a file show up as they come

    if rt.master:
        out_dir.mkdir(parents=True, exist_ok=True)

    # data: prepared by the first process of each node, the others wait for it
    if rt.ddp and rt.local_rank != 0:
        dist.barrier()
    data_dir = ensure_prepared(cfg["dataset"], cfg["data_dir"] or None, cfg["encoding"], log=log)
    if rt.ddp and rt.local_rank == 0:
        dist.barrier()
    meta = load_meta(data_dir)
    vocab_size = meta["vocab_size"] if meta else GPTConfig.vocab_size  # data without meta.pkl: GPT-2's, padded

    checkpoint = None
    if cfg["init_from"] == "resume":
        checkpoint = load_checkpoint(out_dir / CHECKPOINT_NAME, map_location=rt.device)
    seed = cfg["seed"] + rt.rank  # each process draws different batches; weights are synced by DDP
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    block_size = checkpoint["model_args"]["block_size"] if checkpoint is not None else cfg["block_size"]
    # the batches before the model: a context longer than the data is refused before a model is built
    train_batches = Batches(data_dir / "train.bin", cfg["batch_size"], block_size, rt.device, seed)
    # eval batches come from their own generator, reseeded per eval: every eval scores the same windows
    eval_batches = {
        split: Batches(data_dir / f"{split}.bin", cfg["batch_size"], block_size, rt.device, seed)
        for split in ("train", "val")
    }
    if cfg["init_from"] in PRETRAINED_NAMES or cfg["init_from"].startswith("hf:"):
        from mla_gpt.cli.sources import pretrained_model

        model, model_args = pretrained_model(cfg, meta, log)
    else:
        model, model_args = build_model(cfg, model_keys, vocab_size, checkpoint, log)
    model.to(rt.device)
    grad_accum = cfg["gradient_accumulation_steps"] // rt.world_size
    tokens_per_iter = grad_accum * rt.world_size * cfg["batch_size"] * block_size
    log(
        f"tokens per iteration: {tokens_per_iter:,} ({rt.world_size} process(es) x {grad_accum} micro-steps x "
        f"{cfg['batch_size']} x {block_size}); device {rt.device}, dtype {str(rt.ptdtype).removeprefix('torch.')}"
    )

    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.ptdtype == torch.float16)
    optimizer = model.configure_optimizers(
        cfg["weight_decay"], cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]), rt.device_type
    )
    iter_num, best_val_loss = 0, float("inf")
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint["scaler"]:  # empty when saved by a disabled (non-float16) scaler
            scaler.load_state_dict(checkpoint["scaler"])
        iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        restore_rng(checkpoint["rng"], rt, train_batches, log)
        log(
            f"resuming from {out_dir / CHECKPOINT_NAME} at iter {iter_num} (best val loss {best_val_loss:.4f})"
        )
    checkpoint = None  # free the memory
    start_iter = iter_num

    compile_model = cfg["compile"] if cfg["compile"] is not None else rt.device_type == "cuda"
    cuda_graphs = use_cuda_graphs(cfg, rt, compile_model, model_args)
    if compile_model:
        log(f"compiling the model with torch.compile{' (CUDA graphs)' if cuda_graphs == 'compiler' else ''} ...")
        model = compile_for_training(model, cuda_graphs)
    if cuda_graphs == "step":
        capturable_optimizer(optimizer, rt.device)
        log(f"cuda_graphs='step': after this run's first {TrainStep.CAPTURE_AFTER_ITERS} iterations, each "
            "replays as one CUDA graph")
    if rt.ddp:
        model = DDP(model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)
    raw_model = model.module if rt.ddp else model
    raw_model = getattr(raw_model, "_orig_mod", raw_model)
    log(
        f"model: {raw_model.get_num_params() / 1e6:.2f}M parameters, "
        f"{'MLA' if model_args['use_mla'] else 'standard'} attention"
    )
    autocast = (
        nullcontext() if rt.ptdtype == torch.float32 else torch.amp.autocast(rt.device_type, dtype=rt.ptdtype)
    )
    metrics = Metrics(out_dir, iter_num if cfg["init_from"] == "resume" else None) if rt.master else None
    title = (
        f"{out_dir.name}: {'MLA' if model_args['use_mla'] else 'standard'} attention, "
        f"{model_args['n_layer']}L {model_args['n_head']}H {model_args['n_embd']}C, {cfg['dataset']}"
    )

    eval_announced = False

    @torch.no_grad()
    def estimate_loss():
        """Mean loss over eval_iters batches of each split; long evals say so before they run."""
        nonlocal eval_announced
        model.eval()
        out = {}
        for split, batches in eval_batches.items():
            batches.generator.manual_seed(cfg["seed"] + rt.rank)
            losses = torch.zeros(cfg["eval_iters"])
            batch_indices = range(cfg["eval_iters"])
            if bar is not None:
                from tqdm import tqdm

                batch_indices = tqdm(batch_indices, desc=f"eval {split}", unit="batch", leave=False,
                                     dynamic_ncols=True, file=sys.stderr)
            for k in batch_indices:
                started = time.perf_counter()
                x, y = batches.next()
                if cuda_graphs == "compiler":
                    torch.compiler.cudagraph_mark_step_begin()
                with autocast:
                    _, loss = model(x, y)
                losses[k] = loss.item()
                if k == 1 and not eval_announced:  # the second batch: the first one compiles
                    eval_announced = True
                    projected = (time.perf_counter() - started) * cfg["eval_iters"] * len(eval_batches)
                    if projected > EVAL_NOTICE_S:
                        log(f"eval: {len(eval_batches)} splits x {cfg['eval_iters']} batches of "
                            f"{cfg['batch_size']} x {block_size} will take about {projected / 60:.1f} min "
                            f"on {rt.device}, at every eval; --eval_iters=N shortens it")
            mean = losses.mean().to(rt.device)
            if rt.ddp:
                dist.all_reduce(mean)
                mean /= rt.world_size
            out[split] = mean.item()
        model.train()
        return out

    def make_checkpoint(rng):
        return {
            "format": CHECKPOINT_FORMAT,
            "model": raw_model.state_dict(),
            "optimizer": portable_optimizer_state(optimizer),
            "scaler": scaler.state_dict(),
            "model_args": model_args,
            "iter_num": iter_num,
            "best_val_loss": best_val_loss,
            "config": cfg,
            "meta": meta,
            "rng": rng,
        }

    if show_bar and rt.master:
        from tqdm import tqdm

        bar = tqdm(total=cfg["max_iters"], initial=iter_num, unit="it", dynamic_ncols=True, file=sys.stderr)
    peak = bf16_peak(rt.device)
    if peak is not None:
        log(f"mfu against the {peak[0]}'s dense bf16 peak, {peak[1] / 1e12:.0f} TFLOP/s (datasheet)")
    step = TrainStep(model, optimizer, scaler, train_batches, autocast, grad_accum, cfg["grad_clip"], rt, cuda_graphs)
    last_losses = {}
    running_mfu, local_iter = -1.0, 0
    timed_tokens, timed_seconds = 0, 0.0  # steps after the warm-up ones, eval and checkpoints excluded
    # The loss is read (a host-device sync) only where it is logged, before an eval and at the end,
    # so the host queues the next steps while the device runs; the sum of the unread losses tells
    # whether any was NaN or inf.
    unread_steps, unread_loss_sum = 0, torch.zeros((), device=rt.device)
    sync_every_step = reads_loss_every_step(rt)

    def log_step(lossf, lr, dt, warmed_up):
        """One log line and metrics record; dt: seconds per step; warmed_up: no compile step in dt."""
        nonlocal running_mfu
        if warmed_up and peak is not None:
            mfu = raw_model.estimate_mfu(cfg["batch_size"] * grad_accum, dt, peak[1])  # per GPU
            running_mfu = mfu if running_mfu < 0 else 0.9 * running_mfu + 0.1 * mfu
        # tokens/s over every timed step so far; the first steps (compile, warm-up) only until then
        tok_s = timed_tokens / timed_seconds if timed_seconds else tokens_per_iter / dt
        mfu_text = f", mfu {running_mfu * 100:.1f}%" if running_mfu >= 0 else ""
        log(f"iter {iter_num}: loss {lossf:.4f}, time {dt * 1000:.1f}ms, tok/s {tok_s:,.0f}{mfu_text}")
        metrics.add(
            {
                "kind": "train",
                "iter": iter_num,
                "loss": lossf,
                "lr": lr,
                "time_ms": dt * 1000,
                "tok_s": tok_s,
                "mfu": running_mfu if running_mfu >= 0 else None,
            }
        )

    try:
        while True:
            lr = learning_rate(iter_num, cfg)
            set_learning_rate(optimizer, lr)
            if iter_num % cfg["eval_interval"] == 0 or iter_num >= cfg["max_iters"]:
                # RNG states before the eval: a resumed run repeats this eval before its first step
                rng = gather_rng(rt, train_batches)
                last_losses = estimate_loss()
                log(
                    f"step {iter_num}: train loss {last_losses['train']:.4f}, val loss {last_losses['val']:.4f}"
                )
                if rt.master:
                    metrics.add(
                        {
                            "kind": "eval",
                            "iter": iter_num,
                            "train_loss": last_losses["train"],
                            "val_loss": last_losses["val"],
                            "lr": lr,
                        }
                    )
                    metrics.plot(title)
                improved = last_losses["val"] < best_val_loss
                best_val_loss = min(best_val_loss, last_losses["val"])
                # iter_num > start_iter: never re-save the state just loaded
                if iter_num > start_iter and (improved or cfg["always_save_checkpoint"]):
                    if rt.master:
                        save_checkpoint(out_dir / CHECKPOINT_NAME, make_checkpoint(rng))
                        log(f"saved checkpoint to {out_dir / CHECKPOINT_NAME}")
            if cfg["eval_only"] or iter_num >= cfg["max_iters"]:
                break

            if unread_steps == 0:  # the steps' own time: eval and checkpoint happen before this
                interval_start, interval_first_iter = time.perf_counter(), local_iter
            loss = step()
            unread_loss_sum += loss
            unread_steps += 1
            logged = iter_num % cfg["log_interval"] == 0
            next_iter = iter_num + 1
            if sync_every_step or logged or next_iter % cfg["eval_interval"] == 0 or next_iter >= cfg["max_iters"]:
                lossf = loss.item()
                dt = (time.perf_counter() - interval_start) / unread_steps  # per step, over the unread ones
                if not math.isfinite(lossf) or not math.isfinite(unread_loss_sum.item()):
                    what = f"is {lossf} at iter {iter_num}" if not math.isfinite(lossf) else (
                        f"was NaN or inf in one of iters {iter_num - unread_steps + 1}..{iter_num}")
                    raise TrainingDiverged(
                        f"loss {what}; stopping. The last good checkpoint ({out_dir / CHECKPOINT_NAME}) "
                        f"is left untouched; try a lower learning_rate or a grad_clip."
                    )
                warmed_up = interval_first_iter >= MFU_WARMUP_ITERS
                if warmed_up:
                    timed_tokens += tokens_per_iter * unread_steps
                    timed_seconds += dt * unread_steps
                unread_steps = 0
                unread_loss_sum.zero_()
                if bar is not None:
                    bar.set_postfix(loss=f"{lossf:.4f}", refresh=False)
                if logged and rt.master:
                    log_step(lossf, lr, dt, warmed_up)
            iter_num, local_iter = next_iter, local_iter + 1
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if rt.master:
        metrics.plot(title)
    if rt.ddp:
        dist.barrier()  # no process tears the group down while rank 0 still writes its checkpoint
    return {
        "iter_num": iter_num,
        "train_loss": last_losses.get("train"),
        "val_loss": last_losses.get("val"),
        "best_val_loss": best_val_loss,
        "out_dir": str(out_dir),
        "model": raw_model,
    }


def gather_rng(rt, train_batches):
    """RNG states (torch, cuda, numpy, python, batch sampler) of every process, in rank order."""
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if rt.device_type == "cuda" else None,
        "numpy": _numpy_state(),
        "python": random.getstate(),
        "sampler": train_batches.get_state(),
    }
    if not rt.ddp:
        return [state]
    states = [None] * rt.world_size
    dist.all_gather_object(states, {k: v.cpu() if torch.is_tensor(v) else v for k, v in state.items()})
    return states


def restore_rng(states, rt, train_batches, log):
    """Put back this rank's RNG states; with another number of processes, keep the fresh seeds."""
    if len(states) != rt.world_size:
        log(
            f"resume: the checkpoint holds RNG states of {len(states)} processes, this run has {rt.world_size}; "
            f"dropout and batches are drawn afresh from the seed"
        )
        return
    state = states[rt.rank]
    torch.set_rng_state(state["torch"].cpu())
    if rt.device_type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu())
    _set_numpy_state(state["numpy"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    train_batches.set_state(state["sampler"].cpu())


USAGE = "CONFIG.py [CONFIG.py ...] [--key=value ...]"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(
            help_text("python -m mla_gpt.cli.train", USAGE, TrainConfig, ModelKeys, extra_help=MODEL_KEY_HELP)
        )
        return 0
    try:
        cfg = load_config(argv, TrainConfig, ModelKeys)
        train(cfg)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
