"""benchmarks/bf16_accuracy.py: its kernel-level bf16 emulation against float64, and one small run.

The emulation stands in for bf16 hardware (AMX, AVX512-BF16, GPU tensor cores) where the CPU has
none: each convolution or matrix product takes bf16 operands, sums their products in float32 and
rounds the result to bf16 once. These tests hold it to that definition, computed independently in
float64, and check that a whole network under it computes autocast's bf16 forward, not float32's.
"""
from __future__ import annotations

import contextlib
import json
import runpy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bf16_accuracy.py"
BF16_EPS = 2.0 ** -8  # a bf16 ulp is at most this fraction of the value it rounds


@pytest.fixture(scope="module")
def script():
    return runpy.run_path(str(SCRIPT), run_name="bf16_accuracy")


def _within_one_ulp(got: torch.Tensor, exact: torch.Tensor) -> None:
    """``got`` (bf16) is the float64 ``exact`` rounded to bf16, give or take one bf16 ulp: the float32 sums
    differ from exact ones in their last float32 bits, which can tip a rounding, never more."""
    assert got.dtype == torch.bfloat16
    g = got.double()
    tol = BF16_EPS * exact.abs() + 1e-6 * exact.abs().max()
    assert bool(((g - exact).abs() <= tol).all()), float(((g - exact).abs() / (exact.abs() + 1e-12)).max())
    rounded = exact.to(torch.bfloat16)
    assert float((got == rounded).double().mean()) > 0.99  # and almost always exactly the rounding


def test_emulated_convolution_forward_and_backward_match_float64(script):
    torch.manual_seed(0)
    x = torch.randn(8, 16, 12, 12).to(memory_format=torch.channels_last).bfloat16().requires_grad_()
    w = (torch.randn(24, 16, 3, 3) * 0.2).to(memory_format=torch.channels_last).bfloat16().requires_grad_()
    g = torch.randn(8, 24, 6, 6).bfloat16()
    with script["EmulatedBF16"]():
        out = F.conv2d(x, w, stride=2, padding=1)
        out.backward(g)

    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = F.conv2d(x64, w64, stride=2, padding=1)
    ref.backward(g.double())
    _within_one_ulp(out.detach(), ref.detach())
    _within_one_ulp(x.grad, x64.grad)
    _within_one_ulp(w.grad, w64.grad)


def test_emulated_linear_under_autocast_matches_float64(script):
    torch.manual_seed(1)
    lin = torch.nn.Linear(64, 10)
    x = torch.randn(32, 64, requires_grad=True)
    with script["EmulatedBF16"](), torch.autocast("cpu", dtype=torch.bfloat16):
        out = lin(x)
    out.float().sum().backward()
    # autocast rounds the operands to bf16; the product of those values is then computed exactly
    xb, wb, bb = (t.detach().bfloat16().double() for t in (x, lin.weight, lin.bias))
    _within_one_ulp(out.detach(), xb @ wb.T + bb)
    # d(sum)/dW = sum over the batch of x; the bf16 gradient is rounded once, then kept in float32
    _within_one_ulp(lin.weight.grad.bfloat16(), torch.ones(32, 10, dtype=torch.float64).T @ xb)


def test_a_network_under_the_emulation_computes_bf16_not_float32(script):
    """Forward only (torch's own bf16 forward is slow on some CPUs, fine at this size): the emulated
    logits are torch's native bf16 logits up to summation order, which tips a rounding now and then (and
    the tip travels down the net), while float32's logits, even rounded to bf16, mostly differ; and
    evaluation under inference mode (where conv2d reaches the mode undecomposed) computes the same as
    under no_grad."""
    from kdzoo.plugins import load_plugins
    from kdzoo.runner import build_student

    net = build_student(load_plugins(), "resnet8", {}, 0, num_classes=10).to(memory_format=torch.channels_last)
    net.eval()
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2)).to(memory_format=torch.channels_last)

    def logits(emulate: bool, bf16: bool = True, inference: bool = False) -> torch.Tensor:
        grad = torch.inference_mode() if inference else torch.no_grad()
        with grad, (script["EmulatedBF16"]() if emulate else contextlib.nullcontext()), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return net(x).logits.float().clone()

    emulated, native, fp32 = logits(True), logits(False), logits(False, bf16=False)
    assert torch.equal(logits(True, inference=True), emulated)
    assert float((emulated == native).double().mean()) > 0.9  # measured 0.96 and 0.99 for two inputs
    assert float((fp32.bfloat16().float() == native).double().mean()) < 0.6  # 0.42 and 0.47: bf16 is in use


def test_small_run_prints_paired_differences(script, cifar_path, monkeypatch, tmp_path, capsys, one_thread):
    monkeypatch.setenv("KDZOO_DATA", cifar_path)
    monkeypatch.setenv("KDZOO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bf16.json"
    result = script["main"](["--epochs", "1", "--seeds", "0", "--train-size", "2000", "--bf16", "emulated",
                             "--runs", "float32,bf16,control", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    runs = {r["config"]: r for r in result["runs"]}
    assert (runs["float32"]["dtype"], runs["float32"]["channels_last"], runs["float32"]["emulated"]) == \
        ("float32", True, False)
    assert (runs["bf16"]["dtype"], runs["bf16"]["emulated"]) == ("bfloat16", True)
    assert (runs["control"]["dtype"], runs["control"]["channels_last"]) == ("float32", False)
    for r in runs.values():
        assert r["status"] == "ok" and r["last"] > 14.0  # well above chance (10%) after one epoch
    assert result["delta_last"] == {c: [pytest.approx(runs[c]["last"] - runs["float32"]["last"])]
                                    for c in ("bf16", "control")}
    text = capsys.readouterr().out
    assert "bf16 runs: emulated" in text and "bf16 - float32 (last epoch) per seed" in text
    assert "control - float32 (last epoch) per seed" in text


def test_unknown_run_names_are_refused(script, capsys):
    with pytest.raises(SystemExit) as e:
        script["main"](["--runs", "float32,fp16"])
    assert e.value.code == 2 and "--runs: unknown fp16; choose from float32, bf16, control" in capsys.readouterr().err
