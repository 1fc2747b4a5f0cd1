"""Pre-activation stage outputs (``Outputs.preact``) and the stem output (``Outputs.stem``) of KDNet.

Every CIFAR net declares its pre-activations in ``feature_info`` (``"preact"``) and its stem
(``stem_module``). The reference is RepDistiller's ``forward(x, is_feat=True, preact=True)``
(HobbitLong/RepDistiller ``models/resnet.py``, ``resnetv2.py``, ``wrn.py``, ``vgg.py``,
``mobilenetv2.py``, ``ShuffleNetv1.py``, ``ShuffleNetv2.py``): the stage's last block output before
its final ReLU (ResNet, ResNet-50, ShuffleNet V1: the residual sum or concatenation; VGG: the block
without its last ReLU; WRN: the BN that opens the next stage, ``blockN.layer[0].bn1(f)`` and
``bn1(f3)``; MobileNetV2: the linear-bottleneck output itself). The hand computations below rebuild
these from the modules' own submodules, step by step as the reference writes them.
"""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from kdzoo import KDZooError
from kdzoo.models import KDNet
from kdzoo_plugins import cifar_nets

CIFAR = cifar_nets.CIFAR_MODELS
LINEAR_STAGES = {"mobilenetv2_cifar", "mobile_half_cifar"}  # linear bottlenecks: preact == features
# the stem's (channels, size) for a 32x32 input: RepDistiller's f0
STEMS = {**{n: (16, 32) for n in CIFAR if n.startswith(("resnet", "wrn"))}, "resnet8x4_cifar": (32, 32),
         "resnet32x4_cifar": (32, 32), "resnet50_cifar": (64, 32), "mobilenetv2_cifar": (16, 32),
         "mobile_half_cifar": (16, 16), **{n: (64, 32) for n in CIFAR if n.startswith("vgg")},
         "shufflenet_v1_cifar": (24, 32), "shufflenet_v2_cifar": (24, 32)}


def _randomise_norms(model: nn.Module, seed: int) -> None:
    """Random BN affine parameters and running statistics, so that every BN matters and the
    pre-activations have both signs in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def _net(name: str, seed: int = 0) -> KDNet:
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=10)
    _randomise_norms(model, seed + 1)
    return KDNet(model).eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def _no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# --------------------------------------------------------------------------- conformance, every CIFAR net


@pytest.mark.parametrize("name", CIFAR)
def test_every_cifar_net_has_preact_and_stem_with_gradients(name, x):
    net = _net(name)
    info = net.info
    assert info.has_preact
    assert (info.stem_channels, info.stem_size) == (STEMS[name][0], (STEMS[name][1],) * 2)

    with torch.no_grad():
        out = net(x, features=True, embedding=True, preact=True, stem=True)
        plain = net.model(x)
        only = net(x, preact=True)  # without features: forward_features (or intermediates for linear stages)
    torch.testing.assert_close(out.logits, plain, rtol=0, atol=1e-5)  # hooks change nothing
    assert only.features is None and only.stem is None and only.embedding is None
    assert len(out.preact) == len(out.features) == info.num_stages
    for i, (pre, feat, got) in enumerate(zip(out.preact, out.features, only.preact)):
        assert pre.shape == feat.shape == (2, info.stage_channels[i], *info.stage_sizes[i])
        torch.testing.assert_close(got, pre, rtol=0, atol=0)
        if name in LINEAR_STAGES:
            assert torch.equal(pre, feat)
        else:
            # a clone taken before the in-place ReLU: it keeps its negatives, and ReLU of it is the stage output
            assert (pre < 0).any() and not torch.equal(pre, feat), i
            assert torch.equal(F.relu(pre), feat), i
    assert out.stem.shape == (2, info.stem_channels, *info.stem_size)
    assert _no_hooks_left(net.model)

    # training mode: the last stage's pre-activation has gradients down to the first conv
    net.train()
    out = net(x, preact=True, stem=True)
    first = next(p for n, p in net.model.named_parameters() if p.dim() == 4)  # the first conv's weight
    last_stage = net.model.get_submodule(net.model.feature_info[net._indices[-1]]["module"])
    params = [first, *last_stage.parameters()]
    grads = torch.autograd.grad(out.preact[-1].square().mean(), params, allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert out.stem.requires_grad
    assert _no_hooks_left(net.model)


# --------------------------------------------------------------------------- against RepDistiller's preact, by hand


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_resnet20_matches_repdistiller_by_hand(x):
    net = _net("resnet20_cifar")
    m = net.model
    with torch.no_grad():
        out = net(x, preact=True, stem=True)
        f0 = F.relu(m.bn1(m.conv1(x)))  # RD: relu(bn1(conv1(x)))
        _close(out.stem, f0)
        h = f0
        for i, layer in enumerate((m.layer1, m.layer2, m.layer3)):
            h = layer[:-1](h)
            b = layer[-1]  # RD BasicBlock(is_last=True): preact = bn2(conv2(relu(bn1(conv1(x))))) + residual
            residual = h if b.downsample is None else b.downsample(h)
            want = b.bn2(b.conv2(F.relu(b.bn1(b.conv1(h))))) + residual
            _close(out.preact[i], want)
            h = F.relu(want)


def test_resnet8x4_first_blocks_with_downsampling_match_by_hand(x):
    net = _net("resnet8x4_cifar")  # one block per stage, each with a 1x1 conv + BN shortcut (32 -> 64 included)
    m = net.model
    with torch.no_grad():
        out = net(x, preact=True)
        h = F.relu(m.bn1(m.conv1(x)))
        for i, layer in enumerate((m.layer1, m.layer2, m.layer3)):
            b = layer[0]
            assert b.downsample is not None
            want = b.bn2(b.conv2(F.relu(b.bn1(b.conv1(h))))) + b.downsample[1](b.downsample[0](h))
            _close(out.preact[i], want)
            h = F.relu(want)


def test_resnet50_bottleneck_matches_by_hand(x):
    net = _net("resnet50_cifar")
    m = net.model
    with torch.no_grad():
        out = net(x, preact=True)
        h = m.layer1[:-1](F.relu(m.bn1(m.conv1(x))))
        b = m.layer1[-1]  # RD resnetv2 Bottleneck: bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x)
        want = b.bn3(b.conv3(F.relu(b.bn2(b.conv2(F.relu(b.bn1(b.conv1(h)))))))) + h
    _close(out.preact[0], want)


def _bn(bn: nn.BatchNorm2d, t: torch.Tensor) -> torch.Tensor:
    """Eval-mode batch norm written out: (t - mean) / sqrt(var + eps) * weight + bias, per channel."""
    shape = (1, -1, 1, 1)
    return ((t - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
            * bn.weight.view(shape) + bn.bias.view(shape))


def test_wrn_16_2_matches_repdistiller_by_hand(x):
    net = _net("wrn_16_2_cifar")
    m = net.model
    with torch.no_grad():
        out = net(x, preact=True, stem=True)
        f0 = m.conv1(x)  # RD: f0 = conv1(x), no BN or ReLU
        _close(out.stem, f0)
        # RD preact: f1 = block2.layer[0].bn1(f1), f2 = block3.layer[0].bn1(f2), f3 = bn1(f3), on the raw
        # block outputs; here those BNs are norm1, norm2 and norm (moved to the end of the previous stage)
        f1 = m.layer1(f0)
        _close(out.preact[0], _bn(m.norm1, f1))
        f2 = m.layer2(F.relu(_bn(m.norm1, f1)))
        _close(out.preact[1], _bn(m.norm2, f2))
        f3 = m.layer3(F.relu(_bn(m.norm2, f2)))
        _close(out.preact[2], _bn(m.norm, f3))


def test_vgg8_matches_repdistiller_by_hand(x):
    net = _net("vgg8_cifar")
    m = net.model
    with torch.no_grad():
        out = net(x, preact=True, stem=True)
        f0 = F.relu(m.block0[:-1](x))  # RD's block0 has no last ReLU; forward: relu(block0(x))
        _close(out.stem, f0)
        _close(out.preact[0], m.block0[1](m.block0[0](x)))  # stage 0 (block0): conv, BN, before its ReLU
        f1_pre = m.block1[1](m.block1[0](m.pool0(f0)))  # RD f1_pre = block1(pool0(f0)), conv + BN
        _close(out.preact[1], f1_pre)
        f2_pre = m.block2[1](m.block2[0](m.pool1(F.relu(f1_pre))))
        _close(out.preact[2], f2_pre)
        f3 = F.relu(m.block3[1](m.block3[0](m.pool2(F.relu(f2_pre)))))
        f4_pre = m.block4[1](m.block4[0](f3))  # no pool before block4 for a 32x32 input
        _close(out.preact[3], f4_pre)


def test_mobile_half_preact_is_the_linear_bottleneck_output(x):
    net = _net("mobile_half_cifar")
    m = net.model
    with torch.no_grad():
        out = net(x, features=True, preact=True, stem=True)
        f0 = F.relu(_bn(m.bn1, m.conv_stem(x)))  # RD conv_bn(3, 16, 2): conv, BN, ReLU
        _close(out.stem, f0)
        b = m.blocks[1][-1]  # RD InvertedResidual.conv[-1] is the BN at the stage output (get_bn_before_relu)
        h = m.blocks[1][:-1](m.blocks[0](f0))
        want = b.bn3(b.conv_pwl(b.bn2(b.conv_dw(b.bn1(b.conv_pw(h)))))) + h
    _close(out.preact[0], want)
    assert all(p is f for p, f in zip(out.preact, out.features))


def test_shufflenet_v1_matches_repdistiller_by_hand(x):
    net = _net("shufflenet_v1_cifar")
    m = net.model
    with torch.no_grad():
        out = net(x, preact=True, stem=True)
        f0 = F.relu(m.bn1(m.conv1(x)))
        _close(out.stem, f0)
        _close(out.preact[0], m.bn1(m.conv1(x)))  # stage 0 is the stem (RD's f0, which it returns activated)
        h = m.layer1[:-1](f0)
        b = m.layer1[-1]  # stride 1: preact = bn3(conv3(relu(bn2(conv2(shuffle(relu(bn1(conv1(x)))))))) + x
        want = b.bn3(b.conv3(F.relu(b.bn2(b.conv2(b.shuffle1(F.relu(b.bn1(b.conv1(h))))))))) + h
        _close(out.preact[1], want)

    model = cifar_nets.CifarShuffleNetV1(depths=(1, 1, 1)).eval()
    _randomise_norms(model, 3)
    net = KDNet(model)  # one stride-2 block per stage: preact = cat([bn3(conv3(...)), avgpool(x)]), RD's
    with torch.no_grad():
        out = net(x, preact=True)
        h = F.relu(model.bn1(model.conv1(x)))
        for i, layer in enumerate((model.layer1, model.layer2, model.layer3)):
            b = layer[0]
            branch = b.bn3(b.conv3(F.relu(b.bn2(b.conv2(b.shuffle1(F.relu(b.bn1(b.conv1(h)))))))))
            want = torch.cat([branch, F.avg_pool2d(h, 3, 2, 1)], 1)
            _close(out.preact[i + 1], want)
            h = F.relu(want)


def _shuffle2(t: torch.Tensor) -> torch.Tensor:
    """RD ShuffleBlock(2): [N, 2*c, H, W] -> [N, c*2, H, W], channel k*2 + g <- g*c + k."""
    n, ch, hh, ww = t.shape
    c = ch // 2
    idx = [g * c + k for k in range(c) for g in range(2)]
    return t[:, idx]


def test_shufflenet_v2_matches_repdistiller_up_to_the_output_shuffle(x):
    """RD's BasicBlock returns preact = cat([x1, bn3(conv3(...))]) before the shuffle, its output
    shuffle(cat([x1, relu(...)])) after: kdzoo's preact is RD's in the output's channel order."""
    net = _net("shufflenet_v2_cifar")
    m = net.model
    with torch.no_grad():
        out = net(x, features=True, preact=True)
        h = m.layer2[:-1](m.layer1(F.relu(m.bn1(m.conv1(x)))))
        b = m.layer2[-1]
        c = h.shape[1] // 2
        x1, x2 = h[:, :c], h[:, c:]
        rd_preact = torch.cat([x1, b.bn3(b.conv3(b.bn2(b.conv2(F.relu(b.bn1(b.conv1(x2)))))))], 1)
        rd_out = _shuffle2(torch.cat([x1, F.relu(rd_preact[:, c:])], 1))
    assert (x1 >= 0).all()  # the untouched half is post-activation, so a ReLU over the whole output is exact
    _close(out.preact[2], _shuffle2(rd_preact))
    _close(out.features[2], rd_out)


# --------------------------------------------------------------------------- get_bn_before_relu (for OFD)


@pytest.mark.parametrize("name", CIFAR)
def test_get_bn_before_relu_gives_one_bn_per_stage(name):
    torch.manual_seed(0)
    with torch.device("meta"):  # names and shapes only
        model = timm.create_model(name, num_classes=10)
    if name.startswith("shufflenet"):  # RepDistiller raises NotImplementedError for them: kdzoo has none
        assert not hasattr(model, "get_bn_before_relu")
        return
    bns = model.get_bn_before_relu()
    entries = model.feature_info
    stages = {e["reduction"]: e for e in entries}.values()  # the last entry at each reduction
    assert all(isinstance(bn, nn.BatchNorm2d) for bn in bns)
    assert [bn.num_features for bn in bns] == [e["num_chs"] for e in stages]


def _same(got: list[nn.Module], want: tuple[nn.Module, ...]) -> bool:
    return len(got) == len(want) and all(a is b for a, b in zip(got, want))


def test_get_bn_before_relu_names_repdistillers_modules():
    m = timm.create_model("resnet20_cifar", num_classes=10)  # RD: layer{1,2,3}[-1].bn2
    assert _same(m.get_bn_before_relu(), (m.layer1[-1].bn2, m.layer2[-1].bn2, m.layer3[-1].bn2))
    m = timm.create_model("resnet50_cifar", num_classes=10)  # RD resnetv2: layer{1..4}[-1].bn3
    assert _same(m.get_bn_before_relu(), (m.layer1[-1].bn3, m.layer2[-1].bn3, m.layer3[-1].bn3, m.layer4[-1].bn3))
    m = timm.create_model("wrn_16_1_cifar", num_classes=10)  # RD: block2.layer[0].bn1, block3.layer[0].bn1, bn1
    assert _same(m.get_bn_before_relu(), (m.norm1, m.norm2, m.norm))
    m = timm.create_model("vgg13_cifar", num_classes=10)  # the BN before the last ReLU of blocks 0, 1, 2, 4
    assert _same(m.get_bn_before_relu(), (m.block0[4], m.block1[4], m.block2[4], m.block4[4]))
    m = timm.create_model("mobile_half_cifar", num_classes=10)  # RD: blocks[1, 2, 4, 6][-1].conv[-1]
    assert _same(m.get_bn_before_relu(), (m.blocks[1][-1].bn3, m.blocks[2][-1].bn3, m.blocks[4][-1].bn3,
                                          m.blocks[6][-1].bn3))


# --------------------------------------------------------------------------- nets without them, wrong declarations


def test_timm_model_without_preact_declarations(x):
    model = timm.create_model("resnet10t", num_classes=10).eval()
    net = KDNet(model)
    assert not net.info.has_preact
    assert (net.info.stem_channels, net.info.stem_size) == (64, (16, 16))  # feature_info[0] = act1
    with pytest.raises(KDZooError) as err:
        net(x, preact=True)
    msg = str(err.value)
    assert "ResNet" in msg and "CIFAR nets" in msg and '"preact"' in msg and "feature_info" in msg
    assert _no_hooks_left(model)
    with torch.no_grad():
        stem = net(x, stem=True).stem
        want = model.act1(model.bn1(model.conv1(x)))
    _close(stem, want)


def test_plain_module_has_neither(x):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10))
    net = KDNet(model)
    assert not net.info.has_preact and (net.info.stem_channels, net.info.stem_size) == (0, (0, 0))
    with pytest.raises(KDZooError, match=r"Pre-activation stage outputs of Sequential.*feature_info"):
        net(x, preact=True)
    with pytest.raises(KDZooError, match=r"stem output of Sequential.*stem_module"):
        net(x, stem=True)
    assert net(x).preact is None and net(x).stem is None


def test_a_partial_declaration_means_no_preact():
    model = timm.create_model("resnet8_cifar", num_classes=10)
    del model.feature_info[2]["preact"]
    assert not KDNet(model).info.has_preact
    model.feature_info[2]["preact"] = "layer2.0.act2"
    del model.feature_info[0]["preact"]  # the stem entry is not a stage: its key does not matter
    assert KDNet(model).info.has_preact


@pytest.mark.parametrize("preact, says", [
    ("layer3.0.nope", "no module of that name"),
    ("layer2.0.act2", "has shape (2, 32, 16, 16), but the stage output has shape (2, 64, 8, 8)"),
    ("unused", "never called that module"),
    (3, "must be the dotted name"),
])
def test_wrong_preact_declarations_are_refused_at_construction(preact, says):
    model = timm.create_model("resnet8_cifar", num_classes=10)
    model.unused = nn.ReLU()
    model.feature_info[3]["preact"] = preact
    with pytest.raises(KDZooError, match=r"CifarResNet.*feature_info\[3\]") as err:
        KDNet(model)
    assert says in str(err.value)
    assert _no_hooks_left(model)


def test_wrong_stem_module_is_refused():
    model = timm.create_model("resnet8_cifar", num_classes=10)
    model.stem_module = "stem_nope"
    with pytest.raises(KDZooError, match="stem_module is 'stem_nope'"):
        KDNet(model)
    model.unused = nn.ReLU()
    model.stem_module = "unused"
    with pytest.raises(KDZooError, match="never called it"):
        KDNet(model)


def test_hooks_are_removed_when_the_forward_fails():
    net = _net("resnet8_cifar")
    with pytest.raises(RuntimeError):
        net(torch.zeros(1, 5, 32, 32), features=True, preact=True, stem=True)
    assert _no_hooks_left(net.model)


def test_no_request_is_plain_model_call(x, monkeypatch):
    net = _net("resnet8_cifar")
    calls = []
    monkeypatch.setattr(net.model, "forward_intermediates", lambda *a, **k: calls.append("fi"))
    monkeypatch.setattr(net.model, "forward_features", lambda *a, **k: calls.append("ff"))
    monkeypatch.setattr(type(net.model), "forward", lambda self, t: (calls.append("forward"), t.sum())[1])
    out = net(x)
    assert calls == ["forward"] and out.preact is None and out.stem is None and out.features is None
