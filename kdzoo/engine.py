"""One training loop. Training a teacher is distillation with no teacher (the ``ce`` method).

A ``Trainer`` trains a *cohort*: one or more ``Member`` (student + method) pairs that share a
teacher, a seed, a recipe and the data; the students may differ. Each batch is loaded and augmented once, the teacher
runs once (with stage features only if some member needs them), and every member takes its
own optimiser step. A solo run is a cohort of one, so a member trained in a cohort gives the
same result as the same member trained alone (bit for bit on CPU, and on CUDA with
deterministic kernels; tests check both): members are built from the same seed, see the same
batches, and each keeps its own RNG streams, which start from the trainer's seed.

A member whose loss becomes non-finite, or whose method raises, stops with a recorded error;
the other members continue.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from kdzoo import KDZooError
from kdzoo.config import Recipe
from kdzoo.data import Data
from kdzoo.logit_cache import TeacherLogits
from kdzoo.methods import Method
from kdzoo.metrics import classification_metrics
from kdzoo.models import KDNet, Outputs
from kdzoo.precision import Precision
from kdzoo.precision import choose as choose_precision


class NonFiniteLoss(KDZooError):
    """A loss term became NaN or infinite; the run stops rather than train on garbage."""


class Progress:
    """Receives training progress. The base class ignores everything (used by tests and libraries)."""

    def run_start(self, labels: list[str], epochs: int, steps_per_epoch: int, start_epoch: int = 0) -> None: ...
    def step(self, images: int) -> None: ...
    def epoch_end(self, epoch: int, records: dict[str, dict[str, Any]]) -> None: ...
    def run_end(self) -> None: ...
    def runs_done(self, n: int) -> None:
        """``n`` planned runs finished outside this process (the Ray executor)."""


@dataclass
class Member:
    """One student trained with one method inside a cohort."""

    label: str
    student: KDNet
    method: Method
    origin: str = ""  # where the method comes from, for error messages, e.g. "plugin 'dkd' (kdzoo-dkd 0.1.0)"
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    rng_state: list[torch.Tensor] | None = None  # CPU (and CUDA) generator states between steps
    init_epochs: int = 0  # epochs of the method's init stage, before the recipe's (set by the Trainer)
    init_optimizer: torch.optim.Optimizer | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    stopped: str | None = None  # why it was stopped on purpose (Trainer.stop): trains no further, not a failure
    wall_time: float = 0.0


def wants(method: Method) -> dict[str, bool]:
    """The outputs ``method`` asks a network for, as ``KDNet.forward`` keyword arguments (only those it needs)."""
    asked = {"features": method.needs_features, "embedding": method.needs_embedding,
             "preact": method.needs_preact, "stem": method.needs_stem}
    return {k: True for k, v in asked.items() if v}


def call_method(method: Method, fn: Callable[..., dict[str, torch.Tensor]], student: Outputs | None,
                teacher: Outputs | None, labels: torch.Tensor, indices: torch.Tensor) -> dict[str, torch.Tensor]:
    """``fn(student, teacher, labels)`` (``forward`` or ``init_forward``), with ``indices=`` when the method asks."""
    teacher = teacher if method.needs_teacher else None
    if method.needs_indices:
        return fn(student, teacher, labels, indices=indices)
    return fn(student, teacher, labels)


def build_init_optimizer(member: Member, recipe: Recipe) -> torch.optim.Optimizer:
    """The init stage's SGD over ``method.init_parameters(student)``, at a constant learning rate: the
    method's ``init_lr``, or the recipe's when that is 0 (RepDistiller's ``init``)."""
    params = [p for p in member.method.init_parameters(member.student) if p.requires_grad]
    if not params:
        raise KDZooError(f"Method '{member.method.name}' has an init stage but init_parameters() returned no "
                         "trainable parameter.")
    lr = member.method.hparams.get("init_lr") or recipe.lr
    return torch.optim.SGD(params, lr=lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise KDZooError(f"Unknown device '{device}'. Use auto, cpu, cuda or cuda:N.") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KDZooError(f"Device '{device}' was requested but CUDA is not available here. Use --device cpu.")
    return dev


def autocast_dtype(recipe: Recipe, device: torch.device, net: nn.Module | None = None,
                   input_size: tuple[int, int] = (32, 32)) -> torch.dtype | None:
    """The autocast dtype, or None for float32 (``kdzoo.precision.choose``: bf16 where it is faster;
    ``net`` is probed where the CPU's capabilities are not conclusive)."""
    return choose_precision(recipe.autocast, device, net, input_size).dtype


def lr_factor(recipe: Recipe, steps_per_epoch: int):
    """The schedule as a function of the optimiser step, for ``LambdaLR``."""
    total = recipe.epochs * steps_per_epoch
    warmup = int(recipe.warmup_epochs * steps_per_epoch)
    milestones = [m * steps_per_epoch for m in recipe.milestones]

    def factor(step: int) -> float:
        if recipe.schedule == "onecycle":  # linear rise over 25% of the run, then cosine to ~0
            peak = max(1, int(0.25 * total))
            if step < peak:
                return 0.04 + 0.96 * step / peak
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - peak) / max(1, total - peak))))
        if step < warmup:
            return (step + 1) / warmup
        if recipe.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
        if recipe.schedule == "multistep":
            return recipe.gamma ** sum(step >= m for m in milestones)
        return 1.0

    return factor


def build_optimizer(member: Member, recipe: Recipe) -> torch.optim.Optimizer:
    """SGD over the student's and the method's parameters; optionally no decay on BN and biases."""
    params = [p for p in list(member.student.parameters()) + list(member.method.parameters()) if p.requires_grad]
    if recipe.wd_on_bn_bias:
        groups = [{"params": params, "weight_decay": recipe.weight_decay}]
    else:
        groups = [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": recipe.weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ]
    return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov and recipe.momentum > 0)


@contextlib.contextmanager
def _member_rng(member: Member, device: torch.device):
    """Give each member its own RNG streams (CPU, and CUDA on a GPU), so that cohort and solo runs
    consume identical randomness (dropout, stochastic depth)."""
    outer = _get_rng(device)
    if member.rng_state is not None:
        _set_rng(member.rng_state, device)
    try:
        yield
    finally:
        member.rng_state = _get_rng(device)
        _set_rng(outer, device)


def _get_rng(device: torch.device) -> list[torch.Tensor]:
    return [torch.get_rng_state()] + ([torch.cuda.get_rng_state(device)] if device.type == "cuda" else [])


def _set_rng(states: list[torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states[0])
    if device.type == "cuda" and len(states) > 1:
        torch.cuda.set_rng_state(states[1], device)


def _initial_rng(seed: int, device: torch.device) -> list[torch.Tensor]:
    """The RNG streams every member starts from: a function of the trainer's seed alone.

    Not the global state at construction, which depends on what was built before (a method with
    parameters draws their initialisation): with it, a member with dropout drew different masks
    in a cohort than alone. Members of one cohort start from the same streams.
    """
    mixed = (int(seed) * 1_000_003 + 0x6B647A6F) % (1 << 63)  # apart from the seed the weights were drawn with
    states = [torch.Generator().manual_seed(mixed).get_state()]
    if device.type == "cuda":
        states.append(torch.Generator(device=device).manual_seed(mixed).get_state())
    return states


def check_terms(terms: Any) -> None:
    """The Method contract: a non-empty dict of names to scalar tensors."""
    if not isinstance(terms, dict) or not terms:
        raise TypeError(f"forward() must return a non-empty dict of loss terms, got {type(terms).__name__}")
    for name, value in terms.items():
        if not isinstance(value, torch.Tensor) or value.ndim != 0:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise TypeError(f"loss term {name!r} must be a scalar tensor, got {shape}")


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def cohort_precision(autocast: str, device: torch.device, students: list[KDNet],
                     input_size: tuple[int, int]) -> Precision:
    """One dtype for a cohort (its teacher pass is shared): bf16 where it is faster (``kdzoo.precision``) for
    every distinct student network, else float32. Each run equals its solo run whenever the students agree."""
    choices: dict[str, Precision] = {}
    for s in students:
        key = type(getattr(s, "model", s)).__name__ + str(count_params(s))
        if key not in choices:
            choices[key] = choose_precision(autocast, device, s, input_size)
    first = next(iter(choices.values()))
    if all(p.dtype == first.dtype for p in choices.values()):
        return first
    slow = next(p for p in choices.values() if p.dtype is None)
    return Precision(None, f"float32 for the whole cohort (its students disagree; one says: {slow.reason})")


class Trainer:
    """Trains a cohort of members on ``data`` following ``recipe``; see the module docstring.

    A member whose method has an init stage first trains ``init_epochs`` epochs of it, then the
    recipe's epochs. Epochs are counted globally, so the batches of a member's every epoch are the
    same in a cohort as alone; members with shorter runs finish early.
    """

    def __init__(
        self,
        members: list[Member],
        data: Data,
        recipe: Recipe,
        *,
        teacher: KDNet | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
        progress: Progress | None = None,
        teacher_key: str | None = None,
    ) -> None:
        if not members:
            raise ValueError("a cohort needs at least one member")
        recipe.validate()
        self.members, self.data, self.recipe, self.seed = members, data, recipe, seed
        self.device = torch.device(device)
        self.progress = progress or Progress()
        self.teacher = teacher
        self.precision: Precision = cohort_precision(recipe.autocast, self.device, [m.student for m in members],
                                                     data.image_size)
        self.amp = self.precision.dtype
        self.memory_format = torch.channels_last if recipe.channels_last else torch.contiguous_format
        self.steps_per_epoch = data.steps_per_epoch(recipe.batch_size)
        for m in members:
            if m.method.needs_teacher and teacher is None:
                raise KDZooError(f"Method '{m.method.name}' needs a teacher; pass --teacher CHECKPOINT.")
            m.student.to(self.device, memory_format=self.memory_format)
            m.method.to(self.device)
            m.method.label_smoothing = recipe.label_smoothing
            if recipe.compile:
                m.student.model.compile()
            m.optimizer = m.optimizer or build_optimizer(m, recipe)
            m.scheduler = m.scheduler or torch.optim.lr_scheduler.LambdaLR(m.optimizer, lr_factor(recipe, self.steps_per_epoch))
            m.init_epochs = m.method.num_init_epochs(recipe.epochs)
            if m.init_epochs and m.init_optimizer is None:
                m.init_optimizer = build_init_optimizer(m, recipe)
            if m.rng_state is None:
                m.rng_state = _initial_rng(seed, self.device)
        if teacher is not None:
            teacher.to(self.device, memory_format=self.memory_format).eval().requires_grad_(False)
        self.epochs = max(m.init_epochs for m in members) + recipe.epochs  # global epochs of the cohort
        self._teacher_pred: dict[str, torch.Tensor] = {}
        # The teacher's training logits on disk (kdzoo.logit_cache), when the caller names the teacher.
        self.logit_cache = None if teacher_key is None or teacher is None else TeacherLogits.open(
            teacher_key, seed, data, recipe.batch_size, recipe.flip, self.amp, self.device, self.memory_format)
        self.cached_epochs: list[int] = []  # global epochs whose teacher logits came from the cache

    # -- evaluation ---------------------------------------------------------------------------
    def _autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    @torch.inference_mode()
    def predict(self, net: KDNet, split: str) -> torch.Tensor:
        """Logits of ``net`` on a whole split, in eval mode (float32)."""
        was_training = net.training
        net.eval()
        out = []
        for x, _ in self.data.eval_batches(split, self.recipe.eval_batch_size):
            with self._autocast():
                out.append(net(x.contiguous(memory_format=self.memory_format)).logits.float())
        net.train(was_training)
        return torch.cat(out)

    def evaluate(self, member: Member) -> dict[str, dict[str, float]]:
        results = {}
        for split in ("test", "val") if len(self.data.val_y) else ("test",):
            if self.teacher is not None and split not in self._teacher_pred:
                self._teacher_pred[split] = self.predict(self.teacher, split).argmax(1)
            labels = self.data.test_y if split == "test" else self.data.val_y
            results[split] = classification_metrics(self.predict(member.student, split), labels, self._teacher_pred.get(split))
        return results

    def teacher_top1(self, split: str = "test") -> float | None:
        """The teacher's top-1 (%) on ``split`` of this trainer's data (None without a teacher); computed once."""
        if self.teacher is None:
            return None
        if split not in self._teacher_pred:
            self._teacher_pred[split] = self.predict(self.teacher, split).argmax(1)
        labels = self.data.test_y if split == "test" else self.data.val_y
        return 100.0 * (self._teacher_pred[split] == labels).float().mean().item()

    # -- training -----------------------------------------------------------------------------
    def stage(self, m: Member, epoch: int) -> tuple[str, int] | None:
        """``("init", e)`` or ``("main", e)`` (``e`` 0-based within the stage) for global ``epoch``; None once done."""
        if epoch < m.init_epochs:
            return "init", epoch
        if epoch - m.init_epochs < self.recipe.epochs:
            return "main", epoch - m.init_epochs
        return None

    def _teacher_outputs(self, x: torch.Tensor, members: list[Member], cached: torch.Tensor | None = None,
                         offset: int = 0) -> Outputs | None:
        """The teacher's outputs on batch ``x`` for ``members`` (None when none needs it); from ``cached``, the
        epoch's cached logits, at ``offset`` when given (the members then need nothing but logits)."""
        users = [m for m in members if m.method.needs_teacher]
        if self.teacher is None or not users:
            return None
        if cached is not None:
            return Outputs(logits=cached[offset:offset + len(x)].clone())
        asked: dict[str, bool] = {}
        for m in users:
            asked.update(wants(m.method))
        with torch.inference_mode(), self._autocast():
            out = self.teacher(x, **asked)
        # Inference tensors cannot be saved for backward; a clone outside inference mode can.
        clone = lambda t: t.clone() if t is not None else None  # noqa: E731
        return Outputs(
            logits=out.logits.clone(),
            features=[f.clone() for f in out.features] if out.features is not None else None,
            embedding=clone(out.embedding),
            preact=[f.clone() for f in out.preact] if out.preact is not None else None,
            stem=clone(out.stem),
        )

    @property
    def active(self) -> list[Member]:
        """The members that still train: neither failed nor stopped."""
        return [m for m in self.members if m.error is None and m.stopped is None]

    def stop(self, m: Member, reason: str) -> None:
        """Stop ``m`` on purpose between epochs (e.g. a search pruning a trial): it trains no further and
        keeps its history; the rest of the cohort goes on unchanged. Not a failure: its result says ``stopped``."""
        m.stopped = reason

    def _step(self, m: Member, stage: str, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor,
              t_out: Outputs | None, sums: dict) -> torch.Tensor:
        method = m.method
        init = stage == "init"
        optimizer = m.init_optimizer if init else m.optimizer
        with _member_rng(m, self.device), self._autocast():
            uses_student = not init or method.init_uses_student
            s_out = m.student(x, **wants(method)) if uses_student else None
            terms = call_method(method, method.init_forward if init else method.forward, s_out, t_out, y, idx)
        check_terms(terms)
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
        optimizer.step()
        if not init:
            m.scheduler.step()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        return loss.detach()

    def _check_finite(self, m: Member, loss: torch.Tensor, sums: dict, epoch: int, step: int) -> None:
        if not torch.isfinite(loss):
            bad = [k for k, v in sums.items() if not torch.isfinite(v)]
            origin = f" (method '{m.method.name}' from {m.origin})" if m.origin else ""
            raise NonFiniteLoss(
                f"Run '{m.label}'{origin} stopped at epoch {epoch + 1}, step {step + 1}: the loss became non-finite "
                f"(term{'s' if len(bad) > 1 else ''} {', '.join(bad) or 'total'}). Lower the learning rate or "
                "the method's loss weights, or check the teacher checkpoint."
            )

    @property
    def _images_per_epoch(self) -> int:
        """Training images one epoch's batches hold (the last partial batch is dropped)."""
        return min(self.steps_per_epoch * self.recipe.batch_size, len(self.data.train_x))

    def _cached_logits(self, epoch: int, members: list[Member]) -> tuple[torch.Tensor | None, list | None]:
        """(the epoch's cached teacher logits or None, [] to record the live ones or None) for ``members``."""
        users = [m for m in members if m.method.needs_teacher]
        if self.logit_cache is None or not users:
            return None, None
        if any(wants(m.method) for m in users):  # features: the teacher runs; its logits are recorded
            return None, []
        cached = self.logit_cache.load(epoch, self.device)
        if cached is None or len(cached) != self._images_per_epoch:
            return None, []
        self.cached_epochs.append(epoch)
        return cached, None

    def train_epoch(self, epoch: int) -> None:
        """Global epoch ``epoch`` (0-based): each member takes its step of the stage it is in."""
        stages: dict[str, tuple[str, int]] = {}
        for m in self.active:
            where = self.stage(m, epoch)
            if where is None:
                continue
            stages[m.label] = where
            m.student.train()
            m.method.train()
            if where[0] == "main":
                m.method.start_epoch(where[1], self.recipe.epochs)
        members = [m for m in self.active if m.label in stages]
        if not members:
            return
        sums: dict[str, dict] = {m.label: {} for m in members}
        seen = 0
        check_every = 1 if self.device.type == "cpu" else 50  # a finite check is a host sync on GPU
        pending: dict[str, torch.Tensor] = {}
        t_start = time.perf_counter()
        batches = self.data.train_batches(self.seed, epoch, self.recipe.batch_size, flip=self.recipe.flip,
                                          with_indices=True)
        cached, recorded = self._cached_logits(epoch, members)
        offset = 0
        for step, (x, y, idx) in enumerate(batches):
            x = x.contiguous(memory_format=self.memory_format)
            running = [m for m in members if m.error is None]
            if cached is not None and step > 0:
                t_out = self._teacher_outputs(x, running, cached, offset)
            else:
                t_out = self._teacher_outputs(x, running)
                if cached is not None and (t_out is None or t_out.logits.shape != cached[:len(y)].shape
                                           or not torch.equal(t_out.logits, cached[:len(y)])):
                    cached, recorded = None, []  # not what this teacher computes here: live, and rewritten
                    self.cached_epochs.remove(epoch)
                if recorded is not None and t_out is None:  # no member needs the teacher any more
                    recorded = None
                elif recorded is not None:
                    recorded.append(t_out.logits.clone())  # a copy: a method cannot alter what is cached
            offset += len(y)
            for m in running:
                try:
                    loss = self._step(m, stages[m.label][0], x, y, idx, t_out, sums[m.label])
                    pending[m.label] = pending.get(m.label, 0.0) + loss  # NaN and inf survive the sum
                    if (step + 1) % check_every == 0:
                        self._check_finite(m, pending.pop(m.label), sums[m.label], epoch, step)
                except KDZooError as e:
                    m.error = str(e)
                except Exception as e:  # a plugin bug fails its own run, not the cohort
                    origin = f" from {m.origin}" if m.origin else ""
                    m.error = f"Method '{m.method.name}'{origin} failed: {type(e).__name__}: {e}"
            seen += len(y)
            self.progress.step(len(y))
            if not any(m.error is None for m in members):
                break
        for m in members:
            if m.error is None and m.label in pending:
                try:
                    self._check_finite(m, pending.pop(m.label), sums[m.label], epoch, self.steps_per_epoch - 1)
                except KDZooError as e:
                    m.error = str(e)
        if recorded and offset == self._images_per_epoch:  # a whole epoch of the teacher's logits
            self.logit_cache.save(epoch, torch.cat(recorded))
        wall = time.perf_counter() - t_start
        records = {}
        for m in members:
            if m.error is not None:
                continue
            m.wall_time += wall
            stage, e = stages[m.label]
            optimizer = m.init_optimizer if stage == "init" else m.optimizer
            record = {
                "epoch": e + 1,
                "stage": stage,
                "lr": optimizer.param_groups[0]["lr"],
                "loss": {k: (v / max(1, self.steps_per_epoch)).item() for k, v in sums[m.label].items()},
                "train_img_per_s": seen / wall if wall > 0 else 0.0,
                "epoch_time_s": wall,
            }
            if stage == "main":  # the init stage trains parts of the net towards the teacher, not the task
                record.update(self.evaluate(m))
            m.history.append(record)
            records[m.label] = record
        self.progress.epoch_end(epoch, records)

    def fit(self, start_epoch: int = 0, on_epoch: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
        """Train from global epoch ``start_epoch`` to the end (``self.epochs``: the longest init stage of
        the cohort plus the recipe's epochs); return one result dict per member.

        ``on_epoch(epochs_done)`` runs after each epoch (the benchmark saves a resumable checkpoint there).
        """
        self.progress.run_start([m.label for m in self.members], self.epochs, self.steps_per_epoch, start_epoch)
        try:
            for epoch in range(start_epoch, self.epochs):
                if not self.active:
                    break
                self.train_epoch(epoch)
                if on_epoch is not None:
                    on_epoch(epoch + 1)
        finally:
            self.progress.run_end()
        return [self.result(m) for m in self.members]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically: weights, optimisers, schedule, RNG, history."""
        return {"members": [{
            "label": m.label,
            "student": m.student.state_dict(),
            "method": m.method.state_dict(),
            "optimizer": m.optimizer.state_dict(),
            "init_optimizer": m.init_optimizer.state_dict() if m.init_optimizer is not None else None,
            "scheduler": m.scheduler.state_dict(),
            "rng_state": m.rng_state,
            "history": m.history,
            "error": m.error,
            "stopped": m.stopped,
            "wall_time": m.wall_time,
        } for m in self.members]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["members"]
        if [s["label"] for s in saved] != [m.label for m in self.members]:
            raise KDZooError("The saved cohort state belongs to different runs; delete it to start the cohort afresh.")
        for m, s in zip(self.members, saved):
            m.student.load_state_dict(s["student"])
            m.method.load_state_dict(s["method"])
            m.optimizer.load_state_dict(s["optimizer"])
            if m.init_optimizer is not None and s.get("init_optimizer") is not None:
                m.init_optimizer.load_state_dict(s["init_optimizer"])
            m.scheduler.load_state_dict(s["scheduler"])
            m.rng_state = s["rng_state"]
            m.history, m.error, m.wall_time = s["history"], s["error"], s["wall_time"]
            m.stopped = s.get("stopped")

    def result(self, m: Member) -> dict[str, Any]:
        """A JSON-able summary: status, history, last- and best-epoch metrics (of the main stage), sizes and speed."""
        main = [r for r in m.history if r.get("stage", "main") == "main"]
        out: dict[str, Any] = {
            "label": m.label,
            "method": m.method.name,
            "hparams": dict(m.method.hparams),
            "status": "failed" if m.error else "ok",
            "error": m.error,
            "stopped": m.stopped,
            "epochs_done": len(main),
            "init_epochs_done": len(m.history) - len(main),
            "history": m.history,
            "params": {"student": count_params(m.student), "method": count_params(m.method)},
            "wall_time_s": m.wall_time,
        }
        if main:
            # With a validation split the best epoch is chosen on it, not on the test set.
            split = "val" if "val" in main[0] else "test"
            best = max(main, key=lambda r: r[split]["top1"])
            out["last"] = main[-1]["test"]
            out["best"] = {"epoch": best["epoch"], "chosen_on": split, **best["test"]}
            out["img_per_s"] = statistics.median(r["train_img_per_s"] for r in main)
        return out
