"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tiny-batch forward passes on one thread, then restore the setting.

    On a shared 2-core machine a second OpenMP thread only adds contention for batches this small.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

