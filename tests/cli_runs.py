"""The train CLI as a user runs it, in a subprocess: what tests/test_train_configs_cpu.py and
tests/gpu/test_train_configs.py share.

A config is trained as shipped: only schedule keys are appended (how many iterations, when to
eval and log, that a checkpoint is written), so its batch, accumulation, block size, SVD and
dropout are the ones a user gets. `check_run` reads the log a run prints.
"""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "config").glob("*.py"))
SMALLEST_CONFIG = "config/train_mla_test.py"
FIRST_ITERS = 5  # cuda_graphs='step' captures after three iterations: the fourth is captured, the fifth replays
RESUMED_ITERS = 2


def schedule(max_iters, eval_iters=2):
    """The schedule keys of a short run: an eval before every step (so one before and one after the
    first optimizer step, and one between graph replays), a line per step, a checkpoint at each eval."""
    return [f"--max_iters={max_iters}", "--eval_interval=1", f"--eval_iters={eval_iters}", "--log_interval=1",
            "--always_save_checkpoint=True"]


TIMEOUT_S = 600
TAIL_CHARS = 8000  # enough to reach the root cause of a compile error
ITER_LINE = re.compile(r"^iter (\d+): loss (\S+),", re.MULTILINE)
EVAL_LINE = re.compile(r"^step (\d+): train loss (\S+), val loss (\S+)$", re.MULTILINE)
MODE_LINE = re.compile(r"^cuda_graphs='(\w+)'", re.MULTILINE)


def run_train(args):
    """(return code, stdout and stderr interleaved) of `python -m mla_gpt.cli.train ARGS` from the
    source tree; return code None on timeout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run([sys.executable, "-m", "mla_gpt.cli.train", *args], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        output = e.output.decode(errors="replace") if isinstance(e.output, bytes) else e.output or ""
        return None, output + f"\n[killed after {TIMEOUT_S} s]"
    return proc.returncode, proc.stdout


def check_run(code, output, iters, mode=None):
    """The run exited 0, logged a finite loss for each of `iters` and an eval before each of them
    and after the last, in step mode `mode` when given."""
    tail = f"\n--- last {TAIL_CHARS} characters of the output ---\n{output[-TAIL_CHARS:]}"
    assert code == 0, f"train exited with status {code}" + tail
    logged = {int(it): float(loss) for it, loss in ITER_LINE.findall(output)}
    assert sorted(logged) == list(iters), f"expected 'iter N: loss ...' for N in {list(iters)}" + tail
    bad = {it: loss for it, loss in logged.items() if not math.isfinite(loss)}
    assert not bad, f"non-finite loss at {bad}" + tail
    evals = {int(it): (float(train), float(val)) for it, train, val in EVAL_LINE.findall(output)}
    expected_evals = [*iters, iters[-1] + 1]
    assert sorted(evals) == expected_evals, f"expected an eval at each of {expected_evals}" + tail
    bad = {it: losses for it, losses in evals.items() if not all(map(math.isfinite, losses))}
    assert not bad, f"non-finite eval loss at {bad}" + tail
    if mode is not None:
        assert MODE_LINE.findall(output) == [mode], f"expected the step mode cuda_graphs={mode!r}" + tail
    return tail


def train_and_resume(config, out_dir, flags=(), mode=None, first_iters=FIRST_ITERS, resumed_iters=RESUMED_ITERS,
                     eval_iters=2):
    """Train `config` as shipped for `first_iters` iterations, then resume its checkpoint for
    `resumed_iters` more; both runs checked by `check_run`."""
    code, output = run_train([config, *schedule(first_iters, eval_iters), f"--out_dir={out_dir}", *flags])
    check_run(code, output, range(first_iters), mode)
    total = first_iters + resumed_iters
    code, output = run_train([config, *schedule(total, eval_iters), f"--out_dir={out_dir}", "--init_from=resume",
                              *flags])
    tail = check_run(code, output, range(first_iters, total), mode)
    assert f"at iter {first_iters}" in output, f"expected the resumed run to start at iter {first_iters}" + tail
