import os

import pytest
import torch

# Kernels run under the Triton interpreter on machines without CUDA; moelab sets this
# itself, this line only makes the test environment explicit.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """tiny's ops are too small for a second OpenMP thread to pay; on a busy 2-core machine
    two threads make the model tests about 8x slower. Restored after the module.
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer) of the shipped trained `tiny`, loaded once per module."""
    import moelab

    return moelab.load("tiny")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
