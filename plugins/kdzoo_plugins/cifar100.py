"""First-party dataset plugin: CIFAR-100 (the 100 fine labels), verified before it is read.

Sources (``data.source``):

* "auto": ``$KDZOO_DATA_CIFAR100`` if set (any path below), else the official ``cifar-100-python``
  folder under the cache folder (``$KDZOO_CACHE``, default ``~/.cache/kdzoo``) if it is there, else
  "download";
* "download" (or "torchvision"): torchvision's CIFAR-100 archive (the URL and md5 of
  ``torchvision.datasets.CIFAR100``), which torchvision downloads, checks against its md5 and
  extracts into the cache folder; an archive already there (placed by hand, offline) is used as is.
  kdzoo then reads the extracted folder as below (not with torchvision's unrestricted unpickling);
* a path: the official ``cifar-100-python`` folder (or a folder holding it), or an ``.npz`` array
  file (or a folder holding ``cifar100.npz``) in the layout of ``cifar10.npz``: ``x_train``
  (50000, 32, 32, 3) uint8 HWC RGB, ``y_train`` (50000,) int64 fine labels, ``x_test`` (10000, 32,
  32, 3), ``y_test`` (10000,) and optionally ``class_names`` (100 strings).

The official files (``train``, ``test``, ``meta``) are Python pickles of dicts: ``b"data"`` an
(N, 3072) uint8 array, each row one image's red, green then blue 32x32 plane (row-major CHW),
``b"fine_labels"`` a list of N ints, and in ``meta`` ``b"fine_label_names"``. Each file's md5 must
match the published one (:data:`MD5`) before a byte of it is unpickled, and it is unpickled by
:func:`unpickle`, which builds only dicts, lists, strings, bytes, numbers and plain numpy arrays
and refuses every other global. An array file has no published checksum: its shapes, dtypes,
label range and class balance (500 training and 100 test images per class) are checked, and its
sha256 fingerprints are recorded (and checked against :data:`FINGERPRINTS` once those are known).

Normalisation: mean (0.5071, 0.4867, 0.4408), std (0.2675, 0.2565, 0.2761), as RepDistiller and
mdistiller use them (their CIFAR-100 protocol; METHODS.md). Augmentation: 4-pixel padded crops
and horizontal flips, as in both.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path
from typing import Any

from kdzoo import KDZooError, hookimpl
from kdzoo.data import cached_load
from kdzoo.datasets import Arrays, Dataset, verified
from kdzoo_plugins.cifar10 import class_names_from, download_root, read_npz

MEAN = (0.5071, 0.4867, 0.4408)
STD = (0.2675, 0.2565, 0.2761)
FOLDER = "cifar-100-python"
ARRAY_FILE = "cifar100.npz"
ENV = "KDZOO_DATA_CIFAR100"
# The published md5 of each file of the official cifar-100-python folder (torchvision's CIFAR100 lists
# the same). Tests replace them to read small synthetic files in the same format.
MD5 = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}
SHAPES = {"x_train": (50000, 32, 32, 3), "y_train": (50000,), "x_test": (10000, 32, 32, 3), "y_test": (10000,)}
# sha256 of each array's raw bytes, as for CIFAR-10. Not known yet: no copy of CIFAR-100 was available
# where this plugin was written, so array files are checked by shape, dtype, label range and class
# balance only. Fill these in from a verified load (`Arrays.fingerprints` of the official folder).
FINGERPRINTS: dict[str, str] | None = None
CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)
URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
GET = (f"Get CIFAR-100 on a machine with internet access ({URL}) and either put cifar-100-python.tar.gz into "
       f"the cache folder (kdzoo checks and extracts it), extract it there, or point {ENV} (or --data) at the "
       f"extracted cifar-100-python folder or at a cifar100.npz array file.")


def md5sum(path: Path) -> str:
    """The md5 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def unpickle(path: Path) -> Any:
    """Read a CIFAR pickle (written by Python 2's cPickle) with an unpickler that builds only dicts, lists,
    tuples, strings, bytes, numbers and numpy arrays: any other global (a class, a function) raises
    ``pickle.UnpicklingError`` instead of being imported or called. Strings of Python 2 come back as
    ``bytes`` (``encoding="bytes"``, as the dataset's own page reads them)."""
    import pickle

    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    # What pickle.dump of a numpy array needs: _reconstruct(ndarray, shape, dtype) then ndarray/dtype
    # __setstate__. Python 2 and numpy < 2 name the module numpy.core.multiarray, numpy 2 numpy._core.
    allowed = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
               ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
               ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}

    class Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            try:
                return allowed[(module, name)]
            except KeyError:
                raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}") from None

    with open(path, "rb") as f:
        return Restricted(f, encoding="bytes").load()


def _text(value: Any) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


class Cifar100(Dataset):
    """CIFAR-100 (Krizhevsky, 2009): 60,000 32x32 colour images in 100 classes (the fine labels)."""

    name = "cifar100"
    description = "CIFAR-100: 32x32 colour images, 100 classes"
    reference = ("https://www.cs.toronto.edu/~kriz/cifar.html; mean/std as in RepDistiller and mdistiller "
                 "(their CIFAR-100 protocol)")

    def sizes(self) -> str:
        return "50,000 train / 10,000 test, 100 classes, 32x32"

    # -- where the data is ----------------------------------------------------------------------

    def _resolve(self, source: str, root: Path, strict: bool) -> tuple[str, Path | None]:
        """("python", folder), ("npz", file) or ("download", None). With ``strict``, a path that is neither is a
        ``KDZooError``; without, ("missing", path)."""
        env = False
        if source == "auto":
            if os.environ.get(ENV):
                source, env = os.environ[ENV], True
            else:
                folder = download_root(root) / FOLDER
                return ("python", folder) if folder.is_dir() else ("download", None)
        if source in ("download", "torchvision"):
            return "download", None
        path = Path(source).expanduser()
        if path.is_file():
            return "npz", path
        if path.is_dir():
            if (path / FOLDER).is_dir():
                return "python", path / FOLDER
            if any((path / name).is_file() for name in MD5):
                return "python", path
            if (path / ARRAY_FILE).is_file():
                return "npz", path / ARRAY_FILE
        if not strict:
            return "missing", path
        named = f"{ENV}={source!r}" if env else f"The CIFAR-100 source {source!r}"
        state = ("is a folder with neither a cifar-100-python folder, the files train, test and meta, nor "
                 f"{ARRAY_FILE} in it") if path.is_dir() else "does not exist"
        raise KDZooError(f"{named} {state}. {GET}")

    def locate(self, source: str, root: Path) -> str | None:
        kind, path = self._resolve(source, root, strict=False)
        if kind == "download":
            folder = download_root(root) / FOLDER
            return str(folder) if folder.is_dir() else None
        return str(path) if kind != "missing" else None

    def load(self, source: str, root: Path) -> Arrays:
        kind, path = self._resolve(source, root, strict=True)
        if kind == "download":
            path = self._download(root)
        assert path is not None
        files = [path] if kind == "npz" else [path / name for name in MD5]
        stamp = tuple((f.stat().st_size, f.stat().st_mtime_ns) if f.is_file() else None for f in files)
        key = ("cifar100", kind, str(path.resolve()), stamp)
        return cached_load(key, lambda: self._npz(path) if kind == "npz" else self._python(path))

    # -- readers --------------------------------------------------------------------------------

    def _python(self, folder: Path) -> Arrays:
        """The official folder: every file's md5 first, then the restricted unpickler."""
        import pickle

        import numpy as np

        folder = folder.resolve()
        where = f"CIFAR-100 folder {str(folder)!r}"
        fix = (f"Delete {str(folder)!r} so that kdzoo downloads it again (or extract cifar-100-python.tar.gz "
               f"again), or point {ENV} (or --data) at a good copy.")
        missing = [name for name in MD5 if not (folder / name).is_file()]
        if missing:
            raise KDZooError(f"{where} has no file {', '.join(repr(m) for m in missing)} (it needs train, test "
                             f"and meta, as extracted from cifar-100-python.tar.gz). {fix}")
        wrong = [(name, got) for name in MD5 if (got := md5sum(folder / name)) != MD5[name]]
        if wrong:
            listed = "; ".join(f"{name} has md5 {got}, expected {MD5[name]}" for name, got in wrong)
            raise KDZooError(f"{where} does not hold the published CIFAR-100 files ({listed}): they are corrupt, "
                             f"truncated or not CIFAR-100, and kdzoo does not unpickle files it cannot verify. {fix}")

        def read(name: str) -> dict[str, Any]:
            try:
                obj = unpickle(folder / name)
            except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
                raise KDZooError(f"{where}: file {name!r} matches its md5 but cannot be read as a CIFAR pickle "
                                 f"({type(e).__name__}: {e}). {fix}") from e
            if not isinstance(obj, dict):
                raise KDZooError(f"{where}: file {name!r} holds a {type(obj).__name__}, not a dict. {fix}")
            return {_text(k): v for k, v in obj.items()}

        arrays: dict[str, Any] = {}
        for split in ("train", "test"):
            entry = read(split)
            data, labels = entry.get("data"), entry.get("fine_labels")
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                got = f"shape {data.shape}, dtype {data.dtype}" if isinstance(data, np.ndarray) else type(data).__name__
                raise KDZooError(f"{where}: file {split!r} has no 'data' array of (N, 3072) uint8 ({got}). {fix}")
            if not isinstance(labels, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
                raise KDZooError(f"{where}: file {split!r} has no 'fine_labels' list of integers. {fix}")
            # each row: 1024 red, 1024 green, 1024 blue values, each plane row-major -> (N, 32, 32, 3)
            arrays[f"x_{split}"] = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            arrays[f"y_{split}"] = np.asarray(labels, dtype=np.int64)
        names = read("meta").get("fine_label_names")
        if not isinstance(names, list) or len(names) != 100:
            raise KDZooError(f"{where}: file 'meta' has no list of 100 'fine_label_names'. {fix}")
        return verified(self.name, arrays, class_names=tuple(_text(n) for n in names), mean=MEAN, std=STD,
                        source=f"cifar-100-python:{folder}", where=where, fix=fix, fingerprints=FINGERPRINTS,
                        label="CIFAR-100")

    def _npz(self, path: Path) -> Arrays:
        import numpy as np

        fix = f"Write the array file again, or point {ENV} (or --data) at a good copy or at the cifar-100-python folder."
        arrays, names = read_npz(path, ARRAY_FILE, "CIFAR-100", fix)
        where = f"CIFAR-100 array file {str(path.resolve())!r}"
        out = verified(self.name, arrays, class_names=class_names_from(names, CLASSES, where, fix), mean=MEAN, std=STD,
                       source=f"npz:{path.resolve()}", where=where, fix=fix, shapes=SHAPES, fingerprints=FINGERPRINTS,
                       label="CIFAR-100")
        # No published checksum for an array file (see FINGERPRINTS): CIFAR-100's class balance is a cheap
        # check that catches a relabelled, truncated or mixed-up copy.
        for split in ("train", "test"):
            y = out.y_train if split == "train" else out.y_test
            counts = np.bincount(y, minlength=100)
            want = len(y) // 100
            if (counts != want).any():
                c = int(np.flatnonzero(counts != want)[0])
                raise KDZooError(f"{where}: class {c} ({out.class_names[c]}) has {counts[c]} {split} images; "
                                 f"CIFAR-100 has {want} of each class. It is not CIFAR-100 as published. {fix}")
        return out

    def _download(self, root: Path) -> Path:
        """The extracted official folder under ``root``, downloaded through torchvision when it is not there."""
        root_path = download_root(root)
        folder = root_path / FOLDER
        if folder.is_dir():
            return folder  # verified file by file when read
        try:
            from torchvision.datasets import CIFAR100
            from torchvision.datasets.utils import download_and_extract_archive
        except ImportError as e:
            raise KDZooError(f"torchvision is not importable ({e}), so CIFAR-100 cannot be downloaded. Install "
                             f"torchvision, or point {ENV} (or --data) at a copy.") from e
        try:
            download_and_extract_archive(CIFAR100.url, str(root_path), filename=CIFAR100.filename, md5=CIFAR100.tgz_md5)
        except (OSError, RuntimeError, EOFError, ValueError, tarfile.TarError) as e:  # URLError is an OSError
            raise KDZooError(
                f"Could not download CIFAR-100 through torchvision into {str(root_path)!r} ({type(e).__name__}: {e}). "
                f"No internet? {GET} The archive's md5 is {CIFAR100.tgz_md5}.") from e
        if not folder.is_dir():
            raise KDZooError(f"The CIFAR-100 archive in {str(root_path)!r} did not extract to {FOLDER}/. Delete "
                             f"{CIFAR100.filename} there and try again. {GET}")
        return folder


@hookimpl
def register_datasets(register):
    register(Cifar100)
