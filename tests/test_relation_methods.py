"""sp, cc, pkt (relation) and vid, nst, kdsvd (features) against independent hand computations.

Each reference is written here from the reference code's formula (RepDistiller distiller_zoo/SP.py,
CC.py, PKT.py, VID.py, NST.py, KDSVD.py), with loops and numpy in float64; it shares no code with
the plugins (the only thing read from a method is its own learned parameters). No model is
trained; every tensor is tiny.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdzoo import KDZooError
from kdzoo.methods import Method, PairNotSupported
from kdzoo.models import NetInfo, Outputs
from kdzoo.testing import NETINFO_PAIRS, check_method
from kdzoo_plugins import cc, kdsvd, nst, pkt, sp, vid


def info(channels, sizes, embed_dim=8, num_classes=10) -> NetInfo:
    return NetInfo(stage_channels=tuple(channels), stage_sizes=tuple(tuple(s) for s in sizes),
                   embed_dim=embed_dim, num_classes=num_classes)


def randn(*shape, seed, requires_grad=False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_(requires_grad)


def feats(net: NetInfo, batch, seed, requires_grad=False) -> list[torch.Tensor]:
    """Post-ReLU stage outputs shaped as ``net`` says."""
    return [randn(batch, c, h, w, seed=seed + i).relu().detach().requires_grad_(requires_grad)
            for i, (c, (h, w)) in enumerate(zip(net.stage_channels, net.stage_sizes))]


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def ce_ref(logits: torch.Tensor, labels: torch.Tensor) -> float:
    z, y = np64(logits), labels.numpy()
    tot = 0.0
    for b in range(len(y)):
        m = max(z[b])
        tot += -(z[b][y[b]] - m - math.log(sum(math.exp(v - m) for v in z[b])))
    return tot / len(y)


def block_pool_ref(f: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Average over equal blocks (what adaptive pooling does when the sizes divide)."""
    B, C, H, W = f.shape
    kh, kw = H // size[0], W // size[1]
    assert kh * size[0] == H and kw * size[1] == W
    out = np.zeros((B, C) + tuple(size))
    for i in range(size[0]):
        for j in range(size[1]):
            out[:, :, i, j] = f[:, :, i * kh:(i + 1) * kh, j * kw:(j + 1) * kw].mean(axis=(2, 3))
    return out


def pool_pair_ref(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    size = (min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3]))
    if a.shape[2:] != size:
        a = block_pool_ref(a, size)
    if b.shape[2:] != size:
        b = block_pool_ref(b, size)
    return a, b


def total(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(terms.values())


LABELS = torch.tensor([0, 3, 6, 9, 2])
S3 = info((4, 8, 16), ((8, 8), (4, 4), (2, 2)), embed_dim=5)
T3 = info((6, 12, 24), ((8, 8), (4, 4), (2, 2)), embed_dim=7)
# no shared spatial size: stages align from the last; pair 0 pools the teacher (16 -> 8), pair 1 the student (4 -> 2)
S2 = info((4, 8), ((8, 8), (4, 4)), embed_dim=5)
T2 = info((6, 10), ((16, 16), (2, 2)), embed_dim=7)


def outputs(net: NetInfo, batch: int, seed: int, requires_grad: bool = False) -> Outputs:
    return Outputs(logits=randn(batch, net.num_classes, seed=seed, requires_grad=requires_grad),
                   features=feats(net, batch, seed + 10, requires_grad=requires_grad),
                   embedding=randn(batch, net.embed_dim, seed=seed + 20).relu().detach().requires_grad_(requires_grad))


# --------------------------------------------------------------------------- sp

def sp_ref(fs: np.ndarray, ft: np.ndarray) -> float:
    B = len(fs)

    def gram(f):
        f = f.reshape(B, -1)
        g = [[float(sum(f[i, k] * f[j, k] for k in range(f.shape[1]))) for j in range(B)] for i in range(B)]
        return [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in g]

    gs, gt = gram(fs), gram(ft)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(B) for j in range(B)) / (B * B)


@pytest.mark.parametrize("s_info, t_info", [(S3, T3), (S2, T2)], ids=["same sizes", "other widths and sizes"])
def test_sp_against_loops(s_info, t_info):
    s, t = outputs(s_info, 5, seed=1), outputs(t_info, 5, seed=2)
    terms = sp.SP(s_info, t_info)(s, t, LABELS)
    assert set(terms) == {"ce", "sp"}
    ref = sp_ref(np64(s.features[-1]), np64(t.features[-1]))
    assert ref > 1e-4  # a real difference, not a vacuous match
    assert terms["sp"].item() == pytest.approx(3000.0 * ref, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(ce_ref(s.logits, LABELS), rel=1e-5)
    # only the last stage matters
    s.features[0] = s.features[0] * 0 + 1
    assert sp.SP(s_info, t_info)(s, t, LABELS)["sp"].item() == pytest.approx(terms["sp"].item(), rel=1e-6)


def test_sp_is_zero_for_scaled_features_and_refuses_batch_of_one():
    f = randn(4, 6, 2, 2, seed=3).relu()
    out = sp.SP(S3, T3)(Outputs(randn(4, 10, seed=4), features=[f]), Outputs(randn(4, 10, seed=5), features=[3 * f]), LABELS[:4])
    assert abs(out["sp"].item()) < 1e-8
    with pytest.raises(KDZooError, match=r"'sp' cannot learn from batches of 1 image.*at least 2"):
        sp.SP(S3, T3).validate_batch_size(1)
    sp.SP(S3, T3).validate_batch_size(2)
    sp.SP(S3, T3, w_sp=0.0).validate_batch_size(1)


# --------------------------------------------------------------------------- cc

def linear_ref(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([[sum(w[o, i] * x[n, i] for i in range(x.shape[1])) + b[o] for o in range(w.shape[0])]
                     for n in range(x.shape[0])])


def cc_ref(es: np.ndarray, et: np.ndarray) -> float:
    d = np.abs(es - et)
    B = len(d)
    return sum(sum(d[i, j] * d[i + 1, j] for j in range(d.shape[1])) for i in range(B - 1)) / (B - 1)


def test_cc_against_loops_with_its_heads():
    m = cc.CC(S3, T3)  # embedding widths 5 and 7
    assert (m.embed_s.in_features, m.embed_s.out_features, m.embed_t.in_features, m.embed_t.out_features) == (5, 128, 7, 128)
    assert m.embed_s.bias is not None and m.embed_t.bias is not None
    s, t = outputs(S3, 5, seed=10, requires_grad=True), outputs(T3, 5, seed=11, requires_grad=True)
    terms = m(s, t, LABELS)
    assert set(terms) == {"ce", "cc"}
    es = linear_ref(np64(s.embedding), np64(m.embed_s.weight), np64(m.embed_s.bias))
    et = linear_ref(np64(t.embedding), np64(m.embed_t.weight), np64(m.embed_t.bias))
    ref = cc_ref(es, et)
    assert ref > 1e-3
    assert terms["cc"].item() == pytest.approx(0.02 * ref, rel=1e-5)
    # consecutive samples, not all pairs: reversing the batch keeps the value, swapping two samples changes it
    perm = torch.tensor([4, 3, 2, 1, 0])
    rev = m(Outputs(s.logits, embedding=s.embedding[perm]), Outputs(t.logits, embedding=t.embedding[perm]), LABELS)
    assert rev["cc"].item() == pytest.approx(terms["cc"].item(), rel=1e-5)
    swap = torch.tensor([1, 0, 2, 3, 4])
    ref_swap = cc_ref(es[swap.numpy()], et[swap.numpy()])
    assert abs(ref_swap - ref) > 1e-3 * ref
    got_swap = m(Outputs(s.logits, embedding=s.embedding[swap]), Outputs(t.logits, embedding=t.embedding[swap]), LABELS)
    assert got_swap["cc"].item() == pytest.approx(0.02 * ref_swap, rel=1e-5)
    # both heads train (RepDistiller's trainable_list holds embed_s and embed_t); the teacher does not
    total(terms).backward()
    for p in m.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert s.embedding.grad.abs().sum() > 0
    assert t.embedding.grad is None and t.logits.grad is None
    assert {"embed_s.weight", "embed_s.bias", "embed_t.weight", "embed_t.bias"} == set(m.state_dict())


def test_cc_batch_of_one_and_errors():
    m = cc.CC(S3, T3)
    s, t = outputs(S3, 1, seed=12, requires_grad=True), outputs(T3, 1, seed=13)
    terms = m(s, t, LABELS[:1])
    assert terms["cc"].item() == 0.0
    total(terms).backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    with pytest.raises(KDZooError, match=r"'cc' cannot learn from batches of 1 image.*at least 2"):
        m.validate_batch_size(1)
    m.validate_batch_size(2)
    with pytest.raises(KDZooError, match="embed_dim must be >= 1"):
        cc.CC(S3, T3, embed_dim=0)
    with pytest.raises(KDZooError, match="teacher's pooled embedding.*embed_dim=0"):
        cc.CC(S3, info((4,), ((4, 4),), embed_dim=0))
    assert cc.CC(S3, T3, embed_dim=16).embed_t.out_features == 16


# --------------------------------------------------------------------------- pkt

def pkt_ref(es: np.ndarray, et: np.ndarray, eps: float = 1e-7) -> float:
    def probs(e):
        B = len(e)
        x = [e[i] / (math.sqrt(sum(v * v for v in e[i])) + eps) for i in range(B)]
        sim = [[(float(np.dot(x[i], x[j])) + 1) / 2 for j in range(B)] for i in range(B)]
        return [[sim[i][j] / sum(sim[i]) for j in range(B)] for i in range(B)]

    ps, pt = probs(es), probs(et)
    B = len(es)
    return sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(B) for j in range(B)) / (B * B)


def test_pkt_against_loops_different_widths():
    s, t = outputs(S3, 5, seed=20, requires_grad=True), outputs(T3, 5, seed=21)
    with torch.no_grad():
        s.embedding[2] = 0  # a zero row: divided by (0 + eps), it stays 0 (RepDistiller's eps path)
    terms = pkt.PKT(S3, T3)(s, t, LABELS)
    assert set(terms) == {"ce", "pkt"}
    ref = pkt_ref(np64(s.embedding), np64(t.embedding))
    assert ref > 1e-5
    assert terms["pkt"].item() == pytest.approx(30000.0 * ref, rel=1e-5)
    total(terms).backward()
    assert torch.isfinite(s.embedding.grad).all() and s.embedding.grad.abs().sum() > 0


def test_pkt_nan_rows_become_zero_and_batch_of_one_is_refused():
    s, t = outputs(S3, 4, seed=22), outputs(T3, 4, seed=23)
    e = s.embedding.detach().clone()
    e[1, 0] = math.inf  # inf / inf -> NaN in that row, which the reference code zeroes
    out = pkt.PKT(S3, T3)(Outputs(s.logits, embedding=e), t, LABELS[:4])["pkt"]
    ref_e = np64(e)
    ref_e[1] = 0.0  # row 1: inf/inf = NaN at entry 0, finite/inf = 0 elsewhere: all zero after the NaN guard
    assert torch.isfinite(out)
    assert out.item() == pytest.approx(30000.0 * pkt_ref(ref_e, np64(t.embedding)), rel=1e-5)
    with pytest.raises(KDZooError, match=r"'pkt' cannot learn from batches of 1 image"):
        pkt.PKT(S3, T3).validate_batch_size(1)
    pkt.PKT(S3, T3).validate_batch_size(2)


# --------------------------------------------------------------------------- nst

def nst_pair_ref(fs: np.ndarray, ft: np.ndarray) -> float:
    fs, ft = pool_pair_ref(fs, ft)
    B = len(fs)

    def rows(f):
        f = f.reshape(B, f.shape[1], -1)
        return [[f[b, c] / max(math.sqrt(float(np.dot(f[b, c], f[b, c]))), 1e-12) for c in range(f.shape[1])] for b in range(B)]

    s, t = rows(fs), rows(ft)

    def kmean(a, b):
        vals = [float(np.dot(a[n][i], b[n][j])) ** 2 for n in range(B) for i in range(len(a[n])) for j in range(len(b[n]))]
        return sum(vals) / len(vals)

    return kmean(t, t) + kmean(s, s) - 2 * kmean(s, t)


@pytest.mark.parametrize("s_info, t_info, pairs", [(S3, T3, [(0, 0), (1, 1), (2, 2)]), (S2, T2, [(0, 0), (1, 1)])],
                         ids=["same sizes", "other widths and sizes"])
def test_nst_against_loops(s_info, t_info, pairs):
    m = nst.NST(s_info, t_info)
    assert m.pairs == pairs
    s, t = outputs(s_info, 3, seed=30, requires_grad=True), outputs(t_info, 3, seed=31)
    with torch.no_grad():
        s.features[0][:, 1] = 0  # a dead channel (post-ReLU): normalised to 0, with a finite gradient
    terms = m(s, t, LABELS[:3])
    assert set(terms) == {"ce", "nst"}
    ref = sum(nst_pair_ref(np64(s.features[si]), np64(t.features[ti])) for ti, si in pairs)
    assert ref > 1e-4
    assert terms["nst"].item() == pytest.approx(50.0 * ref, rel=1e-5)
    total(terms).backward()
    for f in s.features:
        assert f.grad is not None and torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0


def test_nst_is_zero_when_student_matches_teacher():
    f = feats(S3, 2, seed=32)
    out = nst.NST(S3, S3)(Outputs(randn(2, 10, seed=1), features=f), Outputs(randn(2, 10, seed=2), features=[2 * x for x in f]), LABELS[:2])
    assert abs(out["nst"].item()) < 1e-6


# --------------------------------------------------------------------------- vid

def vid_pair_ref(fs, ft, weights, log_scale, eps=1e-5) -> float:
    fs, ft = pool_pair_ref(fs, ft)
    w1, w2, w3 = weights  # (out, in) matrices of the three 1x1 convs
    B, _, H, W = fs.shape
    C = ft.shape[1]
    var = [math.log(1 + math.exp(v)) + eps for v in log_scale]
    tot, count = 0.0, 0
    for b in range(B):
        for h in range(H):
            for w in range(W):
                x = fs[b, :, h, w]
                mu = w3 @ np.maximum(w2 @ np.maximum(w1 @ x, 0), 0)
                for c in range(C):
                    tot += 0.5 * ((mu[c] - ft[b, c, h, w]) ** 2 / var[c] + math.log(var[c]))
                    count += 1
    return tot / count


@pytest.mark.parametrize("s_info, t_info", [(S3, T3), (S2, T2)], ids=["same sizes", "other widths and sizes"])
def test_vid_against_loops(s_info, t_info):
    m = vid.VID(s_info, t_info)
    # RepDistiller's initial variance: softplus(log_scale) + 1e-5 = 5 in every channel
    for ls, (t_idx, _) in zip(m.log_scales, m.pairs):
        assert ls.shape == (t_info.stage_channels[t_idx],)
        assert torch.allclose(torch.nn.functional.softplus(ls.double()) + 1e-5, torch.full_like(ls, 5.0, dtype=torch.float64))
    with torch.no_grad():  # trained variances differ per channel: make the test see which is which
        for i, ls in enumerate(m.log_scales):
            ls.copy_(randn(len(ls), seed=40 + i))
    s, t = outputs(s_info, 2, seed=41, requires_grad=True), outputs(t_info, 2, seed=42)
    terms = m(s, t, LABELS[:2])
    assert set(terms) == {"ce", "vid"}
    ref = 0.0
    for (ti, si), reg, ls in zip(m.pairs, m.regressors, m.log_scales):
        convs = [np64(reg[i].weight)[:, :, 0, 0] for i in (0, 2, 4)]
        assert convs[0].shape == (t_info.stage_channels[ti], s_info.stage_channels[si])
        assert all(reg[i].bias is None for i in (0, 2, 4))
        ref += vid_pair_ref(np64(s.features[si]), np64(t.features[ti]), convs, np64(ls))
    assert terms["vid"].item() == pytest.approx(ref, rel=1e-5)
    # regressors and log-scales are trained (RepDistiller), unlike mdistiller's plain list of log-scales
    total(terms).backward()
    names = {n for n, _ in m.named_parameters()}
    assert {f"log_scales.{i}" for i in range(len(m.pairs))} <= names
    for n, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert {f"log_scales.{i}" for i in range(len(m.pairs))} <= set(m.state_dict())
    for f in s.features[-len(m.pairs):]:
        assert f.grad.abs().sum() > 0


def test_vid_structure_and_errors():
    m = vid.VID(S3, T3)
    reg = m.regressors[0]
    kinds = [type(x).__name__ for x in reg]
    assert kinds == ["Conv2d", "ReLU", "Conv2d", "ReLU", "Conv2d"]  # no ReLU after the last conv
    assert [x.kernel_size for x in reg if isinstance(x, torch.nn.Conv2d)] == [(1, 1)] * 3
    assert (reg[0].in_channels, reg[0].out_channels, reg[2].out_channels, reg[4].out_channels) == (4, 6, 6, 6)
    with pytest.raises(KDZooError, match="init_var > var_eps"):
        vid.VID(S3, T3, init_var=0.0)
    assert torch.allclose(torch.nn.functional.softplus(vid.VID(S3, T3, init_var=2.0).log_scales[0]) + 1e-5,
                          torch.tensor(2.0))


# --------------------------------------------------------------------------- kdsvd

def kdsvd_ref(fs_list, ft_list, k=1, flip_teacher_stage=None) -> float:
    """numpy float64 SVD of each (H*W, C) matrix; the teacher's vectors with their largest-magnitude
    entry positive; the student's aligned by max |cos| and its sign; RBF between consecutive stages."""
    B = fs_list[0].shape[0]
    loss, prev = 0.0, None
    for stage, (fs, ft) in enumerate(zip(fs_list, ft_list)):
        cur = []
        for b in range(B):
            xt = ft[b].reshape(ft.shape[1], -1).T  # (H*W, C)
            xs = fs[b].reshape(fs.shape[1], -1).T
            _, st, vht = np.linalg.svd(xt, full_matrices=False)
            _, _, vhs = np.linalg.svd(xs, full_matrices=False)
            vt = [vht[j] for j in range(min(k, len(vht)))]
            vt = [v if v[np.argmax(np.abs(v))] > 0 else -v for v in vt]
            if flip_teacher_stage == stage:
                vt = [-v for v in vt]
            sv = st[:len(vt)] / np.linalg.norm(st[:len(vt)])
            cand = [vhs[j] for j in range(min(k + 3, len(vhs)))]
            vs = []
            for v in vt:
                cos = [float(np.dot(c, v)) for c in cand]
                best = int(np.argmax(np.abs(cos)))
                vs.append(math.copysign(1.0, cos[best]) * cand[best])
            cur.append(([v * sv[j] for j, v in enumerate(vs)], [v * sv[j] for j, v in enumerate(vt)]))
        if prev is not None:
            for b in range(B):
                (vs, vt), (pvs, pvt) = cur[b], prev[b]
                for j in range(len(vt)):
                    for c in range(len(vt[j])):
                        for c2 in range(len(pvt[j])):
                            rs = math.exp(-(vs[j][c] - pvs[j][c2]) ** 2 / 8)
                            rt = math.exp(-(vt[j][c] - pvt[j][c2]) ** 2 / 8)
                            loss += (rs - rt) ** 2
        prev = cur
    return loss / B


# equal widths, no shared spatial size: three pairs aligned from the last stage
SV_S = info((4, 8, 16), ((8, 8), (4, 4), (2, 2)))
SV_T = info((4, 8, 16), ((12, 12), (6, 6), (3, 3)))


@pytest.mark.parametrize("s_info, t_info, k", [(S3, S3, 1), (SV_S, SV_T, 1), (SV_S, SV_T, 2)],
                         ids=["same net", "other sizes", "other sizes, k=2"])
def test_kdsvd_against_numpy_svd(s_info, t_info, k):
    m = kdsvd.KDSVD(s_info, t_info, k=k) if k != 1 else kdsvd.KDSVD(s_info, t_info)
    assert m.pairs == [(0, 0), (1, 1), (2, 2)]
    s, t = outputs(s_info, 3, seed=50, requires_grad=True), outputs(t_info, 3, seed=51)
    terms = m(s, t, LABELS[:3])
    assert set(terms) == {"ce", "svd"}
    fs, ft = [np64(f) for f in s.features], [np64(f) for f in t.features]
    ref = kdsvd_ref(fs, ft, k)
    assert ref > 1e-3
    assert terms["svd"].item() == pytest.approx(ref, rel=1e-4)
    # the teacher's sign convention is pinned: the other sign of one stage gives another loss
    assert abs(kdsvd_ref(fs, ft, k, flip_teacher_stage=1) - ref) > 1e-3 * ref
    total(terms).backward()
    for f in s.features:
        assert f.grad is not None and torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0


def test_kdsvd_backward_matches_autograd_and_survives_repeated_singular_values():
    f = kdsvd._RightSingularVectors.apply
    x = randn(2, 7, 5, seed=60).double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: f(x, 4), (x,))
    wide = randn(2, 3, 6, seed=61).double().requires_grad_(True)  # fewer positions than channels: null space
    assert torch.autograd.gradcheck(lambda x: f(x, 2), (wide,))
    # two all-zero channels: torch.linalg.svd's own backward is NaN for the whole sample, kdzoo's is finite
    x = randn(2, 16, 8, seed=62).relu()
    x[:, :, 5:] = 0
    x.requires_grad_(True)
    torch.linalg.svd(x, full_matrices=False)[2].mH[:, :, :4].pow(3).sum().backward()
    assert not torch.isfinite(x.grad).all()
    x.grad = None
    kdsvd.right_singular_vectors(x, 4).pow(3).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # and through the method: a student stage with dead channels still trains
    s, t = outputs(S3, 2, seed=63), outputs(S3, 2, seed=64)
    s.features[2] = s.features[2].detach().clone()
    s.features[2][:, 10:] = 0
    for g in s.features:
        g.requires_grad_(True)
    total(kdsvd.KDSVD(S3, S3)(s, t, LABELS[:2])).backward()
    assert all(torch.isfinite(g.grad).all() for g in s.features) and s.features[2].grad.abs().sum() > 0


def test_kdsvd_refuses_unequal_channels():
    with pytest.raises(PairNotSupported, match=r"teacher's paired stages have \[6, 12, 24\] channels and the student's "
                                               r"\[4, 8, 16\].*same length") as e:
        kdsvd.KDSVD(S3, T3)
    assert isinstance(e.value, KDZooError)
    with pytest.raises(KDZooError, match="k .* must be >= 1"):
        kdsvd.KDSVD(S3, S3, k=0)


# --------------------------------------------------------------------------- all six

CLASSES = {"sp": sp.SP, "cc": cc.CC, "pkt": pkt.PKT, "nst": nst.NST, "vid": vid.VID, "kdsvd": kdsvd.KDSVD}
MODULES = {"sp": sp, "cc": cc, "pkt": pkt, "nst": nst, "vid": vid, "kdsvd": kdsvd}
DECLARED = {  # family, needs_features, needs_embedding, defaults
    "sp": ("relation", True, False, {"w_ce": 1.0, "w_sp": 3000.0}),
    "cc": ("relation", False, True, {"w_ce": 1.0, "w_cc": 0.02, "embed_dim": 128}),
    "pkt": ("relation", False, True, {"w_ce": 1.0, "w_pkt": 30000.0}),
    "nst": ("features", True, False, {"w_ce": 1.0, "w_nst": 50.0}),
    "vid": ("features", True, False, {"w_ce": 1.0, "w_vid": 1.0, "init_var": 5.0, "var_eps": 1e-5}),
    "kdsvd": ("features", True, False, {"w_ce": 1.0, "w_svd": 1.0, "k": 1}),
}


@pytest.mark.parametrize("name", list(CLASSES))
def test_registration_and_declarations(name):
    cls = CLASSES[name]
    got = []
    MODULES[name].register_methods(lambda c, n=None: got.append((c, n)))
    assert got == [(cls, None)]
    family, features, embedding, defaults = DECLARED[name]
    assert issubclass(cls, Method) and cls.name == name and cls.family == family and cls.needs_teacher
    assert (cls.needs_features, cls.needs_embedding) == (features, embedding)
    assert not (cls.needs_preact or cls.needs_stem or cls.needs_indices or cls.has_init_stage)
    assert cls.defaults == defaults and all(type(cls.defaults[k]) is type(v) for k, v in defaults.items())
    assert cls.reference and "alpha" not in cls.defaults


def _pair_for(name):
    return (S3, S3) if name == "kdsvd" else (S3, T3)


@pytest.mark.parametrize("name", list(CLASSES))
def test_teacher_outputs_from_inference_mode_are_usable(name):
    s_info, t_info = _pair_for(name)
    torch.manual_seed(0)
    m = CLASSES[name](s_info, t_info)
    s = outputs(s_info, 4, seed=70, requires_grad=True)
    with torch.inference_mode():
        t = outputs(t_info, 4, seed=71)
    got = m(s, t, LABELS[:4])
    want = m(outputs(s_info, 4, seed=70), outputs(t_info, 4, seed=71), LABELS[:4])
    total(got).backward()
    assert got.keys() == want.keys()
    for k in got:
        assert got[k].item() == pytest.approx(want[k].item(), rel=1e-6)


@pytest.mark.parametrize("name", ["sp", "pkt", "nst", "kdsvd", "cc"])
def test_float32_under_bf16_autocast(name):
    """The relational parts run in float32 under autocast: the term equals the float32 value of the
    bf16-rounded inputs (CC's heads too)."""
    s_info, t_info = _pair_for(name)
    torch.manual_seed(0)
    m = CLASSES[name](s_info, t_info)
    s, t = outputs(s_info, 4, seed=80), outputs(t_info, 4, seed=81)

    def cast(o, dtype):
        return Outputs(o.logits.to(dtype), [f.to(dtype) for f in o.features], o.embedding.to(dtype))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m(cast(s, torch.bfloat16), cast(t, torch.bfloat16), LABELS[:4])
    want = m(cast(cast(s, torch.bfloat16), torch.float32), cast(cast(t, torch.bfloat16), torch.float32), LABELS[:4])
    term = [k for k in got if k != "ce"][0]
    assert got[term].dtype == torch.float32
    assert got[term].item() == pytest.approx(want[term].item(), rel=1e-5)


KDSVD_PAIRS = {
    "identical nets": NETINFO_PAIRS["identical nets"],
    "equal widths, other sizes": (info((8, 16, 32), ((16, 16), (8, 8), (4, 4)), 32),
                                  info((8, 16, 32), ((12, 12), (6, 6), (3, 3)), 48)),
    "deeper teacher, equal widths where paired": (info((8, 16, 32), ((16, 16), (8, 8), (4, 4)), 32),
                                                  info((4, 8, 16, 32), ((32, 32), (16, 16), (8, 8), (4, 4)), 64)),
}


@pytest.mark.parametrize("name", list(CLASSES))
def test_contract_check_method(name):
    if name == "kdsvd":
        check_method(CLASSES[name], pairs=KDSVD_PAIRS)
    else:
        check_method(CLASSES[name])
