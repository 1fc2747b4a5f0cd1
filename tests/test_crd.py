"""CRD (``crd``, and CRD+KD as ``w_kd=1``) against independent hand computations.

The references are written here from RepDistiller's formulas (crd/criterion.py ``ContrastLoss``,
crd/memory.py ``ContrastMemory``, dataset/cifar100.py 'exact' sampling) with numpy in float64; they
share no code with the plugin. Every tensor is tiny and no model is trained.
"""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from kdzoo import KDZooError
from kdzoo.methods import PairNotSupported
from kdzoo.models import NetInfo, Outputs
from kdzoo.testing import check_method
from kdzoo_plugins import crd

# A student and a teacher of different widths (CRD reads only the pooled embeddings) and spatial sizes.
S = NetInfo(stage_channels=(4, 8), stage_sizes=((8, 8), (4, 4)), embed_dim=5, num_classes=4)
T = NetInfo(stage_channels=(6, 12, 24), stage_sizes=((16, 16), (8, 8), (2, 2)), embed_dim=7, num_classes=4)

# 40 training samples of 4 unbalanced classes (13, 11, 9, 7), in a fixed shuffled order.
LABELS = torch.tensor(np.random.RandomState(0).permutation([0] * 13 + [1] * 11 + [2] * 9 + [3] * 7))
SMALL = dict(nce_k=8, feat_dim=6)


def randn(*shape, seed, requires_grad=False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_(requires_grad)


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def bound(labels: torch.Tensor = LABELS, seed: int = 0, **hparams) -> crd.CRD:
    torch.manual_seed(seed)
    m = crd.CRD(S, T, **{**SMALL, **hparams})
    m.bind_train_set(labels)
    return m


def batch(indices, seed, requires_grad=False):
    """Student and teacher Outputs for the training samples ``indices`` (labels from LABELS)."""
    ind = torch.tensor(indices)
    b = len(indices)
    s = Outputs(logits=randn(b, 4, seed=seed, requires_grad=requires_grad),
                embedding=randn(b, 5, seed=seed + 1).relu().requires_grad_(requires_grad))  # post-ReLU, pooled
    t = Outputs(logits=randn(b, 4, seed=seed + 2, requires_grad=requires_grad),
                embedding=randn(b, 7, seed=seed + 3).relu().requires_grad_(requires_grad))
    return s, t, LABELS[ind], ind


# --------------------------------------------------------------------------- float64 references


def head_ref(f: np.ndarray, linear: torch.nn.Linear) -> np.ndarray:
    """normalize(f W^T + b), row by row."""
    w, b = np64(linear.weight), np64(linear.bias)
    out = []
    for row in f:
        z = np.array([sum(row[i] * w[o, i] for i in range(len(row))) + b[o] for o in range(len(b))])
        out.append(z / math.sqrt(sum(x * x for x in z)))
    return np.array(out)


def raw_scores_ref(v: np.ndarray, bank: np.ndarray, idx: np.ndarray, nce_t: float) -> np.ndarray:
    """exp(v_b . bank[idx[b, j]] / nce_t), before dividing by Z."""
    return np.array([[math.exp(float(np.dot(v[b], bank[j])) / nce_t) for j in idx[b]] for b in range(len(v))])


def contrast_loss_ref(p: np.ndarray, n_data: int) -> float:
    """RepDistiller's ContrastLoss (Eq. 18) on normalised scores p (B, K + 1), positive first, eps 1e-7."""
    bsz, k = p.shape[0], p.shape[1] - 1
    pn = 1.0 / n_data
    total = 0.0
    for b in range(bsz):
        total += math.log(p[b, 0] / (p[b, 0] + k * pn + 1e-7))
        for j in range(1, k + 1):
            total += math.log(k * pn / (p[b, j] + k * pn + 1e-7))
    return -total / bsz


def update_ref(bank: np.ndarray, rows, v: np.ndarray, momentum: float) -> np.ndarray:
    out = bank.copy()
    for b, r in enumerate(rows):
        x = momentum * bank[r] + (1 - momentum) * v[b]
        out[r] = x / math.sqrt(sum(e * e for e in x))
    return out


def ce_ref(logits: np.ndarray, labels) -> float:
    tot = 0.0
    for z, y in zip(logits, labels):
        tot += -(z[y] - math.log(sum(math.exp(e) for e in z)))
    return tot / len(labels)


def kd_ref(s: np.ndarray, t: np.ndarray, temp: float) -> float:
    kl = 0.0
    for zs, zt in zip(s, t):
        ps = np.exp(zs / temp) / np.exp(zs / temp).sum()
        pt = np.exp(zt / temp) / np.exp(zt / temp).sum()
        kl += sum(pt[c] * (math.log(pt[c]) - math.log(ps[c])) for c in range(len(pt)))
    return kl / len(s) * temp * temp


def sampled(m: crd.CRD, y: torch.Tensor, ind: torch.Tensor, seed: int) -> np.ndarray:
    """The contrast indices forward draws under ``seed`` (forward draws nothing before them)."""
    torch.manual_seed(seed)
    return m.contrast_indices(y, ind).numpy()


# --------------------------------------------------------------------------- declaration and defaults


def test_declaration_and_defaults():
    assert crd.CRD.name == "crd" and crd.CRD.family == "relation"
    assert crd.CRD.needs_embedding and crd.CRD.needs_indices and crd.CRD.needs_train_labels
    assert crd.CRD.needs_teacher and not crd.CRD.needs_features
    assert crd.CRD.defaults == {"w_ce": 1.0, "w_crd": 0.8, "w_kd": 0.0, "T": 4.0,
                                "nce_k": 16384, "nce_t": 0.07, "nce_m": 0.5, "feat_dim": 128}
    m = crd.CRD(S, T)
    assert (m.embed_s.in_features, m.embed_s.out_features) == (5, 128)
    assert (m.embed_t.in_features, m.embed_t.out_features) == (7, 128)
    # heads are parameters (trained with the student); banks and Z are buffers
    assert {n for n, _ in m.named_parameters()} == {"embed_s.weight", "embed_s.bias", "embed_t.weight", "embed_t.bias"}
    assert {"memory_s", "memory_t", "Z"} <= set(m.state_dict())
    assert m.Z.tolist() == [-1.0, -1.0]
    registered = []
    crd.register_methods(registered.append)
    assert registered == [crd.CRD]


def test_hparam_and_pair_errors():
    with pytest.raises(KDZooError, match="nce_t must be > 0"):
        crd.CRD(S, T, nce_t=0.0)
    with pytest.raises(KDZooError, match="nce_k"):
        crd.CRD(S, T, nce_k=0)
    with pytest.raises(KDZooError, match=r"nce_m must be in \[0, 1\]"):
        crd.CRD(S, T, nce_m=1.5)
    with pytest.raises(KDZooError, match="feat_dim"):
        crd.CRD(S, T, feat_dim=0)
    with pytest.raises(KDZooError, match="no hyperparameter 'alpha'"):
        crd.CRD(S, T, alpha=1.0)
    no_embed = NetInfo(stage_channels=(4,), stage_sizes=((4, 4),), embed_dim=0, num_classes=4)
    with pytest.raises(PairNotSupported, match="embedding"):
        crd.CRD(no_embed, T)


def test_bind_refuses_small_or_single_class_sets():
    m = crd.CRD(S, T)  # nce_k = 16384
    with pytest.raises(KDZooError, match=r"holds 40 samples; it needs at least nce_k \+ 1 = 16385"):
        m.bind_train_set(LABELS)
    m = crd.CRD(S, T, nce_k=3)
    with pytest.raises(KDZooError, match="all 10 training samples are of class 2"):
        m.bind_train_set(torch.full((10,), 2))
    m = crd.CRD(S, T, nce_k=39)  # N = K + 1 is enough
    m.bind_train_set(LABELS)
    assert tuple(m.memory_s.shape) == (40, 128)


def test_forward_before_bind_or_without_indices_is_refused():
    s, t, y, ind = batch([0, 1], seed=1)
    m = crd.CRD(S, T, **SMALL)
    with pytest.raises(KDZooError, match="before bind_train_set"):
        m(s, t, y, indices=ind)
    m.bind_train_set(LABELS)
    with pytest.raises(KDZooError, match="indices="):
        m(s, t, y)
    with pytest.raises(KDZooError, match="expected \\(2,\\)"):
        m(s, t, y, indices=ind[:1])


def test_bank_initialisation_and_memory_size():
    torch.manual_seed(0)
    m = crd.CRD(S, T)
    m.bind_train_set(torch.arange(20000) % 10)
    stdv = 1 / math.sqrt(128 / 3)
    for bank in (m.memory_s, m.memory_t):
        assert bank.shape == (20000, 128) and bank.dtype == torch.float32
        assert bank.min().item() >= -stdv and bank.max().item() <= stdv
        assert bank.min().item() < -0.99 * stdv and bank.max().item() > 0.99 * stdv  # uniform over the range
        assert abs(bank.pow(2).mean().item() - stdv ** 2 / 3) < 1e-4  # variance of U(-a, a) is a^2/3
    assert not torch.equal(m.memory_s, m.memory_t)
    # 2 banks x N x 128 float32: 51.2 MB for the 50,000 CIFAR training images
    assert 2 * 50000 * 128 * 4 == 51_200_000
    assert m.memory_s.numel() * m.memory_s.element_size() * 2 == 2 * 20000 * 128 * 4


# --------------------------------------------------------------------------- sampling


def class_of(i):
    return int(LABELS[i])


@pytest.mark.parametrize("k", [8, 27])
def test_negatives_come_from_other_classes_without_replacement(k):
    # every class has >= 27 negatives (40 - 13), so RepDistiller draws without replacement
    m = bound(nce_k=k)
    ind = torch.arange(40)
    seen = {c: np.zeros(40) for c in range(4)}
    draws = 60
    torch.manual_seed(1)
    for _ in range(draws):
        idx = m.contrast_indices(LABELS, ind).numpy()
        assert idx.shape == (40, k + 1)
        for b in range(40):
            assert idx[b, 0] == b  # the positive is the sample's own index
            neg = idx[b, 1:]
            assert len(set(neg.tolist())) == k  # no repeats
            assert all(class_of(j) != class_of(b) for j in neg)
            for j in neg:
                seen[class_of(b)][j] += 1
    for c in range(4):  # every other-class sample is drawn, about equally often
        others = [j for j in range(40) if class_of(j) != c]
        n_c = 40 - len(others)
        expected = draws * n_c * k / len(others)
        counts = seen[c][others]
        assert counts.min() > 0
        assert np.all(np.abs(counts - expected) < 5 * math.sqrt(expected) + 1)
        assert seen[c][[j for j in range(40) if class_of(j) == c]].sum() == 0


def test_negatives_with_replacement_where_a_class_has_too_few():
    # K = 30: class 0 has 27 negatives (drawn with replacement), class 3 has 33 (without)
    m = bound(nce_k=30)
    ind = torch.arange(40)
    torch.manual_seed(2)
    repeats = 0
    for _ in range(20):
        idx = m.contrast_indices(LABELS, ind).numpy()
        for b in range(40):
            neg = idx[b, 1:]
            assert len(neg) == 30 and idx[b, 0] == b
            assert all(class_of(j) != class_of(b) for j in neg)
            if 40 - int((LABELS == LABELS[b]).sum()) >= 30:
                assert len(set(neg.tolist())) == 30
            else:
                repeats += 1
                assert len(set(neg.tolist())) < 30  # 30 draws from fewer than 30: repeats
    assert repeats > 0
    # all classes short: K = 35 > every class's negatives (27..33)
    m = bound(nce_k=35)
    idx = sampled(m, LABELS, ind, seed=3)
    for b in range(40):
        assert all(class_of(j) != class_of(b) for j in idx[b, 1:])


def test_sampling_is_deterministic_under_the_global_seed():
    m = bound()
    ind = torch.arange(10)
    a, b = sampled(m, LABELS[:10], ind, seed=5), sampled(m, LABELS[:10], ind, seed=5)
    c = sampled(m, LABELS[:10], ind, seed=6)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


# --------------------------------------------------------------------------- the loss by hand


def test_loss_at_initialisation_and_second_step_by_hand():
    m = bound()
    m.train()
    n, k, temp = 40, 8, 0.07
    mem_s0, mem_t0 = np64(m.memory_s), np64(m.memory_t)
    s, t, y, ind = batch([3, 17, 25, 38, 0], seed=10)
    idx = sampled(m, y, ind, seed=7)
    torch.manual_seed(7)
    terms = m(s, t, y, indices=ind)
    assert set(terms) == {"ce", "crd"}  # w_kd = 0: no kd term
    assert all(v.dtype == torch.float32 and v.dim() == 0 for v in terms.values())

    v_s = head_ref(np64(s.embedding), m.embed_s)
    v_t = head_ref(np64(t.embedding), m.embed_t)
    out_s = raw_scores_ref(v_s, mem_t0, idx, temp)  # student anchor, teacher bank
    out_t = raw_scores_ref(v_t, mem_s0, idx, temp)  # teacher anchor, student bank
    z_s, z_t = out_s.mean() * n, out_t.mean() * n
    expected = contrast_loss_ref(out_s / z_s, n) + contrast_loss_ref(out_t / z_t, n)
    assert terms["crd"].item() == pytest.approx(0.8 * expected, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(ce_ref(np64(s.logits), y.tolist()), rel=1e-5)
    # Z is fixed from the first batch as mean * N, one per side
    np.testing.assert_allclose(np64(m.Z), [z_s, z_t], rtol=1e-5)
    assert k == idx.shape[1] - 1

    # second step: the banks were updated, Z stays the first batch's
    mem_s1 = update_ref(mem_s0, ind.tolist(), v_s, 0.5)
    mem_t1 = update_ref(mem_t0, ind.tolist(), v_t, 0.5)
    np.testing.assert_allclose(np64(m.memory_s), mem_s1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np64(m.memory_t), mem_t1, rtol=1e-5, atol=1e-6)
    s2, t2, y2, ind2 = batch([1, 3, 30], seed=20)
    idx2 = sampled(m, y2, ind2, seed=8)
    torch.manual_seed(8)
    crd2 = m(s2, t2, y2, indices=ind2)["crd"].item()
    v_s2 = head_ref(np64(s2.embedding), m.embed_s)
    v_t2 = head_ref(np64(t2.embedding), m.embed_t)
    expected2 = (contrast_loss_ref(raw_scores_ref(v_s2, mem_t1, idx2, temp) / z_s, n)
                 + contrast_loss_ref(raw_scores_ref(v_t2, mem_s1, idx2, temp) / z_t, n))
    assert crd2 == pytest.approx(0.8 * expected2, rel=1e-5)
    np.testing.assert_allclose(np64(m.Z), [z_s, z_t], rtol=1e-5)
    # a batch-derived Z would give another value here
    z_s2 = raw_scores_ref(v_s2, mem_t1, idx2, temp).mean() * n
    assert abs(z_s2 - z_s) / z_s > 1e-3


def test_crd_plus_kd_variant_by_hand():
    m = bound(w_kd=1.0)
    s, t, y, ind = batch([2, 9, 14, 33], seed=30)
    s.logits.data.mul_(3)
    t.logits.data.mul_(3)
    terms = m(s, t, y, indices=ind)
    assert set(terms) == {"ce", "crd", "kd"}
    assert terms["kd"].item() == pytest.approx(kd_ref(np64(s.logits), np64(t.logits), 4.0), rel=1e-5)
    m2 = bound(w_kd=1.0, T=2.0)
    assert m2(s, t, y, indices=ind)["kd"].item() == pytest.approx(kd_ref(np64(s.logits), np64(t.logits), 2.0), rel=1e-5)
    # w_crd = 0 leaves CE + KD and no contrastive work
    m3 = bound(w_kd=1.0, w_crd=0.0)
    before = m3.memory_s.clone()
    assert set(m3(s, t, y, indices=ind)) == {"ce", "kd"}
    assert torch.equal(m3.memory_s, before)


# --------------------------------------------------------------------------- memory update


def test_memory_update_momentum_and_renormalisation_by_hand():
    m = bound(nce_m=0.3)
    m.train()
    # banks of known rows (not unit norm, as at initialisation)
    m.memory_s.copy_(randn(40, 6, seed=40) * 0.2)
    m.memory_t.copy_(randn(40, 6, seed=41) * 0.2)
    mem_s0, mem_t0 = np64(m.memory_s), np64(m.memory_t)
    s, t, y, ind = batch([5, 11, 39], seed=50)
    m(s, t, y, indices=ind)
    v_s = head_ref(np64(s.embedding), m.embed_s)
    v_t = head_ref(np64(t.embedding), m.embed_t)
    got_s, got_t = np64(m.memory_s), np64(m.memory_t)
    for b, r in enumerate([5, 11, 39]):
        for got, mem0, v in ((got_s, mem_s0, v_s), (got_t, mem_t0, v_t)):
            x = [0.3 * mem0[r][i] + 0.7 * v[b][i] for i in range(6)]
            norm = math.sqrt(sum(e * e for e in x))
            np.testing.assert_allclose(got[r], [e / norm for e in x], rtol=1e-5, atol=1e-7)
            assert abs(np.linalg.norm(got[r]) - 1) < 1e-5
    untouched = [r for r in range(40) if r not in (5, 11, 39)]
    assert np.array_equal(got_s[untouched], mem_s0[untouched]) and np.array_equal(got_t[untouched], mem_t0[untouched])
    # the student vectors go to the student bank, the teacher vectors to the teacher bank
    assert not np.allclose(got_s[5], got_t[5])
    # evaluation mode neither writes the banks nor sets Z
    m2 = bound()
    m2.eval()
    before = (m2.memory_s.clone(), m2.memory_t.clone())
    m2(s, t, y, indices=ind)
    assert torch.equal(m2.memory_s, before[0]) and torch.equal(m2.memory_t, before[1])
    assert m2.Z.tolist() == [-1.0, -1.0]


# --------------------------------------------------------------------------- gradients, state, determinism


def test_gradient_reaches_student_embedding_and_both_heads_not_the_teacher():
    m = bound()
    m.train()
    s, t, y, ind = batch([0, 7, 21, 35], seed=60, requires_grad=True)
    terms = m(s, t, y, indices=ind)
    terms["crd"].backward()
    assert s.embedding.grad is not None and s.embedding.grad.abs().sum() > 0
    for p in m.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0 and torch.isfinite(p.grad).all()
    assert t.embedding.grad is None and t.logits.grad is None
    assert not m.memory_s.requires_grad and not m.memory_t.requires_grad and not m.Z.requires_grad


def test_teacher_embedding_from_inference_mode():
    m = bound()
    m.train()
    s, t, y, ind = batch([0, 7], seed=61, requires_grad=True)
    with torch.inference_mode():
        t_inf = Outputs(logits=t.logits.detach() * 1, embedding=t.embedding.detach() * 1)
    m(s, t_inf, y, indices=ind)["crd"].backward()
    assert m.embed_t.weight.grad.abs().sum() > 0


def _save_load(m: crd.CRD) -> dict:
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_dict_round_trip_keeps_banks_and_Z():
    m = bound(seed=0)
    m.train()
    s, t, y, ind = batch([4, 8, 15], seed=70)
    m(s, t, y, indices=ind)
    state = _save_load(m)
    assert set(state) == {"embed_s.weight", "embed_s.bias", "embed_t.weight", "embed_t.bias", "memory_s", "memory_t", "Z"}
    assert state["Z"].min() > 0

    bound_first = bound(seed=123)  # bind, then load (banks replaced)
    bound_first.load_state_dict(state)
    loaded_first = crd.CRD(S, T, **SMALL)  # load into empty banks, then bind (banks kept)
    torch.manual_seed(999)
    loaded_first.load_state_dict(state)
    loaded_first.bind_train_set(LABELS)
    s2, t2, y2, ind2 = batch([16, 23, 32], seed=71)
    for other in (bound_first, loaded_first):
        other.train()
        for name in ("memory_s", "memory_t", "Z"):
            assert torch.equal(getattr(other, name), getattr(m, name))
    ref = None
    for other in (m, bound_first, loaded_first):
        torch.manual_seed(4)
        terms = other(s2, t2, y2, indices=ind2)
        ref = ref or terms
        assert all(torch.equal(terms[k], ref[k]) for k in ref)
    assert torch.equal(bound_first.memory_t, m.memory_t) and torch.equal(loaded_first.memory_s, m.memory_s)


def test_state_dict_from_another_training_set_is_refused():
    state = _save_load(bound())
    other = bound(labels=torch.arange(30) % 3)
    with pytest.raises(RuntimeError, match="another training set"):
        other.load_state_dict(state)
    fresh = crd.CRD(S, T, **SMALL)
    fresh.load_state_dict(state)
    with pytest.raises(KDZooError, match="hold 40 samples but the training set has 30"):
        fresh.bind_train_set(torch.arange(30) % 3)


def test_determinism_under_manual_seed():
    def run(seed):
        m = bound(seed=seed)
        m.train()
        out = []
        for step, rows in enumerate(([1, 2, 3, 4], [5, 6, 7, 8])):
            s, t, y, ind = batch(rows, seed=80 + step)
            out.append(m(s, t, y, indices=ind)["crd"])
        return out, m.memory_s.clone(), m.Z.clone()

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(x, z) for x, z in zip(a[0], b[0]))
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    assert not torch.equal(a[1], c[1]) and a[0][0].item() != c[0][0].item()


def test_float64_and_autocast():
    m = bound().double()
    m.train()
    s, t, y, ind = batch([0, 1, 2], seed=90)
    s64 = Outputs(logits=s.logits.double(), embedding=s.embedding.double())
    t64 = Outputs(logits=t.logits.double(), embedding=t.embedding.double())
    assert m(s64, t64, y, indices=ind)["crd"].dtype == torch.float64
    assert m.memory_s.dtype == torch.float64
    m = bound()
    m.train()
    sb = Outputs(logits=s.logits.bfloat16(), embedding=s.embedding.bfloat16().requires_grad_())
    tb = Outputs(logits=t.logits.bfloat16(), embedding=t.embedding.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = m(sb, tb, y, indices=ind)
    assert terms["crd"].dtype == torch.float32 and torch.isfinite(terms["crd"])
    assert m.memory_s.dtype == torch.float32
    terms["crd"].backward()
    assert sb.embedding.grad is not None


def test_real_nets_of_different_widths():
    import timm

    import kdzoo_plugins.cifar_nets  # noqa: F401  (registers the CIFAR nets with timm)
    from kdzoo.models import KDNet

    torch.manual_seed(0)
    student = KDNet(timm.create_model("resnet8_cifar", num_classes=4), (32, 32))
    teacher = KDNet(timm.create_model("resnet8x4_cifar", num_classes=4), (32, 32))
    assert student.info.embed_dim != teacher.info.embed_dim
    m = crd.CRD(student.info, teacher.info, nce_k=16)
    m.bind_train_set(LABELS)
    m.train()
    x = torch.randn(4, 3, 32, 32)
    s_out = student(x, embedding=True)
    with torch.no_grad():
        t_out = teacher.eval()(x, embedding=True)
    ind = torch.tensor([0, 10, 20, 30])
    terms = m(s_out, t_out, LABELS[ind], indices=ind)
    sum(terms.values()).backward()
    assert torch.isfinite(terms["crd"])
    assert all(p.grad is not None for p in student.parameters())


# --------------------------------------------------------------------------- kdzoo.testing


def test_contract_checks():
    # kdzoo.testing binds a 64-sample synthetic training set, so nce_k must stay below 64
    check_method(crd.CRD, nce_k=16)
    check_method(crd.CRD, nce_k=16, w_kd=1.0)  # CRD+KD
