# Triton runs on CPU only in interpreter mode, which must be set before any module defining
# @triton.jit kernels is imported.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# the tiny test models run fastest single-threaded (thread hand-offs dominate their matmuls)
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module, whatever an earlier test set (tiny convolutions: thread hand-off
    costs more than it saves, badly so on a loaded CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# pytest-xdist (the default: `-n auto` in pyproject) runs this many worker processes side by side
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


@pytest.fixture(scope="module")
def real_model_threads():
    """Torch threads for a module on the real SmolLM2 (large enough matmuls to gain from a second thread):
    two, or this worker's share of the cores when xdist runs several workers, so they do not oversubscribe."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))
    yield
    torch.set_num_threads(before)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
