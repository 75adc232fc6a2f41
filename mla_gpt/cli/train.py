"""Train a GPT (standard or MLA attention) on a prepared dataset, nanoGPT style: the training loop.

    python -m mla_gpt.cli.train config/train_mla_test.py [--key=value ...]
    torchrun --standalone --nproc_per_node=4 -m mla_gpt.cli.train config/train_shakespeare_char.py

`python -m mla_gpt.cli.train --help` lists every key with its default (mla_gpt/cli/keys.py). Everything
is written to out_dir: ckpt.pt (atomic), metrics.jsonl (one record per log line and per eval) and
loss.png. This file holds the loop, in named phases (setup, resume, build_engine, then per iteration
evaluate_and_checkpoint and take_step), and main; the parts it runs are the other modules of
mla_gpt.cli (listed in its __init__.py) and the training engine, mla_gpt.train.
"""

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from mla_gpt.cli.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    CheckpointError,
    load_checkpoint,
    portable_optimizer_state,
    save_checkpoint,
)
from mla_gpt.cli.configurator import ConfigError, help_text, load_config
from mla_gpt.cli.init_from import initial_model
from mla_gpt.cli.keys import ModelKeys, TrainConfig, check_train_config
from mla_gpt.cli.metrics import Metrics
from mla_gpt.cli.rng import gather_rng, restore_rng, seed_everything
from mla_gpt.train.batches import Batches, prepare_dataset
from mla_gpt.train.runtime import Runtime, bf16_peak, resolve_runtime
from mla_gpt.train.step import (
    TrainStep,
    capturable_optimizer,
    compile_for_training,
    set_learning_rate,
    use_cuda_graphs,
)

EVAL_NOTICE_S = 30  # an eval projected to take longer than this is announced, with how to shorten it
MFU_WARMUP_ITERS = 5  # the first iterations include allocator and compile warm-up; nanoGPT skips them too


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is left in place."""


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


def reads_loss_every_step(rt):
    """On a CPU there is no device work to overlap: read (and show) every step's loss."""
    return rt.device_type == "cpu"


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
    """The loop, phase by phase: setup, resume, engine; then per iteration evaluate (and
    checkpoint), one step, and reading its loss where it is logged."""
    check_train_config(cfg, rt)
    log = Log(rt.master)
    run, checkpoint = setup(cfg, rt, log)
    progress = resume(run, checkpoint, log)
    del checkpoint  # free the memory
    build_engine(run, progress, log)
    try:
        while True:
            lr = learning_rate(progress.iter_num, cfg)
            set_learning_rate(run.optimizer, lr)
            if progress.iter_num % cfg["eval_interval"] == 0 or progress.iter_num >= cfg["max_iters"]:
                evaluate_and_checkpoint(run, progress, lr, log)
            if cfg["eval_only"] or progress.iter_num >= cfg["max_iters"]:
                break
            take_step(run, progress, lr, log)
    finally:
        if log.bar is not None:
            log.bar.close()
    if rt.master:
        run.metrics.plot(run.title)
    if rt.ddp:
        dist.barrier()  # no process tears the group down while rank 0 still writes its checkpoint
    return {
        "iter_num": progress.iter_num,
        "train_loss": progress.last_losses.get("train"),
        "val_loss": progress.last_losses.get("val"),
        "best_val_loss": progress.best_val_loss,
        "out_dir": str(run.out_dir),
        "model": run.raw_model,
    }


class Log:
    """Log lines from the master process, through the progress bar once there is one."""

    def __init__(self, master):
        self.master, self.bar = master, None

    def __call__(self, message):
        if not self.master:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)  # flushed: logs piped to a file show up as they come


@dataclass
class Run:
    """What a training job holds from setup to its end (the engine's parts filled by build_engine)."""

    cfg: dict
    rt: Runtime
    out_dir: Path
    meta: dict
    block_size: int
    train_batches: Batches
    eval_batches: dict  # {'train', 'val'}: Batches, reseeded at every eval
    model: torch.nn.Module  # compiled and wrapped in DDP by build_engine
    model_args: dict
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    grad_accum: int
    tokens_per_iter: int
    raw_model: torch.nn.Module = None  # the GPT itself, for its state and MFU
    cuda_graphs: str = "off"
    autocast: object = None
    metrics: Metrics = None  # master process only
    title: str = ""
    peak: tuple = None  # (GPU name, dense bf16 FLOP/s), or None where unknown
    step: TrainStep = None


@dataclass
class Progress:
    """The loop's state: where it is, the best loss so far, and what is measured between log lines."""

    iter_num: int
    best_val_loss: float
    start_iter: int  # the first iteration of this process (a resumed run's checkpoint is not re-saved)
    unread_loss_sum: torch.Tensor  # () on the device: the losses of the steps not read yet, summed
    last_losses: dict = field(default_factory=dict)  # of the last eval
    local_iter: int = 0
    running_mfu: float = -1.0
    timed_tokens: int = 0  # steps after the warm-up ones, eval and checkpoints excluded
    timed_seconds: float = 0.0
    unread_steps: int = 0
    interval_start: float = 0.0  # when the first unread step began
    interval_first_iter: int = 0
    eval_announced: bool = False


def setup(cfg, rt, log):
    """Dataset, seeds, batches, model, optimizer and scaler; the checkpoint to resume, or None."""
    out_dir = Path(cfg["out_dir"])
    if rt.master:
        out_dir.mkdir(parents=True, exist_ok=True)
    data_dir, meta = prepare_dataset(cfg, rt, log)
    checkpoint = None
    if cfg["init_from"] == "resume":
        checkpoint = load_checkpoint(out_dir / CHECKPOINT_NAME, map_location=rt.device)
    seed = cfg["seed"] + rt.rank  # each process draws different batches; weights are synced by DDP
    seed_everything(seed)
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
    model, model_args = initial_model(cfg, meta, checkpoint, log)
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
    run = Run(cfg, rt, out_dir, meta, block_size, train_batches, eval_batches, model, model_args, optimizer, scaler,
              grad_accum, tokens_per_iter, raw_model=model)
    return run, checkpoint


def resume(run, checkpoint, log):
    """The optimizer, scaler, counters and RNG states of the checkpoint (None: a fresh start)."""
    iter_num, best_val_loss = 0, float("inf")
    if checkpoint is not None:
        run.optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint["scaler"]:  # empty when saved by a disabled (non-float16) scaler
            run.scaler.load_state_dict(checkpoint["scaler"])
        iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        restore_rng(checkpoint["rng"], run.rt, run.train_batches, log)
        log(
            f"resuming from {run.out_dir / CHECKPOINT_NAME} at iter {iter_num} (best val loss {best_val_loss:.4f})"
        )
    # The loss is read (a host-device sync) only where it is logged, before an eval and at the end,
    # so the host queues the next steps while the device runs; the sum of the unread losses tells
    # whether any was NaN or inf.
    return Progress(iter_num, best_val_loss, iter_num, torch.zeros((), device=run.rt.device))


def build_engine(run, progress, log):
    """Compilation, CUDA graphs, DDP, autocast, metrics, the progress bar and the step itself."""
    cfg, rt = run.cfg, run.rt
    compile_model = cfg["compile"] if cfg["compile"] is not None else rt.device_type == "cuda"
    run.cuda_graphs = use_cuda_graphs(cfg, rt, compile_model, run.model_args)
    if compile_model:
        log(f"compiling the model with torch.compile{' (CUDA graphs)' if run.cuda_graphs == 'compiler' else ''} ...")
        run.model = compile_for_training(run.model, run.cuda_graphs)
    if run.cuda_graphs == "step":
        capturable_optimizer(run.optimizer, rt.device)
        log(f"cuda_graphs='step': after this run's first {TrainStep.CAPTURE_AFTER_ITERS} iterations, each "
            "replays as one CUDA graph")
    else:
        log(f"cuda_graphs={run.cuda_graphs!r}" + {"compiler": ": torch.compile replays its forward and backward graphs",
                                                  "off": ": no CUDA graphs"}[run.cuda_graphs])
    if rt.ddp:
        run.model = DDP(run.model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)
    log(
        f"model: {run.raw_model.get_num_params() / 1e6:.2f}M parameters, "
        f"{'MLA' if run.model_args['use_mla'] else 'standard'} attention"
    )
    run.autocast = (
        nullcontext() if rt.ptdtype == torch.float32 else torch.amp.autocast(rt.device_type, dtype=rt.ptdtype)
    )
    if rt.master:
        run.metrics = Metrics(run.out_dir, progress.iter_num if cfg["init_from"] == "resume" else None)
    run.title = (
        f"{run.out_dir.name}: {'MLA' if run.model_args['use_mla'] else 'standard'} attention, "
        f"{run.model_args['n_layer']}L {run.model_args['n_head']}H {run.model_args['n_embd']}C, {cfg['dataset']}"
    )
    show_bar = cfg["progress_bar"] if cfg["progress_bar"] is not None else rt.device_type == "cpu"
    if show_bar and rt.master:
        from tqdm import tqdm

        log.bar = tqdm(total=cfg["max_iters"], initial=progress.iter_num, unit="it", dynamic_ncols=True,
                       file=sys.stderr)
    run.peak = bf16_peak(rt.device)
    if run.peak is not None:
        log(f"mfu against the {run.peak[0]}'s dense bf16 peak, {run.peak[1] / 1e12:.0f} TFLOP/s (datasheet)")
    run.step = TrainStep(run.model, run.optimizer, run.scaler, run.train_batches, run.autocast, run.grad_accum,
                         cfg["grad_clip"], rt, run.cuda_graphs)


@torch.no_grad()
def estimate_loss(run, progress, log):
    """Mean loss over eval_iters batches of each split; long evals say so before they run."""
    cfg, rt = run.cfg, run.rt
    run.model.eval()
    out = {}
    for split, batches in run.eval_batches.items():
        batches.generator.manual_seed(cfg["seed"] + rt.rank)
        losses = torch.zeros(cfg["eval_iters"])
        batch_indices = range(cfg["eval_iters"])
        if log.bar is not None:
            from tqdm import tqdm

            batch_indices = tqdm(batch_indices, desc=f"eval {split}", unit="batch", leave=False,
                                 dynamic_ncols=True, file=sys.stderr)
        for k in batch_indices:
            started = time.perf_counter()
            x, y = batches.next()
            if run.cuda_graphs == "compiler":
                torch.compiler.cudagraph_mark_step_begin()
            with run.autocast:
                _, loss = run.model(x, y)
            losses[k] = loss.item()
            if k == 1 and not progress.eval_announced:  # the second batch: the first one compiles
                progress.eval_announced = True
                projected = (time.perf_counter() - started) * cfg["eval_iters"] * len(run.eval_batches)
                if projected > EVAL_NOTICE_S:
                    log(f"eval: {len(run.eval_batches)} splits x {cfg['eval_iters']} batches of "
                        f"{cfg['batch_size']} x {run.block_size} will take about {projected / 60:.1f} min "
                        f"on {rt.device}, at every eval; --eval_iters=N shortens it")
        mean = losses.mean().to(rt.device)
        if rt.ddp:
            dist.all_reduce(mean)
            mean /= rt.world_size
        out[split] = mean.item()
    run.model.train()
    return out


def evaluate_and_checkpoint(run, progress, lr, log):
    """Eval both splits, log and record them; save a checkpoint when val improved (or always_save_checkpoint)."""
    cfg = run.cfg
    rng = gather_rng(run.rt, run.train_batches)  # before the eval: a resumed run repeats it before its first step
    progress.last_losses = losses = estimate_loss(run, progress, log)
    log(f"step {progress.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
    if run.rt.master:
        run.metrics.add({"kind": "eval", "iter": progress.iter_num, "train_loss": losses["train"],
                         "val_loss": losses["val"], "lr": lr})
        run.metrics.plot(run.title)
    improved = losses["val"] < progress.best_val_loss
    progress.best_val_loss = min(progress.best_val_loss, losses["val"])
    # iter_num > start_iter: never re-save the state just loaded
    if progress.iter_num > progress.start_iter and (improved or cfg["always_save_checkpoint"]) and run.rt.master:
        save_checkpoint(run.out_dir / CHECKPOINT_NAME, checkpoint_state(run, progress, rng))
        log(f"saved checkpoint to {run.out_dir / CHECKPOINT_NAME}")


def checkpoint_state(run, progress, rng):
    """What ckpt.pt holds (CHECKPOINT_FORMAT); rng: the RNG states gathered before the eval."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model": run.raw_model.state_dict(),
        "optimizer": portable_optimizer_state(run.optimizer),
        "scaler": run.scaler.state_dict(),
        "model_args": run.model_args,
        "iter_num": progress.iter_num,
        "best_val_loss": progress.best_val_loss,
        "config": run.cfg,
        "meta": run.meta,
        "rng": rng,
    }


def take_step(run, progress, lr, log):
    """One iteration; its loss is read where it is logged, before an eval and at the end (every
    step on a CPU), and checked for NaN or inf together with the unread ones before it."""
    cfg = run.cfg
    if progress.unread_steps == 0:  # the steps' own time: eval and checkpoint happen before this
        progress.interval_start, progress.interval_first_iter = time.perf_counter(), progress.local_iter
    loss = run.step()
    progress.unread_loss_sum += loss
    progress.unread_steps += 1
    logged = progress.iter_num % cfg["log_interval"] == 0
    next_iter = progress.iter_num + 1
    if (reads_loss_every_step(run.rt) or logged or next_iter % cfg["eval_interval"] == 0
            or next_iter >= cfg["max_iters"]):
        lossf, dt, warmed_up = read_losses(run, progress, loss)
        if log.bar is not None:
            log.bar.set_postfix(loss=f"{lossf:.4f}", refresh=False)
        if logged and run.rt.master:
            log_step(run, progress, lossf, lr, dt, warmed_up, log)
    progress.iter_num, progress.local_iter = next_iter, progress.local_iter + 1
    if log.bar is not None:
        log.bar.update(1)


def read_losses(run, progress, loss):
    """Read the last step's loss (a device sync) and the unread sum: (loss, seconds per step over
    the unread steps, whether none of them was a warm-up step). Raises TrainingDiverged on NaN or inf."""
    lossf = loss.item()
    dt = (time.perf_counter() - progress.interval_start) / progress.unread_steps
    if not math.isfinite(lossf) or not math.isfinite(progress.unread_loss_sum.item()):
        iter_num = progress.iter_num
        what = f"is {lossf} at iter {iter_num}" if not math.isfinite(lossf) else (
            f"was NaN or inf in one of iters {iter_num - progress.unread_steps + 1}..{iter_num}")
        raise TrainingDiverged(
            f"loss {what}; stopping. The last good checkpoint ({run.out_dir / CHECKPOINT_NAME}) "
            f"is left untouched; try a lower learning_rate or a grad_clip."
        )
    warmed_up = progress.interval_first_iter >= MFU_WARMUP_ITERS
    if warmed_up:
        progress.timed_tokens += run.tokens_per_iter * progress.unread_steps
        progress.timed_seconds += dt * progress.unread_steps
    progress.unread_steps = 0
    progress.unread_loss_sum.zero_()
    return lossf, dt, warmed_up


def log_step(run, progress, lossf, lr, dt, warmed_up, log):
    """One log line and metrics record; dt: seconds per step; warmed_up: no compile step in dt."""
    if warmed_up and run.peak is not None:
        mfu = run.raw_model.estimate_mfu(run.cfg["batch_size"] * run.grad_accum, dt, run.peak[1])  # per GPU
        progress.running_mfu = mfu if progress.running_mfu < 0 else 0.9 * progress.running_mfu + 0.1 * mfu
    # tokens/s over every timed step so far; the first steps (compile, warm-up) only until then
    tok_s = progress.timed_tokens / progress.timed_seconds if progress.timed_seconds else run.tokens_per_iter / dt
    mfu = progress.running_mfu if progress.running_mfu >= 0 else None
    mfu_text = f", mfu {mfu * 100:.1f}%" if mfu is not None else ""
    log(f"iter {progress.iter_num}: loss {lossf:.4f}, time {dt * 1000:.1f}ms, tok/s {tok_s:,.0f}{mfu_text}")
    run.metrics.add({"kind": "train", "iter": progress.iter_num, "loss": lossf, "lr": lr, "time_ms": dt * 1000,
                     "tok_s": tok_s, "mfu": mfu})


USAGE = "CONFIG.py [CONFIG.py ...] [--key=value ...]"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(help_text("python -m mla_gpt.cli.train", USAGE, TrainConfig, ModelKeys))
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
