"""Hypothesis profiles, chosen by HYPOTHESIS_PROFILE: `ci` (default; bounded and deterministic,
for `make test`) and `deep` (many random examples, for the nightly `make fuzz`)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=15,
    derandomize=True,  # the same examples on every run and machine
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "deep",
    max_examples=400,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# One torch thread per test process: `make test` runs two xdist workers on two cores, and more
# threads than cores made the suite several times slower on a loaded machine.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module's tests, whatever an earlier test or bench main() set; restored after.

    Training and small-matrix work on the shared cores: a second intra-op thread only spins.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
