import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Two busy processes on two cores make torch's OpenMP threads stall: pin one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
