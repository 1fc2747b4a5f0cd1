"""Checkpoints: the student's weights plus the method's learnable parts, loaded with weights_only=True.

A checkpoint is a dict of tensors and plain Python values::

    {"format": "kdzoo.checkpoint/1", "model": "resnet20", "model_options": {...},
     "num_classes": 10, "state_dict": {...}, "method": "fitnets", "hparams": {...},
     "method_state": {...}, "meta": {...}}

``load_payload`` reads any PyTorch file the same safe way (a teacher written by another code base, which a
checkpoint-format plugin then converts: see ``kdzoo.teachers.load_teacher``).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pickle
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from kdzoo import KDZooError
from kdzoo.errors import first_line

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


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def file_lock(path: str | Path, blocking: bool = True, on_wait: Callable[[], None] | None = None) -> Iterator[bool]:
    """Hold an OS lock (``flock``) on ``path`` for the ``with`` block; yields whether it was acquired (always
    True when ``blocking``, after calling ``on_wait()`` if another process holds it). A killed process
    releases it at once, so no stale lock is left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not blocking:
                yield False
                return
            if on_wait is not None:
                on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_writable_dir(path: str | Path, what: str) -> Path:
    """Create folder ``path`` if needed and prove that a file can be written in it; ``KDZooError`` naming
    ``what`` (e.g. "--out") otherwise. Called before training, so that no trained model is lost at the end."""
    path = Path(path)
    problem = None
    if path.exists() and not path.is_dir():
        problem = f"{path} is a file, not a folder"
    else:
        parent = next((p for p in [path, *path.parents] if p.exists()), None)
        if parent is not None and not parent.is_dir():
            problem = f"{parent} is a file, so {path} cannot be a folder below it"
    if problem is None:
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".kdzoo-write-check.", dir=path)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            problem = f"{path} cannot be written ({e.strerror or e})"
    if problem is not None:
        raise KDZooError(f"The {what} folder {path} cannot be used: {problem}. Pick another folder (or fix its "
                         "permissions); nothing has been trained yet.")
    return path


def _on_cpu(value: Any) -> Any:
    """``value`` with every tensor in it (in dicts, lists and tuples) on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_on_cpu(v) for v in value)
    return value


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint atomically. ``payload`` must hold only tensors and plain Python values.

    Tensors are stored on the CPU, so a checkpoint written on a GPU loads on a machine without
    one, even with a plain ``torch.load`` (no ``map_location``)."""
    payload = _on_cpu(payload)
    atomic_write(path, lambda tmp: torch.save({"format": FORMAT, **payload}, tmp))


def _refused_objects(message: str) -> str | None:
    """What torch's weights-only unpickler refused, from its error message: the globals it names
    (``os.system``, ``__main__.Payload``) or the unsupported instruction; None if it refused nothing.
    torch's own advice (loading with ``weights_only=False``, allow-listing globals) is left out:
    kdzoo never loads arbitrary objects."""
    if "Weights only load failed" not in message:
        return None
    names = list(dict.fromkeys(re.findall(r"GLOBAL ([\w.]+)", message)))
    if names:  # os.system pickles as posix.system (nt.system on Windows)
        return ", ".join(f"{n} (os.{n.split('.', 1)[1]})" if n.startswith(("posix.", "nt.")) else n for n in names)
    operand = re.search(r"Unsupported operand[^\n.]*", message)
    return operand.group(0).strip() if operand else "objects other than tensors and plain values"


@dataclass(frozen=True)
class Remedies:
    """What an error of :func:`load_payload` tells the user to do, by kind of file."""

    missing: str  # the file does not exist
    recreate: str  # it is truncated or corrupt: "re-create it with ..."
    holds: str  # the sentence on what such a file holds, before "and kdzoo loads nothing else"
    refused: str  # it holds code or objects: what to use instead


KDZOO_REMEDIES = Remedies(
    missing="Pass the checkpoint.pt written by `kdzoo train` (under its --out folder).",
    recreate="re-create it with `kdzoo train`",
    holds="A kdzoo checkpoint holds only tensors and plain Python values",
    refused="Use a checkpoint written by `kdzoo train` or `kdzoo distill`; if the file is your own, save only "
            "tensors and plain values in it.",
)


def load_payload(path: str | Path, map_location: str | torch.device = "cpu",
                 remedies: Remedies = KDZOO_REMEDIES) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain Python values only, never code. A missing,
    corrupt or non-PyTorch file, or one holding other objects (named, never loaded), is a ``KDZooError``
    whose fix is taken from ``remedies``."""
    path = Path(path)
    if not path.is_file():
        raise KDZooError(f"Checkpoint {path} does not exist. {remedies.missing}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _refused_objects(str(e))
        if refused is None:
            raise KDZooError(f"Checkpoint {path} cannot be read (UnpicklingError: {first_line(e)}). It is truncated "
                             f"or corrupt; {remedies.recreate}.") from e
        raise KDZooError(
            f"Checkpoint {path} contains code or objects that kdzoo will not load: {refused}. {remedies.holds}, and "
            "kdzoo loads nothing else, because unpickling other objects can run arbitrary code (nothing from this "
            f"file was run). {remedies.refused}"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise KDZooError(
            f"Checkpoint {path} cannot be read ({type(e).__name__}: {first_line(e)}). "
            f"It is truncated, corrupt, or not a PyTorch file; {remedies.recreate}."
        ) from e


def is_kdzoo_checkpoint(payload: Any) -> bool:
    """Whether a loaded file is a kdzoo checkpoint (it carries ``format: kdzoo.checkpoint/1``)."""
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", hint: str = "") -> dict[str, Any]:
    """Load a kdzoo checkpoint safely; ``KDZooError`` for a missing, corrupt or foreign file (``hint`` ends the
    message of a PyTorch file that is not a kdzoo checkpoint)."""
    ckpt = load_payload(path, map_location)
    if not is_kdzoo_checkpoint(ckpt):
        raise KDZooError(
            f"{Path(path)} is a PyTorch file but not a kdzoo checkpoint (no format '{FORMAT}'). "
            "Use a checkpoint written by `kdzoo train` or `kdzoo distill`." + (f" {hint}" if hint else "")
        )
    return ckpt
