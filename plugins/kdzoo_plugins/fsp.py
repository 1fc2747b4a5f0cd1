"""Flow of solution procedure (``fsp``), with RepDistiller's init stage.

Definition (RepDistiller ``FSP``, ``helper/pretrain.py``; ``train_student.py --distill fsp``). The
maps are the stem output and the stage outputs, ``[stem, stage 1, ..., stage n]`` (RD
``feat[:-1]``). For each consecutive pair ``(bottom, top)`` of one net, the larger map is
adaptive-average-pooled to the smaller (RD pools to ``(H, H)``; kdzoo to ``(min H, min W)``, the
same for square maps), then::

    G[b, i, j] = mean over positions p of  top[b, i, p] * bottom[b, j, p]     (B, C_top, C_bottom)
    fsp        = sum over pairs of  mean((G_s - G_t)^2)

G's shape depends only on channel counts, so the two nets' spatial sizes may differ, but the
channel counts must be equal map by map (RD raises; its table marks wrn40-2 -> wrn40-1 N/A):
otherwise ``__init__`` raises :class:`kdzoo.methods.PairNotSupported`.

Schedule, as RepDistiller runs it:

* init stage (``init_epochs``, default 30/240 of the schedule): ``{"fsp": w_fsp * fsp}`` trains the
  student's feature layers (all its parameters but the classifier's); ``w_fsp = 1`` as RD's
  ``loss = sum(loss_group)`` (its ``-b 50`` never reaches this loss);
* main stage: **cross-entropy only** (RD's main loop sets ``loss_kd = 0`` for ``fsp``).

G is computed in float32 with autocast disabled (a bf16 matmul would lose the small differences).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdzoo import hookimpl
from kdzoo.methods import INIT_STAGE_DEFAULTS, Method, PairNotSupported, feature_parameters
from kdzoo.models import NetInfo, Outputs


def fsp_matrices(maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """RD's ``compute_fsp``: ``(B, C_top, C_bottom)`` matrices between consecutive maps (float32)."""
    out = []
    for bottom, top in zip(maps[:-1], maps[1:]):
        size = (min(bottom.shape[2], top.shape[2]), min(bottom.shape[3], top.shape[3]))
        if tuple(bottom.shape[2:]) != size:
            bottom = F.adaptive_avg_pool2d(bottom, size)
        if tuple(top.shape[2:]) != size:
            top = F.adaptive_avg_pool2d(top, size)
        bottom, top = bottom.float().flatten(2), top.float().flatten(2)
        out.append(torch.bmm(top, bottom.transpose(1, 2)) / bottom.shape[2])
    return out


def channel_list(net: NetInfo) -> list[int]:
    """The channel counts of ``[stem, stage 1, ..., stage n]``."""
    return [net.stem_channels, *net.stage_channels]


class FSP(Method):
    """FSP matrices: init stage ``{"fsp": w_fsp * fsp}``; main stage ``{"ce": w_ce * CE}`` (RD)."""

    name = "fsp"
    family = "features"
    needs_teacher = True
    needs_features = True
    needs_stem = True
    has_init_stage = True
    defaults = {"w_ce": 1.0, "w_fsp": 1.0, **INIT_STAGE_DEFAULTS}
    reference = (
        "Yim, Joo, Bae & Kim, 'A Gift from Knowledge Distillation: Fast Optimization, Network Minimization "
        "and Transfer Learning', CVPR 2017; loss, init stage and CE-only main stage from RepDistiller "
        "(Tian et al., CRD, ICLR 2020: distiller_zoo/FSP.py, helper/pretrain.py)."
    )

    def __init__(self, student: NetInfo, teacher: NetInfo | None = None, **hparams) -> None:
        super().__init__(student, teacher, **hparams)
        lacking = [who for who, net in (("student", student), ("teacher", teacher)) if net.stem_channels <= 0]
        if lacking:
            raise PairNotSupported(
                f"Method 'fsp' relates the stem output to the stage outputs, but the {' and the '.join(lacking)} "
                f"backbone{'s declare' if len(lacking) > 1 else ' declares'} no stem output (NetInfo.stem_channels "
                "is 0). Use backbones whose feature_info starts with the stem (kdzoo's CIFAR nets), or another "
                "feature method."
            )
        s_c, t_c = channel_list(student), channel_list(teacher)
        if s_c != t_c:
            raise PairNotSupported(
                f"Method 'fsp' needs equal channel counts map by map, [stem, stages...]: the teacher has {t_c}, "
                f"the student {s_c}. FSP matrices are (C_top x C_bottom) per pair of consecutive maps, so they "
                "can only be compared when both nets have the same widths (RepDistiller marks such pairs, e.g. "
                "wrn_40_2 -> wrn_40_1, N/A). Choose a student of the teacher's widths, or another feature method."
            )

    @staticmethod
    def maps(out: Outputs) -> list[torch.Tensor]:
        return [out.stem, *out.features]

    def fsp_loss(self, student: Outputs, teacher: Outputs) -> torch.Tensor:
        """The unweighted FSP loss: ``sum over pairs of mean((G_s - G_t)^2)`` (float32, autocast off)."""
        device = student.features[0].device.type
        with torch.autocast(device, enabled=False):
            g_s = fsp_matrices(self.maps(student))
            with torch.no_grad():
                g_t = fsp_matrices([f.detach() for f in self.maps(teacher)])
            return sum((s - t).pow(2).mean() for s, t in zip(g_s, g_t))

    def init_parameters(self, student: nn.Module) -> list[nn.Parameter]:
        """Every student parameter but the classifier's (FSP has none of its own)."""
        return list(self.parameters()) + feature_parameters(student)

    def init_forward(self, student: Outputs | None, teacher: Outputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"fsp": self.w_fsp * self.fsp_loss(student, teacher)}

    def forward(self, student: Outputs, teacher: Outputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"ce": self.w_ce * self.ce(student.logits, labels)}


@hookimpl
def register_methods(register):
    register(FSP)
