"""CIFAR-native backbones in timm's conventions, registered into timm's model registry.

Importing this module registers every CIFAR net (:data:`CIFAR_MODELS`), so
``timm.create_model("resnet20_cifar", num_classes=100)`` works. The architectures are those of
RepDistiller (HobbitLong/RepDistiller ``models/``, which mdistiller copies), the networks of the
published CIFAR-100 tables, with its parameter counts (``tests/test_models.py`` checks them against
re-implementations of its classes):

* **ResNet** (He et al. 2016, CIFAR variant; ``resnet.py``): ``resnet{8,14,20,32,44,56,110}_cifar``
  and ``resnet{8x4,32x4}_cifar``. A 3x3 stride-1 stem, three stages of basic blocks,
  ``(depth - 2) / 6`` blocks per stage, 1x1-conv + BN shortcut where the shape changes. Widths
  ``[16, 16, 32, 64]``; the ``x4`` variants use ``[32, 64, 128, 256]``.
* **ResNet-50 for CIFAR** (``resnetv2.py``, ``ResNet50``): ``resnet50_cifar``, the ImageNet
  bottleneck ResNet-50 with a 3x3 stride-1 stem and no max-pool, so its four stages sit at
  32/16/8/4. (``resnet50`` is timm's ImageNet model.)
* **WRN-d-k** (Zagoruyko & Komodakis 2016; ``wrn.py``): ``wrn_{16,40}_{1,2}_cifar``. Pre-activation
  blocks, ``(d - 4) / 6`` per stage, widths ``16k, 32k, 64k``, a final BN + ReLU before pooling. The
  BN + ReLU that opens the first block of stages 2 and 3 is moved to the end of the previous stage
  (``norm1``, ``norm2``). This computes exactly RepDistiller's function (that block applies the
  activated input to both of its branches), and makes every stage output post-activation.
* **MobileNetV2** (Sandler et al. 2018; ``mobilenetv2.py``), width 0.5, expansion 6, last conv
  1280 wide: ``mobile_half_cifar`` is RepDistiller's ``mobile_half`` exactly, stride-2 stem
  included (stages at 16/8/4/2 for a 32x32 input); ``mobilenetv2_cifar`` is the same network with
  a stride-1 stem (stages at 32/16/8/4, 4x the compute, same parameters). Their stage outputs are
  the linear-bottleneck block outputs (the architecture has no activation there), as in timm's
  own MobileNetV2 and in RepDistiller.
* **VGG with BN** (:mod:`kdzoo_plugins.cifar_vgg`): ``vgg{8,11,13,16,19}_cifar``.
* **ShuffleNet V1 / V2** (:mod:`kdzoo_plugins.cifar_shufflenet`): ``shufflenet_v{1,2}_cifar``.

Every stage output named by ``feature_info`` is the post-activation output of its block (the
MobileNetV2 exception above aside), so feature methods can pair stages by spatial size. Every
model has timm's API: ``num_classes``, ``num_features``, ``feature_info``, ``forward_features``,
``forward_head(x, pre_logits=False)``, ``forward_intermediates``, ``get_classifier``,
``reset_classifier``, ``pretrained_cfg``. There are no pretrained weights. For checkpoint
mapping: the ResNet, ResNet-50, VGG and ShuffleNet state dicts are the reference's key for key,
the classifier's name aside (``fc`` here, ``linear`` or ``classifier`` there); the WRN and
MobileNetV2 ones hold the reference's tensors in the reference's order under timm-style names.

Beyond timm's API, every model declares what kdzoo's feature methods read (see
:mod:`kdzoo_plugins.cifar_base` and :class:`kdzoo.models.KDNet`): each stage's pre-activation
output (``feature_info`` ``"preact"``: RepDistiller's ``preact=True`` features; the stage output
itself for MobileNetV2), its stem (``stem_module``: RepDistiller's ``f0``) and, the ShuffleNets
aside (RepDistiller has none for them either), ``get_bn_before_relu()``, one BatchNorm per stage.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.layers import BatchNormAct2d
from timm.models import generate_default_cfgs, register_model
from torch import nn

from kdzoo import KDZooError
from kdzoo_plugins import cifar_shufflenet, cifar_vgg
from kdzoo_plugins.cifar_base import CIFAR10_MEAN, CIFAR10_STD, CifarNet, StageBNs, cifar_cfg, create_cifar, is_int
from kdzoo_plugins.cifar_shufflenet import CifarShuffleNetV1, CifarShuffleNetV2
from kdzoo_plugins.cifar_vgg import CifarVGG

__all__ = ["CIFAR_MODELS", "CIFAR10_MEAN", "CIFAR10_STD", "CifarBottleneckResNet", "CifarMobileNetV2", "CifarNet",
           "CifarResNet", "CifarShuffleNetV1", "CifarShuffleNetV2", "CifarVGG", "CifarWideResNet"]


def _positive_ints(value: Any, n: int) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == n and all(is_int(v) and v > 0 for v in value)


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


class CifarResNet(StageBNs, CifarNet):
    """CIFAR ResNet-``depth`` with basic blocks. ``widths``: stem, stage 1-3.

    Source: RepDistiller ``models/resnet.py`` (``ResNet(depth, num_filters, 'basicblock')``).
    """

    variants = "resnet{8,14,20,32,44,56,110,8x4,32x4}_cifar"
    num_feature_entries = 4

    def __init__(self, depth: int = 20, widths: tuple[int, ...] = (16, 16, 32, 64), num_classes: int = 10,
                 in_chans: int = 3, global_pool: str = "avg", drop_rate: float = 0.0) -> None:
        super().__init__()
        if not (is_int(depth) and depth >= 8 and (depth - 2) % 6 == 0):
            raise KDZooError(f"Model option depth={depth!r} is not a CIFAR ResNet depth: use 6n + 2 for n >= 1 "
                             "(8, 14, 20, 26, 32, 44, 56, 110, ...).")
        if not _positive_ints(widths, 4):
            raise KDZooError(f"Model option widths={widths!r} must be 4 positive integers, the channels of the stem "
                             "and of the three stages (e.g. [16, 16, 32, 64]).")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = nn.ReLU(inplace=True)
        feature_info = [dict(num_chs=widths[0], reduction=1, module="act1", preact="act1")]
        in_chs = widths[0]
        for i, out_chs in enumerate(widths[1:]):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(in_chs if b == 0 else out_chs, out_chs, stride if b == 0 else 1) for b in range(n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            # RepDistiller's preact: bn2(conv2(.)) + shortcut of the stage's last block, the input of its act2
            feature_info.append(dict(num_chs=out_chs, reduction=2 ** i, module=f"layer{i + 1}",
                                     preact=f"layer{i + 1}.{n - 1}.act2"))
            in_chs = out_chs
        steps = ["conv1", "bn1", "act1", "layer1", "layer2", "layer3"]
        self._stage_bns = [f"layer{i}.{n - 1}.bn2" for i in (1, 2, 3)]  # RepDistiller's get_bn_before_relu
        self._finish(steps, feature_info, in_chs, num_classes, global_pool, drop_rate, stem="act1")
        self._init_weights()


class Bottleneck(nn.Module):
    """1x1-3x3-1x1 bottleneck (stride on the 3x3), expansion 4, post-activation; 1x1-conv + BN
    shortcut (``shortcut``, as in the source) when the shape changes."""

    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_chs = planes * self.expansion
        self.conv1 = nn.Conv2d(in_chs, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(planes, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.act3 = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.shortcut is None else self.shortcut(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.act3(x + shortcut)


class CifarBottleneckResNet(StageBNs, CifarNet):
    """ImageNet-style bottleneck ResNet on a CIFAR stem (3x3 stride-1 conv, no max-pool): four
    stages of ``layers`` blocks at widths 64/128/256/512 (x4 out), the last three at stride 2.

    Source: RepDistiller ``models/resnetv2.py`` (``ResNet50 = ResNet(Bottleneck, [3, 4, 6, 3])``).
    """

    variants = "resnet50_cifar"
    num_feature_entries = 5

    def __init__(self, layers: tuple[int, ...] = (3, 4, 6, 3), num_classes: int = 10, in_chans: int = 3,
                 global_pool: str = "avg", drop_rate: float = 0.0) -> None:
        super().__init__()
        if not _positive_ints(layers, 4):
            raise KDZooError(f"Model option layers={layers!r} must be 4 positive integers, the number of bottleneck "
                             "blocks in each stage (ResNet-50: [3, 4, 6, 3], ResNet-101: [3, 4, 23, 3]).")
        self.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.act1 = nn.ReLU(inplace=True)
        feature_info = [dict(num_chs=64, reduction=1, module="act1", preact="act1")]
        in_chs, steps = 64, ["conv1", "bn1", "act1"]
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            blocks = []
            for b in range(n):
                blocks.append(Bottleneck(in_chs, planes, stride if b == 0 else 1))
                in_chs = planes * Bottleneck.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            steps.append(f"layer{i + 1}")
            # RepDistiller's preact: bn3(conv3(.)) + shortcut of the stage's last block, the input of its act3
            feature_info.append(dict(num_chs=in_chs, reduction=2 ** i, module=f"layer{i + 1}",
                                     preact=f"layer{i + 1}.{n - 1}.act3"))
        self._stage_bns = [f"layer{i + 1}.{n - 1}.bn3" for i, n in enumerate(layers)]  # RepDistiller's
        self._finish(steps, feature_info, in_chs, num_classes, global_pool, drop_rate, stem="act1")
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


class CifarWideResNet(StageBNs, CifarNet):
    """WRN-``depth``-``widen`` (dropout 0). Stage outputs are post-activation.

    Source: RepDistiller ``models/wrn.py`` (``WideResNet(depth, num_classes, widen_factor)``).
    """

    variants = "wrn_{16,40}_{1,2}_cifar"
    num_feature_entries = 3

    def __init__(self, depth: int = 16, widen: int = 1, num_classes: int = 10, in_chans: int = 3,
                 global_pool: str = "avg", drop_rate: float = 0.0) -> None:
        super().__init__()
        if not (is_int(depth) and depth >= 10 and (depth - 4) % 6 == 0):
            raise KDZooError(f"Model option depth={depth!r} is not a WRN depth: use 6n + 4 for n >= 1 "
                             "(10, 16, 22, 28, 40, ...).")
        if not (is_int(widen) and widen >= 1):
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
            # BatchNormAct2d applies its act to the BN output, RepDistiller's preact: its block2.layer[0].bn1(f1),
            # block3.layer[0].bn1(f2), bn1(f3), the BN that opens the next stage
            feature_info.append(dict(num_chs=out_chs, reduction=2 ** i, module=norm_name, preact=f"{norm_name}.act"))
            in_chs = out_chs
        self._stage_bns = [e["module"] for e in feature_info]  # RepDistiller's block2.layer[0].bn1, block3..., bn1
        self._finish(steps, feature_info, in_chs, num_classes, global_pool, drop_rate, stem="conv1")
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


class CifarMobileNetV2(StageBNs, CifarNet):
    """MobileNetV2 for 32x32 inputs. ``stem_stride=2`` is RepDistiller's ``mobile_half`` (at
    ``width_mult=0.5``); ``stem_stride=1`` keeps the stages at 32/16/8/4.

    Source: RepDistiller ``models/mobilenetv2.py`` (``mobile_half = mobilenetv2_T_w(6, 0.5)``).
    """

    variants = "mobilenetv2_cifar, whose width_mult and stem_stride are options, or mobile_half_cifar"
    num_feature_entries = 4
    # expansion, channels, repeats, stride of the first block (RepDistiller's table)
    SETTING = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, width_mult: float = 0.5, stem_stride: int = 1, num_classes: int = 10, in_chans: int = 3,
                 global_pool: str = "avg", drop_rate: float = 0.0) -> None:
        super().__init__()
        if not (isinstance(width_mult, (int, float)) and not isinstance(width_mult, bool) and width_mult >= 1 / 16):
            raise KDZooError(f"Model option width_mult={width_mult!r} must be a number of at least 0.0625, so that "
                             "every layer keeps a channel (0.5 is RepDistiller's mobile_half, 1.0 the full width).")
        if not (is_int(stem_stride) and stem_stride in (1, 2)):
            raise KDZooError(f"Model option stem_stride={stem_stride!r} must be 1 (stages at 32/16/8/4 for a 32x32 "
                             "input) or 2 (RepDistiller's mobile_half: stages at 16/8/4/2).")
        in_chs = int(32 * width_mult)
        self.conv_stem = nn.Conv2d(in_chans, in_chs, 3, stem_stride, 1, bias=False)
        self.bn1 = BatchNormAct2d(in_chs)
        stages, feature_info, reduction, self._stage_bns = [], [], stem_stride, []
        for i, (t, c, n, s) in enumerate(self.SETTING):
            out_chs = int(c * width_mult)
            stages.append(nn.Sequential(*[InvertedResidual(in_chs if b == 0 else out_chs, out_chs, s if b == 0 else 1, t)
                                          for b in range(n)]))
            reduction *= s
            last_at_reduction = i + 1 == len(self.SETTING) or self.SETTING[i + 1][3] != 1
            if last_at_reduction:
                # a linear bottleneck: the stage output is its own pre-activation
                feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f"blocks.{i}", preact=""))
                # RepDistiller's get_bn_before_relu: blocks[i][-1].conv[-1], the last block's projection BN
                self._stage_bns.append(f"blocks.{i}.{n - 1}.bn3")
            in_chs = out_chs
        self.blocks = nn.Sequential(*stages)
        head_chs = max(1280, int(1280 * width_mult))  # RepDistiller: 1280 unless width_mult > 1
        self.conv_head = nn.Conv2d(in_chs, head_chs, 1, bias=False)
        self.bn2 = BatchNormAct2d(head_chs)
        steps = ["conv_stem", "bn1", *[f"blocks.{i}" for i in range(len(stages))], "conv_head", "bn2"]
        self._finish(steps, feature_info, head_chs, num_classes, global_pool, drop_rate, stem="bn1")
        self._init_weights(linear="small")


# --------------------------------------------------------------------------- timm registration


# must exist before the @register_model functions: timm reads it at registration
default_cfgs = generate_default_cfgs({
    **{f"resnet{d}_cifar": cifar_cfg() for d in ("8", "14", "20", "32", "44", "56", "110", "8x4", "32x4")},
    "resnet50_cifar": cifar_cfg(pool_size=(4, 4)),
    **{f"wrn_{d}_{k}_cifar": cifar_cfg() for d in (16, 40) for k in (1, 2)},
    "mobilenetv2_cifar": cifar_cfg(first_conv="conv_stem", pool_size=(4, 4)),
    "mobile_half_cifar": cifar_cfg(first_conv="conv_stem", pool_size=(2, 2)),
})

_X4 = (32, 64, 128, 256)


@register_model
def resnet8_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return create_cifar(CifarResNet, "resnet8_cifar", pretrained, kwargs, depth=8)


@register_model
def resnet14_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return create_cifar(CifarResNet, "resnet14_cifar", pretrained, kwargs, depth=14)


@register_model
def resnet20_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return create_cifar(CifarResNet, "resnet20_cifar", pretrained, kwargs, depth=20)


@register_model
def resnet32_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return create_cifar(CifarResNet, "resnet32_cifar", pretrained, kwargs, depth=32)


@register_model
def resnet44_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return create_cifar(CifarResNet, "resnet44_cifar", pretrained, kwargs, depth=44)


@register_model
def resnet56_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return create_cifar(CifarResNet, "resnet56_cifar", pretrained, kwargs, depth=56)


@register_model
def resnet110_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return create_cifar(CifarResNet, "resnet110_cifar", pretrained, kwargs, depth=110)


@register_model
def resnet8x4_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return create_cifar(CifarResNet, "resnet8x4_cifar", pretrained, kwargs, depth=8, widths=_X4)


@register_model
def resnet32x4_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return create_cifar(CifarResNet, "resnet32x4_cifar", pretrained, kwargs, depth=32, widths=_X4)


@register_model
def resnet50_cifar(pretrained: bool = False, **kwargs: Any) -> CifarBottleneckResNet:
    return create_cifar(CifarBottleneckResNet, "resnet50_cifar", pretrained, kwargs, layers=(3, 4, 6, 3))


@register_model
def wrn_16_1_cifar(pretrained: bool = False, **kwargs: Any) -> CifarWideResNet:
    return create_cifar(CifarWideResNet, "wrn_16_1_cifar", pretrained, kwargs, depth=16, widen=1)


@register_model
def wrn_16_2_cifar(pretrained: bool = False, **kwargs: Any) -> CifarWideResNet:
    return create_cifar(CifarWideResNet, "wrn_16_2_cifar", pretrained, kwargs, depth=16, widen=2)


@register_model
def wrn_40_1_cifar(pretrained: bool = False, **kwargs: Any) -> CifarWideResNet:
    return create_cifar(CifarWideResNet, "wrn_40_1_cifar", pretrained, kwargs, depth=40, widen=1)


@register_model
def wrn_40_2_cifar(pretrained: bool = False, **kwargs: Any) -> CifarWideResNet:
    return create_cifar(CifarWideResNet, "wrn_40_2_cifar", pretrained, kwargs, depth=40, widen=2)


@register_model
def mobilenetv2_cifar(pretrained: bool = False, **kwargs: Any) -> CifarMobileNetV2:
    return create_cifar(CifarMobileNetV2, "mobilenetv2_cifar", pretrained, kwargs)


@register_model
def mobile_half_cifar(pretrained: bool = False, **kwargs: Any) -> CifarMobileNetV2:
    return create_cifar(CifarMobileNetV2, "mobile_half_cifar", pretrained, kwargs, width_mult=0.5, stem_stride=2)


CIFAR_MODELS: tuple[str, ...] = (*default_cfgs, *cifar_vgg.default_cfgs, *cifar_shufflenet.default_cfgs)
"""The timm names of every CIFAR net (this module's, :mod:`~kdzoo_plugins.cifar_vgg`'s and
:mod:`~kdzoo_plugins.cifar_shufflenet`'s), all registered once this module is imported."""
