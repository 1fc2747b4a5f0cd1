"""Knowledge review (``reviewkd``): attention-based fusion of student stages, hierarchical context loss.

Definition (mdistiller ``mdistiller/distillers/ReviewKD.py``, a copy of Chen et al.'s
``CIFAR-100/model/reviewkd.py`` in dvlab-research/ReviewKD). Levels, input to output: the student's
last ``n`` stage outputs (post-activation, mdistiller's ``STU_PREACT = False``) plus its pooled
embedding as a 1x1 map; targets: the teacher's last ``n`` *pre-activation* stage outputs plus its
pooled embedding as a 1x1 map (``n = min(S, T)``, stages aligned from the last). Deepest first::

    ABF_l:  x = BN(conv1x1(student_l -> mid))
            if a deeper level exists (every level but the embedding):
                y = nearest-upsample(residual from the deeper level, size of x)
                z = sigmoid(conv1x1(cat[x, y] -> 2, with bias))
                x = x * z[:, 0] + y * z[:, 1]
            x = nearest-resize(x, size of the teacher level)   when they differ
            out_l = BN(conv3x3(x -> C_teacher_l)); the residual passed on is x
    mid = min(max_mid_channels = 512, student embedding width)

    HCL(out, t) for a level of height h:
        (MSE(out, t) + sum_{p in (4, 2, 1), p < h} w_p * MSE(pool_p(out), pool_p(t))) / (1 + sum w_p)
        w_p = 1/2, 1/4, 1/8 for the first, second, third pooled size used; pool_p = adaptive avg to p x p
    review = sum over levels of HCL

    loss = w_ce * CE + w_review * min((epoch + 1) / warmup_epochs, 1) * review

Warm-up: mdistiller multiplies by ``min(epoch / 20, 1)`` with 1-based epochs (the first epoch
gets 1/20); kdzoo's epochs are 0-based, so ``epoch + 1``. (The original repository uses 0-based
epochs, so its first epoch has no review loss; kdzoo follows mdistiller, as its tables do.)

Weights: ``w_review = 1`` (mdistiller's ``CFG.REVIEWKD.REVIEWKD_WEIGHT`` and the original's
``--kd-loss-weight``); the original's CIFAR-100 script (``script/reviewKD.sh``) sets it per pair,
in ``pair_defaults``: 5 for wrn40-2 -> wrn16-2 / wrn40-1 / ShuffleV1 and for resnet32x4 ->
resnet8x4 / ShuffleV1, 8 for resnet32x4 -> ShuffleV2, 0.6 for resnet56 -> resnet20, 1 for
resnet110 -> resnet32 (mdistiller's only CIFAR config, resnet32x4 -> resnet8x4, uses 5 too).
The ABFs are trained with the student. The loss runs in float32 with autocast disabled.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdzoo import KDZooError, hookimpl
from kdzoo.methods import Method, PairNotSupported
from kdzoo.models import NetInfo, Outputs

Size = tuple[int, int]


class ABF(nn.Module):
    """Attention-based fusion of one student level with the residual from the deeper one (ReviewKD's ``ABF``)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, out_size: Size) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(output at out_size with the teacher's channels, residual for the next, shallower level)``."""
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            y = F.interpolate(residual, (h, w), mode="nearest")
            z = self.att_conv(torch.cat([x, y], dim=1))
            x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, tuple(out_size), mode="nearest")
        return self.conv2(x), x


def hcl_loss(outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Hierarchical context loss, summed over levels (float32 in, teacher side detached)."""
    total = None
    for fs, ft in zip(outputs, targets):
        ft = ft.detach()
        h = fs.shape[2]
        # written out (no F.mse_loss): the teacher's tensors may come from inference mode
        loss = (fs - ft).pow(2).mean()
        weight, norm = 1.0, 1.0
        for p in (4, 2, 1):
            if p >= h:
                continue
            weight /= 2.0
            loss = loss + weight * (F.adaptive_avg_pool2d(fs, (p, p)) - F.adaptive_avg_pool2d(ft, (p, p))).pow(2).mean()
            norm += weight
        loss = loss / norm
        total = loss if total is None else total + loss
    return total


def _pairs(teacher: str, students: Sequence[str], w: float) -> dict[tuple[str, str], dict[str, float]]:
    return {(teacher, s): {"w_review": w} for s in students}


class ReviewKD(Method):
    """ReviewKD: ``w_ce * CE + w_review * warmup * sum_levels HCL(ABF outputs, teacher levels)``.

    Terms: ``"ce"``, ``"review"``. Needs the student's stage outputs and embedding, and the
    teacher's pre-activation stage outputs and embedding.
    """

    name = "reviewkd"
    family = "features"
    needs_teacher = True
    needs_features = True
    needs_embedding = True
    needs_preact = True
    defaults = {"w_ce": 1.0, "w_review": 1.0, "warmup_epochs": 20, "max_mid_channels": 512}
    pair_defaults = {
        **_pairs("wrn_40_2", ("wrn_16_2", "wrn_40_1", "shufflenet_v1"), 5.0),
        **_pairs("resnet32x4", ("resnet8x4", "shufflenet_v1"), 5.0),
        ("resnet32x4", "shufflenet_v2"): {"w_review": 8.0},
        ("resnet56", "resnet20"): {"w_review": 0.6},
        ("resnet110", "resnet32"): {"w_review": 1.0},
    }
    reference = (
        "Chen, Liu, Zhao & Jia, 'Distilling Knowledge via Knowledge Review', CVPR 2021 (dvlab-research/ReviewKD; "
        "per-pair weights from its CIFAR-100 script); loss and warm-up from mdistiller (Zhao et al., DKD, CVPR 2022)."
    )

    def __init__(self, student: NetInfo, teacher: NetInfo | None = None, **hparams) -> None:
        super().__init__(student, teacher, **hparams)
        if self.warmup_epochs < 0:
            raise KDZooError(f"Method 'reviewkd': warmup_epochs must be >= 0 (0: no warm-up), got {self.warmup_epochs}. "
                             "The published value is 20.")
        if self.max_mid_channels < 1:
            raise KDZooError(f"Method 'reviewkd': max_mid_channels must be >= 1, got {self.max_mid_channels}. "
                             "The published value is 512.")
        if not teacher.has_preact:
            raise PairNotSupported(
                "Method 'reviewkd' distils into the teacher's pre-activation stage outputs, but the teacher net does "
                "not declare them (NetInfo.has_preact is False). Use a teacher backbone that exposes pre-activation "
                "outputs (kdzoo's CIFAR nets do), or another feature method."
            )
        for who, net in (("student", student), ("teacher", teacher)):
            if not net.num_stages or not net.embed_dim:
                raise PairNotSupported(
                    f"Method 'reviewkd' needs stage outputs and a pooled embedding from both nets, but the {who} "
                    f"reports {net.num_stages} stage(s) and embedding width {net.embed_dim}. Use a backbone with "
                    "feature_info and forward_head(pre_logits=True), or a logit method."
                )
        n = min(student.num_stages, teacher.num_stages)
        self.student_stages = list(range(student.num_stages - n, student.num_stages))
        self.teacher_stages = list(range(teacher.num_stages - n, teacher.num_stages))
        in_channels = [student.stage_channels[i] for i in self.student_stages] + [student.embed_dim]
        out_channels = [teacher.stage_channels[i] for i in self.teacher_stages] + [teacher.embed_dim]
        #: teacher sizes per level, input to output (the embedding is 1x1)
        self.out_sizes: list[Size] = [tuple(teacher.stage_sizes[i]) for i in self.teacher_stages] + [(1, 1)]
        self.mid_channels = min(self.max_mid_channels, student.embed_dim)
        last = len(in_channels) - 1
        # stored deepest first, as the reference does (abfs[::-1])
        self.abfs = nn.ModuleList(ABF(in_channels[i], self.mid_channels, out_channels[i], i < last)
                                  for i in reversed(range(len(in_channels))))

    def warmup_factor(self) -> float:
        """``min((epoch + 1) / warmup_epochs, 1)`` (mdistiller's 1-based ``epoch / 20``); 1 without warm-up."""
        return 1.0 if self.warmup_epochs == 0 else min((self.epoch + 1) / self.warmup_epochs, 1.0)

    def validate_batch_size(self, batch_size: int) -> None:
        """Refuse batches of 1: the embedding level's BatchNorm (on a 1x1 map) needs two values per channel."""
        if batch_size < 2:
            raise KDZooError(
                f"Method 'reviewkd' cannot train on batches of {batch_size}: its fusion block for the pooled embedding "
                "applies BatchNorm to a 1x1 map, which needs at least 2 samples per batch. Use a batch size of at "
                "least 2 (the references use 64 and 128)."
            )

    def fused(self, student: Outputs) -> list[torch.Tensor]:
        """The ABF outputs, input to output (the last is the embedding level, 1x1)."""
        if student.features is None or student.embedding is None:
            raise KDZooError("Method 'reviewkd' needs the student's stage features and embedding "
                             "(needs_features and needs_embedding are set; the engine passes them).")
        levels = [student.features[i] for i in self.student_stages] + [student.embedding.flatten(1)[:, :, None, None]]
        results: list[torch.Tensor] = []
        residual = None
        for abf, x, size in zip(self.abfs, reversed(levels), reversed(self.out_sizes)):
            out, residual = abf(x, residual, size)
            results.insert(0, out)
        return results

    def review_loss(self, student: Outputs, teacher: Outputs) -> torch.Tensor:
        """The unweighted HCL over all levels (float32), without the warm-up factor."""
        if teacher.preact is None or teacher.embedding is None:
            raise KDZooError("Method 'reviewkd' needs the teacher's pre-activation stage outputs (Outputs.preact) and "
                             "embedding; the engine computes them when needs_preact/needs_embedding are set.")
        results = self.fused(student)
        targets = [teacher.preact[i] for i in self.teacher_stages] + [teacher.embedding.flatten(1)[:, :, None, None]]
        with torch.autocast(results[0].device.type, enabled=False):
            outs = [r.float() for r in results]
            tgts = [t.detach().float() for t in targets]
            for o, t in zip(outs, tgts):
                if o.shape != t.shape:
                    raise KDZooError(
                        f"Method 'reviewkd': a fused student level has shape {tuple(o.shape)} but its teacher target "
                        f"has {tuple(t.shape)}. The networks' NetInfo does not match their outputs."
                    )
            return hcl_loss(outs, tgts)

    def forward(self, student: Outputs, teacher: Outputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        review = self.review_loss(student, teacher)
        return {"ce": self.w_ce * self.ce(student.logits, labels),
                "review": self.w_review * self.warmup_factor() * review}


@hookimpl
def register_methods(register):
    register(ReviewKD)
