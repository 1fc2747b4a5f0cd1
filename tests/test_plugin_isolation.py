"""Run-time isolation: a third-party method that raises, returns a non-finite or non-scalar loss,
or returns the wrong type fails its own run with an error naming the plugin and its
distribution, while the other members of the same cohort train to the end (real tiny data)."""
from __future__ import annotations

import sys
import textwrap

import pytest

from kdzoo.config import Recipe
from kdzoo.data import prepare_data
from kdzoo_plugins.cifar10 import load_cifar10
from kdzoo.engine import Member, Trainer
from kdzoo.plugins import load_plugins
from kdzoo.runner import build_method, build_student

BROKEN_PLUGIN = """
    import torch
    import torch.nn.functional as F
    from kdzoo import hookimpl
    from kdzoo.methods import Method

    class Base(Method):
        needs_teacher = False
        defaults = {"w_ce": 1.0}

    class Raises(Base):
        name = "raises"
        def forward(self, student, teacher, labels):
            raise RuntimeError("boom inside the plugin")

    class NonFinite(Base):
        name = "non_finite"
        def forward(self, student, teacher, labels):
            return {"ce": self.ce(student.logits, labels) * float("nan")}

    class NonScalar(Base):
        name = "non_scalar"
        def forward(self, student, teacher, labels):
            return {"ce": F.cross_entropy(student.logits, labels, reduction="none")}

    class ReturnsTensor(Base):
        name = "returns_tensor"
        def forward(self, student, teacher, labels):
            return self.ce(student.logits, labels)

    class ReturnsFloat(Base):
        name = "returns_float"
        def forward(self, student, teacher, labels):
            return {"ce": self.ce(student.logits, labels).item()}

    @hookimpl
    def register_methods(register):
        for cls in (Raises, NonFinite, NonScalar, ReturnsTensor, ReturnsFloat):
            register(cls)
"""

EXPECTED = {
    "raises": "failed: RuntimeError: boom inside the plugin",
    "non_finite": "the loss became non-finite (term ce)",
    "non_scalar": "loss term 'ce' must be a scalar tensor, got (64,)",
    "returns_tensor": "forward() must return a non-empty dict of loss terms, got Tensor",
    "returns_float": "loss term 'ce' must be a scalar tensor, got float",
}


@pytest.fixture
def broken_dist(tmp_path, monkeypatch):
    """A fake installed distribution ``kdzoo-broken 0.3.0`` whose entry point ``brokenpkg`` registers the methods above."""
    (tmp_path / "kdzoo_broken_methods.py").write_text(textwrap.dedent(BROKEN_PLUGIN))
    info = tmp_path / "kdzoo_broken-0.3.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kdzoo-broken\nVersion: 0.3.0\n")
    (info / "entry_points.txt").write_text("[kdzoo]\nbrokenpkg = kdzoo_broken_methods\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("KDZOO_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("KDZOO_DISABLE_PLUGINS", raising=False)
    yield
    sys.modules.pop("kdzoo_broken_methods", None)


def test_a_broken_method_fails_its_own_run_and_names_its_plugin(one_thread, broken_dist, cifar_path):
    registry = load_plugins(strict=True)
    assert registry.plugin("brokenpkg").methods == sorted(EXPECTED)
    data = prepare_data(load_cifar10(cifar_path), train_size=128, test_size=100, subset_seed=0)
    members = []
    for name in sorted(EXPECTED) + ["ce"]:
        student = build_student(registry, "wrn_16_1", {}, 0, num_classes=10)
        method = build_method(registry, name, {}, student.info, None, 0)
        members.append(Member(name, student, method, origin=registry.describe_origin(name)))
    results = {r["label"]: r for r in Trainer(members, data, Recipe(epochs=1, batch_size=64, eval_batch_size=100),
                                             seed=0).fit()}
    for name, message in EXPECTED.items():
        r = results[name]
        assert r["status"] == "failed" and r["epochs_done"] == 0, r
        assert message in r["error"], r["error"]
        assert f"'{name}'" in r["error"] and "plugin 'brokenpkg' (kdzoo-broken 0.3.0)" in r["error"], r["error"]
    good = results["ce"]
    assert good["status"] == "ok" and good["epochs_done"] == 1 and good["error"] is None
    assert set(good["history"][0]["loss"]) == {"ce"} and 0.0 <= good["last"]["top1"] <= 100.0
