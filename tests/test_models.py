"""Backbones: the CIFAR nets (timm conformance, parameter counts), the timm plugin, KDNet, pair_stages."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from kdzoo import KDZooError
from kdzoo.models import KDNet, NetInfo, describe, pair_stages
from kdzoo_plugins import cifar_nets, timm_backbones

# RepDistiller / the papers' parameter counts with 10 classes, in millions
PARAMS = {
    "resnet20_cifar": 0.27, "resnet32_cifar": 0.46, "resnet56_cifar": 0.86, "resnet110_cifar": 1.73,
    "resnet8x4_cifar": 1.21, "resnet32x4_cifar": 7.41, "wrn_16_1_cifar": 0.175, "wrn_16_2_cifar": 0.69,
    "wrn_40_1_cifar": 0.56, "wrn_40_2_cifar": 2.24,
}
CIFAR = cifar_nets.CIFAR_MODELS
REDUCTIONS = {name: [1, 2, 4] for name in PARAMS} | {"mobilenetv2_cifar": [1, 2, 4, 8]}
_cache: dict[str, nn.Module] = {}


def build(name: str) -> nn.Module:
    """One eval-mode instance per name for the whole file (construction is the slow part)."""
    if name not in _cache:
        torch.manual_seed(0)
        _cache[name] = timm.create_model(name, num_classes=10).eval()
    return _cache[name]


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_all_cifar_models_are_registered_in_timm():
    assert set(CIFAR) == set(PARAMS) | {"mobilenetv2_cifar"}
    assert set(CIFAR) <= set(timm.list_models())
    model = timm.create_model("resnet20_cifar")  # num_classes defaults to 10 via the pretrained cfg
    assert isinstance(model, cifar_nets.CifarResNet)
    assert model.num_classes == 10 and model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert timm.create_model("resnet20_cifar", num_classes=100).get_classifier().out_features == 100


@pytest.mark.parametrize("name", CIFAR)
def test_parameter_count(name):
    n = sum(p.numel() for p in build(name).parameters()) / 1e6
    if name == "mobilenetv2_cifar":
        assert 0.5 <= n <= 0.8, n
    else:
        assert n == pytest.approx(PARAMS[name], rel=0.02)


@pytest.mark.parametrize("name", CIFAR)
def test_timm_conformance(name, x):
    model = build(name)
    with torch.no_grad():
        logits = model(x)
        final, inter = model.forward_intermediates(x)
        pooled = model.forward_head(final, pre_logits=True)
    assert logits.shape == (2, 10)
    info = model.feature_info
    assert len(inter) == len(info)
    for feat, entry in zip(inter, info):
        assert feat.shape == (2, entry["num_chs"], 32 // entry["reduction"], 32 // entry["reduction"])
    assert sorted({e["reduction"] for e in info}) == REDUCTIONS[name]
    assert pooled.shape == (2, model.num_features)
    torch.testing.assert_close(model.forward_head(final), logits)
    torch.testing.assert_close(model.get_classifier()(pooled), logits)


@pytest.mark.parametrize("name", CIFAR)
def test_kdnet_matches_model(name, x):
    model = build(name)
    net = KDNet(model)
    with torch.no_grad():
        out = net(x, features=True, embedding=True)
        ref = model(x)
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=0)
    sizes = [32 // r for r in REDUCTIONS[name]]
    assert [f.shape[-1] for f in out.features] == sizes
    assert net.info.stage_sizes == tuple((s, s) for s in sizes)
    assert net.info.stage_channels == tuple(f.shape[1] for f in out.features)
    assert net.info.embed_dim == model.num_features == out.embedding.shape[1]
    assert net.info.num_classes == 10
    if not name.startswith("mobilenet"):  # ResNet/WRN: the embedding is the pooled last stage output
        torch.testing.assert_close(out.embedding, out.features[-1].mean(dim=(2, 3)))
        assert (out.features[-1] >= 0).all()  # post-activation


def test_stage_channels_of_known_nets():
    assert describe(build("resnet8x4_cifar")).stage_channels == (64, 128, 256)
    assert describe(build("wrn_40_2_cifar")).stage_channels == (32, 64, 128)
    info = describe(build("mobilenetv2_cifar"))
    assert info.stage_channels == (12, 16, 48, 160) and info.embed_dim == 1280


def test_wrn_stage_outputs_are_all_post_activation(x):
    with torch.no_grad():
        feats = build("wrn_16_2_cifar").forward_intermediates(x, intermediates_only=True)
    assert all((f >= 0).all() and (f == 0).any() for f in feats)


def test_forward_intermediates_index_semantics(x):
    model = build("resnet20_cifar")
    with torch.no_grad():
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        picked = model.forward_intermediates(x, indices=[-1, 0], intermediates_only=True)
        final_early, early = model.forward_intermediates(x, indices=[1], stop_early=True)
    assert [f.shape[1:] for f in last2] == [(32, 16, 16), (64, 8, 8)]
    assert [f.shape[1] for f in picked] == [16, 64]  # returned in network order, like timm
    assert final_early.shape == (2, 16, 32, 32) and len(early) == 1
    with pytest.raises(AssertionError):
        model.forward_intermediates(x, indices=[4])


def test_features_only_through_timm(x):
    feats = timm.create_model("resnet20_cifar", features_only=True, out_indices=(1, 2, 3))(x)
    assert [tuple(f.shape[1:]) for f in feats] == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]


class _RepDistillerWRNBlock(nn.Module):
    """RepDistiller's wrn.py BasicBlock, verbatim in behaviour."""

    def __init__(self, i: int, o: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(i), nn.Conv2d(i, o, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(o), nn.Conv2d(o, o, 3, 1, 1, bias=False)
        self.equal = i == o
        self.short = None if self.equal else nn.Conv2d(i, o, 1, stride, 0, bias=False)

    def forward(self, x):
        if not self.equal:
            x = F.relu(self.bn1(x))
            out = x
        else:
            out = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return (x if self.equal else self.short(x)) + out


def _repdistiller_wrn(depth: int, k: int) -> nn.Module:
    n, w = (depth - 4) // 6, [16, 16 * k, 32 * k, 64 * k]
    layers = [nn.Conv2d(3, 16, 3, 1, 1, bias=False)]
    for s in range(3):
        layers += [_RepDistillerWRNBlock(w[s] if b == 0 else w[s + 1], w[s + 1], (1 if s == 0 else 2) if b == 0 else 1)
                   for b in range(n)]
    return nn.Sequential(*layers, nn.BatchNorm2d(w[3]), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(w[3], 10))


@pytest.mark.parametrize("depth,k", [(16, 1), (16, 2)])
def test_wrn_computes_repdistillers_function(depth, k, x):
    """Moving the stage-opening BN + ReLU to the previous stage must not change the function."""
    ours, ref = timm.create_model(f"wrn_{depth}_{k}_cifar").eval(), _repdistiller_wrn(depth, k).eval()
    torch.manual_seed(3)
    src = {}
    for key, value in ours.state_dict().items():  # random BN affine and statistics, so every BN matters
        src[key] = torch.rand_like(value) + 0.5 if "running_var" in key else \
            value if "num_batches" in key else torch.randn_like(value) * (0.1 if "running_mean" in key else 1)
    ours.load_state_dict(src)
    ref_sd = ref.state_dict()
    assert [v.shape for v in ref_sd.values()] == [v.shape for v in src.values()]  # same registration order
    ref.load_state_dict(dict(zip(ref_sd, src.values())))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- the timm plugin


def _collect() -> tuple[list[str], dict]:
    """The names and factories of the timm plugin's one lazy family, listed as the registry lists them."""
    families = []

    class Register:
        def __call__(self, name, factory):
            raise AssertionError(f"the timm plugin registers its names as one lazy family, not {name!r} alone")

        def family(self, list_names, make_factory, description):
            families.append((list_names, make_factory, description))

    timm_backbones.register_models(Register())
    ((list_names, make_factory, description),) = families
    assert "timm" in description
    names = list_names()
    return names, {name: make_factory(name) for name in names}


def test_plugin_registers_timm_names_and_aliases_without_duplicates():
    start = time.perf_counter()
    names, factories = _collect()
    assert time.perf_counter() - start < 2.0  # no model is built at registration
    assert len(names) == len(set(names))
    assert set(timm.list_models()) <= set(names)
    aliases = {"resnet20", "resnet32", "resnet56", "resnet110", "resnet8x4", "resnet32x4", "wrn_16_1",
               "wrn_16_2", "wrn_40_1", "wrn_40_2", "mobilenetv2_x0_5"}
    assert aliases <= set(names) and set(names) == set(timm.list_models()) | aliases
    assert {"resnet18", "resnet20_cifar", "mobilenetv2_100"} <= set(names)
    assert factories["resnet20"].model_name == "resnet20_cifar"
    assert factories["mobilenetv2_x0_5"].model_name == "mobilenetv2_cifar"
    model = factories["wrn_16_1"](num_classes=7)
    assert isinstance(model, cifar_nets.CifarWideResNet) and model.num_classes == 7


def test_plugin_skips_an_alias_that_timm_uses(monkeypatch):
    real = timm.list_models
    monkeypatch.setattr(timm, "list_models", lambda *a, **k: real(*a, **k) + ["resnet20"])
    names, factories = _collect()
    assert names.count("resnet20") == 1 and factories["resnet20"].model_name == "resnet20"


def test_aliases_name_exactly_the_cifar_nets():
    # ALIASES is written out so that the plugin needs no timm import to register its family
    assert sorted(timm_backbones.ALIASES.values()) == sorted(cifar_nets.CIFAR_MODELS)
    assert all(target == f"{alias}_cifar" for alias, target in timm_backbones.ALIASES.items()
               if alias != "mobilenetv2_x0_5")


def test_registering_the_timm_plugin_imports_neither_timm_nor_torch():
    code = ("import sys; from kdzoo_plugins import timm_backbones as t\n"
            "class R:\n    def family(self, *a): self.args = a\n"
            "r = R(); t.register_models(r); assert callable(r.args[0]) and callable(r.args[1])\n"
            "print(sorted(m for m in ('timm', 'torch', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("model, option, says", [
    ("resnet20", {"depth": 21}, ["depth=21", "resnet20_cifar", "depth=20", "resnet{20,32,56,110,8x4,32x4}_cifar"]),
    ("resnet8x4", {"widths": [8, 8, 16, 32]}, ["widths=[8, 8, 16, 32]", "widths=[32, 64, 128, 256]"]),
    ("resnet20", {"widths": [16, 32]}, ["widths=[16, 32]", "4 positive integers"]),
    ("wrn_16_1", {"widen": 2}, ["widen=2", "wrn_{16,40}_{1,2}_cifar"]),
    ("mobilenetv2_x0_5", {"width_mult": 0.0}, ["width_mult=0.0", "at least 0.0625"]),
])
def test_cifar_net_options_are_checked_with_kdzoo_errors(kdzoo_registry, model, option, says):
    with pytest.raises(KDZooError) as err:
        kdzoo_registry.create_model(model, **option)
    for text in says:
        assert text in str(err.value)


@pytest.mark.parametrize("cls, option, valid", [
    (cifar_nets.CifarResNet, {"depth": 21}, "6n + 2 for n >= 1 (8, 14, 20"),
    (cifar_nets.CifarResNet, {"depth": 2}, "6n + 2"),
    (cifar_nets.CifarWideResNet, {"depth": 15}, "6n + 4 for n >= 1 (10, 16, 22"),
    (cifar_nets.CifarWideResNet, {"widen": 0}, "positive integer"),
])
def test_cifar_net_classes_refuse_impossible_architectures(cls, option, valid):
    with pytest.raises(KDZooError, match=r"Model option \w+=") as err:
        cls(**option)
    assert valid in str(err.value)


def test_cifar_net_timm_api_errors_are_not_asserts():
    model = cifar_nets.CifarResNet(depth=8)
    model.set_grad_checkpointing(False)
    with pytest.raises(NotImplementedError, match="gradient checkpointing"):
        model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(torch.zeros(1, 3, 32, 32), output_fmt="NHWC")


def test_cifar_stem_on_timm_resnet18_pairs_with_resnet20(x):
    factory = _collect()[1]["resnet18"]
    model = factory(num_classes=10, cifar_stem=True).eval()
    assert [e["reduction"] for e in model.feature_info] == [1, 1, 2, 4, 8]
    assert isinstance(model.maxpool, nn.Identity) and model.conv1.stride == (1, 1)
    assert model.conv1.kernel_size == (3, 3)
    with torch.no_grad():
        _, inter = model.forward_intermediates(x)
    for feat, entry in zip(inter, model.feature_info):
        assert feat.shape[1:] == (entry["num_chs"], 32 // entry["reduction"], 32 // entry["reduction"])
    teacher = describe(model)
    assert teacher.stage_sizes == ((32, 32), (16, 16), (8, 8), (4, 4))
    assert teacher.stage_channels == (64, 128, 256, 512)
    student = describe(build("resnet20_cifar"))
    assert pair_stages(teacher, student) == [(0, 0), (1, 1), (2, 2)]
    # without the swap the stages are 16/8/4/2/1 at 32x32: only 16 and 8 are shared with resnet20
    plain = describe(factory(num_classes=10))
    assert plain.stage_sizes == ((16, 16), (8, 8), (4, 4), (2, 2), (1, 1))
    assert pair_stages(plain, student) == [(0, 1), (1, 2)]


def test_cifar_stem_on_timm_mobilenetv2_and_unsupported_family():
    factories = _collect()[1]
    model = factories["mobilenetv2_050"](cifar_stem=True)
    assert [e["reduction"] for e in model.feature_info] == [1, 2, 4, 8, 16]
    assert describe(model).stage_sizes == ((32, 32), (16, 16), (8, 8), (4, 4), (2, 2))
    with pytest.raises(KDZooError, match="convnext_atto"):
        factories["convnext_atto"](cifar_stem=True)


def test_pretrained_offline_is_a_clear_error(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot reach huggingface.co")

    def offline_url(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", offline)
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_url", offline_url)
    with pytest.raises(KDZooError, match="offline") as err:
        timm_backbones.TimmFactory("resnet18")(pretrained=True)
    assert "resnet18" in str(err.value) and "pretrained=False" in str(err.value)
    with pytest.raises(KDZooError, match="no pretrained weights for 'resnet20_cifar'"):
        timm_backbones.TimmFactory("resnet20_cifar")(pretrained=True)


# --------------------------------------------------------------------------- pair_stages and KDNet on plain modules


def _info(*sizes: int) -> NetInfo:
    return NetInfo(tuple(8 for _ in sizes), tuple((s, s) for s in sizes), 8, 10)


def test_pair_stages_rules():
    assert pair_stages(_info(32, 16, 8), _info(32, 16, 8)) == [(0, 0), (1, 1), (2, 2)]
    assert pair_stages(_info(32, 16, 8, 4), _info(16, 8)) == [(1, 0), (2, 1)]
    assert pair_stages(_info(16, 8, 4, 2, 1), _info(32, 16, 8)) == [(0, 1), (1, 2)]
    assert pair_stages(_info(28, 14, 7), _info(32, 16)) == [(1, 0), (2, 1)]  # nothing shared: from the last
    with pytest.raises(KDZooError, match="student"):
        pair_stages(_info(32), _info())
    with pytest.raises(KDZooError, match="teacher"):
        pair_stages(_info(), _info(32))


class TinyCNN(nn.Module):
    """A plain module; one ReLU child is reused at two resolutions to exercise per-call hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, 1, 1), nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 6, 3, 2, 1)
        self.conv3 = nn.Conv2d(6, 5, 3, 2, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        a = self.relu(self.bn1(self.conv1(x)))  # 32x32, the relu's 1st call
        b = self.relu(self.conv2(a))  # 16x16, 2nd call
        c = torch.sigmoid(self.conv3(b))  # 8x8: conv3 is the last child at 8x8
        return self.fc(self.pool(c).flatten(1))


def test_kdnet_on_a_plain_module(x):
    torch.manual_seed(0)
    model = TinyCNN().train()
    net = KDNet(model)
    assert model.training  # the dry run restored training mode
    assert net.info == NetInfo((4, 6, 5), ((32, 32), (16, 16), (8, 8)), 5, 3, (32, 32))
    model.eval()
    with torch.no_grad():
        out = net(x, features=True, embedding=True)
        a = F.relu(model.bn1(model.conv1(x)))
        b = F.relu(model.conv2(a))
        c = model.conv3(b)  # the stage output is the child's output: before the functional sigmoid
        emb = torch.sigmoid(c).mean(dim=(2, 3))
    for got, want in zip(out.features, [a, b, c]):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(out.embedding, emb)
    torch.testing.assert_close(out.logits, model.fc(emb))
    fast = net(x)
    assert fast.features is None and fast.embedding is None
    torch.testing.assert_close(fast.logits, out.logits)
    assert not model.conv1._forward_hooks and not model.relu._forward_hooks  # no hook left behind


def test_kdnet_on_a_sequential_skips_global_pool_and_keys_are_model_prefixed(x):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    net = KDNet(model)
    assert net.info.stage_sizes == ((16, 16),) and net.info.stage_channels == (4,) and net.info.embed_dim == 4
    assert all(key.startswith("model.") for key in net.state_dict())
    assert len(net.state_dict()) == len(model.state_dict())


def test_kdnet_without_linear_reports_embedding_error(x):
    model = nn.Sequential(nn.Conv2d(3, 10, 3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net = KDNet(model)
    assert net.info.embed_dim == 0 and net.info.num_classes == 10
    with pytest.raises(KDZooError, match="embedding"):
        net(x, embedding=True)


def test_kdnet_dry_run_failure_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 2))  # fixed to 32x32
    assert KDNet(model).info.num_classes == 2
    with pytest.raises(KDZooError, match="16x16"):
        KDNet(model, input_size=(16, 16))


@pytest.mark.parametrize("option, value", [("pretrained", "maybe"), ("cifar_stem", "yes"), ("pretrained", 1),
                                           ("cifar_stem", None)])
def test_boolean_model_options_must_be_booleans(option, value):
    factory = timm_backbones.TimmFactory("resnet20_cifar")
    with pytest.raises(KDZooError, match=rf"Model option '{option}' of 'resnet20_cifar' must be true or false, "
                                         rf"got {value!r}\. Write --model-option {option}=true"):
        factory(**{option: value})
    assert isinstance(factory(cifar_stem=True, pretrained=False), nn.Module)


def test_model_option_pretrained_maybe_is_refused_by_the_cli(tmp_path, capsys):
    from kdzoo.cli import main

    code = main(["train", "--model", "resnet20", "--model-option", "pretrained=maybe", "--out", str(tmp_path / "o")])
    assert code == 2 and "Model option 'pretrained'" in capsys.readouterr().err
