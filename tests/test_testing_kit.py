"""kdzoo.testing: every first-party method and CIFAR model passes the contract checks (as timm's
suite checks every registered model), and broken plugins fail them with a message that says
what to fix. The fixtures used here come from the pytest11 entry point, not from a conftest."""
from __future__ import annotations

import random

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import kdzoo_plugins.cifar_nets  # noqa: F401  (registers resnet8_cifar, resnet14_cifar with timm)
from kdzoo import KDZooError
from kdzoo.methods import INIT_STAGE_DEFAULTS, Method, PairNotSupported, feature_parameters
from kdzoo.models import KDNet, NetInfo, Outputs
from kdzoo.plugins import load_plugins
from kdzoo.testing import (BATCH, NETINFO_PAIRS, TRAIN_SET, ContractError, check_declaration, check_determinism,
                           check_gradients, check_hparams, check_indices, check_init_stage, check_method, check_model,
                           check_pair_defaults, check_registered, check_state_dict, check_teacher_net, check_terms,
                           make_outputs)
from kdzoo_plugins.kd import KD
from kdzoo_plugins.timm_backbones import ALIASES

REGISTRY = load_plugins(strict=True)
FIRST_PARTY_METHODS = sorted(n for n, owner in ((n, REGISTRY.owner[("method", n)]) for n in REGISTRY.methods)
                             if REGISTRY.plugin(owner).dist == "kdzoo")


def resnet14_teacher() -> nn.Module:
    model = timm.create_model("resnet14_cifar", num_classes=10)
    if not hasattr(model, "get_bn_before_relu"):  # OFD's hook, until the CIFAR nets have it (RepDistiller's list)
        model.get_bn_before_relu = lambda: [model.layer1[-1].bn2, model.layer2[-1].bn2, model.layer3[-1].bn2]
    return model


# Real networks for the checks that need them (bind_teacher, and init stages on a real student).
NETS = {"resnet14 -> resnet8": (lambda: timm.create_model("resnet8_cifar", num_classes=10), resnet14_teacher)}
# What a first-party method needs to be checked: real networks, hyperparameters that fit the checks' tiny sets.
FIRST_PARTY_CHECK_ARGS = {"crd": {"nce_k": 16}}


def test_every_first_party_method_is_checked():
    assert {"attention", "ce", "fitnets", "kd", "rkd"} <= set(FIRST_PARTY_METHODS)
    assert len(ALIASES) == 23 and {"resnet20", "resnet8x4", "wrn_40_2", "mobile_half", "vgg13_cifar"} <= set(ALIASES)


@pytest.mark.parametrize("name", FIRST_PARTY_METHODS)
def test_first_party_method_follows_the_contract(name, kdzoo_check_method, kdzoo_registry):
    cls = kdzoo_registry.method(name)
    kdzoo_check_method(cls, nets=NETS if cls.needs_teacher_net else None, **FIRST_PARTY_CHECK_ARGS.get(name, {}))
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


# --------------------------------------------------------------------------- optional parts of the contract
# Correct toy methods that use each new flag (they pass check_method), and one broken variant per new check.


def hint_loss(connector: nn.Module, s: Outputs, t: Outputs) -> torch.Tensor:
    """MSE between the connected last student stage and the last teacher stage (pooled to its size)."""
    x = connector(s.features[-1])
    y = t.features[-1].detach()
    return (F.adaptive_avg_pool2d(x, y.shape[-2:]) - y).pow(2).mean()


class ToyInit(Method):
    """An init stage training a 1x1 connector and the student's feature layers (AB/FSP-like), then CE + hint."""

    name = "toy_init"
    family = "features"
    needs_features = True
    has_init_stage = True
    defaults = {"w_ce": 1.0, "w_hint": 1.0, "w_init": 1.0, **INIT_STAGE_DEFAULTS}

    def __init__(self, student, teacher=None, **hparams):
        super().__init__(student, teacher, **hparams)
        self.connector = nn.Conv2d(student.stage_channels[-1], teacher.stage_channels[-1], 1)

    def init_parameters(self, student):
        return feature_parameters(student) + list(self.connector.parameters())

    def init_forward(self, student, teacher, labels):
        return {"init": self.w_init * hint_loss(self.connector, student, teacher)}

    def forward(self, student, teacher, labels):
        return {"ce": self.w_ce * self.ce(student.logits, labels),
                "hint": self.w_hint * hint_loss(self.connector, student, teacher)}


class ToyTeacherOnlyInit(ToyInit):
    """FT-like: the init stage reads only the teacher (init_uses_student=False) and trains the method's own
    parameters, which the main stage freezes."""

    name = "toy_teacher_only_init"
    init_uses_student = False

    def __init__(self, student, teacher=None, **hparams):
        super().__init__(student, teacher, **hparams)
        c = teacher.stage_channels[-1]
        self.autoencoder = nn.Conv2d(c, c, 1)

    def init_parameters(self, student):
        self.autoencoder.requires_grad_(True)
        return list(self.autoencoder.parameters())

    def init_forward(self, student, teacher, labels):
        t = teacher.features[-1].detach()
        return {"init": self.w_init * (self.autoencoder(t) - t).pow(2).mean()}

    def start_epoch(self, epoch, num_epochs):
        super().start_epoch(epoch, num_epochs)
        self.autoencoder.requires_grad_(False)


class ToyBank(Method):
    """A memory bank over the training set (CRD-like): needs_indices and needs_train_labels."""

    name = "toy_bank"
    family = "relation"
    needs_teacher = False
    needs_embedding = True
    needs_indices = True
    needs_train_labels = True
    defaults = {"w_ce": 1.0, "w_bank": 1.0, "momentum": 0.5}
    seen: list = []  # (len(labels), labels, indices, batch labels) of every bind / call, for the tests

    def __init__(self, student, teacher=None, **hparams):
        super().__init__(student, teacher, **hparams)
        self.proj = nn.Linear(student.embed_dim, 8)

    def bind_train_set(self, labels):
        self.register_buffer("labels", labels.clone())
        self.register_buffer("bank", F.normalize(torch.randn(len(labels), 8), dim=1))
        type(self).seen.append(("bind", labels.clone()))

    def forward(self, student, teacher, labels, indices):
        if not torch.equal(self.labels[indices], labels):
            raise KDZooError("the batch labels are not those of its training-set indices")
        type(self).seen.append(("call", indices.cpu().clone()))
        z = F.normalize(self.proj(student.embedding), dim=1)
        memory = self.bank[indices]
        loss = (z - memory).pow(2).sum(1).mean()
        if self.training:
            with torch.no_grad():
                self.bank[indices] = F.normalize(self.momentum * memory + (1 - self.momentum) * z.to(memory), dim=1)
        return {"ce": self.w_ce * self.ce(student.logits, labels), "bank": self.w_bank * loss}


class ToyTeacherNet(Method):
    """A buffer derived from the teacher network (OFD-like): the teacher's classifier weights."""

    name = "toy_teacher_net"
    family = "logits"
    needs_embedding = True
    needs_teacher_net = True
    defaults = {"w_ce": 1.0, "w_head": 1.0}
    bound: list = []

    def __init__(self, student, teacher=None, **hparams):
        super().__init__(student, teacher, **hparams)
        self.register_buffer("head", torch.zeros(teacher.num_classes, teacher.embed_dim))

    def bind_teacher(self, net):
        type(self).bound.append((type(net), net.training, any(p.requires_grad for p in net.parameters())))
        with torch.no_grad():
            self.head.copy_(net.model.get_classifier().weight)

    def forward(self, student, teacher, labels):
        target = teacher.embedding.detach() @ self.head.t().to(teacher.embedding)
        return {"ce": self.w_ce * self.ce(student.logits, labels),
                "head": self.w_head * (student.logits - target).pow(2).mean()}


class ToyPreactStem(Method):
    """Reads the pre-activation outputs and the stem of both nets."""

    name = "toy_preact_stem"
    family = "features"
    needs_preact = True
    needs_stem = True
    defaults = {"w_ce": 1.0, "w_pre": 1.0, "w_stem": 1.0}

    def forward(self, student, teacher, labels):
        pool = lambda x: x.mean(dim=(1, 2, 3))  # noqa: E731
        return {"ce": self.w_ce * self.ce(student.logits, labels),
                "pre": self.w_pre * (pool(student.preact[-1]) - pool(teacher.preact[-1].detach())).pow(2).mean(),
                "stem": self.w_stem * (pool(student.stem) - pool(teacher.stem.detach())).pow(2).mean()}


class TeacherPreactOnly(KD):
    """Uses the teacher's pre-activations only (ReviewKD-like): needs_preact is justified without a student gradient."""

    name = "teacher_preact_only"
    needs_preact = True

    def forward(self, student, teacher, labels):
        terms = super().forward(student, teacher, labels)
        scale = 1 + teacher.preact[-1].detach().mean().abs()
        return {**terms, "kd": terms["kd"] * scale}


class SameWidthOnly(KD):
    """Cannot serve pairs whose stage widths differ: raises PairNotSupported, and the checks skip them."""

    name = "same_width_only"
    pair_defaults = {("resnet56", "resnet20"): {"T": 2.0}, ("wrn_40_2", "wrn_16_2_cifar"): {"w_kd": 0.5}}

    def __init__(self, student, teacher=None, **hparams):
        super().__init__(student, teacher, **hparams)
        if student.stage_channels != teacher.stage_channels:
            raise PairNotSupported(f"needs equal stage widths, got student {student.stage_channels} and teacher "
                                   f"{teacher.stage_channels}")


TOYS = [(ToyInit, {}), (ToyInit, {"nets": NETS}), (ToyTeacherOnlyInit, {}), (ToyTeacherOnlyInit, {"nets": NETS}),
        (ToyBank, {}), (ToyBank, {"nets": NETS}), (ToyTeacherNet, {"nets": NETS}), (ToyPreactStem, {}),
        (ToyPreactStem, {"nets": NETS}), (TeacherPreactOnly, {}), (SameWidthOnly, {})]


@pytest.mark.parametrize("cls, kwargs", TOYS, ids=[f"{c.name}{'-nets' if k else ''}" for c, k in TOYS])
def test_correct_toy_methods_pass(cls, kwargs):
    check_method(cls, **kwargs)


def test_make_outputs_gives_preact_and_stem():
    s, t = NETINFO_PAIRS["no shared spatial size"]
    assert all(i.has_preact and i.stem_channels == i.stage_channels[0] and i.stem_size == i.stage_sizes[0]
               for pair in NETINFO_PAIRS.values() for i in pair)
    out = make_outputs(t, features=True, preact=True, stem=True)
    assert [tuple(p.shape) for p in out.preact] == [(BATCH, 16, 12, 12), (BATCH, 32, 6, 6), (BATCH, 64, 3, 3)]
    assert all((p < 0).any() and torch.equal(f, p.relu()) for f, p in zip(out.features, out.preact))
    assert tuple(out.stem.shape) == (BATCH, 16, 12, 12) and (out.stem >= 0).all()
    assert out.embedding is None and make_outputs(t).preact is None and make_outputs(t).stem is None
    # features alone are the same draws as before preact existed: the ReLU of the preact of the same seed
    assert all(torch.equal(f, p.relu()) for f, p in zip(make_outputs(t, features=True).features, out.preact))
    bare = NetInfo(stage_channels=(8,), stage_sizes=((4, 4),), embed_dim=8, num_classes=10)
    with pytest.raises(ValueError, match="has_preact=False"):
        make_outputs(bare, preact=True)
    with pytest.raises(ValueError, match="stem_channels=0"):
        make_outputs(bare, stem=True)


def test_the_kit_binds_and_passes_indices_as_the_runner_does():
    ToyBank.seen.clear()
    check_method(ToyBank)
    binds = [x for kind, x in ToyBank.seen if kind == "bind"]
    calls = [x for kind, x in ToyBank.seen if kind == "call"]
    assert binds and all(len(b) == TRAIN_SET and set(b.tolist()) == set(range(10)) for b in binds)
    assert calls and all(len(i) == BATCH and len(set(i.tolist())) == BATCH and 0 <= i.min() and i.max() < TRAIN_SET
                         for i in calls)
    assert any(i.tolist() == list(range(TRAIN_SET - BATCH, TRAIN_SET)) for i in calls)  # the last samples
    assert any(i.tolist() not in (list(range(BATCH)), list(range(TRAIN_SET - BATCH, TRAIN_SET))) for i in calls)
    ToyTeacherNet.bound.clear()
    check_method(ToyTeacherNet, nets=NETS)
    assert ToyTeacherNet.bound and set(ToyTeacherNet.bound) == {(KDNet, False, False)}  # eval mode, frozen


def test_real_nets_give_measured_netinfo():
    seen = []

    class Records(KD):
        name = "records"

        def __init__(self, student, teacher=None, **hparams):
            super().__init__(student, teacher, **hparams)
            seen.append((student, teacher))

    check_method(Records, pairs={"identical nets": NETINFO_PAIRS["identical nets"]}, nets=NETS)
    student, teacher = (KDNet(f(), (32, 32)).info for f in NETS["resnet14 -> resnet8"])
    assert (student, teacher) in seen and NETINFO_PAIRS["identical nets"] in seen


# Broken methods, each caught by one new check.


class NonBoolFlag(KD):
    name = "non_bool_flag"
    needs_preact = 1


class BadFamily(KD):
    name = "bad_family"
    family = "logit"


class NoFamily(KD):
    name = "no_family"
    family = ""


class PairKeyNotTuple(KD):
    name = "pair_key_not_tuple"
    pair_defaults = {"resnet56": {"T": 2.0}}


class PairUnknownHparam(KD):
    name = "pair_unknown_hparam"
    pair_defaults = {("resnet56", "resnet20"): {"w_nope": 1.0}}


class PairBadValue(KD):
    name = "pair_bad_value"
    pair_defaults = {("resnet56", "resnet20"): {"T": "hot"}}


class PairTwoKeys(KD):
    name = "pair_two_keys"
    pair_defaults = {("resnet56", "resnet20"): {"T": 2.0}, ("resnet56_cifar", "resnet20"): {"w_kd": 0.5}}


class PairBreaksConstruction(KD):
    name = "pair_breaks_construction"
    pair_defaults = {("resnet56", "resnet20"): {"T": 0.0}}  # a valid float, but KD refuses T <= 0


class InitWithoutDefaults(ToyInit):
    name = "init_without_defaults"
    defaults = {"w_ce": 1.0, "w_hint": 1.0, "w_init": 1.0}


class InitWithoutForward(Method):
    name = "init_without_forward"
    has_init_stage = True
    needs_teacher = False
    defaults = {"w_ce": 1.0, **INIT_STAGE_DEFAULTS}


class TeacherNetWithoutBind(KD):
    name = "teacher_net_without_bind"
    needs_teacher_net = True


class TrainLabelsWithoutBind(KD):
    name = "train_labels_without_bind"
    needs_train_labels = True


class TeacherNetWithoutTeacher(ToyTeacherNet):
    name = "teacher_net_without_teacher"
    needs_teacher = False


class InitStrayMethodParam(ToyInit):
    name = "init_stray_method_param"

    def init_parameters(self, student):
        return feature_parameters(student)  # forgets the connector that init_forward trains


class InitForgetsStudent(ToyInit):
    name = "init_forgets_student"

    def init_parameters(self, student):
        return list(self.connector.parameters())  # but init_forward's loss also trains the student's features


class InitDuplicates(ToyInit):
    name = "init_duplicates"

    def init_parameters(self, student):
        return list(self.connector.parameters()) * 2


class InitNothing(ToyInit):
    name = "init_nothing"

    def init_parameters(self, student):
        return []


class InitNeverRuns(ToyInit):
    name = "init_never_runs"
    defaults = {**ToyInit.defaults, "init_fraction": 0.0}


class InitReadsStudent(ToyInit):
    name = "init_reads_student"
    init_uses_student = False  # but init_forward reads the student's features


class InitUnweighted(ToyInit):
    name = "init_unweighted"

    def init_forward(self, student, teacher, labels):
        return {"connector": hint_loss(self.connector, student, teacher)}


class KeepsTeacher(ToyTeacherNet):
    name = "keeps_teacher"

    def bind_teacher(self, net):
        super().bind_teacher(net)
        self.teacher_net = net


class KeepsTeacherWeight(ToyTeacherNet):
    name = "keeps_teacher_weight"

    def bind_teacher(self, net):
        self.head = net.model.get_classifier().weight  # a buffer that is the teacher's own parameter


class KeepsTeacherInList(ToyTeacherNet):
    name = "keeps_teacher_in_list"

    def bind_teacher(self, net):
        super().bind_teacher(net)
        self.refs = [net.model]


class ScalesTeacher(ToyTeacherNet):
    name = "scales_teacher"

    def bind_teacher(self, net):
        with torch.no_grad():
            net.model.get_classifier().weight.mul_(2)
        super().bind_teacher(net)


class TeacherToTrainMode(ToyTeacherNet):
    name = "teacher_to_train_mode"

    def bind_teacher(self, net):
        super().bind_teacher(net)
        net.train()


class UnfreezesTeacher(ToyTeacherNet):
    name = "unfreezes_teacher"

    def bind_teacher(self, net):
        super().bind_teacher(net)
        net.requires_grad_(True)


class TeacherTrainedInForward(ToyTeacherNet):
    """Hides the teacher from the checks' attribute scan and switches it to train mode when called."""

    name = "teacher_trained_in_forward"
    hidden: dict = {}

    def bind_teacher(self, net):
        super().bind_teacher(net)
        type(self).hidden["net"] = net

    def forward(self, student, teacher, labels):
        type(self).hidden["net"].train()
        return super().forward(student, teacher, labels)


class BankOffByOne(ToyBank):
    name = "bank_off_by_one"

    def bind_train_set(self, labels):
        super().bind_train_set(labels)
        self.bank = self.bank[:-1].clone()  # N - 1 rows: the last sample has no slot


class BankNotSaved(ToyBank):
    name = "bank_not_saved"

    def bind_train_set(self, labels):
        super().bind_train_set(labels)
        bank = self.bank
        del self._buffers["bank"]
        self.bank = bank  # a plain attribute: not in the state_dict


class IndicesUndeclared(ToyBank):
    name = "indices_undeclared"
    needs_indices = False


class BankTooSmall(ToyBank):
    name = "bank_too_small"

    def bind_train_set(self, labels):
        if len(labels) < 1000:
            raise KDZooError(f"needs at least 1000 training samples, got {len(labels)}")
        super().bind_train_set(labels)


class UnusedPreact(KD):
    name = "unused_preact"
    needs_preact = True


class UndeclaredStem(KD):
    name = "undeclared_stem"

    def forward(self, student, teacher, labels):
        terms = super().forward(student, teacher, labels)
        return {**terms, "kd": terms["kd"] + student.stem.mean() * 0}


class NeverSupported(KD):
    name = "never_supported"

    def __init__(self, student, teacher=None, **hparams):
        super().__init__(student, teacher, **hparams)
        raise PairNotSupported("serves no pair at all")


NEW_BROKEN = [
    (NonBoolFlag, check_declaration, {}, "needs_preact = 1 is not a bool"),
    (BadFamily, check_declaration, {}, "family = 'logit' is not one of logits, features, relation"),
    (PairKeyNotTuple, check_declaration, {}, "pair_defaults key 'resnet56' is not a (teacher, student) pair"),
    (PairUnknownHparam, check_declaration, {}, "sets ['w_nope'], which are not in defaults"),
    (PairBadValue, check_declaration, {}, "pair_defaults[('resnet56', 'resnet20')] is not a valid override"),
    (InitWithoutDefaults, check_declaration, {}, "has_init_stage=True, but defaults lack ['init_epochs', 'init_fraction', 'init_lr']"),
    (InitWithoutForward, check_declaration, {}, "has_init_stage=True, but init_forward is not defined"),
    (TeacherNetWithoutBind, check_declaration, {}, "needs_teacher_net=True, but bind_teacher is not defined, so the flag is pointless"),
    (TrainLabelsWithoutBind, check_declaration, {}, "needs_train_labels=True, but bind_train_set is not defined"),
    (TeacherNetWithoutTeacher, check_declaration, {}, "kdzoo loads no teacher for such a method"),
    (PairTwoKeys, check_pair_defaults, {}, "resolve_defaults('resnet56_cifar', 'resnet20') differs from defaults updated"),
    (PairBreaksConstruction, check_pair_defaults, {}, "refused this pair (with pair_defaults[('resnet56', 'resnet20')] = {'T': 0.0})"),
    (NeverSupported, check_terms, {}, "construction raised PairNotSupported for every pair checked"),
    (InitStrayMethodParam, check_init_stage, {}, "sends gradients to ['method.connector.weight', 'method.connector.bias'], which init_parameters() does not return"),
    (InitForgetsStudent, check_init_stage, {"nets": NETS}, "sends gradients to ['student.model.conv1.weight'"),
    (InitDuplicates, check_init_stage, {}, "init_parameters(student) returns some parameters twice"),
    (InitNothing, check_init_stage, {}, "returned 0 parameters, none trainable"),
    (InitNeverRuns, check_init_stage, {}, "num_init_epochs(240) is 0: the init stage would not run"),
    (InitReadsStudent, check_init_stage, {}, "student=None since init_uses_student=False"),
    (InitUnweighted, check_init_stage, {}, "init_forward() terms ['connector'] have no weights w_<term> in defaults"),
    (ToyTeacherNet, check_terms, {}, "needs_teacher_net=True: bind_teacher(net) needs a teacher network"),
    (KeepsTeacher, check_teacher_net, {"nets": NETS}, "it keeps the teacher network's own objects: self.teacher_net is the teacher network"),
    (KeepsTeacherWeight, check_teacher_net, {"nets": NETS}, "self.head is the teacher's model.fc.weight"),
    (KeepsTeacherInList, check_teacher_net, {"nets": NETS}, "self.refs holds the teacher's model"),
    (ScalesTeacher, check_teacher_net, {"nets": NETS}, "the teacher's state_dict changed in bind_teacher(net): ['model.fc.weight']"),
    (TeacherToTrainMode, check_teacher_net, {"nets": NETS}, "the train/eval mode of the teacher's modules ['(the net)'"),
    (UnfreezesTeacher, check_teacher_net, {"nets": NETS}, "requires_grad of the teacher's parameters"),
    (TeacherTrainedInForward, check_teacher_net, {"nets": NETS}, "changed in a forward and backward of the method"),
    (BankOffByOne, check_indices, {}, "indices run over 0..N-1"),
    (BankNotSaved, check_state_dict, {}, "register every learned or random tensor as a parameter or buffer"),
    (IndicesUndeclared, check_terms, {}, "declare needs_indices = True"),
    (BankTooSmall, check_terms, {}, "bind_train_set(labels) refused the checks' training set"),
    (UnusedPreact, check_gradients, {}, "needs_preact=True, but no gradient reaches the student's pre-activation stage outputs"),
    (UndeclaredStem, check_terms, {}, "needs_stem=True"),
]


@pytest.mark.parametrize("cls, check, kwargs, message", NEW_BROKEN, ids=[c.name for c, _, _, _ in NEW_BROKEN])
def test_new_checks_catch_broken_methods(cls, check, kwargs, message):
    with pytest.raises(ContractError) as info:
        check(cls, **kwargs)
    text = str(info.value)
    assert message in text
    assert f"'{cls.name}'" in text or cls.__qualname__ in text  # names the culprit
    assert "How to fix:" in text
    with pytest.raises(ContractError) as info:  # check_method runs every check, so it catches the same bug
        check_method(cls, **kwargs)
    assert "How to fix:" in str(info.value)


def test_a_family_may_be_left_out():
    check_declaration(NoFamily)  # third-party methods written before families existed


def test_pair_not_supported_pairs_are_skipped():
    built = []

    class Counting(SameWidthOnly):
        name = "counting"

        def forward(self, student, teacher, labels):
            built.append(self.student_info.stage_channels == self.teacher_info.stage_channels)
            return super().forward(student, teacher, labels)

    check_method(Counting)
    assert built and all(built)  # only the pair it supports was called
    assert SameWidthOnly.resolve_defaults("resnet56_cifar", "resnet20") == {**KD.defaults, "T": 2.0}


def test_missing_nets_message_shows_how_to_pass_them():
    with pytest.raises(ContractError) as info:
        check_method(ToyTeacherNet)
    text = str(info.value)
    assert "nets={'my pair': (lambda: timm.create_model('STUDENT', num_classes=10)" in text
    assert "check_method(ToyTeacherNet, nets=" in text
