"""Run a benchmark on Ray: one task per teacher, then one task per cohort (one GPU each when the
cluster has GPUs). This covers several GPUs of one machine (a local Ray instance) and a cluster
alike, behind the same ``kdzoo bench`` command: ``--executor ray [--ray-address ADDR]``.

Each task loads the plugins and the data itself, trains, and writes its results into the store
exactly as the local executor does, so the table, resume and failure handling are unchanged.
The store folder and ``$KDZOO_CACHE`` must be on a file system that every worker sees (on one
machine they are). Ray is an optional dependency: ``pip install "kdzoo[ray]"``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kdzoo import KDZooError
from kdzoo.bench import Cohort, Hook, Plan, TeacherJob, ensure_teacher, run_cohort, teachers_to_ensure
from kdzoo.engine import Progress
from kdzoo.plugins import Registry
from kdzoo.runner import load_data
from kdzoo.store import Store


def _task(kind: str, plan: Plan, item: TeacherJob | Cohort, teacher_record: dict[str, Any] | None,
          root: str, disabled: list[str], threads: int) -> dict[str, Any] | str:
    """Body of one Ray task (runs in a worker process)."""
    import torch

    from kdzoo.engine import resolve_device
    from kdzoo.plugins import load_plugins

    torch.set_num_threads(threads)  # as many as Ray granted: oversubscribed CPUs slow training tenfold
    registry = load_plugins(disable=disabled)
    device = resolve_device("auto")
    data = load_data(plan.bench.data, device)
    if data.fingerprint != plan.data_fingerprint:
        raise KDZooError(f"A Ray worker sees different CIFAR-10 data than the driver ({data.fingerprint[:12]} vs "
                         f"{plan.data_fingerprint[:12]}). Point KDZOO_DATA at the same file on every node.")
    store = Store(root)
    quiet = Progress()
    if kind == "teacher":
        return ensure_teacher(item, plan, data, registry, store, device, quiet, lambda e, d: None)
    run_cohort(item, teacher_record, plan, data, registry, store, device, quiet, lambda e, d: None)
    return item.cohort_id


def run_on_ray(plan: Plan, todo: list[Cohort], registry: Registry, store: Store, progress: Progress, say: Hook,
               address: str | None = None) -> None:
    """Train the plan's teachers, then the unfinished cohorts, as Ray tasks; wait for all of them."""
    try:
        import ray
    except ImportError as e:
        raise KDZooError('The Ray executor needs Ray: pip install "kdzoo[ray]" (or pip install ray).') from e
    env = {k: v for k, v in os.environ.items() if k.startswith("KDZOO_")}
    ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})
    resources = ray.cluster_resources()
    if resources.get("GPU", 0) >= 1:
        options, threads = {"num_gpus": 1, "num_cpus": 1}, 1
    else:  # one task per node: concurrent CPU training processes slow each other more than tenfold
        cpus = min(int(n["Resources"].get("CPU", 1)) for n in ray.nodes() if n["Alive"])
        options, threads = {"num_cpus": cpus}, cpus
    task = ray.remote(max_retries=0, **options)(_task)
    disabled = [p.name for p in registry.plugins if p.disabled]
    root = str(Path(store.root).resolve())
    say("cohort", f"Ray: {resources.get('GPU', 0):.0f} GPU(s), {resources.get('CPU', 0):.0f} CPU(s); "
                  f"tasks take {options}")

    jobs = teachers_to_ensure(plan, todo, store)
    fresh = {j.model for j in jobs if not j.checkpoint and not (j.dir / "metrics.json").is_file()}
    teacher_refs = {task.remote("teacher", plan, job, None, root, disabled, threads): job for job in jobs}
    teacher_records = {}
    for ref, job in teacher_refs.items():
        teacher_records[job.model] = ray.get(ref)
        say("teacher", f"{job.model}: ready (Ray)")
        progress.runs_done(job.model in fresh)
    pending = {task.remote("cohort", plan, c, teacher_records[c.teacher.model], root, disabled, threads): c
               for c in todo}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        cohort = pending.pop(done[0])
        ray.get(done[0])  # re-raises a task's crash (a run's own failure is recorded in the store, not raised)
        say("cohort_done", f"{cohort.label}: done (Ray)")
        progress.runs_done(len(cohort.runs))
