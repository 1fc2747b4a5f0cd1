"""Shared pytest fixtures for kdzoo's tests. Others may add fixtures here."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cifar_path() -> str:
    """Path of the real CIFAR-10 array file, from env KDZOO_DATA.

    Missing data skips the test, unless KDZOO_REQUIRE_DATA=1, when it fails it: a CI job that
    must exercise the real data cannot pass by skipping.
    """
    path = os.environ.get("KDZOO_DATA", "")
    if path and Path(path).expanduser().is_file():
        return str(Path(path).expanduser())
    why = (f"KDZOO_DATA={path!r} is not a file" if path else "KDZOO_DATA is not set") + \
        " (point it at cifar10.npz to run the tests that need real CIFAR-10)"
    if os.environ.get("KDZOO_REQUIRE_DATA") == "1":
        pytest.fail(f"KDZOO_REQUIRE_DATA=1 but {why}")
    pytest.skip(why)
