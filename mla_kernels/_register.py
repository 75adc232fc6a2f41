"""How every op of this package is registered with torch.library, in one place.

- `register_op(name, launcher, fake, mutates_args, traceable)`: `launcher` as the op
  `mla_kernels::<name>`. A traceable op on a GPU with OP_KIND 'triton_op' is a
  `torch.library.triton_op`: Inductor traces into the launcher and launches its kernels from its
  own generated code (the fake implementation is the launcher run on fake tensors), analysing
  every kernel at every call site while it compiles. Otherwise an opaque `custom_op` with `fake`,
  whose body launches the kernels directly; the interpreter's kernels cannot run on fake tensors,
  so under TRITON_INTERPRET=1 it is always this.
- `eager_twin(name, launcher, setup_context, backward)`: a differentiable op's `autograd.Function`
  for eager calls, the same launcher and backward without the dispatcher's cost (~0.15 ms per op
  call on the H200, launch_overhead_h200.json). `_dispatch.traced_or_eager` picks between the two.
"""
import functools
import os

import torch
from torch._library.triton import set_wrap_triton_enabled
from torch.library import triton_op

from mla_kernels._dispatch import interpreting

# How traceable ops are registered on GPUs: 'triton_op' or 'custom_op'. Under a CUDA graph both launch
# the same kernels; they differ in compile time and in the compiled step without graphs
# (docs/decisions.md).
OP_KIND = os.environ.get("MLA_KERNELS_OP", "triton_op")
if OP_KIND not in ("triton_op", "custom_op"):
    raise ValueError(f"MLA_KERNELS_OP must be 'triton_op' or 'custom_op', got {OP_KIND!r}")


def direct(launcher):
    """launcher, called on real tensors: its kernels launch directly, not through the tracing wrapper."""
    @functools.wraps(launcher)
    def launch(*args):
        with set_wrap_triton_enabled(False):
            return launcher(*args)
    return launch


def register_op(name, launcher, fake, mutates_args=(), traceable=True):
    """Register launcher (its arguments annotated, for the schema) as `mla_kernels::<name>`."""
    if traceable and OP_KIND == "triton_op" and not interpreting():
        return triton_op(f"mla_kernels::{name}", launcher, mutates_args=mutates_args)
    op = torch.library.custom_op(f"mla_kernels::{name}", direct(launcher), mutates_args=mutates_args)
    op.register_fake(fake)
    return op


def eager_twin(name, launcher, setup_context, backward):
    """The `apply` of an autograd.Function that runs launcher directly, saves what
    setup_context(ctx, inputs, output, eager=True) saves, and differentiates by backward."""

    def forward(ctx, *inputs):
        output = direct(launcher)(*inputs)
        setup_context(ctx, inputs, output, eager=True)
        return output

    twin = type(f"Eager_{name}", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})
    return twin.apply
