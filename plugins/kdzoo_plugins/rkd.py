"""Relational knowledge distillation (``rkd``), on the pooled pre-logit embeddings.

Definition (RepDistiller ``RKDLoss`` / mdistiller ``RKD``):

* distance: pairwise Euclidean distances ``d_ij`` (squared distance clamped at 1e-12 before the
  square root, diagonal zero), each matrix divided by the mean of its non-zero entries, then
  smooth-L1 between the student's and the teacher's matrices;
* angle: for every triplet ``(i, j, k)`` the cosine between ``e_i - e_j`` and ``e_k - e_j``
  (L2-normalised difference vectors), then smooth-L1.

The teacher's and the student's embedding widths may differ. The teacher side runs under
``no_grad``. The angle term holds ``B^3`` cosines (plus a ``B x B x D`` difference tensor), so
batches above ``angle_max_batch`` are refused with an explanation; ``w_angle=0`` skips it.
Batches of fewer than 3 are refused too: with 2 embeddings both normalised distances are 1 and
every angle is the same for student and teacher, so both terms are zero (up to rounding). Both
refusals come from ``validate_batch_size``, which validation calls before any training.
Computed in float32, with autocast disabled (the matmuls would otherwise run in bf16/fp16).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdzoo import KDZooError, hookimpl
from kdzoo.methods import Method
from kdzoo.models import NetInfo, Outputs


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``(B, B)`` Euclidean distances of the rows of ``e``: ``sqrt(clamp(|a|^2 + |b|^2 - 2ab, eps))``, diagonal 0."""
    sq = e.pow(2).sum(1)
    d = (sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), dtype=d.dtype, device=d.device))  # not in place: autograd


def normalized_distances(e: torch.Tensor) -> torch.Tensor:
    """:func:`pairwise_distances` divided by the mean of its positive entries."""
    d = pairwise_distances(e)
    return d / d[d > 0].mean()


def triplet_angles(e: torch.Tensor) -> torch.Tensor:
    """Flattened ``(B^3,)`` cosines: entry ``(i, j, k)`` is ``cos(e_j - e_i, e_k - e_i)`` (zero when a difference is zero)."""
    td = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(td, td.transpose(1, 2)).view(-1)


class RKD(Method):
    """Relational KD: ``w_ce * CE + w_dist * distance + w_angle * angle``.

    Terms: ``"ce"``, ``"dist"``, ``"angle"``; a term whose weight is 0 is neither computed nor returned.
    """

    name = "rkd"
    family = "relation"
    needs_teacher = True
    needs_embedding = True
    defaults = {"w_ce": 1.0, "w_dist": 25.0, "w_angle": 50.0, "angle_max_batch": 512}
    reference = (
        "Park, Kim, Lu & Cho, 'Relational Knowledge Distillation', CVPR 2019; defaults from "
        "RepDistiller (Tian et al., CRD, ICLR 2020) and mdistiller."
    )

    def __init__(self, student: NetInfo, teacher: NetInfo | None = None, **hparams) -> None:
        super().__init__(student, teacher, **hparams)
        if self.angle_max_batch < 1:
            raise KDZooError(f"Method 'rkd': angle_max_batch must be >= 1, got {self.angle_max_batch}.")

    def _check_angle_memory(self, batch: int) -> None:
        if self.w_angle != 0 and batch > self.angle_max_batch:
            gib = 4 * batch**3 * 3 / 2**30  # student cosines, their gradient, teacher cosines (float32)
            raise KDZooError(
                f"Method 'rkd': a batch of {batch} exceeds angle_max_batch={self.angle_max_batch}. The angle "
                f"term compares all B^3 triplets (here {batch**3:,} cosines, about {gib:.1f} GiB with its "
                "gradient), so its memory grows with the cube of the batch size. Use a smaller batch size, "
                "raise angle_max_batch if your device has the memory, or set w_angle=0 to skip the angle term."
            )

    def validate_batch_size(self, batch_size: int) -> None:
        """Refuse batches above ``angle_max_batch`` (angle term on) and, when a relational term is on,
        below 3: with 2 embeddings both terms are zero up to rounding, with 1 there are no pairs."""
        self._check_angle_memory(batch_size)
        if batch_size < 3 and (self.w_dist != 0 or self.w_angle != 0):
            raise KDZooError(
                f"Method 'rkd' cannot learn from batches of {batch_size} image{'s' if batch_size != 1 else ''}: "
                "it transfers the distances and angles between the embeddings of a batch, and with fewer than 3 "
                "images every normalised distance is 1 and every angle is the same for student and teacher, so "
                "both relational terms are zero (up to rounding) and the run is plain cross-entropy. Use a batch "
                "size of at least 3 (RepDistiller uses 64)."
            )

    def forward(self, student: Outputs, teacher: Outputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = {"ce": self.w_ce * self.ce(student.logits, labels)}
        batch = student.embedding.shape[0]
        self._check_angle_memory(batch)  # also checked before training, by validate_batch_size
        s = student.embedding.flatten(1)
        t = teacher.embedding.detach().flatten(1)
        if batch < 2:  # no pairs: nothing relational to transfer (a 1-sample last batch)
            zero = s.new_zeros((), dtype=torch.float32)
            if self.w_dist != 0:
                terms["dist"] = zero
            if self.w_angle != 0:
                terms["angle"] = zero
            return terms
        with torch.autocast(s.device.type, enabled=False):
            s, t = s.float(), t.float()
            if self.w_dist != 0:
                with torch.no_grad():
                    t_d = normalized_distances(t)
                terms["dist"] = self.w_dist * F.smooth_l1_loss(normalized_distances(s), t_d)
            if self.w_angle != 0:
                with torch.no_grad():
                    t_a = triplet_angles(t)
                terms["angle"] = self.w_angle * F.smooth_l1_loss(triplet_angles(s), t_a)
        return terms


@hookimpl
def register_methods(register):
    register(RKD)
