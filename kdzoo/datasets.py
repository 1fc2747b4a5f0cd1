"""The dataset contract: what a dataset plugin registers (``register_datasets``) and what it loads.

A dataset plugin registers a subclass of :class:`Dataset`. kdzoo builds it with the benchmark's
(or the command line's) ``data.options`` and calls :meth:`Dataset.load`, which returns the
verified splits as :class:`Arrays`: uint8 images, int64 labels, the class names, the
normalisation constants, the default training augmentation, a content fingerprint and where the
data came from. Everything else (subsets, the device, batches, augmentation) is kdzoo's, the
same for every dataset. The number of classes, the image size and the normalisation that the
networks, the validation and the checkpoints use all come from here.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from kdzoo import KDZooError
from kdzoo.errors import suggest


def array_sha256(a: np.ndarray) -> str:
    """sha256 of an array's raw C-order bytes (the fingerprint of one split's images or labels)."""
    return hashlib.sha256(np.ascontiguousarray(a).reshape(-1).view(np.uint8)).hexdigest()


@dataclass(eq=False)
class Arrays:
    """A dataset's verified splits (read-only numpy): images uint8 (N, H, W, 3) RGB, labels int64 in
    ``0..len(class_names)-1``.

    ``fingerprints`` holds the sha256 of each array (:func:`array_sha256`); ``source`` says where the
    data came from. ``mean``/``std`` normalise ``x / 255`` per channel. Training batches are random
    ``H x W`` crops of each image zero-padded by ``pad`` pixels, mirrored at random when ``flip``.
    ``val`` (optional) is an official validation split; without one, kdzoo holds one out of the
    training split when asked (``val_size``).
    """

    dataset: str  # the registered name
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str
    fingerprints: dict[str, str]
    pad: int = 4
    flip: bool = True
    _nchw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.x_train.shape[1]), int(self.x_train.shape[2])

    def images_nchw(self, split: str) -> Any:
        """``split`` ("train"/"test") images as a contiguous uint8 (N, 3, H, W) CPU tensor (cached; do not mutate)."""
        import torch

        if split not in self._nchw:
            x = self.x_train if split == "train" else self.x_test
            with warnings.catch_warnings():  # read-only array; permute().contiguous() copies at once
                warnings.simplefilter("ignore", UserWarning)
                self._nchw[split] = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        return self._nchw[split]


def verified(dataset: str, arrays: dict[str, np.ndarray], *, class_names: tuple[str, ...], mean: tuple[float, float, float],
             std: tuple[float, float, float], source: str, where: str, fix: str,
             shapes: dict[str, tuple[int, ...]] | None = None, fingerprints: dict[str, str] | None = None,
             pad: int = 4, flip: bool = True, label: str = "") -> Arrays:
    """Check the four arrays (``x_train``, ``y_train``, ``x_test``, ``y_test``) and return them as read-only
    :class:`Arrays`. ``shapes`` and ``fingerprints`` (sha256 per array), when given, must match exactly;
    the labels must lie in ``0..len(class_names)-1``. Every problem is a ``KDZooError`` that names
    ``where`` and ends with ``fix``; ``label`` is the dataset's name in messages (default: ``dataset``)."""
    label = label or dataset
    out: dict[str, np.ndarray] = {}
    digests: dict[str, str] = {}
    for name in ("x_train", "y_train", "x_test", "y_test"):
        a = arrays[name]
        images = name.startswith("x")
        ok_dtype = a.dtype == np.uint8 if images else a.dtype.kind in "iu"
        ok_shape = (a.ndim == 4 and a.shape[3] == 3) if images else a.ndim == 1
        want = shapes.get(name) if shapes else None
        if not ok_dtype or not ok_shape or (want is not None and tuple(a.shape) != tuple(want)):
            expected = f"shape {want}" if want is not None else ("(N, H, W, 3)" if images else "(N,)")
            raise KDZooError(
                f"{where}: array {name!r} has shape {a.shape} and dtype {a.dtype}, expected {expected} and dtype "
                f"{'uint8' if images else 'int64'}. This is not the {label} data kdzoo expects. {fix}")
        if not images:
            a = a.astype(np.int64, copy=False)
        a = np.ascontiguousarray(a).view()  # a view, so that making it read-only leaves the caller's array alone
        a.setflags(write=False)
        digests[name] = array_sha256(a)
        if fingerprints is not None and digests[name] != fingerprints[name]:
            raise KDZooError(
                f"{where}: array {name!r} does not match {label} (sha256 {digests[name][:16]}..., "
                f"expected {fingerprints[name][:16]}...): the data is corrupt or is not {label}. {fix}")
        out[name] = a
    for split in ("train", "test"):
        x, y = out[f"x_{split}"], out[f"y_{split}"]
        if len(x) != len(y):
            raise KDZooError(f"{where}: {len(x)} {split} images but {len(y)} labels. {fix}")
        if len(y) and (y.min() < 0 or y.max() >= len(class_names)):
            raise KDZooError(f"{where}: {split} labels lie in {y.min()}..{y.max()}, outside the "
                             f"{len(class_names)} classes. {fix}")
    if out["x_train"].shape[1:] != out["x_test"].shape[1:]:
        raise KDZooError(f"{where}: train images are {out['x_train'].shape[1:3]}, test images "
                         f"{out['x_test'].shape[1:3]}; they must be the same size. {fix}")
    return Arrays(dataset, out["x_train"], out["y_train"], out["x_test"], out["y_test"], tuple(class_names), mean, std,
                  source, digests, pad, flip)


class Dataset:
    """Base class of dataset plugins. Subclasses set the class attributes and implement ``load``.

    ``options`` (a benchmark's ``data: {options: {...}}``, the CLI's ``--data-option K=V``) are
    keyword arguments of ``__init__``; declare them in ``defaults`` so that unknown ones are refused
    with a suggestion.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}  # options and their defaults
    reference: ClassVar[str] = ""  # where the data and its constants come from

    def __init__(self, **options: Any) -> None:
        unknown = [k for k in options if k not in self.defaults]
        if unknown:
            raise KDZooError(
                f"Dataset '{self.name}' has no option '{unknown[0]}'.{suggest(unknown[0], self.defaults)} Its options "
                f"are: {', '.join(sorted(self.defaults)) or '(none)'}.")
        self.options = {**self.defaults, **options}

    def load(self, source: str, root: Path) -> Arrays:
        """The verified splits. ``source`` is "auto" (the dataset's own default: an environment variable, a
        file under ``root``, else a download), "download", or a path; ``root`` is kdzoo's cache folder
        (``$KDZOO_CACHE``, default ``~/.cache/kdzoo``). Raise ``KDZooError`` saying how to get the data when
        it is missing, and when a download fails (no internet)."""
        raise NotImplementedError

    def locate(self, source: str, root: Path) -> str | None:
        """Where ``load`` would read the data without downloading, or None (for ``kdzoo datasets``). Must be
        cheap: no decoding, no verification."""
        return None

    def sizes(self) -> str:
        """The official split sizes, for ``kdzoo datasets`` (e.g. "50,000 train / 10,000 test, 10 classes")."""
        return ""
