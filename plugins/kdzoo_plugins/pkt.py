"""Probabilistic knowledge transfer (``pkt``, PKT), on the pooled embeddings.

Definition (RepDistiller ``PKT.cosine_similarity_loss``, "code from author"
passalis/probabilistic_kt; mdistiller ``PKT``), with ``eps = 1e-7``::

    x      = e / (||e||_2 + eps)        per row; NaN entries set to 0
    S      = (x x^T + 1) / 2            cosine similarities scaled to [0, 1]   (B, B)
    P      = S / S.sum(1)               each row a probability distribution
    pkt    = mean over the B^2 entries of  P_t * log((P_t + eps) / (P_s + eps))

The defaults are RepDistiller's and mdistiller's: ``w_ce = 1``, ``w_pkt = 30000`` (RepDistiller
``-a 0 -b 30000``). The teacher's and the student's embedding widths may differ: only the
``B x B`` similarities are compared. A batch of 1 gives ``P = [[1]]`` on both sides and a zero term,
so ``validate_batch_size`` refuses it. An all-zero embedding (possible after a ReLU) has the value the
reference code gives it, but a finite gradient: the reference's ``sqrt`` at 0 makes it NaN. Computed in float32 (float64 if given) with autocast
disabled; the teacher side carries no gradient.
"""
from __future__ import annotations

import torch

from kdzoo import KDZooError, hookimpl
from kdzoo.methods import Method
from kdzoo.models import Outputs, loss_dtype

EPS = 1e-7


def similarity_probabilities(e: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Row-stochastic ``(B, B)`` matrix of cosine similarities scaled to [0, 1] (RepDistiller's PKT)."""
    e = e.flatten(1)
    sq = e.pow(2).sum(1, keepdim=True)
    positive = sq > 0  # sqrt's gradient at 0 is infinite: a zero row would make the whole gradient NaN
    norm = torch.where(positive, torch.where(positive, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))
    x = e / (norm + eps)
    x = torch.where(torch.isnan(x), torch.zeros_like(x), x)
    sim = (x @ x.t() + 1.0) / 2.0
    return sim / sim.sum(1, keepdim=True)


def pkt_loss(e_s: torch.Tensor, e_t: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``mean(P_t * log((P_t + eps) / (P_s + eps)))`` over all ``B^2`` entries."""
    with torch.autocast(e_s.device.type, enabled=False):
        with torch.no_grad():
            p_t = similarity_probabilities(loss_dtype(e_t.detach()), eps)
        p_s = similarity_probabilities(loss_dtype(e_s), eps)
        return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


class PKT(Method):
    """Probabilistic KT: ``w_ce * CE + w_pkt * pkt_loss(embeddings)``. Terms: ``"ce"``, ``"pkt"``."""

    name = "pkt"
    family = "relation"
    needs_teacher = True
    needs_embedding = True
    defaults = {"w_ce": 1.0, "w_pkt": 30000.0}
    reference = (
        "Passalis & Tefas, 'Learning Deep Representations with Probabilistic Knowledge Transfer', ECCV 2018; "
        "loss and weight from RepDistiller (Tian et al., CRD, ICLR 2020) distiller_zoo/PKT.py and mdistiller."
    )

    def validate_batch_size(self, batch_size: int) -> None:
        """Refuse batches of 1: a single sample's similarity distribution is ``[1]`` for both nets."""
        if batch_size < 2 and self.w_pkt != 0:
            raise KDZooError(
                f"Method 'pkt' cannot learn from batches of {batch_size} image: it matches the distributions of "
                "similarities between the samples of a batch, and a single sample's distribution is [1] for student "
                "and teacher alike, so the term is always zero. Use a batch size of at least 2 (RepDistiller uses "
                "64), or set w_pkt=0."
            )

    def forward(self, student: Outputs, teacher: Outputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "ce": self.w_ce * self.ce(student.logits, labels),
            "pkt": self.w_pkt * pkt_loss(student.embedding, teacher.embedding),
        }


@hookimpl
def register_methods(register):
    register(PKT)
