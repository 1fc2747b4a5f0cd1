"""Teachers trained elsewhere: RepDistiller, mdistiller and torchdistill checkpoints load into kdzoo's networks.

The state dicts come from re-implementations of those code bases' classes (the same modules under the same names,
registered in the same order, with the same forward), written from their sources, independently of kdzoo's nets:
RepDistiller's resnet/resnetv2/vgg/mobilenetv2/ShuffleNet ones are ``tests/test_models.py``'s, its WRN and
torchdistill's ``ResNet4Cifar`` and ``WideResNet`` are below. Files are written in each code base's own layout and
read only with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torchvision.models.resnet import BasicBlock as TorchvisionBasicBlock  # what torchdistill's ResNet4Cifar uses
from torchvision.models.resnet import conv1x1

from kdzoo import KDZooError, hookimpl
from kdzoo import bench as B
from kdzoo.checkpoint import save_checkpoint
from kdzoo.cli import main
from kdzoo.config import BenchConfig, parse
from kdzoo.data import DataShape, prepare_data
from kdzoo.datasets import Arrays, Dataset, verified
from kdzoo.plugins import load_plugins
from kdzoo.teachers import load_teacher, pretrained_teacher
from kdzoo.store import Store
from kdzoo_plugins import foreign_checkpoints
from kdzoo_plugins.cifar10 import load_cifar10
from test_models import (_RD_VGG_CFG, _RDMobileNetV2, _RDResNet, _RDResNetV2, _RDShuffleV1, _RDShuffleV2, _RDVGG,
                         _randomise_norms)


# --------------------------------------------------------------------------- the other code bases' networks


class _RDWRNBlock(nn.Module):  # RepDistiller models/wrn.py BasicBlock (dropRate 0)
    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equalInOut = in_planes == out_planes
        self.convShortcut = None if self.equalInOut else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x):
        if not self.equalInOut:
            x = self.relu1(self.bn1(x))
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out if self.equalInOut else x)))
        out = self.conv2(out)
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class _RDNetworkBlock(nn.Module):  # wrn.py NetworkBlock
    def __init__(self, nb_layers, in_planes, out_planes, stride):
        super().__init__()
        self.layer = nn.Sequential(*[_RDWRNBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                                     for i in range(nb_layers)])

    def forward(self, x):
        return self.layer(x)


class _RDWideResNet(nn.Module):  # wrn.py WideResNet(depth, num_classes, widen_factor)
    def __init__(self, depth, num_classes, widen_factor=1):
        super().__init__()
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.block1 = _RDNetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = _RDNetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = _RDNetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(ch[3], num_classes)
        self.nChannels = ch[3]

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.avg_pool2d(self.relu(self.bn1(out)), 8).view(-1, self.nChannels)
        return self.fc(out)


class _TDResNet4Cifar(nn.Module):  # torchdistill models/classification/resnet.py ResNet4Cifar(BasicBlock, [n, n, n])
    def __init__(self, depth, num_classes=10):
        super().__init__()
        n = (depth - 2) // 6
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, n)
        self.layer2 = self._make_layer(32, n, stride=2)
        self.layer3 = self._make_layer(64, n, stride=2)
        self.avgpool = nn.AvgPool2d(8, stride=1)
        self.fc = nn.Linear(64, num_classes)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes))
        layers = [TorchvisionBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [TorchvisionBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class _TDWideBasicBlock(nn.Module):  # torchdistill models/classification/wide_resnet.py WideBasicBlock (eval: no dropout)
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.dropout = nn.Dropout(p=0.3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False))

    def forward(self, x):
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(self.dropout(out))))
        return out + self.shortcut(x)


class _TDWideResNet(nn.Module):  # wide_resnet.py WideResNet(depth, k, dropout_p, WideBasicBlock, num_classes)
    def __init__(self, depth, k, num_classes=10):
        super().__init__()
        n = (depth - 4) // 6
        sizes = [16, 16 * k, 32 * k, 64 * k]
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, sizes[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.layer1, self.layer2, self.layer3 = (self._make(sizes[s + 1], n, 1 if s == 0 else 2) for s in range(3))
        self.bn1 = nn.BatchNorm2d(sizes[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(sizes[3], num_classes)

    def _make(self, planes, n, stride):
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(_TDWideBasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.layer3(self.layer2(self.layer1(self.conv1(x))))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# kdzoo model name -> RepDistiller's network, as a function of the number of classes
REPDISTILLER = {
    "resnet8": lambda c: _RDResNet(8, [16, 16, 32, 64], c),
    "resnet56": lambda c: _RDResNet(56, [16, 16, 32, 64], c),
    "resnet8x4": lambda c: _RDResNet(8, [32, 64, 128, 256], c),
    "resnet32x4_cifar": lambda c: _RDResNet(32, [32, 64, 128, 256], c),
    "resnet50_cifar": lambda c: _RDResNetV2([3, 4, 6, 3], c),
    "wrn_16_1": lambda c: _RDWideResNet(16, c, 1),
    "wrn_16_2": lambda c: _RDWideResNet(16, c, 2),
    "wrn_40_2_cifar": lambda c: _RDWideResNet(40, c, 2),
    "vgg8": lambda c: _RDVGG(_RD_VGG_CFG["S"], c),
    "vgg13_cifar": lambda c: _RDVGG(_RD_VGG_CFG["B"], c),
    "mobile_half": lambda c: _RDMobileNetV2(c),
    "shufflenet_v1": lambda c: _RDShuffleV1(c),
    "shufflenet_v2_cifar": lambda c: _RDShuffleV2(c),
}


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out[1] if isinstance(out, tuple) else out  # test_models' references return (features, logits)


def reference(name: str, classes: int = 100, seed: int = 1) -> nn.Module:
    """A RepDistiller network with random weights and random BatchNorm statistics (so every BN matters)."""
    torch.manual_seed(seed)
    model = REPDISTILLER[name](classes).eval()
    _randomise_norms(model, seed)
    return model


def repdistiller_file(path: Path, model: nn.Module) -> Path:
    """The file RepDistiller's train_teacher.py writes (save/models/<model>_vanilla/ckpt_epoch_240.pth)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 240, "model": model.state_dict(), "accuracy": torch.tensor(72.34),
                "optimizer": optimizer.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def registry():
    return load_plugins(strict=True)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def load(registry, path, model, fmt="repdistiller", classes=100, dataset="cifar100"):
    return load_teacher(registry, path, dataset=dataset, format=fmt, model=model, num_classes=classes)


# --------------------------------------------------------------------------- the hook


def test_the_formats_are_registered_by_the_first_party_plugin(registry):
    assert {"repdistiller", "mdistiller", "torchdistill"} <= set(registry.checkpoint_formats)
    assert {registry.checkpoint_format_owner[n] for n in ("repdistiller", "mdistiller", "torchdistill")} == \
        {"foreign_checkpoints"}
    assert registry.plugin("foreign_checkpoints").checkpoint_formats == ["mdistiller", "repdistiller", "torchdistill"]
    assert registry.checkpoint_formats["torchdistill"].pretrained is not None
    assert registry.checkpoint_formats["repdistiller"].pretrained is None
    with pytest.raises(KDZooError, match=r"Unknown checkpoint format 'repdistller'\. Did you mean 'repdistiller'.*"
                                         r"Available formats: kdzoo, mdistiller, repdistiller, torchdistill"):
        registry.checkpoint_format("repdistller")


def _plugin(**hooks):
    return types.SimpleNamespace(**{k: hookimpl(v) for k, v in hooks.items()})


def test_format_names_clash_like_methods_and_a_broken_hook_disables_only_its_plugin():
    convert = lambda model_name, payload: {}  # noqa: E731
    registry = load_plugins(only=[], extra=[
        ("first", _plugin(register_checkpoint_formats=lambda register: register("mine", convert))),
        ("second", _plugin(register_checkpoint_formats=lambda register: register("mine", convert))),
        ("native", _plugin(register_checkpoint_formats=lambda register: register("kdzoo", convert))),
        ("bad-name", _plugin(register_checkpoint_formats=lambda register: register("My Format", convert))),
        ("not-callable", _plugin(register_checkpoint_formats=lambda register: register("x", None))),
        ("ok", _plugin(register_checkpoint_formats=lambda register: register(name="other", convert=convert,
                                                                            pretrained=lambda m, d, f: f))),
    ])
    info = {p.name: p for p in registry.plugins}
    assert registry.checkpoint_format_owner == {"mine": "first", "other": "ok"}
    assert info["first"].status == "ok" and info["first"].checkpoint_formats == ["mine"]
    assert "checkpoint format name clash: 'mine' is registered by both plugin 'first'" in info["second"].error
    assert "kdzoo's own checkpoint format" in info["native"].error
    assert "lowercase identifier" in info["bad-name"].error and "must be callable" in info["not-callable"].error
    with pytest.raises(KDZooError, match="Plugin 'second' .* is broken: checkpoint format name clash"):
        load_plugins(only=[], strict=True, extra=[
            ("first", _plugin(register_checkpoint_formats=lambda register: register("mine", convert))),
            ("second", _plugin(register_checkpoint_formats=lambda register: register("mine", convert)))])


# --------------------------------------------------------------------------- RepDistiller and mdistiller


@pytest.mark.parametrize("name", sorted(REPDISTILLER))
def test_a_repdistiller_teacher_computes_what_repdistiller_computes(registry, name, x, tmp_path):
    ref = reference(name)
    path = repdistiller_file(tmp_path / f"save/models/{name}_vanilla/ckpt_epoch_240.pth", ref)
    teacher, meta = load(registry, path, name)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert meta["model"] == name and meta["num_classes"] == 100
    assert meta["meta"] == {"dataset": "cifar100", "image_size": [32, 32], "checkpoint_format": "repdistiller"}
    want = logits(ref, x)
    torch.testing.assert_close(teacher(x).logits, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_2", "mobile_half"])
def test_mdistiller_reads_the_same_teachers_and_its_own_student_files(registry, name, x, tmp_path):
    ref = reference(name)
    want = logits(ref, x)
    teacher_file = repdistiller_file(tmp_path / f"cifar_teachers/{name}_vanilla/ckpt_epoch_240.pth", ref)
    student_file = tmp_path / "student_best"
    torch.save({"model": ref.state_dict()}, student_file)  # mdistiller's trainer: student_state = {"model": ...}
    distiller_file = tmp_path / "best"  # the DataParallel distiller: module.student.*, module.teacher.*, method parts
    other = REPDISTILLER["resnet8"](100).state_dict()
    torch.save({"epoch": 240, "best_acc": 71.5, "optimizer": {"state": {}, "param_groups": []}, "model": {
        **{f"module.student.{k}": v for k, v in ref.state_dict().items()},
        **{f"module.teacher.{k}": v for k, v in other.items()}, "module.conv_reg.weight": torch.zeros(1)}},
        distiller_file)
    for path in (teacher_file, student_file, distiller_file):
        teacher, _ = load(registry, path, name, fmt="mdistiller")
        torch.testing.assert_close(teacher(x).logits, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_dataparallel_prefixes_and_files_from_old_pytorch_load(registry, x, tmp_path):
    ref = reference("resnet8")
    state = {f"module.{k}": v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"model": state, "epoch": 240}, tmp_path / "dp.pth")
    teacher, _ = load(registry, tmp_path / "dp.pth", "resnet8")
    torch.testing.assert_close(teacher(x).logits, logits(ref, x))
    torch.save(ref.state_dict(), tmp_path / "plain.pth")  # a bare state dict: every format takes one
    teacher, _ = load(registry, tmp_path / "plain.pth", "resnet8")
    torch.testing.assert_close(teacher(x).logits, logits(ref, x))


def test_the_wrong_network_is_an_error_naming_the_key(registry, tmp_path):
    path = repdistiller_file(tmp_path / "resnet56_vanilla/ckpt_epoch_240.pth", reference("resnet56"))
    with pytest.raises(KDZooError) as err:
        load(registry, path, "resnet8")
    msg = str(err.value)
    assert msg.startswith(f"{path} (repdistiller format) does not fit kdzoo's 'resnet8': the file's 'layer1.1.conv1.weight' "
                          "has no place in 'resnet8' (and ")
    assert "name that network as the teacher's model" in msg
    x4 = repdistiller_file(tmp_path / "resnet8x4.pth", reference("resnet8x4"))
    with pytest.raises(KDZooError, match=r"'conv1\.weight' has shape \(32, 3, 3, 3\) in the file but \(16, 3, 3, 3\) "
                                         r"in 'resnet8'"):
        load(registry, x4, "resnet8")
    truncated = {k: v for k, v in reference("resnet8").state_dict().items() if k != "layer3.0.bn2.running_var"}
    torch.save({"model": truncated}, tmp_path / "missing.pth")
    with pytest.raises(KDZooError, match=r"'layer3\.0\.bn2\.running_var' of 'resnet8' is not in the file\. A checkpoint"):
        load(registry, tmp_path / "missing.pth", "resnet8")


def test_a_teacher_of_another_dataset_is_an_error_naming_the_classes(registry, tmp_path):
    path = repdistiller_file(tmp_path / "resnet8.pth", reference("resnet8", classes=100))
    with pytest.raises(KDZooError) as err:
        load(registry, path, "resnet8", classes=10, dataset="cifar10")
    assert str(err.value) == (
        f"{path} (repdistiller format): its classifier ('fc.weight') has 100 outputs, but 'cifar10' has 10 classes, "
        "so the teacher was trained on another dataset. Distil on the dataset it was trained on (`data: {dataset: "
        "...}` of the benchmark, --dataset of `kdzoo distill`).")


@pytest.mark.parametrize("model, says", [
    ("MobileNetV2", "RepDistiller's 'MobileNetV2' is kdzoo's 'mobile_half': use that name."),
    ("ShuffleV1", "is kdzoo's 'shufflenet_v1'"),
    ("vgg13", "kdzoo's 'vgg13' is timm's ImageNet network; RepDistiller's CIFAR 'vgg13' is kdzoo's 'vgg13_cifar'."),
    ("resnet50", "is kdzoo's 'resnet50_cifar'"),
    ("mobilenetv2_x0_5", "stride-1 stem"),
    ("resnet18", "Supported models: mobile_half, resnet110, resnet14"),
])
def test_a_network_the_format_cannot_map_is_named_with_the_supported_ones(registry, tmp_path, model, says):
    path = repdistiller_file(tmp_path / "t.pth", reference("resnet8"))
    with pytest.raises(KDZooError) as err:
        load(registry, path, model)
    assert f"cannot be read as a repdistiller '{model}': RepDistiller has no network that maps onto kdzoo's '{model}'." \
        in str(err.value)
    assert says in str(err.value)


def test_files_that_are_not_teachers_are_clear_errors(registry, tmp_path):
    torch.save({"epoch": 240, "best_acc": 71.0}, tmp_path / "no-weights.pth")
    with pytest.raises(KDZooError, match=r"the file holds a dict with the keys 'epoch', 'best_acc', not RepDistiller's "
                                         r"layout \(\{'model': state_dict"):
        load(registry, tmp_path / "no-weights.pth", "resnet8")
    ours = tmp_path / "kdzoo.pt"
    save_checkpoint(ours, {"model": "resnet8", "model_options": {}, "num_classes": 100, "state_dict": {}})
    with pytest.raises(KDZooError, match=r"is a kdzoo checkpoint \(written by `kdzoo train`\), not a repdistiller one\. "
                                         r"Load it as one: remove `format: repdistiller`"):
        load(registry, ours, "resnet8")
    theirs = repdistiller_file(tmp_path / "rd.pth", reference("resnet8"))  # no format given: kdzoo's is assumed
    with pytest.raises(KDZooError, match=r"not a kdzoo checkpoint .* A teacher trained by another code base loads in "
                                         r"its format \(mdistiller, repdistiller, torchdistill\): `format: NAME`"):
        load_teacher(registry, theirs)
    with pytest.raises(KDZooError, match=r"A repdistiller checkpoint does not record its network: name the kdzoo model"):
        load_teacher(registry, theirs, format="repdistiller", num_classes=100)
    with pytest.raises(KDZooError, match=r"Checkpoint .*nope.pth does not exist\. Check the path of the repdistiller"):
        load(registry, tmp_path / "nope.pth", "resnet8")
    (tmp_path / "half.pth").write_bytes(theirs.read_bytes()[:500])
    with pytest.raises(KDZooError, match="truncated, corrupt, or not a PyTorch file; download or copy it again"):
        load(registry, tmp_path / "half.pth", "resnet8")


class Payload:  # unpickling this runs a shell command: kdzoo must refuse it without running it
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_file_with_code_is_refused_and_never_run(registry, tmp_path):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "resnet8_vanilla/ckpt_epoch_240.pth"
    evil.parent.mkdir()
    torch.save({"epoch": 240, "model": reference("resnet8").state_dict(), "hook": Payload(marker)}, evil)
    for fmt in ("repdistiller", "mdistiller", "torchdistill"):
        with pytest.raises(KDZooError) as err:
            load(registry, evil, "resnet8", fmt=fmt)
        msg = str(err.value)
        assert re.search(r"contains code or objects that kdzoo will not load: (posix|nt)\.system \(os\.system\)", msg)
        assert f"A {fmt} teacher's weights are tensors and plain Python values" in msg
        assert "weights_only" not in msg and "add_safe_globals" not in msg
    assert not marker.exists()  # the payload never ran
    last = tmp_path / "resnet8_last.pth"  # RepDistiller's *_last.pth pickles its argparse options
    torch.save({"opt": argparse.Namespace(model="resnet8"), "model": reference("resnet8").state_dict()}, last)
    with pytest.raises(KDZooError, match=r"will not load: argparse\.Namespace\. .* use the file that holds the weights "
                                         r"alone, or save just its state dict"):
        load(registry, last, "resnet8")


def test_a_converter_that_fails_or_returns_nonsense_is_named(tmp_path):
    def broken(model_name, payload):
        raise IndexError("list index out of range")

    registry = load_plugins(extra=[("mine", _plugin(register_checkpoint_formats=lambda register: (
        register("broken", broken), register("nonsense", lambda m, p: {"fc.weight": [1, 2]}))))])
    torch.save({"w": torch.zeros(1)}, tmp_path / "f.pt")
    with pytest.raises(KDZooError, match=r"Checkpoint format 'broken' \(plugin 'mine', \(in-process\) -\) failed to "
                                         r"convert .* into a 'resnet8': IndexError: list index out of range"):
        load(registry, tmp_path / "f.pt", "resnet8", fmt="broken")
    with pytest.raises(KDZooError, match=r"the converted weights hold a list under 'fc\.weight', not a tensor"):
        load(registry, tmp_path / "f.pt", "resnet8", fmt="nonsense")


def test_the_guides_example_format_works_as_documented(x, tmp_path):
    guide = (Path(__file__).resolve().parents[1] / "docs" / "writing-plugins.md").read_text()
    (block,) = [b for b in re.findall(r"^```python\n(.*?)^```$", guide, re.M | re.S)
                if "def register_checkpoint_formats" in b]
    namespace = {"hookimpl": hookimpl, "KDZooError": KDZooError}
    exec(block, namespace)
    registry = load_plugins(extra=[("my-zoo", types.SimpleNamespace(
        register_checkpoint_formats=namespace["register_checkpoint_formats"]))])
    assert registry.checkpoint_format_owner["my_zoo"] == "my-zoo"
    ref = reference("resnet8")  # the example renames a "classifier" to kdzoo's "fc"; RepDistiller's ResNet
    torch.save({"net": {k.replace("fc.", "classifier."): v for k, v in ref.state_dict().items()}}, tmp_path / "z.pt")
    with pytest.raises(KDZooError, match="my_zoo has no network that maps onto kdzoo's 'resnet8'"):
        load(registry, tmp_path / "z.pt", "resnet8", fmt="my_zoo")
    torch.manual_seed(0)
    ref = _RDResNet(20, [16, 16, 32, 64], 100).eval()
    torch.save({"net": {k.replace("fc.", "classifier."): v for k, v in ref.state_dict().items()}}, tmp_path / "z.pt")
    teacher, _ = load(registry, tmp_path / "z.pt", "resnet20", fmt="my_zoo")
    torch.testing.assert_close(teacher(x).logits, logits(ref, x))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_file_saved_from_a_gpu_loads_on_the_cpu_and_runs_on_the_gpu(registry, x, tmp_path):
    ref = reference("resnet8").cuda()
    path = repdistiller_file(tmp_path / "gpu.pth", ref)  # tensors tagged cuda:0, as in the published files
    teacher, _ = load(registry, path, "resnet8")
    assert {p.device.type for p in teacher.state_dict().values()} == {"cpu"}
    want = logits(ref, x.cuda()).cpu()
    tol = {"rtol": 1e-4, "atol": 1e-4 * want.abs().max().item()}
    torch.testing.assert_close(teacher(x).logits, want, **tol)
    torch.testing.assert_close(teacher.cuda()(x.cuda()).logits.cpu(), want, **tol)


# --------------------------------------------------------------------------- torchdistill


def torchdistill_teacher(depth: int, seed: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    model = _TDResNet4Cifar(depth, 10).eval()
    _randomise_norms(model, seed)
    return model


@pytest.mark.parametrize("name, depth", [("resnet20", 20), ("resnet56_cifar", 56), ("resnet110", 110)])
def test_a_torchdistill_resnet_computes_what_torchdistill_computes(registry, name, depth, x, tmp_path):
    ref = torchdistill_teacher(depth)
    torch.save(ref.state_dict(), tmp_path / f"cifar10-resnet{depth}.pt")  # the published files: a plain state dict
    torch.save({"model": ref.state_dict(), "best_value": 93.5}, tmp_path / "ckpt.pt")  # save_ckpt, minus its args
    want = logits(ref, x)
    for path in (tmp_path / f"cifar10-resnet{depth}.pt", tmp_path / "ckpt.pt"):
        teacher, meta = load(registry, path, name, fmt="torchdistill", classes=10, dataset="cifar10")
        torch.testing.assert_close(teacher(x).logits, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        assert meta["meta"]["checkpoint_format"] == "torchdistill"


def test_torchdistills_wide_resnet_is_refused_because_kdzoos_wrn_computes_another_function(registry, x, tmp_path):
    torch.manual_seed(0)
    theirs = _TDWideResNet(16, 2).eval()
    _randomise_norms(theirs, 3)
    ours = registry.create_model("wrn_16_2", num_classes=10).eval()
    state = ours.state_dict()
    # The same tensors in the same order: a converter renaming by position would load without a shape error...
    assert [v.shape for v in theirs.state_dict().values()] == [v.shape for v in state.values()]
    ours.load_state_dict(dict(zip(state, theirs.state_dict().values())))
    assert not torch.allclose(logits(ours, x), logits(theirs, x), atol=1e-3)  # ...but compute something else
    torch.save(theirs.state_dict(), tmp_path / "cifar10-wide_resnet16_2.pt")
    with pytest.raises(KDZooError) as err:
        load(registry, tmp_path / "cifar10-wide_resnet16_2.pt", "wrn_16_2", fmt="torchdistill", classes=10)
    assert "torchdistill has no network that maps onto kdzoo's 'wrn_16_2'" in str(err.value)
    assert "projection shortcuts read the block's raw input" in str(err.value)
    assert "Supported models: resnet8, resnet14, resnet20, resnet32, resnet44, resnet56, resnet110." in str(err.value)


# --------------------------------------------------------------------------- pretrained: torchdistill


@pytest.fixture
def published(tmp_path, monkeypatch):
    """torchdistill's ResNet-20 release file, served from a file:// URL in place of GitHub's."""
    monkeypatch.setenv("KDZOO_CACHE", str(tmp_path / "cache"))
    ref = torchdistill_teacher(20)
    served = tmp_path / "release/v0.1.1/cifar10-resnet20.pt"
    served.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), served)
    monkeypatch.setitem(foreign_checkpoints.TORCHDISTILL_URLS, ("cifar10", "resnet20"), served.as_uri())
    return types.SimpleNamespace(ref=ref, served=served,
                                 target=tmp_path / "cache/pretrained/torchdistill/cifar10-resnet20.pt")


def test_pretrained_torchdistill_is_downloaded_verified_and_reused(registry, published, x, monkeypatch):
    path = pretrained_teacher(registry, "torchdistill", "resnet20", "cifar10")
    assert path == published.target and path.read_bytes() == published.served.read_bytes()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert path.with_name("cifar10-resnet20.pt.sha256").read_text() == f"{digest}  cifar10-resnet20.pt\n"
    teacher, _ = load(registry, path, "resnet20", fmt="torchdistill", classes=10, dataset="cifar10")
    torch.testing.assert_close(teacher(x).logits, logits(published.ref, x))

    def no_network(*args, **kwargs):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    assert pretrained_teacher(registry, "torchdistill", "resnet20_cifar", "cifar10") == path  # the cached file
    path.write_bytes(path.read_bytes()[:-10])  # damaged after the download
    with pytest.raises(KDZooError, match=rf"{re.escape(str(path))} is not the file kdzoo recorded: its sha256 is \w+, "
                                         rf".* says {digest}\. .* Delete both files and run again"):
        pretrained_teacher(registry, "torchdistill", "resnet20", "cifar10")


def test_pretrained_offline_says_where_to_put_the_file_by_hand(registry, published, x, monkeypatch):
    url = (published.served.parent / "unreachable/cifar10-resnet20.pt").as_uri()
    monkeypatch.setitem(foreign_checkpoints.TORCHDISTILL_URLS, ("cifar10", "resnet20"), url)
    with pytest.raises(KDZooError) as err:
        pretrained_teacher(registry, "torchdistill", "resnet20", "cifar10")
    target = published.target
    assert str(err.value).startswith(f"Cannot download torchdistill's pretrained resnet20 (cifar10) from {url} (URLError: ")
    assert (f"you are probably offline. On a machine with a connection, download that URL and place the file at "
            f"exactly {target} (for example `mkdir -p {target.parent} && curl -L -o {target} {url}`)") in str(err.value)
    assert not target.exists()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(published.served.read_bytes())  # placed by hand, as the message says
    assert pretrained_teacher(registry, "torchdistill", "resnet20", "cifar10") == target
    assert target.with_name("cifar10-resnet20.pt.sha256").read_text().startswith(
        hashlib.sha256(target.read_bytes()).hexdigest())


def test_a_download_that_is_not_a_pytorch_file_is_removed(registry, published, monkeypatch):
    published.served.write_text("<html>rate limited</html>")
    with pytest.raises(KDZooError, match=r"What file:.* sent is not a PyTorch file of tensors \(UnpicklingError\), so it is not torchdistill's resnet20; "
                                         r"it was removed\. Run again later, or download that URL by hand"):
        pretrained_teacher(registry, "torchdistill", "resnet20", "cifar10")
    assert not published.target.exists()


def test_pretrained_weights_that_do_not_exist_are_named(registry, published):
    with pytest.raises(KDZooError, match=r"torchdistill publishes no weights of kdzoo's 'wrn_16_2' for 'cifar10' that "
                                         r"kdzoo can run\. Pretrained torchdistill teachers: resnet20 \(cifar10\), .*"
                                         r"projection shortcuts"):
        pretrained_teacher(registry, "torchdistill", "wrn_16_2", "cifar10")
    with pytest.raises(KDZooError, match="for 'cifar100'"):
        pretrained_teacher(registry, "torchdistill", "resnet56", "cifar100")
    with pytest.raises(KDZooError, match=r"Checkpoint format 'repdistiller' publishes no pretrained weights .* "
                                         r"Pretrained teachers come from: torchdistill"):
        pretrained_teacher(registry, "repdistiller", "resnet56", "cifar100")


# --------------------------------------------------------------------------- benchmarks


class Synth100(Dataset):
    """100 classes of 32x32 noise (a CIFAR-100 stand-in: no real CIFAR-100 exists on these machines)."""

    name = "synth100"
    description = "synthetic: 100 classes, 32x32"

    def load(self, source: str, root: Path) -> Arrays:
        rng = np.random.default_rng(0)

        def split(n):
            return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), (np.arange(n) % 100).astype(np.int64)

        (xtr, ytr), (xte, yte) = split(400), split(100)
        return verified(self.name, {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte},
                        class_names=tuple(f"c{i}" for i in range(100)), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                        source="synthetic", where="synth100", fix="")


@pytest.fixture
def synth_registry():
    return load_plugins(extra=[("synth", _plugin(register_datasets=lambda register: register(Synth100)))], strict=True)


def test_a_benchmark_with_a_repdistiller_teacher_validates_and_trains(synth_registry, tmp_path, monkeypatch):
    monkeypatch.setenv("KDZOO_CACHE", str(tmp_path / "cache"))
    ref = reference("resnet8")
    ckpt = repdistiller_file(tmp_path / "resnet8_vanilla/ckpt_epoch_240.pth", ref)
    bench = {"name": "rd", "data": {"dataset": "synth100", "test_size": 100}, "seeds": [0],
             "recipe": {"epochs": 1, "batch_size": 100, "eval_batch_size": 100},
             "teachers": [{"model": "resnet8", "checkpoint": str(ckpt), "format": "repdistiller"}],
             "students": ["resnet8"], "methods": ["kd"]}
    cfg = tmp_path / "b.yaml"
    cfg.write_text(yaml.safe_dump(bench))
    torch.set_num_threads(1)
    plan, data, device = B.prepare(cfg, synth_registry)
    (job,) = plan.teachers
    assert job.format == "repdistiller" and B.teacher_status(job) == "checkpoint"
    assert job.provenance["checkpoint_format"] == "repdistiller"
    assert job.provenance["format_plugin"].startswith("kdzoo ")
    native = B.expand(plan.bench, plan.data, synth_registry)
    assert native.teachers[0].key == job.key  # the key is stable...
    other = B.expand(parse(BenchConfig, {**bench, "teachers": [{**bench["teachers"][0], "format": "mdistiller"}]}),
                     plan.data, synth_registry)
    assert other.teachers[0].key != job.key  # ...and hashes the format
    outcome = B.run_plan(plan, data, synth_registry, Store(tmp_path / "out"), device)
    assert outcome.failed == [] and outcome.trained == 2
    records = {r.kind if r.kind == "teacher" else r.variant: r for r in Store(tmp_path / "out").runs()}
    assert records["teacher"].source == "checkpoint" and records["teacher"].provenance["checkpoint_format"] == "repdistiller"
    assert records["teacher"].params == sum(p.numel() for p in ref.parameters())
    x_test = torch.cat([x for x, _ in data.eval_batches("test")])  # the file records no accuracy on this data:
    top1 = 100.0 * (logits(ref, x_test).argmax(1) == data.test_y).double().mean().item()  # kdzoo measures it
    assert records["teacher"].last.top1 == pytest.approx(top1) and records["kd"].teacher.top1 == pytest.approx(top1)
    assert records["kd"].status == "ok"


@pytest.mark.parametrize("teacher, says", [
    ({"model": "resnet56", "format": "repdistiller"},
     r"teachers\[0\] \(resnet56, repdistiller checkpoint\): .* does not fit kdzoo's 'resnet56'"),
    ({"model": "resnet8", "format": "repdistiler"},
     r"teachers\[0\]\.format: Unknown checkpoint format 'repdistiler'\. Did you mean 'repdistiller'"),
    ({"model": "resnet8", "format": "repdistiller", "pretrained": "torchdistill"}, "both `checkpoint:` and `pretrained:`"),
])
def test_a_benchmark_teacher_in_a_foreign_format_is_checked_before_training(synth_registry, tmp_path, monkeypatch,
                                                                            teacher, says):
    monkeypatch.setenv("KDZOO_CACHE", str(tmp_path / "cache"))
    ckpt = repdistiller_file(tmp_path / "resnet8_vanilla/ckpt_epoch_240.pth", reference("resnet8"))
    cfg = tmp_path / "b.yaml"
    cfg.write_text(yaml.safe_dump({"name": "rd", "data": {"dataset": "synth100"}, "recipe": {"epochs": 1},
                                   "teachers": [{**teacher, "checkpoint": str(ckpt)}], "students": ["resnet8"],
                                   "methods": ["kd"]}))
    with pytest.raises(KDZooError, match=says):
        B.prepare(cfg, synth_registry)


def test_a_benchmark_with_pretrained_torchdistill_teachers(registry, published, tmp_path):
    bench = {"name": "td", "data": {"train_size": 384, "test_size": 200}, "recipe": {"epochs": 1},
             "teachers": [{"model": "resnet20", "pretrained": "torchdistill"}], "students": ["resnet8"],
             "methods": ["kd"]}
    plan = B.expand(parse(BenchConfig, bench), DataShape("cifar10", "fp", 10, (32, 32), 384), registry)
    (job,) = plan.teachers
    assert Path(job.checkpoint) == published.target and job.format == "torchdistill"
    assert job.provenance["checkpoint_sha256"] == hashlib.sha256(published.target.read_bytes()).hexdigest()
    B.validate(plan, registry)
    with pytest.raises(KDZooError, match=r"teachers\[0\]\.pretrained: torchdistill publishes no weights of kdzoo's "
                                         r"'resnet20' for 'synth100'"):
        B.expand(parse(BenchConfig, bench), DataShape("synth100", "fp", 100, (32, 32), 384), registry)


# --------------------------------------------------------------------------- kdzoo distill, end to end on CIFAR-10


def test_kdzoo_distill_from_a_repdistiller_teacher_on_real_cifar10(cifar_path, published, tmp_path, capsys):
    """A RepDistiller ResNet-8 trained for a few steps on real CIFAR-10 by RepDistiller's own loop, saved as
    train_teacher.py saves it, distilled from by `kdzoo distill --teacher-format repdistiller`; kdzoo's teacher
    predicts exactly what the reference does on the real test images."""
    torch.set_num_threads(1)
    arrays = np.load(cifar_path)
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1), torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)

    def images(key, n):
        return (torch.from_numpy(arrays[key][:n]).permute(0, 3, 1, 2).float() / 255 - mean) / std

    x_train, y_train = images("x_train", 2000), torch.from_numpy(arrays["y_train"][:2000]).long()
    torch.manual_seed(0)
    ref = _RDResNet(8, [16, 16, 32, 64], 10)
    optimizer = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for _ in range(2):  # RepDistiller's train_vanilla, for two epochs
        for i in range(0, 2000, 64):
            optimizer.zero_grad()
            F.cross_entropy(ref(x_train[i:i + 64])[1], y_train[i:i + 64]).backward()
            optimizer.step()
    ref.eval()
    ckpt = repdistiller_file(tmp_path / "save/models/resnet8_vanilla/ckpt_epoch_240.pth", ref)
    out = tmp_path / "kd"
    code = main(["distill", "--teacher", str(ckpt), "--teacher-format", "repdistiller", "--teacher-model", "resnet8",
                 "--student", "resnet8", "--method", "kd", "--epochs", "1", "--train-size", "1000", "--test-size",
                 "500", "--batch-size", "100", "--data", cifar_path, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["teacher"]["format"] == "repdistiller"
    assert metrics["teacher"]["model"] == "resnet8" and metrics["teacher"]["checkpoint"] == str(ckpt)
    assert metrics["config"]["teacher_format"] == "repdistiller"
    teacher, _ = load_teacher(load_plugins(), ckpt, dataset="cifar10", format="repdistiller", model="resnet8",
                              num_classes=10)
    x_test = images("x_test", 500)
    want = logits(ref, x_test)
    torch.testing.assert_close(teacher(x_test).logits, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    accuracy = (want.argmax(1) == torch.from_numpy(arrays["y_test"][:500])).float().mean().item()
    assert accuracy > 0.2  # a teacher that learnt something, so the check above is about real predictions
    # The run reports the foreign teacher's top-1 on its own test images: RepDistiller's net on that subset.
    subset = prepare_data(load_cifar10(cifar_path), train_size=1000, test_size=500).test_indices.numpy()
    x_sub = (torch.from_numpy(arrays["x_test"][subset]).permute(0, 3, 1, 2).float() / 255 - mean) / std
    theirs = (logits(ref, x_sub).argmax(1) == torch.from_numpy(arrays["y_test"][subset]).long()).float().mean().item()
    assert metrics["teacher"]["top1"] is None  # a RepDistiller file records no accuracy
    assert metrics["teacher"]["top1_measured"] == pytest.approx(100 * theirs, abs=1e-9)
    assert f"teacher top-1 {100 * theirs:.2f}%" in " ".join(capsys.readouterr().out.split())
    code = main(["distill", "--teacher", str(ckpt), "--teacher-format", "repdistiller", "--student", "resnet8",
                 "--epochs", "1", "--train-size", "1000", "--data", cifar_path, "--out", str(tmp_path / "no-model")])
    assert code == 2 and "--teacher-model" in capsys.readouterr().err
    # --teacher-pretrained: torchdistill's published ResNet-20 (served from a file:// URL), fetched into the cache
    out = tmp_path / "kd-td"
    code = main(["distill", "--teacher-pretrained", "torchdistill", "--teacher-model", "resnet20", "--student", "resnet8",
                 "--epochs", "1", "--train-size", "1000", "--test-size", "500", "--batch-size", "100", "--data",
                 cifar_path, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["teacher"]["checkpoint"] == str(published.target) and metrics["teacher"]["format"] == "torchdistill"
    assert published.target.with_name("cifar10-resnet20.pt.sha256").is_file()
