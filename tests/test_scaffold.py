"""`kdzoo new-plugin NAME`: the generated package installs with pip, kdzoo lists it and benchmarks it, and its
generated tests (which use kdzoo.testing) pass as generated."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib

import pytest

from kdzoo import KDZooError
from kdzoo.cli import main
from kdzoo.scaffold import new_plugin, plugin_names, render


def test_names_and_files():
    assert plugin_names("my_kd") == {"name": "my_kd", "dist": "kdzoo-my-kd", "package": "kdzoo_my_kd", "cls": "MyKd",
                                     "kdzoo_version": plugin_names("x")["kdzoo_version"]}
    files = render("my_kd")
    assert sorted(files) == ["README.md", "pyproject.toml", "src/kdzoo_my_kd/__init__.py", "tests/test_my_kd.py"]
    meta = tomllib.loads(files["pyproject.toml"])
    assert meta["project"]["name"] == "kdzoo-my-kd" and meta["project"]["version"] == "0.1.0"
    assert meta["project"]["entry-points"]["kdzoo"] == {"my_kd": "kdzoo_my_kd"}
    assert meta["tool"]["setuptools"]["packages"]["find"]["where"] == ["src"]
    for path in ("src/kdzoo_my_kd/__init__.py", "tests/test_my_kd.py"):
        compile(files[path], path, "exec")
    module = files["src/kdzoo_my_kd/__init__.py"]
    for attr in ("name = \"my_kd\"", "needs_teacher", "needs_features", "needs_embedding", "defaults", "reference",
                 "def forward", "@hookimpl", "register(MyKd)", '"ce": self.w_ce', '"my_kd": self.w_my_kd'):
        assert attr in module, attr
    assert "kdzoo_check_method(MyKd)" in files["tests/test_my_kd.py"]


def test_generated_package_installs_is_listed_and_its_tests_pass(tmp_path, install_package, capsys, cifar_path):
    assert main(["new-plugin", "my_kd", "--dir", str(tmp_path)]) == 0
    assert "pip install -e" in capsys.readouterr().out
    pkg = install_package(tmp_path / "kdzoo-my-kd")
    assert sorted(p.name for p in pkg.site.iterdir()) == ["kdzoo_my_kd", "kdzoo_my_kd-0.1.0.dist-info"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=pkg.source,
                          capture_output=True, text=True, env=pkg.env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert re.search(r"\b3 passed\b", proc.stdout) and "skipped" not in proc.stdout, proc.stdout[-500:]
    listed = {p["name"]: p for p in json.loads(pkg.kdzoo("plugins", "--json").stdout)}
    assert (listed["my_kd"]["dist"], listed["my_kd"]["version"], listed["my_kd"]["methods"], listed["my_kd"]["status"]) \
        == ("kdzoo-my-kd", "0.1.0", ["my_kd"], "ok")
    # ... and `kdzoo bench` trains it next to a built-in method, in its own column.
    import yaml

    cfg = tmp_path / "bench.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "scaffold", "data": {"train_size": 128, "test_size": 100}, "seeds": [0],
        "recipe": {"epochs": 1, "batch_size": 64, "eval_batch_size": 100}, "teachers": ["resnet20"],
        "students": ["wrn_16_1"], "methods": ["kd", "my_kd"]}))
    env = pkg.env(KDZOO_DATA=cifar_path, KDZOO_CACHE=str(tmp_path / "cache"))
    bench = pkg.kdzoo("bench", str(cfg), "--out", str(tmp_path / "out"), env=env)
    assert bench.returncode == 0, bench.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["columns"] == ["ce", "kd", "my_kd"]
    assert {c["variant"]: c["status"] for c in report["cells"]} == {"ce": "ok", "kd": "ok", "my_kd": "ok"}


def test_refuses_to_overwrite_and_bad_names(tmp_path, capsys):
    folder = new_plugin("mine", tmp_path)
    (folder / "README.md").write_text("my edits")
    with pytest.raises(KDZooError, match="already exists.*never overwrites"):
        new_plugin("mine", tmp_path)
    assert (folder / "README.md").read_text() == "my edits"
    assert main(["new-plugin", "mine", "--dir", str(tmp_path)]) == 2
    assert "never overwrites" in capsys.readouterr().err
    assert main(["new-plugin", "kd", "--dir", str(tmp_path)]) == 2  # a registered method's name
    assert "already registered" in capsys.readouterr().err
    for bad in ("My-KD", "2kd", "", "kd-x", "ce"):
        with pytest.raises(KDZooError, match="name|builtin"):
            new_plugin(bad, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kdzoo-mine"]
