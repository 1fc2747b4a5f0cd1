"""Curriculum temperature knowledge distillation (``ctkd``): KD with a learned, adversarial temperature.

Li et al., 'Curriculum Temperature for Knowledge Distillation', AAAI 2023;
the definition is the authors' code (zhengli97/CTKD: ``models/temp_global.py`` ``Global_T``,
``helper/loops.py``, ``train_student.py`` ``CosineDecay``, ``scripts/run_cifar_distill.sh``):

* one learnable scalar ``global_T`` (initialised to ``tau_init = 1``) goes through a gradient
  reversal layer (GRL) and a sigmoid: ``T = T_min + T_range * sigmoid(GRL(global_T))`` with
  ``T_min = 1``, ``T_range = 20`` (the reference's ``t_start``, ``t_end``), so ``T`` lies in
  ``(1, 21)`` and starts at ``1 + 20 * sigmoid(1) = 15.6``;
* ``kd = T^2 * KL(softmax(t / T) || softmax(s / T))``, batchmean, with this ``T`` (the ``T^2``
  factor is differentiated too, as in the reference);
* ``loss = w_ce * CE + w_kd * kd`` with ``w_ce = 0.1, w_kd = 0.9`` (``-r 0.1 -a 0.9 -b 0``).

The GRL is the identity forward; backward it multiplies the gradient by ``lambda``, which follows
a cosine from ``lambda_max = 0`` to ``lambda_min = -1`` over ``lambda_epochs = 10`` epochs, then
stays at ``lambda_min``::

    lambda(e) = lambda_min + (lambda_max - lambda_min) * (cos(pi * min(e, L) / L) + 1) / 2

with ``e`` the reference's 1-based epoch (``self.epoch + 1`` here: kdzoo counts from 0) and ``L =
lambda_epochs``; it is constant within an epoch (``start_epoch``). The reference's GRL multiplies
by ``lambda`` itself (its docstring says ``-lambda``, its code does not negate), and ``lambda`` is
negative: the temperature's gradient is ``lambda`` times the plain KD gradient, so the student's
optimizer step *raises* the KD loss through ``T`` (the temperature plays adversary, with a strength
growing from 0 to 1) while the student itself still minimises it. kdzoo follows that code.

``global_T`` is a parameter of the method: the engine trains it with the student's optimizer
(weight decay included, as the reference's single SGD over student and temperature does) and
saves it in the checkpoint. Computed in float32 (float64 if given) with autocast disabled.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdzoo import KDZooError, hookimpl
from kdzoo.methods import Method
from kdzoo.models import NetInfo, Outputs


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``lambda_`` (CTKD's ``GradientReversalFunction``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lambda_: float) -> torch.Tensor:  # type: ignore[override]
        ctx.lambda_ = lambda_
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.lambda_, None


def grl_lambda(epoch: int, lambda_max: float, lambda_min: float, num_epochs: int) -> float:
    """CTKD's ``CosineDecay.get_value``: cosine from ``lambda_max`` (epoch 0) to ``lambda_min`` (epoch
    ``num_epochs`` and later); ``epoch`` is 1-based as in the reference. ``num_epochs=0``: ``lambda_min``."""
    if num_epochs <= 0:
        return lambda_min
    i = min(max(epoch, 0), num_epochs)
    return (math.cos(i * math.pi / num_epochs) + 1.0) * 0.5 * (lambda_max - lambda_min) + lambda_min


class CTKD(Method):
    """CTKD: ``w_ce * CE + w_kd * T^2 * KL(softmax(t/T) || softmax(s/T))`` with ``T`` learned adversarially.

    Terms: ``"ce"``, ``"kd"``. ``temperature`` is the current ``T``.
    """

    name = "ctkd"
    family = "logits"
    needs_teacher = True
    defaults = {"w_ce": 0.1, "w_kd": 0.9, "tau_init": 1.0, "T_min": 1.0, "T_range": 20.0,
                "lambda_max": 0.0, "lambda_min": -1.0, "lambda_epochs": 10}
    reference = ("Li et al., 'Curriculum Temperature for Knowledge Distillation', AAAI 2023; definition and "
                 "defaults from zhengli97/CTKD (Global_T, GradientReversal, CosineDecay, run_cifar_distill.sh).")

    def __init__(self, student: NetInfo, teacher: NetInfo | None = None, **hparams) -> None:
        super().__init__(student, teacher, **hparams)
        if not self.T_min > 0 or self.T_range < 0:
            raise KDZooError(
                f"Method 'ctkd': the temperature T = T_min + T_range * sigmoid(global_T) must stay positive, so "
                f"T_min must be > 0 and T_range >= 0; got T_min={self.T_min}, T_range={self.T_range}. The "
                "reference uses T_min=1, T_range=20.")
        if self.lambda_epochs < 0:
            raise KDZooError(f"Method 'ctkd': lambda_epochs must be >= 0 (0: lambda_min from the first epoch), "
                             f"got {self.lambda_epochs}. The reference uses 10.")
        self.global_T = nn.Parameter(torch.tensor(float(self.tau_init)))

    @property
    def grl_lambda(self) -> float:
        """This epoch's GRL factor (the reference's ``decay_value``; its epochs count from 1)."""
        return grl_lambda(self.epoch + 1, self.lambda_max, self.lambda_min, self.lambda_epochs)

    @property
    def temperature(self) -> float:
        """The current temperature ``T_min + T_range * sigmoid(global_T)``."""
        return float(self.T_min + self.T_range * torch.sigmoid(self.global_T.detach().double()))

    def forward(self, student: Outputs, teacher: Outputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        dtype = torch.float64 if student.logits.dtype == torch.float64 else torch.float32
        with torch.autocast(student.logits.device.type, enabled=False):
            s = student.logits.to(dtype)
            # a copy: T requires grad, so the division saves its operand, which must not be an inference tensor
            t = teacher.logits.detach().to(dtype, copy=True)
            tau = GradientReversal.apply(self.global_T.to(dtype), self.grl_lambda)
            T = self.T_min + self.T_range * torch.sigmoid(tau)
            kd = F.kl_div(F.log_softmax(s / T, dim=1), F.softmax(t / T, dim=1), reduction="batchmean") * T * T
        return {"ce": self.w_ce * self.ce(student.logits, labels), "kd": self.w_kd * kd}


@hookimpl
def register_methods(register):
    register(CTKD)
