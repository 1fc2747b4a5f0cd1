"""Time estimates for ``kdzoo bench --dry-run``.

Contract: :func:`estimate_seconds` times a few real training steps of each distinct cohort shape of a
plan (and of each teacher still to train) on the plan's device and scales them to the full schedule. A
cohort that will read its teacher's logits from the cache (``kdzoo.plan.logit_cache_roles``) is charged
its probe less the teacher's forward pass, timed on the same images. It writes nothing, touches neither
the store nor the teacher cache, and imports only the plan side (``kdzoo.plan``), never the runner
(``kdzoo.bench``).
"""
from __future__ import annotations

import dataclasses
import time

import torch

from kdzoo.config import Recipe, StudentSpec
from kdzoo.data import Data
from kdzoo.engine import Member, Trainer
from kdzoo.methods import PairNotSupported
from kdzoo.models import KDNet
from kdzoo.plan import BASELINE, Plan, Variant, logit_cache_roles, teacher_status
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
    roles = logit_cache_roles(plan, registry)
    for c in plan.cohorts:
        from_cache = roles[c.cohort_id] == "read"
        key = (c.teacher.model, tuple((r.student.model, r.variant.label) for r in c.runs), from_cache)
        if key not in probes:
            if c.teacher.model not in teachers:
                torch.manual_seed(0)
                teachers[c.teacher.model] = KDNet(
                    registry.create_model(c.teacher.model, num_classes=data.num_classes, **c.teacher.options),
                    input_size=data.image_size)
            probes[key] = _probe(registry, data, [(r.student, r.variant) for r in c.runs],
                                 teachers[c.teacher.model], device, c.recipe, steps, from_cache)
        total += probes[key] * len(data.train_y) * c.recipe.epochs
    return total * 1.1  # evaluation adds roughly a tenth


def _probe(registry: Registry, data: Data, runs: list[tuple[StudentSpec, Variant]],
           teacher: KDNet | None, device: torch.device, recipe: Recipe, steps: int, from_cache: bool = False) -> float:
    """Seconds per training image of one cohort shape: the second of two short epochs on a few real
    batches (the first one pays for warm-up). ``from_cache``: without the teacher's forward pass, which a
    cohort reading cached logits makes only on each epoch's first batch (the check)."""
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
    trainer = Trainer(members, probe_data, probe_recipe, teacher=teacher, seed=0, device=device)
    (result, *_) = trainer.fit()
    seconds = 1.0 / max(result["history"][-1]["train_img_per_s"], 1e-9) if result["history"] else 0.0
    if from_cache and teacher is not None:
        saved = _teacher_seconds(trainer, teacher, n) * (1 - 1 / data.steps_per_epoch(recipe.batch_size))
        seconds = max(seconds - saved, 0.1 * seconds)  # the floor only guards against a noisy probe
    return seconds


def _teacher_seconds(trainer: Trainer, teacher: KDNet, n: int) -> float:
    """Seconds per image of the teacher's forward pass over the probe's training images, as the trainer runs
    it (its dtype and memory format): the second of two passes."""
    for _ in range(2):
        t0 = time.perf_counter()
        float(trainer.predict(teacher, "train").sum())  # .sum() on the host: waits for a GPU
        elapsed = time.perf_counter() - t0
    return elapsed / n
