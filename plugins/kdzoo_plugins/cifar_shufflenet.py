"""ShuffleNet V1 and V2 for 32x32 inputs, in timm's conventions: ``shufflenet_v1_cifar`` and
``shufflenet_v2_cifar``, the "ShuV1" and "ShuV2" students of the published CIFAR-100 tables.

The architectures of RepDistiller's ``models/ShuffleNetv1.py`` (``ShuffleV1``: groups 3, widths
240/480/960, 4/8/4 blocks) and ``models/ShuffleNetv2.py`` (``ShuffleV2``, net size 1: widths
116/232/464, 3/7/3 blocks after each down-sampling block, a 1x1 conv to 1024 before pooling), with
their parameter counts: a 1x1 stem conv to 24 channels at full resolution, then three stages at
stride 2 (16/8/4 for a 32x32 input). Module names and layer order are the reference's. Both
references leave the weights at PyTorch's default initialisation, and so do these models.
Importing :mod:`kdzoo_plugins.cifar_nets` registers them.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from kdzoo import KDZooError
from kdzoo_plugins.cifar_base import CifarNet, cifar_cfg, create_cifar, is_int

__all__ = ["CifarShuffleNetV1", "CifarShuffleNetV2"]


class ChannelShuffle(nn.Module):
    """``[N, g*c, H, W] -> [N, c*g, H, W]``: interleave the channels of ``groups`` groups."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.reshape(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


def _stem(model: nn.Module, in_chans: int, chs: int) -> dict:
    """The references' stem: 1x1 conv (3 -> 24), BN, ReLU at full resolution."""
    model.conv1 = nn.Conv2d(in_chans, chs, 1, bias=False)
    model.bn1 = nn.BatchNorm2d(chs)
    model.act1 = nn.ReLU(inplace=True)
    return dict(num_chs=chs, reduction=1, module="act1", preact="act1")


# --------------------------------------------------------------------------- ShuffleNet V1


class ShuffleV1Block(nn.Module):
    """ShuffleNet unit: grouped 1x1 conv, channel shuffle, 3x3 depthwise, grouped 1x1 conv; the
    residual is added, or at stride 2 concatenated after a 3x3 average pool; then ReLU.
    ``out_chs`` is the branch's width (at stride 2 the block outputs ``out_chs + in_chs``)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, groups: int, first_groups: int) -> None:
        super().__init__()
        mid = out_chs // 4
        self.stride = stride
        self.conv1 = nn.Conv2d(in_chs, mid, 1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.act1 = nn.ReLU(inplace=True)
        self.shuffle1 = ChannelShuffle(first_groups)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(mid, out_chs, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else None
        self.act3 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shuffle1(self.act1(self.bn1(self.conv1(x))))
        out = self.bn3(self.conv3(self.act2(self.bn2(self.conv2(out)))))
        out = torch.cat([out, self.shortcut(x)], 1) if self.shortcut is not None else out + x
        return self.act3(out)


class CifarShuffleNetV1(CifarNet):
    """ShuffleNet V1 for CIFAR: ``widths`` and ``depths`` of the three stages, ``groups`` groups.

    Source: RepDistiller ``models/ShuffleNetv1.py`` (``ShuffleV1``: ``ShuffleNet`` with
    ``out_planes [240, 480, 960], num_blocks [4, 8, 4], groups 3``). As there, the very first
    1x1 conv (on the 24-channel stem) is not grouped.
    """

    variants = "shufflenet_v1_cifar"
    num_feature_entries = 4

    def __init__(self, widths: tuple[int, ...] = (240, 480, 960), depths: tuple[int, ...] = (4, 8, 4),
                 groups: int = 3, num_classes: int = 10, in_chans: int = 3, global_pool: str = "avg",
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        stem = 24
        if not (is_int(groups) and groups >= 1):
            raise KDZooError(f"Model option groups={groups!r} must be a positive integer (ShuffleV1: 3).")
        if not _ints(depths, 3):
            raise KDZooError(f"Model option depths={depths!r} must be 3 positive integers, the blocks of each stage "
                             "(ShuffleV1: [4, 8, 4]).")
        step = 4 * groups  # every branch is 4x its grouped bottleneck, which must split into the groups
        if not (_ints(widths, 3) and all(w > prev and w % step == 0 and (w - prev) % step == 0
                                         for w, prev in zip(widths, (stem, *widths)))):
            raise KDZooError(f"Model option widths={widths!r} must be 3 integers increasing from the {stem}-channel "
                             f"stem, each width and each increase a multiple of 4 * groups = {step} (ShuffleV1: "
                             "[240, 480, 960] with groups=3).")
        feature_info = [_stem(self, in_chans, stem)]
        in_chs, steps = stem, ["conv1", "bn1", "act1"]
        for i, (width, n) in enumerate(zip(widths, depths)):
            blocks = []
            for b in range(n):
                # the first block of a stage concatenates its pooled input: its branch makes the rest
                blocks.append(ShuffleV1Block(in_chs, width - in_chs if b == 0 else width, 2 if b == 0 else 1, groups,
                                             first_groups=1 if i == 0 and b == 0 else groups))
                in_chs = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            steps.append(f"layer{i + 1}")
            # RepDistiller's preact: the last block's sum (or concatenation) before its final ReLU
            feature_info.append(dict(num_chs=width, reduction=2 ** (i + 1), module=f"layer{i + 1}",
                                     preact=f"layer{i + 1}.{n - 1}.act3"))
        self._finish(steps, feature_info, in_chs, num_classes, global_pool, drop_rate, stem="act1")


# --------------------------------------------------------------------------- ShuffleNet V2


class ShuffleV2Block(nn.Module):
    """ShuffleNet V2 basic unit: split the channels in half, 1x1 conv + 3x3 depthwise + 1x1 conv
    (BN each, ReLU after the 1x1s) on the second half, concatenate, shuffle 2 groups.

    The reference applies the last ReLU (``act3``) to the branch before concatenating; here it is
    applied after the shuffle, to the whole output. That is the same function: the untouched half
    ``x1`` is the previous unit's output, already non-negative, so the ReLU leaves it exactly as
    it is (and passes no gradient where it is 0, which the ReLU that made that 0 blocks anyway).
    It makes ``act3``'s input the unit's whole pre-activation output, in the output's channel
    order."""

    def __init__(self, chs: int) -> None:
        super().__init__()
        half = chs // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.act3 = nn.ReLU(inplace=True)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        out = self.bn3(self.conv3(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x2)))))))
        return self.act3(self.shuffle(torch.cat([x1, out], 1)))


class ShuffleV2DownBlock(nn.Module):
    """ShuffleNet V2 down-sampling unit: two stride-2 branches of ``out_chs / 2`` channels each
    (3x3 depthwise + 1x1 conv on the left; 1x1 conv + 3x3 depthwise + 1x1 conv on the right),
    concatenated and shuffled (2 groups)."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        mid = out_chs // 2
        # left
        self.conv1 = nn.Conv2d(in_chs, in_chs, 3, 2, 1, groups=in_chs, bias=False)
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv2 = nn.Conv2d(in_chs, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.act2 = nn.ReLU(inplace=True)
        # right
        self.conv3 = nn.Conv2d(in_chs, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.act3 = nn.ReLU(inplace=True)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.act5 = nn.ReLU(inplace=True)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = self.act2(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.act5(self.bn5(self.conv5(self.bn4(self.conv4(self.act3(self.bn3(self.conv3(x))))))))
        return self.shuffle(torch.cat([left, right], 1))


class CifarShuffleNetV2(CifarNet):
    """ShuffleNet V2 for CIFAR: ``widths`` of the three stages, ``depths`` basic units after each
    stage's down-sampling unit, a 1x1 conv to ``head_chs`` (+ BN, ReLU) before pooling.

    Source: RepDistiller ``models/ShuffleNetv2.py`` (``ShuffleV2 = ShuffleNetV2(net_size=1)``:
    ``out_channels (116, 232, 464, 1024), num_blocks (3, 7, 3)``). The stage outputs are
    post-activation: each unit concatenates ReLU outputs (and the previous unit's) and shuffles
    them. The head conv is not a stage (as in RepDistiller, whose last feature is ``layer3``).
    """

    variants = "shufflenet_v2_cifar"
    num_feature_entries = 4

    def __init__(self, widths: tuple[int, ...] = (116, 232, 464), depths: tuple[int, ...] = (3, 7, 3),
                 head_chs: int = 1024, num_classes: int = 10, in_chans: int = 3, global_pool: str = "avg",
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        if not (_ints(widths, 3) and all(w % 2 == 0 for w in widths)):
            raise KDZooError(f"Model option widths={widths!r} must be 3 even positive integers, the channels of each "
                             "stage, split in halves (ShuffleV2: [116, 232, 464]).")
        if not _ints(depths, 3, minimum=0):
            raise KDZooError(f"Model option depths={depths!r} must be 3 non-negative integers, the basic units after "
                             "each stage's down-sampling unit (ShuffleV2: [3, 7, 3]).")
        if not (is_int(head_chs) and head_chs > 0):
            raise KDZooError(f"Model option head_chs={head_chs!r} must be a positive integer (ShuffleV2: 1024).")
        feature_info = [_stem(self, in_chans, 24)]
        in_chs, steps = 24, ["conv1", "bn1", "act1"]
        for i, (width, n) in enumerate(zip(widths, depths)):
            self.add_module(f"layer{i + 1}", nn.Sequential(ShuffleV2DownBlock(in_chs, width),
                                                           *[ShuffleV2Block(width) for _ in range(n)]))
            steps.append(f"layer{i + 1}")
            entry = dict(num_chs=width, reduction=2 ** (i + 1), module=f"layer{i + 1}")
            if n:  # the last basic unit's act3 (a stage of a down-sampling unit alone declares none)
                entry["preact"] = f"layer{i + 1}.{n}.act3"
            feature_info.append(entry)
            in_chs = width
        self.conv2 = nn.Conv2d(in_chs, head_chs, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(head_chs)
        self.act2 = nn.ReLU(inplace=True)
        steps += ["conv2", "bn2", "act2"]
        self._finish(steps, feature_info, head_chs, num_classes, global_pool, drop_rate, stem="act1")


def _ints(value: Any, n: int, minimum: int = 1) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == n and all(is_int(v) and v >= minimum for v in value)


# --------------------------------------------------------------------------- timm registration


# must exist before the @register_model functions: timm reads it at registration
default_cfgs = generate_default_cfgs({f"shufflenet_v{v}_cifar": cifar_cfg(pool_size=(4, 4)) for v in (1, 2)})


@register_model
def shufflenet_v1_cifar(pretrained: bool = False, **kwargs: Any) -> CifarShuffleNetV1:
    return create_cifar(CifarShuffleNetV1, "shufflenet_v1_cifar", pretrained, kwargs,
                        widths=(240, 480, 960), depths=(4, 8, 4), groups=3)


@register_model
def shufflenet_v2_cifar(pretrained: bool = False, **kwargs: Any) -> CifarShuffleNetV2:
    return create_cifar(CifarShuffleNetV2, "shufflenet_v2_cifar", pretrained, kwargs,
                        widths=(116, 232, 464), depths=(3, 7, 3), head_chs=1024)
