"""Shared fixtures: a tiny random 2-layer model (fast logic tests) and the real 135M model (smoke tests)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

try:  # property-based tests: a CI-sized, reproducible budget by default (HYPOTHESIS_PROFILE=deep for more)
    from hypothesis import HealthCheck, settings

    settings.register_profile("ci", max_examples=60, derandomize=True, deadline=None, database=None,
                              print_blob=True, suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("deep", max_examples=2000, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # the dev extra is not installed: the fuzz tests skip themselves
    pass


@pytest.fixture(scope="session")
def tiny_path() -> str:
    from cai.models import tiny_checkpoint

    return str(tiny_checkpoint())


@pytest.fixture(scope="session")
def tiny_backend(tiny_path):
    from cai.backends.hf import HFBackend

    return HFBackend("tiny-random", batch_size=4)


@pytest.fixture(scope="session")
def real_backend():
    from cai.backends.hf import HFBackend

    return HFBackend("smollm2-135m", batch_size=8)
