"""Similarity-preserving distillation (``sp``, SP), on the last stage output.

Definition (RepDistiller ``Similarity``, "verified by original author"; mdistiller ``SP``)::

    f      = last stage output (post-activation), flattened to (B, C*H*W)
    G      = normalize_rows(f f^T)          (B, B); each row divided by its L2 norm (eps 1e-12)
    sp     = sum((G_t - G_s) ** 2) / B^2

RepDistiller applies it to ``feat[-2]``, the last stage output before global pooling, and
weights it ``-b 3000`` (mdistiller: ``FEAT_WEIGHT = 3000``); the CE weight is 1 and there is no KL
term, so the defaults are ``w_ce = 1``, ``w_sp = 3000``. Tung & Mori's paper (ICCV 2019) writes the
same row-normalised Gram matrices and ``1/b^2 * ||G_t - G_s||_F^2``; it can sum the loss over
several layers, the reference code uses the last stage only, as here.

Teacher and student may differ in width and spatial size: only the ``B x B`` Gram matrices are
compared. A batch of 1 carries no relation (both normalised 1x1 matrices are 1), so
``validate_batch_size`` refuses it. Computed in float32 (float64 if given) with autocast disabled.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdzoo import KDZooError, hookimpl
from kdzoo.methods import Method
from kdzoo.models import Outputs, loss_dtype


def similarity_matrix(f: torch.Tensor) -> torch.Tensor:
    """``normalize_rows(f f^T)`` of the flattened ``(B, ...)`` tensor ``f``: a ``(B, B)`` matrix."""
    f = f.flatten(1)
    return F.normalize(f @ f.t(), p=2, dim=1)


def sp_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """``sum((G_t - G_s) ** 2) / B^2`` (float32, autocast disabled; the teacher side carries no gradient)."""
    batch = f_s.shape[0]
    with torch.autocast(f_s.device.type, enabled=False):
        with torch.no_grad():
            g_t = similarity_matrix(loss_dtype(f_t.detach()))
        g_s = similarity_matrix(loss_dtype(f_s))
        return (g_t - g_s).pow(2).sum() / (batch * batch)


class SP(Method):
    """Similarity-preserving KD: ``w_ce * CE + w_sp * sp_loss(last stage)``. Terms: ``"ce"``, ``"sp"``."""

    name = "sp"
    family = "relation"
    needs_teacher = True
    needs_features = True
    defaults = {"w_ce": 1.0, "w_sp": 3000.0}
    reference = (
        "Tung & Mori, 'Similarity-Preserving Knowledge Distillation', ICCV 2019; loss and weight from "
        "RepDistiller (Tian et al., CRD, ICLR 2020) distiller_zoo/SP.py and mdistiller."
    )

    def validate_batch_size(self, batch_size: int) -> None:
        """Refuse batches of 1: one sample has no similarity to another, so the term is always 0."""
        if batch_size < 2 and self.w_sp != 0:
            raise KDZooError(
                f"Method 'sp' cannot learn from batches of {batch_size} image: it transfers the similarities "
                "between the samples of a batch, and a single sample's normalised 1x1 similarity matrix is 1 for "
                "student and teacher alike, so the term is always zero. Use a batch size of at least 2 "
                "(RepDistiller uses 64), or set w_sp=0."
            )

    def forward(self, student: Outputs, teacher: Outputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "ce": self.w_ce * self.ce(student.logits, labels),
            "sp": self.w_sp * sp_loss(student.features[-1], teacher.features[-1]),
        }


@hookimpl
def register_methods(register):
    register(SP)
