"""Hinton knowledge distillation on logits (``kd``), with optional logit standardisation.

Definition (RepDistiller ``DistillKL`` / mdistiller ``KD``)::

    kd = T^2 * KL(softmax(t / T) || softmax(s / T))   summed over classes, mean over the batch

The seed article writes its loss as ``alpha * hard + (1 - alpha) * soft``. kdzoo never uses a bare
``alpha`` (the anchors use it with opposite meanings); the article's ``alpha`` maps to
``w_ce = alpha`` and ``w_kd = 1 - alpha``. The defaults, ``w_ce=0.1, w_kd=0.9, T=4``, are
RepDistiller's.

``logit_std=True`` is logit standardisation (Sun et al., 'Logit Standardization in Knowledge
Distillation', CVPR 2024; sunshangquan/logit-standardization-KD): before the division by ``T``,
the teacher's and the student's logits are each replaced by::

    z' = (z - mean(z)) / (1e-7 + std(z))      mean and unbiased std over the classes, per sample

so the student matches the teacher's logit *relations*, not their scale. Its paper's base setting
for KD is ``T=2`` with a KD weight of 9 and ``w_ce=0.1`` (``--set logit_std=true --set T=2
--set w_kd=9``); kdzoo's ``kd`` keeps RepDistiller's defaults either way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdzoo import KDZooError, hookimpl
from kdzoo.methods import Method
from kdzoo.models import NetInfo, Outputs

#: Added to the standard deviation by logit standardisation (the reference code's value).
STD_EPS = 1e-7


def standardize(logits: torch.Tensor) -> torch.Tensor:
    """Logit standardisation: ``(z - mean(z)) / (1e-7 + std(z))`` over the last dimension (unbiased std)."""
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)
    return (logits - mean) / (STD_EPS + std)


def soft_targets(logits: torch.Tensor, T: float) -> torch.Tensor:
    """Hinton's soft targets ``softmax(logits / T)`` over the last dimension, in float32 (or float64 if given).

    These are computed from *logits*, per batch; never from an output that is already a softmax.
    """
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    return F.softmax(logits / T, dim=-1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float,
            logit_std: bool = False) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, summed over classes and averaged over the batch, in
    float32 (float64 if the student's logits are). With ``logit_std`` both sides are standardised
    (:func:`standardize`) before the division by ``T``.
    """
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    s, t = student_logits.to(dtype), teacher_logits.detach().to(dtype)
    if logit_std:
        s, t = standardize(s), standardize(t)
    p_t = soft_targets(t, T)
    log_p_s = F.log_softmax(s / T, dim=-1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * (T * T)


class KD(Method):
    """Hinton KD: ``w_ce * CE(s, y) + w_kd * T^2 * KL(softmax(t/T) || softmax(s/T))``.

    Seed-article mapping: its ``alpha * hard + (1 - alpha) * soft`` is ``w_ce = alpha``,
    ``w_kd = 1 - alpha``. ``logit_std=True`` standardises both logits first (Sun et al. 2024).
    Terms: ``"ce"``, ``"kd"``.
    """

    name = "kd"
    family = "logits"
    needs_teacher = True
    defaults = {"w_ce": 0.1, "w_kd": 0.9, "T": 4.0, "logit_std": False}
    reference = (
        "Hinton, Vinyals & Dean, 'Distilling the Knowledge in a Neural Network', 2015; "
        "defaults from RepDistiller (Tian et al., CRD, ICLR 2020) and mdistiller. logit_std: Sun et al., "
        "'Logit Standardization in Knowledge Distillation', CVPR 2024."
    )

    def __init__(self, student: NetInfo, teacher: NetInfo | None = None, **hparams) -> None:
        super().__init__(student, teacher, **hparams)
        if not self.T > 0:
            raise KDZooError(f"Method 'kd' needs a temperature T > 0, got T={self.T}. Set T to a positive number (the default is 4.0).")

    def forward(self, student: Outputs, teacher: Outputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "ce": self.w_ce * self.ce(student.logits, labels),
            "kd": self.w_kd * kd_loss(student.logits, teacher.logits, self.T, self.logit_std),
        }


@hookimpl
def register_methods(register):
    register(KD)
