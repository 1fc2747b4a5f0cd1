"""Contrastive representation distillation (``crd``), on the pooled pre-logit embeddings.

Definition (RepDistiller ``crd/criterion.py`` ``CRDLoss`` + ``crd/memory.py`` ``ContrastMemory``,
negatives as ``dataset/cifar100.py`` ``CIFAR100InstanceSample`` in its default ``'exact'`` mode):

* heads: ``v_s = normalize(Linear(D_s -> feat_dim)(e_s))``, ``v_t = normalize(Linear(D_t -> feat_dim)(e_t))``,
  both trainable (trained with the student, as RepDistiller's ``trainable_list``);
* two memory banks of ``N x feat_dim`` (``N`` = training-set size): ``memory_s`` holds student
  vectors, ``memory_t`` teacher vectors, initialised uniform in ``[-stdv, stdv]`` with
  ``stdv = 1 / sqrt(feat_dim / 3)``;
* for each sample, ``nce_k`` negatives are drawn uniformly from the training samples of the *other*
  classes; the positive, in column 0, is the sample's own index. As RepDistiller's ``np.random.choice(
  cls_negative[target], k, replace=k > len(cls_negative[target]))``, they are drawn without replacement
  when the other classes hold at least ``nce_k`` samples (CIFAR: 45,000 or 49,500 >= 16,384), with
  replacement otherwise;
* scores ``P = exp(v . m / nce_t) / Z`` over the ``K + 1`` bank rows: the student vector against the
  teacher bank, and the teacher vector against the student bank. Each side has its own ``Z``, fixed
  from the first training batch as ``mean(exp(v . m / nce_t)) * N`` and kept in the ``Z`` buffer
  (``[student-anchored, teacher-anchored]``; -1 until set), so a resumed run keeps it;
* NCE loss with the uniform noise distribution ``Pn = 1 / N``, ``eps = 1e-7``, for each side::

      -[ sum_b log(P+ / (P+ + K Pn + eps)) + sum_b sum_k log(K Pn / (P-_k + K Pn + eps)) ] / B

  and ``crd`` is the sum of the two sides;
* after the scores, without gradient, the rows of the batch's samples are updated:
  ``m <- normalize(nce_m * m + (1 - nce_m) * v)``, student vectors into ``memory_s`` and teacher
  vectors into ``memory_t``. Only in training mode (an evaluation pass must not write validation
  embeddings into the banks); ``Z`` is likewise stored only in training mode.

Loss: ``w_ce * CE + w_crd * crd + w_kd * KD``. The defaults are RepDistiller's CRD (``-r 1 -a 0 -b 0.8``,
``nce_k 16384, nce_t 0.07, nce_m 0.5, feat_dim 128``). **CRD+KD** (the CRD paper's "CRD+KD" rows,
RepDistiller ``-a 1``) is the variant ``{method: crd, w_kd: 1.0}``: ``kd`` is Hinton's
``T^2 * KL(softmax(t/T) || softmax(s/T))`` at ``T = 4`` (:func:`kdzoo_plugins.kd.kd_loss`). A term whose
weight is 0 is neither computed nor returned.

Memory: the banks take ``2 * N * feat_dim * 4`` bytes in float32: 51.2 MB for the 50,000 CIFAR-10 or
CIFAR-100 training images at ``feat_dim=128``. The scores are one ``(B, N)`` matmul per side, then the
``K + 1`` columns are gathered (``B x N`` floats, instead of RepDistiller's ``B x (K+1) x feat_dim``
gather, 0.5 GB per side at ``B=64``). The bank update is out of place (a fresh ``N x feat_dim`` tensor
per step) because the matmul keeps the old bank for the backward pass.

The engine calls ``bind_train_set(labels)`` before training (it creates the banks and the per-class
tables the negatives are drawn from) and ``forward(..., indices=...)`` with the batch's training-set
indices. Negatives come from torch's global RNG on the banks' device (one ``torch.rand`` per batch),
so a run is reproducible under the engine's per-member seed. Computed with autocast disabled, in the
heads' dtype (float32, float64 after ``.to(torch.float64)``). The heads' L2 normalisation is
``F.normalize`` (norm clamped at 1e-12), where RepDistiller divides by the bare norm.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdzoo import KDZooError, hookimpl
from kdzoo.methods import Method, PairNotSupported
from kdzoo.models import NetInfo, Outputs
from kdzoo_plugins.kd import kd_loss

EPS = 1e-7  # RepDistiller's ContrastLoss eps


def nce_loss(scores: torch.Tensor, n_data: int) -> torch.Tensor:
    """RepDistiller's ``ContrastLoss``: ``scores`` is ``(B, K + 1)`` normalised scores ``P``, the positive in
    column 0. ``-[sum log(P+ / (P+ + K/N + eps)) + sum log((K/N) / (P- + K/N + eps))] / B``."""
    batch, k = scores.shape[0], scores.shape[1] - 1
    k_pn = k / float(n_data)
    pos, neg = scores[:, 0], scores[:, 1:]
    log_d1 = torch.log(pos / (pos + (k_pn + EPS)))
    log_d0 = torch.log(k_pn / (neg + (k_pn + EPS)))
    return -(log_d1.sum() + log_d0.sum()) / batch


class CRD(Method):
    """CRD: ``w_ce * CE + w_crd * (NCE_student-anchored + NCE_teacher-anchored) + w_kd * KD``.

    Terms: ``"ce"``, ``"crd"``, and ``"kd"`` when ``w_kd > 0`` (CRD+KD: ``w_kd=1.0``).
    Needs ``bind_train_set(labels)`` before the first ``forward(..., indices=...)``.
    """

    name = "crd"
    family = "relation"
    needs_teacher = True
    needs_embedding = True
    needs_indices = True
    needs_train_labels = True
    defaults = {"w_ce": 1.0, "w_crd": 0.8, "w_kd": 0.0, "T": 4.0,
                "nce_k": 16384, "nce_t": 0.07, "nce_m": 0.5, "feat_dim": 128}
    reference = (
        "Tian, Krishnan & Isola, 'Contrastive Representation Distillation', ICLR 2020; definition and "
        "defaults from RepDistiller (crd/criterion.py, crd/memory.py, dataset/cifar100.py 'exact' sampling, "
        "train_student.py). CRD+KD is w_kd=1.0 (RepDistiller -a 1)."
    )

    def __init__(self, student: NetInfo, teacher: NetInfo | None = None, **hparams: Any) -> None:
        super().__init__(student, teacher, **hparams)
        if self.nce_k < 1:
            raise KDZooError(f"Method 'crd': nce_k (negatives per sample) must be >= 1, got {self.nce_k}. "
                             "The published value is 16384.")
        if not self.nce_t > 0:
            raise KDZooError(f"Method 'crd': the NCE temperature nce_t must be > 0, got {self.nce_t}. "
                             "The published value is 0.07.")
        if not 0 <= self.nce_m <= 1:
            raise KDZooError(f"Method 'crd': the memory momentum nce_m must be in [0, 1], got {self.nce_m}. "
                             "The published value is 0.5.")
        if self.feat_dim < 1:
            raise KDZooError(f"Method 'crd': feat_dim must be >= 1, got {self.feat_dim}. The published value is 128.")
        if not self.T > 0:
            raise KDZooError(f"Method 'crd' needs a KD temperature T > 0, got T={self.T}. The published value is 4.0.")
        if student.embed_dim < 1 or teacher.embed_dim < 1:
            raise PairNotSupported(
                f"Method 'crd' contrasts the pooled pre-logit embeddings, but the student's is {student.embed_dim} "
                f"wide and the teacher's {teacher.embed_dim} wide; a net without an embedding (0) cannot be used. "
                "Choose networks whose classifier reads a pooled vector."
            )
        self.embed_s = nn.Linear(student.embed_dim, self.feat_dim)
        self.embed_t = nn.Linear(teacher.embed_dim, self.feat_dim)
        # Banks are empty until bind_train_set (or load_state_dict) gives them N rows.
        self.register_buffer("memory_s", torch.zeros(0, self.feat_dim))
        self.register_buffer("memory_t", torch.zeros(0, self.feat_dim))
        self.register_buffer("Z", torch.full((2,), -1.0))  # [student-anchored, teacher-anchored]; -1: unset
        # Derived from the labels by bind_train_set; not checkpointed (rebuilt on every bind).
        self.register_buffer("sample_order", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("class_start", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("class_size", torch.zeros(0, dtype=torch.long), persistent=False)
        self.num_train = 0
        self._max_negatives = 0
        self._with_replacement = False  # some class has fewer than nce_k negatives
        self._without_replacement = False  # some class has at least nce_k negatives

    # ------------------------------------------------------------------ training set

    def bind_train_set(self, labels: torch.Tensor) -> None:
        """Create the two ``N x feat_dim`` memory banks (kept when a checkpoint already filled them) and the
        per-class tables the negatives are drawn from."""
        labels = torch.as_tensor(labels).detach().cpu().long().flatten()
        n = len(labels)
        k = self.nce_k
        if n < k + 1:
            raise KDZooError(
                f"Method 'crd' draws nce_k={k} negatives per sample from a memory of the whole training set, "
                f"but the training set holds {n} samples; it needs at least nce_k + 1 = {k + 1}. Lower nce_k "
                f"(e.g. --set nce_k={max(1, n // 4)}) or train on a larger set."
            )
        if labels.min() < 0:
            raise KDZooError(f"Method 'crd': training labels must be >= 0, got {int(labels.min())}.")
        sizes = torch.bincount(labels)
        present = sizes > 0
        if int(present.sum()) < 2:
            raise KDZooError(
                f"Method 'crd' draws its negatives from the other classes, but all {n} training samples are of "
                f"class {int(labels[0])}, so there are none. Train on a set with at least two classes."
            )
        negatives = n - sizes[present]
        self.num_train = n
        self._max_negatives = int(negatives.max())
        self._with_replacement = bool((negatives < k).any())
        self._without_replacement = bool((negatives >= k).any())
        device = self.Z.device
        self.sample_order = torch.sort(labels, stable=True).indices.to(device)
        self.class_start = (torch.cumsum(sizes, 0) - sizes).to(device)
        self.class_size = sizes.to(device)
        rows = self.memory_s.shape[0]
        if rows == n:  # filled by load_state_dict before the bind: resume with them
            return
        if rows != 0:
            raise KDZooError(
                f"Method 'crd': its memory banks hold {rows} samples but the training set has {n}. They come "
                "from a run on another training set; start a new run instead of resuming this one."
            )
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        dtype = self.Z.dtype
        for name in ("memory_s", "memory_t"):  # RepDistiller's order: memory_v1 (student), then memory_v2
            bank = torch.rand(n, self.feat_dim).mul_(2 * stdv).add_(-stdv)
            setattr(self, name, bank.to(device=device, dtype=dtype))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Give the (possibly still empty) banks the checkpoint's size before loading into them."""
        error_msgs = args[-1] if args else kwargs.get("error_msgs", [])
        for name in ("memory_s", "memory_t"):
            saved = state_dict.get(prefix + name)
            current = getattr(self, name)
            if saved is None or saved.shape == current.shape:
                continue
            if current.shape[0] != 0 or saved.dim() != 2 or saved.shape[1] != self.feat_dim:
                error_msgs.append(
                    f"Method 'crd': the checkpoint's memory bank {name} has shape {tuple(saved.shape)}, but this "
                    f"method's is {tuple(current.shape)} (training-set size x feat_dim={self.feat_dim}). The "
                    "checkpoint comes from a run with another training set or feat_dim; start a new run.")
                continue
            setattr(self, name, torch.empty(saved.shape, dtype=current.dtype, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ sampling

    def contrast_indices(self, labels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``(B, nce_k + 1)`` bank rows: column 0 the samples' own ``indices``, then ``nce_k`` negatives drawn
        uniformly from the other classes' samples (without replacement when that class has enough)."""
        order, start, size = self.sample_order, self.class_start, self.class_size
        labels = labels.to(order.device)
        batch, k = labels.shape[0], self.nce_k
        n_c = size[labels].unsqueeze(1)  # (B, 1) samples of the anchor's class
        count = self.num_train - n_c  # (B, 1) its negatives
        # Positions j in [0, count) among the other classes' samples (sorted by class), from one draw of
        # iid uniform keys per row.
        width = self._max_negatives
        keys = torch.rand(batch, max(width, k), device=order.device)
        if self._without_replacement:  # the k largest keys among the valid positions: a uniform k-subset
            valid = torch.arange(width, device=order.device) < count
            top = keys[:, :width].masked_fill(~valid, -1.0).topk(k, dim=1, sorted=False).indices
        if self._with_replacement:  # RepDistiller: replace=True when k exceeds the class's negatives
            draws = (keys[:, :k] * count).long().clamp_max(count - 1)
            top = torch.where(count < k, draws, top) if self._without_replacement else draws
        # Skip the anchor's own class block [start, start + n_c) of the class-sorted order.
        j = top + n_c * (top >= start[labels].unsqueeze(1))
        return torch.cat([indices.to(order.device).long().unsqueeze(1), order[j]], dim=1)

    # ------------------------------------------------------------------ loss

    def crd_loss(self, f_s: torch.Tensor, f_t: torch.Tensor, labels: torch.Tensor,
                 indices: torch.Tensor | None) -> torch.Tensor:
        """Unweighted CRD loss (student-anchored + teacher-anchored NCE); updates the banks when training."""
        if self.num_train == 0:
            raise KDZooError(
                "Method 'crd' was called before bind_train_set(labels): its memory banks hold one vector per "
                "training sample and must be created from the training set first (the engine does this for "
                "methods with needs_train_labels=True)."
            )
        if indices is None:
            raise KDZooError(
                "Method 'crd' needs the batch's training-set indices: call forward(student, teacher, labels, "
                "indices=...) (the engine passes them for methods with needs_indices=True)."
            )
        if indices.shape != (f_s.shape[0],):
            raise KDZooError(f"Method 'crd': indices has shape {tuple(indices.shape)}, expected ({f_s.shape[0]},), "
                             "one training-set index per sample of the batch.")
        dtype = self.embed_s.weight.dtype
        with torch.autocast(f_s.device.type, enabled=False):
            f_t = f_t.detach().flatten(1).to(dtype)
            if f_t.is_inference():  # a teacher run under inference_mode: Linear saves its input for backward
                f_t = f_t.clone()
            v_s = F.normalize(self.embed_s(f_s.flatten(1).to(dtype)), dim=1)
            v_t = F.normalize(self.embed_t(f_t), dim=1)
            idx = self.contrast_indices(labels, indices)
            mem_s, mem_t = self.memory_s, self.memory_t
            # Student vector against the teacher bank, teacher vector against the student bank.
            out_s = torch.exp((v_s @ mem_t.t()).gather(1, idx) / self.nce_t)
            out_t = torch.exp((v_t @ mem_s.t()).gather(1, idx) / self.nce_t)
            n = self.num_train
            with torch.no_grad():
                first = torch.stack([out_s.mean(), out_t.mean()]) * n
                z = torch.where(self.Z < 0, first.to(self.Z.dtype), self.Z)
            loss = nce_loss(out_s / z[0], n) + nce_loss(out_t / z[1], n)
            if self.training:
                with torch.no_grad():
                    self.Z.copy_(z)
                    rows = indices.to(mem_s.device).long()
                    self.memory_s = self._updated(mem_s, rows, v_s)
                    self.memory_t = self._updated(mem_t, rows, v_t)
        return loss

    def _updated(self, bank: torch.Tensor, rows: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``bank`` with ``rows`` set to ``normalize(nce_m * bank[rows] + (1 - nce_m) * v)`` (out of place)."""
        pos = bank.index_select(0, rows) * self.nce_m + v.detach().to(bank.dtype) * (1 - self.nce_m)
        return bank.index_copy(0, rows, pos / pos.pow(2).sum(1, keepdim=True).sqrt())

    def forward(self, student: Outputs, teacher: Outputs, labels: torch.Tensor,
                indices: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        terms = {"ce": self.w_ce * self.ce(student.logits, labels)}
        if self.w_crd != 0:
            terms["crd"] = self.w_crd * self.crd_loss(student.embedding, teacher.embedding, labels, indices)
        if self.w_kd != 0:
            terms["kd"] = self.w_kd * kd_loss(student.logits, teacher.logits, self.T)
        return terms


@hookimpl
def register_methods(register):
    register(CRD)
