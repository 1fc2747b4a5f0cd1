"""The third-party example examples/kdzoo-dkd, installed with pip from its folder (real package
metadata, its own entry point): kdzoo lists it, trains it, disables and uninstalls it cleanly,
and its own test suite passes with kdzoo.testing's pytest plugin.

kdzoo ships DKD itself as the built-in method ``dkd`` (plugin ``dkd``, distribution ``kdzoo``); the
example registers the same loss as ``dkd_example`` (plugin ``dkd_example``, distribution
``kdzoo-dkd``), so both are installed at once without a name clash, and both compute the same terms.

It also appears as its own column in a `kdzoo bench` table next to the built-in methods.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from kdzoo.config import Recipe
from kdzoo.data import prepare_data
from kdzoo_plugins.cifar10 import load_cifar10
from kdzoo.engine import Member, Trainer
from kdzoo.models import NetInfo, Outputs
from kdzoo.plugins import load_plugins
from kdzoo.runner import build_method, build_student

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "kdzoo-dkd"
INSTALL_BUILTIN_DKD = ("kdzoo's own plugin 'dkd' is not installed: declare dkd = \"kdzoo_plugins.dkd\" under "
                       "[project.entry-points.kdzoo] in pyproject.toml and reinstall kdzoo (pip install -e .)")


@pytest.fixture(scope="module")
def dkd(install_package):
    return install_package(EXAMPLE)


def plugins_json(proc: subprocess.CompletedProcess) -> dict[str, dict]:
    assert proc.returncode == 0, proc.stderr
    return {p["name"]: p for p in json.loads(proc.stdout)}


def method_row(stdout: str, name: str) -> str:
    """The `kdzoo methods` table row of method ``name`` (its first column)."""
    rows = [line for line in stdout.splitlines() if line.split()[:1] == [name]]
    assert len(rows) == 1, f"{name!r} is listed {len(rows)} times in:\n{stdout}"
    return rows[0]


def test_installed_plugin_is_listed_with_its_distribution(dkd):
    assert sorted(p.name for p in dkd.site.iterdir()) == ["kdzoo_dkd", "kdzoo_dkd-0.1.0.dist-info"]
    listed = plugins_json(dkd.kdzoo("plugins", "--json"))
    entry = listed["dkd_example"]
    assert (entry["dist"], entry["version"], entry["methods"], entry["status"]) == (
        "kdzoo-dkd", "0.1.0", ["dkd_example"], "ok")
    assert entry["source"] == "kdzoo_dkd" and entry["models"] == []
    assert all(p["status"] == "ok" and not p["error"] for p in listed.values())  # installing it broke nothing
    methods = dkd.kdzoo("methods")
    assert methods.returncode == 0, methods.stderr
    row = method_row(methods.stdout, "dkd_example")
    assert "teacher" in row and "w_nckd=8.0" in row and "warmup=20" in row


def test_installed_next_to_kdzoos_own_dkd_without_a_clash(dkd):
    listed = plugins_json(dkd.kdzoo("plugins", "--json"))
    assert "dkd" in listed, INSTALL_BUILTIN_DKD
    builtin, example = listed["dkd"], listed["dkd_example"]
    assert (builtin["dist"], builtin["source"], builtin["methods"], builtin["status"]) == (
        "kdzoo", "kdzoo_plugins.dkd", ["dkd"], "ok")
    assert (example["dist"], example["methods"], example["status"]) == ("kdzoo-dkd", ["dkd_example"], "ok")
    # no name clash: every method is registered by exactly one plugin, and no plugin is broken
    registered = [m for p in listed.values() for m in p["methods"]]
    assert len(registered) == len(set(registered))
    assert not [p["name"] for p in listed.values() if p["error"] or p["status"] != "ok"]
    methods = dkd.kdzoo("methods")
    assert methods.returncode == 0, methods.stderr
    for name in ("dkd", "dkd_example"):
        row = method_row(methods.stdout, name)
        assert "teacher" in row and "w_nckd=8.0" in row and "warmup=20" in row
    assert "logit_std=False" in method_row(methods.stdout, "dkd")  # the built-in one has the extra option
    assert "logit_std" not in method_row(methods.stdout, "dkd_example")


def test_both_registered_in_one_registry_compute_the_same_loss(dkd, monkeypatch):
    monkeypatch.syspath_prepend(str(dkd.site))
    monkeypatch.delenv("KDZOO_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("KDZOO_DISABLE_PLUGINS", raising=False)
    try:
        registry = load_plugins(strict=True)  # strict: a clash would raise here
        assert "dkd" in registry.methods, INSTALL_BUILTIN_DKD
        builtin, example = registry.method("dkd"), registry.method("dkd_example")
        assert builtin is not example and builtin.__module__ == "kdzoo_plugins.dkd"
        assert Path(sys.modules[example.__module__].__file__).is_relative_to(dkd.site)
        assert registry.describe_origin("dkd") == f"plugin 'dkd' (kdzoo {version('kdzoo')})"
        assert registry.describe_origin("dkd_example") == "plugin 'dkd_example' (kdzoo-dkd 0.1.0)"
        net = NetInfo(stage_channels=(8, 16), stage_sizes=((8, 8), (4, 4)), embed_dim=16, num_classes=10)
        g = torch.Generator().manual_seed(0)
        zs, zt = 3 * torch.randn(6, 10, generator=g), 3 * torch.randn(6, 10, generator=g)
        y = torch.tensor([3, 0, 9, 3, 5, 1])
        terms = []
        for cls in (builtin, example):
            method = cls(net, net, T=2.0, w_nckd=3.0)
            method.start_epoch(4, 240)  # inside the warm-up: both count epochs the same way
            terms.append(method(Outputs(zs), Outputs(zt), y))
        assert terms[0].keys() == terms[1].keys() == {"ce", "tckd", "nckd"}
        for key in terms[0]:
            assert terms[0][key].item() == pytest.approx(terms[1][key].item(), rel=1e-5), key
    finally:
        sys.modules.pop("kdzoo_dkd", None)


def test_disabling_removes_it(dkd):
    listed = plugins_json(dkd.kdzoo("plugins", "--json", "-p", "no:dkd_example"))
    assert listed["dkd_example"]["status"] == "disabled" and listed["dkd_example"]["methods"] == []
    by_dist = dkd.kdzoo("methods", env=dkd.env(KDZOO_DISABLE_PLUGINS="kdzoo-dkd"))
    assert by_dist.returncode == 0 and not re.search(r"\bdkd_example\b", by_dist.stdout)
    method_row(by_dist.stdout, "kd")  # kdzoo's own methods stay, its dkd included
    method_row(by_dist.stdout, "dkd")


def test_own_test_suite_passes_with_the_kdzoo_pytest_plugin(dkd):
    # Run from the copied source tree, which has src/ layout: the tests import the installed package.
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=dkd.source,
                          capture_output=True, text=True, env=dkd.env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert re.search(r"\b6 passed\b", proc.stdout) and "skipped" not in proc.stdout, proc.stdout[-500:]


def test_trains_in_a_cohort_next_to_a_builtin_method(one_thread, dkd, cifar_path, monkeypatch):
    monkeypatch.syspath_prepend(str(dkd.site))
    monkeypatch.delenv("KDZOO_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("KDZOO_DISABLE_PLUGINS", raising=False)
    try:
        registry = load_plugins(strict=True)
        assert registry.describe_origin("dkd_example") == "plugin 'dkd_example' (kdzoo-dkd 0.1.0)"
        assert Path(sys.modules["kdzoo_dkd"].__file__).is_relative_to(dkd.site)
        data = prepare_data(load_cifar10(cifar_path), train_size=192, test_size=100, subset_seed=0)
        torch.manual_seed(123)
        teacher = build_student(registry, "resnet20", {}, 123, num_classes=10)  # untrained but fixed: enough for a finite-loss run
        members = []
        for name, hparams in (("dkd_example", {"warmup": 1}), ("kd", {})):
            student = build_student(registry, "wrn_16_1", {}, 0, num_classes=10)
            method = build_method(registry, name, hparams, student.info, teacher.info, 0)
            members.append(Member(name, student, method, origin=registry.describe_origin(name)))
        recipe = Recipe(epochs=1, batch_size=64, lr=0.05, eval_batch_size=100)
        results = Trainer(members, data, recipe, teacher=teacher, seed=0).fit()
    finally:
        sys.modules.pop("kdzoo_dkd", None)
    by_method = {r["method"]: r for r in results}
    assert by_method["dkd_example"]["status"] == "ok" and by_method["kd"]["status"] == "ok"
    history = by_method["dkd_example"]["history"]
    assert len(history) == 1 and by_method["dkd_example"]["hparams"]["warmup"] == 1
    for record in history:
        assert set(record["loss"]) == {"ce", "tckd", "nckd"}
        assert all(math.isfinite(v) and v > 0 for v in record["loss"].values())
    assert 0.0 <= by_method["dkd_example"]["last"]["top1"] <= 100.0


def test_uninstalling_removes_it_cleanly(dkd, tmp_path):
    copy = dkd.clone(tmp_path / "site")  # uninstall a copy: the module fixture stays usable
    removed = copy.uninstall()
    assert {p.name for p in removed} >= {"__init__.py", "METADATA", "entry_points.txt", "RECORD"}
    assert list(copy.site.iterdir()) == []
    listed = plugins_json(copy.kdzoo("plugins", "--json"))
    assert "dkd_example" not in listed and all(p["dist"] != "kdzoo-dkd" for p in listed.values())
    assert all(p["status"] == "ok" for p in listed.values())  # no broken leftover
    assert not re.search(r"\bdkd_example\b", copy.kdzoo("methods").stdout)


def test_bench_trains_dkd_next_to_builtin_methods(dkd, cifar_path, tmp_path):
    import yaml

    cfg = tmp_path / "dkd.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "dkd-smoke", "data": {"train_size": 256, "test_size": 200}, "seeds": [0],
        "recipe": {"epochs": 1, "batch_size": 64, "eval_batch_size": 200}, "teacher_recipe": {"epochs": 1},
        "teachers": ["resnet20"], "students": ["wrn_16_1"], "methods": ["kd", {"name": "dkd_example", "warmup": 1}],
    }))
    env = dkd.env(KDZOO_DATA=cifar_path, KDZOO_CACHE=str(tmp_path / "cache"))
    proc = dkd.kdzoo("bench", str(cfg), "--out", str(tmp_path / "out"), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["columns"] == ["ce", "kd", "dkd_example(warmup=1)"]
    dkd_cells = [c for c in report["cells"] if c["variant"] == "dkd_example(warmup=1)"]
    assert len(dkd_cells) == 1 and dkd_cells[0]["status"] == "ok" and dkd_cells[0]["mean"] > 0
    assert "dkd_example(warmup=1)" in proc.stdout
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "out" / "runs").glob("*.json")
                 if json.loads(p.read_text()).get("method") == "dkd_example"]
    assert set(record["history"][0]["loss"]) == {"ce", "tckd", "nckd"}
