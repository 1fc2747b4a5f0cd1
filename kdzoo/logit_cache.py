"""The teacher's logits on the training batches, cached on disk per (teacher, seed, epoch).

Batches are a pure function of (seed, epoch), so the frozen teacher's logits on them are too. A cohort whose
members need nothing of the teacher but its logits (methods without a ``needs_*`` output flag: kd, dkd, dist...)
reads an epoch's logits from here instead of running the teacher. Where it pays: ``kdzoo tune`` (every cohort of
trials after the first), and in ``kdzoo bench`` where a teacher and seed have several cohorts (``cohorts: false``,
``cohort_size``) one of which needs only logits, or with ``cache_teacher_logits: true`` (a rerun with one more
logit method). A cohort with the cache on writes every epoch it runs the teacher over.

Exact, by construction and by check: the key holds everything the logits depend on (the teacher's cache key,
the seed, a digest of the training images, the batch size, the flip rule and augmentation, the normalisation,
the autocast dtype, the device type, the memory format and torch's version), and the engine recomputes the
first batch of every cached epoch and compares it bit for bit; on a difference (or a damaged file) the epoch is
computed live and written anew. Disk: ``4 * classes`` bytes per training image per epoch in float32 (20 MB an
epoch for CIFAR-100's 50,000 images), under ``$KDZOO_CACHE/teacher-logits``.
"""
from __future__ import annotations

import hashlib
import json
import weakref
from pathlib import Path

import torch

from kdzoo import cache_dir
from kdzoo.checkpoint import atomic_write
from kdzoo.data import Data

_DIGESTS: dict[int, str] = {}  # id(tensor) -> digest, dropped when the tensor is freed (its id may be reused)


def images_digest(x: torch.Tensor) -> str:
    """blake2b of a uint8 image tensor's bytes (memoised for as long as the tensor lives; data tensors are
    read-only by contract, see ``kdzoo.data.Data``)."""
    if id(x) not in _DIGESTS:
        _DIGESTS[id(x)] = hashlib.blake2b(x.contiguous().cpu().numpy().tobytes(), digest_size=16).hexdigest()
        weakref.finalize(x, _DIGESTS.pop, id(x), None)
    return _DIGESTS[id(x)]


class TeacherLogits:
    """One (teacher, seed, data, batch recipe, numerics) key's folder: ``epoch-NNNN.pt`` per global epoch."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.unwritable = False

    @classmethod
    def open(cls, teacher_key: str, seed: int, data: Data, batch_size: int, flip: str, dtype: torch.dtype | None,
             device: torch.device, memory_format: torch.memory_format, root: Path | None = None) -> TeacherLogits:
        key = {"teacher": teacher_key, "seed": seed, "images": images_digest(data.train_x),
               "n": len(data.train_x), "batch_size": batch_size, "flip": flip, "pad": data.pad,
               "flip_images": data.flip, "mean": list(data.mean), "std": list(data.std), "dtype": str(dtype),
               "device": device.type, "memory_format": str(memory_format), "torch": torch.__version__}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return cls((root or cache_dir() / "teacher-logits") / digest)

    def path(self, epoch: int) -> Path:
        return self.folder / f"epoch-{epoch:04d}.pt"

    def load(self, epoch: int, device: torch.device) -> torch.Tensor | None:
        """The epoch's logits (batch order, one row per image trained), or None when absent or unreadable."""
        path = self.path(epoch)
        if not path.is_file():
            return None
        try:
            logits = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # damaged: computed live and rewritten
            return None
        return logits.to(device) if isinstance(logits, torch.Tensor) and logits.dim() == 2 else None

    def save(self, epoch: int, logits: torch.Tensor) -> bool:
        """Write the epoch's logits atomically; False (and no more attempts) where the cache cannot be written:
        a cache is an optimisation, never a reason for a run to fail."""
        if self.unwritable:
            return False
        try:
            atomic_write(self.path(epoch), lambda tmp: torch.save(logits.detach().cpu(), tmp))
        except OSError:
            self.unwritable = True
            return False
        return True
