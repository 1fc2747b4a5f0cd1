"""The benchmark runner: plan expansion, validation, teacher cache, cohorts, resume.

Data flows one way: ``BenchConfig`` → ``Plan`` (teachers to train or reuse, cohorts of runs)
→ training → ``Store`` (one JSON per run) → report.

* **Variants.** A method entry is a name or ``{name: kd, T: [2, 4, 8], w_kd: 0.9}``; list
  values are sweeps and expand into one run per combination, labelled ``kd(T=2)`` etc. The
  CE baseline (``ce``) is always part of the plan.
* **Teachers** are trained once and cached under ``$KDZOO_CACHE/teachers/<key>`` (default
  ``~/.cache/kdzoo``), where ``key`` hashes everything that determines the teacher: model and
  options, recipe, seed, data fingerprint (which covers the subset) and kdzoo version.
* **Cohorts.** Runs sharing (teacher, student, seed) train together (see ``kdzoo.engine``):
  paired and bit-identical to solo runs. ``cohorts: false`` trains each run alone.
* **Resume.** After every epoch a cohort (or teacher) saves its full training state
  atomically; finished runs are written atomically to the store and skipped next time. Run
  the same command again after any interruption and it continues where it stopped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

import kdzoo
from kdzoo import KDZooError
from kdzoo.checkpoint import file_sha256, load_checkpoint, save_checkpoint
from kdzoo.config import BenchConfig, Recipe, StudentSpec, TeacherSpec, parse
from kdzoo.data import Data, DataShape
from kdzoo.engine import Member, Progress, Trainer, count_params, resolve_device
from kdzoo.models import KDNet
from kdzoo.plugins import NATIVE_FORMAT, Registry
from kdzoo.records import (BenchRecord, BestEpoch, RecordError, RunRecord, Scores, TeacherRecord, TeacherRef,
                           load_record)
from kdzoo import cache_dir
from kdzoo.methods import PairNotSupported
from kdzoo.runner import build_method, build_student, data_info, environment, load_data, save_run_checkpoint
from kdzoo.teachers import foreign_formats_hint, load_teacher, pretrained_teacher
from kdzoo.store import Store, write_json

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
    provenance: dict[str, str] = field(default_factory=dict)  # plugin versions hashed into run_id


@dataclass
class Cohort:
    cohort_id: str
    teacher: TeacherJob
    student: StudentSpec
    seed: int
    recipe: Recipe
    runs: list[RunSpec]

    @property
    def label(self) -> str:
        return f"{self.teacher.model} → {self.student.model} (seed {self.seed})"


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


# -- plan --------------------------------------------------------------------------------------
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
    cohorts: list[Cohort] = []
    for t_name, s_name in pairs:
        teacher, student = teachers[t_name], students[s_name]
        for seed in bench.seeds:
            runs = []
            for v in variants:
                origin = {**versions, "model_plugin": provenance(registry, "model", s_name),
                          "method_plugin": provenance(registry, "method", v.method)}
                run_id = _hash({"teacher": teacher.key, "student": dataclasses.asdict(student), "method": v.method,
                                "hparams": v.hparams, "seed": seed, "recipe": dataclasses.asdict(student_recipe),
                                "data": data.fingerprint, **origin})
                runs.append(RunSpec(run_id, v, seed, origin))
            groups = [runs] if bench.cohorts else [[r] for r in runs]
            for group in groups:
                cohort_id = _hash({"runs": [r.run_id for r in group]})
                cohorts.append(Cohort(cohort_id, teacher, student, seed, student_recipe, group))
    return Plan(bench, data, list(teachers.values()), cohorts, variants, pairs)


# -- validation --------------------------------------------------------------------------------
def validate(plan: Plan, registry: Registry, train_labels: torch.Tensor | None = None) -> dict[str, int]:
    """Build every model and every method and take a dry training step of each at the smallest
    batch it will train on (``kdzoo.engine.preflight``), before any training; refuse two method
    entries that are the same run once defaults are applied.

    A method that cannot serve a pair (``PairNotSupported``) does not stop the benchmark: its runs for
    that pair leave the plan and the cell is recorded in ``plan.unsupported`` (the report shows n/a).
    ``train_labels`` (the training split's, for methods that bind them) default to stand-ins of the
    right size. Returns forward FLOPs per image of each student. Errors name the YAML path.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from kdzoo.data import train_batch_sizes
    from kdzoo.engine import preflight

    shape = plan.data
    nets: dict[str, KDNet] = {}

    def net(model: str, options: dict[str, Any], path: str) -> KDNet:
        if model not in nets:
            try:
                nets[model] = KDNet(registry.create_model(model, num_classes=shape.num_classes, **options),
                                    input_size=shape.image_size).eval()
            except KDZooError as e:
                raise KDZooError(f"{path}: {e}") from e
        return nets[model]

    flops: dict[str, int] = {}
    x = torch.randn(1, 3, *shape.image_size)
    n_train = shape.n_train
    if train_labels is None:
        train_labels = torch.arange(n_train) % shape.num_classes
    for i, t in enumerate(plan.teachers):
        if t.checkpoint and t.format != NATIVE_FORMAT:  # read and convert now: every error before training
            try:
                _load_job_teacher(t, registry, shape)
            except KDZooError as e:
                raise KDZooError(f"teachers[{i}] ({t.model}, {t.format} checkpoint): {e}") from e
        elif t.checkpoint:  # fails early with a clear message if unreadable, of another model or dataset
            ckpt = load_checkpoint(t.checkpoint, hint=foreign_formats_hint(registry))
            found = ckpt["model"]
            trained_on = ckpt.get("meta", {}).get("dataset", "cifar10")
            if trained_on != shape.dataset:
                raise KDZooError(f"teachers[{i}]: the checkpoint {t.checkpoint} was trained on '{trained_on}', but "
                                 f"this benchmark uses '{shape.dataset}' (data.dataset). Use a teacher trained on "
                                 f"'{shape.dataset}', or remove `checkpoint:` to train one.")
            if found != t.model:
                raise KDZooError(f"teachers[{i}]: the checkpoint {t.checkpoint} holds a '{found}', not a "
                                 f"'{t.model}'. Set `model: {found}` or point to the right checkpoint.")
        teacher_net = net(t.model, t.options, f"teachers[{i}]")
        if not t.checkpoint:  # it trains with the baseline at its own recipe's batch size
            try:
                preflight(teacher_net, None, None, train_batch_sizes(n_train, t.recipe.batch_size), model=t.model,
                          input_size=shape.image_size)
            except KDZooError as e:
                raise KDZooError(f"teachers[{i}] ({t.model}, batch_size {t.recipe.batch_size}): {e}") from e
    same_run: dict[str, Variant] = {}  # method + hyperparameters with defaults applied -> first variant

    def entry(v: Variant) -> str:
        return "the CE baseline (always in the plan)" if v.path == "baseline" else f"{v.path} ({v.label})"

    for t_name, s_name in plan.pairs:
        cohort = next(c for c in plan.cohorts if c.teacher.model == t_name and c.student.model == s_name)
        teacher = nets[t_name]
        student = net(s_name, cohort.student.options, "students")
        sizes = train_batch_sizes(n_train, cohort.recipe.batch_size)
        if s_name not in flops:
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                student(x)
            flops[s_name] = counter.get_total_flops()
            try:
                preflight(student, None, None, sizes, model=s_name, input_size=shape.image_size)
            except KDZooError as e:
                raise KDZooError(f"students ({s_name}, batch_size {cohort.recipe.batch_size}): {e}") from e
        for v in plan.variants:
            where = f"{v.path} ({v.label}) with teacher {t_name} → student {s_name}"
            try:
                method = build_method(registry, v.method, v.hparams, student.info, teacher.info, 0,
                                      pair=(t_name, s_name), teacher_net=teacher, train_labels=train_labels)
                preflight(student, method, teacher, sizes, model=s_name, input_size=shape.image_size)
                if method.num_init_epochs(cohort.recipe.epochs):
                    plan.init_epochs[v.label] = method.num_init_epochs(cohort.recipe.epochs)
            except PairNotSupported as e:
                plan.unsupported.append({"teacher": t_name, "student": s_name, "column": v.label, "reason": str(e)})
                continue
            except KDZooError as e:
                raise KDZooError(f"{where}: {e}") from e
            except Exception as e:
                raise KDZooError(
                    f"{where}: the method fails on a dry forward ({type(e).__name__}: {e}). "
                    "This pair cannot be distilled with it; change the pair or the method's options."
                ) from e
            first = same_run.setdefault(json.dumps([v.method, t_name, s_name, method.hparams], sort_keys=True,
                                                   default=str), v)
            if first is not v:
                raise KDZooError(
                    f"{entry(first)} and {entry(v)} are the same run: method '{v.method}' with "
                    f"{', '.join(f'{k}={val}' for k, val in method.hparams.items())} once its defaults are "
                    "applied, so it would train twice as two columns. Remove one of them, or change a hyperparameter."
                )
    if plan.unsupported:  # those runs leave the plan; a cohort left empty goes too
        gone = {(u["teacher"], u["student"], u["column"]) for u in plan.unsupported}
        for c in plan.cohorts:
            kept = [r for r in c.runs if (c.teacher.model, c.student.model, r.variant.label) not in gone]
            if len(kept) != len(c.runs):
                c.runs, c.cohort_id = kept, _hash({"runs": [r.run_id for r in kept]})
        plan.cohorts = [c for c in plan.cohorts if c.runs]
    return flops


# -- execution ---------------------------------------------------------------------------------
Hook = Callable[[str, str], None]  # (event, detail): progress messages from the runner


@dataclass
class Context:
    """What every executor gets: where the data, plugins and results are, and how to report progress."""

    plan: Plan
    data: Data
    registry: Registry
    store: Store
    device: torch.device
    progress: Progress
    say: Hook


class Executor(Protocol):
    """Trains the teachers that ``todo`` needs, then the cohorts in ``todo``, writing every record into
    ``ctx.store``. The local executor is :func:`run_local`; ``kdzoo.distributed.RayExecutor`` is another.
    The benchmark runner calls an executor without knowing which one it is."""

    def __call__(self, ctx: Context, todo: list[Cohort]) -> None: ...


def _save_state(path: Path, trainer: Trainer, epochs_done: int) -> None:
    save_checkpoint(path, {"kind": "cohort-state", "epochs_done": epochs_done, "trainer": trainer.state_dict()})


def _run_trainer(trainer: Trainer, state_path: Path, say: Hook) -> list[dict[str, Any]]:
    """Fit, resuming from ``state_path`` if a previous attempt saved one; state is saved every epoch."""
    start = 0
    if state_path.is_file():
        state = load_checkpoint(state_path)
        trainer.load_state_dict(state["trainer"])
        start = state["epochs_done"]
        say("resume", f"resuming at epoch {start + 1}")
    return trainer.fit(start, on_epoch=lambda done: _save_state(state_path, trainer, done))


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


def _scores(result: dict[str, Any]) -> dict[str, Any]:
    """The engine's result dict → the typed record fields they share."""
    return {"status": result["status"], "error": result["error"], "epochs_done": result["epochs_done"],
            "history": result["history"], "wall_time_s": result.get("wall_time_s"),
            "img_per_s": result.get("img_per_s"),
            "last": Scores(**result["last"]) if result.get("last") else None,
            "best": BestEpoch(**result["best"]) if result.get("best") else None}


def _load_job_teacher(job: TeacherJob, registry: Registry, data: Data | DataShape) -> tuple[KDNet, dict[str, Any]]:
    """The frozen teacher of a checkpoint (or trained and cached) teacher job, through ``kdzoo.teachers.load_teacher``."""
    return load_teacher(registry, job.checkpoint_path, dataset=data.dataset, format=job.format, model=job.model,
                        options=job.options, num_classes=data.num_classes, image_size=data.image_size,
                        class_names=data.class_names)


@torch.inference_mode()
def _test_metrics(net: KDNet, data: Data, device: torch.device) -> dict[str, float]:
    """A frozen network's test metrics (float32), as ``kdzoo.metrics.classification_metrics`` gives them."""
    from kdzoo.metrics import classification_metrics

    net.to(device)
    logits = torch.cat([net(x).logits.float() for x, _ in data.eval_batches("test")])
    return classification_metrics(logits, data.test_y)


def ensure_teacher(job: TeacherJob, ctx: Context) -> TeacherRecord:
    """Train (or reuse) a teacher; return its record (also written into the store)."""
    run_id = f"teacher-{job.key}"
    if job.checkpoint:
        net, ckpt = _load_job_teacher(job, ctx.registry, ctx.data)
        meta = ckpt.get("meta", {})
        last = Scores(top1=float(meta["top1"])) if isinstance(meta.get("top1"), (int, float)) else None
        if job.format != NATIVE_FORMAT:  # a foreign file records no accuracy on this data: measure it on the test split
            ctx.say("teacher", f"{job.model}: {job.format} checkpoint, measuring its test accuracy")
            last = Scores(**_test_metrics(net, ctx.data, ctx.device))
        record = TeacherRecord(run_id=run_id, key=job.key, model=job.model, seed=job.seed, status="ok",
                               source="checkpoint", checkpoint=job.checkpoint, params=count_params(net), last=last,
                               provenance=job.provenance)
    elif (cached := cached_teacher(job)) is not None:
        ctx.say("teacher", f"{job.model}: cached ({job.dir})")
        record = cached
    else:
        ctx.say("teacher", f"{job.model}: training ({job.recipe.epochs} epochs)")
        student = build_student(ctx.registry, job.model, job.options, job.seed, ctx.data.num_classes,
                                ctx.data.image_size)
        method = build_method(ctx.registry, BASELINE, {}, student.info, None, job.seed)
        member = Member(f"teacher {job.model}", student, method)
        trainer = Trainer([member], ctx.data, job.recipe, seed=job.seed, device=ctx.device, progress=ctx.progress)
        (result,) = _run_trainer(trainer, job.dir / "state.pt", ctx.say)
        record = TeacherRecord(run_id=run_id, key=job.key, model=job.model, seed=job.seed, source="trained",
                               params=count_params(student), recipe=dataclasses.asdict(job.recipe),
                               data=data_info(ctx.data), environment=environment(ctx.device, job.recipe),
                               provenance=job.provenance, **_scores(result))
        if record.status == "ok":
            save_run_checkpoint(job.checkpoint_path, job.model, job.options, student, method, result, ctx.data,
                                job.seed, key=job.key)
            write_json(job.dir / "metrics.json", record)
            (job.dir / "state.pt").unlink(missing_ok=True)
    ctx.store.write_run(record)
    return record


def run_cohort(cohort: Cohort, teacher: TeacherRecord, ctx: Context) -> None:
    """Train the cohort's unfinished runs (resuming if possible) and write one record per run."""
    ref = TeacherRef(model=cohort.teacher.model, key=cohort.teacher.key, params=teacher.params,
                     top1=teacher.last.top1 if teacher.last else None,
                     best_top1=teacher.best.top1 if teacher.best else None)
    common = {"cohort_id": cohort.cohort_id, "teacher": ref, "model": cohort.student.model,
              "model_options": cohort.student.options, "seed": cohort.seed, "recipe": dataclasses.asdict(cohort.recipe)}
    identity = {run.run_id: {"run_id": run.run_id, "method": run.variant.method, "variant": run.variant.label,
                             "hparams_override": run.variant.hparams, "provenance": run.provenance}
                for run in cohort.runs}
    if teacher.status != "ok":
        for run in cohort.runs:
            ctx.store.write_run(RunRecord(**common, **identity[run.run_id], status="failed",
                                          error=f"teacher {cohort.teacher.model} failed: {teacher.error}"))
        return
    teacher_net, _ = _load_job_teacher(cohort.teacher, ctx.registry, ctx.data)
    members = []
    for run in cohort.runs:
        student = build_student(ctx.registry, cohort.student.model, cohort.student.options, cohort.seed,
                                ctx.data.num_classes, ctx.data.image_size)
        method = build_method(ctx.registry, run.variant.method, run.variant.hparams, student.info, teacher_net.info,
                              cohort.seed, pair=(cohort.teacher.model, cohort.student.model), teacher_net=teacher_net,
                              train_labels=ctx.data.train_y)
        members.append(Member(run.variant.label, student, method,
                              origin=ctx.registry.describe_origin(run.variant.method)))
    trainer = Trainer(members, ctx.data, cohort.recipe, teacher=teacher_net, seed=cohort.seed, device=ctx.device,
                      progress=ctx.progress)
    state_path = ctx.store.cohort_path(cohort.cohort_id)
    results = _run_trainer(trainer, state_path, ctx.say)
    env = environment(ctx.device, cohort.recipe)
    for run, member, result in zip(cohort.runs, members, results):
        if ctx.store.has_run(run.run_id):
            continue  # written before an interruption
        ctx.store.write_run(RunRecord(
            **common, **identity[run.run_id], **_scores(result), hparams=result["hparams"],
            params=result["params"]["student"], method_params=result["params"]["method"],
            flops=ctx.plan.flops.get(cohort.student.model), data=data_info(ctx.data), environment=env))
    state_path.unlink(missing_ok=True)


def budget(plan: Plan, data: Data) -> str:
    r = plan.cohorts[0].recipe if plan.cohorts else plan.bench.recipe
    init = ""
    if plan.init_epochs:
        by_epochs: dict[int, list[str]] = {}
        for column, n in plan.init_epochs.items():
            by_epochs.setdefault(n, []).append(column)
        init = " (" + "; ".join(f"{', '.join(cols)}: + {n} init-stage epoch{'s' if n != 1 else ''} before them"
                                for n, cols in sorted(by_epochs.items())) + ")"
    return (f"{data.dataset}: {r.epochs} student epochs{init} ({r.schedule}, lr {r.lr}, batch {r.batch_size}), "
            f"{len(data.train_y):,} train / {len(data.test_y):,} test images")


def bench_summary(plan: Plan, data: Data) -> BenchRecord:
    """What ``bench.json`` holds: enough for ``kdzoo report`` to render without the YAML."""
    ref = dataclasses.asdict(plan.bench.reference) if plan.bench.reference else None
    return BenchRecord(name=plan.bench.name, description=plan.bench.description, budget=budget(plan, data),
                       columns=[v.label for v in plan.variants], pairs=[list(p) for p in plan.pairs],
                       seeds=list(plan.bench.seeds), reference=ref, run_ids=[r.run_id for r in plan.runs],
                       teachers={t.model: t.key for t in plan.teachers}, data_fingerprint=plan.data.fingerprint,
                       config=dataclasses.asdict(plan.bench), kdzoo=kdzoo.__version__,
                       unsupported=list(plan.unsupported))


def teachers_to_ensure(plan: Plan, todo: list[Cohort], store: Store) -> list[TeacherJob]:
    """Teachers that unfinished cohorts need, or whose record the store lacks (the table shows it)."""
    needed = {c.teacher.model for c in todo}
    return [t for t in plan.teachers if t.model in needed or not store.has_run(f"teacher-{t.key}")]


def run_local(ctx: Context, todo: list[Cohort]) -> None:
    """The default executor: the teachers, then one cohort after another, in this process."""
    teachers = {job.model: ensure_teacher(job, ctx) for job in teachers_to_ensure(ctx.plan, todo, ctx.store)}
    for i, cohort in enumerate(todo):
        ctx.say("cohort", f"[{i + 1}/{len(todo)}] {cohort.label}: {', '.join(r.variant.label for r in cohort.runs)}")
        t0 = time.perf_counter()
        run_cohort(cohort, teachers[cohort.teacher.model], ctx)
        ctx.say("cohort_done", f"{cohort.label} in {time.perf_counter() - t0:.0f}s")


@dataclass
class Outcome:
    """What a benchmark run did: runs trained now, runs already done, and the failed runs of the plan."""

    trained: int
    skipped: int
    failed: list[RunRecord | TeacherRecord]
    set_aside: list[Path]


def run_plan(plan: Plan, data: Data, registry: Registry, store: Store, device: torch.device,
             progress: Progress | None = None, say: Hook | None = None,
             executor: Executor = run_local) -> Outcome:
    """Execute the plan with ``executor``, skipping what the store already holds.

    A file in ``runs/`` that is not a valid record is moved to ``damaged/`` (said through ``say``) and its
    run is redone: only valid records count as done.
    """
    ctx = Context(plan, data, registry, store, device, progress or Progress(), say or (lambda event, detail: None))
    with store.lock():
        scan = store.scan()
        aside = []
        for error in scan.damaged:
            aside.append(store.set_aside(error))
            ctx.say("damaged", f"{error}. Kept it as {aside[-1]}; the run is redone.")
        store.write_bench(bench_summary(plan, data))
        todo = [c for c in plan.cohorts if not all(scan.done(r.run_id) for r in c.runs)]
        executor(ctx, todo)
        records = store.scan().records
    planned = {x.run_id for x in plan.runs}
    failed = [r for r in records.values() if r.status == "failed" and r.run_id in planned]
    trained = sum(len(c.runs) for c in todo)
    return Outcome(trained, len(plan.runs) - trained, failed, aside)


def prepare(path: str | Path, registry: Registry, device: str | None = None, cohorts: bool | None = None,
            data_source: str | None = None):
    """Read and validate a benchmark file; returns ``(plan, data, device)``. Nothing is trained."""
    from kdzoo.config import read_yaml

    bench = parse(BenchConfig, read_yaml(path))
    if cohorts is not None:
        bench.cohorts = cohorts
    if data_source is not None:
        bench.data.source = data_source
    dev = resolve_device(device or bench.device)
    data = load_data(registry, bench.data, dev)
    plan = expand(bench, data.shape(), registry)
    plan.flops = validate(plan, registry, data.train_y.cpu())
    return plan, data, dev


def estimate_seconds(plan: Plan, data: Data, registry: Registry, device: torch.device, steps: int = 2) -> float:
    """A rough time estimate from a short measured probe: a few training steps of each distinct cohort shape."""
    probes: dict[tuple, float] = {}
    total = 0.0
    for job in plan.teachers:
        if teacher_status(job) != "train":
            continue
        key = ("teacher", job.model)
        if key not in probes:
            probes[key] = _probe(registry, data, job.model, job.options, [], None, device, job.recipe, steps)
        total += probes[key] * len(data.train_y) * job.recipe.epochs
    teachers: dict[str, KDNet] = {}
    for c in plan.cohorts:
        key = (c.teacher.model, c.student.model, tuple(r.variant.label for r in c.runs))
        if key not in probes:
            if c.teacher.model not in teachers:
                torch.manual_seed(0)
                teachers[c.teacher.model] = KDNet(
                    registry.create_model(c.teacher.model, num_classes=data.num_classes, **c.teacher.options),
                    input_size=data.image_size)
            probes[key] = _probe(registry, data, c.student.model, c.student.options, [r.variant for r in c.runs],
                                 teachers[c.teacher.model], device, c.recipe, steps)
        total += probes[key] * len(data.train_y) * c.recipe.epochs
    return total * 1.1  # evaluation adds roughly a tenth


def _probe(registry: Registry, data: Data, model: str, options: dict[str, Any], variants: list[Variant],
           teacher: KDNet | None, device: torch.device, recipe: Recipe, steps: int) -> float:
    """Seconds per training image of one cohort shape: the second of two short epochs on a few real
    batches (the first one pays for warm-up)."""
    n = min(len(data.train_y), recipe.batch_size * steps)
    probe_data = Data(data.train_x[:n], data.train_y[:n], data.test_x[:2], data.test_y[:2],
                      class_names=data.class_names, mean=data.mean, std=data.std, pad=data.pad, flip=data.flip)
    members = []
    for v in variants or [Variant(BASELINE, BASELINE, {}, "")]:
        student = build_student(registry, model, options, 0, data.num_classes, data.image_size)
        try:
            method = build_method(registry, v.method, v.hparams, student.info, teacher.info if teacher else None, 0,
                                  teacher_net=teacher, train_labels=data.train_y)
        except PairNotSupported:  # n/a for this pair: nothing to time
            continue
        members.append(Member(v.label, student, method))
    # a constant schedule: the recipe's milestones lie beyond the probe's 2 epochs (and the lr does not change speed)
    probe_recipe = dataclasses.replace(recipe, epochs=2, batch_size=min(recipe.batch_size, n), compile=False,
                                       schedule="constant", milestones=[], warmup_epochs=0.0)
    (result, *_) = Trainer(members, probe_data, probe_recipe, teacher=teacher, seed=0, device=device).fit()
    return 1.0 / max(result["history"][-1]["train_img_per_s"], 1e-9) if result["history"] else 0.0
