"""Decoupled knowledge distillation (``dkd``), as mdistiller computes it.

Zhao, Cui, Song, Qiu & Liang, 'Decoupled Knowledge Distillation', CVPR 2022; the definition, the
defaults and the per-pair weights are those of the authors' code (megvii-research/mdistiller,
``mdistiller/distillers/DKD.py``, ``configs/cifar100/dkd/*.yaml``).

With ``p = softmax(z / T)`` for the student (``s``) and the teacher (``t``), ``y`` the label and
``gt`` its one-hot mask:

* **TCKD** (target-class KD): ``KL(b_t || b_s)`` of the binary distributions
  ``b = [p_y, sum_{c != y} p_c]``;
* **NCKD** (non-target-class KD): ``KL(q_t || q_s)`` with ``q = softmax(z / T - 1000 * gt)``: the
  target logit is pushed down by 1000 (after the division by ``T``, as mdistiller does), so ``q``
  is the distribution over the non-target classes;
* each KL is summed over classes and batch, then multiplied by ``T^2 / B``;
* ``loss = w_ce * CE + warm * (w_tckd * TCKD + w_nckd * NCKD)``, ``warm = min(epoch / warmup, 1)``.

Warm-up: mdistiller's trainer counts epochs from 1 (``epoch = 1`` ... ``EPOCHS``) and passes that
to ``min(epoch / WARMUP, 1)``; kdzoo's ``self.epoch`` counts from 0, so ``warm`` here is
``min((self.epoch + 1) / warmup, 1)``: the first epoch is weighted ``1 / 20`` in both, and the
full weight is reached in the 20th epoch. ``warmup=0`` switches the warm-up off.

``log b`` comes from ``logsumexp`` over the target logit and over the other logits: the same
number as mdistiller's ``log`` of the summed probabilities, without its underflow to ``log 0 = -inf``
when a student is very confident. NCKD uses the ``-1000`` mask exactly as the reference does.

Defaults (mdistiller ``cfg.DKD``): ``T=4, w_ce=1, w_tckd=1, w_nckd=8, warmup=20``; the paper's
``alpha`` and ``beta`` are ``w_tckd`` and ``w_nckd`` (kdzoo never uses a bare ``alpha``).
mdistiller's CIFAR-100 configs set ``w_nckd`` per pair (``pair_defaults``): 2 for resnet56→resnet20
and resnet110→resnet32; 6 for vgg13→vgg8, vgg13→MobileNetV2, wrn_40_2→wrn_16_2 and
wrn_40_2→wrn_40_1; the default 8 for the others (resnet32x4→resnet8x4, →ShuffleV1, →ShuffleV2,
ResNet50→MobileNetV2, wrn_40_2→ShuffleV1). Its ImageNet setting is ``w_nckd=0.5, T=1, warmup=1``.

``logit_std=True`` standardises both logits first, before the division by ``T`` (Sun et al.,
'Logit Standardization in Knowledge Distillation', CVPR 2024; see :mod:`kdzoo_plugins.kd`), as
that paper's DKD does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdzoo import KDZooError, hookimpl
from kdzoo.methods import Method
from kdzoo.models import NetInfo, Outputs
from kdzoo_plugins.kd import standardize

#: How far NCKD pushes the target logit down (after the division by T), as mdistiller does.
GT_MASK_SHIFT = 1000.0


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, T: float,
              logit_std: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Unweighted ``(tckd, nckd)``: each a KL divergence summed over classes and batch, times ``T^2 / B``.

    Computed in float32 (float64 if the student's logits are); the teacher side is detached.
    """
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    s, t = student_logits.to(dtype), teacher_logits.detach().to(dtype)
    if logit_std:
        s, t = standardize(s), standardize(t)
    s, t = s / T, t / T
    batch = s.shape[0]
    gt = F.one_hot(labels, s.shape[1]).bool()

    def binary_log_probs(z: torch.Tensor) -> torch.Tensor:  # (B, 2): log p_y, log sum_{c != y} p_c
        log_norm = torch.logsumexp(z, dim=1, keepdim=True)
        log_target = z.gather(1, labels[:, None]) - log_norm
        log_other = torch.logsumexp(z.masked_fill(gt, float("-inf")), dim=1, keepdim=True) - log_norm
        return torch.cat([log_target, log_other], dim=1)

    b_t = binary_log_probs(t).exp()
    tckd = F.kl_div(binary_log_probs(s), b_t, reduction="sum") * (T * T) / batch
    shift = GT_MASK_SHIFT * gt.to(dtype)
    q_t = F.softmax(t - shift, dim=1)
    log_q_s = F.log_softmax(s - shift, dim=1)
    nckd = F.kl_div(log_q_s, q_t, reduction="sum") * (T * T) / batch
    return tckd, nckd


class DKD(Method):
    """Decoupled KD: ``w_ce * CE + warm * (w_tckd * TCKD + w_nckd * NCKD)``. Terms: ``"ce"``, ``"tckd"``, ``"nckd"``."""

    name = "dkd"
    family = "logits"
    needs_teacher = True
    defaults = {"w_ce": 1.0, "w_tckd": 1.0, "w_nckd": 8.0, "T": 4.0, "warmup": 20, "logit_std": False}
    pair_defaults = {  # mdistiller configs/cifar100/dkd/*.yaml (DKD.BETA); pairs without BETA keep 8
        ("resnet56", "resnet20"): {"w_nckd": 2.0},
        ("resnet110", "resnet32"): {"w_nckd": 2.0},
        ("vgg13_cifar", "vgg8"): {"w_nckd": 6.0},
        ("vgg13_cifar", "mobile_half"): {"w_nckd": 6.0},
        ("wrn_40_2", "wrn_16_2"): {"w_nckd": 6.0},
        ("wrn_40_2", "wrn_40_1"): {"w_nckd": 6.0},
        ("resnet32x4", "resnet8x4"): {"w_nckd": 8.0},
        ("resnet32x4", "shufflenet_v1"): {"w_nckd": 8.0},
        ("resnet32x4", "shufflenet_v2"): {"w_nckd": 8.0},
        ("resnet50_cifar", "mobile_half"): {"w_nckd": 8.0},
        ("wrn_40_2", "shufflenet_v1"): {"w_nckd": 8.0},
    }
    reference = ("Zhao et al., 'Decoupled Knowledge Distillation', CVPR 2022; definition, defaults and per-pair "
                 "w_nckd from megvii-research/mdistiller (DKD.py, configs/cifar100/dkd). logit_std: Sun et al., "
                 "'Logit Standardization in Knowledge Distillation', CVPR 2024.")

    def __init__(self, student: NetInfo, teacher: NetInfo | None = None, **hparams) -> None:
        super().__init__(student, teacher, **hparams)
        if not self.T > 0:
            raise KDZooError(f"Method 'dkd' needs a temperature T > 0, got T={self.T}. Set T to a positive number "
                             "(the default is 4.0).")
        if self.warmup < 0:
            raise KDZooError(f"Method 'dkd': warmup must be >= 0 epochs, got {self.warmup}. The default is 20 "
                             "(mdistiller's); 0 turns the warm-up off.")
        if student.num_classes < 3:
            raise KDZooError(
                f"Method 'dkd' needs at least 3 classes, but the student has {student.num_classes}: NCKD compares "
                "the distributions over the non-target classes, and with 2 classes there is only one, so NCKD is "
                "always 0. Use kd for a 2-class task.")

    @property
    def warm(self) -> float:
        """``min((epoch + 1) / warmup, 1)``: mdistiller's ``min(epoch / warmup, 1)`` with its 1-based epoch."""
        return min((self.epoch + 1) / self.warmup, 1.0) if self.warmup else 1.0

    def forward(self, student: Outputs, teacher: Outputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.autocast(student.logits.device.type, enabled=False):
            tckd, nckd = dkd_terms(student.logits, teacher.logits, labels, self.T, self.logit_std)
        warm = self.warm
        return {
            "ce": self.w_ce * self.ce(student.logits, labels),
            "tckd": warm * self.w_tckd * tckd,
            "nckd": warm * self.w_nckd * nckd,
        }


@hookimpl
def register_methods(register):
    register(DKD)
