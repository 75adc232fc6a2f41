"""bench/configs.py on the CPU: a shipped config trained as shipped, its measurements in the results schema."""
import json
import math
import subprocess
import sys
from pathlib import Path

from test_bench import read_results

REPO = Path(__file__).resolve().parents[1]
METRICS = {"rc", "tokens_per_iter", "ms_per_step", "tokens_per_s", "first_step_s", "train_loss", "val_loss"}


def test_configs_row_per_config_and_mode(tmp_path):
    out = tmp_path / "configs_cpu.json"
    proc = subprocess.run([sys.executable, "bench/configs.py", "--configs", "config/train_mla_test.py",
                           "--modes", "default", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = read_results(out, "configs", METRICS)
    assert row["provider"] == "config/train_mla_test.py" and row["rc"] == 0 and row["cuda_graphs"] == "off"
    assert set(json.loads(row["overrides"])) == {"max_iters", "eval_interval", "eval_iters", "log_interval"}
    assert row["tokens_per_iter"] == 32 * 64  # the config's batch x block size, accumulation 1
    for key in ("ms_per_step", "tokens_per_s", "first_step_s", "train_loss", "val_loss"):
        assert math.isfinite(row[key]) and row[key] > 0, key
