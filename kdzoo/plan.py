"""The benchmark plan: ``BenchConfig`` → ``Plan`` (teachers to train or reuse, cohorts of runs).

Contract: :func:`expand` turns a parsed benchmark into a :class:`Plan` deterministically (same config, data,
plugins and versions → same teacher keys, run ids and cohort ids); it builds no model and trains nothing.
This module also defines what a :class:`TeacherJob` knows about itself: its cache folder, whether it is
already trained (:func:`cached_teacher`, :func:`teacher_status`) and how its frozen teacher is loaded
(:func:`load_job_teacher`). It never imports the runner (``kdzoo.bench``), the validation
(``kdzoo.validation``) or the estimates (``kdzoo.estimate``): data flows one way, config → plan → runs →
store → report.

* **Variants.** A method entry is a name or ``{name: kd, T: [2, 4, 8], w_kd: 0.9}``; list
  values are sweeps and expand into one run per combination, labelled ``kd(T=2)`` etc. The
  CE baseline (``ce``) is always part of the plan.
* **Teachers** are trained once and cached under ``$KDZOO_CACHE/teachers/<key>`` (default
  ``~/.cache/kdzoo``), where ``key`` hashes everything that determines the teacher: model and
  options, recipe, seed, data fingerprint (which covers the subset) and kdzoo version.
* **Cohorts.** Runs sharing (teacher, seed) train together, across students (see ``kdzoo.engine``):
  the teacher runs once per batch for all of them, and each run stays bit-identical to its solo run
  (the batches depend only on the seed and the epoch). ``cohorts: false`` trains each run alone.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kdzoo
from kdzoo import KDZooError, cache_dir
from kdzoo.checkpoint import file_sha256
from kdzoo.config import BenchConfig, Recipe, StudentSpec, TeacherSpec, parse
from kdzoo.data import DataShape
from kdzoo.engine import wants
from kdzoo.plugins import NATIVE_FORMAT, Registry
from kdzoo.records import RecordError, TeacherRecord, load_record
from kdzoo.teachers import load_teacher, pretrained_teacher

if TYPE_CHECKING:
    from kdzoo.data import Data
    from kdzoo.models import KDNet

BASELINE = "ce"


def _hash(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


@dataclass
class Variant:
    """One column of the table: a method with fixed hyperparameter overrides."""

    label: str
    method: str
    hparams: dict[str, Any]
    path: str  # where it came from in the YAML, e.g. "methods[2]"


@dataclass
class TeacherJob:
    key: str
    model: str
    options: dict[str, Any]
    seed: int
    recipe: Recipe
    checkpoint: str | None  # a user-supplied checkpoint instead of training
    provenance: dict[str, str] = field(default_factory=dict)  # plugin versions (and checkpoint hash) in the key
    format: str = NATIVE_FORMAT  # the checkpoint's: kdzoo's own, or a plugin's (repdistiller, torchdistill, ...)

    @property
    def dir(self) -> Path:
        return cache_dir() / "teachers" / self.key

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint) if self.checkpoint else self.dir / "checkpoint.pt"


@dataclass
class RunSpec:
    run_id: str
    variant: Variant
    seed: int
    student: StudentSpec
    provenance: dict[str, str] = field(default_factory=dict)  # plugin versions hashed into run_id


@dataclass
class Cohort:
    """Runs that train together: one teacher and seed, one or more students (one teacher pass per batch)."""

    cohort_id: str
    teacher: TeacherJob
    seed: int
    recipe: Recipe
    runs: list[RunSpec]

    @property
    def students(self) -> list[StudentSpec]:
        """The distinct students of the cohort's runs, in plan order."""
        seen: dict[str, StudentSpec] = {}
        for r in self.runs:
            seen.setdefault(r.student.model, r.student)
        return list(seen.values())

    def member_label(self, run: RunSpec) -> str:
        """A run's name within the cohort (progress lines, the resumable state): the column, prefixed by
        the student when the cohort has several."""
        return run.variant.label if len(self.students) == 1 else f"{run.student.model}/{run.variant.label}"

    @property
    def label(self) -> str:
        return f"{self.teacher.model} → {', '.join(s.model for s in self.students)} (seed {self.seed})"


@dataclass
class Plan:
    bench: BenchConfig
    data: DataShape
    teachers: list[TeacherJob]
    cohorts: list[Cohort]
    variants: list[Variant]
    pairs: list[tuple[str, str]]
    flops: dict[str, int] = field(default_factory=dict)
    # cells a method cannot serve (PairNotSupported at validation): {"teacher", "student", "column", "reason"}
    unsupported: list[dict[str, str]] = field(default_factory=list)
    init_epochs: dict[str, int] = field(default_factory=dict)  # column -> epochs of its method's init stage

    @property
    def runs(self) -> list[RunSpec]:
        return [r for c in self.cohorts for r in c.runs]


def cohort_id(runs: list[RunSpec]) -> str:
    """The id of a cohort of these runs (it names the cohort's resumable state file)."""
    return _hash({"runs": [r.run_id for r in runs]})


def _recipe(base: Recipe, *overrides: dict[str, Any], path: str) -> Recipe:
    merged = dataclasses.asdict(base)
    for o in overrides:
        merged.update(o)
    recipe = parse(Recipe, merged, path)
    recipe.validate(path)
    return recipe


def _label(method: str, hparams: dict[str, Any]) -> str:
    if not hparams:
        return method
    return f"{method}({', '.join(f'{k}={v}' for k, v in hparams.items())})"


def expand_variants(methods: list[Any]) -> list[Variant]:
    """Method entries → variants (sweeps expanded); the CE baseline first."""
    out: list[Variant] = []
    for i, entry in enumerate(methods):
        path = f"methods[{i}]"
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise KDZooError(f"{path} must be a method name or a mapping with a `name:` key, got {entry!r}.")
        label = entry.get("label")
        if label is not None and not isinstance(label, str):
            raise KDZooError(f"{path}.label must be a string, got {label!r}.")
        hp = {k: v for k, v in entry.items() if k not in ("name", "label")}
        sweeps = {k: v for k, v in hp.items() if isinstance(v, list)}
        for k, v in sweeps.items():
            if not v:
                raise KDZooError(f"{path}.{k} is an empty sweep; give at least one value.")
        for combo in itertools.product(*sweeps.values()) if sweeps else [()]:
            fixed = {**hp, **dict(zip(sweeps, combo))}
            # An explicit label names the column; sweep values are still spelled out.
            name = _label(label, dict(zip(sweeps, combo))) if label else _label(entry["name"], fixed)
            out.append(Variant(name, entry["name"], fixed, path))
    labels = [v.label for v in out]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise KDZooError(f"The method list yields '{dupes[0]}' more than once; remove the duplicate entry.")
    if BASELINE not in labels:
        out.insert(0, Variant(BASELINE, BASELINE, {}, "baseline"))
    else:
        out.insert(0, out.pop(labels.index(BASELINE)))
    return out


def _as_spec(cls: type, entry: Any, path: str) -> Any:
    return cls(model=entry) if isinstance(entry, str) else parse(cls, entry, path)


def provenance(registry: Registry, kind: str, name: str) -> str:
    """``"dist version"`` of the plugin that registered ``name`` (a method, a model or a checkpoint format); hashed
    into run ids and teacher keys so that upgrading a plugin never reuses results computed with the old one."""
    owner = (registry.checkpoint_format_owner.get(name) if kind == "checkpoint_format"
             else registry.owner.get((kind, name)))
    if owner is None:
        return "unregistered"  # validate() reports the unknown name with its place in the file
    info = registry.plugin(owner)
    return f"{info.dist} {info.version}"


def _resolve_checkpoint(t: TeacherSpec, i: int, data: DataShape, registry: Registry) -> TeacherSpec:
    """Check a teacher's ``format`` and ``pretrained``; a pretrained teacher becomes a checkpoint teacher (the file its
    plugin downloaded, or found, in ``$KDZOO_CACHE/pretrained``) in that format."""
    if t.format != NATIVE_FORMAT:
        try:
            registry.checkpoint_format(t.format)
        except KDZooError as e:
            raise KDZooError(f"teachers[{i}].format: {e}") from e
        if not t.checkpoint and not t.pretrained:
            raise KDZooError(f"teachers[{i}] has `format: {t.format}` but no `checkpoint:` (the file to read) or "
                             f"`pretrained: {t.format}` (published weights).")
    if not t.pretrained:
        return t
    if t.checkpoint:
        raise KDZooError(f"teachers[{i}] has both `checkpoint:` and `pretrained:`; give the file, or the source of "
                         "published weights, not both.")
    if t.format not in (NATIVE_FORMAT, t.pretrained):
        raise KDZooError(f"teachers[{i}]: `pretrained: {t.pretrained}` weights are in {t.pretrained} format, not "
                         f"`format: {t.format}`; remove `format:`.")
    try:
        path = pretrained_teacher(registry, t.pretrained, t.model, data.dataset)
    except KDZooError as e:
        raise KDZooError(f"teachers[{i}].pretrained: {e}") from e
    return dataclasses.replace(t, checkpoint=str(path), format=t.pretrained, pretrained=None)


def expand(bench: BenchConfig, data: DataShape, registry: Registry) -> Plan:
    """Expand a benchmark into teachers and cohorts. Builds no model; reads a teacher checkpoint's bytes (its
    sha256 is part of the teacher's key, so overwriting the file is a different teacher), and fetches a
    ``pretrained:`` teacher's published weights into the cache if they are not there yet."""
    import timm

    versions = {"kdzoo": kdzoo.__version__, "timm": timm.__version__}
    if not bench.teachers or not bench.students:
        raise KDZooError("A benchmark needs at least one entry under `teachers:` and one under `students:`.")
    if not bench.seeds:
        raise KDZooError("`seeds:` is empty; give at least one seed, e.g. seeds: [0, 1, 2].")
    for j, seed in enumerate(bench.seeds):
        if seed in bench.seeds[:j]:
            raise KDZooError(
                f"seeds[{bench.seeds.index(seed)}] and seeds[{j}] are both {seed}: a seed trains identical runs, so "
                "a repeated one adds no sample to the mean ± std. Remove the duplicate or use another seed."
            )
    if bench.cohort_size is not None and bench.cohort_size < 1:
        raise KDZooError(f"cohort_size is {bench.cohort_size}: it caps the runs trained together on one teacher "
                         "pass and must be at least 1 (leave it out for no cap; `cohorts: false` is 1).")
    variants = expand_variants(bench.methods)
    teacher_specs = [_as_spec(TeacherSpec, t, f"teachers[{i}]") for i, t in enumerate(bench.teachers)]
    student_specs = [_as_spec(StudentSpec, s, f"students[{i}]") for i, s in enumerate(bench.students)]
    for i, t in enumerate(teacher_specs):
        if not t.model:
            raise KDZooError(f"teachers[{i}] needs a `model:` (also with a checkpoint, so that the table can name it).")

    teachers: dict[str, TeacherJob] = {}
    for i, t in enumerate(teacher_specs):
        recipe = _recipe(bench.recipe, bench.teacher_recipe, t.recipe, path=f"teachers[{i}].recipe")
        origin = {**versions, "model_plugin": provenance(registry, "model", t.model)}
        t = _resolve_checkpoint(t, i, data, registry)
        if t.checkpoint:
            if not Path(t.checkpoint).is_file():
                what = ("the checkpoint.pt written by `kdzoo train` (under its --out folder)" if t.format == NATIVE_FORMAT
                        else f"the path of a {t.format} teacher file")
                raise KDZooError(f"teachers[{i}].checkpoint: {t.checkpoint} does not exist. Pass {what}.")
            origin["checkpoint_sha256"] = file_sha256(t.checkpoint)
            if t.format == NATIVE_FORMAT:  # the file names its network, options and dataset
                key = "ckpt-" + _hash({"model": t.model, **origin})
            else:  # the file holds weights only: the network and the classes are the plan's
                origin["checkpoint_format"] = t.format
                origin["format_plugin"] = provenance(registry, "checkpoint_format", t.format)
                key = "ckpt-" + _hash({"model": t.model, "options": t.options, "dataset": data.dataset,
                                       "num_classes": data.num_classes, "image_size": list(data.image_size), **origin})
        else:
            key = _hash({"model": t.model, "options": t.options, "seed": t.seed, "recipe": dataclasses.asdict(recipe),
                         "data": data.fingerprint, "num_classes": data.num_classes, **origin})
        if t.model in teachers:
            raise KDZooError(f"teachers[{i}]: teacher '{t.model}' is listed twice; the table has one row per teacher → student pair.")
        teachers[t.model] = TeacherJob(key, t.model, t.options, t.seed, recipe, t.checkpoint, origin, format=t.format)

    students = {s.model: s for s in student_specs}
    if bench.pairs is None:
        pairs = [(t, s) for t in teachers for s in students]
    else:
        pairs = []
        for i, pair in enumerate(bench.pairs):
            if len(pair) != 2 or pair[0] not in teachers or pair[1] not in students:
                raise KDZooError(
                    f"pairs[{i}] = {pair} must be [teacher, student] with names from `teachers:` "
                    f"({', '.join(teachers)}) and `students:` ({', '.join(students)})."
                )
            pairs.append((pair[0], pair[1]))

    student_recipe = _recipe(bench.recipe, bench.student_recipe, path="student_recipe")
    by_teacher: dict[tuple[str, int], list[RunSpec]] = {}  # (teacher, seed) -> its runs, every student
    for t_name, s_name in pairs:
        teacher, student = teachers[t_name], students[s_name]
        for seed in bench.seeds:
            for v in variants:
                origin = {**versions, "model_plugin": provenance(registry, "model", s_name),
                          "method_plugin": provenance(registry, "method", v.method)}
                run_id = _hash({"teacher": teacher.key, "student": dataclasses.asdict(student), "method": v.method,
                                "hparams": v.hparams, "seed": seed, "recipe": dataclasses.asdict(student_recipe),
                                "data": data.fingerprint, **origin})
                by_teacher.setdefault((t_name, seed), []).append(RunSpec(run_id, v, seed, student, origin))
    cohorts: list[Cohort] = []
    for (t_name, seed), runs in by_teacher.items():
        size = len(runs) if bench.cohorts else 1
        size = min(size, bench.cohort_size or size)
        groups = [runs[i:i + size] for i in range(0, len(runs), size)]
        for group in groups:
            cohorts.append(Cohort(cohort_id(group), teachers[t_name], seed, student_recipe, group))
    return Plan(bench, data, list(teachers.values()), cohorts, variants, pairs)


# -- the teacher-logit cache -------------------------------------------------------------------
def _teacher_users(cohort: Cohort, registry: Registry) -> list[type]:
    """The method classes of ``cohort`` that need its teacher."""
    return [m for m in (registry.method(r.variant.method) for r in cohort.runs) if m.needs_teacher]


def logit_cache_roles(plan: Plan, registry: Registry) -> dict[str, str]:
    """How each cohort uses the teacher's cached training logits (``kdzoo.logit_cache``) when the plan's
    cohorts train in order: ``"read"`` (it needs nothing of the teacher but its logits, and an earlier
    cohort of its teacher and seed wrote them), ``"write"`` (it runs the teacher and keeps the logits) or
    ``""`` (no cache), by cohort id.

    The cache is on where the benchmark asks for it (``cache_teacher_logits``) and where a teacher and seed
    have several cohorts of which one could read it."""
    groups: dict[tuple[str, int], list[Cohort]] = {}
    for c in plan.cohorts:
        groups.setdefault((c.teacher.key, c.seed), []).append(c)
    roles: dict[str, str] = {}
    for siblings in groups.values():
        users = {c.cohort_id: _teacher_users(c, registry) for c in siblings}
        logits_only = {i: bool(u) and not any(wants(m) for m in u) for i, u in users.items()}
        on = plan.bench.cache_teacher_logits or (len(siblings) > 1 and any(logits_only.values()))
        written = False
        for c in siblings:
            if not on or not users[c.cohort_id]:
                roles[c.cohort_id] = ""
            elif written and logits_only[c.cohort_id]:
                roles[c.cohort_id] = "read"
            else:
                roles[c.cohort_id], written = "write", True
    return roles


# -- the teacher cache -------------------------------------------------------------------------
def cached_teacher(job: TeacherJob) -> TeacherRecord | None:
    """The cached record of a teacher trained earlier, or None when it must be trained (again).

    The one definition of "already trained", used by the dry run, the CLI's counts, every executor and
    the time estimate: a checkpoint and a valid, finished record of this very key. A damaged or foreign
    record does not count (the teacher is retrained and the record rewritten)."""
    if job.checkpoint or not job.checkpoint_path.is_file():
        return None
    try:
        record = load_record(job.dir / "metrics.json")
    except RecordError:
        return None
    if not isinstance(record, TeacherRecord) or record.key != job.key or record.status != "ok":
        return None
    return record


def teacher_status(job: TeacherJob) -> str:
    """``"checkpoint"`` (given by the user), ``"cached"`` (trained earlier) or ``"train"``."""
    return "checkpoint" if job.checkpoint else "cached" if cached_teacher(job) else "train"


def load_job_teacher(job: TeacherJob, registry: Registry, data: Data | DataShape) -> tuple[KDNet, dict[str, Any]]:
    """The frozen teacher of a checkpoint (or trained and cached) teacher job, through ``kdzoo.teachers.load_teacher``."""
    return load_teacher(registry, job.checkpoint_path, dataset=data.dataset, format=job.format, model=job.model,
                        options=job.options, num_classes=data.num_classes, image_size=data.image_size,
                        class_names=data.class_names)
