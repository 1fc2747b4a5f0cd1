"""Overhaul of feature distillation (``ofd``), on pre-activation stage outputs.

Definition (mdistiller ``mdistiller/distillers/OFD.py``; Heo et al.'s ``CIFAR-100/distiller.py`` in
clovaai/overhaul-distillation computes the same loss)::

    connector_i = Conv2d(C_s -> C_t, k x k, stride 1, padding (k-1)//2, no bias) + BatchNorm2d(C_t)
                  (conv weight ~ N(0, 2 / (k*k*C_t)), BN weight 1, bias 0)
    s  = connector_i(student.preact[i])                     pre-ReLU student stage, mapped to C_t
    t  = adaptive_avg_pool(teacher.preact[j], size of s)     pre-ReLU teacher stage
    m  = the teacher's per-channel margin (below)
    d  = (s - m)^2 * 1(s > m and t <= m)
       + (s - t)^2 * 1(s > t and m < t <= 0)
       + (s - t)^2 * 1(t > 0)
    ofd_i = mean over the batch of d, summed over C*H*W
    ofd   = sum_i ofd_i / 2^(n - i - 1)                      i = 0..n-1, input to output

The margin of channel ``c`` comes from the teacher's BatchNorm before the stage's final ReLU, whose
weight ``gamma`` and bias ``beta`` describe the pre-activation as N(beta, gamma^2); it is the
expectation of its negative part, ``E[x | x < 0]``, with ``s = |gamma|`` and ``m = beta``::

    margin = -s * phi(m / s) / Phi(-m / s) + m     if Phi(-m / s) > 0.001
             -3 s                                  otherwise

(``phi``/``Phi``: standard normal density and CDF.) With ``gamma = 0`` the references divide by
zero; here the pre-activation is the constant ``beta``, so the margin is ``min(beta, 0)``.

Stages are paired as mdistiller's ``_align_list`` does: the last ``n = min(S, T)`` stages of each
net, in order. Each pair uses the margins of *its* teacher stage. (mdistiller indexes the margins
from the teacher's first stage, ``self.margins[i]``, which picks the wrong stage when the teacher
has more stages than the student; its CIFAR pairs never do. kdzoo follows the evident intent.)

The teacher's BatchNorms come from the teacher backbone's ``get_bn_before_relu()`` (RepDistiller's
and mdistiller's API name), called once by :meth:`OFD.bind_teacher`: a list of BatchNorm modules,
one per stage, input to output (a list that covers only the last stages also works, as long as it
covers the ``n`` paired ones). The margins are buffers, saved with the checkpoint.

Defaults are mdistiller's ``CFG.OFD``: ``w_ce = 1``, ``w_ofd = 0.001`` (the original code's
``loss_distill.sum() / batch_size / 1000``), ``kernel_size = 1``. Computed in float32, with
autocast disabled for the loss (the connectors run under autocast like the student).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdzoo import KDZooError, hookimpl
from kdzoo.methods import Method, PairNotSupported
from kdzoo.models import NetInfo, Outputs


def bn_margin(gamma: float, beta: float) -> float:
    """The OFD margin ``E[x | x < 0]`` of ``x ~ N(beta, gamma^2)`` (mdistiller's rule, ``-3|gamma|``
    when ``Phi(-beta/|gamma|) <= 0.001``; ``min(beta, 0)`` when ``gamma == 0``)."""
    s, m = abs(float(gamma)), float(beta)
    if s == 0.0:
        return min(m, 0.0)
    cdf = 0.5 * math.erfc((m / s) / math.sqrt(2.0))  # Phi(-m/s)
    if cdf > 0.001:
        return -s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / cdf + m
    return -3.0 * s


def bn_margins(bn: nn.Module) -> torch.Tensor:
    """Per-channel margins (float32, CPU) of a BatchNorm module, from its affine weight and bias
    (``affine=False``: weight 1, bias 0). The module is only read."""
    weight, bias = getattr(bn, "weight", None), getattr(bn, "bias", None)
    n = int(getattr(bn, "num_features", weight.numel() if weight is not None else 0))
    w = weight.detach().double().cpu().tolist() if weight is not None else [1.0] * n
    b = bias.detach().double().cpu().tolist() if bias is not None else [0.0] * n
    return torch.tensor([bn_margin(g, m) for g, m in zip(w, b)], dtype=torch.float32)


def ofd_distance(s: torch.Tensor, t: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """The partial L2 distance of one stage: batch mean, summed over C*H*W. ``s``, ``t``: (B, C, H, W),
    ``margin``: (C,). The teacher side takes no gradient."""
    m = margin.to(s).view(1, -1, 1, 1)
    t = t.detach()
    mask_margin = ((s > m) & (t <= m)).to(s.dtype)
    mask_below = ((s > t) & (t > m) & (t <= 0)).to(s.dtype)
    mask_pos = (t > 0).to(s.dtype)
    # written out (no F.mse_loss): the teacher's tensors may come from inference mode
    d = (s - m).pow(2) * mask_margin + (s - t).pow(2) * (mask_below + mask_pos)
    return d.mean(dim=0).sum()


def make_connector(s_channels: int, t_channels: int, kernel_size: int) -> nn.Sequential:
    """mdistiller's ``_build_feature_connector``: conv k x k (no bias, He-normal over k*k*C_t) + BN (1, 0)."""
    conv = nn.Conv2d(s_channels, t_channels, kernel_size, stride=1, padding=(kernel_size - 1) // 2, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (kernel_size * kernel_size * t_channels)))
    bn = nn.BatchNorm2d(t_channels)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    return nn.Sequential(conv, bn)


class OFD(Method):
    """Overhaul of feature distillation: ``w_ce * CE(s, y) + w_ofd * sum_i ofd_i / 2^(n-i-1)``.

    Terms: ``"ce"``, ``"ofd"``. Needs pre-activation stage outputs of both nets and, through
    :meth:`bind_teacher`, the teacher backbone's ``get_bn_before_relu()``.
    """

    name = "ofd"
    family = "features"
    needs_teacher = True
    needs_preact = True
    needs_teacher_net = True
    defaults = {"w_ce": 1.0, "w_ofd": 0.001, "kernel_size": 1}
    reference = (
        "Heo, Kim, Yun, Park, Kwak & Choi, 'A Comprehensive Overhaul of Feature Distillation', ICCV 2019 "
        "(clovaai/overhaul-distillation); loss, connector and defaults from mdistiller (Zhao et al., DKD, CVPR 2022)."
    )

    def __init__(self, student: NetInfo, teacher: NetInfo | None = None, **hparams) -> None:
        super().__init__(student, teacher, **hparams)
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise KDZooError(f"Method 'ofd': kernel_size must be a positive odd integer (the connector keeps the "
                             f"student's spatial size), got {self.kernel_size}. mdistiller uses 1.")
        missing = [who for who, net in (("student", student), ("teacher", teacher)) if not net.has_preact]
        if missing:
            raise PairNotSupported(
                f"Method 'ofd' distils pre-activation stage outputs, but the {' and '.join(missing)} "
                f"net{'s do' if len(missing) > 1 else ' does'} not declare them (NetInfo.has_preact is False). "
                "Use backbones that expose pre-activation outputs (kdzoo's CIFAR nets do), or another feature method."
            )
        n = min(student.num_stages, teacher.num_stages)
        if n == 0:
            raise PairNotSupported(
                f"Method 'ofd' needs stage outputs, but the {'student' if not student.num_stages else 'teacher'} "
                "reports none. Use a backbone with feature_info, or a logit method.")
        # mdistiller's _align_list: the last n stages of each net, in order
        self.pairs = [(teacher.num_stages - n + k, student.num_stages - n + k) for k in range(n)]
        self.connectors = nn.ModuleList(
            make_connector(student.stage_channels[s], teacher.stage_channels[t], self.kernel_size) for t, s in self.pairs)
        for k, (t, _) in enumerate(self.pairs):
            self.register_buffer(f"margin{k}", torch.zeros(teacher.stage_channels[t]))
        self.register_buffer("margins_bound", torch.zeros((), dtype=torch.bool))  # set by bind_teacher or a checkpoint
        self._bound_seen = False

    def margins(self) -> list[torch.Tensor]:
        """The per-channel margins of each paired teacher stage, input to output."""
        return [getattr(self, f"margin{k}") for k in range(len(self.pairs))]

    def bind_teacher(self, net: nn.Module) -> None:
        """Compute the margins from ``net.model.get_bn_before_relu()`` (or ``net``'s own). Reads only."""
        model = getattr(net, "model", net)
        get = getattr(model, "get_bn_before_relu", None)
        t_info = self.teacher_info
        if not callable(get):
            raise PairNotSupported(
                f"Method 'ofd' computes its margins from the teacher's BatchNorm before each stage's final ReLU, but "
                f"the teacher backbone ({type(model).__name__}) has no get_bn_before_relu(). Give the backbone a "
                f"get_bn_before_relu() returning one BatchNorm per stage ({t_info.num_stages} stages, channels "
                f"{list(t_info.stage_channels)}), as RepDistiller's and kdzoo's CIFAR nets do, or use another method."
            )
        bns = list(get())
        n = len(self.pairs)
        if len(bns) < n:
            raise PairNotSupported(
                f"Method 'ofd': the teacher's get_bn_before_relu() returned {len(bns)} BatchNorm module(s), but "
                f"{n} teacher stage(s) are distilled (teacher stage channels {list(t_info.stage_channels)}, student "
                f"{list(self.student_info.stage_channels)}). It must return one per stage, input to output."
            )
        bns = bns[len(bns) - n:]
        margins = []
        for k, ((t, _), bn) in enumerate(zip(self.pairs, bns)):
            weight = getattr(bn, "weight", None)
            chans = int(getattr(bn, "num_features", weight.numel() if weight is not None else -1))
            if chans != t_info.stage_channels[t]:
                raise KDZooError(
                    f"Method 'ofd': the teacher's get_bn_before_relu() entry for stage {t + 1} has {chans} channels, "
                    f"but that stage outputs {t_info.stage_channels[t]} (stage channels {list(t_info.stage_channels)}; "
                    f"BatchNorm channels {[int(getattr(b, 'num_features', -1)) for b in bns]}). It must list the "
                    "BatchNorm before each stage's final ReLU, one per stage, input to output."
                )
            margins.append(bn_margins(bn))
        with torch.no_grad():
            for buf, m in zip(self.margins(), margins):
                buf.copy_(m.to(buf))
            self.margins_bound.fill_(True)

    def validate_batch_size(self, batch_size: int) -> None:
        """Refuse a batch of 1 when a distilled student stage is 1x1: the connector's BatchNorm then
        has one value per channel and cannot train."""
        tiny = [s + 1 for _, s in self.pairs if tuple(self.student_info.stage_sizes[s]) == (1, 1)]
        if batch_size < 2 and tiny:
            raise KDZooError(
                f"Method 'ofd' cannot train on batches of {batch_size}: student stage(s) {tiny} are 1x1, so the "
                "connector's BatchNorm sees one value per channel. Use a batch size of at least 2."
            )

    def ofd_loss(self, student: Outputs, teacher: Outputs) -> torch.Tensor:
        """The unweighted, stage-weighted sum of the partial L2 distances (float32)."""
        if not self._bound_seen and not bool(self.margins_bound):  # checked once: a GPU sync
            raise KDZooError(
                "Method 'ofd' was called before its margins were computed: call bind_teacher(teacher_net) once "
                "after building it (the engine does when needs_teacher_net is set), or load a checkpoint of it."
            )
        if student.preact is None or teacher.preact is None:
            raise KDZooError(
                "Method 'ofd' needs pre-activation stage outputs (Outputs.preact) of both nets; got "
                f"student.preact={'None' if student.preact is None else 'set'}, teacher.preact="
                f"{'None' if teacher.preact is None else 'set'}. The engine computes them when needs_preact is set "
                "and the backbone declares them."
            )
        self._bound_seen = True
        n = len(self.pairs)
        s_out = [conn(student.preact[s]) for conn, (_, s) in zip(self.connectors, self.pairs)]
        total = None
        with torch.autocast(s_out[0].device.type, enabled=False):
            for i, (s, (t_idx, _), margin) in enumerate(zip(s_out, self.pairs, self.margins())):
                s = s.float()
                t = teacher.preact[t_idx].detach().float()
                if tuple(t.shape[-2:]) != tuple(s.shape[-2:]):
                    t = F.adaptive_avg_pool2d(t, s.shape[-2:])
                if t.shape[:2] != s.shape[:2]:
                    raise KDZooError(
                        f"Method 'ofd': the connected student stage has shape {tuple(s.shape)} but the teacher stage "
                        f"{t_idx + 1} has {tuple(teacher.preact[t_idx].shape)}. The networks' NetInfo does not match "
                        "their pre-activation outputs."
                    )
                term = ofd_distance(s, t, margin.float()) / 2 ** (n - i - 1)
                total = term if total is None else total + term
        return total

    def forward(self, student: Outputs, teacher: Outputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"ce": self.w_ce * self.ce(student.logits, labels), "ofd": self.w_ofd * self.ofd_loss(student, teacher)}


@hookimpl
def register_methods(register):
    register(OFD)
