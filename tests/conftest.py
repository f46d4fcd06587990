"""Suite configuration: deterministic Hypothesis under CI, float64 helpers, seeded generators."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=25, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture
def generator() -> torch.Generator:
    """A fresh seeded generator per test (library code never seeds globally)."""
    return torch.Generator().manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_torch_state():
    """Tests may change the default dtype or global seed; restore both afterwards."""
    dtype = torch.get_default_dtype()
    rng = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)
        torch.set_rng_state(rng)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster, and does not fight parallel test runs for cores.

    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
