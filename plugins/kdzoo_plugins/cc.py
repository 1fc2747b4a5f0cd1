"""Correlation congruence (``cc``, CC), as RepDistiller computes it, on the pooled embeddings.

Definition (RepDistiller ``Correlation``, "code emailed to me by the original author", with its
``LinearEmbed`` heads; mdistiller has no CC)::

    e_s = Linear_s(student embedding)      (B, 128)   trainable, bias, no normalisation
    e_t = Linear_t(teacher embedding)      (B, 128)   trainable too (RepDistiller trains both heads)
    d   = |e_s - e_t|                       element-wise
    cc  = mean over i = 0..B-2 of  sum_j d[i, j] * d[i + 1, j]

Each sample is paired with the next one in the batch (``delta[:-1] * delta[1:]``); the batches are
shuffled, so the pairs are random. This is **not** the paper's loss: Peng et al. (ICCV 2019) build
``B x B`` correlation matrices of the embeddings with a Gaussian RBF kernel approximated by its
Taylor series (AberHu/Knowledge-Distillation-Zoo: gamma 0.4, order 2) and match them with
``||C_t - C_s||^2 / B^2``. kdzoo follows RepDistiller's code, because the CC row of the published
CIFAR-100 tables (RepDistiller, CRD paper) was trained with it, at ``-b 0.02``: the defaults are
``w_ce = 1``, ``w_cc = 0.02``, ``embed_dim = 128`` (RepDistiller's ``--feat_dim``).

``LinearEmbed`` is a plain ``nn.Linear`` (the L2-normalising ``Embed`` is CRD's head, not CC's).
Both heads are submodules, so the student's optimizer trains them and the checkpoint keeps them.
Widths may differ (each head maps its own embedding to ``embed_dim``). The heads and the loss run in
float32 (float64 if the method is) with autocast disabled: ``d`` is a difference of close values.
A batch of 1 has no pair: the term is zero, and ``validate_batch_size`` refuses that size.
"""
from __future__ import annotations

import torch
from torch import nn

from kdzoo import KDZooError, hookimpl
from kdzoo.methods import Method
from kdzoo.models import NetInfo, Outputs


def cc_loss(e_s: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
    """RepDistiller's ``mean_i sum_j |e_s - e_t|[i, j] * |e_s - e_t|[i + 1, j]`` over consecutive samples."""
    delta = (e_s - e_t).abs()
    return (delta[:-1] * delta[1:]).sum(1).mean()


class CC(Method):
    """Correlation congruence (RepDistiller's code): ``w_ce * CE + w_cc * cc_loss(heads(embeddings))``.

    Terms: ``"ce"``, ``"cc"``. Parameters: ``embed_s`` and ``embed_t`` (``Linear(dim -> embed_dim)``).
    """

    name = "cc"
    family = "relation"
    needs_teacher = True
    needs_embedding = True
    defaults = {"w_ce": 1.0, "w_cc": 0.02, "embed_dim": 128}
    reference = (
        "Peng et al., 'Correlation Congruence for Knowledge Distillation', ICCV 2019; loss, heads and weight "
        "from RepDistiller (Tian et al., CRD, ICLR 2020) distiller_zoo/CC.py, models/util.py LinearEmbed."
    )

    def __init__(self, student: NetInfo, teacher: NetInfo | None = None, **hparams) -> None:
        super().__init__(student, teacher, **hparams)
        if self.embed_dim < 1:
            raise KDZooError(f"Method 'cc': embed_dim must be >= 1, got {self.embed_dim} (RepDistiller uses 128).")
        for who, info in (("student", student), ("teacher", teacher)):
            if info.embed_dim < 1:
                raise KDZooError(
                    f"Method 'cc' needs the {who}'s pooled embedding, but the {who} reports embed_dim="
                    f"{info.embed_dim}. Use a backbone with a pre-logit vector (timm's forward_head(x, "
                    "pre_logits=True)), or a method that needs no embedding."
                )
        self.embed_s = nn.Linear(student.embed_dim, self.embed_dim)
        self.embed_t = nn.Linear(teacher.embed_dim, self.embed_dim)

    def validate_batch_size(self, batch_size: int) -> None:
        """Refuse batches of 1: the loss pairs each sample with the next one, and one sample has none."""
        if batch_size < 2 and self.w_cc != 0:
            raise KDZooError(
                f"Method 'cc' cannot learn from batches of {batch_size} image: RepDistiller's correlation loss "
                "multiplies each sample's student-teacher difference with the next sample's, and a single sample "
                "has no next one, so the term is always zero. Use a batch size of at least 2 (RepDistiller uses "
                "64), or set w_cc=0."
            )

    def forward(self, student: Outputs, teacher: Outputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = {"ce": self.w_ce * self.ce(student.logits, labels)}
        s = student.embedding.flatten(1)
        t = teacher.embedding.detach().flatten(1)
        if t.is_inference():  # nn.Linear saves its input for the weight gradient
            t = t.clone()
        dtype = self.embed_s.weight.dtype
        with torch.autocast(s.device.type, enabled=False):
            e_s = self.embed_s(s.to(dtype))
            e_t = self.embed_t(t.to(dtype))
            if len(s) < 2:  # a 1-sample last batch: no pair
                terms["cc"] = self.w_cc * (e_s - e_t).sum() * 0.0
            else:
                terms["cc"] = self.w_cc * cc_loss(e_s, e_t)
        return terms


@hookimpl
def register_methods(register):
    register(CC)
