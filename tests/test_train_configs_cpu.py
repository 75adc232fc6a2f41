"""The shipped configs that a 2-core CPU trains in a minute or two, trained there as shipped
through the CLI: two iterations, an eval before each and after the last, a checkpoint written
and resumed for one more (tests/cli_runs.py). On the CPU the step mode is 'off'.

config/train_mla_custom.py (GPT-2 small's shape, 8 micro-steps of 16 x 512 tokens) needs minutes
per iteration on such a CPU; tests/gpu/test_train_configs.py trains it as shipped on the GPU.
"""
from pathlib import Path

import pytest
from cli_runs import CONFIGS, train_and_resume

GPU_ONLY = {"config/train_mla_custom.py"}


@pytest.mark.parametrize("config", sorted(set(CONFIGS) - GPU_ONLY), ids=lambda c: Path(c).stem)
def test_config_trains_as_shipped_on_the_cpu(config, tmp_path):
    train_and_resume(config, tmp_path, ["--device=cpu"], mode="off", first_iters=2, resumed_iters=1, eval_iters=1)
