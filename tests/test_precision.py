"""autocast: auto: the capability rules, the measured probe where they are not conclusive, and its cache."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from kdzoo import precision
from kdzoo.precision import MIN_SPEEDUP, choose


@pytest.fixture(autouse=True)
def fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("KDZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "_memo", {})


def caps(monkeypatch, **flags):
    monkeypatch.setattr(precision, "cpu_capabilities", lambda: {"avx2": True, **flags})


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))


def fake_timer(fp32: float, bf16: float, calls: list):
    def timer(model, x, dtype):
        calls.append(dtype)
        return bf16 if dtype == torch.bfloat16 else fp32
    return timer


CPU = torch.device("cpu")


def test_explicit_settings_win():
    assert choose("off", CPU).dtype is None and choose("off", CPU).reason == "autocast: off"
    assert choose("bf16", CPU).dtype == torch.bfloat16


def test_capabilities_decide_without_a_probe(monkeypatch):
    monkeypatch.setattr(precision, "probe", lambda *a, **k: pytest.fail("no probe expected"))
    caps(monkeypatch, amx_bf16=True, avx512_bf16=True)
    p = choose("auto", CPU, net())
    assert p.dtype == torch.bfloat16 and "AMX-BF16" in p.reason and p.name == "bfloat16"
    caps(monkeypatch)  # AVX2 only: bf16 would be emulated
    p = choose("auto", CPU, net())
    assert p.dtype is None and "emulated" in p.reason and p.name == "float32"


@pytest.mark.parametrize("fp32, bf16, expected", [(0.2, 0.1, torch.bfloat16), (0.2, 0.19, None)])
def test_avx512_bf16_without_amx_is_measured(monkeypatch, fp32, bf16, expected):
    caps(monkeypatch, avx512_bf16=True)
    calls = []
    original = precision.probe
    monkeypatch.setattr(precision, "probe",
                        lambda n, d, s=(32, 32): original(n, d, s, timer=fake_timer(fp32, bf16, calls)))
    p = choose("auto", CPU, net())
    assert p.dtype == expected
    assert f"{fp32 / bf16:.2f}x float32" in p.reason and f">= {MIN_SPEEDUP}x" in p.reason
    assert calls.count(None) == calls.count(torch.bfloat16) == 4  # one warm-up and three timed steps each


def test_the_probe_runs_once_per_machine_and_network(monkeypatch, tmp_path):
    caps(monkeypatch, avx512_bf16=True)
    calls = []
    timer = fake_timer(0.3, 0.1, calls)
    a = net()
    before = [p.detach().clone() for p in a.parameters()]
    first = precision.probe(a, CPU, timer=timer)
    assert first["bf16_speedup"] == pytest.approx(3.0) and len(calls) == 8
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))  # it measures a copy
    assert all(p.grad is None for p in a.parameters())
    cached = json.loads((tmp_path / "cache" / "precision.json").read_text())
    (key,) = cached
    assert "Sequential" in key and torch.__version__ in key
    precision._memo.clear()  # a new process reads the file instead of measuring again
    assert precision.probe(a, CPU, timer=timer) == first and len(calls) == 8
    wider = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    precision.probe(wider, CPU, timer=timer)  # another network is measured
    assert len(calls) == 16 and len(json.loads((tmp_path / "cache" / "precision.json").read_text())) == 2


def test_the_real_step_timer_measures_forward_and_backward():
    model = net()
    seconds = precision._step_seconds(model, torch.randn(4, 3, 8, 8), None)
    assert seconds > 0 and all(p.grad is not None for p in model.parameters())


def test_a_cohort_of_students_shares_one_dtype(monkeypatch):
    """A cohort's teacher pass is shared, so it has one dtype: bf16 only when the probe says so for every
    distinct student network (each measured once), else float32 for all, saying why."""
    from kdzoo.engine import cohort_precision

    caps(monkeypatch, avx512_bf16=True)
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    speedups = {sum(p.numel() for p in net().parameters()): 1.5, sum(p.numel() for p in wide.parameters()): 1.0}
    probed = []

    def probe(n, d, s=(32, 32)):
        params = sum(p.numel() for p in n.parameters())
        probed.append(params)
        return {"bf16_speedup": speedups[params], "network": f"net of {params} parameters"}

    monkeypatch.setattr(precision, "probe", probe)
    agree = cohort_precision("auto", CPU, [net(), net()], (32, 32))
    assert agree.dtype == torch.bfloat16 and len(probed) == 1  # one network, probed once
    mixed = cohort_precision("auto", CPU, [net(), wide, net()], (32, 32))
    assert mixed.dtype is None and "students disagree" in mixed.reason and "1.00x" in mixed.reason
    assert cohort_precision("bf16", CPU, [net(), wide], (32, 32)).dtype == torch.bfloat16  # explicit wins
