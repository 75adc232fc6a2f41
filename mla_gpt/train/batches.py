"""The training data: the dataset prepared once per node, and random batches of its token files.

A prepared dataset is a folder with train.bin and val.bin (uint16 tokens) and, for the bundled
ones, meta.pkl (the tokenizer); mla_gpt.data.prepare writes them.
"""

import os

import numpy as np
import torch
import torch.distributed as dist

from mla_gpt.cli.configurator import ConfigError
from mla_gpt.data.prepare import ensure_prepared, load_meta


def prepare_dataset(cfg, rt, log):
    """(data_dir, meta or None): prepared by the first process of each node while the others wait."""
    if rt.ddp and rt.local_rank != 0:
        dist.barrier()
    data_dir = ensure_prepared(cfg["dataset"], cfg["data_dir"] or None, cfg["encoding"], log=log)
    if rt.ddp and rt.local_rank == 0:
        dist.barrier()
    return data_dir, load_meta(data_dir)


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
