"""Variational information distillation (``vid``, VID), on the paired stage outputs.

Definition (RepDistiller ``VIDLoss``, "code from author" ssahn0215/variational-information-distillation;
mdistiller ``VID``), per paired stage, with ``eps = 1e-5``::

    pool the larger map to the smaller spatial size (adaptive average pooling), then
    mu     = regressor(s):  1x1 conv C_s -> C_t, ReLU, 1x1 conv C_t -> C_t, ReLU, 1x1 conv C_t -> C_t
                            (no biases, no ReLU after the last conv)
    var    = softplus(log_scale) + eps          one variance per teacher channel, trainable
    vid    = mean over (B, C_t, H, W) of 0.5 * ((mu - t)^2 / var + log(var))
    total  = sum of vid over the paired stages

``log_scale`` starts at ``log(exp(init_var - eps) - 1)``, so every variance starts at
``init_var = 5``. RepDistiller sums the loss over ``feat[1:-1]`` (the post-ReLU stage outputs) with
``-b 1``: ``w_ce = 1``, ``w_vid = 1``. The regressors and the log-scales are submodules, so the
student's optimizer trains them and the checkpoint keeps them.

mdistiller bug, not reproduced: mdistiller keeps its log-scales in a plain Python list, so they
are neither returned by ``get_learnable_parameters`` nor moved with the model: its variances stay 5
for the whole run. RepDistiller appends the ``VIDLoss`` modules to its trainable list and trains
them; kdzoo follows RepDistiller (the published VID row is RepDistiller's).

Stages are paired with :func:`kdzoo.models.pair_stages`; channel counts may differ. RepDistiller
pools by height only, to a square; kdzoo pools height and width separately to ``(min H, min W)``,
the same for square maps. The regressors run under the caller's autocast, like FitNets'; the
likelihood is computed in float32 (float64 if the method is) with autocast disabled.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdzoo import KDZooError, hookimpl
from kdzoo.methods import Method
from kdzoo.models import NetInfo, Outputs, loss_dtype, pair_stages, pool_to_match


def make_regressor(s_channels: int, t_channels: int) -> nn.Sequential:
    """RepDistiller's VID regressor: three bias-free 1x1 convs ``C_s -> C_t -> C_t -> C_t``, ReLU between."""
    def conv1x1(cin: int, cout: int) -> nn.Conv2d:
        return nn.Conv2d(cin, cout, kernel_size=1, bias=False)
    return nn.Sequential(conv1x1(s_channels, t_channels), nn.ReLU(), conv1x1(t_channels, t_channels), nn.ReLU(),
                         conv1x1(t_channels, t_channels))


def gaussian_nll(mu: torch.Tensor, target: torch.Tensor, log_scale: torch.Tensor, eps: float) -> torch.Tensor:
    """``mean(0.5 * ((mu - target)^2 / var + log(var)))`` with ``var = softplus(log_scale) + eps`` per channel."""
    var = (F.softplus(log_scale) + eps).view(1, -1, 1, 1)
    return (0.5 * ((mu - target).pow(2) / var + torch.log(var))).mean()


class VID(Method):
    """Variational information distillation: ``w_ce * CE + w_vid * sum_pairs vid``. Terms: ``"ce"``, ``"vid"``.

    Parameters: ``regressors[i]`` and ``log_scales[i]`` for the ``i``-th stage pair.
    """

    name = "vid"
    family = "features"
    needs_teacher = True
    needs_features = True
    defaults = {"w_ce": 1.0, "w_vid": 1.0, "init_var": 5.0, "var_eps": 1e-5}
    reference = (
        "Ahn et al., 'Variational Information Distillation for Knowledge Transfer', CVPR 2019; loss, regressor "
        "and defaults from RepDistiller (Tian et al., CRD, ICLR 2020) distiller_zoo/VID.py."
    )

    def __init__(self, student: NetInfo, teacher: NetInfo | None = None, **hparams) -> None:
        super().__init__(student, teacher, **hparams)
        if not self.var_eps > 0 or not self.init_var > self.var_eps:
            raise KDZooError(
                f"Method 'vid' needs var_eps > 0 and init_var > var_eps (the variances are softplus(log_scale) + "
                f"var_eps and start at init_var), got init_var={self.init_var}, var_eps={self.var_eps}. "
                "RepDistiller uses init_var=5.0, var_eps=1e-5."
            )
        self.pairs = pair_stages(teacher, student)  # [(teacher_index, student_index), ...]
        start = math.log(math.expm1(self.init_var - self.var_eps))  # softplus^-1(init_var - var_eps)
        self.regressors = nn.ModuleList(
            make_regressor(student.stage_channels[s], teacher.stage_channels[t]) for t, s in self.pairs)
        self.log_scales = nn.ParameterList(
            nn.Parameter(torch.full((teacher.stage_channels[t],), start)) for t, _ in self.pairs)

    def forward(self, student: Outputs, teacher: Outputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        vid = 0.0
        for (t, s), regressor, log_scale in zip(self.pairs, self.regressors, self.log_scales):
            f_s, f_t = pool_to_match(student.features[s], teacher.features[t].detach())
            mu = regressor(f_s)
            with torch.autocast(mu.device.type, enabled=False):
                vid = vid + gaussian_nll(loss_dtype(mu), loss_dtype(f_t), log_scale, self.var_eps)
        return {"ce": self.w_ce * self.ce(student.logits, labels), "vid": self.w_vid * vid}


@hookimpl
def register_methods(register):
    register(VID)
