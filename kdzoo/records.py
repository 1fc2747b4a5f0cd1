"""The records a benchmark folder holds, each with one typed definition, written and read through it.

* :class:`TeacherRecord` (schema ``kdzoo.teacher/1``): a benchmark's teacher, trained here (and
  cached in ``$KDZOO_CACHE/teachers/<key>/metrics.json``) or given as a checkpoint.
  Stored as ``runs/teacher-<key>.json``.
* :class:`RunRecord` (``kdzoo.run/2``): one finished or failed student run, ``runs/<run_id>.json``.
* :class:`BenchRecord` (``kdzoo.bench/2``): the resolved benchmark, ``bench.json``; enough for
  ``kdzoo report`` to lay out the table without the YAML.

``load_record(path)`` and ``BenchRecord.load(path)`` validate a file against its schema (keys,
types, finite numbers, the status and its metrics) and raise :class:`RecordError`, naming the
file and what is wrong with it, for anything else. Nothing is read as a plain dict.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from kdzoo import KDZooError
from kdzoo.config import parse

TEACHER_SCHEMA = "kdzoo.teacher/1"
RUN_SCHEMA = "kdzoo.run/2"
BENCH_SCHEMA = "kdzoo.bench/2"
STATUSES = ("ok", "failed")


class RecordError(KDZooError):
    """A file in a results folder (or the teacher cache) that is not a valid record."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path} is not a valid kdzoo record: {problem}")


@dataclass
class Scores:
    """Test metrics of one epoch, in percent (``agreement``: top-1 agreement with the teacher)."""

    top1: float
    top5: float | None = None
    precision: float | None = None
    recall: float | None = None
    f1: float | None = None
    agreement: float | None = None


@dataclass
class BestEpoch(Scores):
    """The best epoch's test metrics; ``chosen_on`` is the split that chose it ("val" or "test")."""

    epoch: int = 0
    chosen_on: str = "test"


@dataclass
class TeacherRef:
    """What a student run records about the teacher it distilled from."""

    model: str
    key: str
    top1: float | None = None
    best_top1: float | None = None
    params: int | None = None


@dataclass
class TeacherRecord:
    """A benchmark's teacher. ``source`` is "trained" (here, then cached) or "checkpoint" (given by the user);
    a checkpoint teacher's accuracy is the one its checkpoint recorded, if any (a checkpoint in another code base's
    format records none for this data: its accuracy is measured on the benchmark's test split)."""

    run_id: str
    key: str
    model: str
    seed: int
    status: str
    source: str
    error: str | None = None
    checkpoint: str | None = None
    params: int | None = None
    last: Scores | None = None
    best: BestEpoch | None = None
    epochs_done: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: float | None = None
    img_per_s: float | None = None
    recipe: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    environment: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)  # what the key hashed: plugin versions, checkpoint sha256
    schema: str = TEACHER_SCHEMA

    kind = "teacher"

    def check(self) -> None:
        _check_status(self.status, self.error)
        if self.source not in ("trained", "checkpoint"):
            raise ValueError(f"source is '{self.source}', not 'trained' or 'checkpoint'")
        if self.status == "ok" and self.source == "trained" and (self.last is None or self.best is None):
            raise ValueError("a finished teacher run has no last- or best-epoch metrics")


@dataclass
class RunRecord:
    """One student run of a benchmark: a teacher → student pair, a method variant (a table column) and a seed."""

    run_id: str
    cohort_id: str
    teacher: TeacherRef
    model: str  # the student backbone
    method: str
    variant: str  # the column label, e.g. "kd" or "kd(T=2)"
    seed: int
    status: str
    error: str | None = None
    model_options: dict[str, Any] = field(default_factory=dict)
    hparams: dict[str, Any] = field(default_factory=dict)  # every hyperparameter the method ran with
    hparams_override: dict[str, Any] = field(default_factory=dict)  # what the benchmark file set
    epochs_done: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    last: Scores | None = None
    best: BestEpoch | None = None
    params: int | None = None  # the student backbone
    method_params: int | None = None  # the method's own (regressors, heads), trained with it and then dropped
    flops: int | None = None  # forward FLOPs per image of the student
    wall_time_s: float | None = None
    img_per_s: float | None = None
    recipe: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    environment: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)  # plugin distributions and versions hashed into run_id
    schema: str = RUN_SCHEMA

    kind = "student"

    def check(self) -> None:
        _check_status(self.status, self.error)
        if self.status == "ok" and (self.last is None or self.best is None):
            raise ValueError("a finished run has no last- or best-epoch metrics")

    @property
    def label(self) -> str:
        return f"{self.teacher.model} → {self.model} {self.variant} seed {self.seed}"


Record = Union[TeacherRecord, RunRecord]
_BY_SCHEMA: dict[str, type] = {TEACHER_SCHEMA: TeacherRecord, RUN_SCHEMA: RunRecord}


@dataclass
class BenchRecord:
    """``bench.json``: the plan as the report needs it. ``run_ids``/``teachers`` select the current plan's
    records when a folder was rerun with an edited YAML."""

    name: str
    columns: list[str]
    pairs: list[list[str]]
    seeds: list[int]
    run_ids: list[str]
    teachers: dict[str, str]  # teacher model -> key
    description: str = ""
    budget: str = ""
    reference: dict[str, Any] | None = None
    data_fingerprint: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    kdzoo: str = ""
    # cells a method cannot serve, decided at validation: {"teacher", "student", "column", "reason"}
    unsupported: list[dict[str, str]] = field(default_factory=list)
    schema: str = BENCH_SCHEMA

    def check(self) -> None:
        if any(len(p) != 2 for p in self.pairs):
            raise ValueError("every entry of 'pairs' must be [teacher, student]")

    @classmethod
    def load(cls, path: str | Path) -> "BenchRecord":
        return _from_json(cls, _read(path), path)


def _check_status(status: str, error: str | None) -> None:
    if status not in STATUSES:
        raise ValueError(f"status is '{status}', not one of {', '.join(STATUSES)}")
    if status == "failed" and not error:
        raise ValueError("a failed run records no error")


def _finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None: JSON has no NaN or Infinity."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def dumps(data: Any) -> str:
    """JSON text of ``data`` (a record or plain values), never with a NaN or Infinity token."""
    if dataclasses.is_dataclass(data):
        data = dataclasses.asdict(data)
    return json.dumps(_finite(data), indent=1, allow_nan=False)


def _read(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_bytes())
    except OSError as e:
        raise RecordError(path, f"it cannot be read ({e.strerror or e})") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError(path, f"it is not JSON ({type(e).__name__}: {e}); it is damaged or half-written") from e


def _from_json(cls: type, data: Any, path: str | Path) -> Any:
    if not isinstance(data, dict):
        raise RecordError(path, f"it holds {type(data).__name__}, not a JSON object")
    schema = getattr(cls, "schema", None) if cls is not None else None
    if data.get("schema") != schema:
        raise RecordError(path, f"its schema is {data.get('schema')!r}, expected {schema!r}")
    try:
        record = parse(cls, data, "", fix="")
        record.check()
    except KDZooError as e:
        raise RecordError(path, str(e)) from e
    except ValueError as e:
        raise RecordError(path, str(e)) from e
    return record


def load_record(path: str | Path) -> Record:
    """A teacher or run record from ``path``, validated; :class:`RecordError` otherwise."""
    data = _read(path)
    cls = _BY_SCHEMA.get(data.get("schema")) if isinstance(data, dict) else None
    if isinstance(data, dict) and cls is None:
        raise RecordError(path, f"its schema is {data.get('schema')!r}, not one of {', '.join(_BY_SCHEMA)}")
    record = _from_json(cls, data, path)
    if record.run_id != Path(path).stem and Path(path).name != "metrics.json":
        raise RecordError(path, f"it holds run '{record.run_id}', not the run its file name says")
    return record
