"""Attention transfer (``attention``, AT).

Definition (RepDistiller ``Attention`` / mdistiller ``AT``)::

    a(f)   = normalize(mean_c(f ** p).flatten())      per-sample L2 normalisation
    at     = sum over paired stages of mean((a(s) - a(t)) ** 2)

Stages are paired with :func:`kdzoo.models.pair_stages`. When a pair's spatial sizes differ, the
larger map is adaptive-average-pooled to the smaller one first. Channel counts may differ
(the attention map averages over channels). Computed in float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdzoo import KDZooError, hookimpl
from kdzoo.methods import Method
from kdzoo.models import NetInfo, Outputs, pair_stages, pool_to_match


def attention_map(f: torch.Tensor, p: float) -> torch.Tensor:
    """``normalize(mean_c(f ** p).flatten(1))``: a ``(B, H*W)`` spatial attention map, unit L2 norm per sample."""
    return F.normalize(f.float().pow(p).mean(1).flatten(1))


def at_loss(f_s: torch.Tensor, f_t: torch.Tensor, p: float) -> torch.Tensor:
    """``mean((a(f_s) - a(f_t)) ** 2)`` after pooling the larger map to the smaller spatial size."""
    f_s, f_t = pool_to_match(f_s, f_t)
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


class Attention(Method):
    """Attention transfer: ``w_ce * CE(s, y) + w_at * sum_pairs at_loss``. Terms: ``"ce"``, ``"at"``."""

    name = "attention"
    family = "features"
    needs_teacher = True
    needs_features = True
    defaults = {"w_ce": 1.0, "w_at": 1000.0, "p": 2.0}
    reference = (
        "Zagoruyko & Komodakis, 'Paying More Attention to Attention', ICLR 2017; defaults from "
        "RepDistiller (Tian et al., CRD, ICLR 2020) and mdistiller."
    )

    def __init__(self, student: NetInfo, teacher: NetInfo | None = None, **hparams) -> None:
        super().__init__(student, teacher, **hparams)
        if not self.p > 0:
            raise KDZooError(f"Method 'attention' needs p > 0, got p={self.p}. The published value is 2.0.")
        self.pairs = pair_stages(teacher, student)  # [(teacher_index, student_index), ...]

    def forward(self, student: Outputs, teacher: Outputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        at = sum(at_loss(student.features[s], teacher.features[t].detach(), self.p) for t, s in self.pairs)
        return {"ce": self.w_ce * self.ce(student.logits, labels), "at": self.w_at * at}


@hookimpl
def register_methods(register):
    register(Attention)
