"""The training engine that `python -m mla_gpt.cli.train` runs and bench/train.py times.

- runtime.py: where a process runs (device, dtype, its place in a torchrun job, its GPU's peak);
- batches.py: the prepared dataset and its random batches (Batches), drawn ahead of the device;
- step.py: one optimizer step (TrainStep) and its step modes: eager or compiled, torch.compile's
  CUDA graphs, or the whole iteration as one CUDA graph.
The loop around them (evals, checkpoints, logs) is mla_gpt/cli/train.py.
"""
