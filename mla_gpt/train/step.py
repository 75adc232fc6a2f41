"""The training step: TrainStep and how it runs (compiled, CUDA graphs, a capturable AdamW).

TrainStep is one optimizer step, as `train` runs it and bench/train.py times it. `use_cuda_graphs`
picks the cuda_graphs mode of a run, `compile_for_training` compiles the model for it, and
`capturable_optimizer` with `set_learning_rate` let a captured step follow the learning rate.
"""

import torch
import torch.distributed as dist

from mla_gpt.cli.configurator import ConfigError
from mla_gpt.model.config import GPTConfig
from mla_gpt.model.svd_values import svd_capture_blocker

CUDA_GRAPH_MODES = ("step", "compiler", "off")


def step_capture_blocker(model_args, rt):
    """Why the whole step cannot be captured as one CUDA graph with these settings, or None."""
    config = GPTConfig(**model_args)
    if config.use_svd and config.attn_backend not in ("auto", "triton"):  # the SVD kernels run on these two
        return (f"use_svd=True with attn_backend={config.attn_backend!r} computes its SVD in plain PyTorch "
                "(torch.linalg), which waits on the host")
    if blocker := svd_capture_blocker(config):
        return blocker
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


def set_learning_rate(optimizer, lr):
    """Set every group's learning rate: a float replaced, a capturable optimizer's tensor refilled."""
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
    float16 run's GradScaler reads its inf check each step, and an SVD of the values that factors
    through torch.linalg, `step_capture_blocker` says when, waits for its factorization).

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
        if self.cuda_graphs == "compiler":
            self._gradients_outside_graphs()
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
        self.optimizer.zero_grad(set_to_none=self.cuda_graphs != "compiler")
        self.batches.prefetch()
        return loss_sum

    def _gradients_outside_graphs(self):
        """cuda_graphs='compiler': give every parameter a zero gradient of its own, once.

        The compiled backward's outputs live in the CUDA graphs' memory pool, and each micro-step
        starts a new replay (cudagraph_mark_step_begin) that writes over the last one's. Autograd
        takes a backward output as the gradient itself when the gradient is None, so under
        gradient accumulation the next micro-step overwrote the gradients it was about to add
        to. A gradient that already exists is added to in place instead, so the graphs' outputs
        are only read within their own replay; the step zeroes them in place (set_to_none=False).
        """
        for param in self.model.parameters():
            if param.requires_grad and param.grad is None:
                param.grad = torch.zeros_like(param)

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
