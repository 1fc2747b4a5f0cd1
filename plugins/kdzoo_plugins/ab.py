"""Activation-boundary distillation (``ab``), with RepDistiller's init stage.

Definition (RepDistiller ``ABLoss`` + ``Connector``, ``helper/pretrain.py``; ``train_student.py``
``--distill abound``). Inputs are the *pre-activation* stage outputs (RD ``preact=True``,
``feat[1:-1]``), stages paired with :func:`kdzoo.models.pair_stages` (RD zips them by index;
the two agree whenever the nets' stages have the same resolutions, as in RD's same-family pairs).
Each student map goes through a connector into the shape of its teacher map::

    connector = identity                 when channels and size are equal
              = conv -> BatchNorm2d      otherwise (RD ``ConvReg(use_relu=False)``: 1x1 conv for
                                         equal sizes, the FitNets kernel rule otherwise)
    ab_i      = sum over all elements of  (s + m)^2 * [s > -m and t <= 0]
                                        + (s - m)^2 * [s <= m and t > 0]          m = margin = 1
    ab        = 3/1000 * (1/B) * sum_i 2^(i - n + 1) * ab_i      i = 0..n-1 from input to output

so the deepest stage has weight 1, the one before 1/2, then 1/4. ``3/1000`` and ``1/B`` are part
of RD's definition; ``w_ab = 1`` is RD's init-stage weight (``loss = sum(loss_group)``).

Schedule, as RepDistiller runs it (``-a 0 -b 1``):

* init stage (``init_epochs``, default 30/240 of the schedule): ``init_forward`` returns
  ``{"ab": w_ab * ab}``, trained over the connectors and the student's feature layers (all its
  parameters but the classifier's: :func:`kdzoo.methods.feature_parameters`);
* main stage: **cross-entropy only**. RD's main loop sets ``loss_kd = 0`` for ``abound`` ("can
  also add loss to this stage"), and ``beta * 0`` adds nothing; the connectors are neither used
  nor trained there (RD keeps them out of ``trainable_list``). ``forward`` returns ``{"ce": ...}``
  and :meth:`AB.start_epoch` freezes the connectors (``requires_grad=False``) for the main stage;
  :meth:`AB.init_parameters` makes them trainable again.

Computed in float32 (connector outputs and teacher maps cast with ``.float()``). The teacher's
maps only enter through the comparisons ``t <= 0`` / ``t > 0``.
"""
from __future__ import annotations

import torch
from torch import nn

from kdzoo import KDZooError, hookimpl
from kdzoo.methods import INIT_STAGE_DEFAULTS, Method, PairNotSupported, feature_parameters
from kdzoo.models import NetInfo, Outputs, pair_stages
from kdzoo_plugins.fitnets import make_regressor


def make_connector(s_channels: int, s_size: tuple[int, int], t_channels: int, t_size: tuple[int, int]) -> nn.Module:
    """RD's AB ``Connector`` entry: identity when channels and size agree, else conv -> BN (no ReLU).

    The conv follows the FitNets rule (:func:`kdzoo_plugins.fitnets.make_regressor`); raises
    ``KDZooError`` when the student map is smaller than the teacher's (other than exactly half)."""
    if s_channels == t_channels and tuple(s_size) == tuple(t_size):
        return nn.Identity()
    try:
        conv, bn, _relu = make_regressor(s_channels, s_size, t_channels, t_size)
    except KDZooError as e:
        raise KDZooError(
            f"Method 'ab' cannot build a connector from a student pre-activation map of {s_channels}x"
            f"{s_size[0]}x{s_size[1]} to a teacher map of {t_channels}x{t_size[0]}x{t_size[1]}: the student "
            "map must be the same size, twice or half the teacher's, or larger in both dimensions. "
            "Choose another teacher/student pair."
        ) from e
    return nn.Sequential(conv, bn)


def ab_stage_loss(s: torch.Tensor, t: torch.Tensor, margin: float) -> torch.Tensor:
    """RD's ``criterion_alternative_l2``: the summed (not averaged) margin loss of one stage (float32)."""
    s = s.float()
    t = t.detach().float()
    pos = (t > 0).float()  # the teacher neuron is active
    neg = (t <= 0).float()
    loss = (s + margin).pow(2) * ((s > -margin).float() * neg) + (s - margin).pow(2) * ((s <= margin).float() * pos)
    return loss.sum()


class AB(Method):
    """Activation boundaries: init stage ``{"ab": w_ab * ab}``; main stage ``{"ce": w_ce * CE}`` (RD)."""

    name = "ab"
    family = "features"
    needs_teacher = True
    needs_preact = True
    has_init_stage = True
    defaults = {"w_ce": 1.0, "w_ab": 1.0, "margin": 1.0, **INIT_STAGE_DEFAULTS}
    reference = (
        "Heo, Lee, Yun & Choi, 'Knowledge Transfer via Distillation of Activation Boundaries Formed by "
        "Hidden Neurons', AAAI 2019; loss, connectors, init stage and CE-only main stage from RepDistiller "
        "(Tian et al., CRD, ICLR 2020: distiller_zoo/AB.py, models/util.py Connector, helper/pretrain.py)."
    )

    def __init__(self, student: NetInfo, teacher: NetInfo | None = None, **hparams) -> None:
        super().__init__(student, teacher, **hparams)
        if not self.margin > 0:
            raise KDZooError(f"Method 'ab' needs margin > 0, got margin={self.margin}. The published value is 1.0.")
        lacking = [who for who, net in (("student", student), ("teacher", teacher)) if not net.has_preact]
        if lacking:
            raise PairNotSupported(
                f"Method 'ab' transfers pre-activation stage outputs, but the {' and the '.join(lacking)} "
                f"backbone{'s do' if len(lacking) > 1 else ' does'} not declare them (NetInfo.has_preact is "
                "False). Use backbones whose feature_info names their pre-activation outputs (kdzoo's CIFAR "
                "nets), or another feature method."
            )
        self.pairs = pair_stages(teacher, student)  # [(teacher_index, student_index), ...]
        self.connectors = nn.ModuleList(
            make_connector(student.stage_channels[s], student.stage_sizes[s],
                           teacher.stage_channels[t], teacher.stage_sizes[t])
            for t, s in self.pairs
        )
        n = len(self.pairs)
        self.stage_weights = [2.0 ** (i - n + 1) for i in range(n)]

    def ab_loss(self, student: Outputs, teacher: Outputs) -> torch.Tensor:
        """The unweighted AB loss: ``3/1000 / B * sum_i 2^(i-n+1) * ab_i`` over the paired stages."""
        batch = student.preact[0].shape[0]
        total = 0.0
        for (t, s), connector, w in zip(self.pairs, self.connectors, self.stage_weights):
            g_s = connector(student.preact[s])
            g_t = teacher.preact[t]
            if g_s.shape != g_t.shape:
                raise KDZooError(
                    f"Method 'ab': the connected student map has shape {tuple(g_s.shape)} but the teacher's "
                    f"pre-activation map has shape {tuple(g_t.shape)}. The networks' stage descriptions (NetInfo) "
                    "do not match their actual outputs; check the input size the method was built for."
                )
            total = total + w * ab_stage_loss(g_s, g_t, self.margin)
        return total / batch / 1000 * 3

    def init_parameters(self, student: nn.Module) -> list[nn.Parameter]:
        """The connectors (made trainable again) and every student parameter but the classifier's."""
        self.connectors.requires_grad_(True)
        return list(self.connectors.parameters()) + feature_parameters(student)

    def init_forward(self, student: Outputs | None, teacher: Outputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"ab": self.w_ab * self.ab_loss(student, teacher)}

    def start_epoch(self, epoch: int, num_epochs: int) -> None:
        """Main stage: the connectors are not trained any more (RD keeps them out of its optimizer)."""
        super().start_epoch(epoch, num_epochs)
        self.connectors.requires_grad_(False)
        for p in self.connectors.parameters():
            p.grad = None  # no stale init-stage gradient for an optimizer that zeroes instead of clearing

    def forward(self, student: Outputs, teacher: Outputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"ce": self.w_ce * self.ce(student.logits, labels)}


@hookimpl
def register_methods(register):
    register(AB)
