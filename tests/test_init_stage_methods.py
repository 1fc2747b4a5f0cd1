"""The init-stage methods ab, ft and fsp against independent hand computations.

References are written here with explicit loops and numpy in float64 from RepDistiller's formulas
(distiller_zoo/AB.py, FT.py, FSP.py, models/util.py, helper/pretrain.py); they share no code with
the plugins. No model is trained; every tensor is tiny.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import timm
import torch
from torch import nn

import kdzoo_plugins.cifar_nets  # noqa: F401  (registers the CIFAR nets with timm)
from kdzoo import KDZooError
from kdzoo.methods import PairNotSupported
from kdzoo.models import KDNet, NetInfo, Outputs
from kdzoo.testing import (NETINFO_PAIRS, check_declaration, check_determinism, check_dtypes_and_devices,
                           check_hparams, check_method, check_state_dict, check_terms)
from kdzoo_plugins import ab, fsp, ft


def info(channels, sizes, preact=True, stem=(0, (0, 0)), num_classes=10) -> NetInfo:
    return NetInfo(stage_channels=tuple(channels), stage_sizes=tuple(tuple(s) for s in sizes), embed_dim=channels[-1],
                   num_classes=num_classes, has_preact=preact, stem_channels=stem[0], stem_size=tuple(stem[1]))


def randn(*shape, seed, scale=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def maps(channels, sizes, batch, seed, scale=1.0, relu=False, requires_grad=False) -> list[torch.Tensor]:
    out = []
    for i, (c, (h, w)) in enumerate(zip(channels, sizes)):
        f = randn(batch, c, h, w, seed=seed + i, scale=scale)
        out.append((f.relu() if relu else f).requires_grad_(requires_grad))
    return out


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def ce_ref(logits: torch.Tensor, labels: torch.Tensor) -> float:
    z, y = np64(logits), labels.numpy()
    tot = 0.0
    for b in range(len(y)):
        m = z[b].max()
        tot += -(z[b, y[b]] - m - math.log(sum(math.exp(v - m) for v in z[b])))
    return tot / len(y)


def block_pool(f: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Average over equal blocks (what adaptive average pooling does when the sizes divide)."""
    B, C, H, W = f.shape
    kh, kw = H // size[0], W // size[1]
    assert kh * size[0] == H and kw * size[1] == W
    out = np.zeros((B, C, *size))
    for i in range(size[0]):
        for j in range(size[1]):
            out[:, :, i, j] = f[:, :, i * kh:(i + 1) * kh, j * kw:(j + 1) * kw].mean(axis=(2, 3))
    return out


def params_of(*modules: nn.Module) -> set[int]:
    return {id(p) for m in modules for p in m.parameters()}


def tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet8_cifar", num_classes=10)


LOGITS, LABELS = randn(3, 10, seed=999, scale=2.0), torch.tensor([0, 4, 9])


# =========================================================================== ab

def ab_ref(g_s: list[np.ndarray], g_t: list[np.ndarray], margin: float = 1.0) -> float:
    """RD's ABLoss, element by element: stage i of n weighted 2^(i-n+1), divided by B, times 3/1000."""
    n, B = len(g_s), g_s[0].shape[0]
    total = 0.0
    for i, (s, t) in enumerate(zip(g_s, g_t)):
        stage = 0.0
        for sv, tv in zip(s.ravel(), t.ravel()):
            if sv > -margin and tv <= 0:
                stage += (sv + margin) ** 2
            if sv <= margin and tv > 0:
                stage += (sv - margin) ** 2
        total += 2.0 ** (i - n + 1) * stage
    return total / B * 3 / 1000


AB_S = info((4, 8, 16), ((8, 8), (4, 4), (2, 2)))


def test_ab_identity_connectors_against_loops():
    """Equal shapes: every connector is the identity, so the loss is the bare formula on the preacts."""
    m = ab.AB(AB_S, AB_S)
    assert m.pairs == [(0, 0), (1, 1), (2, 2)]
    assert all(isinstance(c, nn.Identity) for c in m.connectors) and not list(m.parameters())
    ps = maps((4, 8, 16), ((8, 8), (4, 4), (2, 2)), 3, seed=10, scale=1.5)
    pt = maps((4, 8, 16), ((8, 8), (4, 4), (2, 2)), 3, seed=20, scale=1.5)
    terms = m.init_forward(Outputs(LOGITS, preact=ps), Outputs(LOGITS, preact=pt), LABELS)
    assert set(terms) == {"ab"} and terms["ab"].dtype == torch.float32 and terms["ab"].dim() == 0
    ref = ab_ref([np64(f) for f in ps], [np64(f) for f in pt])
    assert ref > 0.01
    assert terms["ab"].item() == pytest.approx(ref, rel=1e-5)
    # stage weights 1/4, 1/2, 1: the deepest stage counts most
    assert m.stage_weights == [0.25, 0.5, 1.0]
    # margin and w_ab
    m2 = ab.AB(AB_S, AB_S, margin=0.5, w_ab=2.0)
    got = m2.init_forward(Outputs(LOGITS, preact=ps), Outputs(LOGITS, preact=pt), LABELS)["ab"].item()
    assert got == pytest.approx(2.0 * ab_ref([np64(f) for f in ps], [np64(f) for f in pt], 0.5), rel=1e-5)
    assert abs(got - 2 * terms["ab"].item()) > 1e-4  # the margin matters


def test_ab_matching_activation_boundaries_give_zero():
    """A student beyond the margin on the teacher's side of every boundary has nothing left to learn."""
    pt = maps((4, 8, 16), ((8, 8), (4, 4), (2, 2)), 2, seed=30)
    ps = [torch.where(t > 0, 1.5, -1.5) for t in pt]
    m = ab.AB(AB_S, AB_S)
    assert m.init_forward(Outputs(LOGITS[:2], preact=ps), Outputs(LOGITS[:2], preact=pt), LABELS[:2])["ab"].item() == 0.0
    inside = [torch.where(t > 0, 0.5, -0.5) for t in pt]  # right side, but within the margin
    assert m.init_forward(Outputs(LOGITS[:2], preact=inside), Outputs(LOGITS[:2], preact=pt), LABELS[:2])["ab"].item() > 0


def test_ab_connectors_different_widths_and_sizes():
    # no shared size: aligned from the last stage; every student map is twice the teacher's
    s_info = info((4, 8, 16), ((18, 18), (10, 10), (6, 6)))
    t_info = info((6, 10, 12), ((9, 9), (5, 5), (3, 3)))
    m = ab.AB(s_info, t_info)
    assert m.pairs == [(0, 0), (1, 1), (2, 2)]
    for conn, (cs, ct) in zip(m.connectors, [(4, 6), (8, 10), (16, 12)]):
        assert len(conn) == 2  # conv -> BN, no ReLU (RD ConvReg(use_relu=False))
        conv, bn = conn
        assert type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d)
        assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == (cs, ct, (3, 3), (2, 2), (1, 1))
    assert not any(isinstance(x, nn.ReLU) for x in m.modules())
    ps = maps(s_info.stage_channels, s_info.stage_sizes, 3, seed=40, scale=1.5, requires_grad=True)
    pt = maps(t_info.stage_channels, t_info.stage_sizes, 3, seed=50, scale=1.5, requires_grad=True)
    terms = m.init_forward(Outputs(LOGITS, preact=ps), Outputs(LOGITS, preact=pt), LABELS)
    g_s = [np64(c(f)) for c, f in zip(m.connectors, ps)]
    assert terms["ab"].item() == pytest.approx(ab_ref(g_s, [np64(f) for f in pt]), rel=1e-5)
    terms["ab"].backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in ps)
    assert all(f.grad is None for f in pt)  # the teacher only enters through comparisons
    assert all(p.grad is not None for p in m.connectors.parameters())


def test_ab_1x1_connector_by_hand_and_two_stage_weights():
    """Equal sizes, other widths: conv 1x1 + BatchNorm (batch statistics), by hand; a shallower
    teacher pairs two stages, weighted 1/2 and 1."""
    s_info = info((4, 8, 16), ((8, 8), (4, 4), (2, 2)))
    t_info = info((8, 6), ((4, 4), (2, 2)))
    m = ab.AB(s_info, t_info)
    assert m.pairs == [(0, 1), (1, 2)] and m.stage_weights == [0.5, 1.0]
    ps = maps(s_info.stage_channels, s_info.stage_sizes, 4, seed=60, scale=1.5)
    pt = maps(t_info.stage_channels, t_info.stage_sizes, 4, seed=70, scale=1.5)
    assert isinstance(m.connectors[0], nn.Identity)  # 8 channels at 4x4 on both sides
    conv, bn = m.connectors[1]
    assert conv.kernel_size == (1, 1)
    with torch.no_grad():
        bn.weight.copy_(randn(6, seed=80))
        bn.bias.copy_(randn(6, seed=81))
    x = np64(ps[2])
    y = np.einsum("oc,bchw->bohw", np64(conv.weight)[:, :, 0, 0], x) + np64(conv.bias)[None, :, None, None]
    mean, var = y.mean(axis=(0, 2, 3), keepdims=True), y.var(axis=(0, 2, 3), keepdims=True)
    y = (y - mean) / np.sqrt(var + bn.eps) * np64(bn.weight)[None, :, None, None] + np64(bn.bias)[None, :, None, None]
    terms = m.init_forward(Outputs(LOGITS, preact=ps), Outputs(LOGITS, preact=pt), LABELS)
    assert terms["ab"].item() == pytest.approx(ab_ref([np64(ps[1]), y], [np64(pt[0]), np64(pt[1])]), rel=1e-5)


def test_ab_main_stage_is_ce_only_and_freezes_connectors():
    m = ab.AB(AB_S, info((6, 8, 16), ((8, 8), (4, 4), (2, 2))))
    conn = list(m.connectors[0].parameters())
    assert conn and all(p.requires_grad for p in conn)
    for p in conn:
        p.grad = torch.ones_like(p)  # left over from the init stage
    m.start_epoch(0, 240)
    assert all(not p.requires_grad and p.grad is None for p in m.parameters())
    ps = maps((4, 8, 16), ((8, 8), (4, 4), (2, 2)), 3, seed=90)
    logits = LOGITS.clone().requires_grad_(True)
    terms = m(Outputs(logits, preact=ps), Outputs(LOGITS, preact=ps), LABELS)
    assert set(terms) == {"ce"}
    assert terms["ce"].item() == pytest.approx(ce_ref(LOGITS, LABELS), rel=1e-6)
    assert m(Outputs(logits), Outputs(LOGITS), LABELS)["ce"].item() == terms["ce"].item()  # reads only the logits
    assert ab.AB(AB_S, AB_S, w_ce=0.5)(Outputs(logits), Outputs(LOGITS), LABELS)["ce"].item() == pytest.approx(0.5 * ce_ref(LOGITS, LABELS), rel=1e-6)
    # the init stage makes them trainable again
    student = tiny_resnet()
    m.init_parameters(student)
    assert all(p.requires_grad for p in m.parameters())


def test_ab_init_parameters_are_connectors_and_student_features():
    student = tiny_resnet()
    s_info = info((16, 32, 64), ((32, 32), (16, 16), (8, 8)))
    m = ab.AB(s_info, info((32, 64, 128), ((32, 32), (16, 16), (8, 8))))
    got = m.init_parameters(student)
    assert len(got) == len({id(p) for p in got})
    head = student.get_classifier()
    assert isinstance(head, nn.Linear)
    expected = params_of(m.connectors) | (params_of(student) - params_of(head))
    assert {id(p) for p in got} == expected
    assert not params_of(head) & {id(p) for p in got}
    assert params_of(m.connectors) <= {id(p) for p in got} and len(params_of(m.connectors)) == 12  # 3 x (conv w, b; BN w, b)
    # through a KDNet wrapper too (what the engine passes)
    net = KDNet(student, (32, 32))
    assert {id(p) for p in m.init_parameters(net)} == expected


def test_ab_refuses_nets_without_preact():
    with pytest.raises(PairNotSupported, match="teacher backbone does not declare them"):
        ab.AB(AB_S, info((4, 8, 16), ((8, 8), (4, 4), (2, 2)), preact=False))
    with pytest.raises(PairNotSupported, match="student and the teacher backbones do"):
        ab.AB(info((4,), ((8, 8),), preact=False), info((4,), ((8, 8),), preact=False))
    with pytest.raises(KDZooError, match="margin > 0"):
        ab.AB(AB_S, AB_S, margin=0.0)
    with pytest.raises(KDZooError, match="cannot build a connector.*map of 4x6x6 to a teacher map of 4x10x10"):
        ab.AB(info((4, 3), ((6, 6), (3, 3))), info((4, 4), ((10, 10), (5, 5))))


# =========================================================================== ft

def conv3x3_ref(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Conv2d(k=3, stride 1, padding 1) by its definition."""
    B, C, H, W = x.shape
    xp = np.zeros((B, C, H + 2, W + 2))
    xp[:, :, 1:-1, 1:-1] = x
    out = np.zeros((B, w.shape[0], H, W))
    for o in range(w.shape[0]):
        for i in range(H):
            for j in range(W):
                out[:, o, i, j] = b[o] + np.einsum("bcyx,cyx->b", xp[:, :, i:i + 3, j:j + 3], w[o])
    return out


def convT3x3_ref(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ConvTranspose2d(k=3, stride 1, padding 1): input (i, j) scatters w[c, o, ky, kx] to (i - 1 + ky, j - 1 + kx)."""
    B, C, H, W = x.shape
    out = np.zeros((B, w.shape[1], H, W)) + b[None, :, None, None]
    for i in range(H):
        for j in range(W):
            for ky in range(3):
                for kx in range(3):
                    oi, oj = i - 1 + ky, j - 1 + kx
                    if 0 <= oi < H and 0 <= oj < W:
                        out[:, :, oi, oj] += np.einsum("bc,co->bo", x[:, :, i, j], w[:, :, ky, kx])
    return out


def lrelu(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x, 0.1 * x)


def factor_ref(f: np.ndarray, mode: str = "rd") -> np.ndarray:
    B = f.shape[0]
    out = []
    for b in range(B):
        v = (f[b] ** 2).mean(axis=0).ravel() if mode == "rd" else f[b].ravel()
        out.append(v / max(math.sqrt(float((v * v).sum())), 1e-12))
    return np.array(out)


def ft_ref(fs: np.ndarray, f_t: np.ndarray, mode: str = "rd") -> float:
    size = (min(fs.shape[2], f_t.shape[2]), min(fs.shape[3], f_t.shape[3]))
    fs = block_pool(fs, size) if fs.shape[2:] != size else fs
    f_t = block_pool(f_t, size) if f_t.shape[2:] != size else f_t
    return float(np.abs(factor_ref(fs, mode) - factor_ref(f_t, mode)).mean())


def convs(seq: nn.Module, cls: type) -> list[nn.Module]:
    return [x for x in seq if isinstance(x, cls)]


FT_S = info((4, 6), ((8, 8), (4, 4)), preact=False)
FT_T = info((8, 10), ((4, 4), (2, 2)), preact=False)


def test_ft_modules_follow_repdistiller():
    m = ft.FT(FT_S, FT_T)  # C_s = 6, C_t = 10, k = int(10 * 0.5) = 5
    enc, dec = m.paraphraser.encoder, m.paraphraser.decoder
    assert [(c.in_channels, c.out_channels) for c in convs(enc, nn.Conv2d)] == [(10, 10), (10, 5), (5, 5)]
    assert [(c.in_channels, c.out_channels) for c in convs(dec, nn.ConvTranspose2d)] == [(5, 5), (5, 10), (10, 10)]
    assert not convs(enc, nn.BatchNorm2d) and not convs(dec, nn.BatchNorm2d)  # RD use_bn=False
    assert [(c.in_channels, c.out_channels) for c in convs(m.translator, nn.Conv2d)] == [(6, 6), (6, 5), (5, 5)]
    assert [b.num_features for b in convs(m.translator, nn.BatchNorm2d)] == [6, 5, 5]  # RD use_bn=True
    for seq in (enc, dec, m.translator):
        acts = convs(seq, nn.LeakyReLU)
        assert len(acts) == 3 and all(a.negative_slope == 0.1 for a in acts)
        assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.stride == (1, 1)
                   for c in convs(seq, nn.Conv2d) + convs(seq, nn.ConvTranspose2d))
    assert ft.FT(FT_S, info((8, 7), ((4, 4), (2, 2))), rate=0.5).translator[4].num_features == 3  # int(3.5)


def test_ft_paraphraser_and_reconstruction_by_hand():
    t_info = info((3, 4), ((6, 6), (3, 3)), preact=False)
    m = ft.FT(FT_S, t_info)  # k = 2
    ft_t = maps((3, 4), ((6, 6), (3, 3)), 2, seed=100, relu=True)
    x = np64(ft_t[-1])
    h = x
    for conv in convs(m.paraphraser.encoder, nn.Conv2d):
        h = lrelu(conv3x3_ref(h, np64(conv.weight), np64(conv.bias)))
    factor = h
    for conv in convs(m.paraphraser.decoder, nn.ConvTranspose2d):
        h = lrelu(convT3x3_ref(h, np64(conv.weight), np64(conv.bias)))
    np.testing.assert_allclose(np64(m.teacher_factor(Outputs(LOGITS[:2], features=ft_t))), factor, rtol=1e-5, atol=1e-6)
    assert m.init_uses_student is False
    terms = m.init_forward(None, Outputs(LOGITS[:2], features=ft_t), LABELS[:2])  # no student in the init stage
    assert set(terms) == {"rec"}
    assert terms["rec"].item() == pytest.approx(float(((h - x) ** 2).mean()), rel=1e-5)
    w = ft.FT(FT_S, t_info, w_rec=3.0)
    w.load_state_dict(m.state_dict())
    assert w.init_forward(None, Outputs(LOGITS[:2], features=ft_t), LABELS[:2])["rec"].item() == pytest.approx(3 * terms["rec"].item(), rel=1e-6)


@pytest.mark.parametrize("mode", ["rd", "paper"])
def test_ft_loss_different_widths_and_sizes(mode):
    """Student 6 x 4x4, teacher 10 x 2x2: the translator's 5 x 4x4 output is pooled to 2x2."""
    m = ft.FT(FT_S, FT_T, factor=mode) if mode != "rd" else ft.FT(FT_S, FT_T)
    fs = maps(FT_S.stage_channels, FT_S.stage_sizes, 3, seed=110, relu=True, requires_grad=True)
    f_t = maps(FT_T.stage_channels, FT_T.stage_sizes, 3, seed=120, relu=True, requires_grad=True)
    logits = LOGITS.clone().requires_grad_(True)
    terms = m(Outputs(logits, features=fs), Outputs(LOGITS, features=f_t), LABELS)
    assert set(terms) == {"ce", "ft"} and terms["ft"].dtype == torch.float32
    trans = m.translator(fs[-1])
    assert tuple(trans.shape) == (3, 5, 4, 4)
    factor_t = m.teacher_factor(Outputs(LOGITS, features=f_t))
    assert tuple(factor_t.shape) == (3, 5, 2, 2)
    ref = ft_ref(np64(trans), np64(factor_t), mode)
    assert ref > 1e-3
    assert terms["ft"].item() == pytest.approx(200.0 * ref, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(ce_ref(LOGITS, LABELS), rel=1e-6)
    sum(terms.values()).backward()
    assert fs[-1].grad is not None and fs[-1].grad.abs().sum() > 0
    assert f_t[-1].grad is None
    assert all(p.grad is None for p in m.paraphraser.parameters())  # no_grad on the teacher side
    assert all(p.grad is not None for p in m.translator.parameters())


def test_ft_rd_and_paper_factors_differ():
    fs = maps(FT_S.stage_channels, FT_S.stage_sizes, 3, seed=130, relu=True)
    f_t = maps(FT_T.stage_channels, FT_T.stage_sizes, 3, seed=140, relu=True)
    a = ft.FT(FT_S, FT_T)
    b = ft.FT(FT_S, FT_T, factor="paper")
    b.load_state_dict(a.state_dict())
    la = a(Outputs(LOGITS, features=fs), Outputs(LOGITS, features=f_t), LABELS)["ft"].item()
    lb = b(Outputs(LOGITS, features=fs), Outputs(LOGITS, features=f_t), LABELS)["ft"].item()
    assert abs(la - lb) > 1e-3


def test_ft_init_parameters_are_only_the_paraphraser():
    m = ft.FT(FT_S, FT_T)
    student = tiny_resnet()
    got = m.init_parameters(student)
    assert {id(p) for p in got} == params_of(m.paraphraser) and len(got) == len(params_of(m.paraphraser)) == 12
    assert not params_of(m.translator) & {id(p) for p in got}
    assert not params_of(student) & {id(p) for p in got}


def test_ft_paraphraser_does_not_change_in_the_main_stage():
    """The engine's main optimizer holds every method parameter that required grad when it was
    built (the paraphraser included, before the init stage); momentum and weight decay must not
    move the paraphraser, whatever its requires_grad."""
    torch.manual_seed(0)
    m = ft.FT(FT_S, FT_T)
    student_params = [nn.Parameter(randn(3, 10, seed=150, scale=2.0))]
    main_opt = torch.optim.SGD(student_params + [p for p in m.parameters() if p.requires_grad],
                               lr=0.1, momentum=0.9, weight_decay=5e-4)
    # the init stage: the paraphraser trains, and leaves gradients behind
    init_opt = torch.optim.SGD(m.init_parameters(nn.Linear(1, 1)), lr=0.1, momentum=0.9, weight_decay=5e-4)
    f_t = maps(FT_T.stage_channels, FT_T.stage_sizes, 3, seed=160, relu=True)
    before_init = {k: v.clone() for k, v in m.paraphraser.state_dict().items()}
    for _ in range(2):
        init_opt.zero_grad(set_to_none=True)
        m.init_forward(None, Outputs(LOGITS, features=f_t), LABELS)["rec"].backward()
        init_opt.step()
    assert any(not torch.equal(before_init[k], v) for k, v in m.paraphraser.state_dict().items())
    assert all(p.grad is not None for p in m.paraphraser.parameters())
    # the main stage
    frozen = {k: v.clone() for k, v in m.paraphraser.state_dict().items()}
    translator = {k: v.clone() for k, v in m.translator.state_dict().items()}
    for epoch in range(2):
        m.start_epoch(epoch, 2)
        if epoch == 1:  # even with requires_grad turned back on, no_grad keeps it out of the graph
            m.paraphraser.requires_grad_(True)
        for step in range(2):
            fs = maps(FT_S.stage_channels, FT_S.stage_sizes, 3, seed=170 + step, relu=True)
            terms = m(Outputs(student_params[0], features=fs), Outputs(LOGITS, features=f_t), LABELS)
            main_opt.zero_grad(set_to_none=False)  # the harsher case: zeroing, not clearing
            sum(terms.values()).backward()
            assert all(p.grad is None for p in m.paraphraser.parameters())
            main_opt.step()
    for k, v in m.paraphraser.state_dict().items():
        assert torch.equal(frozen[k], v), k
    assert any(not torch.equal(translator[k], v) for k, v in m.translator.state_dict().items() if v.is_floating_point())
    # and an init stage after a main-stage epoch (a restarted schedule) trains it again
    assert all(p.requires_grad for p in m.init_parameters(nn.Linear(1, 1)))


def test_ft_errors():
    with pytest.raises(KDZooError, match="factor must be one of rd, paper"):
        ft.FT(FT_S, FT_T, factor="nope")
    with pytest.raises(KDZooError, match="rate must be in"):
        ft.FT(FT_S, FT_T, rate=0.0)
    with pytest.raises(KDZooError, match=r"int\(1 \* rate=0.5\) = 0 channels"):
        ft.FT(FT_S, info((8, 1), ((4, 4), (2, 2))))


# =========================================================================== fsp

def fsp_ref(maps_s: list[np.ndarray], maps_t: list[np.ndarray]) -> float:
    """RD's FSP: G between consecutive maps of each net (the larger pooled to the smaller), then
    the mean squared difference, summed over the pairs."""
    def gram(bot, top):
        size = (min(bot.shape[2], top.shape[2]), min(bot.shape[3], top.shape[3]))
        bot = block_pool(bot, size) if bot.shape[2:] != size else bot
        top = block_pool(top, size) if top.shape[2:] != size else top
        B, Cb, H, W = bot.shape
        Ct = top.shape[1]
        g = np.zeros((B, Ct, Cb))
        for b in range(B):
            for i in range(Ct):
                for j in range(Cb):
                    g[b, i, j] = sum(top[b, i, y, x] * bot[b, j, y, x] for y in range(H) for x in range(W)) / (H * W)
        return g
    total = 0.0
    for k in range(len(maps_s) - 1):
        gs, gt = gram(maps_s[k], maps_s[k + 1]), gram(maps_t[k], maps_t[k + 1])
        total += float(((gs - gt) ** 2).mean())
    return total


FSP_S = info((4, 6, 8), ((8, 8), (4, 4), (2, 2)), preact=False, stem=(4, (8, 8)))
FSP_T = info((4, 6, 8), ((16, 16), (8, 8), (4, 4)), preact=False, stem=(4, (16, 16)))


def fsp_outputs(net: NetInfo, batch: int, seed: int, requires_grad: bool = False) -> Outputs:
    stem = randn(batch, net.stem_channels, *net.stem_size, seed=seed).relu().requires_grad_(requires_grad)
    feats = maps(net.stage_channels, net.stage_sizes, batch, seed + 1, relu=True, requires_grad=requires_grad)
    return Outputs(LOGITS[:batch], features=feats, stem=stem)


def test_fsp_loss_against_loops_different_sizes():
    m = fsp.FSP(FSP_S, FSP_T)
    s, t = fsp_outputs(FSP_S, 2, seed=200, requires_grad=True), fsp_outputs(FSP_T, 2, seed=210, requires_grad=True)
    terms = m.init_forward(s, t, LABELS[:2])
    assert set(terms) == {"fsp"} and terms["fsp"].dtype == torch.float32
    ref = fsp_ref([np64(s.stem)] + [np64(f) for f in s.features], [np64(t.stem)] + [np64(f) for f in t.features])
    assert ref > 1e-3
    assert terms["fsp"].item() == pytest.approx(ref, rel=1e-5)
    terms["fsp"].backward()
    assert s.stem.grad is not None and all(f.grad is not None and f.grad.abs().sum() > 0 for f in s.features)
    assert t.stem.grad is None and all(f.grad is None for f in t.features)
    w = fsp.FSP(FSP_S, FSP_T, w_fsp=50.0).init_forward(s, t, LABELS[:2])["fsp"].item()
    assert w == pytest.approx(50.0 * ref, rel=1e-5)
    # identical maps give zero
    assert fsp.FSP(FSP_S, FSP_S).init_forward(s, s, LABELS[:2])["fsp"].item() == pytest.approx(0.0, abs=1e-12)


def test_fsp_under_bf16_autocast_stays_float32():
    m = fsp.FSP(FSP_S, FSP_T)
    s, t = fsp_outputs(FSP_S, 2, seed=220), fsp_outputs(FSP_T, 2, seed=230)
    ref = fsp_ref([np64(s.stem)] + [np64(f) for f in s.features], [np64(t.stem)] + [np64(f) for f in t.features])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m.init_forward(s, t, LABELS[:2])["fsp"]
    assert got.dtype == torch.float32 and got.item() == pytest.approx(ref, rel=1e-5)


def test_fsp_main_stage_is_ce_only():
    m = fsp.FSP(FSP_S, FSP_T)
    s, t = fsp_outputs(FSP_S, 3, seed=240), fsp_outputs(FSP_T, 3, seed=250)
    terms = m(s, t, LABELS)
    assert set(terms) == {"ce"} and terms["ce"].item() == pytest.approx(ce_ref(LOGITS, LABELS), rel=1e-6)


def test_fsp_refuses_unequal_channels():
    wrn40_2 = info((32, 64, 128), ((32, 32), (16, 16), (8, 8)), preact=False, stem=(16, (32, 32)))
    wrn40_1 = info((16, 32, 64), ((32, 32), (16, 16), (8, 8)), preact=False, stem=(16, (32, 32)))
    with pytest.raises(PairNotSupported) as e:
        fsp.FSP(wrn40_1, wrn40_2)
    msg = str(e.value)
    assert "teacher has [16, 32, 64, 128]" in msg and "student [16, 16, 32, 64]" in msg and "equal channel" in msg
    with pytest.raises(PairNotSupported, match=r"teacher has \[4, 4, 6, 8\], the student \[4, 4, 6, 8, 8\]"):
        fsp.FSP(info((4, 6, 8, 8), ((8, 8), (4, 4), (2, 2), (1, 1)), preact=False, stem=(4, (8, 8))), FSP_T)
    with pytest.raises(PairNotSupported, match="student backbone declares no stem"):
        fsp.FSP(info((4, 6, 8), ((8, 8), (4, 4), (2, 2))), FSP_T)
    fsp.FSP(wrn40_2, wrn40_2)  # equal widths are fine


def test_fsp_init_parameters_are_the_students_feature_layers():
    student = tiny_resnet()
    m = fsp.FSP(FSP_S, FSP_T)
    got = m.init_parameters(student)
    assert {id(p) for p in got} == params_of(student) - params_of(student.get_classifier())
    assert len(got) == len({id(p) for p in got})


# =========================================================================== all three

@pytest.mark.parametrize("build", [lambda **k: ab.AB(AB_S, AB_S, **k), lambda **k: ft.FT(FT_S, FT_T, **k),
                                   lambda **k: fsp.FSP(FSP_S, FSP_T, **k)], ids=["ab", "ft", "fsp"])
def test_init_epochs(build):
    m = build()
    assert m.has_init_stage and m.family == "features" and m.init_epochs == 0 and m.init_fraction == 30 / 240
    assert m.num_init_epochs(240) == 30
    assert m.num_init_epochs(8) == 1
    assert m.num_init_epochs(16) == 2
    assert m.num_init_epochs(1) == 1
    assert build(init_epochs=5).num_init_epochs(240) == 5
    assert build(init_fraction=0.0).num_init_epochs(240) == 0
    with pytest.raises(KDZooError, match="init_fraction"):
        build(init_fraction=1.5)


def test_declarations():
    assert (ab.AB.needs_preact, ab.AB.needs_features, ab.AB.needs_stem) == (True, False, False)
    assert (ft.FT.needs_features, ft.FT.needs_preact, ft.FT.init_uses_student) == (True, False, False)
    assert (fsp.FSP.needs_stem, fsp.FSP.needs_features, fsp.FSP.needs_preact) == (True, True, False)
    assert ab.AB.defaults["w_ab"] == 1.0 and ft.FT.defaults["w_ft"] == 200.0 and fsp.FSP.defaults["w_fsp"] == 1.0
    assert all(c.defaults["w_ce"] == 1.0 for c in (ab.AB, ft.FT, fsp.FSP))


def _with(pairs, **changes):
    return {name: (dataclasses.replace(s, **changes), dataclasses.replace(t, **changes)) for name, (s, t) in pairs.items()}


def test_contract_ab():
    check_method(ab.AB, pairs=_with(NETINFO_PAIRS, has_preact=True))


def test_contract_ft():
    check_method(ft.FT)


def test_contract_fsp_without_the_gradient_check():
    """check_gradients wants forward to use the features a method declares; FSP's main stage is CE
    only (RD) and reads the features only in init_forward, so that one check does not apply."""
    pairs = {"identical nets": (FSP_S, FSP_S), "other sizes, same widths": (FSP_S, FSP_T)}
    check_declaration(fsp.FSP)
    for check in (check_hparams, check_terms, check_state_dict, check_determinism, check_dtypes_and_devices):
        check(fsp.FSP, pairs=pairs)


# =========================================================================== real nets

def test_real_resnets_one_step_each():
    """resnet8 -> resnet8 through KDNet: the outputs the engine passes fit each method's init and main stage."""
    torch.manual_seed(0)
    teacher, student = KDNet(tiny_resnet(), (32, 32)).eval(), KDNet(tiny_resnet(), (32, 32)).train()
    x, y = randn(2, 3, 32, 32, seed=300), torch.tensor([1, 2])
    for cls in (ab.AB, ft.FT, fsp.FSP):
        m = cls(student.info, teacher.info)
        wants = {"features": cls.needs_features, "preact": cls.needs_preact, "stem": cls.needs_stem}
        with torch.no_grad():
            t_out = teacher(x, **wants)
        s_out = student(x, **wants) if cls.init_uses_student else None
        init = m.init_forward(s_out, t_out, y)
        params = m.init_parameters(student)
        sum(init.values()).backward()
        assert all(torch.isfinite(v) for v in init.values())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        student.zero_grad(set_to_none=True)
        m.start_epoch(0, 240)
        main = m(student(x, **wants), t_out, y)
        assert "ce" in main and all(torch.isfinite(v) for v in main.values())
