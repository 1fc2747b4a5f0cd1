"""kdzoo.testing: every first-party method and CIFAR model passes the contract checks (as timm's
suite checks every registered model), and broken plugins fail them with a message that says
what to fix. The fixtures used here come from the pytest11 entry point, not from a conftest."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdzoo.methods import Method
from kdzoo.models import Outputs
from kdzoo.plugins import load_plugins
from kdzoo.testing import (NETINFO_PAIRS, ContractError, check_declaration, check_determinism,
                           check_gradients, check_hparams, check_method, check_model, check_registered,
                           check_state_dict, check_terms)
from kdzoo_plugins.kd import KD
from kdzoo_plugins.timm_backbones import ALIASES

REGISTRY = load_plugins(strict=True)
FIRST_PARTY_METHODS = sorted(n for n, owner in ((n, REGISTRY.owner[("method", n)]) for n in REGISTRY.methods)
                             if REGISTRY.plugin(owner).dist == "kdzoo")


def test_every_first_party_method_is_checked():
    assert FIRST_PARTY_METHODS == ["attention", "ce", "fitnets", "kd", "rkd"]
    assert len(ALIASES) == 23 and {"resnet20", "resnet8x4", "wrn_40_2", "mobile_half", "vgg13_cifar"} <= set(ALIASES)


@pytest.mark.parametrize("name", FIRST_PARTY_METHODS)
def test_first_party_method_follows_the_contract(name, kdzoo_check_method, kdzoo_registry):
    cls = kdzoo_registry.method(name)
    kdzoo_check_method(cls)
    check_registered(cls, kdzoo_registry)


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_cifar_model_follows_the_contract(name, kdzoo_check_model):
    info = kdzoo_check_model(name)
    first = (16, 16) if name == "mobile_half" else (32, 32)  # RepDistiller's MobileNetV2 has a stride-2 stem
    assert info.num_classes == 10 and info.stage_sizes[0] == first and info.stage_sizes[-1] in {(8, 8), (4, 4), (2, 2)}


def test_fixtures_come_from_the_pytest11_plugin(request, kdzoo_netinfo_pairs):
    plugin = request.config.pluginmanager.get_plugin("kdzoo")
    assert plugin is not None and plugin.__name__ == "kdzoo.pytest_plugin"
    assert kdzoo_netinfo_pairs == NETINFO_PAIRS and len(NETINFO_PAIRS) == 6
    shapes = {name: (s.num_stages, t.num_stages, s.stage_sizes == t.stage_sizes, s.stage_channels == t.stage_channels)
              for name, (s, t) in NETINFO_PAIRS.items()}
    assert shapes["identical nets"] == (3, 3, True, True)
    assert shapes["wider teacher"] == (3, 3, True, False)
    assert shapes["deeper teacher (4 stages vs 3)"][:2] == (3, 4)
    assert shapes["shallower teacher (2 stages vs 3)"][:2] == (3, 2)
    assert shapes["deeper student (4 stages vs 3)"][:2] == (4, 3)
    s, t = NETINFO_PAIRS["no shared spatial size"]
    assert not set(s.stage_sizes) & set(t.stage_sizes)


# --------------------------------------------------------------------------- broken methods


def kl(s, t, T=4.0):
    return F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T * T


class NoCE(KD):
    name = "no_ce"

    def forward(self, student, teacher, labels):
        return {"kd": self.w_kd * kl(student.logits, teacher.logits.detach())}


class NonScalar(KD):
    name = "non_scalar"

    def forward(self, student, teacher, labels):
        return {"ce": self.w_ce * F.cross_entropy(student.logits, labels, reduction="none")}


class ReturnsTotal(KD):
    name = "returns_total"

    def forward(self, student, teacher, labels):
        return sum(super().forward(student, teacher, labels).values())


class PythonFloat(KD):
    name = "python_float"

    def forward(self, student, teacher, labels):
        terms = super().forward(student, teacher, labels)
        return {**terms, "kd": terms["kd"].item()}


class NaNTerm(KD):
    name = "nan_term"

    def forward(self, student, teacher, labels):
        return {**super().forward(student, teacher, labels), "kd": self.w_kd * torch.log(student.logits.sum() * 0)}


class LeaksTeacher(KD):
    name = "leaks_teacher"

    def forward(self, student, teacher, labels):
        return {"ce": self.w_ce * self.ce(student.logits, labels), "kd": self.w_kd * kl(student.logits, teacher.logits)}


class BareAlpha(Method):
    name = "bare_alpha"
    defaults = {"w_ce": 1.0, "alpha": 0.9}


class UndeclaredFeatures(KD):
    name = "undeclared_features"

    def forward(self, student, teacher, labels):
        terms = super().forward(student, teacher, labels)
        terms["kd"] = terms["kd"] + student.features[-1].mean() * 0
        return terms


class UnusedParameter(KD):
    name = "unused_parameter"

    def __init__(self, student, teacher=None, **hparams):
        super().__init__(student, teacher, **hparams)
        self.head = nn.Linear(student.num_classes, student.num_classes)


class PlainTensorState(KD):
    name = "plain_tensor_state"

    def __init__(self, student, teacher=None, **hparams):
        super().__init__(student, teacher, **hparams)
        self.proj = torch.randn(student.num_classes, student.num_classes)  # not a buffer: not saved

    def forward(self, student, teacher, labels):
        return super().forward(Outputs(student.logits @ self.proj.to(student.logits)), teacher, labels)


class PythonRandom(KD):
    name = "python_random"

    def forward(self, student, teacher, labels):
        terms = super().forward(student, teacher, labels)
        return {**terms, "kd": terms["kd"] * (1 + random.random())}


class Float32Constant(KD):
    name = "float32_constant"

    def forward(self, student, teacher, labels):
        terms = super().forward(student, teacher, labels)
        return {**terms, "kd": terms["kd"] + (student.logits @ torch.zeros(student.logits.shape[1])).mean()}


class SquaredWeight(KD):
    name = "squared_weight"

    def forward(self, student, teacher, labels):
        return {"ce": self.w_ce * self.ce(student.logits, labels),
                "kd": self.w_kd ** 2 * kl(student.logits, teacher.logits.detach())}


class UnweightedTerm(KD):
    name = "unweighted_term"

    def forward(self, student, teacher, labels):
        return {**super().forward(student, teacher, labels), "entropy": -F.softmax(student.logits, -1).max(-1).values.mean()}


class SwallowsHparams(KD):
    name = "swallows_hparams"

    def __init__(self, student, teacher=None, **hparams):
        super().__init__(student, teacher)


class TupleDefault(KD):
    name = "tuple_default"
    defaults = {**KD.defaults, "stages": (1, 2)}


BROKEN = [
    (NoCE, check_terms, "without the cross-entropy term 'ce'"),
    (NonScalar, check_terms, "'ce' has shape (4,), not a scalar"),
    (ReturnsTotal, check_terms, "returned Tensor, not a non-empty dict"),
    (PythonFloat, check_terms, "'kd' is a float, not a tensor"),
    (NaNTerm, check_terms, "'kd' is -inf for random inputs"),
    (LeaksTeacher, check_gradients, "gradient reaches the teacher's logits"),
    (BareAlpha, check_declaration, "hyperparameter 'alpha' is ambiguous"),
    (UndeclaredFeatures, check_terms, "declares needs_features=True"),
    (UnusedParameter, check_gradients, "parameters ['head.weight', 'head.bias'] get no gradient"),
    (PlainTensorState, check_state_dict, "register every learned or random tensor as a parameter or buffer"),
    (PythonRandom, check_determinism, "two runs under the same seed gave different terms"),
    (Float32Constant, check_method, "in float64"),
    (SquaredWeight, check_hparams, "doubling w_kd changed term 'kd'"),
    (UnweightedTerm, check_hparams, "term 'entropy' has no weight w_entropy"),
    (SwallowsHparams, check_hparams, "an unknown hyperparameter was accepted silently"),
    (TupleDefault, check_declaration, "cannot be written in YAML and read back as the same value"),
]


@pytest.mark.parametrize("cls, check, message", BROKEN, ids=[c.name for c, _, _ in BROKEN])
def test_broken_method_fails_with_an_actionable_message(cls, check, message):
    with pytest.raises(ContractError) as info:
        check(cls)
    text = str(info.value)
    assert message in text
    assert f"'{cls.name}'" in text or cls.__qualname__ in text  # names the culprit
    assert "How to fix:" in text
    if check is not check_method:  # check_method runs every check, so it catches the same bug
        with pytest.raises(ContractError, match="How to fix"):
            check_method(cls)


def test_a_contract_error_is_an_assertion_error():
    assert issubclass(ContractError, AssertionError)  # pytest shows it as a failed assertion


def test_hparam_overrides_reach_every_check():
    check_method(KD, T=2.0, w_kd=0.5)
    with pytest.raises(ContractError, match="construction refused this pair.*T > 0"):
        check_method(KD, T=0.0)


def test_pairs_can_be_restricted():
    from kdzoo_plugins.fitnets import FitNets

    with pytest.raises(ContractError, match="construction refused this pair") as info:
        check_terms(FitNets, hint_stage=1)  # the student's 16x16 stage 1 has no teacher partner in some pairs
    assert "pair '" in str(info.value) and "pairs=" in str(info.value)
    same = {k: v for k, v in NETINFO_PAIRS.items() if k in ("identical nets", "wider teacher")}
    check_method(FitNets, pairs=same, hint_stage=1)


def test_registered_check_names_the_missing_method():
    with pytest.raises(ContractError, match="(?s)method 'no_ce' is not registered.*entry-points.kdzoo"):
        check_registered(NoCE, REGISTRY)


# --------------------------------------------------------------------------- models


class PlainNet(nn.Module):
    """No timm API: kdzoo finds its stages with hooks on the direct children."""

    def __init__(self, num_classes: int = 10, pretrained: bool = False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.down(self.stem(x))).flatten(1))


def test_plain_module_model_passes():
    info = check_model(PlainNet)
    assert info.stage_channels == (8, 16) and info.stage_sizes == ((32, 32), (16, 16)) and info.embed_dim == 16


def test_broken_models_fail_with_an_actionable_message():
    class Unused(PlainNet):
        def __init__(self, num_classes=10, pretrained=False):
            super().__init__(num_classes)
            self.extra = nn.Linear(3, 3)

    with pytest.raises(ContractError, match=r"parameters \['extra.weight', 'extra.bias'\] get no gradient"):
        check_model(Unused)

    def ignores_num_classes(num_classes=10, pretrained=False):
        return PlainNet(10)

    with pytest.raises(ContractError, match=r"logits of shape \(2, 10\), not \(2, 7\)"):
        check_model(ignores_num_classes)

    def wrong_feature_info(num_classes=10, **kw):
        model = REGISTRY.models["resnet20"](num_classes=num_classes)
        model.feature_info[1]["num_chs"] = 99
        return model

    with pytest.raises(ContractError, match=r"feature_info\[1\] says num_chs=99") as info:
        check_model(wrong_feature_info)
    assert "make feature_info match" in str(info.value)
    with pytest.raises(ContractError, match="model 'no_such_net': no model of this name is registered"):
        check_model("no_such_net", registry=REGISTRY)


def test_checks_leave_the_global_rng_alone():
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    check_method(KD, pairs={"identical nets": NETINFO_PAIRS["identical nets"]})
    check_model(PlainNet)
    assert torch.equal(torch.rand(3), expected)
