"""Checkpoint files: out_dir/ckpt.pt written atomically, read back and checked, and the model in it.

A checkpoint is a dict: format (CHECKPOINT_FORMAT), model (state dict), optimizer (its portable
state), scaler, model_args (GPTConfig keys), iter_num, best_val_loss, config, meta (the dataset's
tokenizer) and rng (every process's RNG states, none after a conversion). train and convert write
it; train, sample, convert and sources read it.
"""

import os
from dataclasses import fields
from pathlib import Path

import torch

from mla_gpt.model import GPT, GPTConfig

CHECKPOINT_NAME = "ckpt.pt"
CHECKPOINT_FORMAT = 1  # bumped when the checkpoint layout changes


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or not from this tool."""


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
