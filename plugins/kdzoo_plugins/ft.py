"""Factor transfer (``ft``), with RepDistiller's init stage for the paraphraser.

Definition (RepDistiller ``FactorTransfer``, ``models/util.py`` ``Paraphraser``/``Translator``,
``helper/pretrain.py``; ``train_student.py --distill factor``, ``-a 0 -b 200``). Both nets'
last stage outputs (post-activation, RD ``feat[-2]``) are used; ``C_t`` is the teacher's channel
count and ``k = rate * C_t`` (``rate = 0.5``, ``int`` rounding as RD)::

    paraphraser (teacher side, no BatchNorm, convs with bias, LeakyReLU(0.1) after every layer)
        encoder: conv3x3 C_t -> C_t,  conv3x3 C_t -> k,  conv3x3 k -> k
        decoder: convT3x3 k -> k,     convT3x3 k -> C_t, convT3x3 C_t -> C_t
    translator (student side): conv3x3 C_s -> C_s, conv3x3 C_s -> k, conv3x3 k -> k, each + BN + LeakyReLU(0.1)

    factor(f) = normalize(mean_c(f^2) flattened)        per-sample L2 normalisation (RD, p1 = 2)
    ft        = mean |factor(translator(s)) - factor(encoder(t))|      L1 (RD, p2 = 1)

When the two maps' sizes differ, the larger is adaptive-average-pooled to the smaller first (RD
pools to ``(H, H)``; kdzoo to ``(min H, min W)``, the same for square maps).

RD's factor is an attention map (``mean_c(f^2)``), not the paper's: the paper (and its authors'
code, mmrazor, AberHu's zoo) L2-normalises the whole ``C x H x W`` factor. kdzoo follows RD by
default, since the anchors' published numbers come from it; ``factor="paper"`` selects
``normalize(f.flatten(1))``.

Schedule, as RepDistiller runs it:

* init stage (``init_epochs``, default 30/240 of the schedule; ``init_uses_student = False``):
  only the paraphraser trains, on the reconstruction MSE ``mean((decoder(encoder(t)) - t)^2)``,
  ``{"rec": w_rec * rec}``, at ``init_lr = 0.01``: RD uses 0.01 for this stage when the student is
  a ResNet or WRN and the main lr otherwise (0.01 too for its MobileNet/ShuffleNet students);
  the reconstruction diverges at the 0.05-0.1 of the main stage. ``init_lr=0`` uses the recipe's.
* main stage: ``{"ce": w_ce * CE, "ft": w_ft * ft}``; the translator trains with the student and
  the paraphraser is frozen (RD keeps it out of ``trainable_list``). Frozen twice over: ``forward``
  computes the teacher factor under ``torch.no_grad`` (so no gradient, and hence no optimizer
  step or weight decay, ever reaches the paraphraser in the main stage, whatever the optimizer
  holds), and :meth:`FT.start_epoch` turns its ``requires_grad`` off and clears stale gradients;
  :meth:`FT.init_parameters` turns it back on.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdzoo import KDZooError, hookimpl
from kdzoo.methods import INIT_STAGE_DEFAULTS, Method
from kdzoo.models import NetInfo, Outputs

FACTORS = ("rd", "paper")


def _act() -> nn.Module:
    return nn.LeakyReLU(0.1)


class Paraphraser(nn.Module):
    """RD's ``Paraphraser(use_bn=False)``: a conv encoder to ``k`` channels and a mirrored ConvTranspose decoder."""

    def __init__(self, channels: int, k: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, channels, 3, 1, 1), _act(),
            nn.Conv2d(channels, k, 3, 1, 1), _act(),
            nn.Conv2d(k, k, 3, 1, 1), _act(),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(k, k, 3, 1, 1), _act(),
            nn.ConvTranspose2d(k, channels, 3, 1, 1), _act(),
            nn.ConvTranspose2d(channels, channels, 3, 1, 1), _act(),
        )

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(factor, reconstruction)``."""
        factor = self.encoder(f)
        return factor, self.decoder(factor)


def make_translator(s_channels: int, k: int) -> nn.Sequential:
    """RD's ``Translator(use_bn=True)``: three 3x3 convs (``C_s -> C_s -> k -> k``), each + BN + LeakyReLU(0.1)."""
    return nn.Sequential(
        nn.Conv2d(s_channels, s_channels, 3, 1, 1), nn.BatchNorm2d(s_channels), _act(),
        nn.Conv2d(s_channels, k, 3, 1, 1), nn.BatchNorm2d(k), _act(),
        nn.Conv2d(k, k, 3, 1, 1), nn.BatchNorm2d(k), _act(),
    )


def factor_vector(f: torch.Tensor, mode: str = "rd") -> torch.Tensor:
    """``(B, H*W)`` ``normalize(mean_c(f^2))`` (``"rd"``) or ``(B, C*H*W)`` ``normalize(f)`` (``"paper"``), float32."""
    f = f.float()
    v = f.pow(2).mean(1).flatten(1) if mode == "rd" else f.flatten(1)
    return F.normalize(v)


def ft_loss(factor_s: torch.Tensor, factor_t: torch.Tensor, mode: str = "rd") -> torch.Tensor:
    """RD's ``factor_loss``: pool the larger map to the smaller, then the mean absolute factor difference."""
    size = (min(factor_s.shape[2], factor_t.shape[2]), min(factor_s.shape[3], factor_t.shape[3]))
    if tuple(factor_s.shape[2:]) != size:
        factor_s = F.adaptive_avg_pool2d(factor_s, size)
    if tuple(factor_t.shape[2:]) != size:
        factor_t = F.adaptive_avg_pool2d(factor_t, size)
    return (factor_vector(factor_s, mode) - factor_vector(factor_t.detach(), mode)).abs().mean()


def _usable(t: torch.Tensor) -> torch.Tensor:
    """A teacher tensor that ops may save for backward (a clone when it was made in inference mode)."""
    t = t.detach()
    return t.clone() if t.is_inference() else t


class FT(Method):
    """Factor transfer: init stage ``{"rec": w_rec * MSE}`` (paraphraser); main ``{"ce": ..., "ft": w_ft * ft}``."""

    name = "ft"
    family = "features"
    needs_teacher = True
    needs_features = True
    has_init_stage = True
    init_uses_student = False
    defaults = {"w_ce": 1.0, "w_ft": 200.0, "w_rec": 1.0, "rate": 0.5, "factor": "rd", **INIT_STAGE_DEFAULTS, "init_lr": 0.01}
    reference = (
        "Kim, Park & Kwak, 'Paraphrasing Complex Network: Network Compression via Factor Transfer', "
        "NeurIPS 2018; factor, modules, init stage and w_ft from RepDistiller (Tian et al., CRD, ICLR 2020: "
        "distiller_zoo/FT.py, models/util.py, helper/pretrain.py)."
    )

    def __init__(self, student: NetInfo, teacher: NetInfo | None = None, **hparams) -> None:
        super().__init__(student, teacher, **hparams)
        if self.factor not in FACTORS:
            raise KDZooError(f"Method 'ft': factor must be one of {', '.join(FACTORS)}, got {self.factor!r}. "
                             "'rd' is RepDistiller's normalize(mean_c(f^2)), 'paper' the paper's normalize(f).")
        if not 0 < self.rate <= 1:
            raise KDZooError(f"Method 'ft': rate must be in (0, 1], got rate={self.rate}. The published value is 0.5.")
        if not student.num_stages or not teacher.num_stages:
            raise KDZooError("Method 'ft' transfers the last stage output, but the "
                             + ("student" if not student.num_stages else "teacher")
                             + " reports no stage outputs. Use a backbone with feature_info.")
        t_channels = teacher.stage_channels[-1]
        k = int(t_channels * self.rate)
        if k < 1:
            raise KDZooError(
                f"Method 'ft': the factor would have int({t_channels} * rate={self.rate}) = {k} channels; the "
                f"teacher's last stage has {t_channels}. Raise rate so that rate * {t_channels} >= 1."
            )
        self.paraphraser = Paraphraser(t_channels, k)
        self.translator = make_translator(student.stage_channels[-1], k)

    # -- init stage: the paraphraser learns to reconstruct the teacher's last stage --------------
    def init_parameters(self, student: nn.Module) -> list[nn.Parameter]:
        """Only the paraphraser's parameters (made trainable again); the student is not trained."""
        self.paraphraser.requires_grad_(True)
        return list(self.paraphraser.parameters())

    def reconstruction_loss(self, teacher: Outputs) -> torch.Tensor:
        """Unweighted ``mean((decoder(encoder(t)) - t)^2)`` on the teacher's last stage output (float32)."""
        t = _usable(teacher.features[-1])
        _, rec = self.paraphraser(t)
        return (rec.float() - t.float()).pow(2).mean()

    def init_forward(self, student: Outputs | None, teacher: Outputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"rec": self.w_rec * self.reconstruction_loss(teacher)}

    # -- main stage: the translator learns to match the frozen paraphraser's factor ---------------
    def start_epoch(self, epoch: int, num_epochs: int) -> None:
        """Main stage: freeze the paraphraser (RD keeps it out of its optimizer)."""
        super().start_epoch(epoch, num_epochs)
        self.paraphraser.requires_grad_(False)
        for p in self.paraphraser.parameters():
            p.grad = None  # no stale init-stage gradient for an optimizer that zeroes instead of clearing

    def teacher_factor(self, teacher: Outputs) -> torch.Tensor:
        """The frozen paraphraser's factor of the teacher's last stage output (no gradient)."""
        with torch.no_grad():
            return self.paraphraser.encoder(_usable(teacher.features[-1]))

    def forward(self, student: Outputs, teacher: Outputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        factor_s = self.translator(student.features[-1])
        ft = ft_loss(factor_s, self.teacher_factor(teacher), self.factor)
        return {"ce": self.w_ce * self.ce(student.logits, labels), "ft": self.w_ft * ft}


@hookimpl
def register_methods(register):
    register(FT)
