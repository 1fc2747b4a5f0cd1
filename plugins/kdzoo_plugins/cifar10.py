"""First-party dataset plugin: CIFAR-10, bit-exact.

Sources (``data.source``):

* "auto": the array file in ``$KDZOO_DATA`` if set, else torchvision;
* "download" (or "torchvision"): ``torchvision.datasets.CIFAR10(download=True)`` under
  ``$KDZOO_CACHE`` (default ``~/.cache/kdzoo``), whose ``.data``/``.targets`` are the same bytes;
* a path to an ``.npz`` array file (or a folder holding ``cifar10.npz``) with keys ``x_train``
  (50000, 32, 32, 3) uint8 HWC RGB, ``y_train`` (50000,) int64, ``x_test`` (10000, 32, 32, 3)
  uint8, ``y_test`` (10000,) int64 and optionally ``class_names``.

Either way the four arrays must match :data:`FINGERPRINTS` (sha256 of each array's raw bytes), so
corrupt or truncated data is an error, never silently wrong numbers. Normalisation: the
training set's per-channel mean and std, as RepDistiller and mdistiller use them.
"""
from __future__ import annotations

import os
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

from kdzoo import KDZooError, hookimpl
from kdzoo.data import cached_load
from kdzoo.datasets import Arrays, Dataset, verified

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# sha256 of each array's raw (C-order) bytes; from shared/data/README.md.
FINGERPRINTS = {
    "x_train": "47af8b02cfcfb6cdf3dbbd1969ad7f1b70f4413f6f80f437b020ee4e5bc8304a",
    "y_train": "f5cfe00b0f00968c0cc5ff3b1d2de51b10e33efa277c2986f4e0fa63e58c9f4f",
    "x_test": "f9b1e2130bab680db56eb06d886f7f1ad0f1183907ceff4659d1735c890f5b04",
    "y_test": "cbb7365de8ed11f05cc4c3a1e7f78144127c5e851efd83762fb18202461230bb",
}
SHAPES = {"x_train": (50000, 32, 32, 3), "y_train": (50000,), "x_test": (10000, 32, 32, 3), "y_test": (10000,)}
NPZ_FIX = ("Download or copy cifar10.npz again, or point KDZOO_DATA (or --data) at a good copy; "
           "with KDZOO_DATA unset, kdzoo gets CIFAR-10 through torchvision instead.")


def read_npz(path: Path, file_name: str, what: str, fix: str, keys: tuple[str, ...] = tuple(SHAPES)
             ) -> tuple[dict[str, Any], Any]:
    """The arrays ``keys`` (and ``class_names`` if present) of an ``.npz`` file, never unpickling anything.

    ``path`` may be a folder holding ``file_name``. Shared by the CIFAR array-file loaders."""
    import numpy as np

    if path.is_dir() and (path / file_name).is_file():
        path = path / file_name
    if not path.is_file():
        state = f"is a folder without {file_name} in it" if path.is_dir() else "does not exist"
        raise KDZooError(f"{what} array file {str(path)!r} {state}. {fix}")
    where = f"{what} array file {str(path)!r}"
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not an .npz archive")
        with f:
            missing = [k for k in keys if k not in f.files]
            if missing:
                raise KDZooError(
                    f"{where} has no array(s) {', '.join(repr(m) for m in missing)} (it holds: "
                    f"{', '.join(f.files) or 'nothing'}). It needs {', '.join(keys)}. {fix}")
            arrays = {k: f[k] for k in keys}
            names = f["class_names"] if "class_names" in f.files else None
    except KDZooError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error) as e:
        # numpy's pickle message suggests allow_pickle, which kdzoo never uses
        detail = "not an .npz archive" if "pickle" in str(e) else f"{type(e).__name__}: {e}"
        raise KDZooError(f"{where} cannot be read as an .npz archive ({detail}); it is truncated, "
                         f"corrupt or not an array file. {fix}") from e
    return arrays, names


def class_names_from(names: Any, default: tuple[str, ...], where: str, fix: str) -> tuple[str, ...]:
    if names is None:
        return default
    if names.dtype.kind not in "US" or names.shape != (len(default),):
        raise KDZooError(f"{where}: array 'class_names' has shape {names.shape} and dtype {names.dtype}; "
                         f"expected {len(default)} strings. {fix}")
    return tuple(str(n) for n in names.tolist())


def download_root(root: Path) -> Path:
    return Path(root).expanduser().resolve()


class Cifar10(Dataset):
    """CIFAR-10 (Krizhevsky, 2009): 60,000 32x32 colour images in 10 classes."""

    name = "cifar10"
    description = "CIFAR-10: 32x32 colour images, 10 classes"
    reference = "https://www.cs.toronto.edu/~kriz/cifar.html; mean/std as in RepDistiller"

    def sizes(self) -> str:
        return "50,000 train / 10,000 test, 10 classes, 32x32"

    def _source(self, source: str) -> str:
        if source == "auto":
            return os.environ.get("KDZOO_DATA") or "download"
        return "download" if source == "torchvision" else source

    def locate(self, source: str, root: Path) -> str | None:
        source = self._source(source)
        if source != "download":
            path = Path(source).expanduser()
            path = path / "cifar10.npz" if path.is_dir() else path
            return str(path) if path.is_file() else None
        folder = download_root(root) / "cifar-10-batches-py"
        return str(folder) if folder.is_dir() else None

    def load(self, source: str, root: Path) -> Arrays:
        source = self._source(source)
        if source == "download":
            return cached_load(("cifar10", "torchvision", str(download_root(root))), lambda: self._torchvision(root))
        path = Path(source).expanduser()
        path = path / "cifar10.npz" if path.is_dir() and (path / "cifar10.npz").is_file() else path
        key = ("cifar10", "npz", str(path.resolve()), *((path.stat().st_size, path.stat().st_mtime_ns)
                                                         if path.is_file() else ()))
        return cached_load(key, lambda: self._npz(path))

    def _npz(self, path: Path) -> Arrays:
        fix = ("Point KDZOO_DATA (or --data) at a copy of cifar10.npz, e.g. `export KDZOO_DATA=/path/to/cifar10.npz`, "
               "or unset KDZOO_DATA to let torchvision download CIFAR-10.") if not path.exists() else NPZ_FIX
        arrays, names = read_npz(path, "cifar10.npz", "CIFAR-10", fix)
        where = f"CIFAR-10 array file {str(path.resolve())!r}"
        return verified(self.name, arrays, class_names=class_names_from(names, CLASSES, where, NPZ_FIX), mean=MEAN,
                        std=STD, source=f"npz:{path.resolve()}", where=where, fix=NPZ_FIX, shapes=SHAPES,
                        fingerprints=FINGERPRINTS, label="CIFAR-10")

    def _torchvision(self, root: Path) -> Arrays:
        import numpy as np

        root_path = download_root(root)
        try:
            import torchvision.datasets as tvd
        except ImportError as e:
            raise KDZooError(
                f"torchvision is not importable ({e}), so CIFAR-10 cannot be downloaded. Install "
                f"torchvision, or set KDZOO_DATA=/path/to/cifar10.npz (or pass --data).") from e
        try:
            train = tvd.CIFAR10(str(root_path), train=True, download=True)
            test = tvd.CIFAR10(str(root_path), train=False, download=True)
        except (OSError, RuntimeError, EOFError, ValueError, tarfile.TarError) as e:  # URLError is an OSError
            raise KDZooError(
                f"Could not get CIFAR-10 through torchvision into {str(root_path)!r} "
                f"({type(e).__name__}: {e}). No internet? Download CIFAR-10 on a machine with internet "
                f"access (torchvision's cifar-10-python.tar.gz into that folder, or the cifar10.npz "
                f"array file), or set KDZOO_DATA=/path/to/cifar10.npz or pass --data "
                f"/path/to/cifar10.npz.") from e
        where = f"CIFAR-10 from torchvision in {str(root_path)!r}"
        fix = (f"Delete {str(root_path / 'cifar-10-batches-py')!r} (and the .tar.gz next to it) so that "
               f"torchvision downloads it again, or set KDZOO_DATA=/path/to/cifar10.npz (or pass --data).")
        try:
            arrays = {"x_train": np.asarray(train.data), "y_train": np.asarray(train.targets, dtype=np.int64),
                      "x_test": np.asarray(test.data), "y_test": np.asarray(test.targets, dtype=np.int64)}
        except (TypeError, ValueError) as e:
            raise KDZooError(f"{where} has labels that are not integers ({e}). {fix}") from e
        names = tuple(str(c) for c in getattr(train, "classes", CLASSES))
        return verified(self.name, arrays, class_names=names if len(names) == 10 else CLASSES, mean=MEAN, std=STD,
                        source=f"torchvision:{root_path}", where=where, fix=fix, shapes=SHAPES,
                        fingerprints=FINGERPRINTS, label="CIFAR-10")


@hookimpl
def register_datasets(register):
    register(Cifar10)


def load_cifar10(source: str = "auto", root: str | Path | None = None) -> Arrays:
    """CIFAR-10's verified splits (for scripts and tests; kdzoo itself goes through the registry)."""
    from kdzoo import cache_dir

    return Cifar10().load(str(source), Path(root).expanduser() if root else cache_dir())
