"""Shared pytest fixtures for kdzoo's tests. Others may add fixtures here."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch


SLOW_FIXTURES = {"cifar_path", "install_package"}  # real CIFAR-10 training, or a pip install in a subprocess


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that trains on real data or installs a package as ``slow`` (tests that train on
    synthetic data or run whole commands carry the mark themselves): ``pytest -m "not slow"`` is the
    contributors' fast lane, CI runs everything."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


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


class InstalledPackage:
    """A local package folder installed with pip into its own ``--target`` folder: real package
    metadata (dist-info, entry points) without touching the test environment. Put ``site`` on
    ``PYTHONPATH`` (``env()``) or ``sys.path`` to use it."""

    def __init__(self, source: Path, site: Path) -> None:
        self.source, self.site = source, site

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a subprocess that sees the package (and no KDZOO_* plugin filters)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("KDZOO_") or k == "KDZOO_DATA"}
        env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(self.site), os.environ.get("PYTHONPATH")])),
                   COLUMNS="200", **extra)
        return env

    def kdzoo(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run the ``kdzoo`` command in a subprocess that sees the package."""
        script = Path(sys.executable).with_name("kdzoo")
        cmd = [str(script)] if script.exists() else [sys.executable, "-m", "kdzoo.cli"]
        return subprocess.run(cmd + list(args), capture_output=True, text=True, env=env or self.env(), timeout=120)

    def clone(self, site: Path) -> "InstalledPackage":
        """A copy of the installation in ``site`` (to uninstall without touching this one)."""
        shutil.copytree(self.site, site)
        return InstalledPackage(self.source, site)

    def uninstall(self) -> list[Path]:
        """Remove every file the installation's RECORD lists, as ``pip uninstall`` does (pip itself
        refuses to uninstall outside the environment); returns the removed files."""
        (record,) = self.site.glob("*.dist-info/RECORD")
        removed = []
        for line in record.read_text().splitlines():
            path = self.site / line.split(",")[0]
            if path.is_file():
                path.unlink()
                removed.append(path)
        for folder in sorted({p.parent for p in removed} - {self.site}, key=lambda p: len(p.parts), reverse=True):
            shutil.rmtree(folder / "__pycache__", ignore_errors=True)  # bytecode written by later imports
            if folder.exists() and not any(folder.iterdir()):
                folder.rmdir()
        return removed


@pytest.fixture(scope="session")
def install_package(tmp_path_factory):
    """``install_package(folder) -> InstalledPackage``: copy ``folder`` (so builds leave nothing in the
    repository) and ``pip install --no-deps --no-build-isolation --no-index --target`` it. Offline:
    it needs only the setuptools in this environment."""

    def install(folder: Path) -> InstalledPackage:
        root = tmp_path_factory.mktemp(Path(folder).name)
        source = root / "src"
        shutil.copytree(folder, source, ignore=shutil.ignore_patterns(
            "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
        site = root / "site"
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
             "--disable-pip-version-check", "--target", str(site), str(source)],
            capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, f"pip install {folder} failed:\n{proc.stdout}\n{proc.stderr}"
        return InstalledPackage(source, site)

    return install


@pytest.fixture
def one_thread():
    """Tiny batches train fastest on one thread, and a busy shared CPU makes two spinning threads far slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
