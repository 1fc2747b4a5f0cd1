"""OFD and ReviewKD against independent float64 computations written here.

References use numpy, scipy.stats.norm and explicit loops; they share no code with the plugins
(they read the plugins' learned weights, as tests/test_methods.py does for FitNets' regressor).
Every tensor is tiny; nothing is trained.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from kdzoo import KDZooError
from kdzoo.methods import PairNotSupported
from kdzoo.models import NetInfo, Outputs
from kdzoo.testing import check_method
from kdzoo_plugins import ofd, reviewkd


def info(channels, sizes, embed_dim=8, num_classes=10, preact=True) -> NetInfo:
    return NetInfo(stage_channels=tuple(channels), stage_sizes=tuple(tuple(s) for s in sizes),
                   embed_dim=embed_dim, num_classes=num_classes, has_preact=preact)


def randn(*shape, seed, scale=1.0, requires_grad=False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).requires_grad_(requires_grad)


def maps(net: NetInfo, batch, seed, relu=False, requires_grad=False) -> list[torch.Tensor]:
    out = []
    for i, (c, (h, w)) in enumerate(zip(net.stage_channels, net.stage_sizes)):
        f = randn(batch, c, h, w, seed=seed + i)
        out.append((f.relu() if relu else f).detach().requires_grad_(requires_grad))
    return out


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def ce_ref(logits: torch.Tensor, labels: torch.Tensor) -> float:
    z, y = np64(logits), labels.numpy()
    tot = 0.0
    for b in range(len(y)):
        zb = z[b] - z[b].max()
        tot += -(zb[y[b]] - math.log(np.exp(zb).sum()))
    return tot / len(y)


def block_pool(f: np.ndarray, size) -> np.ndarray:
    """Average over equal blocks, by loops (adaptive pooling when the sizes divide)."""
    B, C, H, W = f.shape
    oh, ow = size
    kh, kw = H // oh, W // ow
    assert kh * oh == H and kw * ow == W
    out = np.zeros((B, C, oh, ow))
    for i in range(oh):
        for j in range(ow):
            out[:, :, i, j] = f[:, :, i * kh:(i + 1) * kh, j * kw:(j + 1) * kw].mean(axis=(2, 3))
    return out


def bn_train(y: np.ndarray, bn: nn.BatchNorm2d) -> np.ndarray:
    """BatchNorm in training mode: batch statistics, biased variance."""
    mean = y.mean(axis=(0, 2, 3), keepdims=True)
    var = y.var(axis=(0, 2, 3), keepdims=True)
    return (y - mean) / np.sqrt(var + bn.eps) * np64(bn.weight)[None, :, None, None] + np64(bn.bias)[None, :, None, None]


def conv1x1(x: np.ndarray, conv: nn.Conv2d) -> np.ndarray:
    y = np.einsum("oc,bchw->bohw", np64(conv.weight)[:, :, 0, 0], x)
    return y + np64(conv.bias)[None, :, None, None] if conv.bias is not None else y


def conv3x3(x: np.ndarray, conv: nn.Conv2d) -> np.ndarray:
    """3x3 convolution, stride 1, zero padding 1, by summing the nine shifted products."""
    W = np64(conv.weight)
    B, C, H, Wd = x.shape
    xp = np.zeros((B, C, H + 2, Wd + 2))
    xp[:, :, 1:-1, 1:-1] = x
    out = np.zeros((B, W.shape[0], H, Wd))
    for i in range(3):
        for j in range(3):
            out += np.einsum("oc,bchw->bohw", W[:, :, i, j], xp[:, :, i:i + H, j:j + Wd])
    return out


def nearest(x: np.ndarray, size) -> np.ndarray:
    """Nearest resize as PyTorch's 'nearest' mode: source index floor(dst * in / out)."""
    B, C, H, W = x.shape
    rows = [min(int(math.floor(i * H / size[0])), H - 1) for i in range(size[0])]
    cols = [min(int(math.floor(j * W / size[1])), W - 1) for j in range(size[1])]
    return x[:, :, rows][:, :, :, cols]


def set_bn(bn: nn.BatchNorm2d, seed: int) -> None:
    with torch.no_grad():
        bn.weight.copy_(1 + 0.5 * randn(bn.num_features, seed=seed))
        bn.bias.copy_(0.3 * randn(bn.num_features, seed=seed + 1))


# =========================================================================== OFD


def margin_ref(gamma: float, beta: float) -> float:
    """The reference's rule, with scipy's normal distribution."""
    s, m = abs(gamma), beta
    if norm.cdf(-m / s) > 0.001:
        return -s * norm.pdf(m / s) / norm.cdf(-m / s) + m
    return -3 * s


def test_ofd_margin_against_scipy():
    cases = [(1.0, 0.0), (0.5, 0.2), (-0.7, 0.3), (2.0, -1.5), (0.3, 0.9), (1.0, 3.0), (1.0, 3.2), (0.1, 0.5), (1e-3, -2e-3)]
    for g, b in cases:
        assert ofd.bn_margin(g, b) == pytest.approx(margin_ref(g, b), rel=1e-9, abs=1e-12), (g, b)
    # the cut-off: Phi(-3.2) < 0.001 < Phi(-3.0)
    assert ofd.bn_margin(1.0, 3.2) == pytest.approx(-3.0)
    assert ofd.bn_margin(2.0, 6.4) == pytest.approx(-6.0)
    assert ofd.bn_margin(1.0, 3.0) != pytest.approx(-3.0, abs=0.1)
    # N(0, 1): E[x | x < 0] = -sqrt(2/pi); the sign of gamma does not matter
    assert ofd.bn_margin(-1.0, 0.0) == pytest.approx(-math.sqrt(2 / math.pi), rel=1e-12)
    # every margin is negative (the expectation of the negative part)
    assert all(ofd.bn_margin(g, b) < 0 for g, b in cases)
    # gamma = 0: the references divide by zero; the pre-activation is the constant beta
    assert ofd.bn_margin(0.0, -0.4) == -0.4
    assert ofd.bn_margin(0.0, 0.7) == 0.0


class FakeTeacher(nn.Module):
    """A stand-in teacher backbone: one BatchNorm per listed width, with random affine parameters."""

    def __init__(self, widths, seed=0) -> None:
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for c in widths)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for bn in self.bns:
                bn.weight.copy_(torch.randn(bn.num_features, generator=g))
                bn.bias.copy_(torch.randn(bn.num_features, generator=g))
                bn.weight[0] = 0.2  # one channel past the Phi <= 0.001 cut-off: margin -3|gamma|
                bn.bias[0] = 0.9

    def get_bn_before_relu(self):
        return list(self.bns)


class Wrapped(nn.Module):
    """KDNet-like: the backbone is ``.model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


S3 = info((4, 8, 16), ((8, 8), (4, 4), (2, 2)))
T3 = info((6, 12, 24), ((16, 16), (8, 8), (4, 4)), embed_dim=12)  # wider and twice as large
T4 = info((3, 6, 12, 24), ((16, 16), (16, 16), (8, 8), (4, 4)), embed_dim=12)  # one more stage


def ofd_ref(m: ofd.OFD, s_pre, t_pre, bns, pairs, w_ofd=0.001) -> float:
    """Connector (1x1 conv, train-mode BN) in numpy, teacher pooled by blocks, margins from scipy,
    the partial L2 by an explicit loop over every element; stage i weighted 1/2^(n-i-1)."""
    n = len(pairs)
    total = 0.0
    counts = [0, 0, 0]
    for i, ((t_idx, s_idx), conn) in enumerate(zip(pairs, m.connectors)):
        conv, bn = conn
        s = bn_train(conv1x1(np64(s_pre[s_idx]), conv), bn)
        t = np64(t_pre[t_idx])
        if t.shape[2:] != s.shape[2:]:
            t = block_pool(t, s.shape[2:])
        margins = [margin_ref(float(g), float(b)) for g, b in zip(bns[t_idx].weight.detach(), bns[t_idx].bias.detach())]
        B, C, H, W = s.shape
        acc = 0.0
        for b in range(B):
            for c in range(C):
                mc = margins[c]
                for h in range(H):
                    for w in range(W):
                        sv, tv = s[b, c, h, w], t[b, c, h, w]
                        if tv > 0:
                            acc += (sv - tv) ** 2
                            counts[2] += 1
                        elif tv > mc:
                            if sv > tv:
                                acc += (sv - tv) ** 2
                                counts[1] += 1
                        elif sv > mc:
                            acc += (sv - mc) ** 2
                            counts[0] += 1
        total += acc / B / 2 ** (n - i - 1)
    assert all(c > 0 for c in counts), f"the fixed tensors must exercise every branch of the loss: {counts}"
    return w_ofd * total


@pytest.mark.parametrize("teacher_info", [T3, T4], ids=["wider+larger", "more stages"])
def test_ofd_loss_against_loops(teacher_info):
    m = ofd.OFD(S3, teacher_info)
    n_t = teacher_info.num_stages
    assert m.pairs == [(n_t - 3 + k, k) for k in range(3)]
    fake = FakeTeacher(teacher_info.stage_channels, seed=7)
    m.bind_teacher(Wrapped(fake))
    for conn, k in zip(m.connectors, range(3)):
        set_bn(conn[1], seed=100 + 10 * k)
    s_pre = maps(S3, 3, seed=10)
    t_pre = [f * 1.5 for f in maps(teacher_info, 3, seed=20)]
    logits, y = randn(3, 10, seed=30), torch.tensor([0, 4, 9])
    terms = m(Outputs(logits, preact=s_pre), Outputs(randn(3, 10, seed=31), preact=t_pre), y)
    assert set(terms) == {"ce", "ofd"}
    assert terms["ofd"].dtype == torch.float32 and terms["ofd"].dim() == 0
    ref = ofd_ref(m, s_pre, t_pre, fake.bns, m.pairs)
    assert terms["ofd"].item() == pytest.approx(ref, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(ce_ref(logits, y), rel=1e-5)
    # with 4 teacher stages, stage k of the student meets teacher stage k+1 and that stage's margins
    for k, (t_idx, _) in enumerate(m.pairs):
        ref_m = [margin_ref(float(g), float(b)) for g, b in zip(fake.bns[t_idx].weight.detach(), fake.bns[t_idx].bias.detach())]
        np.testing.assert_allclose(m.margins()[k].numpy(), ref_m, rtol=1e-6, atol=1e-7)


def test_ofd_connectors_shape_init_and_gradients():
    m = ofd.OFD(S3, T3, kernel_size=3)
    for conn, (t, s) in zip(m.connectors, m.pairs):
        conv, bn = conn
        assert (conv.in_channels, conv.out_channels) == (S3.stage_channels[s], T3.stage_channels[t])
        assert conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.bias is None
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
        # He-normal over k*k*C_t (loose statistical check on the empirical std)
        expected = math.sqrt(2 / (9 * T3.stage_channels[t]))
        assert conv.weight.std().item() == pytest.approx(expected, rel=0.35)
    assert "connectors.0.0.weight" in m.state_dict() and "margin2" in m.state_dict()
    m.bind_teacher(FakeTeacher(T3.stage_channels))
    s_pre = maps(S3, 2, seed=40, requires_grad=True)
    t_pre = maps(T3, 2, seed=50, requires_grad=True)
    terms = m(Outputs(randn(2, 10, seed=1, requires_grad=True), preact=s_pre), Outputs(randn(2, 10, seed=2), preact=t_pre),
              torch.tensor([1, 2]))
    sum(terms.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in s_pre)
    assert all(f.grad is None for f in t_pre)
    assert not any(b.requires_grad for b in m.buffers())


def test_ofd_teacher_from_inference_mode():
    m = ofd.OFD(S3, T3)
    m.bind_teacher(FakeTeacher(T3.stage_channels))
    with torch.inference_mode():
        t_pre = maps(T3, 2, seed=60)
        t_logits = randn(2, 10, seed=61)
    s_pre = maps(S3, 2, seed=62, requires_grad=True)
    terms = m(Outputs(randn(2, 10, seed=63), preact=s_pre), Outputs(t_logits, preact=t_pre), torch.tensor([0, 1]))
    sum(terms.values()).backward()
    assert s_pre[0].grad is not None


def test_ofd_bind_teacher_reads_only_and_keeps_nothing():
    fake = FakeTeacher(T3.stage_channels, seed=3)
    net = Wrapped(fake).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    m = ofd.OFD(S3, T3)
    n_params = len(list(m.parameters()))
    m.bind_teacher(net)
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not net.training and all(not bn.training for bn in fake.bns)
    assert len(list(m.parameters())) == n_params
    assert not any(mod is net or mod is fake or mod in list(fake.bns) for mod in m.modules())
    assert set(m.state_dict()) == {*(f"connectors.{i}.{k}" for i in range(3) for k in
                                     ("0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                                      "1.num_batches_tracked")), "margin0", "margin1", "margin2", "margins_bound"}
    # also accepts the backbone itself (no .model)
    m2 = ofd.OFD(S3, T3)
    m2.bind_teacher(fake)
    assert all(torch.equal(a, b) for a, b in zip(m.margins(), m2.margins()))


def test_ofd_margins_travel_with_the_checkpoint():
    m = ofd.OFD(S3, T3)
    m.bind_teacher(FakeTeacher(T3.stage_channels, seed=5))
    fresh = ofd.OFD(S3, T3)
    s, t, y = Outputs(randn(2, 10, seed=1), preact=maps(S3, 2, seed=2)), Outputs(randn(2, 10, seed=3), preact=maps(T3, 2, seed=4)), torch.tensor([0, 1])
    with pytest.raises(KDZooError, match="bind_teacher"):
        fresh(s, t, y)
    fresh.load_state_dict(m.state_dict())
    m.eval(), fresh.eval()
    assert torch.equal(m(s, t, y)["ofd"], fresh(s, t, y)["ofd"])


def test_ofd_refusals():
    with pytest.raises(PairNotSupported, match="student net does not declare"):
        ofd.OFD(dataclasses.replace(S3, has_preact=False), T3)
    with pytest.raises(PairNotSupported, match="student and teacher nets do not"):
        ofd.OFD(dataclasses.replace(S3, has_preact=False), dataclasses.replace(T3, has_preact=False))
    with pytest.raises(KDZooError, match="kernel_size"):
        ofd.OFD(S3, T3, kernel_size=2)
    m = ofd.OFD(S3, T3)
    with pytest.raises(PairNotSupported, match=r"no get_bn_before_relu\(\).*3 stages, channels \[6, 12, 24\]"):
        m.bind_teacher(Wrapped(nn.Linear(2, 2)))
    with pytest.raises(PairNotSupported, match="returned 2 BatchNorm"):
        m.bind_teacher(FakeTeacher((12, 24)))
    with pytest.raises(KDZooError, match="stage 2 has 13 channels, but that stage outputs 12"):
        m.bind_teacher(FakeTeacher((6, 13, 24)))
    assert not bool(m.margins_bound)
    with pytest.raises(KDZooError, match="preact"):
        m.bind_teacher(FakeTeacher(T3.stage_channels))
        m(Outputs(randn(2, 10, seed=1), features=maps(S3, 2, seed=2)), Outputs(randn(2, 10, seed=3)), torch.tensor([0, 1]))
    m.validate_batch_size(1)  # no 1x1 stage
    tiny = ofd.OFD(info((4, 8), ((2, 2), (1, 1))), info((6, 12), ((2, 2), (1, 1))))
    with pytest.raises(KDZooError, match="batches of 1"):
        tiny.validate_batch_size(1)
    tiny.validate_batch_size(2)


# What kdzoo's CIFAR nets should return from get_bn_before_relu(): the BatchNorm whose output feeds
# each stage's final activation, one per kdzoo stage, input to output (RepDistiller's and
# mdistiller's lists, mapped onto kdzoo's module names and stages).
BN_BEFORE_RELU = {
    "resnet8_cifar": lambda m: [m.layer1[-1].bn2, m.layer2[-1].bn2, m.layer3[-1].bn2],
    "resnet8x4_cifar": lambda m: [m.layer1[-1].bn2, m.layer2[-1].bn2, m.layer3[-1].bn2],
    "wrn_16_1_cifar": lambda m: [m.norm1, m.norm2, m.norm],
    "vgg8_cifar": lambda m: [m.block0[-2], m.block1[-2], m.block2[-2], m.block4[-2]],
    "mobile_half_cifar": lambda m: [m.blocks[i][-1].bn3 for i in (1, 2, 4, 6)],
    "shufflenet_v1_cifar": lambda m: [m.bn1, m.layer1[-1].bn3, m.layer2[-1].bn3, m.layer3[-1].bn3],
}


def cifar_kdnet(name: str):
    import timm

    import kdzoo_plugins.cifar_nets  # noqa: F401  (registers the CIFAR nets)
    from kdzoo.models import KDNet

    torch.manual_seed(0)
    return KDNet(timm.create_model(name, num_classes=10), (32, 32)).eval()


@pytest.mark.parametrize("name", list(BN_BEFORE_RELU))
def test_ofd_bind_teacher_on_cifar_nets(name):
    """Refused clearly while a net lacks get_bn_before_relu; the proposed lists match kdzoo's stages
    (one BatchNorm per stage, with its channels), and binding leaves the teacher untouched."""
    net = cifar_kdnet(name)
    model = net.model
    proposed = BN_BEFORE_RELU[name](model)
    assert all(isinstance(bn, nn.BatchNorm2d) for bn in proposed)
    assert [bn.num_features for bn in proposed] == list(net.info.stage_channels)
    student = info((8,) * net.info.num_stages, net.info.stage_sizes)
    m = ofd.OFD(student, dataclasses.replace(net.info, has_preact=True))
    if hasattr(model, "get_bn_before_relu"):
        assert [id(b) for b in model.get_bn_before_relu()] == [id(b) for b in proposed]
    else:
        with pytest.raises(PairNotSupported, match="get_bn_before_relu"):
            m.bind_teacher(net)
        model.get_bn_before_relu = lambda: BN_BEFORE_RELU[name](model)
    with torch.no_grad():  # untrained BNs are (1, 0) everywhere: make the margins tell channels apart
        for k, bn in enumerate(proposed):
            set_bn(bn, seed=300 + k)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    m.bind_teacher(net)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert not any(mod is model for mod in m.modules())
    for k, bn in enumerate(proposed):
        ref = [margin_ref(float(g), float(b)) for g, b in zip(bn.weight.detach(), bn.bias.detach())]
        np.testing.assert_allclose(m.margins()[k].numpy(), ref, rtol=1e-6)


def test_ofd_and_reviewkd_on_real_cifar_outputs():
    """One training step's worth of both methods on kdzoo's own nets and their pre-activation outputs."""
    teacher, student = cifar_kdnet("wrn_16_1_cifar"), cifar_kdnet("resnet8_cifar")
    if not (teacher.info.has_preact and student.info.has_preact):
        pytest.skip("the CIFAR nets do not declare pre-activation outputs yet")
    teacher.model.get_bn_before_relu = lambda: BN_BEFORE_RELU["wrn_16_1_cifar"](teacher.model)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with torch.inference_mode():
        t_raw = teacher(x, features=True, embedding=True, preact=True)
    t = Outputs(t_raw.logits.clone(), [f.clone() for f in t_raw.features], t_raw.embedding.clone(),
                [f.clone() for f in t_raw.preact])
    student.train()
    s = student(x, features=True, embedding=True, preact=True)
    # the pre-activations are what the ReLUs saw
    assert all(torch.allclose(p.relu(), f) for p, f in zip(s.preact, s.features))
    m_ofd = ofd.OFD(student.info, teacher.info)
    m_ofd.bind_teacher(teacher)
    m_rev = reviewkd.ReviewKD(student.info, teacher.info)
    terms = {**m_ofd(s, t, y), **{f"r_{k}": v for k, v in m_rev(s, t, y).items()}}
    assert all(torch.isfinite(v) for v in terms.values()) and terms["ofd"] > 0 and terms["r_review"] > 0
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in list(m_ofd.parameters()) + list(m_rev.parameters()))
    assert student.model.layer1[0].conv1.weight.grad.abs().sum() > 0


# =========================================================================== ReviewKD


def hcl_ref(outs: list[np.ndarray], tgts: list[np.ndarray]) -> float:
    total = 0.0
    for fs, ft in zip(outs, tgts):
        h = fs.shape[2]
        loss = float(np.mean((fs - ft) ** 2))
        weights = []
        for p in (4, 2, 1):
            if p < h:
                weights.append(0.5 ** (len(weights) + 1))
                loss += weights[-1] * float(np.mean((block_pool(fs, (p, p)) - block_pool(ft, (p, p))) ** 2))
        total += loss / (1 + sum(weights))
    return total


def test_hcl_against_explicit_pooling():
    shapes = [(2, 3, 8, 8), (2, 5, 4, 4), (2, 4, 2, 2), (2, 6, 1, 1)]
    outs = [randn(*s, seed=i) for i, s in enumerate(shapes)]
    tgts = [randn(*s, seed=10 + i) for i, s in enumerate(shapes)]
    got = reviewkd.hcl_loss(outs, tgts).item()
    assert got == pytest.approx(hcl_ref([np64(o) for o in outs], [np64(t) for t in tgts]), rel=1e-6)
    # the 8x8 level: (mse + mse4/2 + mse2/4 + mse1/8) / 1.875, written out
    fs, ft = np64(outs[0]), np64(tgts[0])
    level = (np.mean((fs - ft) ** 2) + np.mean((block_pool(fs, (4, 4)) - block_pool(ft, (4, 4))) ** 2) / 2
             + np.mean((block_pool(fs, (2, 2)) - block_pool(ft, (2, 2))) ** 2) / 4
             + np.mean((fs.mean(axis=(2, 3)) - ft.mean(axis=(2, 3))) ** 2) / 8) / 1.875
    assert reviewkd.hcl_loss(outs[:1], tgts[:1]).item() == pytest.approx(level, rel=1e-6)


RS = info((4, 8), ((4, 4), (2, 2)), embed_dim=8)
RT = info((6, 12), ((8, 8), (4, 4)), embed_dim=10)


def abf_ref(abf: reviewkd.ABF, x: np.ndarray, residual, out_size):
    x = bn_train(conv1x1(x, abf.conv1[0]), abf.conv1[1])
    if abf.att_conv is not None:
        y = nearest(residual, x.shape[2:])
        z = 1 / (1 + np.exp(-conv1x1(np.concatenate([x, y], axis=1), abf.att_conv[0])))
        x = x * z[:, 0:1] + y * z[:, 1:2]
    if x.shape[2:] != tuple(out_size):
        x = nearest(x, out_size)
    return bn_train(conv3x3(x, abf.conv2[0]), abf.conv2[1]), x


def test_reviewkd_against_numpy():
    m = reviewkd.ReviewKD(RS, RT)
    assert m.mid_channels == 8 and m.out_sizes == [(8, 8), (4, 4), (1, 1)]
    # stored deepest first: embedding (8 -> 10, no fusion), stage 2 (8 -> 12), stage 1 (4 -> 6)
    assert [(a.conv1[0].in_channels, a.conv2[0].out_channels, a.att_conv is not None) for a in m.abfs] == \
           [(8, 10, False), (8, 12, True), (4, 6, True)]
    for k, abf in enumerate(m.abfs):
        set_bn(abf.conv1[1], seed=200 + 10 * k)
        set_bn(abf.conv2[1], seed=205 + 10 * k)
    B = 3
    s_feat = maps(RS, B, seed=1, relu=True)
    s_emb = randn(B, 8, seed=5).relu()
    t_pre = maps(RT, B, seed=11)
    t_emb = randn(B, 10, seed=15).relu()
    logits, y = randn(B, 10, seed=20), torch.tensor([2, 7, 0])
    m.start_epoch(30, 240)
    terms = m(Outputs(logits, features=s_feat, embedding=s_emb), Outputs(randn(B, 10, seed=21), preact=t_pre, embedding=t_emb), y)
    assert set(terms) == {"ce", "review"}

    emb_out, res = abf_ref(m.abfs[0], np64(s_emb)[:, :, None, None], None, (1, 1))
    out1, res = abf_ref(m.abfs[1], np64(s_feat[1]), res, (4, 4))
    out0, _ = abf_ref(m.abfs[2], np64(s_feat[0]), res, (8, 8))
    ref = hcl_ref([out0, out1, emb_out], [np64(t_pre[0]), np64(t_pre[1]), np64(t_emb)[:, :, None, None]])
    assert terms["review"].item() == pytest.approx(ref, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(ce_ref(logits, y), rel=1e-5)
    fused = m.fused(Outputs(logits, features=s_feat, embedding=s_emb))
    assert [tuple(f.shape) for f in fused] == [(B, 6, 8, 8), (B, 12, 4, 4), (B, 10, 1, 1)]


def test_reviewkd_shapes_heterogeneous_pairs():
    # a deeper, wider student with a 1280-wide embedding (mid capped at 512) and a smaller teacher
    s = info((24, 48, 96, 160), ((16, 16), (8, 8), (4, 4), (2, 2)), embed_dim=1280)
    t = info((64, 128, 256), ((32, 32), (16, 16), (8, 8)), embed_dim=256)
    m = reviewkd.ReviewKD(s, t)
    assert m.mid_channels == 512 and m.student_stages == [1, 2, 3] and m.teacher_stages == [0, 1, 2]
    assert [a.conv1[0].in_channels for a in m.abfs] == [1280, 160, 96, 48]
    assert [a.conv2[0].out_channels for a in m.abfs] == [256, 256, 128, 64]
    assert reviewkd.ReviewKD(s, t, max_mid_channels=64).mid_channels == 64
    small = reviewkd.ReviewKD(info((4, 8), ((4, 4), (2, 2)), embed_dim=6), info((6, 12, 24), ((16, 16), (8, 8), (4, 4)), embed_dim=24))
    assert small.mid_channels == 6 and small.teacher_stages == [1, 2]
    f = small.fused(Outputs(randn(2, 10, seed=1), features=maps(small.student_info, 2, seed=2, relu=True),
                            embedding=randn(2, 6, seed=3)))
    assert [tuple(x.shape) for x in f] == [(2, 12, 8, 8), (2, 24, 4, 4), (2, 24, 1, 1)]


def test_reviewkd_gradients_reach_abfs_and_student_only():
    m = reviewkd.ReviewKD(RS, RT)
    s_feat = maps(RS, 3, seed=1, relu=True, requires_grad=True)
    s_emb = randn(3, 8, seed=2, requires_grad=True)
    t_pre = maps(RT, 3, seed=3, requires_grad=True)
    t_emb = randn(3, 10, seed=4, requires_grad=True)
    with torch.inference_mode():
        t_logits = randn(3, 10, seed=5)
    terms = m(Outputs(randn(3, 10, seed=6, requires_grad=True), features=s_feat, embedding=s_emb),
              Outputs(t_logits, preact=t_pre, embedding=t_emb), torch.tensor([1, 2, 3]))
    terms["review"].backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in s_feat + [s_emb])
    assert all(f.grad is None for f in t_pre + [t_emb])


@pytest.mark.parametrize("epoch,factor", [(0, 1 / 20), (9, 0.5), (18, 19 / 20), (19, 1.0), (20, 1.0), (239, 1.0)])
def test_reviewkd_warmup_factor(epoch, factor):
    m = reviewkd.ReviewKD(RS, RT, w_review=2.0)
    m.start_epoch(epoch, 240)
    assert m.warmup_factor() == pytest.approx(factor)
    s = Outputs(randn(2, 10, seed=1), features=maps(RS, 2, seed=2, relu=True), embedding=randn(2, 8, seed=3))
    t = Outputs(randn(2, 10, seed=4), preact=maps(RT, 2, seed=5), embedding=randn(2, 10, seed=6))
    m.eval()  # BN running statistics: the review loss itself does not change between the calls
    raw = m.review_loss(s, t).item()
    assert m(s, t, torch.tensor([0, 1]))["review"].item() == pytest.approx(2.0 * factor * raw, rel=1e-6)


def test_reviewkd_no_warmup():
    m = reviewkd.ReviewKD(RS, RT, warmup_epochs=0)
    assert m.warmup_factor() == 1.0
    m5 = reviewkd.ReviewKD(RS, RT, warmup_epochs=5)
    m5.start_epoch(2, 10)
    assert m5.warmup_factor() == pytest.approx(3 / 5)


def test_reviewkd_pair_defaults():
    R = reviewkd.ReviewKD
    assert R.resolve_defaults("resnet56", "resnet20")["w_review"] == 0.6
    assert R.resolve_defaults("resnet56_cifar", "resnet20_cifar")["w_review"] == 0.6
    assert R.resolve_defaults("resnet110", "resnet32")["w_review"] == 1.0
    assert R.resolve_defaults("resnet32x4_cifar", "resnet8x4")["w_review"] == 5.0
    assert R.resolve_defaults("resnet32x4", "shufflenet_v2")["w_review"] == 8.0
    assert R.resolve_defaults("resnet32x4", "shufflenet_v1")["w_review"] == 5.0
    for s in ("wrn_16_2", "wrn_40_1", "shufflenet_v1"):
        assert R.resolve_defaults("wrn_40_2", s)["w_review"] == 5.0
    assert R.resolve_defaults("resnet110", "resnet20")["w_review"] == 1.0  # not a published pair
    assert R.resolve_defaults("vgg13", "vgg8") == R.defaults
    assert R.resolve_defaults("resnet56", "resnet20")["warmup_epochs"] == 20
    # every key names kdzoo models
    names = {"resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4",
             "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg13", "resnet50", "mobile_half",
             "shufflenet_v1", "shufflenet_v2"}
    assert all(t in names and s in names for t, s in R.pair_defaults)


def test_reviewkd_refusals():
    with pytest.raises(PairNotSupported, match="teacher's pre-activation"):
        reviewkd.ReviewKD(RS, dataclasses.replace(RT, has_preact=False))
    reviewkd.ReviewKD(dataclasses.replace(RS, has_preact=False), RT)  # the student's features are post-activation
    with pytest.raises(PairNotSupported, match="embedding width 0"):
        reviewkd.ReviewKD(dataclasses.replace(RS, embed_dim=0), RT)
    with pytest.raises(KDZooError, match="warmup_epochs must be >= 0"):
        reviewkd.ReviewKD(RS, RT, warmup_epochs=-1)
    with pytest.raises(KDZooError, match="max_mid_channels"):
        reviewkd.ReviewKD(RS, RT, max_mid_channels=0)
    m = reviewkd.ReviewKD(RS, RT)
    with pytest.raises(KDZooError, match="batches of 1"):
        m.validate_batch_size(1)
    m.validate_batch_size(2)
    with pytest.raises(KDZooError, match="preact"):
        m(Outputs(randn(2, 10, seed=1), features=maps(RS, 2, seed=2), embedding=randn(2, 8, seed=3)),
          Outputs(randn(2, 10, seed=4), features=maps(RT, 2, seed=5), embedding=randn(2, 10, seed=6)), torch.tensor([0, 1]))


# =========================================================================== kdzoo.testing.check_method

# OFD reads the teacher's BN: checked on real CIFAR nets (kdzoo's declare their pre-activations and
# get_bn_before_relu). ReviewKD is checked on the kit's synthetic pairs, which have pre-activations.
def test_ofd_check_method():
    import timm

    import kdzoo_plugins.cifar_nets  # noqa: F401  (registers the CIFAR nets into timm)

    check_method(ofd.OFD, nets={"resnet14 -> resnet8": (lambda: timm.create_model("resnet8_cifar", num_classes=10),
                                                         lambda: timm.create_model("resnet14_cifar", num_classes=10))})


def test_reviewkd_check_method():
    check_method(reviewkd.ReviewKD)
