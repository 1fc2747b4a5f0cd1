"""Run observers: experiment trackers (TensorBoard, MLflow, ...) that follow runs, from plugins.

An observer is a subclass of :class:`Observer` that a plugin registers with the
``register_observers`` hook; a run chooses observers by name (``--log NAME``, ``loggers:`` in a
config or benchmark file). Contract, per run:

* kdzoo makes one instance per run and observer (a cohort's runs each get their own) and calls
  ``start(run)`` once, ``epoch(epoch, metrics)`` after each epoch (``metrics``: the numbers the
  epoch's record in ``metrics.json``'s history holds, flattened by :func:`epoch_metrics`),
  ``artifact(path)`` for each file the run writes, and ``end(result)`` once (also when training
  stops with an error or an interruption: ``result["status"] == "failed"``).
* A resumed run calls ``start`` again in the new process, with ``run.start_epoch`` epochs already
  done, and replays those epochs' ``epoch`` calls from the saved history first.
* Every call is wrapped (:class:`ObserverSet`): an observer that raises is reported once, naming it
  and the error, and gets no further calls for that run; training and its results are unchanged.
* Observers are never part of a run's identity: run ids, cohort ids and results do not depend on them.
* ``Options`` (a dataclass) declares an observer's settings, the other keys of a ``loggers:``
  entry (``{name: mlflow, tracking_uri: ...}``), parsed like every config (:func:`kdzoo.config.parse`).
  ``check(options)`` runs at validation, before any training: it imports what the observer needs
  and raises :class:`kdzoo.KDZooError` naming the pip command when that is missing.

:class:`ObservedProgress` bridges the engine's :class:`kdzoo.engine.Progress` calls to the observers.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Mapping, Sequence

from kdzoo import KDZooError
from kdzoo.config import parse
from kdzoo.engine import Progress

if TYPE_CHECKING:
    from kdzoo.engine import Member
    from kdzoo.plugins import Registry


class ObserverWarning(UserWarning):
    """An observer failed; the run went on without it (the default report when no ``report`` is given)."""


@dataclass
class RunInfo:
    """What an observer's ``start`` learns about its run."""

    run_id: str  # a benchmark's run id; for `kdzoo train`/`distill`, the name of the run's folder
    name: str  # a readable name, e.g. "kd(T=4) resnet56 → resnet20 s0"
    method: str
    hparams: dict[str, Any]  # the method's hyperparameters, defaults applied
    student: str  # the student model
    teacher: str | None  # the teacher model; None when training without one (method ce)
    seed: int
    folder: Path  # the run's own folder: per-run files go here (TensorBoard: folder / "tensorboard")
    results_dir: Path  # the folder that holds this and related runs (MLflow's default store: results_dir / "mlruns")
    config: dict[str, Any] = field(default_factory=dict)  # the run's (or benchmark's) resolved configuration
    experiment: str = "kdzoo"  # a grouping name: the benchmark's name, "kdzoo" for single runs
    cohort_id: str | None = None  # the benchmark cohort it trains in
    start_epoch: int = 0  # epochs already done before this process (a resumed run)


@dataclass
class NoOptions:
    """The options of an observer that has none."""


class Observer:
    """Follows one run; subclass it and register the class with ``register_observers``.

    Every method is optional; the base class ignores everything. See the module docstring.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""  # a few words for `kdzoo plugins`
    Options: ClassVar[type] = NoOptions  # a dataclass: the keys of a `loggers:` entry besides `name`

    def __init__(self, options: Any) -> None:
        self.options = options

    @classmethod
    def check(cls, options: Any) -> None:
        """Before any training: raise ``KDZooError`` if this observer cannot work here (a missing package:
        say the pip command), or with these options."""

    def start(self, run: RunInfo) -> None: ...
    def epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """``epoch``: 1-based, counted over the run (an init stage's epochs first)."""
    def artifact(self, path: Path) -> None: ...
    def end(self, result: dict[str, Any]) -> None:
        """``result``: the run's result (``metrics.json``): ``status`` ("ok" or "failed"), ``error``,
        ``last`` and ``best`` metrics when some epoch finished."""


@dataclass(frozen=True)
class ObserverSpec:
    """One resolved ``loggers:`` entry: the observer class and its parsed options."""

    name: str
    cls: type[Observer]
    options: Any


def merge_loggers(configured: Sequence[Any], names: Iterable[str]) -> list[Any]:
    """``configured`` (a config's ``loggers:``) plus each of ``names`` (``--log NAME``) not already in it."""
    have = {e if isinstance(e, str) else e.get("name") if isinstance(e, dict) else None for e in configured}
    out = list(configured)
    for name in names:
        if name not in have:
            out.append(name)
            have.add(name)
    return out


def resolve_observers(registry: Registry, loggers: Sequence[Any], path: str = "loggers") -> list[ObserverSpec]:
    """Validate a ``loggers:`` list (names, or mappings with ``name`` and the observer's options) and run
    each observer's ``check``; ``KDZooError`` naming the entry. Call it before training."""
    if not isinstance(loggers, (list, tuple)):
        raise KDZooError(f"{path} must be a list of observer names or mappings, got {loggers!r}.")
    specs: list[ObserverSpec] = []
    for i, entry in enumerate(loggers):
        where = f"{path}[{i}]"
        if isinstance(entry, str):
            name, options = entry, {}
        elif isinstance(entry, dict):
            if not isinstance(entry.get("name"), str):
                raise KDZooError(f"{where} needs `name:` (an observer, e.g. tensorboard or mlflow), got {entry!r}.")
            name, options = entry["name"], {k: v for k, v in entry.items() if k != "name"}
        else:
            raise KDZooError(f"{where} must be an observer name or a mapping with `name:`, got {entry!r}.")
        if any(s.name == name for s in specs):
            raise KDZooError(f"{where}: observer '{name}' is listed twice; list it once (with its options).")
        cls = registry.observer(name)
        parsed = parse(cls.Options, options, where)
        try:
            cls.check(parsed)
        except KDZooError as e:
            raise KDZooError(f"{where} ({name}): {e}") from e
        specs.append(ObserverSpec(name, cls, parsed))
    return specs


def epoch_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """An epoch record of ``metrics.json``'s history as flat numbers: ``loss/ce``, ``test/top1``,
    ``val/top1``, ``lr``, ``train_img_per_s``...; an init-stage epoch's keys start with ``init/``.
    The record's ``epoch`` and ``stage`` are left out (the epoch is ``epoch()``'s argument)."""
    prefix = "init/" if record.get("stage") == "init" else ""
    out: dict[str, float] = {}

    def walk(values: Mapping[str, Any], at: str) -> None:
        for key, value in values.items():
            if isinstance(value, Mapping):
                walk(value, f"{at}{key}/")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{prefix}{at}{key}"] = float(value)

    walk({k: v for k, v in record.items() if k not in ("epoch", "stage")}, "")
    return out


def final_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """A result's ``last`` and ``best`` metrics, flat: ``last/top1``, ``best/top1``, ``best/epoch``..."""
    return {f"{part}/{k}": float(v) for part in ("last", "best") for k, v in (result.get(part) or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _warn(message: str) -> None:
    warnings.warn(message, ObserverWarning, stacklevel=3)


class ObserverSet:
    """The observers of one run. Every call is guarded: an observer that raises (or whose constructor
    does) is reported once through ``report`` and disabled for the rest of the run."""

    def __init__(self, specs: Sequence[ObserverSpec], run: RunInfo,
                 report: Callable[[str], None] | None = None) -> None:
        self.specs, self.run = list(specs), run
        self.report = report or _warn
        self.observers: dict[str, Observer] = {}
        self.failed: dict[str, str] = {}  # observer name -> what it raised
        self.started = self.ended = False

    @property
    def active(self) -> list[str]:
        return list(self.observers)

    def _call(self, name: str, what: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as e:  # an observer must never stop training
            error = f"{type(e).__name__}: {e}"
            self.failed[name] = error
            self.observers.pop(name, None)
            self.report(f"observer '{name}' failed in {what} for run {self.run.name} ({error}); it is off for the "
                        "rest of this run, and the run goes on (its results do not depend on observers).")

    def _each(self, what: str, call: Callable[[Observer], Any]) -> None:
        for name, observer in list(self.observers.items()):
            self._call(name, what, lambda o=observer: call(o))

    def start(self, start_epoch: int = 0, history: Sequence[Mapping[str, Any]] = ()) -> None:
        """Make the observers and start them; replay the ``history`` records of the epochs already done."""
        self.run.start_epoch = start_epoch
        for spec in self.specs:
            if spec.name in self.observers or spec.name in self.failed:
                continue

            def make(spec: ObserverSpec = spec) -> None:
                self.observers[spec.name] = spec.cls(spec.options)

            self._call(spec.name, "its constructor", make)
        self._each("start()", lambda o: o.start(self.run))
        self.started = True
        for i, record in enumerate(history[:start_epoch]):
            self.epoch(i + 1, record)

    def epoch(self, epoch: int, record: Mapping[str, Any]) -> None:
        metrics = epoch_metrics(record)
        self._each(f"epoch({epoch})", lambda o: o.epoch(epoch, dict(metrics)))

    def artifact(self, path: str | Path) -> None:
        self._each(f"artifact({Path(path).name})", lambda o: o.artifact(Path(path)))

    def end(self, result: Mapping[str, Any]) -> None:
        """End every observer once (later calls do nothing)."""
        if self.ended:
            return
        self.ended = True
        self._each("end()", lambda o: o.end(dict(result)))
        self.observers.clear()


class ObservedProgress(Progress):
    """Forwards every progress call to ``inner``, and each run's epoch record to that run's observers.

    ``runs`` maps a cohort member's label to its :class:`ObserverSet`; ``members`` (the cohort's) give
    the saved history to replay when training resumes (``run_start`` with ``start_epoch > 0``). The
    observers start at ``run_start``; the caller ends them (``ObserverSet.end``) with the run's result.
    """

    def __init__(self, inner: Progress | None, runs: Mapping[str, ObserverSet],
                 members: Sequence[Member] = ()) -> None:
        self.inner = inner or Progress()
        self.runs = dict(runs)
        self.members = list(members)

    def run_start(self, labels: list[str], epochs: int, steps_per_epoch: int, start_epoch: int = 0) -> None:
        self.inner.run_start(labels, epochs, steps_per_epoch, start_epoch)
        history = {m.label: m.history for m in self.members}  # read now: resuming replaces the lists
        for label, observers in self.runs.items():
            observers.start(start_epoch, history.get(label, ()))

    def step(self, images: int) -> None:
        self.inner.step(images)

    def epoch_end(self, epoch: int, records: dict[str, dict[str, Any]]) -> None:
        self.inner.epoch_end(epoch, records)
        for label, record in records.items():
            if label in self.runs:
                self.runs[label].epoch(epoch + 1, record)

    def run_end(self) -> None:
        self.inner.run_end()

    def runs_done(self, n: int) -> None:
        self.inner.runs_done(n)

    def end_all(self, error: BaseException) -> None:
        """End the observers of runs that training left unfinished (an exception, an interruption)."""
        why = "interrupted" if isinstance(error, KeyboardInterrupt) else f"{type(error).__name__}: {error}"
        for observers in self.runs.values():
            observers.end({"status": "failed", "error": why})
