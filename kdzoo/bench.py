"""The benchmark runner: executes a validated plan, with the teacher cache, cohorts and resume.

Data flows one way: ``BenchConfig`` → ``Plan`` (teachers to train or reuse, cohorts of runs;
``kdzoo.plan``, checked by ``kdzoo.validation``) → training (here) → ``Store`` (one JSON per run) → report.

Contract: :func:`run_plan` hands the plan's unfinished cohorts to an :class:`Executor` (:func:`run_local`
by default, ``kdzoo.distributed.RayExecutor`` on Ray), which trains or reuses their teachers
(:func:`ensure_teacher`) and trains each cohort (:func:`run_cohort`), writing every record into the store.
Everything a caller needs stays importable from here: the plan types and :func:`expand` (``kdzoo.plan``),
:func:`validate` and :func:`prepare` (``kdzoo.validation``) and :func:`estimate_seconds` (``kdzoo.estimate``).

* **Teachers** are trained once and cached under ``$KDZOO_CACHE/teachers/<key>`` (see ``kdzoo.plan``).
* **Cohorts.** Runs sharing (teacher, seed) train together across students (see ``kdzoo.plan``,
  ``kdzoo.engine``): one teacher pass per batch, paired and bit-identical to solo runs.
  ``cohorts: false`` trains each run alone.
* **Resume.** After every epoch a cohort (or teacher) saves its full training state
  atomically; finished runs are written atomically to the store and skipped next time. Run
  the same command again after any interruption and it continues where it stopped.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

import kdzoo
from kdzoo import cache_dir
from kdzoo.checkpoint import file_lock, load_checkpoint, save_checkpoint
from kdzoo.data import Data
from kdzoo.engine import Member, Progress, Trainer, count_params
from kdzoo.estimate import estimate_seconds
from kdzoo.models import KDNet
from kdzoo.observers import ObservedProgress, ObserverSet, RunInfo, resolve_observers
from kdzoo.plan import (BASELINE, Cohort, Plan, RunSpec, TeacherJob, Variant, cached_teacher, expand,
                        expand_variants, load_job_teacher, logit_cache_roles, provenance, teacher_status)
from kdzoo.plugins import NATIVE_FORMAT, Registry
from kdzoo.records import BenchRecord, BestEpoch, RunRecord, Scores, TeacherRecord, TeacherRef
from kdzoo.runner import build_method, build_student, data_info, environment, save_run_checkpoint
from kdzoo.store import Store, write_json
from kdzoo.validation import prepare, validate

__all__ = [
    # the plan (kdzoo.plan), its validation (kdzoo.validation) and the time estimate (kdzoo.estimate)
    "BASELINE", "Cohort", "Plan", "RunSpec", "TeacherJob", "Variant", "cached_teacher", "expand", "expand_variants",
    "load_job_teacher", "provenance", "teacher_status", "prepare", "validate", "estimate_seconds",
    # execution (this module)
    "Context", "Executor", "Hook", "Outcome", "bench_summary", "budget", "ensure_teacher", "run_cohort", "run_local",
    "run_plan", "teachers_to_ensure",
    # used through this module by the CLI and the tests
    "Progress", "cache_dir",
]


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


def _scores(result: dict[str, Any]) -> dict[str, Any]:
    """The engine's result dict → the typed record fields they share."""
    return {"status": result["status"], "error": result["error"], "epochs_done": result["epochs_done"],
            "history": result["history"], "wall_time_s": result.get("wall_time_s"),
            "img_per_s": result.get("img_per_s"),
            "last": Scores(**result["last"]) if result.get("last") else None,
            "best": BestEpoch(**result["best"]) if result.get("best") else None}


@torch.inference_mode()
def _test_metrics(net: KDNet, data: Data, device: torch.device) -> dict[str, float]:
    """A frozen network's test metrics (float32), as ``kdzoo.metrics.classification_metrics`` gives them."""
    from kdzoo.metrics import classification_metrics

    net.to(device)
    logits = torch.cat([net(x).logits.float() for x, _ in data.eval_batches("test")])
    return classification_metrics(logits, data.test_y)


def ensure_teacher(job: TeacherJob, ctx: Context) -> TeacherRecord:
    """Train (or reuse) a teacher; return its record (also written into the store).

    Training holds an OS lock in the teacher's cache folder: a second process that needs the same teacher
    (another benchmark, a Ray worker, a `kdzoo tune` sharing a study) waits for it and reuses the result."""
    run_id = f"teacher-{job.key}"
    if job.checkpoint:
        net, ckpt = load_job_teacher(job, ctx.registry, ctx.data)
        meta = ckpt.get("meta", {})
        last = Scores(top1=float(meta["top1"])) if isinstance(meta.get("top1"), (int, float)) else None
        if job.format != NATIVE_FORMAT:  # a foreign file records no accuracy on this data: measure it on the test split
            ctx.say("teacher", f"{job.model}: {job.format} checkpoint, measuring its test accuracy")
            last = Scores(**_test_metrics(net, ctx.data, ctx.device))
        record = TeacherRecord(run_id=run_id, key=job.key, model=job.model, seed=job.seed, status="ok",
                               source="checkpoint", checkpoint=job.checkpoint, params=count_params(net), last=last,
                               provenance=job.provenance)
    else:
        record = cached_teacher(job)
        if record is None:
            def waiting() -> None:
                ctx.say("teacher", f"{job.model}: another process is training it; waiting to reuse it")

            with file_lock(job.dir / ".train.lock", on_wait=waiting):
                record = cached_teacher(job)  # trained meanwhile by the process this one waited for
                if record is None:
                    return _train_teacher(job, run_id, ctx)
        ctx.say("teacher", f"{job.model}: cached ({job.dir})")
    ctx.store.write_run(record)
    return record


def _train_teacher(job: TeacherJob, run_id: str, ctx: Context) -> TeacherRecord:
    """Train a teacher into the cache (resumable, observed like a run); its record goes into the store."""
    ctx.say("teacher", f"{job.model}: training ({job.recipe.epochs} epochs)")
    student = build_student(ctx.registry, job.model, job.options, job.seed, ctx.data.num_classes,
                            ctx.data.image_size)
    method = build_method(ctx.registry, BASELINE, {}, student.info, None, job.seed)
    member = Member(f"teacher {job.model}", student, method)
    observed = _observe_teacher(job, run_id, member, ctx)
    trainer = Trainer([member], ctx.data, job.recipe, seed=job.seed, device=ctx.device,
                      progress=observed or ctx.progress)
    try:
        (result,) = _run_trainer(trainer, job.dir / "state.pt", ctx.say)
    except BaseException as e:  # the observers learn that the run stopped, then the error goes on
        if observed is not None:
            observed.end_all(e)
        raise
    record = TeacherRecord(run_id=run_id, key=job.key, model=job.model, seed=job.seed, source="trained",
                           params=count_params(student), recipe=dataclasses.asdict(job.recipe),
                           data=data_info(ctx.data), provenance=job.provenance, **_scores(result),
                           environment=environment(ctx.device, precision=trainer.precision))
    if record.status == "ok":
        save_run_checkpoint(job.checkpoint_path, job.model, job.options, student, method, result, ctx.data,
                            job.seed, key=job.key)
        write_json(job.dir / "metrics.json", record)
        (job.dir / "state.pt").unlink(missing_ok=True)
    ctx.store.write_run(record)
    if observed is not None:
        (observers,) = observed.runs.values()
        observers.artifact(ctx.store.run_path(run_id))
        observers.end(result)
    return record


def _observe_teacher(job: TeacherJob, run_id: str, member: Member, ctx: Context) -> ObservedProgress | None:
    """The benchmark's observers for a teacher it trains (method ce, no teacher); None without any."""
    specs = resolve_observers(ctx.registry, ctx.plan.bench.loggers)
    if not specs:
        return None
    bench = ctx.plan.bench
    info = RunInfo(run_id=run_id, name=f"teacher {job.model} s{job.seed}", method=BASELINE,
                   hparams=dict(member.method.hparams), student=job.model, teacher=None, seed=job.seed,
                   folder=ctx.store.root / "logs" / run_id, results_dir=ctx.store.root, experiment=bench.name,
                   config={"benchmark": bench.name, "teacher": job.model, "options": job.options,
                           "recipe": dataclasses.asdict(job.recipe), "data": dataclasses.asdict(bench.data)})
    observers = ObserverSet(specs, info, report=lambda message: ctx.say("warning", f"warning: {message}"))
    return ObservedProgress(ctx.progress, {member.label: observers}, [member])


def run_cohort(cohort: Cohort, teacher: TeacherRecord, ctx: Context) -> None:
    """Train the cohort's unfinished runs (resuming if possible) and write one record per run."""
    ref = TeacherRef(model=cohort.teacher.model, key=cohort.teacher.key, params=teacher.params,
                     top1=teacher.last.top1 if teacher.last else None,
                     best_top1=teacher.best.top1 if teacher.best else None)
    common = {"cohort_id": cohort.cohort_id, "teacher": ref, "seed": cohort.seed,
              "recipe": dataclasses.asdict(cohort.recipe)}
    identity = {run.run_id: {"run_id": run.run_id, "model": run.student.model, "model_options": run.student.options,
                             "method": run.variant.method, "variant": run.variant.label,
                             "hparams_override": run.variant.hparams, "provenance": run.provenance}
                for run in cohort.runs}
    if teacher.status != "ok":
        for run in cohort.runs:
            ctx.store.write_run(RunRecord(**common, **identity[run.run_id], status="failed",
                                          error=f"teacher {cohort.teacher.model} failed: {teacher.error}"))
        return
    teacher_net, _ = load_job_teacher(cohort.teacher, ctx.registry, ctx.data)
    members = []
    for run in cohort.runs:
        student = build_student(ctx.registry, run.student.model, run.student.options, cohort.seed,
                                ctx.data.num_classes, ctx.data.image_size)
        method = build_method(ctx.registry, run.variant.method, run.variant.hparams, student.info, teacher_net.info,
                              cohort.seed, pair=(cohort.teacher.model, run.student.model), teacher_net=teacher_net,
                              train_labels=ctx.data.train_y)
        members.append(Member(cohort.member_label(run), student, method,
                              origin=ctx.registry.describe_origin(run.variant.method)))
    observed = _observe(cohort, members, ctx)
    logit_key = cohort.teacher.key if logit_cache_roles(ctx.plan, ctx.registry)[cohort.cohort_id] else None
    trainer = Trainer(members, ctx.data, cohort.recipe, teacher=teacher_net, seed=cohort.seed, device=ctx.device,
                      progress=observed or ctx.progress, teacher_key=logit_key)
    state_path = ctx.store.cohort_path(cohort.cohort_id)
    try:
        results = _run_trainer(trainer, state_path, ctx.say)
    except BaseException as e:  # the observers learn that the runs stopped, then the error goes on
        if observed is not None:
            observed.end_all(e)
        raise
    env = environment(ctx.device, precision=trainer.precision)
    if trainer.logit_cache is not None:  # the cohort's epochs (trained by this process) that read the teacher's logits
        env["teacher_logits_from_cache"] = len(trainer.cached_epochs)
    for run, member, result in zip(cohort.runs, members, results):
        if ctx.store.has_run(run.run_id):
            continue  # written before an interruption
        ctx.store.write_run(RunRecord(
            **common, **identity[run.run_id], **_scores(result), hparams=result["hparams"],
            params=result["params"]["student"], method_params=result["params"]["method"],
            flops=ctx.plan.flops.get(run.student.model), data=data_info(ctx.data), environment=env))
        if observed is not None and member.label in observed.runs:
            observed.runs[member.label].artifact(ctx.store.run_path(run.run_id))
            observed.runs[member.label].end(result)
    state_path.unlink(missing_ok=True)


def _observe(cohort: Cohort, members: list[Member], ctx: Context) -> ObservedProgress | None:
    """The benchmark's observers (``loggers:``, ``--log``), one set per unfinished run of the cohort; None
    without any. A run's own folder is ``<results>/logs/<run_id>`` (TensorBoard writes there)."""
    specs = resolve_observers(ctx.registry, ctx.plan.bench.loggers)
    if not specs:
        return None
    bench = ctx.plan.bench
    runs = {}
    for run, member in zip(cohort.runs, members):
        if ctx.store.has_run(run.run_id):
            continue
        info = RunInfo(
            run_id=run.run_id, name=f"{run.variant.label} {cohort.teacher.model} → {run.student.model} s{cohort.seed}",
            method=run.variant.method, hparams=dict(member.method.hparams), student=run.student.model,
            teacher=cohort.teacher.model, seed=cohort.seed, folder=ctx.store.root / "logs" / run.run_id,
            results_dir=ctx.store.root, experiment=bench.name, cohort_id=cohort.cohort_id,
            config={"benchmark": bench.name, "variant": run.variant.label, "hparams_override": run.variant.hparams,
                    "student_options": run.student.options, "recipe": dataclasses.asdict(cohort.recipe),
                    "data": dataclasses.asdict(bench.data)})
        runs[member.label] = ObserverSet(specs, info, report=lambda message: ctx.say("warning", f"warning: {message}"))
    return ObservedProgress(ctx.progress, runs, members)


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
        ctx.say("cohort", f"[{i + 1}/{len(todo)}] {cohort.label}: {', '.join(cohort.member_label(r) for r in cohort.runs)}")
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
