"""The optional parts of the Method contract as docs/writing-plugins.md teaches them (per-pair defaults,
PairNotSupported, pre-activation outputs and the stem, sample indices and bind_train_set, bind_teacher,
init stages): every code block runs as printed, its methods pass the contract checks, and each does what
the guide says, checked against an independent float64 computation and against the real engine."""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kdzoo import hookimpl
from kdzoo.config import Recipe
from kdzoo.data import Data
from kdzoo.engine import Member, Trainer
from kdzoo.methods import PairNotSupported
from kdzoo.models import KDNet, NetInfo, Outputs
from kdzoo.plugins import load_plugins
from kdzoo.runner import build_method
from kdzoo.testing import ContractError, check_method, check_model

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "writing-plugins.md"
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```$", GUIDE.read_text(), re.M | re.S)


def guide(marker: str) -> dict:
    """Run the guide's one python block that contains ``marker``; return its namespace."""
    (body,) = [b for lang, b in BLOCKS if lang == "python" and marker in b]
    namespace: dict = {"__name__": "from_the_guide"}
    exec(compile(body, "writing-plugins.md", "exec"), namespace)
    return namespace


def registry_of(*classes):
    return load_plugins(extra=[("guide", SimpleNamespace(register_methods=hookimpl(
        lambda register: [register(c) for c in classes])))], only=[])


def info(channels, sizes, embed_dim, num_classes=3) -> NetInfo:
    return NetInfo(stage_channels=tuple(channels), stage_sizes=tuple((s, s) for s in sizes), embed_dim=embed_dim,
                   num_classes=num_classes)


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def test_pair_defaults_as_the_runner_applies_them():
    cls = guide("class PairWeighted(Method)")["PairWeighted"]  # the block's own asserts run here
    registry = registry_of(cls)
    net = info((8,), (4,), 8)

    def w_kd(pair, **hparams):
        return build_method(registry, "pair_weighted", hparams, net, net, 0, pair=pair).w_kd

    assert w_kd(("resnet56", "resnet20")) == 2.0 and w_kd(("resnet56_cifar", "resnet20_cifar")) == 2.0
    assert w_kd(("wrn_40_2", "wrn_16_2")) == 6.0
    assert w_kd(("resnet32x4", "resnet8x4")) == 8.0 and w_kd(None) == 8.0
    assert w_kd(("resnet56", "resnet20"), w_kd=3.0) == 3.0  # the user's setting wins


def test_pair_not_supported():
    cls = guide("class SameWidths(Method)")["SameWidths"]
    check_method(cls)  # the pairs of other widths are skipped, not failed
    narrow, wide = info((8, 16, 32), (16, 8, 4), 32), info((16, 32, 64), (16, 8, 4), 64)
    with pytest.raises(PairNotSupported, match=r"teacher has \[16, 32, 64\], the student \[8, 16, 32\]"):
        cls(narrow, wide)
    with pytest.raises(ContractError, match="PairNotSupported for every pair"):
        check_method(cls, pairs={"wider teacher": (narrow, wide)})
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(2, c, h, h, generator=g) for c, h in ((8, 4), (16, 2))]
    t = [torch.randn(2, c, h, h, generator=g) for c, h in ((8, 4), (16, 2))]
    net = info((8, 16), (4, 2), 16)
    terms = cls(net, net)(Outputs(torch.zeros(2, 3), features=s), Outputs(torch.zeros(2, 3), features=t),
                          torch.tensor([0, 1]))
    expected = sum(((f64(a) - f64(b)) ** 2).mean() for a, b in zip(s, t))
    assert terms["fm"].item() == pytest.approx(expected, rel=1e-6)


def test_the_tiny_backbone_declares_preact_and_stem():
    ns = guide("class TinyNet(nn.Module)")  # its asserts: has_preact, stem shape, features == relu(preact)
    TinyNet = ns["TinyNet"]
    check_model(TinyNet)
    torch.manual_seed(0)
    model = TinyNet(width=8)
    net = KDNet(model, input_size=(16, 16))
    assert net.info.stage_channels == (8, 16) and net.info.stage_sizes == ((16, 16), (8, 8))
    assert net.info.has_preact and (net.info.stem_channels, net.info.stem_size) == (8, (16, 16))
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    out = net(x, preact=True, stem=True)
    with torch.no_grad():  # by hand: the stem, then each stage's conv and BN, before its ReLU
        stem = model.stem(x)
        pre1 = model.stage1[1](model.stage1[0](stem))
        pre2 = model.stage2[1](model.stage2[0](pre1.relu()))
    assert torch.equal(out.stem, stem) and torch.equal(out.preact[0], pre1) and torch.equal(out.preact[1], pre2)
    assert out.features is None and out.embedding is None  # only what was asked for


def test_memory_bank_with_indices_and_train_labels():
    cls = guide("class BankNCE(Method)")["BankNCE"]
    check_method(cls)
    student, teacher = info((8,), (4,), 6), info((8,), (4,), 5)
    labels_all = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    torch.manual_seed(0)
    method = cls(student, teacher, k=7, tau=0.5)
    method.bind_train_set(labels_all)
    assert method.bank.shape == (12, 5) and torch.equal(method.bank_labels, labels_all)
    bank0 = f64(method.bank).copy()
    g = torch.Generator().manual_seed(1)
    s_emb, t_emb = torch.randn(3, 6, generator=g), torch.randn(3, 5, generator=g)
    indices = torch.tensor([4, 11, 0])
    labels = labels_all[indices]
    torch.manual_seed(5)
    terms = method(Outputs(torch.zeros(3, 3), embedding=s_emb), Outputs(torch.zeros(3, 3), embedding=t_emb),
                   labels, indices=indices)
    torch.manual_seed(5)
    neg = torch.randint(12, (3, 7)).numpy()  # the draws forward made
    s = normalize(f64(s_emb) @ f64(method.embed.weight).T + f64(method.embed.bias))
    t = normalize(f64(t_emb))
    losses = []
    for b in range(3):
        logits = [s[b] @ t[b] / 0.5] + [s[b] @ bank0[j] / 0.5 for j in neg[b] if labels_all[j] != labels[b]]
        losses.append(-logits[0] + np.log(np.exp(logits).sum()))
    assert terms["nce"].item() == pytest.approx(np.mean(losses), rel=1e-5)
    bank = f64(method.bank)
    assert np.allclose(bank[indices.numpy()], t, atol=1e-6)  # this batch's rows now hold its teacher embeddings
    untouched = [i for i in range(12) if i not in indices.tolist()]
    assert np.array_equal(bank[untouched], bank0[untouched])


def test_bind_teacher_keeps_constants_not_the_network():
    ns = guide("class ProtoKD(Method)")
    cls, TinyNet = ns["ProtoKD"], guide("class TinyNet(nn.Module)")["TinyNet"]
    nets = {"tiny": (lambda: TinyNet(width=8), TinyNet)}
    check_method(cls, nets=nets)

    class KeepsTheTeacher(cls):
        def bind_teacher(self, net):
            super().bind_teacher(net)
            self.teacher_head = net.model.get_classifier()  # what the guide forbids

    with pytest.raises(ContractError, match="teacher"):
        check_method(KeepsTheTeacher, nets=nets)
    torch.manual_seed(0)
    teacher = KDNet(TinyNet(num_classes=3), input_size=(8, 8)).eval()
    student = KDNet(TinyNet(num_classes=3, width=4), input_size=(8, 8))
    method = cls(student.info, teacher.info)
    method.bind_teacher(teacher)
    protos = normalize(f64(teacher.model.fc.weight))
    assert np.allclose(f64(method.prototypes), protos, atol=1e-6)
    assert method.prototypes.data_ptr() != teacher.model.fc.weight.data_ptr()
    emb = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 2, 1, 2])
    terms = method(Outputs(torch.zeros(4, 3), embedding=emb), Outputs(torch.zeros(4, 3)), labels)
    s = normalize(f64(emb) @ f64(method.embed.weight).T + f64(method.embed.bias))
    expected = np.mean([1 - s[b] @ protos[labels[b]] for b in range(4)])
    assert terms["proto"].item() == pytest.approx(expected, rel=1e-5)


def test_init_stage_method_in_the_engine():
    cls = guide("class HintThenKD(Method)")["HintThenKD"]
    TinyNet = guide("class TinyNet(nn.Module)")["TinyNet"]
    check_method(cls)
    torch.manual_seed(0)
    teacher = KDNet(TinyNet(num_classes=3), input_size=(8, 8)).eval()
    student = KDNet(TinyNet(num_classes=3, width=4), input_size=(8, 8))
    method = cls(student.info, teacher.info, init_epochs=1)
    assert method.num_init_epochs(240) == 1 and cls(student.info, teacher.info).num_init_epochs(240) == 30

    # init_forward against a float64 hand computation of the 1x1 regressor and the MSE
    g = torch.Generator().manual_seed(3)
    s_map, t_map = torch.randn(2, 8, 4, 4, generator=g), torch.randn(2, 32, 4, 4, generator=g)
    terms = method.init_forward(Outputs(torch.zeros(2, 3), features=[s_map]), Outputs(torch.zeros(2, 3), features=[t_map]),
                                torch.tensor([0, 1]))
    w, b = f64(method.regressor.weight)[:, :, 0, 0], f64(method.regressor.bias)
    reg = np.einsum("oc,nchw->nohw", w, f64(s_map)) + b[None, :, None, None]
    assert terms["hint"].item() == pytest.approx(((reg - f64(t_map)) ** 2).mean(), rel=1e-5)

    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 256, (24, 3, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 3, (24,), generator=g)
    data = Data(x[:16], y[:16], x[16:], y[16:], class_names=("a", "b", "c"))
    recipe = Recipe(epochs=1, batch_size=8, lr=0.1, autocast="off", channels_last=False)
    member = Member("hint", student, method)
    trainer = Trainer([member], data, recipe, teacher=teacher, seed=0)
    snapshots = [(method.regressor.weight.detach().clone(), student.model.fc.weight.detach().clone(),
                  student.model.stage1[0].weight.detach().clone())]
    trainer.fit(on_epoch=lambda done: snapshots.append(
        (method.regressor.weight.detach().clone(), student.model.fc.weight.detach().clone(),
         student.model.stage1[0].weight.detach().clone())))
    assert [(r["stage"], r["epoch"]) for r in member.history] == [("init", 1), ("main", 1)]
    assert "test" not in member.history[0] and "test" in member.history[1]  # the init stage is not evaluated
    assert set(member.history[0]["loss"]) == {"hint"} and set(member.history[1]["loss"]) == {"ce", "kd"}
    (reg0, fc0, conv0), (reg1, fc1, conv1), (reg2, fc2, conv2) = snapshots
    assert not torch.equal(reg0, reg1) and not torch.equal(conv0, conv1)  # init: regressor and feature layers
    assert torch.equal(fc0, fc1)  # ... but not the classifier (feature_parameters)
    assert torch.equal(reg1, reg2) and not torch.equal(fc1, fc2)  # main: the regressor is left alone
    result = trainer.result(member)
    assert (result["epochs_done"], result["init_epochs_done"]) == (1, 1)
