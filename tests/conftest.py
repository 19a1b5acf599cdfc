import pytest
import torch
from backends import BACKENDS
from hypothesis import settings

import rnnkit


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Two busy processes on two cores make torch's OpenMP threads stall: pin one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Property tests (tests/test_properties.py): a fixed, derandomized budget by default so CI is
# deterministic; `pytest --hypothesis-profile=long` explores 2000 random configurations per test.
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("long", max_examples=2000, deadline=None, print_blob=True)
settings.load_profile("ci")


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run the test with each rnnkit backend present forced in turn ("auto" aside)."""
    with rnnkit.use_backend(request.param):
        yield request.param


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; skipped unless --run-slow is given")
    # When a property test fails, hypothesis imports libcst (if installed) to suggest a patch;
    # libcst's import warns, which the warnings-are-errors setting would turn into an INTERNALERROR
    # hiding the failure.
    config.addinivalue_line("filterwarnings", "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
