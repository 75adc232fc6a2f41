"""Settings and fixtures of the whole suite.

Kernels run through the Triton interpreter on machines without a GPU: TRITON_INTERPRET=1 is set
here, before any test module imports the kernels (Triton reads it when a kernel is defined), so no
test file sets it itself. Where a GPU is visible it is left alone: tests/gpu needs the compiled
kernels, and the ops on CPU tensors then run their references (mla_kernels.reference) instead
of the kernels, as the report header says; `TRITON_INTERPRET=1 python -m pytest tests -m "not cuda"`
runs the CPU kernel tests through the interpreter there.

Under pytest-xdist (`-n auto`, the README's test command) each worker keeps one intra-op thread,
so the workers share the cores instead of each taking all of them.

This folder is on sys.path for every test, tests/gpu included (pytest's default `prepend` import
mode puts it there when it loads this file), so test files share code with `from helpers import ...`.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `-n N` runs N workers: one intra-op thread each, not N x cores
    torch.set_num_threads(1)


def pytest_report_header(config):
    if os.environ.get("TRITON_INTERPRET") != "1":
        return ("TRITON_INTERPRET is not 1: kernels on CPU tensors run their references, so the CPU kernel "
                "tests check the fallback, not the kernels")
    return None


@pytest.fixture
def one_thread():
    """One intra-op thread: torch's batched CPU QR (the reference SVD) slows ~1000x with two threads
    on busy cores (measured 6.3 s vs 0.5 ms for (16, 128, 32)), and the models using it are tiny."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
