"""Shared fixtures: one Prefect test server, a tiny LMDB training set. Helpers that
tests call are in tests/helpers.py."""

from __future__ import annotations

import os

import pytest

from alexnet.runtime import configure
from tests.helpers import tiny_training_data

configure()  # as every entry point does


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server for the whole session (building its database costs ~15 s).
    Worker processes inherit its URL through the environment."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        from prefect.settings import PREFECT_API_URL

        url = PREFECT_API_URL.value()
        previous = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url
        try:
            yield url
        finally:
            if previous is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = previous


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """lmdb/{train,val} and stats/ of two classes of 256x256 blobs (10 + 4 images)."""
    return tiny_training_data(tmp_path_factory.mktemp("train-data"))
