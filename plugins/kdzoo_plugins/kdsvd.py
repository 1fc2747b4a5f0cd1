"""Self-supervised KD with singular value decomposition (``kdsvd``, KD-SVD), on the paired stage outputs.

Definition (RepDistiller ``KDSVD`` and mdistiller ``KDSVD``, ports of sseung0703/SSKD_SVD), with
``k = 1``. Per paired stage ``i``, each sample's map is a ``(H*W, C)`` matrix ``X`` (rows: positions,
columns: channels) and ``X = U S V^T``::

    v_t, s_t = the teacher's first k right-singular vectors (columns of V, length C) and singular
               values; each vector and the vector s_t[:k] L2-normalised (so s_t = 1 for k = 1)
    v_s      = the student's first k + 3 right-singular vectors, L2-normalised
    align    : cos = v_s^T v_t (k+3, k); for each teacher vector keep the student vector of largest
               |cos|, multiplied by the sign of that cos (v_s <- v_s @ mask)
    v_t, v_s <- v_t * s_t, v_s * s_t                       (the teacher's singular values on both)
    for i > 0: rbf_x[c, c', j] = exp(-(v_x^(i)[c, j] - v_x^(i-1)[c', j])^2 / 8)    x in {s, t}
               kdsvd += sum((rbf_s - rbf_t)^2)          non-finite entries set to 0
    kdsvd /= B

Non-finite singular values or vectors are set to 0, as in the reference code. The teacher carries no
gradient. mdistiller's ``FEAT_WEIGHT`` is 1 and its CE weight 1 (RepDistiller publishes no KD-SVD
weight): ``w_ce = 1``, ``w_svd = 1``, ``k = 1``.

Equal channel counts per paired stage are required: the student's vectors are aligned to the
teacher's by their cosines, which needs vectors of one length. Otherwise ``__init__`` raises
:class:`~kdzoo.methods.PairNotSupported` naming both nets' channel counts. Spatial sizes may
differ (the vectors live in channel space). Stages are paired with :func:`kdzoo.models.pair_stages`;
the RBF links consecutive pairs.

Choices where the reference code is ambiguous or buggy (each tested):

* **Layout** follows RepDistiller and the original TensorFlow code, ``(B, H*W, C)``.
  mdistiller's port reshapes the NCHW map as ``view(B, C*H, W)`` (the TensorFlow NHWC reshape
  applied to NCHW), so its "right-singular vectors" have length W and mix channels with rows;
  kdzoo does not reproduce that.
* **Sign of the teacher's vectors.** A singular vector's sign is arbitrary (LAPACK, cuSOLVER and
  MAGMA may differ), and the teacher's RBF between consecutive stages depends on it: the reference
  code's loss differs between backends. kdzoo fixes it: each teacher vector is flipped so that its
  entry of largest magnitude is positive. The student's sign follows the teacher's through the
  alignment, exactly as in the reference code (mask of ``sign(cos)`` at the ``max |cos|`` entries).
* **Gradient.** ``torch.linalg.svd`` (``torch.svd`` is deprecated) is the forward; its backward
  divides by ``s_i^2 - s_j^2`` for *every* pair of singular values, so two equal ones (two all-zero
  channels of a post-ReLU map are enough) make the whole sample's gradient NaN, even though the
  first ``k + 3`` vectors, the only ones used, have a finite derivative. kdzoo's backward computes
  only the derivative of the vectors it uses (perturbation theory of the eigenvectors of ``X^T X``);
  a term whose denominator is 0 (a repeated *used* singular value, where the derivative is
  undefined) is dropped instead of poisoning the student with NaN.

The SVD runs in float32 (float64 if given) with autocast disabled.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kdzoo import KDZooError, hookimpl
from kdzoo.methods import Method, PairNotSupported
from kdzoo.models import NetInfo, Outputs, loss_dtype, pair_stages


def _finite(x: torch.Tensor) -> torch.Tensor:
    """Non-finite entries set to 0 (the reference code's ``removenan``)."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


class _RightSingularVectors(torch.autograd.Function):
    """The first ``n`` right-singular vectors of each ``(M, C)`` matrix of a batch, as ``(B, C, n)``
    columns, with a backward that involves only those ``n`` vectors (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, n: int) -> torch.Tensor:
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        v = vh.mH  # (B, C, r), r = min(M, C)
        ctx.save_for_backward(x, s, v)
        return v[:, :, :n].clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        x, s, v = ctx.saved_tensors
        n = grad.shape[-1]
        lam = s * s  # eigenvalues of G = X^T X, descending
        lam_n = lam[:, :n]
        # dv_j = sum_{i != j} v_i v_i^T dG v_j / (lam_j - lam_i) + P dG v_j / lam_j, P = I - V V^T
        denom = lam_n.unsqueeze(1) - lam.unsqueeze(2)  # (B, r, n): lam_j - lam_i
        idx = torch.arange(n, device=x.device)
        denom[:, idx, idx] = 0  # i == j: no term
        inv = torch.where(denom != 0, 1.0 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(denom))
        k = (v.mT @ grad) * inv  # (B, r, n): K_ij = v_i^T g_j / (lam_j - lam_i)
        v_n = v[:, :, :n]
        g_g = v @ k @ v_n.mT  # (B, C, C)
        inv_lam = torch.where(lam_n > 0, 1.0 / torch.where(lam_n > 0, lam_n, torch.ones_like(lam_n)), torch.zeros_like(lam_n))
        p_grad = grad - v @ (v.mT @ grad)  # (I - V V^T) g: the null space of X, empty when M >= C
        g_g = g_g + (p_grad * inv_lam.unsqueeze(1)) @ v_n.mT
        return x @ (g_g + g_g.mT), None


def right_singular_vectors(x: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` right-singular vectors (``(B, C, n)``, non-finite entries 0) of the ``(B, M, C)`` batch."""
    return _finite(_RightSingularVectors.apply(x, n))


def stage_matrix(f: torch.Tensor) -> torch.Tensor:
    """A ``(B, C, H, W)`` map as ``(B, H*W, C)`` (RepDistiller's ``view(B, C, H*W).transpose``), float32."""
    return loss_dtype(f).flatten(2).transpose(1, 2)


def teacher_svd(f_t: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's ``(v_t, s_t)``: first ``k`` right-singular vectors ``(B, C, k)``, sign-fixed (largest
    magnitude entry positive) and normalised, and its first ``k`` singular values L2-normalised ``(B, k)``."""
    x = stage_matrix(f_t)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    v = _finite(vh.mH[:, :, :k])
    s = _finite(s[:, :k])
    peak = v.gather(1, v.abs().argmax(1, keepdim=True))  # (B, 1, k): the largest-magnitude entry
    v = v * torch.where(peak < 0, -1.0, 1.0).to(v.dtype)
    return F.normalize(v, dim=1), F.normalize(s, dim=1)


def align_rsv(v_s: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
    """The student vectors ``(B, C, k+3)`` matched to the teacher's ``(B, C, k)``: for each teacher
    vector, the student vector of largest ``|cos|`` times the sign of that cos (reference ``align_rsv``)."""
    cosine = v_s.mT @ v_t  # (B, k+3, k)
    max_abs = cosine.abs().max(1, keepdim=True).values
    mask = torch.where(max_abs == cosine.abs(), torch.sign(cosine), torch.zeros_like(cosine)).detach()
    return v_s @ mask


def kdsvd_loss(g_s: list[torch.Tensor], g_t: list[torch.Tensor], k: int) -> torch.Tensor:
    """Sum over consecutive stage pairs of ``sum((rbf_s - rbf_t)^2)``, divided by the batch size."""
    batch = g_s[0].shape[0]
    total = None
    prev_s = prev_t = None
    with torch.autocast(g_s[0].device.type, enabled=False):
        for f_s, f_t in zip(g_s, g_t):
            with torch.no_grad():
                v_t, s_t = teacher_svd(f_t.detach(), k)
            v_s = F.normalize(right_singular_vectors(stage_matrix(f_s), k + 3), dim=1)
            v_s = align_rsv(v_s, v_t)
            scale = s_t.unsqueeze(1)
            v_t, v_s = v_t * scale, v_s * scale
            if prev_s is not None:
                rbf_s = torch.exp(-(v_s.unsqueeze(2) - prev_s.unsqueeze(1)).pow(2) / 8)
                rbf_t = torch.exp(-(v_t.unsqueeze(2) - prev_t.unsqueeze(1)).pow(2) / 8)
                term = _finite((rbf_s - rbf_t).pow(2)).sum()
                total = term if total is None else total + term
            prev_s, prev_t = v_s, v_t
        if total is None:  # one stage pair: no consecutive stages to relate
            total = prev_s.sum() * 0.0
        return total / batch


class KDSVD(Method):
    """KD-SVD: ``w_ce * CE + w_svd * kdsvd_loss(paired stages)``. Terms: ``"ce"``, ``"svd"``."""

    name = "kdsvd"
    family = "features"
    needs_teacher = True
    needs_features = True
    defaults = {"w_ce": 1.0, "w_svd": 1.0, "k": 1}
    reference = (
        "Lee, Kim & Song, 'Self-supervised Knowledge Distillation Using Singular Value Decomposition', ECCV 2018; "
        "loss from RepDistiller distiller_zoo/KDSVD.py and mdistiller mdistiller/distillers/KDSVD.py (weight 1)."
    )

    def __init__(self, student: NetInfo, teacher: NetInfo | None = None, **hparams) -> None:
        super().__init__(student, teacher, **hparams)
        if self.k < 1:
            raise KDZooError(f"Method 'kdsvd': k (the teacher's singular vectors kept) must be >= 1, got {self.k}. "
                             "The reference value is 1.")
        self.pairs = pair_stages(teacher, student)  # [(teacher_index, student_index), ...]
        t_ch = [teacher.stage_channels[t] for t, _ in self.pairs]
        s_ch = [student.stage_channels[s] for _, s in self.pairs]
        if t_ch != s_ch:
            raise PairNotSupported(
                f"Method 'kdsvd' needs equal channel counts in each paired stage, but the teacher's paired stages "
                f"have {t_ch} channels and the student's {s_ch} (teacher stage channels "
                f"{list(teacher.stage_channels)}, student {list(student.stage_channels)}). KD-SVD aligns the "
                "student's right-singular vectors (one entry per channel) to the teacher's by their cosines, which "
                "needs vectors of the same length. Use a pair with equal widths (e.g. resnet56 -> resnet20, "
                "wrn_40_2 -> wrn_16_2), or another feature method (attention, nst, vid)."
            )

    def forward(self, student: Outputs, teacher: Outputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        g_s = [student.features[s] for _, s in self.pairs]
        g_t = [teacher.features[t] for t, _ in self.pairs]
        return {"ce": self.w_ce * self.ce(student.logits, labels), "svd": self.w_svd * kdsvd_loss(g_s, g_t, self.k)}


@hookimpl
def register_methods(register):
    register(KDSVD)
