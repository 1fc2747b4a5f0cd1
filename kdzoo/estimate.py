"""Time estimates for ``kdzoo bench --dry-run``.

Contract: :func:`estimate_seconds` times a few real training steps of each distinct cohort shape of a
plan (and of each teacher still to train) on the plan's device and scales them to the full schedule. It
writes nothing, touches neither the store nor the teacher cache, and imports only the plan side
(``kdzoo.plan``), never the runner (``kdzoo.bench``).
"""
from __future__ import annotations

import dataclasses

import torch

from kdzoo.config import Recipe, StudentSpec
from kdzoo.data import Data
from kdzoo.engine import Member, Trainer
from kdzoo.methods import PairNotSupported
from kdzoo.models import KDNet
from kdzoo.plan import BASELINE, Plan, Variant, teacher_status
from kdzoo.plugins import Registry
from kdzoo.runner import build_method, build_student


def estimate_seconds(plan: Plan, data: Data, registry: Registry, device: torch.device, steps: int = 2) -> float:
    """A rough time estimate from a short measured probe: a few training steps of each distinct cohort shape."""
    probes: dict[tuple, float] = {}
    total = 0.0
    for job in plan.teachers:
        if teacher_status(job) != "train":
            continue
        key = ("teacher", job.model)
        if key not in probes:
            baseline = (StudentSpec(job.model, job.options), Variant(BASELINE, BASELINE, {}, ""))
            probes[key] = _probe(registry, data, [baseline], None, device, job.recipe, steps)
        total += probes[key] * len(data.train_y) * job.recipe.epochs
    teachers: dict[str, KDNet] = {}
    for c in plan.cohorts:
        key = (c.teacher.model, tuple((r.student.model, r.variant.label) for r in c.runs))
        if key not in probes:
            if c.teacher.model not in teachers:
                torch.manual_seed(0)
                teachers[c.teacher.model] = KDNet(
                    registry.create_model(c.teacher.model, num_classes=data.num_classes, **c.teacher.options),
                    input_size=data.image_size)
            probes[key] = _probe(registry, data, [(r.student, r.variant) for r in c.runs],
                                 teachers[c.teacher.model], device, c.recipe, steps)
        total += probes[key] * len(data.train_y) * c.recipe.epochs
    return total * 1.1  # evaluation adds roughly a tenth


def _probe(registry: Registry, data: Data, runs: list[tuple[StudentSpec, Variant]],
           teacher: KDNet | None, device: torch.device, recipe: Recipe, steps: int) -> float:
    """Seconds per training image of one cohort shape: the second of two short epochs on a few real
    batches (the first one pays for warm-up)."""
    n = min(len(data.train_y), recipe.batch_size * steps)
    probe_data = Data(data.train_x[:n], data.train_y[:n], data.test_x[:2], data.test_y[:2],
                      class_names=data.class_names, mean=data.mean, std=data.std, pad=data.pad, flip=data.flip,
                      device=data.device)
    members = []
    for i, (spec, v) in enumerate(runs):
        student = build_student(registry, spec.model, spec.options, 0, data.num_classes, data.image_size)
        try:
            method = build_method(registry, v.method, v.hparams, student.info, teacher.info if teacher else None, 0,
                                  teacher_net=teacher, train_labels=data.train_y)
        except PairNotSupported:  # n/a for this pair: nothing to time
            continue
        members.append(Member(f"{i}:{spec.model}/{v.label}", student, method))
    # a constant schedule: the recipe's milestones lie beyond the probe's 2 epochs (and the lr does not change speed)
    probe_recipe = dataclasses.replace(recipe, epochs=2, batch_size=min(recipe.batch_size, n), compile=False,
                                       schedule="constant", milestones=[], warmup_epochs=0.0)
    (result, *_) = Trainer(members, probe_data, probe_recipe, teacher=teacher, seed=0, device=device).fit()
    return 1.0 / max(result["history"][-1]["train_img_per_s"], 1e-9) if result["history"] else 0.0
