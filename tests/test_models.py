"""Backbones: the CIFAR nets (timm conformance, parameter counts), the timm plugin, KDNet, pair_stages."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from kdzoo import KDZooError
from kdzoo.models import KDNet, NetInfo, describe, pair_stages
from kdzoo_plugins import cifar_nets, timm_backbones

# Parameter counts of RepDistiller's definitions (HobbitLong/RepDistiller models/, model_dict) with 10 and
# 100 classes, as ../shared METHODS.md lists them; test_matches_repdistiller below re-derives the 100-class
# column from re-implementations of its classes. mobilenetv2_cifar is mobile_half with a stride-1 stem.
PARAMS = {
    "resnet8_cifar": (78_042, 83_892), "resnet14_cifar": (175_258, 181_108), "resnet20_cifar": (272_474, 278_324),
    "resnet32_cifar": (466_906, 472_756), "resnet44_cifar": (661_338, 667_188), "resnet56_cifar": (855_770, 861_620),
    "resnet110_cifar": (1_730_714, 1_736_564), "resnet8x4_cifar": (1_210_410, 1_233_540),
    "resnet32x4_cifar": (7_410_730, 7_433_860), "resnet50_cifar": (23_520_842, 23_705_252),
    "wrn_16_1_cifar": (175_066, 180_916), "wrn_16_2_cifar": (691_674, 703_284), "wrn_40_1_cifar": (563_930, 569_780),
    "wrn_40_2_cifar": (2_243_546, 2_255_156), "vgg8_cifar": (3_918_858, 3_965_028),
    "vgg11_cifar": (9_231_114, 9_277_284), "vgg13_cifar": (9_416_010, 9_462_180),
    "vgg16_cifar": (14_728_266, 14_774_436), "vgg19_cifar": (20_040_522, 20_086_692),
    "mobile_half_cifar": (697_546, 812_836), "mobilenetv2_cifar": (697_546, 812_836),
    "shufflenet_v1_cifar": (862_768, 949_258), "shufflenet_v2_cifar": (1_263_278, 1_355_528),
}
CIFAR = cifar_nets.CIFAR_MODELS
THREE_STAGES = {name for name in CIFAR if name.startswith(("resnet", "wrn")) and name != "resnet50_cifar"}
# the distinct reductions of each net's feature_info: 1 = 32x32 for a CIFAR image
REDUCTIONS = {name: [1, 2, 4] if name in THREE_STAGES else [1, 2, 4, 8] for name in CIFAR} | {
    "mobile_half_cifar": [2, 4, 8, 16]}
LINEAR_STAGES = {"mobilenetv2_cifar", "mobile_half_cifar"}  # linear bottlenecks: no activation at the stage outputs
HEAD_CONV = LINEAR_STAGES | {"shufflenet_v2_cifar"}  # a conv between the last stage and the pooled embedding
_cache: dict[str, nn.Module] = {}


def build(name: str) -> nn.Module:
    """One eval-mode instance per name for the whole file (construction is the slow part)."""
    if name not in _cache:
        torch.manual_seed(0)
        _cache[name] = timm.create_model(name, num_classes=10).eval()
    return _cache[name]


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_all_cifar_models_are_registered_in_timm():
    assert set(CIFAR) == set(PARAMS) and len(CIFAR) == len(PARAMS)
    assert set(CIFAR) <= set(timm.list_models())
    model = timm.create_model("resnet20_cifar")  # num_classes defaults to 10 via the pretrained cfg
    assert isinstance(model, cifar_nets.CifarResNet)
    assert model.num_classes == 10 and model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert timm.create_model("resnet20_cifar", num_classes=100).get_classifier().out_features == 100


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", CIFAR)
def test_parameter_count(name):
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        counts = tuple(_num_params(timm.create_model(name, num_classes=n)) for n in (10, 100))
    assert counts == PARAMS[name]


@pytest.mark.parametrize("name", CIFAR)
def test_timm_conformance(name, x):
    model = build(name)
    with torch.no_grad():
        logits = model(x)
        final, inter = model.forward_intermediates(x)
        pooled = model.forward_head(final, pre_logits=True)
    assert logits.shape == (2, 10)
    info = model.feature_info
    assert len(inter) == len(info)
    for feat, entry in zip(inter, info):
        assert feat.shape == (2, entry["num_chs"], 32 // entry["reduction"], 32 // entry["reduction"])
    assert sorted({e["reduction"] for e in info}) == REDUCTIONS[name]
    assert pooled.shape == (2, model.num_features)
    torch.testing.assert_close(model.forward_head(final), logits)
    torch.testing.assert_close(model.get_classifier()(pooled), logits)


@pytest.mark.parametrize("name", CIFAR)
def test_kdnet_matches_model(name, x):
    model = build(name)
    net = KDNet(model)
    with torch.no_grad():
        out = net(x, features=True, embedding=True)
        ref = model(x)
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=0)
    sizes = [32 // r for r in REDUCTIONS[name]]
    assert [f.shape[-1] for f in out.features] == sizes
    assert net.info.stage_sizes == tuple((s, s) for s in sizes)
    assert net.info.stage_channels == tuple(f.shape[1] for f in out.features)
    assert net.info.embed_dim == model.num_features == out.embedding.shape[1]
    assert net.info.num_classes == 10
    if name not in HEAD_CONV:  # the embedding is the pooled last stage output
        torch.testing.assert_close(out.embedding, out.features[-1].mean(dim=(2, 3)))
    if name not in LINEAR_STAGES:
        assert all((f >= 0).all() for f in out.features)  # post-activation


def test_stage_channels_of_known_nets():
    assert describe(build("resnet8x4_cifar")).stage_channels == (64, 128, 256)
    assert describe(build("wrn_40_2_cifar")).stage_channels == (32, 64, 128)
    info = describe(build("mobilenetv2_cifar"))
    assert info.stage_channels == (12, 16, 48, 160) and info.embed_dim == 1280
    info = describe(build("mobile_half_cifar"))  # RepDistiller's stride-2 stem: the same stages at half the size
    assert info.stage_channels == (12, 16, 48, 160) and info.stage_sizes == ((16, 16), (8, 8), (4, 4), (2, 2))
    assert describe(build("vgg13_cifar")).stage_channels == (64, 128, 256, 512)  # block4 is the stage at 4x4
    assert describe(build("resnet50_cifar")).stage_channels == (256, 512, 1024, 2048)
    assert describe(build("shufflenet_v1_cifar")).stage_channels == (24, 240, 480, 960)
    info = describe(build("shufflenet_v2_cifar"))
    assert info.stage_channels == (24, 116, 232, 464) and info.embed_dim == 1024


def test_wrn_stage_outputs_are_all_post_activation(x):
    with torch.no_grad():
        feats = build("wrn_16_2_cifar").forward_intermediates(x, intermediates_only=True)
    assert all((f >= 0).all() and (f == 0).any() for f in feats)


def test_forward_intermediates_index_semantics(x):
    model = build("resnet20_cifar")
    with torch.no_grad():
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        picked = model.forward_intermediates(x, indices=[-1, 0], intermediates_only=True)
        final_early, early = model.forward_intermediates(x, indices=[1], stop_early=True)
    assert [f.shape[1:] for f in last2] == [(32, 16, 16), (64, 8, 8)]
    assert [f.shape[1] for f in picked] == [16, 64]  # returned in network order, like timm
    assert final_early.shape == (2, 16, 32, 32) and len(early) == 1
    with pytest.raises(AssertionError):
        model.forward_intermediates(x, indices=[4])


def test_features_only_through_timm(x):
    feats = timm.create_model("resnet20_cifar", features_only=True, out_indices=(1, 2, 3))(x)
    assert [tuple(f.shape[1:]) for f in feats] == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]


@pytest.mark.parametrize("name", ["resnet8_cifar", "resnet50_cifar", "wrn_16_1_cifar", "mobile_half_cifar",
                                  "vgg8_cifar", "shufflenet_v1_cifar", "shufflenet_v2_cifar"])  # one per class
def test_features_only_defaults_to_every_feature_info_entry(name, x):
    model = timm.create_model(name, features_only=True).eval()
    with torch.no_grad():
        feats = model(x)
    info = build(name).feature_info
    assert len(feats) == len(info) == type(build(name)).num_feature_entries
    assert [f.shape[1] for f in feats] == [e["num_chs"] for e in info]


class _RepDistillerWRNBlock(nn.Module):
    """RepDistiller's wrn.py BasicBlock, verbatim in behaviour."""

    def __init__(self, i: int, o: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(i), nn.Conv2d(i, o, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(o), nn.Conv2d(o, o, 3, 1, 1, bias=False)
        self.equal = i == o
        self.short = None if self.equal else nn.Conv2d(i, o, 1, stride, 0, bias=False)

    def forward(self, x):
        if not self.equal:
            x = F.relu(self.bn1(x))
            out = x
        else:
            out = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return (x if self.equal else self.short(x)) + out


def _repdistiller_wrn(depth: int, k: int) -> nn.Module:
    n, w = (depth - 4) // 6, [16, 16 * k, 32 * k, 64 * k]
    layers = [nn.Conv2d(3, 16, 3, 1, 1, bias=False)]
    for s in range(3):
        layers += [_RepDistillerWRNBlock(w[s] if b == 0 else w[s + 1], w[s + 1], (1 if s == 0 else 2) if b == 0 else 1)
                   for b in range(n)]
    return nn.Sequential(*layers, nn.BatchNorm2d(w[3]), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(w[3], 10))


@pytest.mark.parametrize("depth,k", [(16, 1), (16, 2)])
def test_wrn_computes_repdistillers_function(depth, k, x):
    """Moving the stage-opening BN + ReLU to the previous stage must not change the function."""
    ours, ref = timm.create_model(f"wrn_{depth}_{k}_cifar").eval(), _repdistiller_wrn(depth, k).eval()
    torch.manual_seed(3)
    src = {}
    for key, value in ours.state_dict().items():  # random BN affine and statistics, so every BN matters
        src[key] = torch.rand_like(value) + 0.5 if "running_var" in key else \
            value if "num_batches" in key else torch.randn_like(value) * (0.1 if "running_mean" in key else 1)
    ours.load_state_dict(src)
    ref_sd = ref.state_dict()
    assert [v.shape for v in ref_sd.values()] == [v.shape for v in src.values()]  # same registration order
    ref.load_state_dict(dict(zip(ref_sd, src.values())))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- RepDistiller's definitions, re-implemented
# Minimal copies of HobbitLong/RepDistiller models/{resnet,resnetv2,vgg,mobilenetv2,ShuffleNetv1,ShuffleNetv2}.py:
# the same modules with the same names, registered in the same order, and the same forward (its is_feat=True,
# preact=False path), returning (stage features, logits). They are written from the source, independently of
# kdzoo's classes, and are the reference for the parameter counts, the functions and the stage outputs.


class _RDBasicBlock(nn.Module):  # resnet.py BasicBlock
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += x if self.downsample is None else self.downsample(x)
        return F.relu(out)


class _RDResNet(nn.Module):  # resnet.py ResNet(depth, num_filters, 'basicblock')
    def __init__(self, depth, num_filters, num_classes=10):
        super().__init__()
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[1], n)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(num_filters[3], num_classes)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [_RDBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [_RDBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        f0 = self.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(f0)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f0, f1, f2, f3], self.fc(self.avgpool(f3).flatten(1))


class _RDBottleneck(nn.Module):  # resnetv2.py Bottleneck
    expansion = 4

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != 4 * planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, 4 * planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(4 * planes))

    def forward(self, x):
        out = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        out = self.bn3(self.conv3(out))
        out += self.shortcut(x)
        return F.relu(out)


class _RDResNetV2(nn.Module):  # resnetv2.py ResNet(Bottleneck, num_blocks): ResNet50 = [3, 4, 6, 3]
    def __init__(self, num_blocks, num_classes=10):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, num_blocks[0], 1)
        self.layer2 = self._make_layer(128, num_blocks[1], 2)
        self.layer3 = self._make_layer(256, num_blocks[2], 2)
        self.layer4 = self._make_layer(512, num_blocks[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(2048, num_classes)

    def _make_layer(self, planes, num_blocks, stride):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(_RDBottleneck(self.in_planes, planes, s))
            self.in_planes = 4 * planes
        return nn.Sequential(*layers)

    def forward(self, x):
        feats = [F.relu(self.bn1(self.conv1(x)))]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            feats.append(layer(feats[-1]))
        return feats, self.linear(self.avgpool(feats[-1]).flatten(1))


_RD_VGG_CFG = {  # vgg.py cfg
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
    "S": [[64], [128], [256], [512], [512]],
}


class _RDVGG(nn.Module):  # vgg.py VGG(cfg, batch_norm=True): vgg8_bn 'S', vgg11_bn 'A', ..., vgg19_bn 'E'
    def __init__(self, cfg, num_classes=10):
        super().__init__()
        self.block0 = self._make_layers(cfg[0], 3)
        self.block1 = self._make_layers(cfg[1], cfg[0][-1])
        self.block2 = self._make_layers(cfg[2], cfg[1][-1])
        self.block3 = self._make_layers(cfg[3], cfg[2][-1])
        self.block4 = self._make_layers(cfg[4], cfg[3][-1])
        self.pool0, self.pool1, self.pool2, self.pool3 = (nn.MaxPool2d(kernel_size=2, stride=2) for _ in range(4))
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(512, num_classes)

    @staticmethod
    def _make_layers(cfg, in_channels):
        layers = []
        for v in cfg:
            layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            in_channels = v
        return nn.Sequential(*layers[:-1])

    def forward(self, x):
        h = x.shape[2]
        f0 = F.relu(self.block0(x))
        f1 = F.relu(self.block1(self.pool0(f0)))
        f2 = F.relu(self.block2(self.pool1(f1)))
        f3 = F.relu(self.block3(self.pool2(f2)))
        f4 = F.relu(self.block4(self.pool3(f3) if h == 64 else f3))
        return [f0, f1, f2, f3, f4], self.classifier(self.pool4(f4).flatten(1))


class _RDInvertedResidual(nn.Module):  # mobilenetv2.py InvertedResidual
    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        self.use_res_connect = stride == 1 and inp == oup
        mid = inp * expand_ratio
        self.conv = nn.Sequential(
            nn.Conv2d(inp, mid, 1, 1, 0, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup))

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class _RDMobileNetV2(nn.Module):  # mobilenetv2.py MobileNetV2: mobile_half = mobilenetv2_T_w(T=6, W=0.5)
    def __init__(self, num_classes=10, T=6, width_mult=0.5, input_size=32):
        super().__init__()
        setting = [[1, 16, 1, 1], [T, 24, 2, 1], [T, 32, 3, 2], [T, 64, 4, 2], [T, 96, 3, 1], [T, 160, 3, 2],
                   [T, 320, 1, 1]]
        input_channel = int(32 * width_mult)
        self.conv1 = nn.Sequential(nn.Conv2d(3, input_channel, 3, 2, 1, bias=False), nn.BatchNorm2d(input_channel),
                                   nn.ReLU(inplace=True))
        self.blocks = nn.ModuleList([])
        for t, c, n, s in setting:
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(_RDInvertedResidual(input_channel, int(c * width_mult), stride, t))
                input_channel = int(c * width_mult)
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = nn.Sequential(nn.Conv2d(input_channel, self.last_channel, 1, 1, 0, bias=False),
                                   nn.BatchNorm2d(self.last_channel), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        self.avgpool = nn.AvgPool2d(input_size // (32 // 2), ceil_mode=True)

    def forward(self, x):
        out = f0 = self.conv1(x)
        feats = [f0]
        for i, block in enumerate(self.blocks):
            out = block(out)
            if i in (1, 2, 4, 6):
                feats.append(out)
        return feats, self.classifier(self.avgpool(self.conv2(out)).flatten(1))


class _RDShuffleBlock(nn.Module):  # ShuffleNetv1.py / ShuffleNetv2.py ShuffleBlock
    def __init__(self, groups):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        n, c, h, w = x.size()
        return x.view(n, self.groups, c // self.groups, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class _RDShuffleV1Bottleneck(nn.Module):  # ShuffleNetv1.py Bottleneck
    def __init__(self, in_planes, out_planes, stride, groups):
        super().__init__()
        self.stride = stride
        mid_planes = int(out_planes / 4)
        g = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = _RDShuffleBlock(groups=g)
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, 3, stride, 1, groups=mid_planes, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()

    def forward(self, x):
        out = self.shuffle1(F.relu(self.bn1(self.conv1(x))))
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        res = self.shortcut(x)
        return F.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class _RDShuffleV1(nn.Module):  # ShuffleNetv1.py ShuffleV1: out_planes [240, 480, 960], num_blocks [4, 8, 4], groups 3
    def __init__(self, num_classes=10, out_planes=(240, 480, 960), num_blocks=(4, 8, 4), groups=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1, self.layer2, self.layer3 = (self._make_layer(o, n, groups) for o, n in zip(out_planes, num_blocks))
        self.linear = nn.Linear(out_planes[2], num_classes)

    def _make_layer(self, out_planes, num_blocks, groups):
        layers = []
        for i in range(num_blocks):
            cat_planes = self.in_planes if i == 0 else 0
            layers.append(_RDShuffleV1Bottleneck(self.in_planes, out_planes - cat_planes, 2 if i == 0 else 1, groups))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def forward(self, x):
        feats = [F.relu(self.bn1(self.conv1(x)))]
        for layer in (self.layer1, self.layer2, self.layer3):
            feats.append(layer(feats[-1]))
        return feats, self.linear(F.avg_pool2d(feats[-1], 4).flatten(1))


class _RDShuffleV2Basic(nn.Module):  # ShuffleNetv2.py BasicBlock (split ratio 0.5)
    def __init__(self, in_channels):
        super().__init__()
        c = int(in_channels * 0.5)
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.shuffle = _RDShuffleBlock(2)

    def forward(self, x):
        c = int(x.size(1) * 0.5)
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn3(self.conv3(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x2))))))))
        return self.shuffle(torch.cat([x1, out], 1))


class _RDShuffleV2Down(nn.Module):  # ShuffleNetv2.py DownBlock
    def __init__(self, in_channels, out_channels):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = _RDShuffleBlock(2)

    def forward(self, x):
        out1 = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        out2 = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x))))))))
        return self.shuffle(torch.cat([out1, out2], 1))


class _RDShuffleV2(nn.Module):  # ShuffleNetv2.py ShuffleNetV2(net_size=1): (116, 232, 464, 1024), (3, 7, 3)
    def __init__(self, num_classes=10, out_channels=(116, 232, 464, 1024), num_blocks=(3, 7, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_channels = 24
        self.layer1, self.layer2, self.layer3 = (self._make_layer(o, n) for o, n in zip(out_channels, num_blocks))
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)

    def _make_layer(self, out_channels, num_blocks):
        layers = [_RDShuffleV2Down(self.in_channels, out_channels)]
        layers += [_RDShuffleV2Basic(out_channels) for _ in range(num_blocks)]
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    def forward(self, x):
        feats = [F.relu(self.bn1(self.conv1(x)))]
        for layer in (self.layer1, self.layer2, self.layer3):
            feats.append(layer(feats[-1]))
        out = F.relu(self.bn2(self.conv2(feats[-1])))
        return feats, self.linear(F.avg_pool2d(out, 4).flatten(1))


# kdzoo name -> the RepDistiller model (a function of num_classes)
REPDISTILLER = {
    **{f"resnet{d}_cifar": (lambda d: lambda c: _RDResNet(d, [16, 16, 32, 64], c))(d)
       for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4_cifar": lambda c: _RDResNet(8, [32, 64, 128, 256], c),
    "resnet32x4_cifar": lambda c: _RDResNet(32, [32, 64, 128, 256], c),
    "resnet50_cifar": lambda c: _RDResNetV2([3, 4, 6, 3], c),
    **{f"vgg{d}_cifar": (lambda k: lambda c: _RDVGG(_RD_VGG_CFG[k], c))(k)
       for d, k in ((8, "S"), (11, "A"), (13, "B"), (16, "D"), (19, "E"))},
    "mobile_half_cifar": lambda c: _RDMobileNetV2(c),
    "shufflenet_v1_cifar": lambda c: _RDShuffleV1(c),
    "shufflenet_v2_cifar": lambda c: _RDShuffleV2(c),
}
# the reference's classifier names (kdzoo's is fc everywhere); MobileNetV2's modules are named timm's way
CLASSIFIER = {"resnet50_cifar": "linear", "shufflenet_v1_cifar": "linear", "shufflenet_v2_cifar": "linear"} | {
    f"vgg{d}_cifar": "classifier" for d in (8, 11, 13, 16, 19)}


def _randomise_norms(model: nn.Module, seed: int) -> None:
    """Random BN affine parameters and statistics (and linear biases), so that every BN matters;
    convolutions keep their initialisation, so that activations stay in range through deep nets."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            elif isinstance(m, nn.Linear):
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))


def test_every_net_but_wrn_has_a_reference_here():
    assert set(REPDISTILLER) | {n for n in CIFAR if n.startswith("wrn")} | {"mobilenetv2_cifar"} == set(CIFAR)


@pytest.mark.parametrize("name", sorted(REPDISTILLER))
def test_matches_repdistiller(name, x):
    """Same parameter count with 100 classes, same tensors in the same order (under the same names but
    the classifier's, MobileNetV2 aside), the same function, and stage outputs that are the
    reference's stage features (RepDistiller's feat_s[:-1], minus MobileNetV2's stem)."""
    with torch.device("meta"):
        ref, ours = REPDISTILLER[name](100), timm.create_model(name, num_classes=100)
        assert _num_params(ref) == PARAMS[name][1] == _num_params(ours)
    torch.manual_seed(0)
    ours, ref = timm.create_model(name, num_classes=10).eval(), REPDISTILLER[name](10).eval()
    _randomise_norms(ours, seed=1)
    src, ref_sd = ours.state_dict(), ref.state_dict()
    assert [v.shape for v in ref_sd.values()] == [v.shape for v in src.values()]
    head = CLASSIFIER.get(name, "fc")
    if name != "mobile_half_cifar":  # a RepDistiller checkpoint loads once its classifier is renamed
        assert ["fc" + k[len(head):] if k.startswith(f"{head}.") else k for k in ref_sd] == list(src)
    ref.load_state_dict(dict(zip(ref_sd, src.values())))
    with torch.no_grad():
        ref_feats, ref_logits = ref(x)
        final, feats = ours.forward_intermediates(x)
        logits = ours.forward_head(final)
    ref_feats = ref_feats[1:] if name == "mobile_half_cifar" else ref_feats
    assert len(feats) == len(ref_feats)
    for got, want in zip(feats, ref_feats):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4 * ref_logits.abs().max().item())
    torch.testing.assert_close(ours(x), logits)


# --------------------------------------------------------------------------- the timm plugin


def _collect() -> tuple[list[str], dict]:
    """The names and factories of the timm plugin's one lazy family, listed as the registry lists them."""
    families = []

    class Register:
        def __call__(self, name, factory):
            raise AssertionError(f"the timm plugin registers its names as one lazy family, not {name!r} alone")

        def family(self, list_names, make_factory, description):
            families.append((list_names, make_factory, description))

    timm_backbones.register_models(Register())
    ((list_names, make_factory, description),) = families
    assert "timm" in description
    names = list_names()
    return names, {name: make_factory(name) for name in names}


def test_plugin_registers_timm_names_and_aliases_without_duplicates():
    start = time.perf_counter()
    names, factories = _collect()
    assert time.perf_counter() - start < 2.0  # no model is built at registration
    assert len(names) == len(set(names))
    assert set(timm.list_models()) <= set(names)
    aliases = {"resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4",
               "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "mobilenetv2_x0_5", "mobile_half",
               "vgg8", "shufflenet_v1", "shufflenet_v2"}
    assert aliases <= set(names) and set(names) == set(timm.list_models()) | aliases
    assert {"resnet18", "resnet20_cifar", "mobilenetv2_100", "vgg13_cifar", "resnet50_cifar"} <= set(names)
    assert factories["resnet20"].model_name == "resnet20_cifar"
    assert factories["mobilenetv2_x0_5"].model_name == "mobilenetv2_cifar"
    assert factories["mobile_half"].model_name == "mobile_half_cifar"
    # timm's ImageNet VGG-13 and ResNet-50 keep their names; the CIFAR ones are reached by their full names
    assert factories["vgg13"].model_name == "vgg13" and factories["vgg13_cifar"].model_name == "vgg13_cifar"
    assert factories["resnet50"].model_name == "resnet50"
    model = factories["wrn_16_1"](num_classes=7)
    assert isinstance(model, cifar_nets.CifarWideResNet) and model.num_classes == 7
    # a CIFAR net listed under its full name still has the CIFAR stem built in: cifar_stem changes nothing
    model = factories["vgg8_cifar"](num_classes=7, cifar_stem=True)
    assert isinstance(model, cifar_nets.CifarVGG) and model.block0[0].stride == (1, 1)


def test_plugin_skips_an_alias_that_timm_uses(monkeypatch):
    real = timm.list_models
    monkeypatch.setattr(timm, "list_models", lambda *a, **k: real(*a, **k) + ["resnet20"])
    names, factories = _collect()
    assert names.count("resnet20") == 1 and factories["resnet20"].model_name == "resnet20"


def test_aliases_name_exactly_the_cifar_nets():
    # ALIASES is written out so that the plugin needs no timm import to register its family
    assert sorted(timm_backbones.ALIASES.values()) == sorted(cifar_nets.CIFAR_MODELS)
    timm_names = set(timm.list_models())
    for alias, target in timm_backbones.ALIASES.items():
        if alias == target:  # listed under its full name because timm owns the short one (ImageNet vgg13, resnet50)
            assert target.removesuffix("_cifar") in timm_names, target
        else:  # a short name that timm also used would never reach the CIFAR net
            assert alias not in timm_names, alias
            assert target == f"{alias}_cifar" or (alias, target) == ("mobilenetv2_x0_5", "mobilenetv2_cifar")


def test_registering_the_timm_plugin_imports_neither_timm_nor_torch():
    code = ("import sys; from kdzoo_plugins import timm_backbones as t\n"
            "class R:\n    def family(self, *a): self.args = a\n"
            "r = R(); t.register_models(r); assert callable(r.args[0]) and callable(r.args[1])\n"
            "print(sorted(m for m in ('timm', 'torch', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("model, option, says", [
    ("resnet20", {"depth": 21},
     ["depth=21", "resnet20_cifar", "depth=20", "resnet{8,14,20,32,44,56,110,8x4,32x4}_cifar"]),
    ("resnet50_cifar", {"layers": [3, 4, 23, 3]}, ["layers=[3, 4, 23, 3]", "layers=[3, 4, 6, 3]"]),
    ("vgg8", {"cfg": "E"}, ["cfg='E'", "'vgg8_cifar'", "cfg=S", "vgg{8,11,13,16,19}_cifar"]),
    ("mobile_half", {"stem_stride": 1}, ["stem_stride=1", "stem_stride=2", "mobilenetv2_cifar, whose width_mult and stem_stride"]),
    ("mobilenetv2_x0_5", {"stem_stride": 3}, ["stem_stride=3", "must be 1", "mobile_half"]),
    ("shufflenet_v1", {"groups": 2}, ["groups=2", "groups=3", "shufflenet_v1_cifar"]),
    ("resnet8x4", {"widths": [8, 8, 16, 32]}, ["widths=[8, 8, 16, 32]", "widths=[32, 64, 128, 256]"]),
    ("resnet20", {"widths": [16, 32]}, ["widths=[16, 32]", "4 positive integers"]),
    ("wrn_16_1", {"widen": 2}, ["widen=2", "wrn_{16,40}_{1,2}_cifar"]),
    ("mobilenetv2_x0_5", {"width_mult": 0.0}, ["width_mult=0.0", "at least 0.0625"]),
])
def test_cifar_net_options_are_checked_with_kdzoo_errors(kdzoo_registry, model, option, says):
    with pytest.raises(KDZooError) as err:
        kdzoo_registry.create_model(model, **option)
    for text in says:
        assert text in str(err.value)


@pytest.mark.parametrize("cls, option, valid", [
    (cifar_nets.CifarResNet, {"depth": 21}, "6n + 2 for n >= 1 (8, 14, 20"),
    (cifar_nets.CifarResNet, {"depth": 2}, "6n + 2"),
    (cifar_nets.CifarWideResNet, {"depth": 15}, "6n + 4 for n >= 1 (10, 16, 22"),
    (cifar_nets.CifarWideResNet, {"widen": 0}, "positive integer"),
    (cifar_nets.CifarBottleneckResNet, {"layers": [3, 4, 6]}, "4 positive integers"),
    (cifar_nets.CifarVGG, {"cfg": "C"}, "(S, A, B, D, E: vgg8, 11, 13, 16, 19)"),
    (cifar_nets.CifarVGG, {"cfg": [[64], [128], [256], [512]]}, "five non-empty lists"),
    (cifar_nets.CifarMobileNetV2, {"stem_stride": 4}, "must be 1"),
    (cifar_nets.CifarShuffleNetV1, {"groups": 0}, "positive integer"),
    (cifar_nets.CifarShuffleNetV1, {"widths": [200, 400, 800]}, "multiple of 4 * groups = 12"),
    (cifar_nets.CifarShuffleNetV1, {"depths": [4, 8]}, "3 positive integers"),
    (cifar_nets.CifarShuffleNetV2, {"widths": [117, 232, 464]}, "3 even positive integers"),
    (cifar_nets.CifarShuffleNetV2, {"depths": [3, -1, 3]}, "non-negative"),
    (cifar_nets.CifarShuffleNetV2, {"head_chs": 0}, "positive integer"),
])
def test_cifar_net_classes_refuse_impossible_architectures(cls, option, valid):
    with pytest.raises(KDZooError, match=r"Model option \w+=") as err:
        cls(**option)
    assert valid in str(err.value)


def test_cifar_net_timm_api_errors_are_not_asserts():
    model = cifar_nets.CifarResNet(depth=8)
    model.set_grad_checkpointing(False)
    with pytest.raises(NotImplementedError, match="gradient checkpointing"):
        model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(torch.zeros(1, 3, 32, 32), output_fmt="NHWC")


def test_cifar_stem_on_timm_resnet18_pairs_with_resnet20(x):
    factory = _collect()[1]["resnet18"]
    model = factory(num_classes=10, cifar_stem=True).eval()
    assert [e["reduction"] for e in model.feature_info] == [1, 1, 2, 4, 8]
    assert isinstance(model.maxpool, nn.Identity) and model.conv1.stride == (1, 1)
    assert model.conv1.kernel_size == (3, 3)
    with torch.no_grad():
        _, inter = model.forward_intermediates(x)
    for feat, entry in zip(inter, model.feature_info):
        assert feat.shape[1:] == (entry["num_chs"], 32 // entry["reduction"], 32 // entry["reduction"])
    teacher = describe(model)
    assert teacher.stage_sizes == ((32, 32), (16, 16), (8, 8), (4, 4))
    assert teacher.stage_channels == (64, 128, 256, 512)
    student = describe(build("resnet20_cifar"))
    assert pair_stages(teacher, student) == [(0, 0), (1, 1), (2, 2)]
    # without the swap the stages are 16/8/4/2/1 at 32x32: only 16 and 8 are shared with resnet20
    plain = describe(factory(num_classes=10))
    assert plain.stage_sizes == ((16, 16), (8, 8), (4, 4), (2, 2), (1, 1))
    assert pair_stages(plain, student) == [(0, 1), (1, 2)]


def test_cifar_stem_on_timm_mobilenetv2_and_unsupported_family():
    factories = _collect()[1]
    model = factories["mobilenetv2_050"](cifar_stem=True)
    assert [e["reduction"] for e in model.feature_info] == [1, 2, 4, 8, 16]
    assert describe(model).stage_sizes == ((32, 32), (16, 16), (8, 8), (4, 4), (2, 2))
    with pytest.raises(KDZooError, match="convnext_atto"):
        factories["convnext_atto"](cifar_stem=True)


def test_pretrained_offline_is_a_clear_error(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot reach huggingface.co")

    def offline_url(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", offline)
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_url", offline_url)
    with pytest.raises(KDZooError, match="offline") as err:
        timm_backbones.TimmFactory("resnet18")(pretrained=True)
    assert "resnet18" in str(err.value) and "pretrained=False" in str(err.value)
    with pytest.raises(KDZooError, match="no pretrained weights for 'resnet20_cifar'"):
        timm_backbones.TimmFactory("resnet20_cifar")(pretrained=True)


# --------------------------------------------------------------------------- pair_stages and KDNet on plain modules


def _info(*sizes: int) -> NetInfo:
    return NetInfo(tuple(8 for _ in sizes), tuple((s, s) for s in sizes), 8, 10)


def test_pair_stages_rules():
    assert pair_stages(_info(32, 16, 8), _info(32, 16, 8)) == [(0, 0), (1, 1), (2, 2)]
    assert pair_stages(_info(32, 16, 8, 4), _info(16, 8)) == [(1, 0), (2, 1)]
    assert pair_stages(_info(16, 8, 4, 2, 1), _info(32, 16, 8)) == [(0, 1), (1, 2)]
    assert pair_stages(_info(28, 14, 7), _info(32, 16)) == [(1, 0), (2, 1)]  # nothing shared: from the last
    with pytest.raises(KDZooError, match="student"):
        pair_stages(_info(32), _info())
    with pytest.raises(KDZooError, match="teacher"):
        pair_stages(_info(), _info(32))


class TinyCNN(nn.Module):
    """A plain module; one ReLU child is reused at two resolutions to exercise per-call hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, 1, 1), nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 6, 3, 2, 1)
        self.conv3 = nn.Conv2d(6, 5, 3, 2, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        a = self.relu(self.bn1(self.conv1(x)))  # 32x32, the relu's 1st call
        b = self.relu(self.conv2(a))  # 16x16, 2nd call
        c = torch.sigmoid(self.conv3(b))  # 8x8: conv3 is the last child at 8x8
        return self.fc(self.pool(c).flatten(1))


def test_kdnet_on_a_plain_module(x):
    torch.manual_seed(0)
    model = TinyCNN().train()
    net = KDNet(model)
    assert model.training  # the dry run restored training mode
    assert net.info == NetInfo((4, 6, 5), ((32, 32), (16, 16), (8, 8)), 5, 3, (32, 32))
    model.eval()
    with torch.no_grad():
        out = net(x, features=True, embedding=True)
        a = F.relu(model.bn1(model.conv1(x)))
        b = F.relu(model.conv2(a))
        c = model.conv3(b)  # the stage output is the child's output: before the functional sigmoid
        emb = torch.sigmoid(c).mean(dim=(2, 3))
    for got, want in zip(out.features, [a, b, c]):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(out.embedding, emb)
    torch.testing.assert_close(out.logits, model.fc(emb))
    fast = net(x)
    assert fast.features is None and fast.embedding is None
    torch.testing.assert_close(fast.logits, out.logits)
    assert not model.conv1._forward_hooks and not model.relu._forward_hooks  # no hook left behind


def test_kdnet_on_a_sequential_skips_global_pool_and_keys_are_model_prefixed(x):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    net = KDNet(model)
    assert net.info.stage_sizes == ((16, 16),) and net.info.stage_channels == (4,) and net.info.embed_dim == 4
    assert all(key.startswith("model.") for key in net.state_dict())
    assert len(net.state_dict()) == len(model.state_dict())


def test_kdnet_without_linear_reports_embedding_error(x):
    model = nn.Sequential(nn.Conv2d(3, 10, 3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net = KDNet(model)
    assert net.info.embed_dim == 0 and net.info.num_classes == 10
    with pytest.raises(KDZooError, match="embedding"):
        net(x, embedding=True)


def test_kdnet_dry_run_failure_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 2))  # fixed to 32x32
    assert KDNet(model).info.num_classes == 2
    with pytest.raises(KDZooError, match="16x16"):
        KDNet(model, input_size=(16, 16))


@pytest.mark.parametrize("option, value", [("pretrained", "maybe"), ("cifar_stem", "yes"), ("pretrained", 1),
                                           ("cifar_stem", None)])
def test_boolean_model_options_must_be_booleans(option, value):
    factory = timm_backbones.TimmFactory("resnet20_cifar")
    with pytest.raises(KDZooError, match=rf"Model option '{option}' of 'resnet20_cifar' must be true or false, "
                                         rf"got {value!r}\. Write --model-option {option}=true"):
        factory(**{option: value})
    assert isinstance(factory(cifar_stem=True, pretrained=False), nn.Module)


def test_model_option_pretrained_maybe_is_refused_by_the_cli(tmp_path, capsys):
    from kdzoo.cli import main

    code = main(["train", "--model", "resnet20", "--model-option", "pretrained=maybe", "--out", str(tmp_path / "o")])
    assert code == 2 and "Model option 'pretrained'" in capsys.readouterr().err
