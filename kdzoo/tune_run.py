"""`kdzoo tune`'s search: Optuna trials trained as cohorts on the validation split, pruned, resumable; its report.

Contract: :func:`search` runs the trials of a validated :class:`kdzoo.tune.TuneSetup` until its budget is
spent and returns a :class:`Outcome`. The study lives in Optuna's SQLite storage ``DIR/study.db``: every
trial, its per-epoch validation accuracy and its state (complete, pruned, failed) are there, so a search
resumes after any interruption without redoing a finished trial, and several processes may share it.

* **Validation only.** Trials train on the training split and are scored (and pruned) on ``data.val_size``
  images held out of it: the engine evaluates a view of the data whose evaluation split *is* the validation
  split, and the test split is never referenced. (A teacher that is not cached yet is trained first, exactly
  as ``kdzoo bench`` trains it; its record measures its test accuracy for the benchmark's table.)
* **Cohorts.** Up to ``search.cohort`` trials are asked at once and trained as one cohort of the engine's
  ``Trainer``: one teacher pass per batch, identical batches and initial weights (paired). After each epoch
  every trial reports its validation accuracy; a trial the pruner stops leaves the cohort at once.
* **Resume.** A trial left running by a dead process (each process holds an OS lock for its life) is marked
  failed and its parameters enqueued again; it does not count against the budget.
* **Sharing.** Processes on one study ask for trials one at a time (an OS lock beside ``study.db``); running
  trials count against the budget, so together they never exceed it. A process that finds trials asked by
  another since its own last ask reseeds its sampler with the study's trial count, so two processes started
  together (same seed) do not draw the same points; a lone process keeps one reproducible stream. Each
  process tells Optuna its trials' results before it reads the study back, so the last one to finish sees
  every trial finished (``kdzoo tune`` writes ``tuned.yaml`` only then).
"""
from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from kdzoo import KDZooError
from kdzoo.checkpoint import atomic_write, file_lock
from kdzoo.tune import TuneSetup, enqueued_points

PRUNED = "pruned by the search"
Say = Callable[[str, str], None]


def _optuna() -> Any:
    try:
        import optuna
    except ImportError as e:
        raise KDZooError("`kdzoo tune` needs Optuna, an optional extra: pip install 'kdzoo[tune]' "
                         "(or pip install 'optuna>=3.5').") from e
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _sampler(optuna: Any, setup: TuneSetup, seed: int) -> Any:
    s = setup.config.search
    cls = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}[s.sampler]
    try:
        return cls(**{"seed": seed, **s.sampler_options})
    except (TypeError, ValueError) as e:
        raise KDZooError(f"search.sampler_options does not suit Optuna's {cls.__name__}: {e}.") from e


def _pruner(optuna: Any, setup: TuneSetup) -> Any:
    s = setup.config.search
    cls = {"median": optuna.pruners.MedianPruner, "halving": optuna.pruners.SuccessiveHalvingPruner,
           "none": optuna.pruners.NopPruner}[s.pruner]
    try:
        return cls(**s.pruner_options)
    except (TypeError, ValueError) as e:
        raise KDZooError(f"search.pruner_options does not suit Optuna's {cls.__name__}: {e}.") from e


def open_study(setup: TuneSetup, out: Path) -> Any:
    """The study in ``out/study.db`` (created, with the points tried first, or loaded); ``KDZooError`` when the
    folder holds a search whose results this setup could not reuse."""
    optuna = _optuna()
    out.mkdir(parents=True, exist_ok=True)
    with file_lock(out / ".ask.lock"):  # two processes creating one storage race on its schema
        storage = optuna.storages.RDBStorage(f"sqlite:///{(out / 'study.db').resolve()}",
                                             engine_kwargs={"connect_args": {"timeout": 60}})
        study = optuna.create_study(study_name=setup.config.name, storage=storage, direction="maximize",
                                    load_if_exists=True, sampler=optuna.samplers.RandomSampler(seed=0))
        key = study.user_attrs.get("kdzoo_key")
        if key is None:
            study.set_user_attr("kdzoo_key", setup.key)
            for params, note in enqueued_points(setup.config, setup.spaces):
                study.enqueue_trial(params, user_attrs={"note": note}, skip_if_exists=True)
    if key is not None and key != setup.key:
        raise KDZooError(
            f"{out} holds a search of '{setup.config.name}' with another teacher, student, recipe, data, seed or "
            "space (or other plugin versions), whose trials cannot be mixed with this one's. Use another --out, or "
            f"delete {out / 'study.db'} to start over. (budget, search.sampler and search.pruner may change "
            "between runs: raise budget.trials and rerun to continue a search.)")
    # Seeded by the trials already there: a fresh run is reproducible, a resumed one draws new points.
    study.sampler = _sampler(optuna, setup, setup.config.search.seed + len(study.get_trials(deepcopy=False)))
    study.pruner = _pruner(optuna, setup)
    return study


def _recover(study: Any, workers: Path, me: str, say: Say) -> None:
    """Fail and re-enqueue the running trials of dead processes (their worker lock is free)."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        if worker == me:
            continue
        lock = workers / f"{worker}.lock"
        if worker and lock.is_file():
            with file_lock(lock, blocking=False) as free:
                if not free:
                    continue  # another process is training it
            lock.unlink(missing_ok=True)
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        study.enqueue_trial(t.params, user_attrs={"note": f"retry of trial {t.number}"})
        say("resume", f"trial {t.number} was interrupted; its parameters are tried again")


def epochs_per_trial(setup: TuneSetup) -> int:
    return setup.recipe.epochs + max(setup.plan.init_epochs.values(), default=0)


def spent(study: Any, per_trial: int) -> tuple[int, int]:
    """(trials, student epochs) the search has spent: finished, pruned and failed trials, and running ones at their
    full length; an interrupted trial (failed without an error: it is tried again) does not count."""
    from optuna.trial import TrialState

    trials = epochs = 0
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.WAITING or (t.state == TrialState.FAIL and "error" not in t.user_attrs):
            continue
        trials += 1
        epochs += t.user_attrs.get("epochs", per_trial) if t.state.is_finished() else per_trial
    return trials, epochs


def suggest(trial: Any, setup: TuneSetup) -> tuple[str, dict[str, Any]]:
    """The method and hyperparameter overrides of a trial (define-by-run: each method has its own parameters)."""
    method = trial.suggest_categorical("method", list(setup.spaces))
    space = setup.spaces[method]
    hparams = dict(space.fixed)
    for p in space.params:
        if p.kind == "choice":
            hparams[p.key] = trial.suggest_categorical(p.name, p.choices)
        elif p.kind == "int":
            hparams[p.key] = trial.suggest_int(p.name, p.low, p.high, step=p.step or 1, log=p.log)
        else:
            hparams[p.key] = trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)
    return method, hparams


def validation_view(data: Any) -> Any:
    """``data``'s training split, with its validation split in the place of the test split: what the engine
    evaluates each epoch. The test tensors are not referenced (nor read)."""
    from kdzoo.data import Data

    view = Data(data.train_x, data.train_y, data.val_x, data.val_y, class_names=data.class_names,
                fingerprint=f"{data.fingerprint}/val-as-eval", mean=data.mean, std=data.std, pad=data.pad,
                flip=data.flip, dataset=data.dataset, device=data.device)
    view.train_indices, view.test_indices = data.train_indices, data.val_indices
    return view


def train_trials(setup: TuneSetup, registry: Any, study: Any, trials: list[Any], teacher: Any, view: Any,
                 progress: Any) -> None:
    """Train ``trials`` as one cohort, reporting each epoch's validation top-1 and pruning; tell Optuna each result."""
    from optuna.trial import TrialState

    from kdzoo.engine import Member, Trainer
    from kdzoo.runner import build_method, build_student

    cfg, student_spec, teacher_model = setup.config, setup.student, setup.plan.teachers[0].model
    recipe = setup.recipe
    members: list[tuple[Any, Any]] = []
    for trial in trials:
        method, hparams = suggest(trial, setup)
        trial.set_user_attr("method", method)
        trial.set_user_attr("hparams", hparams)
        try:
            student = build_student(registry, student_spec.model, student_spec.options, cfg.seed,
                                    view.num_classes, view.image_size)
            built = build_method(registry, method, hparams, student.info, teacher.info, cfg.seed,
                                 pair=(teacher_model, student_spec.model), teacher_net=teacher,
                                 train_labels=view.train_y)
        except KDZooError as e:
            trial.set_user_attr("error", str(e))
            trial.set_user_attr("epochs", 0)
            study.tell(trial, state=TrialState.FAIL)
            continue
        members.append((trial, Member(f"trial {trial.number}", student, built,
                                      origin=registry.describe_origin(method))))
    if not members:
        return
    # Every cohort of a search sees the same batches: the teacher's logits are cached after the first one.
    trainer = Trainer([m for _, m in members], view, recipe, teacher=teacher, seed=cfg.seed, device=setup.device,
                      progress=progress, teacher_key=setup.plan.teachers[0].key)

    def main_epochs(m: Any) -> list[dict[str, Any]]:
        return [r for r in m.history if r.get("stage", "main") == "main"]

    reported = {m.label: 0 for _, m in members}

    def on_epoch(done: int) -> None:
        for trial, m in members:
            main = main_epochs(m)
            if m.error is not None or m.stopped is not None or len(main) == reported[m.label]:
                continue
            reported[m.label] = len(main)
            trial.report(main[-1]["test"]["top1"], len(main))  # "test" of the view: the validation split
            if len(main) < recipe.epochs and trial.should_prune():
                trainer.stop(m, PRUNED)  # the cohort trains on without it

    trainer.fit(on_epoch=on_epoch)
    for trial, m in members:
        main = main_epochs(m)
        trial.set_user_attr("epochs", len(m.history))
        trial.set_user_attr("val_top1", [r["test"]["top1"] for r in main])
        trial.set_user_attr("wall_time_s", m.wall_time)  # its epochs' share of the cohort's time
        if m.stopped == PRUNED:
            study.tell(trial, state=TrialState.PRUNED)
        elif m.error is not None or not main:
            trial.set_user_attr("error", m.error or "no epoch finished")
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, main[-1]["test"]["top1"])


def ensure_teacher_net(setup: TuneSetup, registry: Any, out: Path, progress: Any, say: Say) -> Any:
    """The frozen teacher: a checkpoint, the benchmark cache's, or trained now into that cache (as `kdzoo bench`)."""
    from kdzoo.bench import Context, ensure_teacher
    from kdzoo.plan import cached_teacher, load_job_teacher
    from kdzoo.store import Store

    job = setup.plan.teachers[0]
    if not job.checkpoint and cached_teacher(job) is None:
        ctx = Context(setup.plan, setup.data, registry, Store(out), setup.device, progress, say)
        record = ensure_teacher(job, ctx)
        if record.status != "ok":
            raise KDZooError(f"The teacher {job.model} failed to train, so nothing can be tuned: {record.error}")
    net, _ = load_job_teacher(job, registry, setup.data)
    return net


@dataclass
class Outcome:
    """What the study holds once the search stopped (read back from the storage)."""

    trials: list[Any]  # optuna FrozenTrial, by number
    best: Any | None  # the best complete trial
    per_trial: int  # student epochs of a full trial
    dims: int
    trained_now: int = 0

    @property
    def running(self) -> list[int]:
        """Trials another process is still training (this one has finished all of its own)."""
        return [t.number for t in self.trials if t.state.name == "RUNNING"]


def search(setup: TuneSetup, registry: Any, out: Path, progress: Any, say: Say, *,
           after_cohort: Callable[[int], None] | None = None) -> Outcome:
    """Run trials, cohort by cohort, until the budget is spent; resumable, shareable (see the module docstring).

    ``after_cohort(trials_trained_so_far)`` runs after each cohort (tests interrupt the search there)."""
    study = open_study(setup, out)
    per_trial = epochs_per_trial(setup)
    budget = setup.config.budget
    workers = out / "workers"
    me = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    teacher = view = None
    trained = 0
    seen = len(study.get_trials(deepcopy=False))  # open_study seeded the sampler with this count
    with file_lock(workers / f"{me}.lock"):
        try:
            while True:
                with file_lock(out / ".ask.lock"):  # recovery and asking: one process at a time
                    now = len(study.get_trials(deepcopy=False))
                    if now != seen:  # another process asked meanwhile: draw from a stream of its own
                        study.sampler = _sampler(_optuna(), setup, setup.config.search.seed + now)
                    _recover(study, workers, me, say)
                    n_trials, n_epochs = spent(study, per_trial)
                    n = min(setup.config.search.cohort, budget.trials - n_trials,
                            (budget.epochs - n_epochs) // per_trial if budget.epochs is not None else budget.trials)
                    if n <= 0:
                        break
                    if teacher is None:  # only when there is something to train
                        teacher = ensure_teacher_net(setup, registry, out, progress, say)
                        view = validation_view(setup.data)
                    trials = [study.ask() for _ in range(n)]
                    for t in trials:
                        t.set_user_attr("worker", me)
                    seen = len(study.get_trials(deepcopy=False))
                say("cohort", f"trials {', '.join(str(t.number) for t in trials)} "
                              f"({n_trials + n}/{budget.trials} of the budget)")
                train_trials(setup, registry, study, trials, teacher, view, progress)
                trained += len(trials)
                if after_cohort is not None:
                    after_cohort(trained)
        finally:
            (workers / f"{me}.lock").unlink(missing_ok=True)
    return read_outcome(study, setup, trained)


def read_outcome(study: Any, setup: TuneSetup, trained_now: int = 0) -> Outcome:
    """The study's trials as they stand (read back from the storage), with the best complete one."""
    all_trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    complete = [t for t in all_trials if t.state.name == "COMPLETE"]
    best = max(complete, key=lambda t: (t.value, -t.number)) if complete else None
    return Outcome(all_trials, best, epochs_per_trial(setup), setup.dims, trained_now)


# -- the report -------------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def budget_line(outcome: Outcome) -> str:
    """The epochs the search trained against a grid of as many points, each trained to the end."""
    counted = [t for t in outcome.trials if t.state.name in ("COMPLETE", "PRUNED")
               or (t.state.name == "FAIL" and "error" in t.user_attrs)]
    n = len(counted)
    used = sum(t.user_attrs.get("epochs", 0) for t in counted)
    grid = n * outcome.per_trial
    pruned = sum(t.state.name == "PRUNED" for t in counted)
    per_dim = max(1, round(n ** (1 / max(1, outcome.dims))))
    share = f", {100 * used / grid:.0f}% of it" if grid else ""
    return (f"Budget: {n} trials ({pruned} pruned) trained {used} student epochs; a grid of the same {n} points "
            f"(about {per_dim} value{'s' if per_dim != 1 else ''} on each of {outcome.dims} dimension"
            f"{'s' if outcome.dims != 1 else ''}) trains every point for {outcome.per_trial}: {grid} epochs{share}.")


def render(outcome: Outcome, setup: TuneSetup, console: Any) -> None:
    """The trials (validation top-1 per epoch, state) and the best settings, as rich tables."""
    from rich.table import Table

    table = Table(title=f"{setup.config.name}: trials (top-1 on {len(setup.data.val_y):,} validation images)")
    for col in ("trial", "method", "hyperparameters", "state", "val top-1 per epoch", "val top-1", "note"):
        table.add_column(col, justify="right" if col in ("trial", "val top-1") else "left")
    for t in outcome.trials:
        if t.state.name == "WAITING":
            continue
        searched = {k.split(".", 1)[1]: v for k, v in t.params.items() if k != "method"}
        curve = " ".join(f"{v:.1f}" for v in t.user_attrs.get("val_top1", []))
        value = f"{t.value:.2f}" if t.value is not None and t.state.name == "COMPLETE" else ""
        state = t.state.name.lower() if "error" in t.user_attrs or t.state.name != "FAIL" else "interrupted"
        note = t.user_attrs.get("note", "") + (f" {t.user_attrs['error'][:60]}" if "error" in t.user_attrs else "")
        style = "bold green" if outcome.best is not None and t.number == outcome.best.number else None
        hparams = ", ".join(f"{k}={_fmt(v)}" for k, v in searched.items())
        table.add_row(str(t.number), t.params.get("method", ""), hparams, state, curve, value, note.strip(),
                      style=style)
    console.print(table)
    if outcome.best is None:
        console.print("[yellow]No trial finished yet[/]: rerun to continue, or raise budget.trials.")
    else:
        b = outcome.best
        hp = ", ".join(f"{k}={_fmt(v)}" for k, v in b.user_attrs["hparams"].items())
        console.print(f"Best: trial {b.number}, [bold]{b.user_attrs['method']}[/] {hp}: validation top-1 "
                      f"[bold]{b.value:.2f}%[/] after {outcome.per_trial} epochs.", highlight=False)
    console.print(budget_line(outcome), highlight=False)


def write_bench(outcome: Outcome, setup: TuneSetup, path: Path) -> tuple[Path, str]:
    """A benchmark file: the tuning file's teacher, student, data and recipes, each searched method at its
    published defaults and the best trial as ``METHOD(tuned)``, over ``bench_seeds``. Returns (path, note)."""
    from kdzoo.methods import coerce_hparams

    assert outcome.best is not None
    cfg, raw = setup.config, setup.raw
    method, hparams = outcome.best.user_attrs["method"], outcome.best.user_attrs["hparams"]
    methods: list[Any] = list(setup.spaces)
    cls_defaults = setup.spaces[method].defaults
    note = ""
    if coerce_hparams(method, cls_defaults, hparams) == cls_defaults:
        note = f"the best trial is {method} at its published defaults, so the benchmark has no separate tuned column"
    else:
        methods.append({"name": method, "label": f"{method}(tuned)", **hparams})
    bench: dict[str, Any] = {"name": f"{cfg.name}-tuned",
                             "description": f"{method}(tuned): best of {len(outcome.trials)} trials of `kdzoo tune "
                                            f"{setup.path}` (validation top-1 {outcome.best.value:.2f}%), against "
                                            "the published defaults on the test set."}
    for key in ("data", "recipe", "teacher_recipe", "student_recipe", "device"):
        if key in raw:
            bench[key] = raw[key]
    bench.update(teachers=[cfg.teacher], students=[cfg.student], seeds=list(cfg.bench_seeds), methods=methods)
    header = (f"# Written by `kdzoo tune {setup.path}` from trial {outcome.best.number} of "
              f"{path.parent / 'study.db'}.\n"
              f"# Run it with: kdzoo bench {path}\n")
    text = header + yaml.safe_dump(bench, sort_keys=False, allow_unicode=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))  # processes sharing the study each write it
    return path, note
