"""VGG with batch norm for 32x32 inputs, in timm's conventions: ``vgg{8,11,13,16,19}_cifar``.

The architecture of RepDistiller's ``models/vgg.py`` (``vgg8_bn`` ... ``vgg19_bn``, the "vgg8" and
"vgg13" of the published tables), with its parameter counts: five blocks of 3x3 conv (with bias)
+ BN + ReLU, a 2x2 max-pool after each of the first three, global average pooling and a single
linear classifier (no 4096-wide FC layers). For a 32x32 input the blocks sit at 32/16/8/4/4.
Importing :mod:`kdzoo_plugins.cifar_nets` registers these models; ``vgg11`` ... ``vgg19`` (and
``*_bn``) are timm's ImageNet VGGs, a different network.
"""
from __future__ import annotations

from typing import Any

from timm.models import generate_default_cfgs, register_model
from torch import nn

from kdzoo import KDZooError
from kdzoo_plugins.cifar_base import CifarNet, StageBNs, cifar_cfg, create_cifar, is_int

__all__ = ["CifarVGG"]

#: RepDistiller's ``cfg``: the conv widths of each of the five blocks.
VGG_CFGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "S": ((64,), (128,), (256,), (512,), (512,)),  # vgg8
    "A": ((64,), (128,), (256, 256), (512, 512), (512, 512)),  # vgg11
    "B": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),  # vgg13
    "D": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),  # vgg16
    "E": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),  # vgg19
}


class CifarVGG(StageBNs, CifarNet):
    """VGG-BN for CIFAR. ``cfg``: a key of :data:`VGG_CFGS` or five lists of conv widths.

    Source: RepDistiller ``models/vgg.py`` (``VGG(cfg, batch_norm=True)``). ``block0`` ...
    ``block4`` hold the same layers at the same indices as there (conv, BN, ReLU, ...), the block's
    last ReLU included (the reference applies it functionally), so each block's output is
    post-activation; ``feature_info`` names all five (two at reduction 8, like the reference's
    ``f3`` and ``f4``). The reference max-pools before ``block4`` only for a 64x64 input (its
    Tiny-ImageNet path); this model never does, so block4 stays at the resolution of block3.

    Pre-activation stage outputs (``feature_info`` ``"preact"``): the input of each block's last
    ReLU, RepDistiller's ``preact=True`` features ``f1_pre`` ... ``f4_pre`` (``block0``'s too,
    where the reference returns the activated ``f0`` in both modes). The stem output is
    ``block0``'s, the reference's ``f0``: VGG has no separate stem, so it is also stage 0.
    """

    variants = "vgg{8,11,13,16,19}_cifar"
    num_feature_entries = 5

    def __init__(self, cfg: str | list[list[int]] = "B", num_classes: int = 10, in_chans: int = 3,
                 global_pool: str = "avg", drop_rate: float = 0.0) -> None:
        super().__init__()
        widths = VGG_CFGS.get(cfg) if isinstance(cfg, str) else cfg
        if not (isinstance(widths, (list, tuple)) and len(widths) == 5 and all(
                isinstance(block, (list, tuple)) and block and all(is_int(w) and w > 0 for w in block)
                for block in widths)):
            raise KDZooError(f"Model option cfg={cfg!r} must name a VGG configuration ({', '.join(VGG_CFGS)}: "
                             "vgg8, 11, 13, 16, 19) or give five non-empty lists of positive conv widths, one per block.")
        in_chs, steps, feature_info = in_chans, [], []
        for i, block in enumerate(widths):
            layers: list[nn.Module] = []
            for out_chs in block:
                layers += [nn.Conv2d(in_chs, out_chs, 3, 1, 1), nn.BatchNorm2d(out_chs), nn.ReLU(inplace=True)]
                in_chs = out_chs
            self.add_module(f"block{i}", nn.Sequential(*layers))
            steps.append(f"block{i}")
            # the block's last ReLU: its input is RepDistiller's f{i}_pre, the block's output before F.relu
            feature_info.append(dict(num_chs=in_chs, reduction=2 ** min(i, 3), module=f"block{i}",
                                     preact=f"block{i}.{len(layers) - 1}"))
            if i < 3:
                self.add_module(f"pool{i}", nn.MaxPool2d(2, 2))
                steps.append(f"pool{i}")
        # the BN before each stage's last ReLU (RepDistiller's block{1..4}[-1]; kdzoo's stages: blocks 0, 1, 2, 4)
        last = {e["reduction"]: e["module"] for e in feature_info}
        self._stage_bns = [f"{name}.{len(self.get_submodule(name)) - 2}" for name in last.values()]
        self._finish(steps, feature_info, in_chs, num_classes, global_pool, drop_rate, stem="block0")
        self._init_weights(linear="small")


# must exist before the @register_model functions: timm reads it at registration
default_cfgs = generate_default_cfgs({f"vgg{d}_cifar": cifar_cfg(first_conv="block0.0", pool_size=(4, 4))
                                      for d in (8, 11, 13, 16, 19)})


@register_model
def vgg8_cifar(pretrained: bool = False, **kwargs: Any) -> CifarVGG:
    return create_cifar(CifarVGG, "vgg8_cifar", pretrained, kwargs, cfg="S")


@register_model
def vgg11_cifar(pretrained: bool = False, **kwargs: Any) -> CifarVGG:
    return create_cifar(CifarVGG, "vgg11_cifar", pretrained, kwargs, cfg="A")


@register_model
def vgg13_cifar(pretrained: bool = False, **kwargs: Any) -> CifarVGG:
    return create_cifar(CifarVGG, "vgg13_cifar", pretrained, kwargs, cfg="B")


@register_model
def vgg16_cifar(pretrained: bool = False, **kwargs: Any) -> CifarVGG:
    return create_cifar(CifarVGG, "vgg16_cifar", pretrained, kwargs, cfg="D")


@register_model
def vgg19_cifar(pretrained: bool = False, **kwargs: Any) -> CifarVGG:
    return create_cifar(CifarVGG, "vgg19_cifar", pretrained, kwargs, cfg="E")
