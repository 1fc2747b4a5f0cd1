"""The four first-party distillation methods against independent hand computations.

References are written here with explicit loops, numpy and math in float64; they share no code
with the plugins. No model is trained; every tensor is tiny.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from kdzoo import KDZooError
from kdzoo.methods import Method
from kdzoo.models import NetInfo, Outputs
from kdzoo_plugins import attention, fitnets, kd, rkd


def info(channels, sizes, embed_dim=8, num_classes=10) -> NetInfo:
    return NetInfo(stage_channels=tuple(channels), stage_sizes=tuple(tuple(s) for s in sizes),
                   embed_dim=embed_dim, num_classes=num_classes)


def randn(*shape, seed, requires_grad=False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_(requires_grad)


def feats(net: NetInfo, batch, seed, requires_grad=False, relu=True) -> list[torch.Tensor]:
    out = []
    for i, (c, (h, w)) in enumerate(zip(net.stage_channels, net.stage_sizes)):
        f = randn(batch, c, h, w, seed=seed + i)
        f = f.relu() if relu else f  # stage outputs are post-activation
        out.append(f.detach().requires_grad_(requires_grad))
    return out


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def softmax_np(z: np.ndarray) -> np.ndarray:
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()


def ce_ref(logits: torch.Tensor, labels: torch.Tensor) -> float:
    z, y = np64(logits), labels.numpy()
    return float(np.mean([-math.log(softmax_np(z[b])[y[b]]) for b in range(len(y))]))


def smooth_l1_ref(a: list[float], b: list[float]) -> float:
    tot = 0.0
    for x, y in zip(a, b):
        d = abs(x - y)
        tot += 0.5 * d * d if d < 1 else d - 0.5
    return tot / len(a)


def total(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(terms.values())


S3 = info((4, 8, 16), ((8, 8), (4, 4), (2, 2)))
T3 = info((6, 12, 24), ((8, 8), (4, 4), (2, 2)), embed_dim=12)


# --------------------------------------------------------------------------- kd

SEED_LOGITS = [1.2, 0.8, 0.5, 0.3, 0.2, 0.1, 0.05, 0.03, 0.02, 0.01]


def test_seed_article_soft_targets_at_T2():
    p = kd.soft_targets(torch.tensor(SEED_LOGITS), 2.0)
    expected = [0.152, 0.125, 0.107, 0.097, 0.092, 0.088, 0.086, 0.085, 0.084, 0.084]
    assert [round(v, 3) for v in p.tolist()] == expected
    assert p.sum().item() == pytest.approx(1.0, abs=1e-6)
    # the article's printed values are wrong; kdzoo must not reproduce them
    for wrong, got in zip([0.35, 0.24, 0.16], p.tolist()):
        assert abs(got - wrong) > 0.05
    # and they are not what a softmax at T=1 gives either (checked by hand in float64)
    t1 = softmax_np(np.array(SEED_LOGITS))
    assert round(float(t1[0]), 2) != 0.35


def test_soft_targets_batched_by_hand():
    z = randn(3, 10, seed=1)
    p = kd.soft_targets(z, 4.0)
    for b in range(3):
        ref = softmax_np(np64(z[b]) / 4.0)
        np.testing.assert_allclose(p[b].numpy(), ref, rtol=1e-6, atol=1e-7)


def kd_ref(s: torch.Tensor, t: torch.Tensor, T: float) -> float:
    s64, t64 = np64(s), np64(t)
    kl = 0.0
    for b in range(len(s64)):
        p_t, p_s = softmax_np(t64[b] / T), softmax_np(s64[b] / T)
        kl += sum(p_t[c] * (math.log(p_t[c]) - math.log(p_s[c])) for c in range(len(p_t)))
    return kl / len(s64) * T * T


@pytest.mark.parametrize("T", [4.0, 2.0, 1.0])
def test_kd_loss_against_hand_kl(T):
    s, t = randn(6, 10, seed=2) * 3, randn(6, 10, seed=3) * 3
    y = torch.tensor([0, 1, 2, 3, 4, 9])
    m = kd.KD(S3, T3, T=T) if T != 4.0 else kd.KD(S3, T3)
    terms = m(Outputs(logits=s), Outputs(logits=t), y)
    assert set(terms) == {"ce", "kd"}
    assert terms["kd"].dtype == torch.float32 and terms["kd"].dim() == 0
    assert terms["kd"].item() == pytest.approx(0.9 * kd_ref(s, t, T), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(0.1 * ce_ref(s, y), rel=1e-5)


def test_kd_T_override_changes_loss_as_expected():
    s, t = randn(4, 10, seed=4) * 2, randn(4, 10, seed=5) * 2
    y = torch.tensor([1, 2, 3, 4])
    l4 = kd.KD(S3, T3)(Outputs(s), Outputs(t), y)["kd"].item()
    l2 = kd.KD(S3, T3, T=2)(Outputs(s), Outputs(t), y)["kd"].item()  # an int is accepted for a float
    assert l2 == pytest.approx(0.9 * kd_ref(s, t, 2.0), rel=1e-5)
    assert l4 == pytest.approx(0.9 * kd_ref(s, t, 4.0), rel=1e-5)
    assert abs(l2 - l4) > 1e-3
    # weights are explicit: w_ce = alpha, w_kd = 1 - alpha with the seed article's alpha = 0.3
    m = kd.KD(S3, T3, w_ce=0.3, w_kd=0.7)
    terms = m(Outputs(s), Outputs(t), y)
    assert terms["kd"].item() == pytest.approx(0.7 * kd_ref(s, t, 4.0), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(0.3 * ce_ref(s, y), rel=1e-5)


def test_kd_identical_logits_give_zero_kd():
    s = randn(4, 10, seed=6)
    terms = kd.KD(S3, T3)(Outputs(s), Outputs(s.clone()), torch.zeros(4, dtype=torch.long))
    assert abs(terms["kd"].item()) < 1e-6


def test_hparam_errors():
    with pytest.raises(KDZooError, match="Did you mean 'w_kd'"):
        kd.KD(S3, T3, w_kdd=0.5)
    with pytest.raises(KDZooError, match="no hyperparameter 'alpha'"):
        kd.KD(S3, T3, alpha=0.5)
    with pytest.raises(KDZooError, match="must be float"):
        kd.KD(S3, T3, T="hot")
    with pytest.raises(KDZooError, match="must be int"):
        fitnets.FitNets(S3, T3, hint_stage=2.5)
    with pytest.raises(KDZooError, match="must be int"):
        rkd.RKD(S3, T3, angle_max_batch=True)
    with pytest.raises(KDZooError, match="T > 0"):
        kd.KD(S3, T3, T=0.0)
    with pytest.raises(KDZooError, match="p > 0"):
        attention.Attention(S3, T3, p=-1.0)
    with pytest.raises(KDZooError, match="teacher"):
        kd.KD(S3, None)


def test_kd_float32_under_autocast():
    s = randn(4, 10, seed=7).bfloat16()
    t = randn(4, 10, seed=8).bfloat16()
    y = torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = kd.KD(S3, T3)(Outputs(s), Outputs(t), y)
    assert terms["kd"].dtype == torch.float32
    assert terms["kd"].item() == pytest.approx(0.9 * kd_ref(s.float(), t.float(), 4.0), rel=1e-5)


# --------------------------------------------------------------------------- fitnets

# (student sizes, teacher sizes) with no shared size, so stages align from the last one and
# student stage 2 meets teacher stage 2.
REG_CASES = {
    "same": (((8, 8), (4, 4)), ((8, 8), (4, 4)), nn.Conv2d, (1, 1), (1, 1), (0, 0)),
    "double": (((12, 12), (8, 8)), ((6, 6), (4, 4)), nn.Conv2d, (3, 3), (2, 2), (1, 1)),
    "half": (((6, 6), (2, 2)), ((8, 8), (4, 4)), nn.ConvTranspose2d, (4, 4), (2, 2), (1, 1)),
    "valid": (((12, 12), (6, 6)), ((8, 8), (4, 4)), nn.Conv2d, (3, 3), (1, 1), (0, 0)),
    "valid_rect": (((12, 12), (6, 5)), ((8, 8), (4, 4)), nn.Conv2d, (3, 2), (1, 1), (0, 0)),
}


@pytest.mark.parametrize("case", list(REG_CASES))
def test_fitnets_regressor_selection_and_loss(case):
    s_sizes, t_sizes, conv_cls, kernel, stride, padding = REG_CASES[case]
    s_info, t_info = info((3, 5), s_sizes), info((4, 7), t_sizes)
    m = fitnets.FitNets(s_info, t_info)
    assert (m.student_index, m.teacher_index) == (1, 1)
    conv, bn, act = m.regressor
    assert type(conv) is conv_cls and isinstance(bn, nn.BatchNorm2d) and isinstance(act, nn.ReLU)
    assert (conv.in_channels, conv.out_channels) == (5, 7) and bn.num_features == 7
    assert conv.kernel_size == kernel and conv.stride == stride and conv.padding == padding
    # the regressor trains with the student and is checkpointed with the method
    assert {id(p) for p in m.regressor.parameters()} <= {id(p) for p in m.parameters()}
    assert "regressor.0.weight" in m.state_dict()

    sf, tf = feats(s_info, 3, seed=10), feats(t_info, 3, seed=20)
    r = m.regressor(sf[1])
    assert tuple(r.shape) == (3, 7, *t_sizes[1])
    logits, y = randn(3, 10, seed=30), torch.tensor([0, 5, 9])
    terms = m(Outputs(logits, features=sf), Outputs(randn(3, 10, seed=31), features=tf), y)
    assert set(terms) == {"ce", "hint"}
    mse = float(np.mean((np64(r) - np64(tf[1])) ** 2))
    assert terms["hint"].item() == pytest.approx(100.0 * mse, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(ce_ref(logits, y), rel=1e-5)


def test_fitnets_1x1_regressor_by_hand():
    """Conv 1x1 -> BatchNorm (train mode, batch statistics) -> ReLU, recomputed in numpy."""
    m = fitnets.FitNets(S3, T3, hint_stage=3)
    sf, tf = feats(S3, 4, seed=40), feats(T3, 4, seed=50)
    conv, bn, _ = m.regressor
    with torch.no_grad():
        bn.weight.copy_(randn(24, seed=60))
        bn.bias.copy_(randn(24, seed=61))
    x = np64(sf[2])  # (4, 16, 2, 2)
    W, b = np64(conv.weight)[:, :, 0, 0], np64(conv.bias)
    y = np.einsum("oc,bchw->bohw", W, x) + b[None, :, None, None]
    mean = y.mean(axis=(0, 2, 3), keepdims=True)
    var = y.var(axis=(0, 2, 3), keepdims=True)  # biased, as BatchNorm normalises with
    y = (y - mean) / np.sqrt(var + bn.eps) * np64(bn.weight)[None, :, None, None] + np64(bn.bias)[None, :, None, None]
    y = np.maximum(y, 0)
    mse = np.mean((y - np64(tf[2])) ** 2)
    hint = m(Outputs(randn(4, 10, seed=1), features=sf), Outputs(randn(4, 10, seed=2), features=tf), torch.zeros(4, dtype=torch.long))["hint"]
    assert hint.item() == pytest.approx(100.0 * mse, rel=1e-5)


def test_fitnets_default_hint_stage_pairs_by_size():
    s_info = info((4, 8, 16), ((16, 16), (8, 8), (4, 4)))
    t_info = info((8, 16), ((8, 8), (4, 4)))
    m = fitnets.FitNets(s_info, t_info)  # student stage 2 (8x8) <-> teacher stage 1 (8x8)
    assert (m.student_index, m.teacher_index) == (1, 0)
    assert m.regressor[0].kernel_size == (1, 1) and m.regressor[0].out_channels == 8


def test_fitnets_errors():
    with pytest.raises(KDZooError, match="hint_stage=0 is out of range.*3 stages"):
        fitnets.FitNets(S3, T3, hint_stage=0)
    with pytest.raises(KDZooError, match="hint_stage=4 is out of range"):
        fitnets.FitNets(S3, T3, hint_stage=4)
    with pytest.raises(KDZooError, match="hint_epochs"):
        fitnets.FitNets(S3, T3, hint_epochs=-1)
    # student 6x6 is not shared with the teacher, and other sizes are: no pairing for stage 2
    s_info = info((4, 8, 16), ((8, 8), (6, 6), (4, 4)))
    t_info = info((8, 16), ((8, 8), (4, 4)))
    with pytest.raises(KDZooError, match=r"no paired teacher stage.*\(6, 6\).*\(8, 8\), \(4, 4\)\]") as e:
        fitnets.FitNets(s_info, t_info)
    assert "spatial size" in str(e.value) and "last stage" in str(e.value)
    # impossible regressor: student 3x3 into teacher 5x5
    with pytest.raises(KDZooError, match="3x3 to a teacher map of 5x5"):
        fitnets.FitNets(info((4, 8), ((6, 6), (3, 3))), info((4, 8), ((10, 10), (5, 5))))
    with pytest.raises(KDZooError, match="regressor"):
        fitnets.make_regressor(4, (4, 6), 4, (5, 5))


def test_fitnets_shape_mismatch_is_reported():
    m = fitnets.FitNets(S3, T3)
    sf, tf = feats(S3, 2, seed=1), feats(T3, 2, seed=2)
    tf[1] = tf[1][:, :, :2, :2]
    with pytest.raises(KDZooError, match="NetInfo"):
        m(Outputs(randn(2, 10, seed=3), features=sf), Outputs(randn(2, 10, seed=4), features=tf), torch.zeros(2, dtype=torch.long))


def test_fitnets_hint_epochs_two_stage():
    m = fitnets.FitNets(S3, T3, hint_epochs=2, w_hint=3.0)
    sf, tf = feats(S3, 3, seed=70), feats(T3, 3, seed=80)
    s, t, y = Outputs(randn(3, 10, seed=1), features=sf), Outputs(randn(3, 10, seed=2), features=tf), torch.tensor([1, 2, 3])
    for epoch in (0, 1):
        m.start_epoch(epoch, 5)
        first = m(s, t, y)
        assert set(first) == {"ce", "hint"} and first["ce"].item() == 0.0
    m.start_epoch(2, 5)
    second = m(s, t, y)
    assert set(second) == {"ce", "hint"}
    r = m.regressor(sf[1])
    assert second["hint"].item() == pytest.approx(3.0 * float(np.mean((np64(r) - np64(tf[1])) ** 2)), rel=1e-5)
    assert first["hint"].item() == pytest.approx(second["hint"].item(), rel=1e-6)
    # default: single stage from epoch 0
    d = fitnets.FitNets(S3, T3)
    assert set(d(s, t, y)) == {"ce", "hint"}


# --------------------------------------------------------------------------- attention

def at_map_ref(f: np.ndarray, p: float) -> np.ndarray:
    """Per-sample loop: mean over channels of f^p, flattened, divided by its L2 norm."""
    B, C, H, W = f.shape
    out = np.zeros((B, H * W))
    for b in range(B):
        a = [sum(f[b, c, h, w] ** p for c in range(C)) / C for h in range(H) for w in range(W)]
        norm = math.sqrt(sum(v * v for v in a))
        out[b] = np.array(a) / max(norm, 1e-12)
    return out


def block_pool_ref(f: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Average pooling over equal blocks (what adaptive pooling does when sizes divide)."""
    B, C, H, W = f.shape
    kh, kw = H // size[0], W // size[1]
    assert kh * size[0] == H and kw * size[1] == W
    return f.reshape(B, C, size[0], kh, size[1], kw).mean(axis=(3, 5))


def at_ref(fs: list[np.ndarray], ft: list[np.ndarray], pairs: list[tuple[int, int]], p: float) -> float:
    tot = 0.0
    for ti, si in pairs:
        a, b = fs[si], ft[ti]
        size = (min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3]))
        if a.shape[2:] != size:
            a = block_pool_ref(a, size)
        if b.shape[2:] != size:
            b = block_pool_ref(b, size)
        tot += float(np.mean((at_map_ref(a, p) - at_map_ref(b, p)) ** 2))
    return tot


@pytest.mark.parametrize("p", [2.0, 1.0])
def test_attention_same_sizes_against_loops(p):
    m = attention.Attention(S3, T3, p=p) if p != 2.0 else attention.Attention(S3, T3)
    assert m.pairs == [(0, 0), (1, 1), (2, 2)]
    sf, tf = feats(S3, 3, seed=90), feats(T3, 3, seed=100)
    logits, y = randn(3, 10, seed=5), torch.tensor([3, 1, 4])
    terms = m(Outputs(logits, features=sf), Outputs(randn(3, 10, seed=6), features=tf), y)
    assert set(terms) == {"ce", "at"}
    ref = at_ref([np64(f) for f in sf], [np64(f) for f in tf], [(0, 0), (1, 1), (2, 2)], p)
    assert terms["at"].item() == pytest.approx(1000.0 * ref, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(ce_ref(logits, y), rel=1e-5)


def test_attention_different_sizes_pools_larger_map():
    # no shared size: aligned from the last stage; pair 0 pools the student (16->8), pair 1 the teacher (4->2)
    s_info = info((4, 8, 16), ((32, 32), (16, 16), (2, 2)))
    t_info = info((6, 10), ((8, 8), (4, 4)))
    m = attention.Attention(s_info, t_info)
    assert m.pairs == [(0, 1), (1, 2)]
    sf, tf = feats(s_info, 2, seed=110), feats(t_info, 2, seed=120)
    terms = m(Outputs(randn(2, 10, seed=1), features=sf), Outputs(randn(2, 10, seed=2), features=tf), torch.tensor([0, 1]))
    ref = at_ref([np64(f) for f in sf], [np64(f) for f in tf], [(0, 1), (1, 2)], 2.0)
    assert terms["at"].item() == pytest.approx(1000.0 * ref, rel=1e-5)
    # a partly shared size set pairs only equal sizes
    m2 = attention.Attention(info((4, 8, 16), ((16, 16), (8, 8), (4, 4))), info((8, 16), ((8, 8), (4, 4))))
    assert m2.pairs == [(0, 1), (1, 2)]


def test_attention_float32_under_autocast():
    sf = [f.bfloat16() for f in feats(S3, 2, seed=130)]
    tf = [f.bfloat16() for f in feats(T3, 2, seed=140)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        at = attention.Attention(S3, T3)(Outputs(randn(2, 10, seed=1), features=sf), Outputs(randn(2, 10, seed=2), features=tf), torch.tensor([0, 1]))["at"]
    assert at.dtype == torch.float32
    ref = at_ref([np64(f.float()) for f in sf], [np64(f.float()) for f in tf], [(0, 0), (1, 1), (2, 2)], 2.0)
    assert at.item() == pytest.approx(1000.0 * ref, rel=1e-5)


# --------------------------------------------------------------------------- rkd

def rkd_dist_ref(e: np.ndarray) -> list[float]:
    B = len(e)
    d = [[math.sqrt(sum((e[i, k] - e[j, k]) ** 2 for k in range(e.shape[1]))) if i != j else 0.0 for j in range(B)] for i in range(B)]
    pos = [d[i][j] for i in range(B) for j in range(B) if d[i][j] > 0]
    mean = sum(pos) / len(pos)
    return [d[i][j] / mean for i in range(B) for j in range(B)]


def rkd_angle_ref(e: np.ndarray) -> list[float]:
    B = len(e)

    def unit(v):
        n = math.sqrt(float(v @ v))
        return v / n if n > 0 else v * 0

    out = []
    for i in range(B):
        for j in range(B):
            for k in range(B):
                out.append(float(unit(e[j] - e[i]) @ unit(e[k] - e[i])))
    return out


@pytest.mark.parametrize("widths", [(8, 8), (5, 12)])
def test_rkd_against_loops(widths):
    ds, dt = widths
    s_info, t_info = info((4,), ((4, 4),), embed_dim=ds), info((4,), ((4, 4),), embed_dim=dt)
    es, et = randn(6, ds, seed=150), randn(6, dt, seed=151) * 2
    logits, y = randn(6, 10, seed=152), torch.tensor([0, 1, 2, 3, 4, 5])
    m = rkd.RKD(s_info, t_info)
    terms = m(Outputs(logits, embedding=es), Outputs(randn(6, 10, seed=153), embedding=et), y)
    assert set(terms) == {"ce", "dist", "angle"}
    dist = smooth_l1_ref(rkd_dist_ref(np64(es)), rkd_dist_ref(np64(et)))
    angle = smooth_l1_ref(rkd_angle_ref(np64(es)), rkd_angle_ref(np64(et)))
    assert terms["dist"].item() == pytest.approx(25.0 * dist, rel=1e-4)
    assert terms["angle"].item() == pytest.approx(50.0 * angle, rel=1e-4)
    assert terms["ce"].item() == pytest.approx(ce_ref(logits, y), rel=1e-5)


def test_rkd_smooth_l1_quadratic_and_linear_regions():
    # scaled embeddings have the same normalised distances and angles: the loss is exactly zero
    es = randn(5, 4, seed=160)
    out = rkd.RKD(S3, T3)(Outputs(randn(5, 10, seed=1), embedding=es), Outputs(randn(5, 10, seed=2), embedding=3 * es), torch.zeros(5, dtype=torch.long))
    assert out["dist"].item() < 1e-5 and out["angle"].item() < 1e-5
    # one far outlier in the student pushes some normalised differences past 1 (linear region)
    es2 = es.clone()
    es2[0] += 40
    out = rkd.RKD(S3, T3)(Outputs(randn(5, 10, seed=1), embedding=es2), Outputs(randn(5, 10, seed=2), embedding=es), torch.zeros(5, dtype=torch.long))
    a, b = rkd_dist_ref(np64(es2)), rkd_dist_ref(np64(es))
    assert max(abs(x - y) for x, y in zip(a, b)) > 1
    assert out["dist"].item() == pytest.approx(25.0 * smooth_l1_ref(a, b), rel=1e-4)


def test_rkd_angle_guard_and_zero_weights():
    es, et = randn(5, 4, seed=170), randn(5, 6, seed=171)
    s, t, y = Outputs(randn(5, 10, seed=1), embedding=es), Outputs(randn(5, 10, seed=2), embedding=et), torch.zeros(5, dtype=torch.long)
    with pytest.raises(KDZooError, match=r"batch of 5 exceeds angle_max_batch=4.*B\^3.*smaller batch.*w_angle=0"):
        rkd.RKD(S3, T3, angle_max_batch=4)(s, t, y)
    no_angle = rkd.RKD(S3, T3, angle_max_batch=4, w_angle=0.0)(s, t, y)
    assert set(no_angle) == {"ce", "dist"}
    assert no_angle["dist"].item() == pytest.approx(25.0 * smooth_l1_ref(rkd_dist_ref(np64(es)), rkd_dist_ref(np64(et))), rel=1e-4)
    assert set(rkd.RKD(S3, T3, w_dist=0.0)(s, t, y)) == {"ce", "angle"}
    with pytest.raises(KDZooError, match="angle_max_batch"):
        rkd.RKD(S3, T3, angle_max_batch=0)


def test_rkd_batch_of_one_gives_zero_relational_terms():
    out = rkd.RKD(S3, T3)(Outputs(randn(1, 10, seed=1), embedding=randn(1, 4, seed=2)), Outputs(randn(1, 10, seed=3), embedding=randn(1, 6, seed=4)), torch.zeros(1, dtype=torch.long))
    assert out["dist"].item() == 0.0 and out["angle"].item() == 0.0


def test_rkd_float32_under_autocast():
    es, et = randn(6, 16, seed=180).bfloat16(), randn(6, 16, seed=181).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rkd.RKD(S3, T3)(Outputs(randn(6, 10, seed=1), embedding=es), Outputs(randn(6, 10, seed=2), embedding=et), torch.zeros(6, dtype=torch.long))
    assert out["dist"].dtype == torch.float32 and out["angle"].dtype == torch.float32
    a, b = np64(es.float()), np64(et.float())
    assert out["dist"].item() == pytest.approx(25.0 * smooth_l1_ref(rkd_dist_ref(a), rkd_dist_ref(b)), rel=1e-4)
    assert out["angle"].item() == pytest.approx(50.0 * smooth_l1_ref(rkd_angle_ref(a), rkd_angle_ref(b)), rel=1e-4)


# --------------------------------------------------------------------------- all methods

def make_case(name: str, teacher_grad: bool, inference_teacher: bool = False):
    """A method with student outputs that require grad and teacher outputs as asked."""
    s_info = info((4, 8, 16), ((8, 8), (4, 4), (2, 2)), embed_dim=5)
    t_info = info((6, 12), ((4, 4), (2, 2)), embed_dim=7)  # fewer stages, different widths
    cls = {"kd": kd.KD, "fitnets": fitnets.FitNets, "attention": attention.Attention, "rkd": rkd.RKD}[name]
    m = cls(s_info, t_info)
    s = Outputs(randn(4, 10, seed=200, requires_grad=True), features=feats(s_info, 4, 210, requires_grad=True),
                embedding=randn(4, 5, seed=220, requires_grad=True))

    def teacher():
        return Outputs(randn(4, 10, seed=230, requires_grad=teacher_grad), features=feats(t_info, 4, 240, requires_grad=teacher_grad),
                       embedding=randn(4, 7, seed=250, requires_grad=teacher_grad))

    if inference_teacher:
        with torch.inference_mode():
            t = teacher()
    else:
        t = teacher()
    return m, s, t, torch.tensor([0, 3, 6, 9])


def used_student_tensors(name: str, s: Outputs) -> list[torch.Tensor]:
    return {
        "kd": [s.logits],
        "fitnets": [s.logits, s.features[1]],  # hint_stage 2 (4x4) pairs with teacher stage 1 (4x4)
        "attention": [s.logits, s.features[1], s.features[2]],  # the two stages the teacher shares
        "rkd": [s.logits, s.embedding],
    }[name]


@pytest.mark.parametrize("name", ["kd", "fitnets", "attention", "rkd"])
def test_gradients_reach_student_and_never_teacher(name):
    m, s, t, y = make_case(name, teacher_grad=True)
    terms = m(s, t, y)
    assert all(v.dim() == 0 and torch.isfinite(v) for v in terms.values())
    total(terms).backward()
    for x in used_student_tensors(name, s):
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for x in [t.logits, t.embedding, *t.features]:
        assert x.grad is None or not x.grad.any()
    for p in m.parameters():  # the FitNets regressor
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    if name == "fitnets":
        assert len(list(m.parameters())) == 4  # conv weight, bias; BN weight, bias
        assert s.features[0].grad is None and s.features[2].grad is None
    else:
        assert not list(m.parameters())


@pytest.mark.parametrize("name", ["kd", "fitnets", "attention", "rkd"])
def test_teacher_outputs_from_inference_mode_are_usable(name):
    m, s, t, y = make_case(name, teacher_grad=False, inference_teacher=True)
    ref_m, ref_s, ref_t, _ = make_case(name, teacher_grad=False)
    if name == "fitnets":
        ref_m.load_state_dict(m.state_dict())
    got, want = m(s, t, y), ref_m(ref_s, ref_t, y)
    total(got).backward()
    assert got.keys() == want.keys()
    for k in got:
        assert got[k].item() == pytest.approx(want[k].item(), rel=1e-6)


@pytest.mark.parametrize("module, cls, name, defaults, needs", [
    (kd, kd.KD, "kd", {"w_ce": 0.1, "w_kd": 0.9, "T": 4.0, "logit_std": False}, (False, False)),
    (fitnets, fitnets.FitNets, "fitnets", {"w_ce": 1.0, "w_hint": 100.0, "hint_stage": 2, "hint_epochs": 0}, (True, False)),
    (attention, attention.Attention, "attention", {"w_ce": 1.0, "w_at": 1000.0, "p": 2.0}, (True, False)),
    (rkd, rkd.RKD, "rkd", {"w_ce": 1.0, "w_dist": 25.0, "w_angle": 50.0, "angle_max_batch": 512}, (False, True)),
])
def test_registration_and_declarations(module, cls, name, defaults, needs):
    got = []
    module.register_methods(lambda c, n=None: got.append((c, n)))
    assert got == [(cls, None)]
    assert issubclass(cls, Method) and cls.name == name and cls.needs_teacher
    assert (cls.needs_features, cls.needs_embedding) == needs
    assert cls.defaults == defaults and type(cls.defaults[next(iter(defaults))]) is float
    assert all(type(cls.defaults[k]) is type(v) for k, v in defaults.items())
    assert "alpha" not in cls.defaults
    assert cls.reference
    m = cls(S3, T3)
    assert m.hparams == defaults and all(getattr(m, k) == v for k, v in defaults.items())


# --------------------------------------------------------------------------- hyperparameter checks


@pytest.mark.parametrize("cls, key", [(kd.KD, "w_kd"), (kd.KD, "w_ce"), (fitnets.FitNets, "w_hint"),
                                      (rkd.RKD, "w_angle")])
def test_negative_loss_weights_are_refused(cls, key):
    with pytest.raises(KDZooError, match=rf"Loss weight '{key}' of method '{cls.name}' is -1, but loss weights "
                                         rf"must be >= 0.*maximise the '{key[2:]}' term"):
        cls(S3, T3, **{key: -1})
    assert cls(S3, T3, **{key: 0.0}).hparams[key] == 0.0  # 0 switches a term off


def test_signed_weights_declares_weights_that_may_be_negative():
    class Contrast(Method):
        name = "contrast"
        needs_teacher = False
        defaults = {"w_ce": 1.0, "w_push": -0.5}
        signed_weights = frozenset({"w_push"})

    assert Contrast(S3, w_push=-2.0).w_push == -2.0
    with pytest.raises(KDZooError, match="Loss weight 'w_ce'"):
        Contrast(S3, w_ce=-1.0)  # only the declared weight may be negative


@pytest.mark.parametrize("overrides, key", [({"T": math.inf}, "T"), ({"w_kd": math.nan}, "w_kd"),
                                            ({"w_ce": -math.inf}, "w_ce")])
def test_non_finite_hyperparameters_are_refused(overrides, key):
    with pytest.raises(KDZooError, match=rf"Hyperparameter '{key}' of method 'kd' must be a finite number, "
                                         r"got -?(inf|nan)"):
        kd.KD(S3, T3, **overrides)


def test_unknown_hyperparameters_are_suggested_by_meaning():
    for alias in ("temperature", "Temperature", "tau"):
        with pytest.raises(KDZooError, match=rf"no hyperparameter '{alias}'\. Did you mean 'T'\?"):
            kd.KD(S3, T3, **{alias: 4})
    with pytest.raises(KDZooError) as e:
        kd.KD(S3, T3, alpha=0.1)
    assert "never uses a bare 'alpha'" in str(e.value) and "w_ce = alpha, w_kd = 1 - alpha" in str(e.value)
    with pytest.raises(KDZooError, match=r"bare 'beta'.*w_ce, w_hint"):
        fitnets.FitNets(S3, T3, beta=1.0)
    with pytest.raises(KDZooError, match="Did you mean 'p'"):
        attention.Attention(S3, T3, pp=2.0)  # spelling suggestions still work


def test_rkd_refuses_batch_sizes_it_cannot_learn_from():
    method = rkd.RKD(S3, T3)
    for b in (1, 2):
        with pytest.raises(KDZooError, match=rf"'rkd' cannot learn from batches of {b} image.*zero.*at least 3"):
            method.validate_batch_size(b)
    method.validate_batch_size(3)
    method.validate_batch_size(512)
    with pytest.raises(KDZooError, match="a batch of 513 exceeds angle_max_batch=512"):
        method.validate_batch_size(513)
    rkd.RKD(S3, T3, w_angle=0.0).validate_batch_size(4096)  # no angle term: no cubic memory
    rkd.RKD(S3, T3, w_dist=0.0, w_angle=0.0).validate_batch_size(1)  # plain CE learns from any batch
    # at 2 the relational terms really are zero (up to rounding): refusing them loses nothing
    s = Outputs(randn(2, 10, seed=1), embedding=randn(2, 4, seed=2))
    t = Outputs(randn(2, 10, seed=3), embedding=randn(2, 6, seed=4))
    out = rkd.RKD(S3, T3)(s, t, torch.zeros(2, dtype=torch.long))
    assert abs(out["dist"].item()) < 1e-9 and abs(out["angle"].item()) < 1e-9
