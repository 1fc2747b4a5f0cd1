"""Training throughput of kdzoo, measured against the anchors' way of training, in one process.

    KDZOO_DATA=/path/to/cifar10.npz python benchmarks/throughput.py [--device cpu|cuda] [--quick] [--json PATH]
        [--ablate] [--only P1,P3] [--batch-size N] [--window STEPS] [--windows N] [--warmup N]

Rows (images per second are medians over timed windows, after untimed warm-up windows):

* **P1** kdzoo's engine (``Trainer``, resnet56 -> resnet20, ``kd``) against a hand-written
  RepDistiller-style loop: a ``Dataset`` over the same uint8 arrays returning PIL images,
  ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize``, a
  ``DataLoader`` with the best ``num_workers`` of {0, 1, 2} (measured first; ``--anchor-workers``
  sets the candidates, e.g. ``4,8,12`` on a many-core GPU host), teacher under
  ``no_grad``, ``loss.item()`` and top-1 per step as the anchors log them.
* **P2** a cohort of five members (ce, kd, fitnets, attention, rkd) in one ``Trainer`` against
  the same five trained one after another (five ``Trainer``); the ratio is the cost of the
  cohort relative to the separate runs for the same images.
* **P3** the engine against a minimal loop written here over the *same* tensor data path
  (``Data.train_batches``), the same models, method, optimiser, memory format and autocast
  dtype: the engine's overhead.
* **P4** the data path alone (``train_batches`` over one epoch) against DataLoader + PIL (best
  ``num_workers``) over a fixed number of batches.
* **P5** resnet20 trained with ``ce`` in the engine, converted to FLOP/s (3x the forward FLOPs
  counted by ``torch.utils.flop_counter``) against the fp32 matmul peak measured in this run.
* **P7** one cohort for every student of a teacher against one cohort per student: wrn_40_2 ->
  wrn_16_2 and wrn_40_1 (the published tables' pair shape: the teacher costs more than each student),
  ``COHORT``'s five methods per student. The shared cohort runs the teacher once per batch instead of
  once per student; the ratio is its cost relative to the per-student cohorts for the same images.
* **P8** evaluation's share of a quick-benchmark epoch: ``benchmarks/quick.yaml``'s cohort (resnet32 ->
  resnet20 and wrn_16_1, its five methods each, batch 128). Each window trains one epoch on a subset,
  then evaluates every member on quick's 2,000 test images at the default ``eval_batch_size`` and at
  1,000 (the default before 2026-12-03); the share is evaluation / (evaluation + training), with the
  training time scaled to quick's 5,000 training images.
* **P9** a later cohort of logit-only methods (kd, dkd, dist: a ``kdzoo tune`` cohort's shape) reading the
  teacher's training logits from the cache (``kdzoo.logit_cache``) against the same cohort running the teacher,
  on P7's pair (wrn_40_2 -> wrn_16_2). The cached side runs the teacher on one batch per epoch (the check);
  the cache is filled before timing.
* **P6** the cost of each method's main-stage training step relative to ``ce`` (resnet56 ->
  resnet20, every first-party method with its defaults; an init stage is timed separately as
  ``<name> init``), and the peak memory of each: users choose methods by cost too.

How it is timed. Competing configurations are *interleaved*: every round runs one window of
each (order reversed on odd rounds), so load from other processes hits them alike; ratios are
the median of the per-round ratios. An engine window is one ``Trainer.train_epoch`` call on a
training subset of exactly ``window`` batches; its time is the engine's own ``epoch_time_s``
(from before the first batch is drawn to after the last step, with a host sync on GPU), so the
per-epoch evaluation (on 10 test images here) is excluded. The other loops are timed with
``time.perf_counter`` around the same number of steps, including the DataLoader iterator's start.
Memory: peak RSS of this process per configuration (``/proc/self/clear_refs`` resets the peak
between windows; DataLoader workers are not included) or the CUDA peak allocated.

Run it on an otherwise idle machine. On a shared 2-core CPU another busy process does not just
take its share: torch's worker threads wait for each other at every operator, so a step can get
tens of times slower, and more so for configurations with more (smaller) operators. Interleaving
spreads that over the configurations, but ratios measured under such load are not meaningful;
the table prints the load average before and after.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdzoo import KDZooError
from kdzoo.config import Recipe
from kdzoo.data import Data, prepare_data
from kdzoo_plugins.cifar10 import MEAN as CIFAR10_MEAN
from kdzoo_plugins.cifar10 import STD as CIFAR10_STD
from kdzoo_plugins.cifar10 import load_cifar10
from kdzoo.engine import Member, Trainer, autocast_dtype, resolve_device
from kdzoo.plugins import Registry, load_plugins
from kdzoo.precision import choose as choose_precision
from kdzoo.precision import cpu_name, native_bf16
from kdzoo.runner import build_method, build_student

TEACHER, STUDENT = "resnet56", "resnet20"
COHORT = ("ce", "kd", "fitnets", "attention", "rkd")
CROSS_TEACHER, CROSS_STUDENTS = "wrn_40_2", ("wrn_16_2", "wrn_40_1")  # P7
QUICK_TEACHER, QUICK_STUDENTS = "resnet32", ("resnet20", "wrn_16_1")  # P8: benchmarks/quick.yaml's networks
QUICK_TRAIN_IMAGES = 5000  # P8: quick.yaml's training subset
FIRST_PARTY = ("kdzoo",)  # the distribution whose methods P6 times (kdzoo's own, the builtin ce included)
SEED = 0


@dataclass(frozen=True)
class Settings:
    """Sizes of one benchmark run."""

    batch_size: int = 128
    window: int = 2  # training steps per timed window
    windows: int = 3  # timed windows per configuration
    warmup: int = 1  # untimed windows per configuration before timing
    select_windows: int = 1  # timed windows per num_workers candidate when choosing it
    data_images: int | None = None  # images in P4's kdzoo epoch; None = the full training set
    anchor_data_steps: int = 30  # batches per P4 DataLoader window
    matmul_n: int = 2048
    matmul_reps: int = 8
    anchor_workers: tuple[int, ...] = (0, 1, 2)  # DataLoader num_workers candidates for the anchor loops
    eval_images: int = 2000  # P8's test images (quick.yaml's test split)
    eval_train_images: int = 1000  # P8's training subset per window (its time is scaled to quick's 5,000)
    p9_steps: int = 20  # P9's batches per window (one epoch; the cached side checks its first batch live)


FULL = Settings()
# window=2: a training subset of window x batch_size = 16 images, at least one per class (prepare_data requires it)
QUICK = Settings(batch_size=8, window=2, windows=2, warmup=0, select_windows=1, data_images=1024,
                 anchor_data_steps=2, matmul_n=256, matmul_reps=4, eval_images=40, eval_train_images=40, p9_steps=2)


# ---------------------------------------------------------------------------------------------
# Measurement plumbing


class PeakMemory:
    """Peak resident memory (CPU, bytes) or peak CUDA allocation since the last ``reset``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.resettable = device.type == "cuda" or self._clear_refs()
        self.kind = "CUDA max allocated" if device.type == "cuda" else (
            "peak RSS" if self.resettable else "process peak RSS (not resettable here)")

    @staticmethod
    def _clear_refs() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (Linux >= 4.0)
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            self._clear_refs()

    def read(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclass
class Measurement:
    """The samples of one configuration (img/s unless ``unit`` says otherwise)."""

    label: str
    samples: list[float] = field(default_factory=list)
    peak_bytes: int = 0
    unit: str = "img/s"

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "median": self.median, "samples": self.samples, "unit": self.unit,
                "peak_mb": self.peak_bytes / 2**20}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleave(runners: dict[str, Callable[[int], float]], windows: int, warmup: int, mem: PeakMemory,
               units: dict[str, str] | None = None) -> dict[str, Measurement]:
    """Run ``warmup`` untimed then ``windows`` timed rounds; each round calls every runner once.

    A runner takes the window number (used as the epoch, so each window sees fresh augmentation)
    and returns its rate. Odd rounds run the runners in reverse order.
    """
    names = list(runners)
    out = {n: Measurement(n, unit=(units or {}).get(n, "img/s")) for n in names}
    for w in range(warmup):
        for n in names:
            runners[n](w)
    for w in range(windows):
        for n in names if w % 2 == 0 else names[::-1]:
            mem.reset()
            out[n].samples.append(float(runners[n](warmup + w)))
            out[n].peak_bytes = max(out[n].peak_bytes, mem.read())
    return out


def paired_ratio(a: Measurement, b: Measurement) -> float:
    """Median over rounds of a/b (both measured in the same rounds)."""
    return statistics.median(x / y for x, y in zip(a.samples, b.samples))


# ---------------------------------------------------------------------------------------------
# kdzoo's side


def bench_recipe(batch_size: int, **kw: Any) -> Recipe:
    # Many epochs so the cosine schedule stays near its peak whatever window is timed.
    return Recipe(epochs=100_000, batch_size=batch_size, **kw)  # evaluation (P8) at the default eval_batch_size


def make_member(registry: Registry, method: str, teacher: nn.Module | None, seed: int = SEED,
                labels: torch.Tensor | None = None, **hparams: Any) -> Member:
    student = build_student(registry, STUDENT, {}, seed, num_classes=10)
    info = teacher.info if teacher is not None else None
    if labels is None:
        labels = torch.arange(50_000) % 10  # a full CIFAR-10-sized memory bank for methods that keep one
    return Member(method, student, build_method(registry, method, hparams, student.info, info, seed,
                                                pair=(TEACHER, STUDENT), teacher_net=teacher, train_labels=labels))


def make_teacher(registry: Registry, data: Data | None = None) -> nn.Module:
    """Untrained but fixed: a teacher's weights do not change its speed. With ``data``, its BatchNorm statistics
    are measured on a few batches first, so that its logits have a trained net's scale (with the initial
    statistics they reach 1e4, and a method that learns from their scale, like ctkd's temperature, diverges)."""
    teacher = build_student(registry, TEACHER, {}, SEED + 1, num_classes=10)
    if data is not None:
        bns = [m for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average over the calibration batches
        teacher.train()
        with torch.no_grad():
            for x, _ in data.train_batches(SEED, 0, 64):
                teacher(x)
        for bn in bns:
            bn.momentum = 0.1
    return teacher.eval().requires_grad_(False)


def engine_runner(trainer: Trainer, members_per_image: int = 1) -> Callable[[int], float]:
    """One ``train_epoch`` per window; the rate is the engine's own images/s (evaluation excluded)."""

    def run(epoch: int) -> float:
        trainer.train_epoch(epoch)
        failed = [m for m in trainer.members if m.error]
        if failed:
            raise RuntimeError(f"benchmark member failed: {failed[0].label}: {failed[0].error}")
        return members_per_image * trainer.members[0].history[-1]["train_img_per_s"]

    return run


def separate_runner(trainers: list[Trainer], members_per_image: int = 1) -> Callable[[int], float]:
    """Each trainer runs the window in turn; the rate is member-images over the total time."""

    def run(epoch: int) -> float:
        images, seconds = 0, 0.0
        for t in trainers:
            t.train_epoch(epoch)
            failed = [m for m in t.members if m.error]
            if failed:
                raise RuntimeError(f"benchmark member failed: {failed[0].label}: {failed[0].error}")
            images += t.steps_per_epoch * t.recipe.batch_size * members_per_image
            seconds += t.members[0].history[-1]["epoch_time_s"]
        return images / seconds

    return run


def minimal_runner(registry: Registry, data: Data, recipe: Recipe, device: torch.device) -> Callable[[int], float]:
    """The least code that trains the same student with the same method, memory format and autocast
    dtype as the engine under ``recipe``, on the same batches."""
    fmt = torch.channels_last if recipe.channels_last else torch.contiguous_format
    teacher = make_teacher(registry).to(device, memory_format=fmt)
    m = make_member(registry, "kd", teacher)
    student, method = m.student.to(device, memory_format=fmt), m.method.to(device)
    student.train()
    opt = torch.optim.SGD(list(student.parameters()) + list(method.parameters()), lr=0.05, momentum=0.9,
                          weight_decay=5e-4)
    amp = autocast_dtype(recipe, device)

    def run(epoch: int) -> float:
        sync(device)
        t0, n = time.perf_counter(), 0
        for x, y in data.train_batches(SEED, epoch, recipe.batch_size):
            x = x.contiguous(memory_format=fmt)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                with torch.no_grad():
                    t_out = teacher(x)
                loss = sum(method(student(x), t_out, y).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += len(y)
        sync(device)
        return n / (time.perf_counter() - t0)

    return run


def data_runner(data: Data, batch_size: int, device: torch.device) -> Callable[[int], float]:
    def run(epoch: int) -> float:
        sync(device)
        t0, n = time.perf_counter(), 0
        for x, y in data.train_batches(SEED, epoch, batch_size):
            n += len(y)
        sync(device)
        return n / (time.perf_counter() - t0)

    return run


# ---------------------------------------------------------------------------------------------
# The anchors' side: torchvision-style dataset, PIL transforms, DataLoader


class PILCifar(torch.utils.data.Dataset):
    """torchvision's ``CIFAR10.__getitem__``: a PIL image from the HWC uint8 array, then ``transform``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def anchor_dataset(path: str) -> PILCifar:
    import torchvision.transforms as T

    raw = load_cifar10(path)
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    return PILCifar(raw.x_train, raw.y_train, transform)


def anchor_loader(ds: PILCifar, batch_size: int, workers: int, device: torch.device) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                                       pin_memory=device.type == "cuda", persistent_workers=workers > 0)


class AnchorKD:
    """RepDistiller's ``train_distill`` step for ``kd``: 0.1 * CE + 0.9 * KL at T=4, SGD 0.05/0.9/5e-4."""

    def __init__(self, student: nn.Module, teacher: nn.Module, device: torch.device) -> None:
        self.student, self.teacher, self.device = student.to(device).train(), teacher.to(device).eval(), device
        self.opt = torch.optim.SGD(self.student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        self.T = 4.0

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with torch.no_grad():
            logit_t = self.teacher(x)
        logit_s = self.student(x)
        loss_cls = F.cross_entropy(logit_s, y)
        loss_div = F.kl_div(F.log_softmax(logit_s / self.T, dim=1), F.softmax(logit_t / self.T, dim=1),
                            reduction="batchmean") * self.T ** 2
        loss = 0.1 * loss_cls + 0.9 * loss_div
        acc1 = (logit_s.argmax(1) == y).float().mean().item() * 100  # the anchors log these every step
        value = loss.item()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return value, acc1

    def runner(self, loader: torch.utils.data.DataLoader, steps: int) -> Callable[[int], float]:
        def run(epoch: int) -> float:
            sync(self.device)
            t0, n = time.perf_counter(), 0
            it = iter(loader)
            for _ in range(steps):
                x, y = next(it)
                self.step(x, y)
                n += len(y)
            sync(self.device)
            return n / (time.perf_counter() - t0)

        return run


def anchor_data_runner(loader: torch.utils.data.DataLoader, steps: int, device: torch.device) -> Callable[[int], float]:
    def run(epoch: int) -> float:
        t0, n = time.perf_counter(), 0
        it = iter(loader)
        for _ in range(steps):
            x, y = next(it)
            x = x.to(device, non_blocking=True)
            n += len(y)
        sync(device)
        return n / (time.perf_counter() - t0)

    return run


# ---------------------------------------------------------------------------------------------
# FLOPs and the matmul peak


def forward_flops_per_image(model: nn.Module, device: torch.device, batch: int = 8) -> float:
    """FLOPs of one forward pass per image, by ``torch.utils.flop_counter`` (convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    x = torch.randn(batch, 3, 32, 32, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    model.train(was)
    return counter.get_total_flops() / batch


def matmul_runner(n: int, reps: int, device: torch.device, dtype: torch.dtype = torch.float32) -> Callable[[int], float]:
    """FLOP/s of ``reps`` (n x n) @ (n x n) products in ``dtype``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)

    def run(epoch: int) -> float:
        torch.mm(a, b, out=c)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=c)
        sync(device)
        return 2 * n ** 3 * reps / (time.perf_counter() - t0)

    return run


# ---------------------------------------------------------------------------------------------
# The benchmark


@dataclass
class Row:
    key: str
    what: str
    ours: Measurement
    base: Measurement
    ratio: float
    ratio_text: str
    goal: str
    met: bool | None  # None for ablations, which have no goal

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "what": self.what, "ours": self.ours.as_dict(), "base": self.base.as_dict(),
                "ratio": self.ratio, "ratio_text": self.ratio_text, "goal": self.goal, "met": self.met}


_T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


ROWS = ("P1", "P2", "P3", "P4", "P5", "P6", "P7", "P8", "P9")
LOGIT_COHORT = ("kd", "dkd", "dist")  # P9


def run_benchmark(path: str, device: torch.device, s: Settings, only: tuple[str, ...] = ROWS,
                  ablate: bool = False) -> dict[str, Any]:
    """Measure the rows in ``only`` (see the module docstring); return a JSON-able dict.

    ``ablate`` adds the engine with channels_last off and with autocast flipped (with P1/P3), P2 with
    autocast flipped and, with P5 where the engine computes in bf16, the student trained in float32.
    """
    started = time.perf_counter()
    load_start = os.getloadavg()
    mem = PeakMemory(device)
    registry = load_plugins(strict=True)
    B = s.batch_size
    recipe = bench_recipe(B)
    # A training subset of exactly one window of batches, so one train_epoch is one timed window.
    window_data = prepare_data(load_cifar10(path), train_size=s.window * B, test_size=10, device=device)
    rows: dict[str, Row] = {}
    extra: dict[str, Any] = {}
    loaders: dict[int, torch.utils.data.DataLoader] = {}
    if "P1" in only or "P4" in only:
        ds = anchor_dataset(path)
        loaders = {w: anchor_loader(ds, B, w, device) for w in s.anchor_workers}

    # -- P1 and P3: engine, anchor loop and minimal loop, interleaved ---------------------------
    if "P1" in only or "P3" in only:
        runners: dict[str, Callable[[int], float]] = {}
        workers = None
        if "P1" in only:
            anchor = AnchorKD(build_student(registry, STUDENT, {}, SEED, num_classes=10).model, make_teacher(registry).model, device)
            say("choosing the DataLoader's num_workers for the anchor loop ...")
            pick = interleave({f"num_workers={w}": anchor.runner(ld, s.window) for w, ld in loaders.items()},
                              s.select_windows, s.warmup, mem)
            workers = max(loaders, key=lambda w: pick[f"num_workers={w}"].median)
            say("  " + ", ".join(f"{k}: {v.median:,.0f} img/s" for k, v in pick.items()) + f" -> num_workers={workers}")
            extra["anchor_num_workers"] = {k: v.as_dict() for k, v in pick.items()}
            extra["anchor_num_workers_best"] = workers
            runners["anchor"] = anchor.runner(loaders[workers], s.window)
        teacher = make_teacher(registry)
        runners["kdzoo"] = engine_runner(Trainer([make_member(registry, "kd", teacher)], window_data, recipe,
                                                 teacher=teacher, seed=SEED, device=device))
        if "P3" in only:
            runners["minimal"] = minimal_runner(registry, window_data, recipe, device)
        variants = {"channels_last=off": dict(channels_last=False)}
        if autocast_dtype(recipe, device) is None:
            variants["autocast=bf16"] = dict(autocast="bf16")
        else:
            variants["autocast=off"] = dict(autocast="off")
        for name, kw in variants.items() if ablate else ():
            t = make_teacher(registry)
            runners[f"kdzoo {name}"] = engine_runner(Trainer([make_member(registry, "kd", t)], window_data,
                                                             bench_recipe(B, **kw), teacher=t, seed=SEED,
                                                             device=device))
        say(f"P1/P3: {', '.join(runners)} ...")
        p13 = interleave(runners, s.windows, s.warmup, mem)
        if "P1" in only:
            p13["anchor"].label = f"DataLoader+PIL loop, num_workers={workers}"
            r1 = paired_ratio(p13["kdzoo"], p13["anchor"])
            goal1 = 5.0 if device.type == "cuda" else 1.3
            rows["P1"] = Row("P1", f"KD step, kd {TEACHER}->{STUDENT}: engine vs anchor loop",
                             p13["kdzoo"], p13["anchor"], r1, f"{r1:.2f}x", f">= {goal1:g}x", r1 >= goal1)
        if "P3" in only:
            p13["minimal"].label = "minimal loop"
            r3 = paired_ratio(p13["kdzoo"], p13["minimal"])
            rows["P3"] = Row("P3", "engine overhead vs a minimal loop, same data path/models/method",
                             p13["kdzoo"], p13["minimal"], 1 - r3, f"overhead {100 * (1 - r3):+.1f}%", "<= 5%",
                             1 - r3 <= 0.05)
        for name in variants if ablate else ():
            ra = paired_ratio(p13[f"kdzoo {name}"], p13["kdzoo"])
            rows[name] = Row("A", f"engine with {name} vs the default (kd {TEACHER}->{STUDENT})",
                             p13[f"kdzoo {name}"], p13["kdzoo"], ra, f"{ra:.2f}x", "(ablation)", None)

    # -- P2: cohort vs separate -----------------------------------------------------------------
    if "P2" in only:
        say("P2: cohort of five vs five separate runs ...")
        recipes = {"": recipe}
        if ablate:
            flip = "off" if autocast_dtype(recipe, device) is not None else "bf16"
            recipes[f" autocast={flip}"] = bench_recipe(B, autocast=flip)
        runners = {}
        for suffix, rec in recipes.items():
            teacher = make_teacher(registry)
            cohort = Trainer([make_member(registry, m, teacher) for m in COHORT], window_data, rec, teacher=teacher,
                             seed=SEED, device=device)
            solos = [Trainer([make_member(registry, m, teacher)], window_data, rec, teacher=teacher, seed=SEED,
                             device=device) for m in COHORT]
            runners[f"cohort{suffix}"] = engine_runner(cohort, len(COHORT))
            runners[f"separate{suffix}"] = separate_runner(solos)
        p2 = interleave(runners, s.windows, s.warmup, mem, units={k: "member-img/s" for k in runners})
        for suffix in recipes:
            r2 = paired_ratio(p2[f"separate{suffix}"], p2[f"cohort{suffix}"])  # cohort cost / separate cost
            what = f"cohort of {len(COHORT)} ({', '.join(COHORT)}) vs {len(COHORT)} separate runs"
            rows["P2" + suffix] = Row("P2" if not suffix else "A", what + (f", with{suffix}" if suffix else ""),
                                      p2[f"cohort{suffix}"], p2[f"separate{suffix}"], r2, f"cost {r2:.2f}",
                                      "<= 0.78" if not suffix else "(ablation)", r2 <= 0.78 if not suffix else None)
        del runners

    # -- P7: one cohort across students vs one cohort per student --------------------------------
    if "P7" in only:
        say(f"P7: one cohort for {' and '.join(CROSS_STUDENTS)} vs one cohort per student ...")
        teacher = build_student(registry, CROSS_TEACHER, {}, SEED + 1, num_classes=10).eval().requires_grad_(False)

        def members(student: str) -> list[Member]:
            out = []
            for m in COHORT:
                net = build_student(registry, student, {}, SEED, num_classes=10)
                out.append(Member(f"{student}/{m}", net, build_method(registry, m, {}, net.info, teacher.info, SEED,
                                                                      pair=(CROSS_TEACHER, student), teacher_net=teacher)))
            return out

        shared = Trainer([m for st in CROSS_STUDENTS for m in members(st)], window_data, recipe, teacher=teacher,
                         seed=SEED, device=device)
        per_student = [Trainer(members(st), window_data, recipe, teacher=teacher, seed=SEED, device=device)
                       for st in CROSS_STUDENTS]
        n = len(COHORT) * len(CROSS_STUDENTS)
        runners = {"one cohort": engine_runner(shared, n), "per student": separate_runner(per_student, len(COHORT))}
        passes: list[int] = []
        hook = teacher.register_forward_hook(lambda *_: passes.append(1))
        p7 = interleave(runners, s.windows, s.warmup, mem, units={k: "member-img/s" for k in runners})
        hook.remove()
        r7 = paired_ratio(p7["per student"], p7["one cohort"])  # shared cost / per-student cost
        p7["per student"].label = f"{len(CROSS_STUDENTS)} cohorts of {len(COHORT)}"
        extra["p7_teacher_forwards_per_batch"] = {"one cohort": 1, "per student": len(CROSS_STUDENTS)}
        rows["P7"] = Row("P7", f"one cohort for {CROSS_TEACHER}->{'+'.join(CROSS_STUDENTS)} ({n} runs, 1 teacher pass "
                               f"per batch) vs a cohort per student ({len(CROSS_STUDENTS)} passes)",
                         p7["one cohort"], p7["per student"], r7, f"cost {r7:.2f}", "< 1", r7 < 1)
        del runners

    # -- P9: teacher logits from the cache vs the teacher run live ------------------------------
    if "P9" in only:
        say(f"P9: a cohort of {', '.join(LOGIT_COHORT)} with the teacher's logits cached vs live ...")
        teacher = build_student(registry, CROSS_TEACHER, {}, SEED + 1, num_classes=10).eval().requires_grad_(False)
        student = CROSS_STUDENTS[0]
        p9_data = prepare_data(load_cifar10(path), train_size=s.p9_steps * B, test_size=10, device=device)

        def logit_members() -> list[Member]:
            out = []
            for m in LOGIT_COHORT:
                net = build_student(registry, student, {}, SEED, num_classes=10)
                out.append(Member(m, net, build_method(registry, m, {}, net.info, teacher.info, SEED,
                                                       pair=(CROSS_TEACHER, student))))
            return out

        previous = os.environ.get("KDZOO_CACHE")
        with tempfile.TemporaryDirectory() as tmp:  # never the user's cache
            os.environ["KDZOO_CACHE"] = tmp
            try:
                say("  filling the cache ...")
                writer = Trainer(logit_members()[:1], p9_data, recipe, teacher=teacher, seed=SEED, device=device,
                                 teacher_key="p9")
                for epoch in range(s.warmup + s.windows):
                    writer.train_epoch(epoch)
                cached = Trainer(logit_members(), p9_data, recipe, teacher=teacher, seed=SEED, device=device,
                                 teacher_key="p9")
                live = Trainer(logit_members(), p9_data, recipe, teacher=teacher, seed=SEED, device=device)
                n = len(LOGIT_COHORT)
                p9 = interleave({"cached": engine_runner(cached, n), "live": engine_runner(live, n)}, s.windows,
                                s.warmup, mem, units={"cached": "member-img/s", "live": "member-img/s"})
                assert cached.cached_epochs == list(range(s.warmup + s.windows)), cached.cached_epochs
            finally:
                if previous is None:
                    os.environ.pop("KDZOO_CACHE", None)
                else:
                    os.environ["KDZOO_CACHE"] = previous
        r9 = paired_ratio(p9["live"], p9["cached"])  # cached cost / live cost
        p9["live"].label = "the same cohort running the teacher"
        rows["P9"] = Row("P9", f"cohort of {'+'.join(LOGIT_COHORT)}, {CROSS_TEACHER}->{student}: teacher logits "
                               f"from the cache (1 of {s.p9_steps} batches run live) vs live",
                         p9["cached"], p9["live"], r9, f"cost {r9:.2f}", "< 1", r9 < 1)

    # -- P8: evaluation's share of a quick-benchmark epoch --------------------------------------
    if "P8" in only:
        say("P8: evaluation's share of a quick-benchmark epoch ...")
        quick = prepare_data(load_cifar10(path), train_size=s.eval_train_images, test_size=s.eval_images,
                             device=device)
        teacher = build_student(registry, QUICK_TEACHER, {}, SEED + 1, num_classes=10).eval().requires_grad_(False)
        members = []
        for student in QUICK_STUDENTS:
            for m in COHORT:
                net = build_student(registry, student, {}, SEED, num_classes=10)
                members.append(Member(f"{student}/{m}", net, build_method(registry, m, {}, net.info, teacher.info, SEED,
                                                                          pair=(QUICK_TEACHER, student), teacher_net=teacher)))
        trainer = Trainer(members, quick, bench_recipe(128), teacher=teacher, seed=SEED, device=device)
        default_bs, old_bs = trainer.recipe.eval_batch_size, 1000
        scale = QUICK_TRAIN_IMAGES / len(quick.train_y)  # quick.yaml trains on 5,000 images per epoch
        evals: dict[int, list[float]] = {default_bs: [], old_bs: []}
        trains = []
        for epoch in range(s.warmup + s.windows):
            trainer.train_epoch(epoch)  # trains, then evaluates at the default batch size (untimed here)
            times = {}
            for bs in (old_bs, default_bs) if epoch % 2 else (default_bs, old_bs):  # alternate the order
                trainer.recipe = dataclasses.replace(trainer.recipe, eval_batch_size=bs)
                t0 = time.perf_counter()
                for m in trainer.members:
                    trainer.evaluate(m)
                sync(device)
                times[bs] = time.perf_counter() - t0
            trainer.recipe = dataclasses.replace(trainer.recipe, eval_batch_size=default_bs)
            if epoch >= s.warmup:
                trains.append(trainer.members[0].history[-1]["epoch_time_s"] * scale)
                for bs in evals:
                    evals[bs].append(times[bs])
        share = {bs: statistics.median(e / (e + t) for e, t in zip(ev, trains)) for bs, ev in evals.items()}
        img = len(members) * len(quick.test_y)
        ours = Measurement(f"evaluation at batch {default_bs}", [img / e for e in evals[default_bs]], unit="member-img/s")
        base = Measurement(f"at batch {old_bs}", [img / e for e in evals[old_bs]], unit="member-img/s")
        extra["p8_eval_share"] = {"train_s_scaled": trains, "eval_s": {str(k): v for k, v in evals.items()},
                                  "share": {str(k): v for k, v in share.items()}, "train_images": len(quick.train_y),
                                  "scaled_to": QUICK_TRAIN_IMAGES, "test_images": len(quick.test_y),
                                  "members": len(members)}
        rows["P8"] = Row("P8", f"evaluation's share of a quick.yaml epoch ({len(members)} members, "
                               f"{QUICK_TRAIN_IMAGES:,} train / {len(quick.test_y):,} test images; "
                               f"{100 * share[old_bs]:.1f}% at eval batch {old_bs})",
                         ours, base, share[default_bs], f"{100 * share[default_bs]:.1f}% of the epoch", "<= 10%",
                         share[default_bs] <= 0.10)

    # -- P4: the data path alone ----------------------------------------------------------------
    if "P4" in only:
        say("P4: data path vs DataLoader+PIL ...")
        data_full = prepare_data(load_cifar10(path), train_size=s.data_images, test_size=10, device=device)
        runners = {"kdzoo": data_runner(data_full, B, device)}
        runners.update({f"num_workers={w}": anchor_data_runner(ld, s.anchor_data_steps, device)
                        for w, ld in loaders.items()})
        p4 = interleave(runners, s.windows, s.warmup, mem)
        best = max((k for k in p4 if k != "kdzoo"), key=lambda k: p4[k].median)
        r4 = paired_ratio(p4["kdzoo"], p4[best])
        extra["data_path_dataloader"] = {k: v.as_dict() for k, v in p4.items() if k != "kdzoo"}
        p4[best].label = f"DataLoader+PIL, {best}"
        rows["P4"] = Row("P4", f"data path alone (augment + batch {len(data_full.train_y)} images)",
                         p4["kdzoo"], p4[best], r4, f"{r4:.1f}x", ">= 30000 img/s", p4["kdzoo"].median >= 30000)
        del data_full
    del loaders

    # -- P5: hardware utilisation ---------------------------------------------------------------
    if "P5" in only:
        say("P5: resnet20 training FLOP/s vs the fp32 matmul peak ...")
        student_trainer = Trainer([make_member(registry, "ce", None)], window_data, recipe, seed=SEED, device=device)
        fwd = forward_flops_per_image(student_trainer.members[0].student, device)
        train_rate = engine_runner(student_trainer)
        dtype = "bf16 autocast" if student_trainer.amp == torch.bfloat16 else "fp32"
        runners = {"training": lambda e: 3 * fwd * train_rate(e),
                   "matmul peak": matmul_runner(s.matmul_n, s.matmul_reps, device)}
        if student_trainer.amp is not None:  # the engine computes in bf16: show that peak too
            runners["bf16 matmul peak"] = matmul_runner(s.matmul_n, s.matmul_reps, device, torch.bfloat16)
            if ablate:
                fp32_rate = engine_runner(Trainer([make_member(registry, "ce", None)], window_data,
                                                  bench_recipe(B, autocast="off"), seed=SEED, device=device))
                runners["fp32 training"] = lambda e: 3 * fwd * fp32_rate(e)
        p5 = interleave(runners, s.windows, s.warmup, mem, units={k: "FLOP/s" for k in runners})
        p5["training"].label = f"{STUDENT} training, {dtype}"
        p5["matmul peak"].label = f"fp32 matmul peak, n={s.matmul_n}"
        r5 = paired_ratio(p5["training"], p5["matmul peak"])
        extra["resnet20_forward_flops_per_image"] = fwd
        extra["resnet20_train_img_per_s"] = p5["training"].median / (3 * fwd)
        extra["resnet20_train_dtype"] = dtype
        if "bf16 matmul peak" in p5:
            extra["bf16_matmul_peak"] = p5["bf16 matmul peak"].as_dict()
            extra["fraction_of_bf16_peak"] = paired_ratio(p5["training"], p5["bf16 matmul peak"])
        rows["P5"] = Row("P5", f"{STUDENT} training (ce, {dtype}) as FLOP/s, 3 x {fwd / 1e6:.1f} MFLOP/img",
                         p5["training"], p5["matmul peak"], r5, f"{100 * r5:.0f}% of peak", ">= 50%", r5 >= 0.5)
        if "fp32 training" in p5:
            rf = paired_ratio(p5["fp32 training"], p5["matmul peak"])
            p5["fp32 training"].label = f"{STUDENT} training, autocast off (fp32)"
            rows["P5 fp32"] = Row("A", "P5 with autocast off: fp32 training vs the fp32 matmul peak",
                                  p5["fp32 training"], p5["matmul peak"], rf, f"{100 * rf:.0f}% of peak", "(ablation)",
                                  None)
        if "bf16 matmul peak" in p5:
            rb = extra["fraction_of_bf16_peak"]
            rows["P5 bf16"] = Row("P5'", "the same against the bf16 matmul peak (the dtype it computes in)",
                                  p5["training"], p5["bf16 matmul peak"], rb, f"{100 * rb:.0f}% of peak",
                                  "(info)", None)

    # -- P6: the cost of each method's step relative to ce ---------------------------------------
    if "P6" in only:
        say("P6: each method's training step vs ce ...")
        teacher = make_teacher(registry, window_data)
        first_party = sorted(n for n in registry.methods
                             if registry.plugin(registry.owner[("method", n)]).dist in FIRST_PARTY)
        runners = {}
        for name in first_party:
            cls = registry.method(name)
            if cls.has_init_stage:  # the main stage here; the init stage as a row of its own
                runners[name] = engine_runner(Trainer([make_member(registry, name, teacher, init_fraction=0.0)],
                                                      window_data, recipe, teacher=teacher, seed=SEED, device=device))
                init = make_member(registry, name, teacher)
                init_trainer = Trainer([init], window_data, recipe, teacher=teacher, seed=SEED, device=device)
                init.init_epochs = 10 ** 9  # every timed window is an init-stage epoch
                runners[f"{name} init"] = engine_runner(init_trainer)
            else:
                runners[name] = engine_runner(Trainer([make_member(registry, name, teacher if cls.needs_teacher else None)],
                                                      window_data, recipe, teacher=teacher, seed=SEED, device=device))
        # What each method keeps beside the student (regressors, heads, memory banks), from its state dict.
        extra["p6_method_state_mb"] = {
            name: sum(t.numel() * t.element_size() for t in make_member(registry, name, teacher).method.state_dict().values()
                      if isinstance(t, torch.Tensor)) / 2**20
            for name in first_party}
        p6 = interleave(runners, s.windows, s.warmup, mem)
        for name in runners:
            if name == "ce":
                continue
            cost = paired_ratio(p6["ce"], p6[name])  # time per step relative to ce
            state = extra["p6_method_state_mb"][name.split()[0]]
            rows[f"P6 {name}"] = Row("P6", f"{name} step vs ce ({TEACHER}->{STUDENT}); method state {state:.1f} MB",
                                     p6[name], p6["ce"], cost, f"{cost:.2f}x ce", "(info)", None)
        del runners

    return {
        "device": str(device),
        "machine": machine(device),
        "settings": s.__dict__,
        "memory": mem.kind,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "seconds": time.perf_counter() - started,
        "rows": [r.as_dict() for r in rows.values()],
        "extra": extra,
    }


def machine(device: torch.device) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    bf16 = ", ".join(native_bf16()) or "no native bf16 (no AMX-BF16/AVX512-BF16)"
    return {"name": name, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "cpu_bf16": bf16,
            "autocast_auto": choose_precision("auto", device).name}



def _fmt(value: float, unit: str) -> str:
    if unit == "FLOP/s":
        return f"{value / 1e9:,.1f} GFLOP/s"
    return f"{value:,.0f} {unit}"


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    m = result["machine"]
    table = Table(title=f"kdzoo throughput on {m['name']} ({result['device']}, {m['torch_threads']} threads; CPU bf16: "
                        f"{m.get('cpu_bf16', '?')}; autocast auto -> {m.get('autocast_auto', '?')}); "
                        f"load avg {result['loadavg_start'][0]:.1f} -> {result['loadavg_end'][0]:.1f}")
    for col in ("row", "what", "kdzoo", "baseline", "ratio", "goal", "met", f"{result['memory']} (MB)"):
        table.add_column(col, overflow="fold")
    for r in result["rows"]:
        ours, base = r["ours"], r["base"]
        table.add_row(r["key"], r["what"], _fmt(ours["median"], ours["unit"]),
                      f"{_fmt(base['median'], base['unit'])}\n({base['label']})", r["ratio_text"], r["goal"],
                      "-" if r["met"] is None else "yes" if r["met"] else "NO", f"{ours['peak_mb']:.0f} / {base['peak_mb']:.0f}")
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(table)
    s = result["settings"]
    print(f"batch {s['batch_size']}, {s['windows']} timed windows of {s['window']} steps after {s['warmup']} warm-up; "
          f"medians, ratios are medians of per-round ratios; {result['seconds']:.0f} s in all.")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, run the benchmark, print the table; return the result dict."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--quick", action="store_true", help="tiny windows: checks that everything runs (seconds)")
    p.add_argument("--json", metavar="PATH", help="also write the numbers to PATH")
    p.add_argument("--ablate", action="store_true",
                   help="also time the engine with channels_last off and autocast flipped (P1/P3), P2 with "
                        "autocast flipped, and fp32 training in P5")
    p.add_argument("--only", default=",".join(ROWS), help="comma-separated rows to measure (default: all)")
    for name in ("batch_size", "window", "windows", "warmup"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"override the setting {name}")
    p.add_argument("--anchor-workers", metavar="N,N,...",
                   help="DataLoader num_workers candidates for the anchor loops (default 0,1,2)")
    args = p.parse_args(argv)
    path = os.environ.get("KDZOO_DATA")
    if not path:
        raise KDZooError("KDZOO_DATA is not set. The throughput benchmark reads CIFAR-10 from an array file: "
                         "`export KDZOO_DATA=/path/to/cifar10.npz` and run it again.")
    device = resolve_device(args.device)
    only = tuple(r.strip().upper() for r in args.only.split(",") if r.strip())
    unknown = [r for r in only if r not in ROWS]
    if unknown:
        raise KDZooError(f"--only names unknown rows {', '.join(unknown)}; the rows are {', '.join(ROWS)}.")
    settings = QUICK if args.quick else FULL
    overrides = {k: getattr(args, k) for k in ("batch_size", "window", "windows", "warmup")
                 if getattr(args, k) is not None}
    if any(v < (0 if k == "warmup" else 1) for k, v in overrides.items()):
        raise KDZooError(f"Sizes must be positive (warm-up may be 0), got {overrides}.")
    if args.anchor_workers:
        try:
            workers = tuple(sorted({int(w) for w in args.anchor_workers.split(",") if w.strip()}))
        except ValueError:
            workers = ()
        if not workers or min(workers) < 0:
            raise KDZooError(f"--anchor-workers takes numbers >= 0 like 0,4,8, got {args.anchor_workers!r}.")
        overrides["anchor_workers"] = workers
    settings = dataclasses.replace(settings, **overrides)
    result = run_benchmark(path, device, settings, only=only, ablate=args.ablate)
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    try:
        main()
    except KDZooError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
