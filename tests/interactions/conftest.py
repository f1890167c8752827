"""Shared settings of the interaction tests."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    # The networks here are tiny: one intra-op thread avoids oversubscribing a shared CPU,
    # which otherwise slows these small ops down by an order of magnitude.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
