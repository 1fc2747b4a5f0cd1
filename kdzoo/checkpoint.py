"""Checkpoints: the student's weights plus the method's learnable parts, loaded with weights_only=True.

A checkpoint is a dict of tensors and plain Python values::

    {"format": "kdzoo.checkpoint/1", "model": "resnet20", "model_options": {...},
     "num_classes": 10, "state_dict": {...}, "method": "fitnets", "hparams": {...},
     "method_state": {...}, "meta": {...}}
"""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from kdzoo import KDZooError

FORMAT = "kdzoo.checkpoint/1"


def atomic_write(path: str | Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint atomically. ``payload`` must hold only tensors and plain Python values."""
    atomic_write(path, lambda tmp: torch.save({"format": FORMAT, **payload}, tmp))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a kdzoo checkpoint safely; ``KDZooError`` for a missing, corrupt or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise KDZooError(f"Checkpoint {path} does not exist. Pass the checkpoint.pt written by `kdzoo train` (under its --out folder).")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError, OSError) as e:
        raise KDZooError(
            f"Checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "It is truncated, corrupt, or not a safe-to-load PyTorch file; re-create it with `kdzoo train`."
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise KDZooError(
            f"{path} is a PyTorch file but not a kdzoo checkpoint (no format '{FORMAT}'). "
            "Use a checkpoint written by `kdzoo train` or `kdzoo distill`."
        )
    return ckpt
