"""The Method base class that every distillation loss plugin implements, and the builtin ``ce``.

Contract (see docs/writing-plugins.md):

* A method is an ``nn.Module``: its parameters (regressors, projection heads) are moved to the
  device, optimised with the student's optimizer and saved in the checkpoint with the student.
* Class attributes declare what it needs: ``needs_teacher``, ``needs_features`` (stage
  outputs) and ``needs_embedding`` (pooled pre-logit vector). The engine computes features
  and embeddings only when asked.
* ``defaults`` holds every hyperparameter with its published default, loss weights included
  (``w_ce``, ``w_kd``, ...; never a bare ``alpha``). Overrides are checked against it.
* It is built from ``NetInfo`` descriptions of the student and teacher.
* ``forward(student, teacher, labels)`` returns a dict of named loss terms, already weighted.
  The cross-entropy on the labels is one of them (``"ce"``, weighted by ``w_ce``). The engine
  minimises their sum and logs each term.
* The engine calls ``start_epoch(epoch, num_epochs)`` before each epoch (0-based), so a
  method can warm up or switch phases.
"""
from __future__ import annotations

import difflib
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kdzoo import KDZooError
from kdzoo.hookspecs import hookimpl
from kdzoo.models import NetInfo, Outputs

_RESERVED = set(dir(nn.Module)) | {"hparams", "epoch", "num_epochs", "label_smoothing", "student_info", "teacher_info"}


def suggest(name: str, choices: Any) -> str:
    """`` Did you mean 'x'?`` for the closest of ``choices``, or an empty string."""
    name, choices = str(name), [str(c) for c in choices]
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    close += [c for c in choices if c not in close and len(c) > 1 and (name.startswith(c) or c.startswith(name))][:2]
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def coerce_hparams(method_name: str, defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Merge ``overrides`` into ``defaults``, checking names and types. Raises ``KDZooError``."""
    out = dict(defaults)
    for key, value in overrides.items():
        if key not in defaults:
            raise KDZooError(
                f"Method '{method_name}' has no hyperparameter '{key}'.{suggest(key, defaults)} "
                f"Its hyperparameters are: {', '.join(sorted(defaults)) or '(none)'}."
            )
        default = defaults[key]
        ok = (
            isinstance(value, bool) if isinstance(default, bool)
            else isinstance(value, int) and not isinstance(value, bool) if isinstance(default, int)
            else isinstance(value, (int, float)) and not isinstance(value, bool) if isinstance(default, float)
            else default is None or isinstance(value, type(default))
        )
        if not ok:
            raise KDZooError(
                f"Hyperparameter '{key}' of method '{method_name}' must be {type(default).__name__} "
                f"(default {default!r}), got {value!r}. Fix the value in your config or --set."
            )
        out[key] = float(value) if isinstance(default, float) else value
    return out


class Method(nn.Module):
    """Base class of distillation methods. Subclasses set the class attributes and ``forward``."""

    name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = True
    needs_features: ClassVar[bool] = False
    needs_embedding: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = {"w_ce": 1.0}
    reference: ClassVar[str] = ""  # where the definition comes from

    def __init__(self, student: NetInfo, teacher: NetInfo | None = None, **hparams: Any) -> None:
        super().__init__()
        if self.needs_teacher and teacher is None:
            raise KDZooError(f"Method '{self.name}' distils from a teacher, but none was given.")
        self.student_info = student
        self.teacher_info = teacher
        self.hparams = coerce_hparams(self.name, self.defaults, hparams)
        for key, value in self.hparams.items():
            if key in _RESERVED:  # a plugin bug, not a user error
                raise TypeError(f"{type(self).__name__}: hyperparameter name {key!r} shadows an nn.Module attribute")
            setattr(self, key, value)
        self.epoch = 0
        self.num_epochs = 1
        self.label_smoothing = 0.0

    def start_epoch(self, epoch: int, num_epochs: int) -> None:
        """Called by the engine before each epoch (0-based)."""
        self.epoch = epoch
        self.num_epochs = num_epochs

    def ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on the labels, with the recipe's label smoothing (unweighted)."""
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)

    def forward(self, student: Outputs, teacher: Outputs | None, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.hparams.items())


class CrossEntropy(Method):
    """The baseline: cross-entropy on the labels only. Trains teachers too."""

    name = "ce"
    needs_teacher = False
    defaults = {"w_ce": 1.0}
    reference = "Plain supervised training."

    def forward(self, student: Outputs, teacher: Outputs | None, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"ce": self.w_ce * self.ce(student.logits, labels)}


@hookimpl
def register_methods(register):
    register(CrossEntropy)
