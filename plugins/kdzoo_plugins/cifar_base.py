"""The timm plumbing shared by the CIFAR-native backbones (:mod:`kdzoo_plugins.cifar_nets`,
:mod:`kdzoo_plugins.cifar_vgg`, :mod:`kdzoo_plugins.cifar_shufflenet`).

A backbone subclasses :class:`CifarNet`, builds its modules, then calls ``_finish`` with the dotted
names of the modules that ``forward_features`` runs in order, its ``feature_info`` and the name of
its stem module. Its ``@register_model`` functions build it through :func:`create_cifar`, which
refuses a model option that the variant's name already fixes.

What :class:`kdzoo.models.KDNet` reads beyond timm's API (for methods that need them):

* ``"preact"`` in a ``feature_info`` entry: the dotted name of the activation module that ends
  that stage; its input at its last call in a forward pass is the stage's pre-activation output
  (RepDistiller's ``preact=True`` features). ``""``: the stage output has no activation (it is
  its own pre-activation). Every activation named so must be a module called once per forward
  pass (a functional ``F.relu`` is invisible to hooks).
* ``stem_module``: the module whose output is the stem output (RepDistiller's ``f0``).

Nets that inherit :class:`StageBNs` also have RepDistiller's ``get_bn_before_relu()`` (OFD reads
the teacher's margins from it).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg
from timm.models._features import feature_take_indices
from torch import nn

from kdzoo import KDZooError

__all__ = ["CifarNet", "CIFAR10_MEAN", "CIFAR10_STD", "StageBNs", "cifar_cfg", "create_cifar", "is_int"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class CifarNet(nn.Module):
    """timm's model API over a straight chain of modules.

    ``_steps`` are the dotted names of the modules that ``forward_features`` runs in order;
    ``feature_info`` entries name modules among them (and, under ``"preact"``, the activation that
    ends the stage); ``stem_module`` names the stem's last module. A subclass sets ``variants`` (its
    registered names, for error messages) and ``num_feature_entries`` (``len(feature_info)``, which
    timm's ``features_only`` wrapper needs before the model exists).
    """

    variants: ClassVar[str] = ""
    num_feature_entries: ClassVar[int] = 0
    _steps: list[str]
    stem_module: str

    def _finish(self, steps: list[str], feature_info: list[dict], num_features: int, num_classes: int,
                global_pool: str, drop_rate: float, stem: str) -> None:
        assert len(feature_info) == self.num_feature_entries, (type(self).__name__, len(feature_info))
        self._steps = steps
        self.stem_module = stem
        self.feature_info = feature_info
        self.num_features = self.head_hidden_size = num_features
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.reset_classifier(num_classes, global_pool)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = "avg") -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:  # not an assert: under python -O it would silently do nothing
            raise NotImplementedError(f"{type(self).__name__} does not support gradient checkpointing")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for name in self._steps:
            x = self.get_submodule(name)(x)
        return x

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm semantics: ``indices`` index ``feature_info`` (int: the last n; None: all).

        ``norm`` is accepted and ignored: every intermediate is already what ``feature_info`` names.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"{type(self).__name__}.forward_intermediates supports output_fmt='NCHW' only, got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        take = {self.feature_info[i]["module"] for i in take_indices}
        last_step = self._steps.index(self.feature_info[max_index]["module"])
        intermediates = []
        for pos, name in enumerate(self._steps):
            if (stop_early or intermediates_only) and pos > last_step:
                break
            x = self.get_submodule(name)(x)
            if name in take:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def _init_weights(self, linear: str = "default") -> None:
        """Conv: He normal (fan-out), zero bias; BN: 1 and 0; linear: PyTorch's default, or
        N(0, 0.01) with zero bias (``"small"``), or zero bias only (``"zero_bias"``)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and linear == "small":
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and linear == "zero_bias":
                nn.init.zeros_(m.bias)


class StageBNs:
    """RepDistiller's ``get_bn_before_relu()`` for a :class:`CifarNet` that sets ``_stage_bns``: the
    dotted names of one BatchNorm per stage (the stages KDNet takes: the last ``feature_info``
    entry at each reduction), input to output, the BN that precedes the stage's final ReLU."""

    _stage_bns: list[str]

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """One BatchNorm per stage, input to output: the BN before the stage's final ReLU (for
        residual stages, the BN of the last block's residual branch, as in RepDistiller)."""
        return [self.get_submodule(name) for name in self._stage_bns]


def cifar_cfg(first_conv: str = "conv1", pool_size: tuple[int, int] = (8, 8)) -> dict:
    """timm's pretrained_cfg of a CIFAR net (there are no weights: ``url`` is empty)."""
    return dict(url="", num_classes=10, input_size=(3, 32, 32), pool_size=pool_size, crop_pct=1.0,
                interpolation="bilinear", mean=CIFAR10_MEAN, std=CIFAR10_STD, first_conv=first_conv,
                classifier="fc")


def create_cifar(cls: type[CifarNet], variant: str, pretrained: bool, options: dict[str, Any],
                 **arch: Any) -> nn.Module:
    """Build ``variant``: the architecture ``arch`` that its name fixes, plus the user's model ``options``."""
    fixed = sorted(arch.keys() & options.keys())
    if fixed:
        key, value = fixed[0], arch[fixed[0]]
        raise KDZooError(f"Model option {key}={options[key]!r} does not apply to '{variant}', which is built with "
                         f"{key}={list(value) if isinstance(value, tuple) else value}: pick the variant you want "
                         f"instead ({cls.variants}; kdzoo also knows most of them by their short names, "
                         "without _cifar).")
    feature_cfg = dict(feature_cls="getter", out_indices=tuple(range(cls.num_feature_entries)))
    return build_model_with_cfg(cls, variant, pretrained, feature_cfg=feature_cfg, **{**options, **arch})
