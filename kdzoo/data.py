"""CIFAR-10 as uint8 tensors on the training device, with batched augmentation and seeded batch order.

Sources (``load_cifar10``):

* an ``.npz`` array file with keys ``x_train`` (50000, 32, 32, 3) uint8 HWC RGB, ``y_train``
  (50000,) int64, ``x_test`` (10000, 32, 32, 3) uint8, ``y_test`` (10000,) int64 and optionally
  ``class_names``;
* torchvision's ``CIFAR10(download=True)``, whose ``.data`` / ``.targets`` are the same bytes.

Either way the four arrays must match :data:`FINGERPRINTS` (sha256 of each array's raw bytes),
so corrupt or truncated data is an error, never silently wrong numbers. Verified loads are
cached in-process.

Batches (``CifarData.train_batches``) never leave tensor land: no DataLoader, no PIL. The order
and the augmentation of an epoch are a pure function of ``(seed, epoch)``:

* a CPU ``torch.Generator`` is seeded with ``(seed * 1_000_003 + epoch) mod 2**64`` and draws,
  in this order: ``perm = randperm(N)``, ``offsets = randint(0, 9, (2, N))`` (row offset ``dy``
  then column offset ``dx`` into the 4-pixel zero-padded image, for the k-th image of the
  epoch) and ``flips = randint(0, 2, (N,))`` (likewise per position);
* ``flip="alternating"`` (airbench) replaces the flips by a per-image draw
  ``randint(0, 2, (N,))`` from a generator seeded with ``(seed * 1_000_003 - 1) mod 2**64``
  (a function of the seed only), used as is on even epochs and complemented on odd epochs.

Two runs, or two ``CifarData`` objects holding the same data, with the same seed therefore
see identical batches, whatever the device.
"""
from __future__ import annotations

import hashlib
import math
import os
import tarfile
import warnings
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kdzoo import KDZooError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")

# sha256 of each array's raw (C-order) bytes; from shared/data/README.md.
FINGERPRINTS = {
    "x_train": "47af8b02cfcfb6cdf3dbbd1969ad7f1b70f4413f6f80f437b020ee4e5bc8304a",
    "y_train": "f5cfe00b0f00968c0cc5ff3b1d2de51b10e33efa277c2986f4e0fa63e58c9f4f",
    "x_test": "f9b1e2130bab680db56eb06d886f7f1ad0f1183907ceff4659d1735c890f5b04",
    "y_test": "cbb7365de8ed11f05cc4c3a1e7f78144127c5e851efd83762fb18202461230bb",
}
EXPECTED_SHAPES = {
    "x_train": (50000, 32, 32, 3),
    "y_train": (50000,),
    "x_test": (10000, 32, 32, 3),
    "y_test": (10000,),
}
PAD = 4  # random-crop padding, as in every CIFAR anchor

_SEED_STRIDE = 1_000_003
_NPZ_FIX = ("Download or copy cifar10.npz again, or point KDZOO_DATA (or --data) at a good copy; "
            "with KDZOO_DATA unset, kdzoo gets CIFAR-10 through torchvision instead.")


def _mix_seed(seed: int, epoch: int) -> int:
    return (int(seed) * _SEED_STRIDE + int(epoch)) % (1 << 64)


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).reshape(-1).view(np.uint8)).hexdigest()


@dataclass(eq=False)
class RawCifar10:
    """The verified CIFAR-10 arrays (read-only numpy): images uint8 NHWC, labels int64.

    ``source`` says where they came from; ``fingerprints`` are the verified sha256 values.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    source: str
    fingerprints: dict[str, str]
    _nchw: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def images_nchw(self, split: str) -> Tensor:
        """``split`` ("train"/"test") images as a contiguous uint8 (N, 3, 32, 32) CPU tensor (cached; do not mutate)."""
        if split not in self._nchw:
            x = self.x_train if split == "train" else self.x_test
            with warnings.catch_warnings():  # read-only array; permute().contiguous() copies at once
                warnings.simplefilter("ignore", UserWarning)
                self._nchw[split] = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        return self._nchw[split]


# ---------------------------------------------------------------------------------------------
# Loading and verification

_CACHE: OrderedDict[tuple, RawCifar10] = OrderedDict()
_CACHE_MAX = 2


def clear_cache() -> None:
    """Forget every verified load (the next ``load_cifar10`` reads and verifies again)."""
    _CACHE.clear()


def _cache_put(key: tuple, raw: RawCifar10) -> RawCifar10:
    _CACHE[key] = raw
    _CACHE.move_to_end(key)
    while len(_CACHE) > _CACHE_MAX:
        _CACHE.popitem(last=False)
    return raw


def load_cifar10(source: str = "auto", root: str | None = None) -> RawCifar10:
    """Load and verify CIFAR-10.

    ``source``: "auto" (the path in env ``KDZOO_DATA`` if set, else torchvision), "torchvision"
    (``torchvision.datasets.CIFAR10`` under ``root``, default env ``KDZOO_CACHE`` or
    ``~/.cache/kdzoo``, downloading if needed), or a path to a ``.npz`` array file (or to a
    folder holding ``cifar10.npz``). Raises ``KDZooError`` when the data is missing, unreadable
    or not bit-exact CIFAR-10.
    """
    source = str(source)
    if source == "auto":
        source = os.environ.get("KDZOO_DATA") or "torchvision"
    if source == "torchvision":
        return _load_torchvision(root)
    return _load_npz(source)


def _load_npz(source: str) -> RawCifar10:
    path = Path(source).expanduser()
    if path.is_dir() and (path / "cifar10.npz").is_file():
        path = path / "cifar10.npz"
    if not path.is_file():
        what = "is a folder without cifar10.npz in it" if path.is_dir() else "does not exist"
        raise KDZooError(
            f"CIFAR-10 array file {str(path)!r} {what}. Point KDZOO_DATA (or --data) at a copy "
            f"of cifar10.npz, e.g. `export KDZOO_DATA=/path/to/cifar10.npz`, or unset KDZOO_DATA "
            f"to let torchvision download CIFAR-10.")
    path = path.resolve()
    st = path.stat()
    key = ("npz", str(path), st.st_size, st.st_mtime_ns)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]

    where = f"CIFAR-10 array file {str(path)!r}"
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not an .npz archive")
        with f:
            missing = [k for k in EXPECTED_SHAPES if k not in f.files]
            if missing:
                raise KDZooError(
                    f"{where} has no array(s) {', '.join(repr(m) for m in missing)} (it holds: "
                    f"{', '.join(f.files) or 'nothing'}). A CIFAR-10 array file needs x_train, "
                    f"y_train, x_test and y_test. {_NPZ_FIX}")
            arrays = {k: f[k] for k in EXPECTED_SHAPES}
            names = f["class_names"] if "class_names" in f.files else None
    except KDZooError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error) as e:
        # numpy's pickle message suggests allow_pickle, which kdzoo never uses
        detail = "not an .npz archive" if "pickle" in str(e) else f"{type(e).__name__}: {e}"
        raise KDZooError(
            f"{where} cannot be read as an .npz archive ({detail}); it is truncated, "
            f"corrupt or not an array file. {_NPZ_FIX}") from e

    class_names = CIFAR10_CLASSES
    if names is not None:
        if names.dtype.kind not in "US" or names.shape != (10,):
            raise KDZooError(
                f"{where}: array 'class_names' has shape {names.shape} and dtype {names.dtype}; "
                f"expected 10 strings. {_NPZ_FIX}")
        class_names = tuple(str(n) for n in names.tolist())
    raw = _verify(arrays, class_names, where, _NPZ_FIX, source=f"npz:{path}")
    return _cache_put(key, raw)


def _load_torchvision(root: str | None) -> RawCifar10:
    root_path = Path(root or os.environ.get("KDZOO_CACHE") or "~/.cache/kdzoo").expanduser().resolve()
    key = ("torchvision", str(root_path))
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    try:
        import torchvision.datasets as tvd
    except ImportError as e:
        raise KDZooError(
            f"torchvision is not importable ({e}), so CIFAR-10 cannot be downloaded. Install "
            f"torchvision, or set KDZOO_DATA=/path/to/cifar10.npz (or pass --data).") from e
    try:
        train = tvd.CIFAR10(str(root_path), train=True, download=True)
        test = tvd.CIFAR10(str(root_path), train=False, download=True)
    except (OSError, RuntimeError, EOFError, ValueError, tarfile.TarError) as e:  # urllib's URLError is an OSError
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
        arrays = {
            "x_train": np.asarray(train.data),
            "y_train": np.asarray(train.targets, dtype=np.int64),
            "x_test": np.asarray(test.data),
            "y_test": np.asarray(test.targets, dtype=np.int64),
        }
    except (TypeError, ValueError) as e:
        raise KDZooError(f"{where} has labels that are not integers ({e}). {fix}") from e
    names = tuple(str(c) for c in getattr(train, "classes", CIFAR10_CLASSES))
    raw = _verify(arrays, names if len(names) == 10 else CIFAR10_CLASSES, where, fix,
                  source=f"torchvision:{root_path}")
    return _cache_put(key, raw)


def _verify(arrays: dict[str, np.ndarray], class_names: tuple[str, ...], where: str, fix: str,
            source: str) -> RawCifar10:
    """Check dtypes, shapes and fingerprints; return read-only views in a ``RawCifar10``."""
    out: dict[str, np.ndarray] = {}
    for name, shape in EXPECTED_SHAPES.items():
        a = arrays[name]
        want_dtype = "uint8" if name.startswith("x") else "int64"
        ok_dtype = a.dtype == np.uint8 if name.startswith("x") else a.dtype.kind in "iu"
        if a.shape != shape or not ok_dtype:
            raise KDZooError(
                f"{where}: array {name!r} has shape {a.shape} and dtype {a.dtype}, expected shape "
                f"{shape} and dtype {want_dtype}. This is not the CIFAR-10 data kdzoo expects. {fix}")
        if not name.startswith("x"):
            a = a.astype(np.int64, copy=False)
        a = np.ascontiguousarray(a).view()  # a view, so that making it read-only leaves the caller's array alone
        a.setflags(write=False)
        digest = _sha256(a)
        if digest != FINGERPRINTS[name]:
            raise KDZooError(
                f"{where}: array {name!r} does not match CIFAR-10 (sha256 {digest[:16]}..., expected "
                f"{FINGERPRINTS[name][:16]}...): the data is corrupt or is not CIFAR-10. {fix}")
        out[name] = a
    return RawCifar10(out["x_train"], out["y_train"], out["x_test"], out["y_test"],
                      tuple(class_names), source, {k: FINGERPRINTS[k] for k in EXPECTED_SHAPES})


# ---------------------------------------------------------------------------------------------
# Subsets


def _check_size(name: str, value: int | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise KDZooError(f"{name} must be a whole number, got {value!r}.")
    if value < 0 or (value == 0 and not allow_zero):
        raise KDZooError(f"{name} must be {'zero or more' if allow_zero else 'at least 1'}, got {value}.")


def _check_every_class(name: str, n: int | None, class_names: tuple[str, ...], effect: str) -> None:
    """A stratified subset smaller than the number of classes would silently leave classes out."""
    k = len(class_names)
    if n is None or n == 0 or n >= k:
        return
    missing = ", ".join(f"{c} ({class_names[c]})" for c in range(n, k))
    raise KDZooError(
        f"{name}={n} is smaller than the {k} classes: a stratified subset of {n} image{'s' if n != 1 else ''} "
        f"has one image of class{'es 0-' if n > 1 else ' '}{n - 1} and none of classes {missing}, so {effect}. "
        f"Use {name} >= {k}, at least one image per class (a few hundred per class for meaningful accuracy).")


def train_set_size(train_size: int | None, val_size: int = 0) -> int:
    """How many training images ``prepare_data`` keeps: ``train_size``, or CIFAR-10's whole training
    split less the ``val_size`` images held out (known before any data is loaded)."""
    return train_size if train_size is not None else EXPECTED_SHAPES["y_train"][0] - (val_size or 0)


def train_batch_sizes(n_train: int, batch_size: int) -> list[int]:
    """The distinct sizes of the batches ``CifarData.train_batches`` yields (the engine's default,
    ``drop_last=True``): ``[batch_size]``, or ``[n_train]`` when the set is no larger than one batch."""
    _check_size("batch_size", batch_size)
    return [batch_size] if n_train > batch_size else [n_train]


def _per_class(n: int, k: int) -> list[int]:
    """Split n over k classes equally; the remainder goes to the first classes."""
    return [n // k + (1 if c < n % k else 0) for c in range(k)]


def _split_generator(subset_seed: int, split: str) -> torch.Generator:
    digest = hashlib.sha256(f"kdzoo-subset:{int(subset_seed)}:{split}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _class_orders(labels: np.ndarray, k: int, gen: torch.Generator) -> list[np.ndarray]:
    """Per class, that class's indices in a seeded random order (classes drawn in order 0..k-1)."""
    orders = []
    for c in range(k):
        idx = np.flatnonzero(labels == c)
        orders.append(idx[torch.randperm(len(idx), generator=gen).numpy()])
    return orders


def _stratified_split(labels: np.ndarray, k: int, sizes: list[tuple[str, int | None]],
                      subset_seed: int, split: str, total_name: str) -> list[np.ndarray]:
    """Consecutive, disjoint stratified draws from one split.

    ``sizes`` lists (name, n) in draw order; n=None (only last) takes everything that is left.
    Each result is sorted (official order).
    """
    counts = np.bincount(labels, minlength=k)
    requested = sum(n for _, n in sizes if n is not None)
    if requested > len(labels):
        parts = " + ".join(f"{name}={n}" for name, n in sizes if n is not None)
        raise KDZooError(
            f"{parts} asks for more than the {len(labels)} {total_name} images available. "
            f"Use smaller sizes (or leave them unset for the full set).")
    orders = _class_orders(labels, k, _split_generator(subset_seed, split))
    results: list[list[np.ndarray]] = [[] for _ in sizes]
    for c in range(k):
        start = 0
        for j, (name, n) in enumerate(sizes):
            take = counts[c] - start if n is None else _per_class(n, k)[c]
            if start + take > counts[c]:
                raise KDZooError(
                    f"{name}={n} needs {take} images of class {c} but only {counts[c] - start} are "
                    f"left in the {total_name} set. Use a smaller size.")
            results[j].append(orders[c][start:start + take])
            start += take
    return [np.sort(np.concatenate(r)).astype(np.int64) for r in results]


def _subset_indices(raw: RawCifar10, train_size: int | None, test_size: int | None, val_size: int,
                    subset_seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    _check_size("train_size", train_size)
    _check_size("test_size", test_size)
    _check_size("val_size", val_size, allow_zero=True)
    _check_every_class("train_size", train_size, raw.class_names, "the network would never see those")
    _check_every_class("val_size", val_size, raw.class_names, "the best epoch would be chosen without them")
    _check_every_class("test_size", test_size, raw.class_names, "accuracy would be measured without them")
    val_size = val_size or 0
    k = len(raw.class_names)
    n_train, n_test = len(raw.y_train), len(raw.y_test)
    if val_size == 0 and train_size in (None, n_train):
        train_idx, val_idx = np.arange(n_train, dtype=np.int64), np.zeros(0, np.int64)
    else:
        val_idx, train_idx = _stratified_split(
            raw.y_train, k, [("val_size", val_size), ("train_size", train_size)], subset_seed,
            "train", "training")
        if len(train_idx) == 0:
            raise KDZooError(f"val_size={val_size} leaves no training images. Use a smaller val_size.")
    if test_size in (None, n_test):
        test_idx = np.arange(n_test, dtype=np.int64)
    else:
        (test_idx,) = _stratified_split(raw.y_test, k, [("test_size", test_size)], subset_seed,
                                        "test", "test")
    return train_idx, val_idx, test_idx


def prepare_data(source: str = "auto", root: str | None = None, train_size: int | None = None,
                 test_size: int | None = None, val_size: int = 0, subset_seed: int = 0,
                 device: str | torch.device = "cpu") -> CifarData:
    """Load verified CIFAR-10 and put the chosen subsets on ``device`` as a ``CifarData``.

    ``train_size``/``test_size`` (None = full) pick stratified subsets seeded by ``subset_seed``:
    equal counts per class, the remainder going one each to the first classes. ``val_size``
    images are carved, stratified, out of the training set first; the train subset is drawn
    from the rest, so the two are disjoint, and the validation split does not depend on
    ``train_size``. Selected images keep the official order.
    """
    raw = load_cifar10(source, root)
    train_idx, val_idx, test_idx = _subset_indices(raw, train_size, test_size, val_size, subset_seed)
    dev = torch.device(device)

    def take(split: str, idx: np.ndarray) -> tuple[Tensor, Tensor]:
        x = raw.images_nchw(split)
        y = torch.from_numpy(np.asarray(raw.y_train if split == "train" else raw.y_test))
        i = torch.from_numpy(idx)
        return x.index_select(0, i).to(dev), y.index_select(0, i).to(dev)

    h = hashlib.sha256(b"kdzoo-cifar10-v1")
    for name in EXPECTED_SHAPES:
        h.update(f"{name}={raw.fingerprints[name]};".encode())
    for name, idx in (("train", train_idx), ("val", val_idx), ("test", test_idx)):
        h.update(f"{name}:{len(idx)}:".encode())
        h.update(idx.astype("<i8").tobytes())

    train_x, train_y = take("train", train_idx)
    val_x, val_y = take("train", val_idx)
    test_x, test_y = take("test", test_idx)
    data = CifarData(train_x, train_y, test_x, test_y, val_x=val_x, val_y=val_y,
                     class_names=raw.class_names, fingerprint=h.hexdigest())
    data.train_indices = torch.from_numpy(train_idx)
    data.val_indices = torch.from_numpy(val_idx)
    data.test_indices = torch.from_numpy(test_idx)
    return data


# ---------------------------------------------------------------------------------------------
# The data object and its batches


class CifarData:
    """Images as contiguous uint8 NCHW tensors and int64 labels, all on one device.

    ``train_indices``/``val_indices``/``test_indices`` (CPU int64) are the positions in the
    official CIFAR-10 splits when built by ``prepare_data`` (val indices refer to the official
    training split), else None. ``fingerprint`` identifies the data: identical data gives an
    identical string. The tensors are shared by every batch iterator: do not modify them.
    """

    def __init__(self, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                 val_x: Tensor | None = None, val_y: Tensor | None = None,
                 class_names: tuple[str, ...] = CIFAR10_CLASSES, fingerprint: str | None = None,
                 mean: tuple[float, ...] = CIFAR10_MEAN, std: tuple[float, ...] = CIFAR10_STD) -> None:
        device = train_x.device
        if val_x is None:
            val_x = train_x.new_zeros((0, *train_x.shape[1:]))
            val_y = train_y.new_zeros((0,))
        for name, x, y in (("train", train_x, train_y), ("val", val_x, val_y), ("test", test_x, test_y)):
            if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
                raise ValueError(f"{name}_x must be uint8 (N, 3, H, W), got {x.dtype} {tuple(x.shape)}")
            if y is None or y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise ValueError(f"{name}_y must be int64 of shape ({x.shape[0]},)")
            if x.device != device or y.device != device:
                raise ValueError("all tensors must be on one device")
        self.train_x, self.train_y = train_x.contiguous(), train_y
        self.val_x, self.val_y = val_x.contiguous(), val_y
        self.test_x, self.test_y = test_x.contiguous(), test_y
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.train_indices: Tensor | None = None
        self.val_indices: Tensor | None = None
        self.test_indices: Tensor | None = None
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(3, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(3, 1, 1)
        # (x/255 - mean)/std == x * scale - shift
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = mean_t / std_t
        self.fingerprint = fingerprint if fingerprint is not None else self._content_fingerprint()

    def _content_fingerprint(self) -> str:
        h = hashlib.sha256(b"kdzoo-tensors-v1")
        for t in (self.train_x, self.train_y, self.val_x, self.val_y, self.test_x, self.test_y):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        h.update(repr(self.class_names).encode())
        return h.hexdigest()

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    def __repr__(self) -> str:
        return (f"CifarData(train={len(self.train_x)}, val={len(self.val_x)}, test={len(self.test_x)}, "
                f"device={self.device}, fingerprint={self.fingerprint[:12]})")

    def steps_per_epoch(self, batch_size: int, drop_last: bool = True) -> int:
        """Number of batches ``train_batches`` yields per epoch."""
        n = len(self.train_x)
        _check_size("batch_size", batch_size)
        if drop_last and n > batch_size:
            return n // batch_size
        return math.ceil(n / batch_size)

    def normalize(self, x_uint8: Tensor) -> Tensor:
        """float32 ``(x/255 - mean)/std`` per channel, for uint8 (..., 3, H, W) on this device."""
        return x_uint8.to(torch.float32).mul_(self._scale).sub_(self._shift)

    def epoch_plan(self, seed: int, epoch: int, flip: str = "random") -> tuple[Tensor, Tensor, Tensor]:
        """The CPU draws of one epoch: ``perm`` (N,), ``offsets`` (2, N) and ``flips`` (N,) bool.

        ``offsets[:, k]`` and ``flips[k]`` belong to the k-th image of the epoch, ``perm[k]``.
        """
        if flip not in ("random", "alternating"):
            raise KDZooError(f"flip must be 'random' or 'alternating', got {flip!r}.")
        n = len(self.train_x)
        g = torch.Generator().manual_seed(_mix_seed(seed, epoch))
        perm = torch.randperm(n, generator=g)
        offsets = torch.randint(0, 2 * PAD + 1, (2, n), generator=g)
        flips = torch.randint(0, 2, (n,), generator=g).bool()
        if flip == "alternating":
            base = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(_mix_seed(seed, -1)))
            flips = base.bool()[perm] ^ bool(epoch % 2)
        return perm, offsets, flips

    def train_batches(self, seed: int, epoch: int, batch_size: int, augment: bool = True,
                      drop_last: bool = True, flip: str = "random") -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(images float32 (B, 3, H, W) normalised, labels int64 (B,))`` for one epoch.

        A pure function of ``(seed, epoch)`` (see the module docstring). With ``augment`` each
        image is a random HxW window of its 4-pixel zero-padded self, mirrored when its flip is
        set; without, the plain images in the same order. The last partial batch is dropped when
        ``drop_last`` and the set is larger than one batch.
        """
        steps = self.steps_per_epoch(batch_size, drop_last)
        perm, offsets, flips = self.epoch_plan(seed, epoch, flip)
        dev = self.device
        perm, offsets, flips = perm.to(dev), offsets.to(dev), flips.to(dev)
        n, _, h, w = self.train_x.shape
        rows_ar = torch.arange(h, device=dev)
        cols_ar = torch.arange(w, device=dev)
        cols_rev = cols_ar.flip(0)
        for step in range(steps):
            sl = slice(step * batch_size, min((step + 1) * batch_size, n))
            idx = perm[sl]
            x = self.train_x.index_select(0, idx)
            if augment:
                b = len(idx)
                padded = F.pad(x, (PAD, PAD, PAD, PAD))
                rows = offsets[0, sl, None] + rows_ar
                # the flip is folded into the column index: a mirrored window reads its columns backwards
                cols = offsets[1, sl, None] + torch.where(flips[sl, None], cols_rev, cols_ar)
                x = padded.gather(2, rows[:, None, :, None].expand(b, 3, h, w + 2 * PAD))
                x = x.gather(3, cols[:, None, None, :].expand(b, 3, h, w))
            yield self.normalize(x), self.train_y.index_select(0, idx)

    def eval_batches(self, split: str = "test", batch_size: int = 1000) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield normalised ``(images, labels)`` of ``split`` ("test", "val" or "train") in order, last partial batch included."""
        if split not in ("train", "val", "test"):
            raise KDZooError(f"split must be 'train', 'val' or 'test', got {split!r}.")
        _check_size("batch_size", batch_size)
        x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
        if split == "val" and len(x) == 0:
            raise KDZooError("There is no validation split: set val_size (e.g. val_size=5000) to hold one out.")
        for start in range(0, len(x), batch_size):
            yield self.normalize(x[start:start + batch_size]), y[start:start + batch_size]


__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "CIFAR10_CLASSES", "FINGERPRINTS", "RawCifar10", "CifarData",
           "load_cifar10", "prepare_data", "clear_cache", "train_set_size", "train_batch_sizes"]
