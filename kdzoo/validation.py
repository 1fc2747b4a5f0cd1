"""Benchmark validation: a :class:`~kdzoo.plan.Plan` checked end to end before anything trains.

Contract: :func:`validate` builds every model and every method of a plan and takes a dry training step
of each, so that a benchmark fails in seconds with a message naming the YAML entry instead of hours
into training; it drops the cells a method cannot serve (``PairNotSupported``) from the plan and records
them in ``plan.unsupported``, and fills ``plan.init_epochs``. :func:`prepare` reads a benchmark file,
loads its data and returns the expanded, validated plan. Nothing here trains, writes results or imports
the runner (``kdzoo.bench``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kdzoo import KDZooError
from kdzoo.checkpoint import load_checkpoint
from kdzoo.config import BenchConfig, parse
from kdzoo.data import Data
from kdzoo.engine import resolve_device
from kdzoo.methods import PairNotSupported
from kdzoo.models import KDNet
from kdzoo.plan import Plan, Variant, cohort_id, expand, load_job_teacher
from kdzoo.plugins import NATIVE_FORMAT, Registry
from kdzoo.runner import build_method, load_data
from kdzoo.teachers import foreign_formats_hint


def validate(plan: Plan, registry: Registry, train_labels: torch.Tensor | None = None) -> dict[str, int]:
    """Build every model and every method and take a dry training step of each at the smallest
    batch it will train on (``kdzoo.preflight.preflight``), before any training; refuse two method
    entries that are the same run once defaults are applied.

    A method that cannot serve a pair (``PairNotSupported``) does not stop the benchmark: its runs for
    that pair leave the plan and the cell is recorded in ``plan.unsupported`` (the report shows n/a).
    ``train_labels`` (the training split's, for methods that bind them) default to stand-ins of the
    right size. Returns forward FLOPs per image of each student. Errors name the YAML path.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from kdzoo.data import train_batch_sizes
    from kdzoo.preflight import preflight

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
                load_job_teacher(t, registry, shape)
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
        cohort = next(c for c in plan.cohorts if c.teacher.model == t_name and any(r.student.model == s_name for r in c.runs))
        spec = next(r.student for r in cohort.runs if r.student.model == s_name)
        teacher = nets[t_name]
        student = net(s_name, spec.options, "students")
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
            kept = [r for r in c.runs if (c.teacher.model, r.student.model, r.variant.label) not in gone]
            if len(kept) != len(c.runs):
                c.runs, c.cohort_id = kept, cohort_id(kept)
        plan.cohorts = [c for c in plan.cohorts if c.runs]
    return flops


def prepare(path: str | Path, registry: Registry, device: str | None = None, cohorts: bool | None = None,
            data_source: str | None = None) -> tuple[Plan, Data, torch.device]:
    """Read and validate a benchmark file; returns ``(plan, data, device)``. Nothing is trained."""
    from kdzoo.config import read_yaml

    raw = read_yaml(path)
    if isinstance(raw, dict) and "budget" in raw and "teacher" in raw:
        raise KDZooError(f"{path} is a tuning file (it has `teacher:` and `budget:`), not a benchmark: run "
                         f"`kdzoo tune {path}`, then `kdzoo bench` on the tuned.yaml it writes.")
    bench = parse(BenchConfig, raw)
    if cohorts is not None:
        bench.cohorts = cohorts
    if data_source is not None:
        bench.data.source = data_source
    dev = resolve_device(device or bench.device)
    data = load_data(registry, bench.data, dev)
    plan = expand(bench, data.shape(), registry)
    plan.flops = validate(plan, registry, data.train_y.cpu())
    return plan, data, dev
