"""Every test under tests/gpu is marked `cuda` and skipped where no CUDA device is visible.

    PYTHONPATH=. python -m pytest tests/gpu        # on a machine with an NVIDIA GPU
    python -m pytest tests -m "not cuda"           # everything else

The kernels take the first tile candidate that fits each shape instead of timing them all
(MLA_KERNELS_AUTOTUNE=0: one compile per shape, and the suite meets dozens of shapes once);
MLA_KERNELS_AUTOTUNE=1 in the environment checks the autotuned tiles instead.
"""
import gc
import os
import zlib
from pathlib import Path

import pytest
import torch

GPU_TESTS_DIR = Path(__file__).resolve().parent
SKIP_REASON = "needs a CUDA GPU (torch.cuda.is_available() is False)"


def pytest_collection_modifyitems(config, items):
    """Mark the tests of this folder `cuda`; skip every `cuda` test when there is no GPU."""
    no_gpu = not torch.cuda.is_available()
    for item in items:
        if GPU_TESTS_DIR in item.path.resolve().parents:
            item.add_marker(pytest.mark.cuda)
        if no_gpu and item.get_closest_marker("cuda"):
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.fixture(scope="session", autouse=True)
def first_tile_candidates():
    """MLA_KERNELS_AUTOTUNE=0 for the whole GPU session (module fixtures that train included),
    unless the environment asks for the search."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLA_KERNELS_AUTOTUNE", os.environ.get("MLA_KERNELS_AUTOTUNE", "0"))
        yield


@pytest.fixture(autouse=True)
def fresh_gpu(request):
    """A seed of its own for each test (fresh inputs, reproducible), its GPU memory freed afterwards."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
