"""`kdzoo methods`: every method on one line, grouped by family (logits, features, relation, other
families, then "other"), with its plugin, what it needs and its defaults; `kdzoo methods NAME`: one
method in full (defaults, per-pair defaults, needs, init stage, reference, documentation)."""
from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

import kdzoo.cli as cli
from kdzoo import catalog, hookimpl
from kdzoo.methods import INIT_STAGE_DEFAULTS, Method
from kdzoo.models import NetInfo
from kdzoo.plugins import load_plugins

NET = NetInfo(stage_channels=(8, 16), stage_sizes=((8, 8), (4, 4)), embed_dim=16, num_classes=10)


class TLogit(Method):
    """A logit method: its class docstring."""

    name = "t_logit"
    family = "logits"
    defaults = {"w_ce": 1.0, "w_kd": 0.5, "T": 4.0}
    reference = "Logit et al., 2020."


class TFeat(Method):
    """A feature method with an init stage that runs on the teacher alone."""

    name = "t_feat"
    family = "features"
    needs_features = True
    needs_preact = True
    needs_stem = True
    has_init_stage = True
    init_uses_student = False
    defaults = {"w_ce": 1.0, "w_f": 1.0, "mode": "rd", **INIT_STAGE_DEFAULTS}
    pair_defaults = {("resnet56", "resnet20"): {"w_f": 2.0}, ("wrn_40_2", "wrn_16_2"): {"w_f": 6.0, "mode": "x"}}
    reference = "Feature et al., 2021; per-pair weights from their configs."


class TRel(Method):
    name = "t_rel"
    family = "relation"
    needs_embedding = True
    needs_indices = True
    needs_train_labels = True
    needs_teacher_net = True
    defaults = {"w_ce": 1.0, "w_rel": 0.8, "w_push": -1.0}
    signed_weights = frozenset({"w_push"})


class TCustom(Method):
    name = "t_custom"
    family = "hybrid"  # not one of FAMILIES: listed under its own heading, after the known ones


class TPlain(Method):  # no docstring, no family, no teacher
    name = "t_plain"
    needs_teacher = False
    defaults = {"w_ce": 1.0, "sizes": [1, 2]}


class TinyPlugin:
    @hookimpl
    def register_methods(self, register):
        for cls in (TLogit, TFeat, TRel, TCustom, TPlain):
            register(cls)
        register(TLogit, name="t_alias")


@pytest.fixture(scope="module")
def tiny_registry():
    return load_plugins(extra=[("tiny", TinyPlugin())], only=[])


def run(monkeypatch, argv: list[str], registry=None, width: int = 40) -> tuple[int, str, str]:
    """``kdzoo ARGV`` on ``registry`` (default: the installed plugins), on consoles ``width`` columns wide."""
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, width=width, color_system=None))
    monkeypatch.setattr(cli, "err_console", Console(file=err, width=width, color_system=None))
    if registry is not None:
        monkeypatch.setattr(cli, "load_plugins", lambda **kwargs: registry)
    rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


def groups(text: str) -> dict[str, list[str]]:
    """Family heading -> the method lines under it (headings start at column 0, methods are indented)."""
    lines = text.splitlines()
    assert lines[0].split() == ["method", "plugin", "needs", "defaults"]
    out: dict[str, list[str]] = {}
    for line in lines[1:]:
        if line.startswith("  "):
            out[heading].append(line)
        else:
            heading = line
            out[heading] = []
    return out


def test_listing_groups_by_family_one_whole_line_per_method(monkeypatch, tiny_registry):
    rc, out, err = run(monkeypatch, ["methods"], tiny_registry, width=40)
    assert rc == 0
    by_family = groups(out)
    assert list(by_family) == ["logits", "features", "relation", "hybrid", "other"]
    names = {family: [line.split()[0] for line in lines] for family, lines in by_family.items()}
    assert names == {"logits": ["t_alias", "t_logit"], "features": ["t_feat"], "relation": ["t_rel"],
                     "hybrid": ["t_custom"], "other": ["ce", "t_plain"]}
    rows = {line.split()[0]: line for lines in by_family.values() for line in lines}
    expected = {  # name -> (plugin, needs, defaults): each on its one line, although the console is 40 wide
        "t_logit": ("tiny", "teacher", "w_ce=1.0, w_kd=0.5, T=4.0"),
        "t_feat": ("tiny", "teacher, features, pre-activation features, stem, init stage",
                   "w_ce=1.0, w_f=1.0, mode=rd, init_epochs=0, init_fraction=0.125, init_lr=0.0"),
        "t_rel": ("tiny", "teacher, embedding, sample indices, training labels, teacher network",
                  "w_ce=1.0, w_rel=0.8, w_push=-1.0"),
        "t_custom": ("tiny", "teacher", "w_ce=1.0"),
        "t_plain": ("tiny", "-", "w_ce=1.0, sizes=[1, 2]"),
        "ce": ("builtin", "-", "w_ce=1.0"),
    }
    for name, (plugin, needs, defaults) in expected.items():
        assert re.fullmatch(rf"  {name} +{plugin} +{re.escape(needs)} +{re.escape(defaults)}", rows[name]), rows[name]
    columns = {rows[name].index(defaults) for name, (_, _, defaults) in expected.items()}
    assert len(columns) == 1  # the defaults start in one column: the lines read as a table
    assert "7 method(s)" in err and "kdzoo methods NAME" in err


def test_details_of_a_method_with_an_init_stage_and_per_pair_defaults(monkeypatch, tiny_registry):
    rc, out, _ = run(monkeypatch, ["methods", "t_feat"], tiny_registry, width=200)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == "t_feat"
    fields = dict(re.fullmatch(r"(\w[\w ]*?)  +(.*)", line).groups() for line in lines[1:6])
    assert fields == {
        "from": "plugin 'tiny' ((in-process) -)",
        "family": "features",
        "needs": "teacher, features, pre-activation features, stem, init stage",
        "init stage": "yes: 30 epochs before a 240-epoch schedule's main stage (init_fraction=0.125 of the main "
                      "stage's epochs; --set init_epochs=N fixes the count); it runs without a student forward pass",
        "reference": "Feature et al., 2021; per-pair weights from their configs.",
    }
    cells = [[c.strip() for c in line.strip("│┃ ").split("│" if "│" in line else "┃")] for line in lines
             if line.startswith(("│", "┃"))]
    assert cells == [["hyperparameter", "default"], ["w_ce", "1.0"], ["w_f", "1.0"], ["mode", "'rd'"],
                     ["init_epochs", "0"], ["init_fraction", "0.125"], ["init_lr", "0.0"],
                     ["teacher → student", "overrides"], ["resnet56 → resnet20", "w_f=2.0"],
                     ["wrn_40_2 → wrn_16_2", "w_f=6.0, mode=x"]]
    assert "per-pair defaults" in out and "win over both" in out
    assert "A feature method with an init stage that runs on the teacher alone." in out
    assert f"From module {TFeat.__module__}:" in out and "(defaults, per-pair defaults, needs, init stage" in out  # this file's docstring


def test_details_of_a_plain_method_and_an_alias(monkeypatch, tiny_registry):
    rc, out, _ = run(monkeypatch, ["methods", "t_plain"], tiny_registry, width=200)
    assert rc == 0
    assert "family      other (none declared)" in out and "needs       nothing but the student's logits" in out
    assert "init stage  none" in out and "per-pair defaults: none" in out and "reference   -" in out
    assert "│ sizes          │ [1, 2]  │" in out  # a list default, not eaten as rich markup
    assert Method.__doc__.splitlines()[0] not in out  # no docstring of its own: the base class's is not shown
    rc, out, _ = run(monkeypatch, ["methods", "t_alias"], tiny_registry, width=200)
    assert out.splitlines()[0] == "t_alias (class name 't_logit')" and "A logit method: its class docstring." in out
    rc, out, _ = run(monkeypatch, ["methods", "t_rel"], tiny_registry, width=200)
    assert "signed weights  w_push may be negative" in out
    assert "needs           teacher, embedding, sample indices, training labels, teacher network" in out


@pytest.mark.parametrize("init_epochs, init_fraction, expected", [
    (0, 30 / 240, 30),  # RepDistiller: 30 init epochs before 240
    (5, 30 / 240, 5),  # a fixed count wins over the fraction
    (0, 0.2, 48),
    (0, 0.001, 1),  # rounded, but at least one epoch while the fraction is > 0
    (0, 0.0, 0),  # off
])
def test_init_stage_epochs_follow_the_class_defaults(monkeypatch, init_epochs, init_fraction, expected):
    cls = type("TInit", (TFeat,), {"defaults": {**TFeat.defaults, "init_epochs": init_epochs,
                                                "init_fraction": init_fraction}})
    assert catalog.init_stage_epochs(cls) == expected
    assert cls(NET, NET).num_init_epochs(240) == expected  # what the engine would run
    registry = load_plugins(extra=[("tiny", SimpleNamespace(register_methods=hookimpl(lambda register: register(cls))))],
                            only=[])
    _, out, _ = run(monkeypatch, ["methods", "t_feat"], registry, width=300)
    line = next(line for line in out.splitlines() if line.startswith("init stage"))
    if expected:
        assert f"yes: {expected} epoch{'s' if expected != 1 else ''} before a 240-epoch schedule" in line
        assert ("init_epochs=5)" in line) == (init_epochs == 5)
    else:
        assert "off by default" in line


def test_unknown_method_suggests_close_names(monkeypatch, tiny_registry):
    rc, out, err = run(monkeypatch, ["methods", "t_logi"], tiny_registry, width=200)
    assert rc == 2 and out == ""
    assert "Unknown method 't_logi'" in err and "Did you mean 't_logit'" in err


def test_installed_first_party_methods(monkeypatch):
    registry = load_plugins()
    rc, out, _ = run(monkeypatch, ["methods"], width=80)
    assert rc == 0
    by_family = groups(out)
    known = [f for f in ("logits", "features", "relation", "other") if f in by_family]
    assert list(by_family)[:len(known)] == known and list(by_family)[-1] == "other"
    rows = {line.split()[0]: (family, line) for family, lines in by_family.items() for line in lines}
    assert set(rows) == set(registry.methods)
    for name in ("ce", "kd", "fitnets", "attention", "rkd"):
        cls = registry.methods[name]
        family, line = rows[name]
        assert family == (cls.family or "other")
        assert line.split()[1] == registry.owner[("method", name)]
        assert line.endswith(", ".join(f"{k}={v}" for k, v in cls.defaults.items()))
    assert "teacher, features" in rows["fitnets"][1] and "teacher, embedding" in rows["rkd"][1]
    rc, out, _ = run(monkeypatch, ["methods", "kd"], width=400)
    assert rc == 0 and "from        plugin 'kd' (kdzoo " in out
    assert registry.methods["kd"].reference in out
    assert "kd = T^2 * KL(softmax(t / T) || softmax(s / T))" in out  # the definition, from the module docstring


def test_the_guides_worked_example_is_listed_as_the_guide_shows(monkeypatch):
    text = (Path(__file__).resolve().parents[1] / "docs" / "writing-plugins.md").read_text()
    (body,) = re.findall(r"^```python\n(# kdzoo-logit-l2/src/kdzoo_logit_l2/__init__\.py\n.*?)^```$", text, re.M | re.S)
    namespace: dict = {"__name__": "kdzoo_logit_l2_from_the_guide"}
    exec(compile(body, "writing-plugins.md", "exec"), namespace)
    registry = load_plugins(extra=[("logit_l2", SimpleNamespace(register_methods=namespace["register_methods"]))], only=[])
    _, out, _ = run(monkeypatch, ["methods"], registry, width=80)
    family, shown = re.search(r'^kdzoo methods +# under "(\w+)": +(.*)$', text, re.M).groups()
    (row,) = groups(out)[family]
    assert row.split() == shown.split()  # what the guide's comment shows, up to the spacing
    assert "w_ce=0.0, w_l2=1.0" in row and "teacher" in row  # what tests/test_docs.py's slow test checks


def test_methods_commands_do_not_import_timm(tmp_path):
    code = ("import contextlib, io, sys, kdzoo.cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert kdzoo.cli.main(['methods']) == 0 and kdzoo.cli.main(['methods', 'kd']) == 0\n"
            "print(sorted(m for m in ('timm', 'torchvision') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
