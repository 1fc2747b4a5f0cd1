"""Configuration: YAML (or CLI options) → validated dataclasses, with errors that name the field.

``parse(cls, mapping, path)`` checks every key against the dataclass fields (suggesting close
matches for unknown keys) and every value against the field's type, and reports the dotted
path of the offending field, e.g. ``recipe.lr``.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kdzoo import KDZooError
from kdzoo.errors import suggest

T = TypeVar("T")


@dataclass
class DataConfig:
    """Which dataset (a plugin: `kdzoo datasets`), where it comes from, and which part of it is used."""

    dataset: str = "cifar10"
    options: dict[str, Any] = field(default_factory=dict)  # the dataset plugin's own options
    source: str = "auto"  # "auto" (the dataset's default, e.g. KDZOO_DATA for cifar10), "download", or a path
    root: str | None = None  # download/cache folder (default: $KDZOO_CACHE or ~/.cache/kdzoo)
    train_size: int | None = None  # stratified, seeded subset; None = all 50,000
    test_size: int | None = None  # None = all 10,000
    val_size: int = 0  # held out of the training set, stratified
    subset_seed: int = 0
    placement: str = "auto"  # where the images live on a GPU run: "auto", "device" or "host" (kdzoo.data)


@dataclass
class Recipe:
    """How a network is trained. Defaults follow RepDistiller's CIFAR recipe, with a cosine schedule."""

    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    wd_on_bn_bias: bool = True  # RepDistiller decays every parameter; False exempts BN and biases
    schedule: str = "cosine"  # "cosine", "multistep", "onecycle" or "constant"
    milestones: list[int] = field(default_factory=list)  # multistep, in epochs
    gamma: float = 0.1  # multistep factor
    warmup_epochs: float = 0.0  # linear warm-up (cosine/multistep)
    flip: str = "random"  # "random" or "alternating" (airbench: epoch 0 random, then its complement every odd epoch)
    label_smoothing: float = 0.0  # off by default: KD from smoothed teachers is worse (Müller et al., 2019)
    channels_last: bool = True
    compile: bool = False  # torch.compile the student
    autocast: str = "auto"  # "auto": bf16 where it is native and faster (kdzoo/precision.py), else float32; "off"; "bf16"
    # 128: on a 2-core EPYC evaluation ran 1.6-2.2x faster per image than at 1000 (activations stay in cache)
    eval_batch_size: int = 128

    def validate(self, path: str = "recipe") -> None:
        choices = {"schedule": ("cosine", "multistep", "onecycle", "constant"), "autocast": ("auto", "off", "bf16"),
                   "flip": ("random", "alternating")}
        for key, allowed in choices.items():
            value = getattr(self, key)
            if value not in allowed:
                raise KDZooError(
                    f"{path}.{key} is '{value}', which is not one of {', '.join(allowed)}.{suggest(value, allowed)}"
                )
        for f in dataclasses.fields(self):  # a Recipe built in code skips parse()'s check
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise KDZooError(f"{path}.{f.name} must be a finite number, got {value!r}.")
        for key in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise KDZooError(f"{path}.{key} must be at least 1, got {getattr(self, key)}.")
        if self.lr <= 0:
            raise KDZooError(f"{path}.lr must be positive, got {self.lr}.")
        if not 0 <= self.label_smoothing < 1:
            raise KDZooError(f"{path}.label_smoothing must be in [0, 1), got {self.label_smoothing}.")
        if any(not 0 < m <= self.epochs for m in self.milestones):
            raise KDZooError(f"{path}.milestones {self.milestones} must lie within 1..epochs ({self.epochs}).")
        if self.milestones != sorted(set(self.milestones)):
            twice = sorted({m for m in self.milestones if self.milestones.count(m) > 1})
            problem = (f"lists epoch {twice[0]} more than once, which would multiply the learning rate by "
                       f"gamma={self.gamma} once per entry (for a larger drop, lower gamma)" if twice
                       else "is not in increasing order")
            raise KDZooError(f"{path}.milestones {self.milestones} {problem}. List each epoch once, in increasing "
                             f"order: {sorted(set(self.milestones))}.")
        if self.schedule == "multistep" and not self.milestones:
            raise KDZooError(
                f"{path}.schedule is multistep but {path}.milestones is empty, so the learning rate would never "
                f"change. Give the epochs at which it is multiplied by gamma={self.gamma} (e.g. milestones: "
                f"[150, 180, 210] for 240 epochs), or use schedule: constant."
            )


@dataclass
class RunConfig:
    """One `kdzoo train` or `kdzoo distill` run."""

    model: str = ""
    model_options: dict[str, Any] = field(default_factory=dict)
    method: str = "ce"
    hparams: dict[str, Any] = field(default_factory=dict)
    teacher: str | None = None  # a teacher checkpoint: kdzoo's (`kdzoo train`), or another format (teacher_format)
    teacher_format: str = "kdzoo"  # "kdzoo", or a format from a plugin (repdistiller, mdistiller, torchdistill)
    teacher_model: str | None = None  # the kdzoo network of a foreign checkpoint (a kdzoo one records its own)
    teacher_pretrained: str | None = None  # instead of `teacher`: published weights (e.g. torchdistill) of teacher_model
    seed: int = 0
    device: str = "auto"  # "auto" = cuda if available, else cpu
    out: str = "runs/latest"
    data: DataConfig = field(default_factory=DataConfig)
    recipe: Recipe = field(default_factory=Recipe)
    # run observers (experiment trackers): names or {name: mlflow, <its options>}; never part of the result
    loggers: list[Any] = field(default_factory=list)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return origin.__name__
    return {"NoneType": "null", "str": "a string", "int": "an integer", "float": "a number", "bool": "true/false"}.get(
        getattr(tp, "__name__", str(tp)), getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, path: str, fix: str = " Fix this value in your config.") -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, path, fix)
            except KDZooError:
                continue
    elif tp is Any:
        return value
    elif tp is type(None):
        if value is None:
            return None
    elif dataclasses.is_dataclass(tp):
        return parse(tp, value, path, fix=fix)
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(tp)
            return [_coerce(v, item, f"{path}[{i}]", fix) for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # YAML .nan/.inf, --lr nan: refused here, never trained on
                raise KDZooError(f"{path} must be a finite number, got {value!r}.{fix}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise KDZooError(f"{path} must be {_type_name(tp)}, got {value!r}.{fix}")


def parse(cls: type[T], mapping: Any, path: str = "", *, fix: str = " Fix this value in your config.") -> T:
    """Build dataclass ``cls`` from a mapping, validating keys and types. Raises ``KDZooError``.

    ``fix`` ends a wrong-type message (records read from a results folder say nothing of configs)."""
    where = path or "the config"
    if not isinstance(mapping, dict):
        raise KDZooError(f"{where} must be a mapping of keys to values, got {mapping!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in mapping.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise KDZooError(
                f"Unknown key '{full}'.{suggest(key, fields)} Valid keys{' under ' + path if path else ''}: "
                f"{', '.join(fields)}."
            )
        kwargs[key] = _coerce(value, hints[key], full, fix)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise KDZooError(f"{where} is missing the required key '{missing[0]}'.")
    return cls(**kwargs)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Load a YAML mapping with ``yaml.safe_load``; clear errors for a missing or malformed file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise KDZooError(f"Cannot read config file {p}: {e.strerror or e}. Check the path.") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise KDZooError(f"Config file {p} is not valid YAML{at}: {getattr(e, 'problem', e)}.") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KDZooError(f"Config file {p} must hold a mapping (key: value lines), not {type(data).__name__}.")
    return data


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"T=2"`` → ``("T", 2)``; the value is read as YAML (numbers, booleans, lists)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise KDZooError(f"--set expects KEY=VALUE (e.g. --set T=2), got '{text}'.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


@dataclass
class TeacherSpec:
    """A benchmark teacher: a model trained with the teacher recipe, a checkpoint (kdzoo's, or in a ``format``
    that a plugin reads: repdistiller, mdistiller, torchdistill), or the ``pretrained`` weights that such a
    format's plugin publishes (``pretrained: torchdistill``)."""

    model: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    format: str = "kdzoo"  # the checkpoint's format: kdzoo's own, or a registered one (`kdzoo plugins --json`)
    pretrained: str | None = None  # a format whose plugin downloads published weights of `model` (no checkpoint:)
    seed: int = 0
    recipe: dict[str, Any] = field(default_factory=dict)  # overrides on top of recipe + teacher_recipe


@dataclass
class StudentSpec:
    model: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReferenceRow:
    teacher: str
    student: str
    values: dict[str, Any] = field(default_factory=dict)  # method/variant (or "teacher") -> number


@dataclass
class Reference:
    """Published numbers to show beside ours."""

    source: str
    metric: str = "top1"  # "top1" (accuracy, %) or "error" (test error, %)
    rows: list[ReferenceRow] = field(default_factory=list)


@dataclass
class BenchConfig:
    """A benchmark file: teachers × students × methods × seeds on one dataset (``data.dataset``).

    ``teachers`` and ``students`` entries may be a model name or a mapping; ``methods`` entries
    may be a name or a mapping with ``name`` plus hyperparameters, where a list value is a
    sweep (``T: [2, 4, 8]`` expands into three runs).
    """

    name: str = "benchmark"
    description: str = ""
    teachers: list[Any] = field(default_factory=list)
    students: list[Any] = field(default_factory=list)
    methods: list[Any] = field(default_factory=list)
    pairs: list[list[str]] | None = None  # [[teacher, student], ...]; default: every combination
    seeds: list[int] = field(default_factory=lambda: [0])
    data: DataConfig = field(default_factory=DataConfig)
    recipe: Recipe = field(default_factory=Recipe)
    teacher_recipe: dict[str, Any] = field(default_factory=dict)  # overrides for teachers
    student_recipe: dict[str, Any] = field(default_factory=dict)  # overrides for students
    cohorts: bool = True  # train runs that share (teacher, seed) together, across students
    # at most this many runs per cohort (None: no cap): smaller cohorts fit a smaller GPU, and more of them give
    # Ray more tasks to spread over GPUs; results are identical either way (not in run ids)
    cohort_size: int | None = None
    # keep the teacher's training logits on disk for later cohorts of logit-only methods (kdzoo.logit_cache); on
    # anyway where a (teacher, seed) has several cohorts (cohorts: false, cohort_size); not in run ids
    cache_teacher_logits: bool = False
    device: str = "auto"
    reference: Reference | None = None
    # run observers for every run (kdzoo.observers): names or {name: mlflow, <its options>}; not in run ids
    loggers: list[Any] = field(default_factory=list)
