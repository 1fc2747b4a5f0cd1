"""A dataset's images as uint8 tensors on the training device (or in host memory when they do not fit
there), with batched augmentation and seeded batch order.

Datasets are plugins (:mod:`kdzoo.datasets`): one loads and verifies its splits as
:class:`~kdzoo.datasets.Arrays`; ``prepare_data`` draws the stratified subsets and puts them on the
device as :class:`Data`. Verified loads are cached in-process (:func:`cached_load`).

Batches (``Data.train_batches``) never leave tensor land: no DataLoader, no PIL. The order and the
augmentation of an epoch are a pure function of ``(seed, epoch)``:

* a CPU ``torch.Generator`` is seeded with ``(seed * 1_000_003 + epoch) mod 2**64`` and draws,
  in this order: ``perm = randperm(N)``, ``offsets = randint(0, 2 * pad + 1, (2, N))`` (row offset
  ``dy`` then column offset ``dx`` into the ``pad``-pixel zero-padded image, for the k-th image of
  the epoch) and ``flips = randint(0, 2, (N,))`` (likewise per position);
* ``flip="alternating"`` (airbench) replaces the flips by a per-image draw
  ``randint(0, 2, (N,))`` from a generator seeded with ``(seed * 1_000_003 - 1) mod 2**64``
  (a function of the seed only), used as is on even epochs and complemented on odd epochs;
* a dataset without flips (digits) draws the flips all the same and ignores them, so the crops
  do not depend on it.

Two runs, or two ``Data`` objects holding the same data, with the same seed therefore see
identical batches, whatever the device.

**Placement.** Images that would take more than :data:`DEVICE_FRACTION` of a GPU's free memory stay in
host memory and each batch's uint8 images move to the GPU before augmentation; labels, draws
and arithmetic stay on the GPU, so the batches are the same as with the images on the device
(``prepare_data(placement="auto" | "device" | "host")``).
"""
from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kdzoo import KDZooError
from kdzoo.datasets import Arrays

PAD = 4  # the default random-crop padding, as in every CIFAR anchor
DEVICE_FRACTION = 0.5  # images go to a GPU when they take at most this share of its free memory
PLACEMENTS = ("auto", "device", "host")

_SEED_STRIDE = 1_000_003


def _mix_seed(seed: int, epoch: int) -> int:
    return (int(seed) * _SEED_STRIDE + int(epoch)) % (1 << 64)


# ---------------------------------------------------------------------------------------------
# In-process cache of verified loads

_CACHE: OrderedDict[tuple, Arrays] = OrderedDict()
_CACHE_MAX = 2


def clear_cache() -> None:
    """Forget every verified load (the next load reads and verifies again)."""
    _CACHE.clear()


def cached_load(key: tuple, load: Callable[[], Arrays]) -> Arrays:
    """``load()``, remembered under ``key`` (the last two loads are kept): verification costs seconds."""
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    _CACHE[key] = load()
    while len(_CACHE) > _CACHE_MAX:
        _CACHE.popitem(last=False)
    return _CACHE[key]


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


def train_set_size(train_size: int | None, val_size: int, n_train: int) -> int:
    """How many training images ``prepare_data`` keeps: ``train_size``, or the whole training split
    (``n_train`` images) less the ``val_size`` images held out."""
    return train_size if train_size is not None else n_train - (val_size or 0)


def train_batch_sizes(n_train: int, batch_size: int) -> list[int]:
    """The distinct sizes of the batches ``Data.train_batches`` yields (the engine's default,
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


def _subset_indices(raw: Arrays, train_size: int | None, test_size: int | None, val_size: int,
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


def choose_placement(nbytes: int, device: torch.device, placement: str = "auto") -> torch.device:
    """Where ``nbytes`` of images live for training on ``device``: ``device`` itself, or host memory (the CPU)
    when ``placement`` is "host", or "auto" on a GPU whose free memory is less than ``nbytes / DEVICE_FRACTION``."""
    if placement not in PLACEMENTS:
        raise KDZooError(f"data placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}.")
    if device.type != "cuda" or placement == "device":
        return device
    if placement == "host":
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(device)
    return device if nbytes <= DEVICE_FRACTION * free else torch.device("cpu")


def prepare_data(raw: Arrays, train_size: int | None = None, test_size: int | None = None, val_size: int = 0,
                 subset_seed: int = 0, device: str | torch.device = "cpu", placement: str = "auto") -> Data:
    """Put the chosen subsets of a dataset's verified splits on ``device`` as a :class:`Data`.

    ``train_size``/``test_size`` (None = full) pick stratified subsets seeded by ``subset_seed``:
    equal counts per class, the remainder going one each to the first classes. ``val_size``
    images are carved, stratified, out of the training set first; the train subset is drawn
    from the rest, so the two are disjoint, and the validation split does not depend on
    ``train_size``. Selected images keep the official order. ``placement`` says where the images live
    (:func:`choose_placement`); labels are always on ``device``.
    """
    train_idx, val_idx, test_idx = _subset_indices(raw, train_size, test_size, val_size, subset_seed)
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    per_image = int(np.prod(raw.images_nchw("test").shape[1:]))
    store = choose_placement(per_image * (len(train_idx) + len(val_idx) + len(test_idx)), dev, placement)

    def take(split: str, idx: np.ndarray) -> tuple[Tensor, Tensor]:
        x = raw.images_nchw(split)
        y = torch.from_numpy(np.asarray(raw.y_train if split == "train" else raw.y_test))
        i = torch.from_numpy(idx)
        return x.index_select(0, i).to(store), y.index_select(0, i).to(dev)

    h = hashlib.sha256(f"kdzoo-{raw.dataset}-v1".encode())
    for name in ("x_train", "y_train", "x_test", "y_test"):
        h.update(f"{name}={raw.fingerprints[name]};".encode())
    for name, idx in (("train", train_idx), ("val", val_idx), ("test", test_idx)):
        h.update(f"{name}:{len(idx)}:".encode())
        h.update(idx.astype("<i8").tobytes())

    train_x, train_y = take("train", train_idx)
    val_x, val_y = take("train", val_idx)
    test_x, test_y = take("test", test_idx)
    data = Data(train_x, train_y, test_x, test_y, val_x=val_x, val_y=val_y, class_names=raw.class_names,
                fingerprint=h.hexdigest(), mean=raw.mean, std=raw.std, pad=raw.pad, flip=raw.flip,
                dataset=raw.dataset, device=dev)
    data.train_indices = torch.from_numpy(train_idx)
    data.val_indices = torch.from_numpy(val_idx)
    data.test_indices = torch.from_numpy(test_idx)
    return data


@dataclass(frozen=True)
class DataShape:
    """What a plan and its validation know of the data before any training: which dataset, its
    fingerprint (subsets included), the number of classes, the image size and the training-set size."""

    dataset: str
    fingerprint: str
    num_classes: int
    image_size: tuple[int, int]
    n_train: int
    class_names: tuple[str, ...] = ()  # empty: unknown (then only the dataset's name is compared)


# ---------------------------------------------------------------------------------------------
# The data object and its batches


class Data:
    """Images as contiguous uint8 NCHW tensors and int64 labels; batches come out on ``device``.

    The labels live on ``device`` (the training device, default: the images' device); the images on
    ``device`` too, or in host memory, from where each batch moves to ``device`` (see the module
    docstring). Either way the batches are the same.

    ``train_indices``/``val_indices``/``test_indices`` (CPU int64) are the positions in the
    dataset's official splits when built by ``prepare_data`` (val indices refer to the official
    training split), else None. ``fingerprint`` identifies the data: identical data gives an
    identical string. ``dataset`` names the dataset; ``pad``/``flip`` are its training
    augmentation. The tensors are shared by every batch iterator: do not modify them.
    """

    def __init__(self, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                 val_x: Tensor | None = None, val_y: Tensor | None = None,
                 class_names: tuple[str, ...] | None = None, fingerprint: str | None = None,
                 mean: tuple[float, ...] = (0.5, 0.5, 0.5), std: tuple[float, ...] = (0.25, 0.25, 0.25),
                 pad: int = PAD, flip: bool = True, dataset: str = "tensors",
                 device: str | torch.device | None = None) -> None:
        device = torch.device(device) if device is not None else train_x.device
        host = train_x.device
        if val_x is None:
            val_x = train_x.new_zeros((0, *train_x.shape[1:]))
            val_y = train_y.new_zeros((0,))
        for name, x, y in (("train", train_x, train_y), ("val", val_x, val_y), ("test", test_x, test_y)):
            if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
                raise ValueError(f"{name}_x must be uint8 (N, 3, H, W), got {x.dtype} {tuple(x.shape)}")
            if y is None or y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise ValueError(f"{name}_y must be int64 of shape ({x.shape[0]},)")
            if x.device != host or y.device != device:
                raise ValueError(f"images must all be on one device ({host}) and labels on the training device ({device})")
        if host != device and host.type != "cpu":
            raise ValueError(f"images are on {host}: they live on the training device ({device}) or in host memory")
        self._device = device
        self.train_x, self.train_y = train_x.contiguous(), train_y
        self.val_x, self.val_y = val_x.contiguous(), val_y
        self.test_x, self.test_y = test_x.contiguous(), test_y
        if class_names is None:
            class_names = tuple(str(c) for c in range(int(max(train_y.max(), test_y.max())) + 1 if len(train_y) else 0))
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.dataset, self.pad, self.flip, self.mean, self.std = dataset, int(pad), bool(flip), tuple(mean), tuple(std)
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
        """The training device: where batches, labels and indices are."""
        return self._device

    @property
    def on_host(self) -> bool:
        """True when the images stay in host memory and each batch moves to :attr:`device`."""
        return self.train_x.device != self._device

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train_x.shape[2]), int(self.train_x.shape[3])

    def shape(self) -> DataShape:
        return DataShape(self.dataset, self.fingerprint, self.num_classes, self.image_size, len(self.train_x),
                         self.class_names)

    def __repr__(self) -> str:
        where = f"device={self.device}" + (", images in host memory" if self.on_host else "")
        return (f"Data({self.dataset}, train={len(self.train_x)}, val={len(self.val_x)}, test={len(self.test_x)}, "
                f"{where}, fingerprint={self.fingerprint[:12]})")

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
        offsets = torch.randint(0, 2 * self.pad + 1, (2, n), generator=g)
        flips = torch.randint(0, 2, (n,), generator=g).bool()
        if not self.flip:
            return perm, offsets, torch.zeros_like(flips)
        if flip == "alternating":
            base = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(_mix_seed(seed, -1)))
            flips = base.bool()[perm] ^ bool(epoch % 2)
        return perm, offsets, flips

    def train_batches(self, seed: int, epoch: int, batch_size: int, augment: bool = True,
                      drop_last: bool = True, flip: str = "random",
                      with_indices: bool = False) -> Iterator[tuple[Tensor, ...]]:
        """Yield ``(images float32 (B, 3, H, W) normalised, labels int64 (B,))`` for one epoch, plus the
        samples' training-set indices (int64 (B,), on the data's device) when ``with_indices``.

        A pure function of ``(seed, epoch)`` (see the module docstring). With ``augment`` each
        image is a random HxW window of its 4-pixel zero-padded self, mirrored when its flip is
        set; without, the plain images in the same order. The last partial batch is dropped when
        ``drop_last`` and the set is larger than one batch.
        """
        steps = self.steps_per_epoch(batch_size, drop_last)
        perm, offsets, flips = self.epoch_plan(seed, epoch, flip)
        dev = self.device
        host_perm = perm  # the images' own device (CPU) gathers with it when they stay in host memory
        perm, offsets, flips = perm.to(dev), offsets.to(dev), flips.to(dev)
        n, _, h, w = self.train_x.shape
        rows_ar = torch.arange(h, device=dev)
        cols_ar = torch.arange(w, device=dev)
        cols_rev = cols_ar.flip(0)
        for step in range(steps):
            sl = slice(step * batch_size, min((step + 1) * batch_size, n))
            idx = perm[sl]
            if self.on_host:
                x = self.train_x.index_select(0, host_perm[sl]).to(dev)
            else:
                x = self.train_x.index_select(0, idx)
            if augment:
                b = len(idx)
                pad = self.pad
                padded = F.pad(x, (pad, pad, pad, pad))
                rows = offsets[0, sl, None] + rows_ar
                # the flip is folded into the column index: a mirrored window reads its columns backwards
                cols = offsets[1, sl, None] + torch.where(flips[sl, None], cols_rev, cols_ar)
                x = padded.gather(2, rows[:, None, :, None].expand(b, 3, h, w + 2 * pad))
                x = x.gather(3, cols[:, None, None, :].expand(b, 3, h, w))
            if with_indices:
                yield self.normalize(x), self.train_y.index_select(0, idx), idx
            else:
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
            yield self.normalize(x[start:start + batch_size].to(self.device)), y[start:start + batch_size]


__all__ = ["Data", "DataShape", "prepare_data", "choose_placement", "cached_load", "clear_cache", "train_set_size", "train_batch_sizes"]
