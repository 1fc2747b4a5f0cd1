"""kdzoo: a knowledge-distillation method zoo for PyTorch.

The core knows no method, backbone or dataset by name: they arrive through plugins
(see :mod:`kdzoo.hookspecs`). ``import kdzoo`` never imports a plugin.
"""
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    __version__ = version("kdzoo")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"


def cache_dir() -> Path:
    """kdzoo's cache folder: downloads and trained teachers (``$KDZOO_CACHE``, default ``~/.cache/kdzoo``)."""
    import os

    return Path(os.environ.get("KDZOO_CACHE") or Path.home() / ".cache" / "kdzoo")


class KDZooError(Exception):
    """An error the user can fix. The CLI prints its message as one paragraph, without a traceback."""


__all__ = ["KDZooError", "__version__", "cache_dir"]

from kdzoo.hookspecs import hookimpl  # noqa: E402  (plugins write `from kdzoo import hookimpl`)

__all__ += ["hookimpl"]
