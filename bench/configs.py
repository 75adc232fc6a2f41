"""Every config in config/ trained as shipped through the CLI: step mode, speed, time to the first
step and the loss after a fixed short schedule.

    python bench/configs.py [--configs config/X.py ...] [--modes default off] [--out PATH.json]

Each row runs `python -m mla_gpt.cli.train CONFIG` in a subprocess with schedule keys only
(SCHEDULE: how many iterations, when to eval and log), so batch, accumulation, block size, SVD
and dropout are the config's own; the step mode is the trainer's default, or the one --modes
names. From the run's metrics.jsonl and log:
- cuda_graphs: the step mode the trainer ran (its log line);
- ms_per_step, tokens_per_s: over the steps after the trainer's warm-up (its running tok/s),
  evals and checkpoints excluded;
- first_step_s: iteration 0's time as the trainer logs it, from empty compile caches (compilation
  and autotuning included);
- train_loss, val_loss: the eval after the last iteration;
- rc: the run's exit status (a failed run keeps its row with the tail of its log).
On a CPU the schedule shrinks to CPU_SCHEDULE and the custom config is left out (minutes per step).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import REPO, add_out_argument, environment, on_gpu, result_rows, results_path, write_results

SCHEDULE = {"max_iters": 60, "eval_interval": 60, "eval_iters": 20, "log_interval": 10}
CPU_SCHEDULE = {"max_iters": 2, "eval_interval": 2, "eval_iters": 1, "log_interval": 1}
CPU_SKIP = {"config/train_mla_custom.py"}
MODES = {"default": [], "off": ["--cuda_graphs=off"]}
TIMEOUT_S = 420
TAIL_CHARS = 3000
TOKENS_LINE = re.compile(r"^tokens per iteration: ([\d,]+)", re.MULTILINE)
MODE_LINE = re.compile(r"^cuda_graphs='(\w+)'", re.MULTILINE)


def run_config(config, mode, schedule):
    """One row: the CLI trained on `config` in step mode `mode` ('default' or 'off')."""
    overrides = dict(schedule)
    with tempfile.TemporaryDirectory() as out_dir:
        args = [config, *(f"--{k}={v}" for k, v in overrides.items()), f"--out_dir={out_dir}", *MODES[mode]]
        # empty compile caches: the first step a user meets on a new machine
        env = {**os.environ, "TRITON_CACHE_DIR": f"{out_dir}/triton", "TORCHINDUCTOR_CACHE_DIR": f"{out_dir}/inductor"}
        print(f"[configs] {config} ({mode}) ...", flush=True)
        try:
            proc = subprocess.run([sys.executable, "-m", "mla_gpt.cli.train", *args], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_S)
            rc, output = proc.returncode, proc.stdout
        except subprocess.TimeoutExpired as e:
            rc, output = None, (e.output.decode(errors="replace") if isinstance(e.output, bytes) else e.output or "")
        metrics_path = Path(out_dir) / "metrics.jsonl"
        records = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    row = dict(provider=config, mode=mode, overrides=json.dumps(overrides), rc=rc,
               op_kind=os.environ.get("MLA_KERNELS_OP", "triton_op"))
    modes = MODE_LINE.findall(output)
    row["cuda_graphs"] = modes[0] if modes else None
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    tokens = TOKENS_LINE.search(output)
    if rc == 0 and train and evals and tokens:
        tokens_per_iter = int(tokens.group(1).replace(",", ""))
        tok_s = train[-1]["tok_s"]
        row.update(tokens_per_iter=tokens_per_iter, tokens_per_s=round(tok_s), ms_per_step=round(
            tokens_per_iter / tok_s * 1000, 2), first_step_s=round(train[0]["time_ms"] / 1000, 2),
            train_loss=evals[-1]["train_loss"], val_loss=evals[-1]["val_loss"])
    else:
        row["log_tail"] = output[-TAIL_CHARS:]
    print(f"[configs] {config} ({mode}): " + ", ".join(
        f"{k} {row.get(k)}" for k in ("rc", "cuda_graphs", "ms_per_step", "tokens_per_s", "first_step_s",
                                      "val_loss")), flush=True)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    configs = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "config").glob("*.py"))
    parser.add_argument("--configs", nargs="+", default=None, choices=configs, help="default: every config")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    add_out_argument(parser, "configs")
    args = parser.parse_args(argv)
    gpu = on_gpu()
    chosen = args.configs or [c for c in configs if gpu or c not in CPU_SKIP]
    schedule = SCHEDULE if gpu else CPU_SCHEDULE
    rows = [run_config(config, mode, schedule) for config in chosen for mode in args.modes]
    units = {"rc": "", "tokens_per_iter": "tokens", "tokens_per_s": "tokens/s", "ms_per_step": "ms",
             "first_step_s": "s", "train_loss": "", "val_loss": "", "log_tail": ""}
    write_results(results_path(args.out, "configs"), result_rows("configs", rows, units, environment()))
    return 0 if all(row["rc"] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
