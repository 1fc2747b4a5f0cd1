"""First-party dataset plugin: SVHN, the cropped-digits format (Netzer et al., 2011), through torchvision.

Sources (``data.source``):

* "auto": the folder ``$KDZOO_DATA_SVHN`` if set, else ``svhn/`` under the cache folder
  (``$KDZOO_CACHE``, default ``~/.cache/kdzoo``), where torchvision downloads what is missing;
* "download" (or "torchvision"): the same cache folder, downloading what is missing;
* a path: a folder holding ``train_32x32.mat`` and ``test_32x32.mat`` (and ``extra_32x32.mat`` with
  ``extra: true``), never downloaded into.

``torchvision.datasets.SVHN`` reads each ``.mat`` file only after checking its published md5, so
a corrupt or truncated file is an error. Reading ``.mat`` files needs scipy (a core dependency of
kdzoo). torchvision maps the files' label 10 (the digit 0) to 0, so label ``i`` is the
digit ``i``.

Option ``extra`` (default false): when true, the training split is ``train`` followed by the 531,131
easier ``extra`` images (604,388 in all), as most SVHN results do; the test split is unchanged.

Normalisation: mean (0.4377, 0.4438, 0.4728), std (0.1980, 0.2010, 0.1970), the per-channel mean and
standard deviation of the ``train`` split's pixels (``x / 255``), as used for SVHN by e.g.
DeepCore (``deepcore/datasets/svhn.py``). They stay the same with ``extra: true``, so that a network
sees the same inputs either way. Augmentation: 4-pixel padded crops and no flips (a mirrored digit
is another symbol).
"""
from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Any

from kdzoo import KDZooError, hookimpl
from kdzoo.data import cached_load
from kdzoo.datasets import Arrays, Dataset, verified
from kdzoo_plugins.cifar10 import download_root

MEAN = (0.4377, 0.4438, 0.4728)
STD = (0.1980, 0.2010, 0.1970)
CLASSES = tuple(str(d) for d in range(10))
ENV = "KDZOO_DATA_SVHN"
PAGE = "http://ufldl.stanford.edu/housenumbers/"
FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat", "extra": "extra_32x32.mat"}


class Svhn(Dataset):
    """SVHN cropped digits: 32x32 colour images of house-number digits, 10 classes."""

    name = "svhn"
    description = "SVHN: 32x32 house-number digits, 10 classes (73,257 train / 26,032 test; extra=true adds 531,131)"
    defaults = {"extra": False}
    reference = f"{PAGE} (Netzer et al., 2011); mean/std of the train split, as in DeepCore"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if not isinstance(self.options["extra"], bool):
            raise KDZooError(f"Dataset 'svhn' option extra must be true or false, got {self.options['extra']!r} "
                             f"(--data-option extra=true adds the 531,131 extra training images).")

    def sizes(self) -> str:
        return "73,257 train (604,388 with extra=true) / 26,032 test, 10 classes, 32x32"

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", "test", "extra") if self.options["extra"] else ("train", "test")

    def _folder(self, source: str, root: Path) -> tuple[Path, bool]:
        """The folder of the ``.mat`` files, and whether missing ones may be downloaded into it."""
        if source == "auto" and os.environ.get(ENV):
            return Path(os.environ[ENV]).expanduser(), False
        if source in ("auto", "download", "torchvision"):
            return download_root(root) / "svhn", True
        return Path(source).expanduser(), False

    def locate(self, source: str, root: Path) -> str | None:
        folder, _ = self._folder(source, root)
        return str(folder) if all((folder / FILES[s]).is_file() for s in self.splits) else None

    def load(self, source: str, root: Path) -> Arrays:
        folder, download = self._folder(source, root)
        stamp = tuple((f.stat().st_size, f.stat().st_mtime_ns) if f.is_file() else None
                      for f in (folder / FILES[s] for s in self.splits))
        key = ("svhn", str(folder.resolve()), self.options["extra"], stamp)
        return cached_load(key, lambda: self._load(folder, download))

    def _load(self, folder: Path, download: bool) -> Arrays:
        import numpy as np

        folder = folder.resolve()
        files = ", ".join(FILES[s] for s in self.splits)
        by_hand = (f"Download {files} from {PAGE} on a machine with internet access and put them into "
                   f"{str(folder)!r}" + ("" if download else f", or unset {ENV} and pass no --data to let torchvision "
                                                             f"download them into the cache folder") + ".")
        try:
            import scipy.io  # noqa: F401  (torchvision's SVHN reads .mat files with it)
            import torchvision.datasets as tvd
        except ImportError as e:
            raise KDZooError(f"SVHN needs scipy and torchvision to read its .mat files ({e}). Install them with "
                             f"`pip install \"kdzoo[svhn]\"` (or `pip install scipy`).") from e
        if not download:
            missing = [FILES[s] for s in self.splits if not (folder / FILES[s]).is_file()]
            if missing:
                state = "does not exist" if not folder.is_dir() else f"has no {', '.join(missing)}"
                raise KDZooError(f"SVHN folder {str(folder)!r} {state}. {by_hand}")
        loaded: dict[str, tuple[Any, Any]] = {}
        for split in self.splits:
            try:
                ds = tvd.SVHN(str(folder), split=split, download=download)
            except RuntimeError as e:  # torchvision: "Dataset not found or corrupted", or a bad download
                md5 = tvd.SVHN.split_list[split][2]
                raise KDZooError(
                    f"SVHN file {str(folder / FILES[split])!r} does not match its published md5 {md5} ({e}): it is "
                    f"corrupt or truncated. Delete it and {'run again to download it' if download else 'copy it again'}"
                    f". {by_hand}") from e
            except (OSError, EOFError, ValueError, tarfile.TarError) as e:  # URLError is an OSError
                raise KDZooError(f"Could not get SVHN's {FILES[split]} through torchvision into {str(folder)!r} "
                                 f"({type(e).__name__}: {e}). No internet? {by_hand}") from e
            # torchvision: data (N, 3, 32, 32) uint8 (from the file's 32x32x3xN), labels with 10 -> 0
            loaded[split] = (np.asarray(ds.data).transpose(0, 2, 3, 1), np.asarray(ds.labels, dtype=np.int64))
        x_train, y_train = loaded["train"]
        if self.options["extra"]:
            x_train = np.concatenate([x_train, loaded["extra"][0]])
            y_train = np.concatenate([y_train, loaded["extra"][1]])
        arrays = {"x_train": x_train, "y_train": y_train, "x_test": loaded["test"][0], "y_test": loaded["test"][1]}
        return verified(self.name, arrays, class_names=CLASSES, mean=MEAN, std=STD,
                        source=f"torchvision-svhn:{folder}" + (" (train+extra)" if self.options["extra"] else ""),
                        where=f"SVHN in {str(folder)!r}", fix=f"Delete the .mat files and get them again. {by_hand}",
                        flip=False, label="SVHN")


@hookimpl
def register_datasets(register):
    register(Svhn)
