"""CIFAR-native backbones in timm's conventions, registered into timm's model registry.

Importing this module registers ``resnet{20,32,56,110}_cifar``, ``resnet{8x4,32x4}_cifar``,
``wrn_{16,40}_{1,2}_cifar`` and ``mobilenetv2_cifar``, so ``timm.create_model("resnet20_cifar",
num_classes=10)`` works. The architectures follow RepDistiller (HobbitLong/RepDistiller,
``models/resnet.py``, ``wrn.py``, ``mobilenetv2.py``) and match its parameter counts:

* **ResNet** (He et al. 2016, CIFAR variant): 3x3 stride-1 stem, three stages of basic blocks,
  ``(depth - 2) / 6`` blocks per stage, 1x1-conv + BN shortcut where the shape changes. Widths
  ``[16, 16, 32, 64]``; the ``x4`` variants use ``[32, 64, 128, 256]``.
* **WRN-d-k** (Zagoruyko & Komodakis 2016): pre-activation blocks, ``(d - 4) / 6`` per stage,
  widths ``16k, 32k, 64k``, a final BN + ReLU before pooling. The BN + ReLU that opens the first
  block of stages 2 and 3 is moved to the end of the previous stage (``norm1``, ``norm2``). This
  computes exactly RepDistiller's function (that block applies the activated input to both of
  its branches), and makes every stage output post-activation.
* **MobileNetV2** (Sandler et al. 2018), RepDistiller's ``mobile_half``: width 0.5, expansion 6,
  last conv 1280 wide, but with a stride-1 stem so that the stages sit at 32/16/8/4 for a 32x32
  input. Its stage outputs are the linear-bottleneck block outputs (the architecture has no
  activation there), as in timm's own MobileNetV2 and in RepDistiller.

Every model has timm's API: ``num_classes``, ``num_features``, ``feature_info``,
``forward_features``, ``forward_head(x, pre_logits=False)``, ``forward_intermediates``,
``get_classifier``, ``reset_classifier``, ``pretrained_cfg``. There are no pretrained weights.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.layers import BatchNormAct2d, SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

from kdzoo import KDZooError

__all__ = ["CifarResNet", "CifarWideResNet", "CifarMobileNetV2"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _CifarNet(nn.Module):
    """Shared timm plumbing. A subclass builds its modules, then calls ``_finish``.

    ``_steps`` are the dotted names of the modules that ``forward_features`` runs in order;
    ``feature_info`` entries name modules among them.
    """

    _steps: list[str]

    def _finish(self, steps: list[str], feature_info: list[dict], num_features: int, num_classes: int,
                global_pool: str, drop_rate: float) -> None:
        self._steps = steps
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


# --------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """3x3-3x3 residual block, post-activation, with a 1x1-conv + BN shortcut when the shape changes."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(x + shortcut)


class CifarResNet(_CifarNet):
    """CIFAR ResNet-``depth`` (RepDistiller ``resnet.py``, basic blocks). ``widths``: stem, stage 1-3."""

    def __init__(self, depth: int = 20, widths: tuple[int, ...] = (16, 16, 32, 64), num_classes: int = 10,
                 in_chans: int = 3, global_pool: str = "avg", drop_rate: float = 0.0) -> None:
        super().__init__()
        if not (_is_int(depth) and depth >= 8 and (depth - 2) % 6 == 0):
            raise KDZooError(f"Model option depth={depth!r} is not a CIFAR ResNet depth: use 6n + 2 for n >= 1 "
                             "(8, 14, 20, 26, 32, 44, 56, 110, ...).")
        if not (isinstance(widths, (list, tuple)) and len(widths) == 4 and all(_is_int(w) and w > 0 for w in widths)):
            raise KDZooError(f"Model option widths={widths!r} must be 4 positive integers, the channels of the stem "
                             "and of the three stages (e.g. [16, 16, 32, 64]).")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = nn.ReLU(inplace=True)
        feature_info = [dict(num_chs=widths[0], reduction=1, module="act1")]
        in_chs = widths[0]
        for i, out_chs in enumerate(widths[1:]):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(in_chs if b == 0 else out_chs, out_chs, stride if b == 0 else 1) for b in range(n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            feature_info.append(dict(num_chs=out_chs, reduction=2 ** i, module=f"layer{i + 1}"))
            in_chs = out_chs
        steps = ["conv1", "bn1", "act1", "layer1", "layer2", "layer3"]
        self._finish(steps, feature_info, in_chs, num_classes, global_pool, drop_rate)
        self._init_weights()


# --------------------------------------------------------------------------- Wide ResNet


class PreActBlock(nn.Module):
    """Pre-activation WRN block. ``preact=False``: the input arrives already through BN + ReLU."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, preact: bool = True) -> None:
        super().__init__()
        self.equal_in_out = in_chs == out_chs and stride == 1
        assert preact or not self.equal_in_out
        self.norm1 = BatchNormAct2d(in_chs) if preact else nn.Identity()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.norm2 = BatchNormAct2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.shortcut = None if self.equal_in_out else nn.Conv2d(in_chs, out_chs, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        # as in the reference: the raw input is the identity shortcut; a projection sees the activated one
        shortcut = x if self.shortcut is None else self.shortcut(h)
        return shortcut + self.conv2(self.norm2(self.conv1(h)))


class CifarWideResNet(_CifarNet):
    """WRN-``depth``-``widen`` (RepDistiller ``wrn.py``, dropout 0). Stage outputs are post-activation."""

    def __init__(self, depth: int = 16, widen: int = 1, num_classes: int = 10, in_chans: int = 3,
                 global_pool: str = "avg", drop_rate: float = 0.0) -> None:
        super().__init__()
        if not (_is_int(depth) and depth >= 10 and (depth - 4) % 6 == 0):
            raise KDZooError(f"Model option depth={depth!r} is not a WRN depth: use 6n + 4 for n >= 1 "
                             "(10, 16, 22, 28, 40, ...).")
        if not (_is_int(widen) and widen >= 1):
            raise KDZooError(f"Model option widen={widen!r} must be a positive integer, the k of WRN-d-k (1, 2, 4, 8, ...).")
        n = (depth - 4) // 6
        widths = [16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        in_chs, feature_info, steps = 16, [], ["conv1"]
        for i, out_chs in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks = [PreActBlock(in_chs if b == 0 else out_chs, out_chs, stride if b == 0 else 1, preact=b > 0 or i == 0)
                      for b in range(n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            norm_name = "norm" if i == len(widths) - 1 else f"norm{i + 1}"
            self.add_module(norm_name, BatchNormAct2d(out_chs))
            steps += [f"layer{i + 1}", norm_name]
            feature_info.append(dict(num_chs=out_chs, reduction=2 ** i, module=norm_name))
            in_chs = out_chs
        self._finish(steps, feature_info, in_chs, num_classes, global_pool, drop_rate)
        self._init_weights(linear="zero_bias")


# --------------------------------------------------------------------------- MobileNetV2


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection (RepDistiller keeps the
    expansion conv even when the ratio is 1)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_chs * expand
        self.has_skip = stride == 1 and in_chs == out_chs
        self.conv_pw = nn.Conv2d(in_chs, mid, 1, bias=False)
        self.bn1 = BatchNormAct2d(mid)
        self.conv_dw = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = BatchNormAct2d(mid)
        self.conv_pwl = nn.Conv2d(mid, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn3(self.conv_pwl(self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))))
        return x + y if self.has_skip else y


class CifarMobileNetV2(_CifarNet):
    """MobileNetV2 for 32x32 inputs (RepDistiller ``mobile_half`` with a stride-1 stem)."""

    # expansion, channels, repeats, stride of the first block (RepDistiller's table)
    SETTING = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, width_mult: float = 0.5, num_classes: int = 10, in_chans: int = 3,
                 global_pool: str = "avg", drop_rate: float = 0.0) -> None:
        super().__init__()
        if not (isinstance(width_mult, (int, float)) and not isinstance(width_mult, bool) and width_mult >= 1 / 16):
            raise KDZooError(f"Model option width_mult={width_mult!r} must be a number of at least 0.0625, so that "
                             "every layer keeps a channel (0.5 is RepDistiller's mobile_half, 1.0 the full width).")
        in_chs = int(32 * width_mult)
        self.conv_stem = nn.Conv2d(in_chans, in_chs, 3, 1, 1, bias=False)
        self.bn1 = BatchNormAct2d(in_chs)
        stages, feature_info, reduction = [], [], 1
        for i, (t, c, n, s) in enumerate(self.SETTING):
            out_chs = int(c * width_mult)
            stages.append(nn.Sequential(*[InvertedResidual(in_chs if b == 0 else out_chs, out_chs, s if b == 0 else 1, t)
                                          for b in range(n)]))
            reduction *= s
            last_at_reduction = i + 1 == len(self.SETTING) or self.SETTING[i + 1][3] != 1
            if last_at_reduction:
                feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f"blocks.{i}"))
            in_chs = out_chs
        self.blocks = nn.Sequential(*stages)
        head_chs = max(1280, int(1280 * width_mult))  # RepDistiller: 1280 unless width_mult > 1
        self.conv_head = nn.Conv2d(in_chs, head_chs, 1, bias=False)
        self.bn2 = BatchNormAct2d(head_chs)
        steps = ["conv_stem", "bn1", *[f"blocks.{i}" for i in range(len(stages))], "conv_head", "bn2"]
        self._finish(steps, feature_info, head_chs, num_classes, global_pool, drop_rate)
        self._init_weights(linear="small")


# --------------------------------------------------------------------------- timm registration


def _cfg(first_conv: str = "conv1", pool_size: tuple[int, int] = (8, 8)) -> dict:
    return dict(url="", num_classes=10, input_size=(3, 32, 32), pool_size=pool_size, crop_pct=1.0,
                interpolation="bilinear", mean=CIFAR10_MEAN, std=CIFAR10_STD, first_conv=first_conv,
                classifier="fc")


# must exist before the @register_model functions: timm reads it at registration
default_cfgs = generate_default_cfgs({
    **{f"resnet{d}_cifar": _cfg() for d in ("20", "32", "56", "110", "8x4", "32x4")},
    **{f"wrn_{d}_{k}_cifar": _cfg() for d in (16, 40) for k in (1, 2)},
    "mobilenetv2_cifar": _cfg(first_conv="conv_stem", pool_size=(4, 4)),
})


_VARIANTS = {"CifarResNet": "resnet{20,32,56,110,8x4,32x4}_cifar", "CifarWideResNet": "wrn_{16,40}_{1,2}_cifar"}


def _create(cls: type, variant: str, pretrained: bool, options: dict[str, Any], **arch: Any) -> nn.Module:
    """Build ``variant``: the architecture ``arch`` that its name fixes, plus the user's model ``options``."""
    fixed = sorted(arch.keys() & options.keys())
    if fixed:
        key, value = fixed[0], arch[fixed[0]]
        raise KDZooError(f"Model option {key}={options[key]!r} does not apply to '{variant}', which is built with "
                         f"{key}={list(value) if isinstance(value, tuple) else value}: pick the variant you want "
                         f"instead ({_VARIANTS[cls.__name__]}, or the short names without _cifar).")
    kwargs = {**options, **arch}
    n_feats = {CifarResNet: 4, CifarWideResNet: 3, CifarMobileNetV2: 4}[cls]
    feature_cfg = dict(feature_cls="getter", out_indices=tuple(range(n_feats)))
    return build_model_with_cfg(cls, variant, pretrained, feature_cfg=feature_cfg, **kwargs)


_X4 = (32, 64, 128, 256)


@register_model
def resnet20_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return _create(CifarResNet, "resnet20_cifar", pretrained, kwargs, depth=20)


@register_model
def resnet32_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return _create(CifarResNet, "resnet32_cifar", pretrained, kwargs, depth=32)


@register_model
def resnet56_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return _create(CifarResNet, "resnet56_cifar", pretrained, kwargs, depth=56)


@register_model
def resnet110_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return _create(CifarResNet, "resnet110_cifar", pretrained, kwargs, depth=110)


@register_model
def resnet8x4_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return _create(CifarResNet, "resnet8x4_cifar", pretrained, kwargs, depth=8, widths=_X4)


@register_model
def resnet32x4_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return _create(CifarResNet, "resnet32x4_cifar", pretrained, kwargs, depth=32, widths=_X4)


@register_model
def wrn_16_1_cifar(pretrained: bool = False, **kwargs: Any) -> CifarWideResNet:
    return _create(CifarWideResNet, "wrn_16_1_cifar", pretrained, kwargs, depth=16, widen=1)


@register_model
def wrn_16_2_cifar(pretrained: bool = False, **kwargs: Any) -> CifarWideResNet:
    return _create(CifarWideResNet, "wrn_16_2_cifar", pretrained, kwargs, depth=16, widen=2)


@register_model
def wrn_40_1_cifar(pretrained: bool = False, **kwargs: Any) -> CifarWideResNet:
    return _create(CifarWideResNet, "wrn_40_1_cifar", pretrained, kwargs, depth=40, widen=1)


@register_model
def wrn_40_2_cifar(pretrained: bool = False, **kwargs: Any) -> CifarWideResNet:
    return _create(CifarWideResNet, "wrn_40_2_cifar", pretrained, kwargs, depth=40, widen=2)


@register_model
def mobilenetv2_cifar(pretrained: bool = False, **kwargs: Any) -> CifarMobileNetV2:
    return _create(CifarMobileNetV2, "mobilenetv2_cifar", pretrained, kwargs)


CIFAR_MODELS: tuple[str, ...] = tuple(default_cfgs)
"""The timm names this module registers."""
