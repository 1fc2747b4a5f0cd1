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
* Loss weights are ``>= 0`` unless named in ``signed_weights``; every hyperparameter is finite.
* Validation calls ``validate_batch_size(batch_size)`` before any training, with each training
  batch size the run will see, so a method that cannot work at a size refuses it up front.
* A method that cannot serve a teacher/student pair at all (FSP needs equal channel counts)
  raises :class:`PairNotSupported` from ``__init__``: the benchmark marks that cell n/a and runs
  the rest.

Optional parts of the contract, each off by default (see docs/writing-plugins.md):

* ``needs_preact``: ``Outputs.preact``, the pre-activation stage outputs (backbones declare them
  in ``feature_info``: see :mod:`kdzoo.models`); ``needs_stem``: ``Outputs.stem``.
* ``needs_indices``: ``forward`` gets ``indices=``, the training-set indices of the batch's
  samples. ``needs_train_labels``: ``bind_train_set(labels)`` is called once before training with
  the labels of the whole training set (its size is ``len(labels)``).
* ``needs_teacher_net``: ``bind_teacher(net)`` is called once before training with the teacher
  network (eval mode, no gradients), to derive constants from it. It must not be changed or kept
  as a submodule.
* ``pair_defaults``: hyperparameters that the reference code sets per (teacher, student) pair;
  they override ``defaults`` for that pair, and the user's settings override both.
* ``has_init_stage``: an init stage of ``init_epochs`` epochs (or ``init_fraction`` of the
  recipe's) runs before the main stage; it minimises ``init_forward``'s terms over
  ``init_parameters(student)`` only, with its own SGD at a constant learning rate (``init_lr``, or
  the recipe's when 0).
* ``family``: "logits", "features" or "relation", for listings.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Collection

import torch
import torch.nn.functional as F
from torch import nn

from kdzoo import KDZooError
from kdzoo.errors import suggest  # also importable from here, as before
from kdzoo.hookspecs import hookimpl
from kdzoo.models import NetInfo, Outputs

_RESERVED = set(dir(nn.Module)) | {"hparams", "epoch", "num_epochs", "label_smoothing", "student_info", "teacher_info"}
_RESERVED |= {"signed_weights", "validate_batch_size", "start_epoch", "ce", "family", "pair_defaults",
              "bind_train_set", "bind_teacher", "init_forward", "init_parameters", "num_init_epochs",
              "needs_teacher", "needs_features", "needs_embedding", "needs_preact", "needs_stem", "needs_indices",
              "needs_train_labels", "needs_teacher_net", "has_init_stage", "init_uses_student", "resolve_defaults"}
#: Hyperparameters the base class interprets for methods with an init stage (``has_init_stage``).
#: ``init_lr`` 0 means the recipe's learning rate.
INIT_STAGE_DEFAULTS = {"init_epochs": 0, "init_fraction": 30 / 240, "init_lr": 0.0}
FAMILIES = ("logits", "features", "relation")


class PairNotSupported(KDZooError):
    """Raised by a method's ``__init__`` when it cannot serve this teacher/student pair at all (say which
    and why). A benchmark marks the cell n/a and trains the rest; ``kdzoo distill`` stops with it."""

# Names papers and other libraries use for kdzoo's hyperparameters, for "Did you mean" in errors.
_ALIASES = {"temperature": "T", "temp": "T", "tau": "T"}
_AMBIGUOUS_WEIGHTS = ("alpha", "beta")  # opposite meanings in different papers; kdzoo names weights w_<term>


def _unknown_hint(key: str, defaults: dict[str, Any]) -> str:
    """Suggest by meaning (``temperature`` → ``T``; ``alpha`` → the ``w_*`` weights), else by spelling."""
    alias = _ALIASES.get(key.lower())
    if alias in defaults:
        return f" Did you mean '{alias}'? kdzoo calls the {key} '{alias}'."
    if key.lower() in _AMBIGUOUS_WEIGHTS:
        weights = [k for k in defaults if k.startswith("w_")]
        hint = (f" kdzoo never uses a bare '{key}', because papers give it opposite meanings; set the loss "
                f"weights directly: {', '.join(weights)}.")
        if key.lower() == "alpha" and {"w_ce", "w_kd"} <= set(defaults):
            hint += (" The seed article's alpha * hard + (1 - alpha) * soft is w_ce = alpha, w_kd = 1 - alpha "
                     "(alpha=0.1: --set w_ce=0.1 --set w_kd=0.9); RepDistiller's alpha is w_kd.")
        return hint
    return suggest(key, defaults)


def _finite(value: Any) -> bool:
    """False if ``value`` is, or holds (in lists and mappings), a NaN or infinite float."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


def coerce_hparams(method_name: str, defaults: dict[str, Any], overrides: dict[str, Any],
                   signed_weights: Collection[str] = frozenset()) -> dict[str, Any]:
    """Merge ``overrides`` into ``defaults``, checking names, types, finiteness and the sign of loss
    weights (``w_*`` must be ``>= 0`` unless named in ``signed_weights``). Raises ``KDZooError``."""
    out = dict(defaults)
    for key, value in overrides.items():
        if key not in defaults:
            raise KDZooError(
                f"Method '{method_name}' has no hyperparameter '{key}'.{_unknown_hint(key, defaults)} "
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
        if not _finite(value):
            raise KDZooError(
                f"Hyperparameter '{key}' of method '{method_name}' must be a finite number, got {value!r}. "
                "Fix the value in your config or --set."
            )
        if (key.startswith("w_") and isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0
                and key not in signed_weights):
            raise KDZooError(
                f"Loss weight '{key}' of method '{method_name}' is {value!r}, but loss weights must be >= 0: "
                f"training minimises the sum of the weighted terms, so a negative weight would maximise the "
                f"'{key[2:]}' term instead. Use a value >= 0 (0 switches the term off)."
            )
        out[key] = float(value) if isinstance(default, float) else value
    return out


def feature_parameters(student: nn.Module) -> list[nn.Parameter]:
    """The student's parameters except its classifier's (RepDistiller's ``get_feat_modules``): what
    AB's and FSP's init stages train. ``student`` is a :class:`~kdzoo.models.KDNet` or a timm model."""
    model = getattr(student, "model", student)
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    skip = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    return [p for p in student.parameters() if id(p) not in skip]


class Method(nn.Module):
    """Base class of distillation methods. Subclasses set the class attributes and ``forward``."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""  # "logits", "features" or "relation" (listings group by it)
    needs_teacher: ClassVar[bool] = True
    needs_features: ClassVar[bool] = False
    needs_embedding: ClassVar[bool] = False
    needs_preact: ClassVar[bool] = False  # Outputs.preact: pre-activation stage outputs
    needs_stem: ClassVar[bool] = False  # Outputs.stem: the stem's output (the first feature_info entry)
    needs_indices: ClassVar[bool] = False  # forward(..., indices=...): the samples' training-set indices
    needs_train_labels: ClassVar[bool] = False  # bind_train_set(labels) once before training
    needs_teacher_net: ClassVar[bool] = False  # bind_teacher(net) once before training
    has_init_stage: ClassVar[bool] = False  # init_forward over init_parameters before the main stage
    init_uses_student: ClassVar[bool] = True  # False: the init stage needs no student forward (FT)
    defaults: ClassVar[dict[str, Any]] = {"w_ce": 1.0}
    pair_defaults: ClassVar[dict[tuple[str, str], dict[str, Any]]] = {}  # (teacher, student) -> overrides
    reference: ClassVar[str] = ""  # where the definition comes from
    signed_weights: ClassVar[frozenset[str]] = frozenset()  # loss weights (w_* names) that may be negative

    def __init__(self, student: NetInfo, teacher: NetInfo | None = None, **hparams: Any) -> None:
        super().__init__()
        if self.needs_teacher and teacher is None:
            raise KDZooError(f"Method '{self.name}' distils from a teacher, but none was given.")
        self.student_info = student
        self.teacher_info = teacher
        self.hparams = coerce_hparams(self.name, self.defaults, hparams, self.signed_weights)
        for key, value in self.hparams.items():
            if key in _RESERVED:  # a plugin bug, not a user error
                raise TypeError(f"{type(self).__name__}: hyperparameter name {key!r} shadows a Method or nn.Module attribute")
            setattr(self, key, value)
        self.epoch = 0
        self.num_epochs = 1
        self.label_smoothing = 0.0
        if self.has_init_stage:
            missing = sorted(INIT_STAGE_DEFAULTS.keys() - self.hparams.keys())
            if missing:  # a plugin bug, not a user error
                raise TypeError(f"{type(self).__name__} has an init stage: add {missing} to its defaults "
                                "(kdzoo.methods.INIT_STAGE_DEFAULTS)")
            if self.init_epochs < 0 or not 0 <= self.init_fraction <= 1 or self.init_lr < 0:
                raise KDZooError(
                    f"Method '{self.name}': init_epochs must be >= 0 (0: use init_fraction), init_fraction in "
                    f"[0, 1] and init_lr >= 0 (0: the recipe's lr), got init_epochs={self.init_epochs}, "
                    f"init_fraction={self.init_fraction}, init_lr={self.init_lr}.")

    @classmethod
    def resolve_defaults(cls, teacher: str | None, student: str | None) -> dict[str, Any]:
        """``defaults`` with the pair's ``pair_defaults`` applied. A key names a model as kdzoo does
        (``resnet56``, ``vgg13_cifar``); a given name with a ``_cifar`` suffix also matches the key
        without it (``resnet56_cifar`` is ``resnet56``), never the other way round (timm's ImageNet
        ``vgg13`` is not ``vgg13_cifar``)."""
        def names(name: str | None) -> set[str | None]:
            return {name, name[: -len("_cifar")]} if name and name.endswith("_cifar") else {name}
        out = dict(cls.defaults)
        for (t, s), values in cls.pair_defaults.items():
            if t in names(teacher) and s in names(student):
                out.update(values)
        return out

    def num_init_epochs(self, main_epochs: int) -> int:
        """Epochs of the init stage before ``main_epochs`` of the main one (0: no init stage)."""
        if not self.has_init_stage:
            return 0
        if self.init_epochs > 0:
            return int(self.init_epochs)
        return max(1, round(self.init_fraction * main_epochs)) if self.init_fraction > 0 else 0

    def init_parameters(self, student: nn.Module) -> list[nn.Parameter]:
        """The parameters the init stage trains: this method's own, plus any of ``student`` it returns."""
        return list(self.parameters())

    def init_forward(self, student: Outputs | None, teacher: Outputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The init stage's weighted loss terms (``student`` is None when ``init_uses_student`` is False)."""
        raise NotImplementedError(f"{type(self).__name__} sets has_init_stage but defines no init_forward")

    def bind_train_set(self, labels: torch.Tensor) -> None:
        """Called once before training (``needs_train_labels``) with the labels (int64, CPU) of every
        training sample, in the order of the indices ``forward`` receives."""

    def bind_teacher(self, net: nn.Module) -> None:
        """Called once before training (``needs_teacher_net``) with the teacher network (a KDNet in eval
        mode). Derive constants (buffers) from it; do not modify it or keep it as a submodule."""

    def start_epoch(self, epoch: int, num_epochs: int) -> None:
        """Called by the engine before each epoch (0-based)."""
        self.epoch = epoch
        self.num_epochs = num_epochs

    def validate_batch_size(self, batch_size: int) -> None:
        """Called before any training with each training batch size the run will see (a recipe's
        ``batch_size``, or the whole training set when it is smaller). Raise ``KDZooError`` saying
        which sizes work if this method cannot train on batches of ``batch_size``. Accepts all here."""

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
