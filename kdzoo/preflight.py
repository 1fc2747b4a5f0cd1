"""Refusing, before any training, a run that cannot train: :func:`preflight`.

Contract: :func:`preflight` asks the method about every batch size the run will see, then takes one dry
training step at the smallest (the student, the method and the teacher, on random images), and raises
:class:`~kdzoo.KDZooError` naming the model or the method and the fix. It leaves the modules, their
gradients and torch's RNG exactly as it found them.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn

from kdzoo import KDZooError
from kdzoo.engine import call_method, check_terms, wants
from kdzoo.errors import first_line
from kdzoo.methods import Method
from kdzoo.models import KDNet

PREFLIGHT_MAX_BATCH = 2  # what fails only at tiny batches shows at 1 or 2 images; larger dry batches cost time


@contextlib.contextmanager
def _leave_no_trace(*modules: nn.Module | None) -> Iterator[None]:
    """Restore the buffers (BatchNorm statistics), gradients and train/eval modes of ``modules``,
    and torch's RNG state, on exit."""
    mods = list({id(m): m for m in modules if m is not None}.values())
    modes = [(sub, sub.training) for m in mods for sub in m.modules()]
    buffers = [(b, b.detach().clone()) for m in mods for b in m.buffers()]
    params = [p for m in mods for p in m.parameters()]
    grads = [p.grad for p in params]
    cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        try:
            for p in params:
                p.grad = None
            yield
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            for p, g in zip(params, grads):
                p.grad = g
            for sub, mode in modes:
                sub.training = mode


def _dry_student_step(student: KDNet, x: torch.Tensor, name: str) -> None:
    """A train-mode forward and backward of the student alone; ``KDZooError`` naming the model if it fails."""
    images = f"{len(x)} image{'s' if len(x) != 1 else ''}"
    try:
        student.train()
        logits = student(x).logits
        if logits.requires_grad:
            logits.float().sum().backward()
    except Exception as e:
        if "Expected more than 1 value per channel" in str(e):
            raise KDZooError(
                f"Batch size too small for model {name}: a training batch of {images} reaches a BatchNorm "
                "layer with only one value per channel, which BatchNorm cannot normalise in training mode. "
                "Use a batch size of at least 2 (recipe.batch_size, --batch-size)."
            ) from e
        raise KDZooError(
            f"Model {name} fails a dry training step (forward and backward) on a batch of {images}: "
            f"{type(e).__name__}: {first_line(e)}. Check its model options, or use a larger batch size."
        ) from e


def preflight(student: KDNet, method: Method | None, teacher: KDNet | None, batch_sizes: Iterable[int], *,
              model: str = "", input_size: tuple[int, int] = (32, 32)) -> None:
    """Refuse, before any training, a run that cannot train at the batch sizes it will see
    (``kdzoo.data.train_batch_sizes``); ``KDZooError`` with the problem and the fix.

    Calls ``method.validate_batch_size`` with each size, then takes a dry training step at the
    smallest size (at most :data:`PREFLIGHT_MAX_BATCH`) on random images: a train-mode forward
    and backward of the student with the method and the teacher (of the student alone when
    ``method`` is None, or to tell whether a failure is the model's: BatchNorm refuses a batch of
    one). Leaves no trace (see ``_leave_no_trace``); runs where the modules are.
    """
    sizes = sorted(set(batch_sizes))
    if not sizes:
        raise ValueError("preflight needs at least one batch size")
    if method is not None and method.needs_teacher and teacher is None:
        raise KDZooError(f"Method '{method.name}' needs a teacher; pass --teacher CHECKPOINT.")
    for size in sizes if method is not None else ():
        method.validate_batch_size(size)
    b = min(sizes[0], PREFLIGHT_MAX_BATCH)
    name = f"'{model}'" if model else "the student"
    param = next(student.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.randn(b, 3, *input_size, generator=torch.Generator().manual_seed(0)).to(device)
    y = (torch.arange(b) % student.info.num_classes).to(device)
    with _leave_no_trace(student, method, teacher):
        if method is None:
            _dry_student_step(student, x, name)
            return
        try:
            t_out = None
            idx = torch.arange(b, device=device)
            if method.needs_teacher:
                teacher.eval()
                with torch.no_grad():
                    t_out = teacher(x, **wants(method))
            student.train()
            method.train()
            for init in (False, True) if method.has_init_stage else (False,):  # main stage, then the init stage
                uses_student = not init or method.init_uses_student
                s_out = student(x, **wants(method)) if uses_student else None
                terms = call_method(method, method.init_forward if init else method.forward, s_out, t_out, y, idx)
                check_terms(terms)
                loss = sum(terms.values())
                if loss.requires_grad:
                    loss.backward()
        except KDZooError:
            raise
        except Exception as e:
            for p in student.parameters():
                p.grad = None
            _dry_student_step(student, x, name)  # the model's own failure (BatchNorm), named as such
            raise KDZooError(
                f"Method '{method.name}' fails a dry training step with student {name} on a batch of {b} "
                f"image{'s' if b != 1 else ''}: {type(e).__name__}: {first_line(e)}. Change the method's "
                "options or the teacher/student pair."
            ) from e
