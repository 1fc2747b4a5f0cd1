"""Plugin discovery through real entry points, broken-plugin isolation, enable/disable."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest

import kdzoo
from kdzoo import KDZooError
from kdzoo.cli import main
from kdzoo.plugins import load_plugins

FIRST_PARTY = {"kd", "fitnets", "attention", "rkd", "sp", "cc", "vid", "pkt", "nst", "ab", "ft", "fsp", "kdsvd",
               "crd", "ofd", "reviewkd", "dkd", "dist", "ctkd", "timm", "cifar10", "cifar100", "svhn", "folder",
               "foreign_checkpoints", "tensorboard_observer", "mlflow_observer"}


def make_dist(root, dist: str, version: str, modules: dict[str, str], eps: dict[str, str]) -> None:
    """A fake installed distribution: modules plus a ``*.dist-info`` with ``entry_points.txt``."""
    for mod, source in modules.items():
        (root / f"{mod}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text("[kdzoo]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))


@pytest.fixture
def fake_dists(tmp_path, monkeypatch):
    """Adds a folder of fake distributions to sys.path; returns a function that creates one."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("KDZOO_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("KDZOO_DISABLE_PLUGINS", raising=False)
    created = []

    def create(dist, version, modules, eps):
        make_dist(tmp_path, dist, version, modules, eps)
        created.extend(modules)

    yield create
    for mod in created:
        sys.modules.pop(mod, None)


GOOD_METHOD = """
    import torch
    from kdzoo import hookimpl
    from kdzoo.methods import Method

    class HalfCE(Method):
        name = "half_ce"
        needs_teacher = False
        defaults = {"w_ce": 0.5}

        def forward(self, student, teacher, labels):
            return {"ce": self.w_ce * self.ce(student.logits, labels)}

    @hookimpl
    def register_methods(register):
        register(HalfCE)
"""


def test_first_party_plugins_load_through_installed_entry_points():
    eps = {ep.name: ep for ep in entry_points(group="kdzoo") if ep.dist and ep.dist.name == "kdzoo"}
    assert set(eps) == FIRST_PARTY
    for ep in eps.values():
        ep.load()  # every declared entry point imports
    reg = load_plugins(strict=True)
    assert {"ce", "kd", "fitnets", "attention", "rkd"} <= set(reg.methods)
    assert {"resnet20", "resnet8x4", "wrn_40_2", "resnet18"} <= set(reg.models)
    by_name = {p.name: p for p in reg.plugins}
    assert by_name["kd"].methods == ["kd"] and by_name["kd"].dist == "kdzoo" and by_name["kd"].status == "ok"
    assert by_name["builtin"].methods == ["ce"]
    assert reg.owner[("method", "fitnets")] == "fitnets"
    assert reg.owner[("model", "resnet20")] == "timm"


def test_core_never_imports_plugins():
    code = (
        "import sys, kdzoo, kdzoo.plugins, kdzoo.engine, kdzoo.cli, kdzoo.runner, kdzoo.config;"
        "print(sorted(m for m in sys.modules if m.startswith('kdzoo_plugins')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_third_party_plugin_registers_and_is_listed(fake_dists, capsys):
    fake_dists("kdzoo-halfce", "1.2.3", {"kdzoo_halfce": GOOD_METHOD}, {"halfce": "kdzoo_halfce"})
    reg = load_plugins(strict=True)
    info = reg.plugin("halfce")
    assert (info.dist, info.version, info.methods, info.status) == ("kdzoo-halfce", "1.2.3", ["half_ce"], "ok")
    assert reg.method("half_ce").defaults == {"w_ce": 0.5}
    assert main(["plugins", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert listed["halfce"]["dist"] == "kdzoo-halfce" and listed["halfce"]["version"] == "1.2.3"


BROKEN = {
    "import_error": ("import kdzoo_no_such_module_xyz\n", "ModuleNotFoundError"),
    "hook_typo": ("from kdzoo import hookimpl\n@hookimpl\ndef register_method(register):\n    pass\n", "register_method"),
    "raising_hook": ("from kdzoo import hookimpl\n@hookimpl\ndef register_methods(register):\n    raise RuntimeError('boom')\n", "boom"),
    "bad_register": ("from kdzoo import hookimpl\n@hookimpl\ndef register_methods(register):\n    register(object)\n", "subclass"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_plugin_is_isolated(fake_dists, case):
    source, expected = BROKEN[case]
    fake_dists("kdzoo-good", "1.0", {"kdzoo_good": GOOD_METHOD}, {"good": "kdzoo_good"})
    fake_dists(f"kdzoo-{case}", "0.1", {f"kdzoo_{case}": source}, {case: f"kdzoo_{case}"})
    reg = load_plugins()
    bad = reg.plugin(case)
    assert bad.status == "broken" and expected in bad.error
    assert bad.methods == [] and bad.models == []
    assert reg.plugin("good").status == "ok" and "half_ce" in reg.methods
    assert "kd" in reg.methods  # first-party plugins unaffected
    with pytest.raises(KDZooError, match=case):
        load_plugins(strict=True)


def test_duplicate_method_name_names_both_plugins(fake_dists):
    fake_dists("kdzoo-first", "1.0", {"kdzoo_first": GOOD_METHOD}, {"first": "kdzoo_first"})
    fake_dists("kdzoo-second", "2.0", {"kdzoo_second": GOOD_METHOD}, {"second": "kdzoo_second"})
    reg = load_plugins()
    err = reg.plugin("second").error
    assert "half_ce" in err and "'first'" in err and "'second'" in err and "kdzoo-first" in err
    assert reg.owner[("method", "half_ce")] == "first"
    clash = GOOD_METHOD.replace('name = "half_ce"', 'name = "kd"')
    fake_dists("kdzoo-clash", "1.0", {"kdzoo_clash": clash}, {"clash": "kdzoo_clash"})
    reg = load_plugins()
    assert "'kd'" in reg.plugin("clash").error and reg.owner[("method", "kd")] == "kd"


def test_disable_and_restrict(fake_dists, monkeypatch):
    fake_dists("kdzoo-halfce", "1.2.3", {"kdzoo_halfce": GOOD_METHOD}, {"halfce": "kdzoo_halfce"})
    assert "rkd" not in load_plugins(disable=["rkd"]).methods
    assert "half_ce" not in load_plugins(disable=["kdzoo-halfce"]).methods  # by distribution name
    monkeypatch.setenv("KDZOO_DISABLE_PLUGINS", "kd, attention")
    reg = load_plugins()
    assert not {"kd", "attention"} & set(reg.methods) and reg.plugin("kd").status == "disabled"
    monkeypatch.delenv("KDZOO_DISABLE_PLUGINS")
    monkeypatch.setenv("KDZOO_LOAD_PLUGINS", "")
    assert set(load_plugins().methods) == {"ce"}  # builtin only, like LLM_LOAD_PLUGINS=''
    monkeypatch.setenv("KDZOO_LOAD_PLUGINS", "kd")
    assert set(load_plugins().methods) == {"ce", "kd"}


def test_cli_flag_disables_plugin(capsys):
    assert main(["methods", "-p", "no:rkd"]) == 0
    out = capsys.readouterr().out
    assert "fitnets" in out and "rkd" not in out
    assert main(["-p", "rkd", "methods"]) == 2
    assert "no:NAME" in capsys.readouterr().err


@pytest.mark.parametrize("env, kwargs, where, effect", [
    ({}, {"disable": ["nonexistent"]}, "-p no:nonexistent", "nothing was disabled"),
    ({"KDZOO_DISABLE_PLUGINS": "nonexistent"}, {}, "KDZOO_DISABLE_PLUGINS", "nothing was disabled"),
    ({"KDZOO_LOAD_PLUGINS": "nonexistent"}, {}, "KDZOO_LOAD_PLUGINS", "nothing was loaded for it"),
])
def test_unknown_plugin_names_warn_and_fail_under_strict(fake_dists, monkeypatch, env, kwargs, where, effect):
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    reg = load_plugins(**kwargs)
    (warning,) = reg.warnings
    assert warning.startswith(f"{where}: no installed plugin is called 'nonexistent', so {effect}.")
    assert f"Installed plugins: {', '.join(sorted(FIRST_PARTY))}." in warning
    with pytest.raises(KDZooError, match=f"{where}: no installed plugin is called 'nonexistent'.*strict"):
        load_plugins(strict=True, **kwargs)
    for var in env:
        monkeypatch.delenv(var)
    assert load_plugins(disable=["rkd", "kdzoo"]).warnings == []  # entry-point and distribution names are known
    assert "Did you mean 'kd'" in load_plugins(disable=["kdd"]).warnings[0]


def test_cli_prints_plugin_warnings_on_stderr(fake_dists, capsys):
    assert main(["methods", "-p", "no:nonexistent"]) == 0
    captured = capsys.readouterr()
    assert "warning:" in captured.err and "no installed plugin is called 'nonexistent'" in captured.err
    assert "nonexistent" not in captured.out
    assert main(["methods", "-p", "no:nonexistent", "--strict-plugins"]) == 2
    assert "error:" in capsys.readouterr().err


def test_method_of_a_disabled_plugin_names_the_plugin(fake_dists, monkeypatch):
    msg = "Method 'kd' is provided by plugin 'kd' (kdzoo {}), which is {}"
    with pytest.raises(KDZooError) as e:
        load_plugins(disable=["kd"]).method("kd")
    assert str(e.value).startswith(msg.format(kdzoo.__version__, "disabled (-p no:kd); re-enable it: drop -p no:kd"))
    assert "Did you mean" not in str(e.value)
    monkeypatch.setenv("KDZOO_DISABLE_PLUGINS", "kd")
    with pytest.raises(KDZooError, match=r"disabled \(KDZOO_DISABLE_PLUGINS\); re-enable it: remove it from"):
        load_plugins().method("kd")
    monkeypatch.delenv("KDZOO_DISABLE_PLUGINS")
    monkeypatch.setenv("KDZOO_LOAD_PLUGINS", "rkd")
    with pytest.raises(KDZooError, match=r"not loaded \(KDZOO_LOAD_PLUGINS does not name it\); add 'kd' to KDZOO_LOAD"):
        load_plugins().method("kd")
    monkeypatch.delenv("KDZOO_LOAD_PLUGINS")
    fake_dists("kdzoo-dkd", "0.1", {"kdzoo_dkd_broken": "import kdzoo_no_such_module_xyz\n"},
               {"dkd_example": "kdzoo_dkd_broken"})
    with pytest.raises(KDZooError, match=r"Method 'dkd_example' is provided by plugin 'dkd_example' \(kdzoo-dkd 0.1\), "
                                         r"which is broken \(ModuleNotFoundError"):
        load_plugins().method("dkd_example")
    with pytest.raises(KDZooError, match=r"Unknown method 'kdx'.*Not loaded: plugin 'kd' \(disabled\)"):
        load_plugins(disable=["kd"]).method("kdx")  # another name: the disabled plugin may provide it
