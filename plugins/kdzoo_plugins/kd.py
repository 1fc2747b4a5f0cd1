"""Hinton knowledge distillation on logits (``kd``).

Definition (RepDistiller ``DistillKL`` / mdistiller ``KD``)::

    kd = T^2 * KL(softmax(t / T) || softmax(s / T))   summed over classes, mean over the batch

The seed article writes its loss as ``alpha * hard + (1 - alpha) * soft``. kdzoo never uses a bare
``alpha`` (the anchors use it with opposite meanings); the article's ``alpha`` maps to
``w_ce = alpha`` and ``w_kd = 1 - alpha``. The defaults, ``w_ce=0.1, w_kd=0.9, T=4``, are
RepDistiller's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdzoo import KDZooError, hookimpl
from kdzoo.methods import Method
from kdzoo.models import NetInfo, Outputs


def soft_targets(logits: torch.Tensor, T: float) -> torch.Tensor:
    """Hinton's soft targets ``softmax(logits / T)`` over the last dimension, in float32 (or float64 if given).

    These are computed from *logits*, per batch; never from an output that is already a softmax.
    """
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    return F.softmax(logits / T, dim=-1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, summed over classes and averaged over the batch (float32)."""
    p_t = soft_targets(teacher_logits.detach(), T)
    log_p_s = F.log_softmax(student_logits.float() / T, dim=-1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * (T * T)


class KD(Method):
    """Hinton KD: ``w_ce * CE(s, y) + w_kd * T^2 * KL(softmax(t/T) || softmax(s/T))``.

    Seed-article mapping: its ``alpha * hard + (1 - alpha) * soft`` is ``w_ce = alpha``,
    ``w_kd = 1 - alpha``. Terms: ``"ce"``, ``"kd"``.
    """

    name = "kd"
    needs_teacher = True
    defaults = {"w_ce": 0.1, "w_kd": 0.9, "T": 4.0}
    reference = (
        "Hinton, Vinyals & Dean, 'Distilling the Knowledge in a Neural Network', 2015; "
        "defaults from RepDistiller (Tian et al., CRD, ICLR 2020) and mdistiller."
    )

    def __init__(self, student: NetInfo, teacher: NetInfo | None = None, **hparams) -> None:
        super().__init__(student, teacher, **hparams)
        if not self.T > 0:
            raise KDZooError(f"Method 'kd' needs a temperature T > 0, got T={self.T}. Set T to a positive number (the default is 4.0).")

    def forward(self, student: Outputs, teacher: Outputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "ce": self.w_ce * self.ce(student.logits, labels),
            "kd": self.w_kd * kd_loss(student.logits, teacher.logits, self.T),
        }


@hookimpl
def register_methods(register):
    register(KD)
