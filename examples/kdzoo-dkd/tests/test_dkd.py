"""DKD against the kdzoo contract and against an independent float64 hand computation.

The fixtures ``kdzoo_check_method`` and ``kdzoo_registry`` come from kdzoo's pytest plugin
(``kdzoo.pytest_plugin``), which pytest loads automatically once kdzoo is installed.
"""
from __future__ import annotations

import math
from importlib.metadata import version

import numpy as np
import pytest
import torch

from kdzoo import KDZooError
from kdzoo.models import NetInfo, Outputs
from kdzoo.testing import check_registered
from kdzoo_dkd import DKD

NET = NetInfo(stage_channels=(8, 16), stage_sizes=((8, 8), (4, 4)), embed_dim=16, num_classes=10)


def test_follows_the_kdzoo_contract(kdzoo_check_method):
    kdzoo_check_method(DKD)
    kdzoo_check_method(DKD, warmup=0, T=1.0)


def test_installed_package_registers_dkd_example(kdzoo_registry):
    check_registered(DKD, kdzoo_registry)
    assert DKD.name == "dkd_example"  # kdzoo ships its own "dkd": a second one would clash
    assert kdzoo_registry.describe_origin("dkd_example") == f"plugin 'dkd_example' (kdzoo-dkd {version('kdzoo-dkd')})"


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))


def dkd_reference(zs: np.ndarray, zt: np.ndarray, y: np.ndarray, T: float) -> tuple[float, float]:
    """Written from the paper's definitions, one sample at a time: no masking trick, no logsumexp."""
    tckd = nckd = 0.0
    for b in range(len(y)):
        ps, pt = softmax(zs[b] / T), softmax(zt[b] / T)
        tckd += kl([pt[y[b]], 1 - pt[y[b]]], [ps[y[b]], 1 - ps[y[b]]])
        others = [c for c in range(zs.shape[1]) if c != y[b]]
        nckd += kl(softmax(zt[b, others] / T), softmax(zs[b, others] / T))
    return tckd * T * T / len(y), nckd * T * T / len(y)


def ce_reference(zs: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean([-math.log(softmax(zs[b])[y[b]]) for b in range(len(y))]))


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_loss_matches_a_hand_computation(T):
    g = torch.Generator().manual_seed(0)
    zs, zt = 3 * torch.randn(6, 10, generator=g), 3 * torch.randn(6, 10, generator=g)
    zt[0, 3] = 12.0  # a confident teacher: p_target close to 1
    y = torch.tensor([3, 0, 9, 3, 5, 1])
    method = DKD(NET, NET, w_ce=0.5, w_tckd=2.0, w_nckd=3.0, T=T, warmup=4)
    method.start_epoch(1, 10)  # warm = (1 + 1) / 4
    terms = method(Outputs(zs), Outputs(zt), y)
    tckd, nckd = dkd_reference(zs.double().numpy(), zt.double().numpy(), y.numpy(), T)
    assert set(terms) == {"ce", "tckd", "nckd"}
    assert terms["tckd"].item() == pytest.approx(0.5 * 2.0 * tckd, rel=1e-5)
    assert terms["nckd"].item() == pytest.approx(0.5 * 3.0 * nckd, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(0.5 * ce_reference(zs.double().numpy(), y.numpy()), rel=1e-5)
    assert tckd > 0 and nckd > 0


def test_warmup_follows_the_epoch():
    zs, zt = torch.randn(4, 10, generator=torch.Generator().manual_seed(1)), torch.randn(4, 10)
    y = torch.tensor([0, 1, 2, 3])
    method = DKD(NET, NET)  # defaults: warmup 20
    scale = {}
    for epoch in (0, 9, 19, 20, 100):
        method.start_epoch(epoch, 240)  # what the engine calls before each epoch (0-based)
        scale[epoch] = method(Outputs(zs), Outputs(zt), y)["nckd"].item()
    assert [scale[e] / scale[100] for e in (0, 9, 19, 20)] == pytest.approx([1 / 20, 10 / 20, 1.0, 1.0])
    assert method.defaults == {"w_ce": 1.0, "w_tckd": 1.0, "w_nckd": 8.0, "T": 4.0, "warmup": 20}


def test_identical_logits_give_zero_kd_and_bad_settings_are_refused():
    z = torch.randn(5, 10, generator=torch.Generator().manual_seed(2))
    terms = DKD(NET, NET, warmup=0)(Outputs(z), Outputs(z.clone()), torch.tensor([1, 2, 3, 4, 5]))
    assert abs(terms["tckd"].item()) < 1e-6 and abs(terms["nckd"].item()) < 1e-6
    with pytest.raises(KDZooError, match="T > 0"):
        DKD(NET, NET, T=0.0)
    with pytest.raises(KDZooError, match="warmup must be >= 0"):
        DKD(NET, NET, warmup=-1)
    with pytest.raises(KDZooError, match="alpha"):
        DKD(NET, NET, alpha=1.0)  # the paper's alpha is w_tckd
