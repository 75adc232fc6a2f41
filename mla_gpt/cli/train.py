"""Train a GPT (standard or MLA attention) on a prepared dataset, nanoGPT style: the training loop.

    python -m mla_gpt.cli.train config/train_mla_test.py [--key=value ...]
    torchrun --standalone --nproc_per_node=4 -m mla_gpt.cli.train config/train_shakespeare_char.py

`python -m mla_gpt.cli.train --help` lists every key with its default (mla_gpt/cli/keys.py). Everything
is written to out_dir: ckpt.pt (atomic), metrics.jsonl (one record per log line and per eval) and
loss.png. This file holds the loop and main; the parts it runs are the other modules of mla_gpt.cli
(listed in its __init__.py).
"""

import math
import sys
import time
from contextlib import nullcontext
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
from mla_gpt.train.runtime import bf16_peak, resolve_runtime
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
    check_train_config(cfg, rt)
    out_dir = Path(cfg["out_dir"])
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
    else:
        log(f"cuda_graphs={cuda_graphs!r}" + {"compiler": ": torch.compile replays its forward and backward graphs",
                                              "off": ": no CUDA graphs"}[cuda_graphs])
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
