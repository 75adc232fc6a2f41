"""Every config in config/ trains a few iterations on the GPU through the CLI, in every step mode.

    PYTHONPATH=. python -m pytest tests/gpu/test_train_configs.py

Each case runs `python -m mla_gpt.cli.train config/X.py` as a subprocess from the source tree (no
install needed), with a short schedule and a small batch appended to the config's own settings, and
checks that it exits with status 0 and logs a finite loss for every iteration. The variations
(absorbed / expanded path, SVD of the value latents in both modes, the core on SDPA, SVD on standard
attention) run on the smallest config only.
shakespeare_char is prepared from the bundled corpus by the first run that needs it.
"""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "config").glob("*.py"))
SMALLEST_CONFIG = "config/train_mla_test.py"
MAX_ITERS = 6  # cuda_graphs='step' captures after three iterations: three more replay
SHORT_RUN = [f"--max_iters={MAX_ITERS}", "--eval_interval=2", "--eval_iters=2", "--log_interval=1",
             "--batch_size=4", "--gradient_accumulation_steps=1"]
COMPILE_MODES = {  # the trainer's step modes; on one GPU the default captures the whole step
    "eager": ["--compile=False", "--cuda_graphs=off"],
    "compiled": ["--compile=True", "--cuda_graphs=off"],
    "compiler-graphs": ["--compile=True", "--cuda_graphs=compiler"],
    "default": [],
}
MLA_VARIATIONS = {
    "absorbed": ["--use_mla=True", "--mla_path=absorbed"],
    "expanded": ["--use_mla=True", "--mla_path=expanded"],
    "svd-weight": ["--use_mla=True", "--use_svd=True", "--svd_rank=8", "--svd_mode=weight"],
    "svd-activation": ["--use_mla=True", "--use_svd=True", "--svd_rank=8", "--svd_mode=activation"],
    "sdpa-core": ["--use_mla=True", "--attn_backend=sdpa"],
    "standard-svd-weight": ["--use_mla=False", "--use_svd=True", "--svd_rank=8"],
}
RUNS = [pytest.param(config, [], id=Path(config).stem) for config in CONFIGS] + [
    pytest.param(SMALLEST_CONFIG, flags, id=f"{Path(SMALLEST_CONFIG).stem}-{name}")
    for name, flags in MLA_VARIATIONS.items()
]
TIMEOUT_S = 300
TAIL_CHARS = 8000  # enough to reach the root cause of a compile error
ITER_LINE = re.compile(r"^iter (\d+): loss (\S+),", re.MULTILINE)


def run_train(args):
    """(return code, stdout and stderr interleaved) of the train CLI; return code None on timeout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run([sys.executable, "-m", "mla_gpt.cli.train", *args], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        output = e.output.decode(errors="replace") if isinstance(e.output, bytes) else e.output or ""
        return None, output + f"\n[killed after {TIMEOUT_S} s]"
    return proc.returncode, proc.stdout


@pytest.mark.parametrize("mode", COMPILE_MODES)
@pytest.mark.parametrize("config, extra", RUNS)
def test_config_trains(config, extra, mode, tmp_path):
    code, output = run_train([config, *SHORT_RUN, f"--out_dir={tmp_path}", *COMPILE_MODES[mode], *extra])
    tail = f"\n--- last {TAIL_CHARS} characters of the output ---\n{output[-TAIL_CHARS:]}"
    assert code == 0, f"train exited with status {code}" + tail
    logged = {int(it): float(loss) for it, loss in ITER_LINE.findall(output)}
    assert sorted(logged) == list(range(MAX_ITERS)), f"expected 'iter N: loss ...' for N < {MAX_ITERS}" + tail
    bad = {it: loss for it, loss in logged.items() if not math.isfinite(loss)}
    assert not bad, f"non-finite loss at {bad}" + tail
