"""Run a benchmark on Ray: one task per teacher, then one task per cohort (one GPU each when the
cluster has GPUs). This covers several GPUs of one machine (a local Ray instance) and a cluster
alike, behind the same ``kdzoo bench`` command: ``--executor ray [--ray-address ADDR]``.
``kdzoo tune --executor ray`` runs the search's workers as Ray tasks sharing one study
(:func:`tune_on_ray`).

Each task loads the plugins and the data itself, trains, and writes its results into the store
exactly as the local executor does, so the table, resume and failure handling are unchanged.
The store folder and ``$KDZOO_CACHE`` must be on a file system that every worker sees (on one
machine they are). Ray is an optional dependency: ``pip install "kdzoo[ray]"``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdzoo import KDZooError
from kdzoo.bench import Context, ensure_teacher, run_cohort, teachers_to_ensure
from kdzoo.plan import Cohort, Plan, TeacherJob, teacher_status
from kdzoo.records import TeacherRecord


def _task(kind: str, plan: Plan, item: TeacherJob | Cohort, teacher: TeacherRecord | None,
          root: str, disabled: list[str], threads: int) -> TeacherRecord | str:
    """Body of one Ray task (runs in a worker process)."""
    import torch

    from kdzoo.engine import Progress, resolve_device
    from kdzoo.plugins import load_plugins
    from kdzoo.runner import load_data
    from kdzoo.store import Store

    torch.set_num_threads(threads)  # as many as Ray granted: oversubscribed CPUs slow training tenfold
    registry = load_plugins(disable=disabled)
    device = resolve_device("auto")
    data = load_data(registry, plan.bench.data, device)
    if data.fingerprint != plan.data.fingerprint:
        raise KDZooError(f"A Ray worker sees different {plan.data.dataset} data than the driver "
                         f"({data.fingerprint[:12]} vs {plan.data.fingerprint[:12]}). Point every node at the same "
                         "data (KDZOO_DATA, or the benchmark's data.source).")
    ctx = Context(plan, data, registry, Store(root), device, Progress(), lambda e, d: None)
    if kind == "teacher":
        return ensure_teacher(item, ctx)
    run_cohort(item, teacher, ctx)
    return item.cohort_id


def require_ray() -> Any:
    """The ``ray`` module; ``KDZooError`` with the install command when it is missing."""
    try:
        import ray
    except ImportError as e:
        raise KDZooError('The Ray executor needs Ray: pip install "kdzoo[ray]" (or pip install ray).') from e
    return ray


def _init_ray(address: str | None) -> tuple[Any, dict]:
    """Ray, connected (``address``) or started locally, with kdzoo's environment passed to its workers."""
    ray = require_ray()
    env = {k: v for k, v in os.environ.items() if k.startswith("KDZOO_") or k == "OMP_WAIT_POLICY"}
    ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})
    return ray, ray.cluster_resources()


def _task_resources(ray: Any, resources: dict, per_node: int = 1) -> tuple[dict, int]:
    """(Ray options, torch threads) of one task: a GPU each where the cluster has GPUs; else the smallest node's
    CPUs shared by ``per_node`` tasks (oversubscribed CPUs slow training more than tenfold)."""
    if resources.get("GPU", 0) >= 1:
        return {"num_gpus": 1, "num_cpus": 1}, 1
    cpus = min(int(n["Resources"].get("CPU", 1)) for n in ray.nodes() if n["Alive"])
    threads = max(1, cpus // per_node)
    return {"num_cpus": threads}, threads


def _tune_task(file: str, out: str, device: str | None, data_source: str | None, disabled: list[str],
               threads: int) -> int:
    """Body of one Ray tuning worker: the search of ``kdzoo tune``, on the shared study; returns trials trained."""
    import torch

    from kdzoo import tune, tune_run
    from kdzoo.engine import Progress
    from kdzoo.plugins import load_plugins

    torch.set_num_threads(threads)
    registry = load_plugins(disable=disabled)
    setup = tune.prepare(file, registry, device=device, data_source=data_source)
    return tune_run.search(setup, registry, Path(out), Progress(), lambda e, d: None).trained_now


def tune_on_ray(file: str | Path, out: Path, registry: object, *, address: str | None = None,
                workers: int | None = None, device: str | None = None, data_source: str | None = None,
                say=lambda event, detail: None) -> int:
    """Run ``workers`` Ray tasks of ``kdzoo tune``'s search on the study in ``out`` (default: one per GPU, else one
    per node); they share it as processes do (see ``kdzoo.tune_run``). Returns the trials they trained. ``file``,
    ``out`` and ``$KDZOO_CACHE`` must be on a file system every worker sees."""
    ray, resources = _init_ray(address)
    gpus = int(resources.get("GPU", 0))
    nodes = sum(n["Alive"] for n in ray.nodes())
    workers = workers or gpus or nodes
    options, threads = _task_resources(ray, resources, per_node=-(-workers // nodes))
    say("cohort", f"Ray: {workers} tuning worker(s) on {gpus} GPU(s), {resources.get('CPU', 0):.0f} CPU(s); "
                  f"each takes {options}")
    task = ray.remote(max_retries=0, **options)(_tune_task)
    disabled = [p.name for p in registry.plugins if p.disabled]
    refs = [task.remote(str(Path(file).resolve()), str(out.resolve()), device, data_source, disabled, threads)
            for _ in range(workers)]
    return sum(ray.get(refs))


@dataclass
class RayExecutor:
    """A :class:`kdzoo.bench.Executor`: the plan's teachers, then the unfinished cohorts, as Ray tasks.

    ``address``: an existing cluster (None starts a local Ray instance)."""

    address: str | None = None

    def __call__(self, ctx: Context, todo: list[Cohort]) -> None:
        ray, resources = _init_ray(self.address)
        options, threads = _task_resources(ray, resources)  # on CPUs: one task per node
        task = ray.remote(max_retries=0, **options)(_task)
        disabled = [p.name for p in ctx.registry.plugins if p.disabled]
        root = str(Path(ctx.store.root).resolve())
        ctx.say("cohort", f"Ray: {resources.get('GPU', 0):.0f} GPU(s), {resources.get('CPU', 0):.0f} CPU(s); "
                          f"tasks take {options}")

        jobs = teachers_to_ensure(ctx.plan, todo, ctx.store)
        fresh = {j.model for j in jobs if teacher_status(j) == "train"}
        refs = {task.remote("teacher", ctx.plan, job, None, root, disabled, threads): job for job in jobs}
        teachers = {}
        for ref, job in refs.items():
            teachers[job.model] = ray.get(ref)
            ctx.say("teacher", f"{job.model}: ready (Ray)")
            ctx.progress.runs_done(job.model in fresh)
        pending = {task.remote("cohort", ctx.plan, c, teachers[c.teacher.model], root, disabled, threads): c
                   for c in todo}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            cohort = pending.pop(done[0])
            ray.get(done[0])  # re-raises a task's crash (a run's own failure is recorded in the store, not raised)
            ctx.say("cohort_done", f"{cohort.label}: done (Ray)")
            ctx.progress.runs_done(len(cohort.runs))
