"""Decoupled Knowledge Distillation (DKD) as a kdzoo plugin: the method ``dkd_example``.

Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation", CVPR 2022; the definition and
the CIFAR-100 defaults follow the authors' code (megvii-research/mdistiller, ``DKD``).

This package is kdzoo's worked example of a third-party method package. kdzoo now ships DKD
itself as ``dkd`` (with mdistiller's per-pair ``w_nckd`` and a ``logit_std`` option); this package
registers the same loss under its own name, ``dkd_example``, so that both can be installed at
once: two plugins registering one method name would clash, and kdzoo would disable the later one.

With ``p = softmax(z / T)`` for the student (``s``) and the teacher (``t``), and ``y`` the label:

* **TCKD** (target-class KD): ``KL(b_t || b_s)`` on the binary distributions
  ``b = [p_y, 1 - p_y]``;
* **NCKD** (non-target-class KD): ``KL(q_t || q_s)`` where ``q = softmax(z / T - 1000 * onehot(y))``,
  i.e. the distribution over the non-target classes (the target logit is masked as mdistiller does);
* each KL is summed over the classes and the batch, then multiplied by ``T^2 / B``;
* ``loss = w_ce * CE + warm * (w_tckd * TCKD + w_nckd * NCKD)`` with ``warm = min(epoch / warmup, 1)``.

mdistiller counts epochs from 1, kdzoo from 0 (``Method.start_epoch``), so ``warm`` here is
``min((self.epoch + 1) / warmup, 1)``: the first epoch is weighted ``1 / warmup`` in both.
The paper's ``alpha`` and ``beta`` are ``w_tckd`` and ``w_nckd`` (kdzoo never uses a bare
``alpha``). ``log(1 - p_y)`` is computed with ``logsumexp`` over the other classes rather than
``log(sum(...))``, which is the same number without underflow when ``p_y`` is close to 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdzoo import KDZooError, hookimpl
from kdzoo.methods import Method
from kdzoo.models import NetInfo, Outputs

__version__ = "0.1.0"


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unweighted ``(tckd, nckd)``: each a KL divergence summed over classes and batch, times ``T^2 / B``.

    Computed in float32 (float64 if given); the teacher side is detached.
    """
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    s = student_logits.to(dtype) / T
    t = teacher_logits.detach().to(dtype) / T
    batch = s.shape[0]
    gt = F.one_hot(labels, s.shape[1]).bool()

    def binary_log_probs(z: torch.Tensor) -> torch.Tensor:  # (B, 2): log p_y, log(1 - p_y)
        log_norm = torch.logsumexp(z, dim=1, keepdim=True)
        log_target = z.gather(1, labels[:, None]) - log_norm
        log_other = torch.logsumexp(z.masked_fill(gt, float("-inf")), dim=1, keepdim=True) - log_norm
        return torch.cat([log_target, log_other], dim=1)

    b_s, b_t = binary_log_probs(s), binary_log_probs(t)
    tckd = F.kl_div(b_s, b_t, reduction="sum", log_target=True) * (T * T) / batch
    mask = 1000.0 * gt.to(dtype)
    q_s = F.log_softmax(s - mask, dim=1)
    q_t = F.log_softmax(t - mask, dim=1)
    nckd = F.kl_div(q_s, q_t, reduction="sum", log_target=True) * (T * T) / batch
    return tckd, nckd


class DKD(Method):
    """Decoupled KD: ``w_ce * CE + warm * (w_tckd * TCKD + w_nckd * NCKD)``. Terms: ``"ce"``, ``"tckd"``, ``"nckd"``."""

    name = "dkd_example"
    family = "logits"
    needs_teacher = True
    defaults = {"w_ce": 1.0, "w_tckd": 1.0, "w_nckd": 8.0, "T": 4.0, "warmup": 20}
    reference = ("Zhao et al., 'Decoupled Knowledge Distillation', CVPR 2022; defaults (CIFAR-100) from "
                 "megvii-research/mdistiller configs/cifar100/dkd.")

    def __init__(self, student: NetInfo, teacher: NetInfo | None = None, **hparams) -> None:
        super().__init__(student, teacher, **hparams)
        if not self.T > 0:
            raise KDZooError(f"Method 'dkd_example' needs a temperature T > 0, got T={self.T}. The default is 4.0.")
        if self.warmup < 0:
            raise KDZooError(f"Method 'dkd_example': warmup must be >= 0 epochs, got {self.warmup}. The default is 20; 0 turns it off.")
        if student.num_classes < 3:
            raise KDZooError("Method 'dkd_example' needs at least 3 classes: NCKD compares the non-target classes.")

    @property
    def warm(self) -> float:
        """``min((epoch + 1) / warmup, 1)``: mdistiller's ``min(epoch / warmup, 1)`` with its 1-based epoch."""
        return min((self.epoch + 1) / self.warmup, 1.0) if self.warmup else 1.0

    def forward(self, student: Outputs, teacher: Outputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        tckd, nckd = dkd_terms(student.logits, teacher.logits, labels, self.T)
        warm = self.warm
        return {
            "ce": self.w_ce * self.ce(student.logits, labels),
            "tckd": warm * self.w_tckd * tckd,
            "nckd": warm * self.w_nckd * nckd,
        }


@hookimpl
def register_methods(register):
    register(DKD)
