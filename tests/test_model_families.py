"""Lazy model registration, ``register.family(list_names, make_factory, description)``: nothing is
listed at load; names are listed once on first use, then looked up, created, suggested and checked
for clashes with other plugins like names registered one by one."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from torch import nn

from kdzoo import KDZooError, hookimpl
from kdzoo.cli import cmd_plugins
from kdzoo.plugins import load_plugins

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "writing-plugins.md"


def tiny_factory(num_classes: int = 10, pretrained: bool = False, **kwargs) -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, num_classes))


class FamilyPlugin:
    """A plugin that registers ``eager`` names one by one and ``lazy`` names as one family, recording calls."""

    def __init__(self, lazy: list[str], eager: tuple[str, ...] = (), fail: Exception | None = None) -> None:
        self.lazy, self.eager, self.fail, self.calls = lazy, eager, fail, []

    def list_names(self) -> list[str]:
        self.calls.append("list")
        if self.fail is not None:
            raise self.fail
        return list(self.lazy)

    def make_factory(self, name: str):
        self.calls.append(name)
        return tiny_factory

    @hookimpl
    def register_models(self, register):
        for name in self.eager:
            register(name, tiny_factory)
        register.family(self.list_names, self.make_factory, "a family of tiny nets")


def test_a_family_is_listed_on_first_use_then_created_and_suggested(capsys):
    plugin = FamilyPlugin(["lazy_a", "lazy_b"], eager=("eager_net",))
    reg = load_plugins(extra=[("lazy", plugin)], only=[])
    info = reg.plugin("lazy")
    assert (info.status, info.models, info.model_families) == ("ok", ["eager_net"], ["a family of tiny nets"])
    cmd_plugins(argparse.Namespace(json=True), reg)  # `kdzoo plugins` shows the family without listing it
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert listed["lazy"]["model_families"] == ["a family of tiny nets"] and listed["lazy"]["models"] == ["eager_net"]
    assert plugin.calls == []

    assert reg.model_names("lazy_*") == ["lazy_a", "lazy_b"] and "eager_net" in reg.model_names()
    assert plugin.calls == ["list"]
    assert reg.create_model("lazy_b", num_classes=3)[-1].out_features == 3
    assert reg.create_model("lazy_b", num_classes=4)[-1].out_features == 4
    assert plugin.calls == ["list", "lazy_b"]  # listed once, one factory made per name
    assert reg.owner[("model", "lazy_a")] == "lazy" and reg.owner.get(("model", "nope")) is None
    assert "lazy_a" in reg.models and len(reg.models) == 3
    with pytest.raises(KDZooError, match=r"Unknown model 'lazy_aa'\. Did you mean 'lazy_a'"):
        reg.create_model("lazy_aa")
    assert plugin.calls.count("list") == 1


def test_a_family_name_that_another_plugin_registers_is_a_clash_naming_both():
    first = FamilyPlugin([], eager=("dup_net",))
    second = FamilyPlugin(["dup_net", "own_net"])
    reg = load_plugins(extra=[("first", first), ("second", second)], only=[])
    assert reg.plugin("second").status == "ok"  # families are not listed at load
    assert "dup_net" in reg.model_names()
    for use in (lambda: reg.create_model("dup_net"), lambda: reg.models["dup_net"], lambda: reg.owner[("model", "dup_net")]):
        with pytest.raises(KDZooError, match=r"model name clash: 'dup_net' is registered by both plugin 'first' "
                                             r"\(\(in-process\)\) and plugin 'second'.*-p no:NAME"):
            use()
    assert reg.create_model("own_net") is not None  # the plugin's other names keep working


def test_a_family_clashing_with_the_timm_family_names_both_plugins():
    mine = FamilyPlugin(["resnet20", "my_net"])
    reg = load_plugins(extra=[("mine", mine)], only=["timm"])
    with pytest.raises(KDZooError, match=r"'resnet20' is registered by both plugin 'timm' \(kdzoo\) and plugin 'mine'"):
        reg.create_model("resnet20")
    assert reg.owner[("model", "resnet32")] == "timm" and reg.owner[("model", "my_net")] == "mine"


def test_a_family_that_cannot_be_listed_is_left_out_and_named():
    broken = FamilyPlugin(["zoo_net"], fail=ModuleNotFoundError("No module named 'my_zoo'"))
    fine = FamilyPlugin([], eager=("fine_net",))
    reg = load_plugins(extra=[("zoo", broken), ("fine", fine)], only=[])
    assert reg.create_model("fine_net") is not None  # the other plugins' models keep working
    with pytest.raises(KDZooError, match=r"Unknown model 'zoo_net'.*Plugin 'zoo' is broken: listing its models "
                                         r"\(a family of tiny nets\) raised ModuleNotFoundError"):
        reg.create_model("zoo_net")
    strict = load_plugins(extra=[("zoo", broken)], only=[], strict=True)
    with pytest.raises(KDZooError, match=r"Plugin 'zoo' \(\(in-process\)\) is broken: .*No module named 'my_zoo'"):
        strict.model_names()


@pytest.mark.parametrize("call, says", [
    (lambda r: r.family("not callable", lambda name: tiny_factory, "x"), "must be callable"),
    (lambda r: r.family(list, lambda name: tiny_factory, ""), "description must be a non-empty string"),
])
def test_a_wrong_family_registration_breaks_its_plugin(call, says):
    class Bad:
        @hookimpl
        def register_models(self, register):
            call(register)

    reg = load_plugins(extra=[("bad", Bad())], only=[])
    assert reg.plugin("bad").status == "broken" and says in reg.plugin("bad").error


def test_a_factory_that_make_factory_cannot_make_names_the_plugin():
    class NoFactory(FamilyPlugin):
        def make_factory(self, name):
            return None

    reg = load_plugins(extra=[("nofactory", NoFactory(["odd_net"]))], only=[])
    with pytest.raises(KDZooError, match=r"Plugin 'nofactory' .* could not make the factory of model 'odd_net'"):
        reg.create_model("odd_net")


def test_the_guide_documents_the_family_call():
    assert "`register.family(list_names, make_factory, description)`" in GUIDE.read_text()
