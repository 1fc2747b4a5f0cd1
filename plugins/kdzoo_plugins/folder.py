"""First-party dataset plugin: a folder of your own images, in torchvision's ImageFolder layout.

Options (``data: {dataset: folder, options: {...}}``, or ``--data-option KEY=VALUE``):

* ``path`` (required): the folder. Either ``path/train/<class>/...`` and ``path/test/<class>/...``
  (``val/`` is accepted in place of ``test/``), the two splits as given, with the same classes; or
  ``path/<class>/...``, one tree that kdzoo splits (below). A class is a sub-folder; its images may
  sit in nested folders. Labels follow the sorted class names, as in ImageFolder.
* ``size`` (default 32): the side of the square images kdzoo trains on.
* ``test_fraction`` (default 0.2) and ``split_seed`` (default 0), for one tree: each class's images
  are ordered by the sha256 of ``split_seed`` and the file's content, and the first
  ``test_fraction`` of them (rounded half up, at least one, never all) are the test split. The
  split is stratified and depends only on the files' contents, not on their names or on the order
  in which the file system lists them.

Images are the files with an extension in :data:`EXTENSIONS` (any case); hidden files and
folders (a leading ".") and files beside the class folders are ignored. Each image is decoded with
Pillow, turned upright by its EXIF orientation, converted to RGB (``convert("RGB")``, as
torchvision's default loader), resized so that its shorter side is ``size`` (bilinear, with
Pillow's antialiasing) and center-cropped to ``size`` x ``size``: torchvision's ``Resize(size)``
then ``CenterCrop(size)``, pixel for pixel.

**Cache.** The images are decoded once, in parallel (a thread pool: Pillow decodes without the
GIL), into ``<cache folder>/folders/<key>.npz`` (uint8, the cache folder is ``$KDZOO_CACHE``,
default ``~/.cache/kdzoo``). ``key`` is the sha256 of every image file's bytes (read in full on
every load), its class and relative path, the options that shape the result and the Pillow
version: the same files give the same cache wherever they are, and any change to any file gives
a new one (modification times play no part). A cache file that cannot be read or does not match
its recorded fingerprints is rebuilt, with a warning.

**Normalisation** is the per-channel mean and (population) standard deviation of the training
images at ``size`` (``x / 255``), computed when the cache is built. **Augmentation**: random crops
with ``size // 8`` pixels of zero padding (4 at 32, as for CIFAR) and horizontal flips.

**Bad input** is a ``KDZooError`` before any training: a missing or empty folder, files but no
class folders, a class folder without images, fewer than two classes, ``train/`` without
``test/``, splits with different classes, a class with one image to split. Files with other
extensions, files that cannot be read and files that Pillow cannot decode are skipped with a
warning that names them and says how many; a class left with no images is then an error.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import sys
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdzoo import KDZooError, hookimpl
from kdzoo.data import cached_load
from kdzoo.datasets import Arrays, Dataset, verified

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's IMG_EXTENSIONS
CACHE_VERSION = 1  # bump when decoding changes: a new version never reads an old cache
WORKERS = min(8, os.cpu_count() or 1)
SHOWN = 5  # files named in a warning or an error; the rest are counted


class FolderWarning(UserWarning):
    """Files of an image folder that kdzoo skipped, or a cache it had to rebuild."""


@dataclass(frozen=True)
class ImageFile:
    """One image file: its split ("train", "test", or "" for a tree still to be split), class and path."""

    split: str
    label: int
    path: Path
    rel: str  # path relative to the dataset folder, "/"-separated
    digest: str = ""  # sha256 of the bytes


# ---------------------------------------------------------------------------------------------
# Listing


def _walk(folder: Path) -> Iterator[Path]:
    """Every non-hidden file under ``folder``, following links but never into the same folder twice."""
    seen: set[str] = set()
    stack = [folder]
    while stack:
        current = stack.pop()
        real = os.path.realpath(current)
        if real in seen:
            continue
        seen.add(real)
        with os.scandir(current) as entries:
            for e in entries:
                if e.name.startswith("."):
                    continue
                if e.is_dir():
                    stack.append(Path(e.path))
                elif e.is_file():
                    yield Path(e.path)


def _subfolders(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _names(items: Iterable[str]) -> str:
    """The first SHOWN items, and how many more there are."""
    items = list(items)
    return ", ".join(items[:SHOWN]) + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def _list(root: Path) -> tuple[str, tuple[str, ...], list[ImageFile], list[str]]:
    """The layout ("splits" or "tree"), the class names, the image files and the skipped non-image files."""
    fix_layout = (f"Put each class's images in a sub-folder named after the class ({root}/<class>/*.png), or use "
                  f"{root}/train/<class>/... and {root}/test/<class>/....")
    if not root.is_dir():
        state = "is a file, not a folder" if root.exists() else "does not exist"
        raise KDZooError(f"Image folder {str(root)!r} {state}. Give the folder of your images: "
                         f"--data-option path=DIR (data: {{dataset: folder, options: {{path: DIR}}}} in a file).")
    top = _subfolders(root)
    test_dir = "test" if "test" in top else "val" if "val" in top else None
    if "train" in top and test_dir is None:
        raise KDZooError(f"Image folder {str(root)!r} has a train/ folder but no test/ (or val/) folder. Add "
                         f"{root}/test/<class>/... with the test images, or point path at {root}/train to split it "
                         f"by test_fraction.")
    splits = [("train", root / "train"), ("test", root / test_dir)] if "train" in top else [("", root)]
    per_split: dict[str, list[str]] = {}
    for split, folder in splits:
        classes = _subfolders(folder)
        if not classes:
            with os.scandir(folder) as entries:
                loose = sum(1 for e in entries if e.is_file() and not e.name.startswith("."))
            what = f"{loose} file{'s' if loose != 1 else ''} but no class folders" if loose else "nothing"
            raise KDZooError(f"Image folder {str(folder)!r} holds {what}. {fix_layout}")
        per_split[split] = classes
    if len(per_split) == 2 and per_split["train"] != per_split["test"]:
        only_train = sorted(set(per_split["train"]) - set(per_split["test"]))
        only_test = sorted(set(per_split["test"]) - set(per_split["train"]))
        parts = ([f"only in train/: {_names(only_train)}"] if only_train else []) + \
            ([f"only in {test_dir}/: {_names(only_test)}"] if only_test else [])
        raise KDZooError(f"Image folder {str(root)!r}: train/ and {test_dir}/ must have the same class folders "
                         f"({'; '.join(parts)}). Add or remove class folders so that they match.")
    classes = next(iter(per_split.values()))
    images: list[ImageFile] = []
    others: list[str] = []
    empty: list[str] = []
    for split, folder in splits:
        for label, name in enumerate(classes):
            found, other = 0, 0
            for path in sorted(_walk(folder / name), key=lambda p: p.relative_to(root).as_posix()):
                rel = path.relative_to(root).as_posix()
                if path.suffix.lower() in EXTENSIONS:
                    images.append(ImageFile(split, label, path, rel))
                    found += 1
                else:
                    others.append(rel)
                    other += 1
            if not found:
                empty.append(f"{(folder / name).relative_to(root).as_posix()}/"
                             + (f" ({other} file{'s' if other != 1 else ''}, none an image)" if other else " (empty)"))
    if empty:
        raise KDZooError(
            f"Image folder {str(root)!r}: {len(empty)} class folder{'s have' if len(empty) > 1 else ' has'} no images "
            f"({_names(empty)}; images are files ending in {', '.join(EXTENSIONS)}). Add images, or remove the "
            f"folder{'s' if len(empty) > 1 else ''} if {'they are' if len(empty) > 1 else 'it is'} not a class.")
    if len(classes) < 2:
        raise KDZooError(f"Image folder {str(root)!r} has {len(classes)} class folder ({classes[0]}); a classifier "
                         f"needs at least two. {fix_layout}")
    return ("splits" if len(splits) == 2 else "tree"), tuple(classes), images, others


# ---------------------------------------------------------------------------------------------
# Hashing and decoding


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _hash_all(images: list[ImageFile], pool: ThreadPoolExecutor) -> tuple[list[ImageFile], list[str]]:
    """The images with their digests, and the files that could not be read ("rel (reason)")."""

    def one(im: ImageFile) -> ImageFile | str:
        try:
            return ImageFile(im.split, im.label, im.path, im.rel, _sha256_file(im.path))
        except OSError as e:
            return f"{im.rel} ({e.strerror or type(e).__name__})"

    done = list(pool.map(one, images))
    return [d for d in done if isinstance(d, ImageFile)], [d for d in done if isinstance(d, str)]


def _fit(img: Any, size: int) -> Any:
    """torchvision's ``Resize(size)`` then ``CenterCrop(size)`` on a PIL image."""
    from PIL import Image as PILImage

    w, h = img.size
    if (w, h) != (size, size):
        if w <= h:
            new_w, new_h = size, int(size * h / w)
        else:
            new_w, new_h = int(size * w / h), size
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), PILImage.Resampling.BILINEAR)
        left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    return img


def decode(data: bytes, size: int) -> Any:
    """One image file's bytes as a (size, size, 3) uint8 array (see the module docstring); raises what Pillow
    raises for a file it cannot decode."""
    import numpy as np
    from PIL import Image as PILImage
    from PIL import ImageOps

    with PILImage.open(io.BytesIO(data)) as img:
        img.load()
        try:
            upright = ImageOps.exif_transpose(img)
        except Exception:  # a damaged EXIF block: the pixels are still good, keep them as stored
            upright = img
        return np.asarray(_fit(upright.convert("RGB"), size), dtype=np.uint8)


def _decode_all(images: list[ImageFile], size: int, pool: ThreadPoolExecutor) -> tuple[Any, list[bool], list[str]]:
    """(N, size, size, 3) uint8 for ``images`` (rows of failures are zero), which decoded, and the failures."""
    import numpy as np

    out = np.zeros((len(images), size, size, 3), np.uint8)

    def one(i: int) -> str | None:
        im = images[i]
        try:
            data = im.path.read_bytes()
        except OSError as e:
            return f"{im.rel} ({e.strerror or type(e).__name__})"
        if hashlib.sha256(data).hexdigest() != im.digest:
            raise KDZooError(f"Image file {str(im.path)!r} changed while kdzoo was reading the folder. Run again "
                             f"once nothing writes to it.")
        try:
            out[i] = decode(data, size)
        except Exception as e:  # Pillow raises many types for bad files (OSError, SyntaxError, ValueError, ...)
            return f"{im.rel} ({type(e).__name__}: {e})"
        return None

    failures = list(pool.map(one, range(len(images))))
    return out, [f is None for f in failures], [f for f in failures if f is not None]


def _mean_std(x: Any) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and population std of ``x / 255`` (float64 sums, in chunks); a std below 1/255 (a
    channel that never varies) is raised to 1/255 so that normalising never divides by zero."""
    import numpy as np

    total, squares, n = np.zeros(3), np.zeros(3), 0
    for start in range(0, len(x), 4096):
        chunk = x[start:start + 4096].reshape(-1, 3).astype(np.float64)
        total += chunk.sum(0)
        squares += (chunk * chunk).sum(0)
        n += len(chunk)
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean * mean, 0.0))
    m = tuple(float(v) / 255 for v in mean)
    s = tuple(max(float(v) / 255, 1 / 255) for v in std)
    return (m[0], m[1], m[2]), (s[0], s[1], s[2])


def _rank(seed: int, im: ImageFile) -> tuple[str, str]:
    return hashlib.sha256(f"kdzoo-folder-split:{seed}:{im.digest}".encode()).hexdigest(), im.rel


# ---------------------------------------------------------------------------------------------
# The dataset


class ImageFolder(Dataset):
    """Your own images, one sub-folder per class (see the module docstring)."""

    name = "folder"
    description = "your own images: one sub-folder per class (ImageFolder layout), decoded once into a cache"
    defaults = {"path": None, "size": 32, "test_fraction": 0.2, "split_seed": 0}
    reference = "torchvision ImageFolder layout; Resize(size) + CenterCrop(size); mean/std of the training images"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        if o["path"] is None or str(o["path"]).strip() == "":
            raise KDZooError("Dataset 'folder' needs the option path, the folder of your images: --data-option "
                             "path=DIR on the command line, or data: {dataset: folder, options: {path: DIR}} in a file.")
        o["path"] = str(o["path"])
        size, fraction, seed = o["size"], o["test_fraction"], o["split_seed"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 8:
            raise KDZooError(f"Dataset 'folder' option size must be a whole number of pixels, at least 8, got {size!r} "
                             f"(e.g. --data-option size=32).")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise KDZooError(f"Dataset 'folder' option test_fraction must be a number between 0 and 1 (exclusive), "
                             f"got {fraction!r} (e.g. --data-option test_fraction=0.2).")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise KDZooError(f"Dataset 'folder' option split_seed must be a whole number, got {seed!r}.")
        o["test_fraction"] = float(fraction)

    @property
    def path(self) -> Path:
        return Path(self.options["path"]).expanduser()

    def sizes(self) -> str:
        return f"your images at {self.options['size']}x{self.options['size']}"

    def locate(self, source: str, root: Path) -> str | None:
        return str(self.path.resolve()) if self.path.is_dir() else None

    def load(self, source: str, root: Path) -> Arrays:
        if source != "auto":
            raise KDZooError(f"Dataset 'folder' reads the folder given by its path option, not a data source "
                             f"({source!r}): drop --data (data.source) and pass --data-option path=DIR.")
        folder = self.path.resolve()
        try:
            layout, classes, listed, others = _list(folder)
        except OSError as e:  # a folder kdzoo may not list
            raise KDZooError(f"Image folder {str(folder)!r} cannot be listed ({e}). Check its permissions.") from e
        if others:
            what = f"{len(others)} files that are not images" if len(others) > 1 else "1 file that is not an image"
            warnings.warn(f"Image folder {str(folder)!r}: skipped {what} (by its extension): {_names(others)}.",
                          FolderWarning, stacklevel=2)
        with ThreadPoolExecutor(WORKERS) as pool:
            images, unreadable = _hash_all(listed, pool)
            key = self._key(layout, classes, images)
            return cached_load(("folder", key), lambda: self._cached(folder, root, key, layout, classes, images,
                                                                     unreadable, pool))

    # -- the cache ------------------------------------------------------------------------------

    def _key(self, layout: str, classes: tuple[str, ...], images: list[ImageFile]) -> str:
        from PIL import __version__ as pillow

        o = self.options
        h = hashlib.sha256(f"kdzoo-folder-cache:v{CACHE_VERSION}:pillow={pillow}:size={o['size']}:"
                           f"layout={layout}\n".encode())
        if layout == "tree":
            h.update(f"test_fraction={o['test_fraction']!r}:split_seed={o['split_seed']}\n".encode())
        for name in classes:
            h.update(f"class\0{name}\n".encode())
        for im in images:
            h.update(f"{im.split}\0{im.label}\0{im.rel}\0{im.digest}\n".encode())
        return h.hexdigest()

    def _cached(self, folder: Path, root: Path, key: str, layout: str, classes: tuple[str, ...], images: list[ImageFile],
                unreadable: list[str], pool: ThreadPoolExecutor) -> Arrays:
        cache = Path(root).expanduser() / "folders" / f"{key}.npz"
        where = f"Image folder {str(folder)!r}"
        if cache.is_file():
            try:
                arrays, skipped = self._read_cache(cache, classes, len(images))
            except (KDZooError, OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                warnings.warn(f"The decoded-image cache {str(cache)!r} of {where} is unreadable or damaged ({e}); "
                              f"rebuilding it.", FolderWarning, stacklevel=4)
            else:
                self._warn_skipped(where, unreadable + skipped)
                return arrays
        arrays, skipped = self._build(folder, where, layout, classes, images, pool)
        self._warn_skipped(where, unreadable + skipped)
        self._write_cache(cache, arrays, skipped)
        return arrays

    def _build(self, folder: Path, where: str, layout: str, classes: tuple[str, ...], images: list[ImageFile],
               pool: ThreadPoolExecutor) -> tuple[Arrays, list[str]]:
        import numpy as np

        size = self.options["size"]
        print(f"kdzoo: decoding {len(images):,} images of {str(folder)!r} at {size}x{size} (once; cached)",
              file=sys.stderr, flush=True)
        x, ok, failed = _decode_all(images, size, pool)
        kept = [im for im, good in zip(images, ok) if good]
        rows = {im.rel: i for i, im in enumerate(images)}
        left = {c for c in range(len(classes)) for s in (("train", "test") if layout == "splits" else ("",))
                if not any(im.label == c and im.split == s for im in kept)}
        if left:
            names = [classes[c] for c in sorted(left)]
            raise KDZooError(
                f"{where}: no image of class{'es' if len(names) > 1 else ''} {_names(names)} could be decoded"
                f"{' in one of the splits' if layout == 'splits' else ''} ({len(failed)} file"
                f"{'s' if len(failed) != 1 else ''} failed: {_names(failed)}). Replace the damaged files.")
        if layout == "splits":
            parts = {s: [im for im in kept if im.split == s] for s in ("train", "test")}
        else:
            parts = {"train": [], "test": []}
            fraction, seed = self.options["test_fraction"], self.options["split_seed"]
            for c, name in enumerate(classes):
                members = [im for im in kept if im.label == c]
                if len(members) < 2:
                    raise KDZooError(
                        f"{where}: class {name!r} has {len(members)} usable image; splitting it into train and test "
                        f"needs at least two. Add images, or give the splits yourself ({folder}/train/<class>/... and "
                        f"{folder}/test/<class>/...).")
                n_test = min(len(members) - 1, max(1, math.floor(fraction * len(members) + 0.5)))
                ranked = sorted(members, key=lambda im: _rank(seed, im))
                test = {im.rel for im in ranked[:n_test]}
                parts["test"] += [im for im in members if im.rel in test]
                parts["train"] += [im for im in members if im.rel not in test]
        arrays: dict[str, Any] = {}
        for split, members in parts.items():  # class by class, each in path order
            members = sorted(members, key=lambda im: (im.label, im.rel))
            arrays[f"x_{split}"] = x[[rows[im.rel] for im in members]]
            arrays[f"y_{split}"] = np.array([im.label for im in members], dtype=np.int64)
        mean, std = _mean_std(arrays["x_train"])
        out = verified(self.name, arrays, class_names=classes, mean=mean, std=std, source=f"folder:{folder}",
                       where=where, fix="Check the folder's images.", pad=size // 8, flip=True,
                       label="the decoded images")
        return out, failed

    def _warn_skipped(self, where: str, skipped: list[str]) -> None:
        if skipped:
            warnings.warn(f"{where}: skipped {len(skipped)} image file{'s' if len(skipped) != 1 else ''} that could not "
                          f"be read or decoded: {_names(skipped)}.", FolderWarning, stacklevel=5)

    def _read_cache(self, cache: Path, classes: tuple[str, ...], n_listed: int) -> tuple[Arrays, list[str]]:
        import numpy as np

        names = ("x_train", "y_train", "x_test", "y_test")
        with np.load(cache, allow_pickle=False) as f:
            arrays = {k: f[k] for k in names}
            stored = tuple(str(c) for c in f["class_names"].tolist())
            mean, std = (tuple(float(v) for v in f[k].tolist()) for k in ("mean", "std"))
            fingerprints = dict(zip(names, (str(v) for v in f["fingerprints"].tolist())))
            skipped = [str(s) for s in f["skipped"].tolist()]
            size, version = int(f["size"]), int(f["version"])
        if stored != classes or version != CACHE_VERSION or size != self.options["size"] or len(mean) != 3 \
                or len(std) != 3 or len(arrays["y_train"]) + len(arrays["y_test"]) + len(skipped) != n_listed:
            raise ValueError("it does not describe these files")
        where = f"cache file {str(cache)!r}"
        out = verified(self.name, arrays, class_names=classes, mean=mean, std=std,  # type: ignore[arg-type]
                       source=f"folder:{self.path.resolve()}", where=where, fix="", fingerprints=fingerprints,
                       pad=size // 8, flip=True, label="the decoded images")
        return out, skipped

    def _write_cache(self, cache: Path, arrays: Arrays, skipped: list[str]) -> None:
        import numpy as np

        from kdzoo.checkpoint import atomic_write

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, x_train=arrays.x_train, y_train=arrays.y_train, x_test=arrays.x_test, y_test=arrays.y_test,
                         class_names=np.array(arrays.class_names, dtype=str), mean=np.array(arrays.mean),
                         std=np.array(arrays.std), skipped=np.array(skipped, dtype=str),
                         fingerprints=np.array([arrays.fingerprints[k] for k in ("x_train", "y_train", "x_test", "y_test")]),
                         size=np.array(self.options["size"]), version=np.array(CACHE_VERSION))

        try:
            atomic_write(cache, write)
        except OSError as e:
            warnings.warn(f"Could not write the decoded-image cache {str(cache)!r} ({e}); the images will be decoded "
                          f"again next time. Set KDZOO_CACHE (or --data-root) to a writable folder.", FolderWarning,
                          stacklevel=5)


@hookimpl
def register_datasets(register):
    register(ImageFolder)

