"""FitNets hints (``fitnets``).

Definition (RepDistiller ``HintLoss`` + ``ConvReg``, mdistiller ``FitNet``): the student's stage
output at ``hint_stage`` (1-based, counted from the input) goes through a learned regressor into
the paired teacher stage output; the loss is the mean squared error between them.

The regressor is conv -> BatchNorm2d -> ReLU, with the conv chosen from the spatial sizes
(student ``s``, teacher ``t``):

* same size: 1x1 conv;
* student twice as large: 3x3 conv, stride 2, padding 1;
* student half as large: 4x4 transposed conv, stride 2, padding 1;
* otherwise: a "valid" conv of kernel ``(1 + s_H - t_H, 1 + s_W - t_W)`` (needs ``s >= t``).

The regressor is a submodule of the method, so it is trained by the student's optimizer and
saved in the checkpoint with the student.

``hint_epochs`` offers the original paper's two-stage schedule: during the first
``hint_epochs`` epochs the CE term is weighted 0 and only the hint trains (the student up to the
hint stage learns to match the teacher), afterwards ``w_ce * CE + w_hint * hint``. (The paper's
second stage is KD; this keeps RepDistiller's CE + hint.) The default 0 is the
single-stage RepDistiller recipe.
"""
from __future__ import annotations

import torch
from torch import nn

from kdzoo import KDZooError, hookimpl
from kdzoo.methods import Method
from kdzoo.models import NetInfo, Outputs, pair_stages


def make_regressor(s_channels: int, s_size: tuple[int, int], t_channels: int, t_size: tuple[int, int]) -> nn.Sequential:
    """RepDistiller's ``ConvReg``: a conv mapping a ``(s_channels, *s_size)`` map to ``(t_channels, *t_size)``, then BN, ReLU.

    Raises ``KDZooError`` when the student map is smaller than the teacher's (other than exactly half).
    """
    (s_h, s_w), (t_h, t_w) = s_size, t_size
    if (s_h, s_w) == (2 * t_h, 2 * t_w):
        conv: nn.Module = nn.Conv2d(s_channels, t_channels, kernel_size=3, stride=2, padding=1)
    elif (2 * s_h, 2 * s_w) == (t_h, t_w):
        conv = nn.ConvTranspose2d(s_channels, t_channels, kernel_size=4, stride=2, padding=1)
    else:  # the same size falls here too: kernel (1, 1)
        k_h, k_w = 1 + s_h - t_h, 1 + s_w - t_w
        if k_h < 1 or k_w < 1:
            raise KDZooError(
                f"FitNets cannot build a regressor from a student map of {s_h}x{s_w} to a teacher map "
                f"of {t_h}x{t_w}: the student map must be the same size, twice or half the teacher's, "
                "or larger in both dimensions. Choose another hint_stage, or another teacher/student pair."
            )
        conv = nn.Conv2d(s_channels, t_channels, kernel_size=(k_h, k_w))
    return nn.Sequential(conv, nn.BatchNorm2d(t_channels), nn.ReLU(inplace=True))


class FitNets(Method):
    """FitNets: ``w_ce * CE(s, y) + w_hint * MSE(regressor(s_feat[hint_stage]), t_feat[paired])``.

    Terms: ``"ce"`` and ``"hint"``; ``"ce"`` is weighted 0 while ``epoch < hint_epochs``.
    """

    name = "fitnets"
    family = "features"
    needs_teacher = True
    needs_features = True
    defaults = {"w_ce": 1.0, "w_hint": 100.0, "hint_stage": 2, "hint_epochs": 0}
    reference = (
        "Romero et al., 'FitNets: Hints for Thin Deep Nets', ICLR 2015; regressor and defaults "
        "from RepDistiller (Tian et al., CRD, ICLR 2020) and mdistiller."
    )

    def __init__(self, student: NetInfo, teacher: NetInfo | None = None, **hparams) -> None:
        super().__init__(student, teacher, **hparams)
        if not 1 <= self.hint_stage <= student.num_stages:
            raise KDZooError(
                f"Method 'fitnets': hint_stage={self.hint_stage} is out of range; the student has "
                f"{student.num_stages} stages, numbered 1..{student.num_stages} from the input. "
                "Set hint_stage to one of them (the default is 2)."
            )
        if self.hint_epochs < 0:
            raise KDZooError(f"Method 'fitnets': hint_epochs must be >= 0, got {self.hint_epochs}.")
        s_idx = self.hint_stage - 1
        pairs = dict((s, t) for t, s in pair_stages(teacher, student))
        if s_idx not in pairs:
            raise KDZooError(
                f"Method 'fitnets': student stage {self.hint_stage} (size {student.stage_sizes[s_idx]}) has no "
                "paired teacher stage. Stages are paired by equal spatial size, or, when no size is shared, "
                f"aligned from the last stage. Student stage sizes: {list(student.stage_sizes)}; teacher stage "
                f"sizes: {list(teacher.stage_sizes)}. Choose a hint_stage whose size the teacher also has."
            )
        self.student_index = s_idx
        self.teacher_index = pairs[s_idx]
        self.regressor = make_regressor(
            student.stage_channels[s_idx], student.stage_sizes[s_idx],
            teacher.stage_channels[self.teacher_index], teacher.stage_sizes[self.teacher_index],
        )

    def hint_loss(self, student: Outputs, teacher: Outputs) -> torch.Tensor:
        """Unweighted MSE (mean) between the regressed student feature and the teacher feature (float32)."""
        r = self.regressor(student.features[self.student_index]).float()
        t = teacher.features[self.teacher_index].detach().float()
        if r.shape != t.shape:
            raise KDZooError(
                f"Method 'fitnets': the regressed student feature has shape {tuple(r.shape)} but the teacher "
                f"feature has shape {tuple(t.shape)}. The networks' stage descriptions (NetInfo) do not match "
                "their actual outputs; check the input size the method was built for."
            )
        # Written out rather than F.mse_loss: mse_loss saves its target for backward, which fails
        # when the teacher ran under inference_mode.
        return (r - t).pow(2).mean()

    def forward(self, student: Outputs, teacher: Outputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        w_ce = 0.0 if self.epoch < self.hint_epochs else self.w_ce
        return {"ce": w_ce * self.ce(student.logits, labels), "hint": self.w_hint * self.hint_loss(student, teacher)}


@hookimpl
def register_methods(register):
    register(FitNets)
