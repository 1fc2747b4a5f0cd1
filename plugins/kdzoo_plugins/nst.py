"""Neuron selectivity transfer (``nst``, NST), on the paired stage outputs.

Definition (RepDistiller ``NSTLoss`` with ``full_loss = True``; mdistiller ``NST``)::

    pool the larger map to the smaller spatial size (adaptive average pooling)
    x      = f reshaped to (B, C, H*W), each channel's map L2-normalised over H*W
    k(a,b) = (a . b)^2                  polynomial kernel between two channel maps
    nst    = mean k(t, t) + mean k(s, s) - 2 mean k(s, t)     means over (B, C, C')
    total  = sum of nst over the paired stages

This is the squared maximum mean discrepancy with the kernel ``(a.b)^2`` (Huang & Wang 2017)
between the sets of channel maps; ``mean k(t, t)`` is a constant (the teacher carries no
gradient) that keeps the loss a distance. RepDistiller sums it over ``feat[1:-1]``, the post-ReLU
stage outputs, and weights it ``-b 50`` (mdistiller ``FEAT_WEIGHT = 50``): ``w_ce = 1``, ``w_nst = 50``.

Stages are paired with :func:`kdzoo.models.pair_stages`. Channel counts may differ (the kernel
compares every student channel with every teacher channel). RepDistiller pools by height only, to a
square ``(H, H)``; kdzoo pools height and width separately to ``(min H, min W)``, the same for the
square maps of the reference nets. Computed in float32 (float64 if given) with autocast disabled.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdzoo import hookimpl
from kdzoo.methods import Method
from kdzoo.models import NetInfo, Outputs, loss_dtype, pair_stages, pool_to_match


def poly_kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over ``(B, C_a, C_b)`` of ``(a[:, i] . b[:, j]) ** 2`` for ``(B, C, N)`` inputs."""
    return (a @ b.transpose(1, 2)).pow(2).mean()


def nst_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Squared MMD with the kernel ``(a.b)^2`` between the L2-normalised channel maps of one stage pair."""
    with torch.autocast(f_s.device.type, enabled=False):
        f_s, f_t = pool_to_match(loss_dtype(f_s), loss_dtype(f_t.detach()))
        s = F.normalize(f_s.flatten(2), dim=2)
        with torch.no_grad():
            t = F.normalize(f_t.flatten(2), dim=2)
            tt = poly_kernel_mean(t, t)
        return tt + poly_kernel_mean(s, s) - 2 * poly_kernel_mean(s, t)


class NST(Method):
    """Neuron selectivity transfer: ``w_ce * CE + w_nst * sum_pairs nst_loss``. Terms: ``"ce"``, ``"nst"``."""

    name = "nst"
    family = "features"
    needs_teacher = True
    needs_features = True
    defaults = {"w_ce": 1.0, "w_nst": 50.0}
    reference = (
        "Huang & Wang, 'Like What You Like: Knowledge Distill via Neuron Selectivity Transfer', 2017; loss and "
        "weight from RepDistiller (Tian et al., CRD, ICLR 2020) distiller_zoo/NST.py and mdistiller."
    )

    def __init__(self, student: NetInfo, teacher: NetInfo | None = None, **hparams) -> None:
        super().__init__(student, teacher, **hparams)
        self.pairs = pair_stages(teacher, student)  # [(teacher_index, student_index), ...]

    def forward(self, student: Outputs, teacher: Outputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        nst = sum(nst_loss(student.features[s], teacher.features[t]) for t, s in self.pairs)
        return {"ce": self.w_ce * self.ce(student.logits, labels), "nst": self.w_nst * nst}


@hookimpl
def register_methods(register):
    register(NST)
