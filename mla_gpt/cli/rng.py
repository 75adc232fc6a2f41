"""The random number generators of a training process: seeded at the start, saved in checkpoints.

A checkpoint's `rng` holds, for every process in rank order, the states of torch (CPU and CUDA),
numpy, Python's `random` and the batch sampler, so a resumed run draws the same dropout masks and
batches as an uninterrupted one.
"""

import random

import numpy as np
import torch
import torch.distributed as dist


def seed_everything(seed):
    """Seed Python's `random`, numpy and torch (every device) with one seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def _numpy_state():
    """numpy's global RNG state as a dict of tensors and plain values (what weights_only loads)."""
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
