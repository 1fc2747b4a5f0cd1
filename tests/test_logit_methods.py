"""The logit methods dkd, dist, ctkd and kd's logit standardisation against independent computations.

The references are written here from the papers' and reference codes' formulas, with explicit
loops and numpy in float64; they share no code with the plugins (no masking trick for DKD's NCKD,
np.corrcoef next to a hand-written Pearson for DIST, finite differences for CTKD's temperature
gradient). No model is trained; every tensor is tiny.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdzoo import KDZooError
from kdzoo.methods import Method
from kdzoo.models import NetInfo, Outputs
from kdzoo.testing import check_method
from kdzoo_plugins import ctkd, dist, dkd, kd


def info(channels, sizes, embed_dim=8, num_classes=10) -> NetInfo:
    return NetInfo(stage_channels=tuple(channels), stage_sizes=tuple(tuple(s) for s in sizes),
                   embed_dim=embed_dim, num_classes=num_classes)


# a student and a teacher of different widths, depths and spatial sizes: logit methods must not care
STUDENT = info((4, 8, 16), ((16, 16), (8, 8), (4, 4)), embed_dim=16)
TEACHER = info((12, 24), ((6, 6), (3, 3)), embed_dim=24)


def randn(*shape, seed, scale=1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def softmax_np(z) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def kl_np(p, q) -> float:
    return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0))


def ce_ref(logits: torch.Tensor, labels: torch.Tensor) -> float:
    z, y = np64(logits), labels.numpy()
    return float(np.mean([-math.log(softmax_np(z[b])[y[b]]) for b in range(len(y))]))


def standardize_ref(z: np.ndarray) -> np.ndarray:
    """Per row: (z - mean) / (1e-7 + unbiased std), written out."""
    out = np.empty_like(z)
    for b in range(z.shape[0]):
        m = sum(z[b]) / len(z[b])
        std = math.sqrt(sum((v - m) ** 2 for v in z[b]) / (len(z[b]) - 1))
        out[b] = (z[b] - m) / (1e-7 + std)
    return out


def kd_ref(s: np.ndarray, t: np.ndarray, T: float) -> float:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes, mean over the batch."""
    return sum(kl_np(softmax_np(t[b] / T), softmax_np(s[b] / T)) for b in range(len(s))) / len(s) * T * T


def logits_case(seed=0, batch=6, classes=10):
    s, t = randn(batch, classes, seed=seed, scale=3.0), randn(batch, classes, seed=seed + 1, scale=3.0)
    y = torch.arange(batch) % classes
    return s, t, y


# --------------------------------------------------------------------------- declarations


@pytest.mark.parametrize("module, cls, name, defaults, terms", [
    (kd, kd.KD, "kd", {"w_ce": 0.1, "w_kd": 0.9, "T": 4.0, "logit_std": False}, {"ce", "kd"}),
    (dkd, dkd.DKD, "dkd", {"w_ce": 1.0, "w_tckd": 1.0, "w_nckd": 8.0, "T": 4.0, "warmup": 20, "logit_std": False},
     {"ce", "tckd", "nckd"}),
    (dist, dist.DIST, "dist", {"w_ce": 1.0, "w_inter": 2.0, "w_intra": 2.0, "T": 4.0}, {"ce", "inter", "intra"}),
    (ctkd, ctkd.CTKD, "ctkd", {"w_ce": 0.1, "w_kd": 0.9, "tau_init": 1.0, "T_min": 1.0, "T_range": 20.0,
                               "lambda_max": 0.0, "lambda_min": -1.0, "lambda_epochs": 10}, {"ce", "kd"}),
])
def test_declarations_and_registration_hook(module, cls, name, defaults, terms):
    got = []
    module.register_methods(lambda c, n=None: got.append((c, n)))
    assert got == [(cls, None)]
    assert issubclass(cls, Method) and cls.name == name and cls.family == "logits" and cls.reference
    assert cls.needs_teacher and not (cls.needs_features or cls.needs_embedding or cls.needs_preact or cls.needs_stem)
    assert cls.defaults == defaults and all(type(cls.defaults[k]) is type(v) for k, v in defaults.items())
    assert not {"alpha", "beta", "gamma"} & set(cls.defaults)
    s, t, y = logits_case()
    assert set(cls(STUDENT, TEACHER)(Outputs(s), Outputs(t), y)) == terms


@pytest.mark.parametrize("cls, hparams", [
    (kd.KD, {"logit_std": True}), (dkd.DKD, {}), (dkd.DKD, {"logit_std": True, "warmup": 0, "T": 2.0}),
    (dist.DIST, {}), (dist.DIST, {"T": 1.0}), (ctkd.CTKD, {}), (ctkd.CTKD, {"lambda_epochs": 0}),
])
def test_kdzoo_contract(cls, hparams):
    check_method(cls, **hparams)


def test_registered_through_kdzoos_entry_points():
    from kdzoo.plugins import load_plugins
    from kdzoo.testing import check_registered

    registry = load_plugins()
    for cls in (kd.KD, dkd.DKD, dist.DIST, ctkd.CTKD):
        check_registered(cls, registry)  # pyproject.toml: [project.entry-points.kdzoo] NAME = "kdzoo_plugins.NAME"
        assert registry.describe_origin(cls.name).startswith(f"plugin '{cls.name}' (kdzoo ")


def test_bad_hyperparameters_are_refused_with_the_fix():
    with pytest.raises(KDZooError, match=r"'dkd' needs a temperature T > 0, got T=0.0"):
        dkd.DKD(STUDENT, TEACHER, T=0.0)
    with pytest.raises(KDZooError, match=r"warmup must be >= 0 epochs, got -1.*0 turns the warm-up off"):
        dkd.DKD(STUDENT, TEACHER, warmup=-1)
    with pytest.raises(KDZooError, match=r"at least 3 classes, but the student has 2.*Use kd"):
        dkd.DKD(info((4,), ((4, 4),), num_classes=2), info((4,), ((4, 4),), num_classes=2))
    with pytest.raises(KDZooError, match=r"no hyperparameter 'beta'.*w_tckd, w_nckd"):
        dkd.DKD(STUDENT, TEACHER, beta=2.0)  # the paper's beta is w_nckd
    with pytest.raises(KDZooError, match=r"'dist' needs a temperature T > 0"):
        dist.DIST(STUDENT, TEACHER, T=-1.0)
    with pytest.raises(KDZooError, match=r"Did you mean 'T'"):
        dist.DIST(STUDENT, TEACHER, tau=4.0)  # the DIST code's tau is kdzoo's T
    with pytest.raises(KDZooError, match=r"T_min must be > 0 and T_range >= 0; got T_min=0.0"):
        ctkd.CTKD(STUDENT, TEACHER, T_min=0.0)
    with pytest.raises(KDZooError, match=r"T_range=-1.0"):
        ctkd.CTKD(STUDENT, TEACHER, T_range=-1.0)
    with pytest.raises(KDZooError, match=r"lambda_epochs must be >= 0"):
        ctkd.CTKD(STUDENT, TEACHER, lambda_epochs=-1)
    with pytest.raises(KDZooError, match="must be bool"):
        kd.KD(STUDENT, TEACHER, logit_std=1)


# --------------------------------------------------------------------------- logit standardisation


def test_standardize_against_unbiased_std_by_hand():
    z = randn(4, 7, seed=3, scale=5.0) + 2.0
    np.testing.assert_allclose(np64(kd.standardize(z.double())), standardize_ref(np64(z)), rtol=1e-12, atol=1e-12)
    # float32 as the methods compute it
    np.testing.assert_allclose(kd.standardize(z).numpy(), standardize_ref(np64(z)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [2.0, 4.0])
def test_kd_logit_std_against_hand_computation(T):
    s, t, y = logits_case(seed=10)
    terms = kd.KD(STUDENT, TEACHER, logit_std=True, T=T, w_kd=9.0, w_ce=0.1)(Outputs(s), Outputs(t), y)
    ref = kd_ref(standardize_ref(np64(s)), standardize_ref(np64(t)), T)
    assert terms["kd"].item() == pytest.approx(9.0 * ref, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(0.1 * ce_ref(s, y), rel=1e-5)  # CE stays on the raw logits
    # off by default: plain KD, which differs here
    plain = kd.KD(STUDENT, TEACHER, T=T)(Outputs(s), Outputs(t), y)["kd"].item()
    assert plain == pytest.approx(0.9 * kd_ref(np64(s), np64(t), T), rel=1e-5)
    assert abs(plain / 0.9 - ref) > 1e-3


def test_kd_logit_std_ignores_the_teachers_logit_scale_and_shift():
    s, t, y = logits_case(seed=20)
    m = kd.KD(STUDENT, TEACHER, logit_std=True)
    a = m(Outputs(s), Outputs(t), y)["kd"].item()
    b = m(Outputs(s), Outputs(3.0 * t + 5.0), y)["kd"].item()
    assert a == pytest.approx(b, rel=1e-5)
    plain = kd.KD(STUDENT, TEACHER)
    assert abs(plain(Outputs(s), Outputs(t), y)["kd"].item() - plain(Outputs(s), Outputs(3.0 * t + 5.0), y)["kd"].item()) > 1e-2


# --------------------------------------------------------------------------- dkd


def dkd_ref(s: np.ndarray, t: np.ndarray, y: np.ndarray, T: float) -> tuple[float, float]:
    """From the paper's definitions, one sample at a time: binary KL on [p_y, 1 - p_y]; KL of the
    softmax over the non-target logits only (no -1000 mask)."""
    tckd = nckd = 0.0
    for b in range(len(y)):
        ps, pt = softmax_np(s[b] / T), softmax_np(t[b] / T)
        others = [c for c in range(s.shape[1]) if c != y[b]]
        tckd += kl_np([pt[y[b]], sum(pt[others])], [ps[y[b]], sum(ps[others])])
        nckd += kl_np(softmax_np(t[b, others] / T), softmax_np(s[b, others] / T))
    return tckd * T * T / len(y), nckd * T * T / len(y)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dkd_against_hand_computation(T):
    s, t, y = logits_case(seed=30)
    t[0, y[0]] = 14.0  # a confident teacher: p_target close to 1
    s[1, y[1]] = 12.0  # a confident student
    m = dkd.DKD(STUDENT, TEACHER, T=T, w_ce=0.5, w_tckd=2.0, w_nckd=3.0, warmup=0)
    terms = m(Outputs(s), Outputs(t), y)
    tckd, nckd = dkd_ref(np64(s), np64(t), y.numpy(), T)
    assert tckd > 1e-3 and nckd > 1e-3
    assert terms["tckd"].item() == pytest.approx(2.0 * tckd, rel=1e-5)
    assert terms["nckd"].item() == pytest.approx(3.0 * nckd, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(0.5 * ce_ref(s, y), rel=1e-5)


def test_dkd_logit_std_standardises_before_the_temperature():
    s, t, y = logits_case(seed=40)
    terms = dkd.DKD(STUDENT, TEACHER, logit_std=True, T=2.0, warmup=0)(Outputs(s), Outputs(t), y)
    tckd, nckd = dkd_ref(standardize_ref(np64(s)), standardize_ref(np64(t)), y.numpy(), 2.0)
    assert terms["tckd"].item() == pytest.approx(tckd, rel=1e-5)
    assert terms["nckd"].item() == pytest.approx(8.0 * nckd, rel=1e-5)


def test_dkd_identical_logits_give_zero_kd():
    s, _, y = logits_case(seed=50)
    terms = dkd.DKD(STUDENT, TEACHER, warmup=0)(Outputs(s), Outputs(s.clone()), y)
    assert abs(terms["tckd"].item()) < 1e-5 and abs(terms["nckd"].item()) < 1e-5  # float32 rounding


def test_dkd_warmup_matches_mdistillers_one_based_epochs():
    s, t, y = logits_case(seed=60)
    tckd, nckd = dkd_ref(np64(s), np64(t), y.numpy(), 4.0)
    m = dkd.DKD(STUDENT, TEACHER)  # warmup 20
    for epoch in (0, 1, 9, 18, 19, 20, 239):
        m.start_epoch(epoch, 240)  # kdzoo's epochs count from 0
        md_epoch = epoch + 1  # mdistiller's trainer runs epoch = 1 .. EPOCHS and uses min(epoch / 20, 1)
        warm = min(md_epoch / 20, 1.0)
        terms = m(Outputs(s), Outputs(t), y)
        assert terms["tckd"].item() == pytest.approx(warm * 1.0 * tckd, rel=1e-5), epoch
        assert terms["nckd"].item() == pytest.approx(warm * 8.0 * nckd, rel=1e-5), epoch
        assert terms["ce"].item() == pytest.approx(ce_ref(s, y), rel=1e-5)  # CE is never warmed up
    m.start_epoch(0, 240)
    assert m.warm == pytest.approx(1 / 20) and m(Outputs(s), Outputs(t), y)["nckd"].item() > 0
    m.start_epoch(19, 240)
    assert m.warm == 1.0
    off = dkd.DKD(STUDENT, TEACHER, warmup=0)
    assert off.warm == 1.0
    assert dkd.DKD(STUDENT, TEACHER, warmup=4).warm == pytest.approx(0.25)


# mdistiller configs/cifar100/dkd/*.yaml: (teacher, student) as MD names them -> DKD.BETA (absent: 8)
MD_DKD_CONFIGS = {
    ("resnet56", "resnet20"): 2.0, ("resnet110", "resnet32"): 2.0,
    ("vgg13", "vgg8"): 6.0, ("vgg13", "MobileNetV2"): 6.0,
    ("wrn_40_2", "wrn_16_2"): 6.0, ("wrn_40_2", "wrn_40_1"): 6.0,
    ("resnet32x4", "resnet8x4"): 8.0, ("resnet32x4", "ShuffleV1"): 8.0, ("resnet32x4", "ShuffleV2"): 8.0,
    ("ResNet50", "MobileNetV2"): 8.0, ("wrn_40_2", "ShuffleV1"): 8.0,
}
MD_TO_KDZOO = {"vgg13": "vgg13_cifar", "MobileNetV2": "mobile_half", "ShuffleV1": "shufflenet_v1",
               "ShuffleV2": "shufflenet_v2", "ResNet50": "resnet50_cifar"}


def test_dkd_pair_defaults_are_mdistillers_configs():
    assert dkd.DKD.resolve_defaults("resnet56", "resnet20")["w_nckd"] == 2.0
    assert dkd.DKD.resolve_defaults("resnet56_cifar", "resnet20_cifar")["w_nckd"] == 2.0  # _cifar is ignored
    assert dkd.DKD.resolve_defaults("resnet56", "resnet20_cifar") == {**dkd.DKD.defaults, "w_nckd": 2.0}
    for (t, s), beta in MD_DKD_CONFIGS.items():
        t, s = MD_TO_KDZOO.get(t, t), MD_TO_KDZOO.get(s, s)
        got = dkd.DKD.resolve_defaults(t, s)
        assert got == {**dkd.DKD.defaults, "w_nckd": beta}, (t, s)
        short = (t.removesuffix("_cifar"), s.removesuffix("_cifar"))
        if short != (t, s):  # vgg13 and resnet50 are timm's ImageNet nets, not the CIFAR ones: no match
            assert dkd.DKD.resolve_defaults(*short) == dkd.DKD.defaults
    assert len(dkd.DKD.pair_defaults) == len(MD_DKD_CONFIGS)
    # other pairs, and the pairs the wrong way round, keep the default
    assert dkd.DKD.resolve_defaults("resnet110", "resnet20")["w_nckd"] == 8.0
    assert dkd.DKD.resolve_defaults("resnet20", "resnet56")["w_nckd"] == 8.0
    assert dkd.DKD.resolve_defaults(None, None) == dkd.DKD.defaults


def test_dkd_pair_defaults_name_registered_models():
    from kdzoo.plugins import load_plugins

    names = set(load_plugins().model_names())
    for pair in dkd.DKD.pair_defaults:
        assert set(pair) <= names, pair


# --------------------------------------------------------------------------- dist


def pearson_ref(a: np.ndarray, b: np.ndarray) -> float:
    """The reference's cosine of the centred vectors, with its eps outside the product of norms."""
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (v - mb) for x, v in zip(a, b))
    na = math.sqrt(sum((x - ma) ** 2 for x in a))
    nb = math.sqrt(sum((v - mb) ** 2 for v in b))
    return num / (na * nb + 1e-8)


def dist_ref(s: np.ndarray, t: np.ndarray, T: float) -> tuple[float, float]:
    ys = np.stack([softmax_np(r / T) for r in s])
    yt = np.stack([softmax_np(r / T) for r in t])
    B, C = ys.shape
    inter = 1 - sum(pearson_ref(ys[i], yt[i]) for i in range(B)) / B
    intra = 1 - sum(pearson_ref(ys[:, c], yt[:, c]) for c in range(C)) / C
    return T * T * inter, T * T * intra


@pytest.mark.parametrize("T", [4.0, 1.0])
def test_dist_against_hand_pearson(T):
    s, t, y = logits_case(seed=70, batch=5, classes=8)
    net_s, net_t = info((4, 8), ((8, 8), (4, 4)), num_classes=8), info((16,), ((2, 2),), num_classes=8)
    m = dist.DIST(net_s, net_t, T=T)
    terms = m(Outputs(s), Outputs(t), y)
    inter, intra = dist_ref(np64(s), np64(t), T)
    assert inter > 1e-3 and intra > 1e-3
    assert terms["inter"].item() == pytest.approx(2.0 * inter, rel=1e-5)
    assert terms["intra"].item() == pytest.approx(2.0 * intra, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(ce_ref(s, y), rel=1e-5)
    # the hand-written Pearson is numpy's (the eps aside): rows for inter, columns for intra
    ys = np.stack([softmax_np(r / T) for r in np64(s)])
    yt = np.stack([softmax_np(r / T) for r in np64(t)])
    inter_np = 1 - np.mean([np.corrcoef(ys[i], yt[i])[0, 1] for i in range(len(ys))])
    intra_np = 1 - np.mean([np.corrcoef(ys[:, c], yt[:, c])[0, 1] for c in range(ys.shape[1])])
    assert terms["inter"].item() == pytest.approx(2.0 * T * T * inter_np, rel=1e-3)
    assert terms["intra"].item() == pytest.approx(2.0 * T * T * intra_np, rel=1e-3)


def test_dist_weights_are_separate_and_explicit():
    s, t, y = logits_case(seed=80)
    inter, intra = dist_ref(np64(s), np64(t), 4.0)
    terms = dist.DIST(STUDENT, TEACHER, w_inter=1.0, w_intra=0.0)(Outputs(s), Outputs(t), y)
    assert terms["inter"].item() == pytest.approx(inter, rel=1e-5) and terms["intra"].item() == 0.0


def test_dist_is_invariant_to_what_pearson_ignores_and_zero_for_identical():
    s, t, y = logits_case(seed=90)
    m = dist.DIST(STUDENT, TEACHER)
    same = m(Outputs(s), Outputs(s.clone()), y)
    inter, intra = dist_ref(np64(s), np64(s), 4.0)  # not exactly 0: the eps in the Pearson denominator
    assert same["inter"].item() == pytest.approx(2.0 * inter, abs=2e-5) and same["inter"].item() < 1e-3
    assert same["intra"].item() == pytest.approx(2.0 * intra, abs=2e-5) and same["intra"].item() < 1e-3
    # adding a constant to a row of logits leaves its softmax, hence both terms, unchanged
    shifted = t + torch.arange(len(t), dtype=t.dtype)[:, None] * 7.0
    a, b = m(Outputs(s), Outputs(t), y), m(Outputs(s), Outputs(shifted), y)
    assert a["inter"].item() == pytest.approx(b["inter"].item(), rel=1e-5)
    assert a["intra"].item() == pytest.approx(b["intra"].item(), rel=1e-5)


def test_dist_batch_of_one_intra_is_constant_and_gradients_stay_finite():
    s = randn(1, 10, seed=100).requires_grad_(True)
    t = randn(1, 10, seed=101)
    terms = dist.DIST(STUDENT, TEACHER)(Outputs(s), Outputs(t), torch.tensor([3]))
    assert terms["intra"].item() == pytest.approx(2.0 * 16.0, rel=1e-6)  # no correlation across one sample
    inter, _ = dist_ref(np64(s), np64(t), 4.0)
    assert terms["inter"].item() == pytest.approx(2.0 * inter, rel=1e-5)
    sum(terms.values()).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


# --------------------------------------------------------------------------- ctkd


def ctkd_lambda_ref(kdzoo_epoch: int) -> float:
    """CTKD's CosineDecay(max 0, min -1, loops 10).get_value(epoch), its epochs counting from 1."""
    e = min(max(kdzoo_epoch + 1, 0), 10)
    return (math.cos(e * math.pi / 10) + 1) / 2 * (0 - (-1)) + (-1)


def test_ctkd_lambda_follows_the_reference_cosine():
    m = ctkd.CTKD(STUDENT, TEACHER)
    got = []
    for epoch in range(14):
        m.start_epoch(epoch, 240)
        got.append(m.grl_lambda)
    assert got == pytest.approx([ctkd_lambda_ref(e) for e in range(14)], abs=1e-12)
    assert got[0] == pytest.approx(-0.0244717, abs=1e-6) and got[4] == pytest.approx(-0.5)
    assert all(v == -1.0 for v in got[9:]) and all(a > b for a, b in zip(got[:9], got[1:10]))
    now = ctkd.CTKD(STUDENT, TEACHER, lambda_epochs=0)
    assert now.grl_lambda == -1.0


def test_ctkd_loss_uses_the_learned_temperature():
    s, t, y = logits_case(seed=110)
    m = ctkd.CTKD(STUDENT, TEACHER)
    T = 1 + 20 / (1 + math.exp(-1.0))  # global_T starts at 1
    assert m.temperature == pytest.approx(T, rel=1e-12) and T == pytest.approx(15.62, abs=0.01)
    terms = m(Outputs(s), Outputs(t), y)
    assert terms["kd"].item() == pytest.approx(0.9 * kd_ref(np64(s), np64(t), T), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(0.1 * ce_ref(s, y), rel=1e-5)
    with torch.no_grad():
        m.global_T.fill_(-2.0)
    T2 = 1 + 20 / (1 + math.exp(2.0))
    assert m(Outputs(s), Outputs(t), y)["kd"].item() == pytest.approx(0.9 * kd_ref(np64(s), np64(t), T2), rel=1e-5)
    other = ctkd.CTKD(STUDENT, TEACHER, tau_init=0.0, T_min=2.0, T_range=4.0)
    assert other.temperature == pytest.approx(4.0)
    assert ["global_T"] == [n for n, _ in m.named_parameters()] and "global_T" in m.state_dict()


@pytest.mark.parametrize("epoch", [0, 4, 30])
def test_ctkd_gradient_reversal_on_the_temperature(epoch):
    s, t, y = logits_case(seed=120)
    m = ctkd.CTKD(STUDENT, TEACHER)
    m.start_epoch(epoch, 240)
    lam = ctkd_lambda_ref(epoch)
    s_leaf = s.clone().requires_grad_(True)
    sum(m(Outputs(s_leaf), Outputs(t), y).values()).backward()

    # the plain derivative of w_kd * KD with respect to global_T, by central differences in float64
    def weighted_kd(tau: float) -> float:
        return 0.9 * kd_ref(np64(s), np64(t), 1 + 20 / (1 + math.exp(-tau)))

    h = 1e-4
    plain = (weighted_kd(1.0 + h) - weighted_kd(1.0 - h)) / (2 * h)
    assert abs(plain) > 1e-3
    assert m.global_T.grad.item() == pytest.approx(lam * plain, rel=1e-3)
    assert m.global_T.grad.item() * plain < 0  # reversed: one optimiser step raises the KD loss through T
    # the student's gradient is not reversed: d/ds of w_kd T^2 KL + w_ce CE, analytically
    T = 1 + 20 / (1 + math.exp(-1.0))
    S, Tt, B = np64(s), np64(t), len(s)
    want = np.stack([0.9 * T * (softmax_np(S[b] / T) - softmax_np(Tt[b] / T)) / B
                     + 0.1 * (softmax_np(S[b]) - np.eye(S.shape[1])[y[b]]) / B for b in range(B)])
    np.testing.assert_allclose(s_leaf.grad.numpy(), want, rtol=1e-4, atol=1e-7)


def test_ctkd_temperature_step_raises_the_kd_loss_and_zero_lambda_freezes_it():
    s, t, y = logits_case(seed=130)
    m = ctkd.CTKD(STUDENT, TEACHER)
    m.start_epoch(20, 240)  # lambda = -1
    m(Outputs(s), Outputs(t), y)["kd"].backward()
    before = kd_ref(np64(s), np64(t), m.temperature)
    with torch.no_grad():
        m.global_T -= 0.05 * m.global_T.grad  # a plain SGD step, as the engine's optimiser takes
    assert kd_ref(np64(s), np64(t), m.temperature) > before
    frozen = ctkd.CTKD(STUDENT, TEACHER, lambda_max=0.0, lambda_min=0.0)
    frozen(Outputs(s), Outputs(t), y)["kd"].backward()
    assert frozen.global_T.grad.item() == 0.0


# --------------------------------------------------------------------------- all four


def all_methods():
    return [kd.KD(STUDENT, TEACHER, logit_std=True), dkd.DKD(STUDENT, TEACHER, logit_std=True),
            dkd.DKD(STUDENT, TEACHER), dist.DIST(STUDENT, TEACHER), ctkd.CTKD(STUDENT, TEACHER)]


@pytest.mark.parametrize("index", range(5))
def test_teacher_outputs_from_inference_mode_are_usable(index):
    s, t, y = logits_case(seed=140)
    with torch.inference_mode():
        t_inf = t.clone()
    m, ref = all_methods()[index], all_methods()[index]
    s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    got, want = m(Outputs(s1), Outputs(t_inf), y), ref(Outputs(s2), Outputs(t), y)
    sum(got.values()).backward()
    sum(want.values()).backward()
    assert got.keys() == want.keys()
    for k in got:
        assert got[k].item() == pytest.approx(want[k].item(), rel=1e-6)
    assert torch.allclose(s1.grad, s2.grad)


@pytest.mark.parametrize("index", range(5))
def test_float32_terms_under_bf16_autocast(index):
    s, t, y = logits_case(seed=150)
    m, ref = all_methods()[index], all_methods()[index]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m(Outputs(s.bfloat16()), Outputs(t.bfloat16()), y)
    want = ref(Outputs(s.bfloat16().float()), Outputs(t.bfloat16().float()), y)
    for k in got:
        if k != "ce":  # ce is the engine's cross-entropy, autocast's business
            assert got[k].dtype == torch.float32
            assert got[k].item() == pytest.approx(want[k].item(), rel=1e-5), k
