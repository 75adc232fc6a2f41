"""Every config in config/ trains on the GPU through the CLI exactly as shipped, in its default
step mode and with cuda_graphs='off'; then each step mode with and without gradient accumulation.

    PYTHONPATH=. python -m pytest tests/gpu/test_train_configs.py

Each case runs `python -m mla_gpt.cli.train config/X.py` as a subprocess from the source tree (no
install needed). The shipped configs get schedule keys only (tests/cli_runs.py): a few iterations,
an eval before each step, a checkpoint written and resumed. The step-mode and variation cases run
the smallest config with an accumulation of 1 and of 3 micro-steps, since accumulation under the
compiler's CUDA graphs is where a config once crashed. shakespeare_char is prepared from the
bundled corpus by the first run that needs it.
"""
from pathlib import Path

import pytest
from cli_runs import CONFIGS, SMALLEST_CONFIG, check_run, run_train, schedule, train_and_resume

DEFAULT_MODE = {  # what cuda_graphs=None picks on one GPU for each shipped config
    "config/train_mla_custom.py": "step",  # its SVD basis update records into the step's graph
    "config/train_mla_test.py": "step",
    "config/train_shakespeare_char.py": "step",
}
STEP_MODES = {  # the trainer's step modes, flags and the mode the log must name
    "eager": (["--compile=False", "--cuda_graphs=off"], "off"),
    "compiled": (["--compile=True", "--cuda_graphs=off"], "off"),
    "compiler": (["--compile=True", "--cuda_graphs=compiler"], "compiler"),
    "step": (["--cuda_graphs=step"], "step"),
}
ACCUMULATION = [1, 3]
MLA_VARIATIONS = {
    "absorbed": ["--use_mla=True", "--mla_path=absorbed"],
    "expanded": ["--use_mla=True", "--mla_path=expanded"],
    "svd-weight": ["--use_mla=True", "--use_svd=True", "--svd_rank=8", "--svd_mode=weight"],
    "svd-activation": ["--use_mla=True", "--use_svd=True", "--svd_rank=8", "--svd_mode=activation"],
    "sdpa-core": ["--use_mla=True", "--attn_backend=sdpa"],
    "standard-svd-weight": ["--use_mla=False", "--use_svd=True", "--svd_rank=8"],
}
VARIATION_ITERS = 5


def test_every_config_has_its_default_mode():
    assert sorted(DEFAULT_MODE) == CONFIGS


@pytest.mark.parametrize("mode", ["default", "off"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: Path(c).stem)
def test_config_trains_as_shipped(config, mode, tmp_path):
    flags, expected = ([], DEFAULT_MODE[config]) if mode == "default" else (["--cuda_graphs=off"], "off")
    train_and_resume(config, tmp_path, flags, expected)


@pytest.mark.parametrize("accumulation", ACCUMULATION, ids=lambda a: f"accum{a}")
@pytest.mark.parametrize("mode", STEP_MODES)
def test_step_mode_with_accumulation(mode, accumulation, tmp_path):
    flags, expected = STEP_MODES[mode]
    code, output = run_train([SMALLEST_CONFIG, *schedule(VARIATION_ITERS), f"--out_dir={tmp_path}",
                              f"--gradient_accumulation_steps={accumulation}", *flags])
    check_run(code, output, range(VARIATION_ITERS), expected)


@pytest.mark.parametrize("mode", ["default", "compiler"])
@pytest.mark.parametrize("variation", MLA_VARIATIONS)
def test_variation_trains_with_accumulation(variation, mode, tmp_path):
    flags = [] if mode == "default" else STEP_MODES["compiler"][0]
    code, output = run_train([SMALLEST_CONFIG, *schedule(VARIATION_ITERS), f"--out_dir={tmp_path}",
                              f"--gradient_accumulation_steps={ACCUMULATION[-1]}", *MLA_VARIATIONS[variation],
                              *flags])
    check_run(code, output, range(VARIATION_ITERS))
