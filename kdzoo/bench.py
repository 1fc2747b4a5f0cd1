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
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import kdzoo
from kdzoo import KDZooError
from kdzoo.checkpoint import load_checkpoint, save_checkpoint
from kdzoo.config import BenchConfig, Recipe, StudentSpec, TeacherSpec, parse
from kdzoo.data import CifarData
from kdzoo.engine import Member, Progress, Trainer, count_params, resolve_device
from kdzoo.models import KDNet
from kdzoo.plugins import Registry
from kdzoo.runner import (NUM_CLASSES, build_method, build_student, data_info, environment, load_data, load_teacher,
                          save_run_checkpoint)
from kdzoo.store import Store, write_json

BASELINE = "ce"


def _hash(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def cache_dir() -> Path:
    return Path(os.environ.get("KDZOO_CACHE") or Path.home() / ".cache" / "kdzoo")


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
    data_fingerprint: str
    teachers: list[TeacherJob]
    cohorts: list[Cohort]
    variants: list[Variant]
    pairs: list[tuple[str, str]]
    flops: dict[str, int] = field(default_factory=dict)

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


def expand(bench: BenchConfig, data_fingerprint: str) -> Plan:
    """Expand a benchmark into teachers and cohorts. Pure: touches no model and no file."""
    if not bench.teachers or not bench.students:
        raise KDZooError("A benchmark needs at least one entry under `teachers:` and one under `students:`.")
    if not bench.seeds:
        raise KDZooError("`seeds:` is empty; give at least one seed, e.g. seeds: [0, 1, 2].")
    variants = expand_variants(bench.methods)
    teacher_specs = [_as_spec(TeacherSpec, t, f"teachers[{i}]") for i, t in enumerate(bench.teachers)]
    student_specs = [_as_spec(StudentSpec, s, f"students[{i}]") for i, s in enumerate(bench.students)]
    for i, t in enumerate(teacher_specs):
        if not t.model:
            raise KDZooError(f"teachers[{i}] needs a `model:` (also with a checkpoint, so that the table can name it).")

    teachers: dict[str, TeacherJob] = {}
    for i, t in enumerate(teacher_specs):
        recipe = _recipe(bench.recipe, bench.teacher_recipe, t.recipe, path=f"teachers[{i}].recipe")
        if t.checkpoint:
            key = "ckpt-" + _hash({"path": str(Path(t.checkpoint).resolve())})
        else:
            key = _hash({"model": t.model, "options": t.options, "seed": t.seed, "recipe": dataclasses.asdict(recipe),
                         "data": data_fingerprint, "kdzoo": kdzoo.__version__, "num_classes": NUM_CLASSES})
        if t.model in teachers:
            raise KDZooError(f"teachers[{i}]: teacher '{t.model}' is listed twice; the table has one row per teacher → student pair.")
        teachers[t.model] = TeacherJob(key, t.model, t.options, t.seed, recipe, t.checkpoint)

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
                run_id = _hash({"teacher": teacher.key, "student": dataclasses.asdict(student), "method": v.method,
                                "hparams": v.hparams, "seed": seed, "recipe": dataclasses.asdict(student_recipe),
                                "data": data_fingerprint, "kdzoo": kdzoo.__version__})
                runs.append(RunSpec(run_id, v, seed))
            groups = [runs] if bench.cohorts else [[r] for r in runs]
            for group in groups:
                cohort_id = _hash({"runs": [r.run_id for r in group]})
                cohorts.append(Cohort(cohort_id, teacher, student, seed, student_recipe, group))
    return Plan(bench, data_fingerprint, list(teachers.values()), cohorts, variants, pairs)


# -- validation --------------------------------------------------------------------------------
def validate(plan: Plan, registry: Registry) -> dict[str, int]:
    """Build every model and every method on a dry forward, before any training.

    Returns forward FLOPs per image of each student. Errors name the YAML path.
    """
    from torch.utils.flop_counter import FlopCounterMode

    nets: dict[str, KDNet] = {}

    def net(model: str, options: dict[str, Any], path: str) -> KDNet:
        if model not in nets:
            try:
                nets[model] = KDNet(registry.create_model(model, num_classes=NUM_CLASSES, **options)).eval()
            except KDZooError as e:
                raise KDZooError(f"{path}: {e}") from e
        return nets[model]

    flops: dict[str, int] = {}
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([0, 1])
    for i, t in enumerate(plan.teachers):
        if t.checkpoint:  # fails early with a clear message if unreadable or of another model
            found = load_checkpoint(t.checkpoint)["model"]
            if found != t.model:
                raise KDZooError(f"teachers[{i}]: the checkpoint {t.checkpoint} holds a '{found}', not a "
                                 f"'{t.model}'. Set `model: {found}` or point to the right checkpoint.")
        net(t.model, t.options, f"teachers[{i}]")
    for t_name, s_name in plan.pairs:
        cohort = next(c for c in plan.cohorts if c.teacher.model == t_name and c.student.model == s_name)
        teacher = nets[t_name]
        student = net(s_name, cohort.student.options, "students")
        if s_name not in flops:
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                student(x[:1])
            flops[s_name] = counter.get_total_flops()
        for v in plan.variants:
            where = f"{v.path} ({v.label}) with teacher {t_name} → student {s_name}"
            try:
                method = build_method(registry, v.method, v.hparams, student.info, teacher.info, 0)
                with torch.no_grad():
                    t_out = teacher(x, features=method.needs_features, embedding=method.needs_embedding)
                    s_out = student(x, features=method.needs_features, embedding=method.needs_embedding)
                method.train()
                terms = method(s_out, t_out if method.needs_teacher else None, y)
                if not isinstance(terms, dict) or not terms:
                    raise KDZooError(f"the method returned {type(terms).__name__}, not a dict of loss terms")
            except KDZooError as e:
                raise KDZooError(f"{where}: {e}") from e
            except Exception as e:
                raise KDZooError(
                    f"{where}: the method fails on a dry forward ({type(e).__name__}: {e}). "
                    "This pair cannot be distilled with it; change the pair or the method's options."
                ) from e
    return flops


# -- execution ---------------------------------------------------------------------------------
Hook = Callable[[str, str], None]  # (event, detail): progress messages from the runner


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


def ensure_teacher(job: TeacherJob, plan: Plan, data: CifarData, registry: Registry, store: Store,
                   device: torch.device, progress: Progress, say: Hook) -> dict[str, Any]:
    """Train (or reuse) a teacher; return its record (also written into the store)."""
    run_id = f"teacher-{job.key}"
    if job.checkpoint:
        net, ckpt = load_teacher(registry, job.checkpoint)
        top1 = ckpt.get("meta", {}).get("top1")
        record = {"run_id": run_id, "kind": "teacher", "status": "ok", "error": None, "model": job.model,
                  "teacher": None, "student": {"model": job.model, "params": count_params(net)},
                  "method": BASELINE, "variant": "teacher", "seed": job.seed, "checkpoint": job.checkpoint, "key": job.key,
                  "last": {"top1": top1} if top1 is not None else None, "best": None, "source": "checkpoint"}
        store.write_run(record)
        return record
    metrics_path = job.dir / "metrics.json"
    if job.checkpoint_path.is_file() and metrics_path.is_file():
        say("teacher", f"{job.model}: cached ({job.dir})")
        record = json.loads(metrics_path.read_text())
    else:
        say("teacher", f"{job.model}: training ({job.recipe.epochs} epochs)")
        student = build_student(registry, job.model, job.options, job.seed)
        method = build_method(registry, BASELINE, {}, student.info, None, job.seed)
        member = Member(f"teacher {job.model}", student, method)
        trainer = Trainer([member], data, job.recipe, seed=job.seed, device=device, progress=progress)
        (result,) = _run_trainer(trainer, job.dir / "state.pt", say)
        record = {**result, "run_id": run_id, "kind": "teacher", "model": job.model, "teacher": None,
                  "student": {"model": job.model, "params": count_params(student)}, "variant": "teacher",
                  "seed": job.seed, "key": job.key, "recipe": dataclasses.asdict(job.recipe),
                  "data": data_info(data), "environment": environment(device, job.recipe)}
        if result["status"] == "ok":
            save_run_checkpoint(job.checkpoint_path, job.model, job.options, student, method, result, data, job.seed,
                                key=job.key)
            write_json(metrics_path, record)
            (job.dir / "state.pt").unlink(missing_ok=True)
    store.write_run(record)
    return record


def run_cohort(cohort: Cohort, teacher_record: dict[str, Any], plan: Plan, data: CifarData, registry: Registry,
               store: Store, device: torch.device, progress: Progress, say: Hook) -> None:
    """Train the cohort's unfinished runs (resuming if possible) and write one record per run."""
    teacher_info = {"model": cohort.teacher.model, "key": cohort.teacher.key,
                    "top1": (teacher_record.get("last") or {}).get("top1"),
                    "best_top1": (teacher_record.get("best") or {}).get("top1"),
                    "params": teacher_record["student"]["params"]}
    common = {"kind": "student", "cohort_id": cohort.cohort_id, "teacher": teacher_info,
              "recipe": dataclasses.asdict(cohort.recipe), "seed": cohort.seed}
    if teacher_record["status"] != "ok":
        for run in cohort.runs:
            store.write_run({**common, **_identity(cohort, run), "status": "failed",
                             "error": f"teacher {cohort.teacher.model} failed: {teacher_record.get('error')}"})
        return
    teacher, _ = load_teacher(registry, cohort.teacher.checkpoint_path)
    members = []
    for run in cohort.runs:
        student = build_student(registry, cohort.student.model, cohort.student.options, cohort.seed)
        method = build_method(registry, run.variant.method, run.variant.hparams, student.info, teacher.info, cohort.seed)
        members.append(Member(run.variant.label, student, method, origin=registry.describe_origin(run.variant.method)))
    trainer = Trainer(members, data, cohort.recipe, teacher=teacher, seed=cohort.seed, device=device, progress=progress)
    state_path = store.cohort_path(cohort.cohort_id)
    results = _run_trainer(trainer, state_path, say)
    env = environment(device, cohort.recipe)
    for run, member, result in zip(cohort.runs, members, results):
        if store.has_run(run.run_id):
            continue  # written before an interruption
        store.write_run({**common, **result, **_identity(cohort, run),
                         "student": {"model": cohort.student.model, "params": count_params(member.student)},
                         "flops": plan.flops.get(cohort.student.model), "data": data_info(data),
                         "environment": env})
    state_path.unlink(missing_ok=True)


def _identity(cohort: Cohort, run: RunSpec) -> dict[str, Any]:
    return {"run_id": run.run_id, "method": run.variant.method, "variant": run.variant.label,
            "hparams_override": run.variant.hparams, "student": {"model": cohort.student.model},
            "label": f"{cohort.teacher.model} → {cohort.student.model} {run.variant.label} seed {cohort.seed}"}


def budget(plan: Plan, data: CifarData) -> str:
    r = plan.cohorts[0].recipe if plan.cohorts else plan.bench.recipe
    return (f"{r.epochs} student epochs ({r.schedule}, lr {r.lr}, batch {r.batch_size}), "
            f"{len(data.train_y):,} train / {len(data.test_y):,} test images")


def bench_summary(plan: Plan, data: CifarData) -> dict[str, Any]:
    """What ``bench.json`` holds: enough for ``kdzoo report`` to render without the YAML."""
    ref = dataclasses.asdict(plan.bench.reference) if plan.bench.reference else None
    return {"name": plan.bench.name, "description": plan.bench.description, "budget": budget(plan, data),
            "columns": [v.label for v in plan.variants], "pairs": [list(p) for p in plan.pairs],
            "seeds": plan.bench.seeds, "reference": ref, "run_ids": [r.run_id for r in plan.runs],
            "teachers": {t.model: t.key for t in plan.teachers}, "data_fingerprint": plan.data_fingerprint,
            "config": dataclasses.asdict(plan.bench), "kdzoo": kdzoo.__version__}


def teachers_to_ensure(plan: Plan, todo: list[Cohort], store: Store) -> list[TeacherJob]:
    """Teachers that unfinished cohorts need, or whose record the store lacks (the table shows it)."""
    needed = {c.teacher.model for c in todo}
    return [t for t in plan.teachers if t.model in needed or not store.has_run(f"teacher-{t.key}")]


def run_plan(plan: Plan, data: CifarData, registry: Registry, store: Store, device: torch.device,
             progress: Progress | None = None, say: Hook | None = None, executor: str = "local",
             ray_address: str | None = None) -> dict[str, Any]:
    """Execute the plan, skipping what the store already holds. Returns counts of what happened.

    ``executor="ray"`` runs each teacher and each cohort as a Ray task (see ``kdzoo.distributed``);
    results, resume and the table are the same.
    """
    progress = progress or Progress()
    say = say or (lambda event, detail: None)
    with store.lock():
        store.write_bench(bench_summary(plan, data))
        todo = [c for c in plan.cohorts if not all(store.has_run(r.run_id) for r in c.runs)]
        if executor == "ray":
            from kdzoo.distributed import run_on_ray

            run_on_ray(plan, todo, registry, store, progress, say, address=ray_address)
        elif executor == "local":
            teacher_records = {job.model: ensure_teacher(job, plan, data, registry, store, device, progress, say)
                               for job in teachers_to_ensure(plan, todo, store)}
            for i, cohort in enumerate(todo):
                say("cohort", f"[{i + 1}/{len(todo)}] {cohort.label}: {', '.join(r.variant.label for r in cohort.runs)}")
                t0 = time.perf_counter()
                run_cohort(cohort, teacher_records[cohort.teacher.model], plan, data, registry, store, device,
                           progress, say)
                say("cohort_done", f"{cohort.label} in {time.perf_counter() - t0:.0f}s")
        else:
            raise KDZooError(f"Unknown executor '{executor}'. Use local or ray.")
    planned = {x.run_id for x in plan.runs}
    failed = [r for r in store.runs() if r.get("status") == "failed" and r["run_id"] in planned]
    trained = sum(len(c.runs) for c in todo)
    return {"trained": trained, "skipped": len(planned) - trained, "failed": failed}


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
    data = load_data(bench.data, dev)
    plan = expand(bench, data.fingerprint)
    plan.flops = validate(plan, registry)
    return plan, data, dev


def estimate_seconds(plan: Plan, data: CifarData, registry: Registry, device: torch.device, steps: int = 2) -> float:
    """A rough time estimate from a short measured probe: a few training steps of each distinct cohort shape."""
    probes: dict[tuple, float] = {}
    total = 0.0
    for job in plan.teachers:
        if job.checkpoint or (job.checkpoint_path.is_file() and (job.dir / "metrics.json").is_file()):
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
                    registry.create_model(c.teacher.model, num_classes=NUM_CLASSES, **c.teacher.options))
            probes[key] = _probe(registry, data, c.student.model, c.student.options, [r.variant for r in c.runs],
                                 teachers[c.teacher.model], device, c.recipe, steps)
        total += probes[key] * len(data.train_y) * c.recipe.epochs
    return total * 1.1  # evaluation adds roughly a tenth


def _probe(registry: Registry, data: CifarData, model: str, options: dict[str, Any], variants: list[Variant],
           teacher: KDNet | None, device: torch.device, recipe: Recipe, steps: int) -> float:
    """Seconds per training image of one cohort shape: the second of two short epochs on a few real
    batches (the first one pays for warm-up)."""
    n = min(len(data.train_y), recipe.batch_size * steps)
    probe_data = CifarData(data.train_x[:n], data.train_y[:n], data.test_x[:2], data.test_y[:2])
    members = []
    for v in variants or [Variant(BASELINE, BASELINE, {}, "")]:
        student = build_student(registry, model, options, 0)
        method = build_method(registry, v.method, v.hparams, student.info, teacher.info if teacher else None, 0)
        members.append(Member(v.label, student, method))
    probe_recipe = dataclasses.replace(recipe, epochs=2, batch_size=min(recipe.batch_size, n), compile=False)
    (result, *_) = Trainer(members, probe_data, probe_recipe, teacher=teacher, seed=0, device=device).fit()
    return 1.0 / max(result["history"][-1]["train_img_per_s"], 1e-9) if result["history"] else 0.0
