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


# The longest tests (seconds measured in `.ci/run` on 2 AVX2 cores), started first. A long test that xdist
# hands out last keeps one worker busy while the others idle (in one `.ci/run` the extended tier ended with
# these three running alone). Each is one statistical test that cannot be split without losing power.
LONGEST_FIRST = {
    "tests/test_smollm2.py::test_sampling_with_the_head_matches_hf_sampling_in_distribution": 357,
    "tests/test_vlm_feature_head.py::test_the_sampling_test_catches_a_wrong_draft_distribution": 219,
    "tests/test_vlm_feature_head.py::test_sampling_with_the_pruned_head_follows_the_target": 217,
}


def pytest_collection_modifyitems(config, items):
    """Start the longest tests first (a stable sort: every other test keeps pytest's order)."""
    items.sort(key=lambda item: -LONGEST_FIRST.get(item.nodeid, 0))
