"""The third-party example examples/kdzoo-dkd, installed with pip from its folder (real package
metadata, its own entry point): kdzoo lists it, trains it, disables and uninstalls it cleanly,
and its own test suite passes with kdzoo.testing's pytest plugin.

It also appears as its own column in a `kdzoo bench` table next to the built-in methods.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdzoo.config import Recipe
from kdzoo.data import prepare_data
from kdzoo_plugins.cifar10 import load_cifar10
from kdzoo.engine import Member, Trainer
from kdzoo.plugins import load_plugins
from kdzoo.runner import build_method, build_student

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "kdzoo-dkd"


@pytest.fixture(scope="module")
def dkd(install_package):
    return install_package(EXAMPLE)


def plugins_json(proc: subprocess.CompletedProcess) -> dict[str, dict]:
    assert proc.returncode == 0, proc.stderr
    return {p["name"]: p for p in json.loads(proc.stdout)}


def test_installed_plugin_is_listed_with_its_distribution(dkd):
    assert sorted(p.name for p in dkd.site.iterdir()) == ["kdzoo_dkd", "kdzoo_dkd-0.1.0.dist-info"]
    listed = plugins_json(dkd.kdzoo("plugins", "--json"))
    entry = listed["dkd"]
    assert (entry["dist"], entry["version"], entry["methods"], entry["status"]) == ("kdzoo-dkd", "0.1.0", ["dkd"], "ok")
    assert entry["source"] == "kdzoo_dkd" and entry["models"] == []
    assert all(p["status"] == "ok" for p in listed.values())  # installing it broke nothing
    methods = dkd.kdzoo("methods")
    row = next(line for line in methods.stdout.splitlines() if re.search(r"\bdkd\b", line))
    assert "teacher" in row and "w_nckd=8.0" in row and "warmup=20" in row


def test_disabling_removes_it(dkd):
    listed = plugins_json(dkd.kdzoo("plugins", "--json", "-p", "no:dkd"))
    assert listed["dkd"]["status"] == "disabled" and listed["dkd"]["methods"] == []
    by_dist = dkd.kdzoo("methods", env=dkd.env(KDZOO_DISABLE_PLUGINS="kdzoo-dkd"))
    assert by_dist.returncode == 0 and not re.search(r"\bdkd\b", by_dist.stdout) and re.search(r"\bkd\b", by_dist.stdout)


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
        assert registry.describe_origin("dkd") == "plugin 'dkd' (kdzoo-dkd 0.1.0)"
        assert Path(sys.modules["kdzoo_dkd"].__file__).is_relative_to(dkd.site)
        data = prepare_data(load_cifar10(cifar_path), train_size=192, test_size=100, subset_seed=0)
        torch.manual_seed(123)
        teacher = build_student(registry, "resnet20", {}, 123, num_classes=10)  # untrained but fixed: enough for a finite-loss run
        members = []
        for name, hparams in (("dkd", {"warmup": 1}), ("kd", {})):
            student = build_student(registry, "wrn_16_1", {}, 0, num_classes=10)
            method = build_method(registry, name, hparams, student.info, teacher.info, 0)
            members.append(Member(name, student, method, origin=registry.describe_origin(name)))
        recipe = Recipe(epochs=1, batch_size=64, lr=0.05, eval_batch_size=100)
        results = Trainer(members, data, recipe, teacher=teacher, seed=0).fit()
    finally:
        sys.modules.pop("kdzoo_dkd", None)
    by_method = {r["method"]: r for r in results}
    assert by_method["dkd"]["status"] == "ok" and by_method["kd"]["status"] == "ok"
    history = by_method["dkd"]["history"]
    assert len(history) == 1 and by_method["dkd"]["hparams"]["warmup"] == 1
    for record in history:
        assert set(record["loss"]) == {"ce", "tckd", "nckd"}
        assert all(math.isfinite(v) and v > 0 for v in record["loss"].values())
    assert 0.0 <= by_method["dkd"]["last"]["top1"] <= 100.0


def test_uninstalling_removes_it_cleanly(dkd, tmp_path):
    copy = dkd.clone(tmp_path / "site")  # uninstall a copy: the module fixture stays usable
    removed = copy.uninstall()
    assert {p.name for p in removed} >= {"__init__.py", "METADATA", "entry_points.txt", "RECORD"}
    assert list(copy.site.iterdir()) == []
    listed = plugins_json(copy.kdzoo("plugins", "--json"))
    assert "dkd" not in listed and all(p["dist"] != "kdzoo-dkd" for p in listed.values())
    assert all(p["status"] == "ok" for p in listed.values())  # no broken leftover
    assert not re.search(r"\bdkd\b", copy.kdzoo("methods").stdout)


def test_bench_trains_dkd_next_to_builtin_methods(dkd, cifar_path, tmp_path):
    import yaml

    cfg = tmp_path / "dkd.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "dkd-smoke", "data": {"train_size": 256, "test_size": 200}, "seeds": [0],
        "recipe": {"epochs": 1, "batch_size": 64, "eval_batch_size": 200}, "teacher_recipe": {"epochs": 1},
        "teachers": ["resnet20"], "students": ["wrn_16_1"], "methods": ["kd", {"name": "dkd", "warmup": 1}],
    }))
    env = dkd.env(KDZOO_DATA=cifar_path, KDZOO_CACHE=str(tmp_path / "cache"))
    proc = dkd.kdzoo("bench", str(cfg), "--out", str(tmp_path / "out"), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["columns"] == ["ce", "kd", "dkd(warmup=1)"]
    dkd_cells = [c for c in report["cells"] if c["variant"] == "dkd(warmup=1)"]
    assert len(dkd_cells) == 1 and dkd_cells[0]["status"] == "ok" and dkd_cells[0]["mean"] > 0
    assert "dkd(warmup=1)" in proc.stdout
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "out" / "runs").glob("*.json")
                 if json.loads(p.read_text()).get("method") == "dkd"]
    assert set(record["history"][0]["loss"]) == {"ce", "tckd", "nckd"}
