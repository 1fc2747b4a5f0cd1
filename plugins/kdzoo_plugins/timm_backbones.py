"""First-party backbone plugin: every timm model by name, plus the CIFAR-native nets.

Registered names:

* every name in ``timm.list_models()``, which includes the CIFAR nets of
  :mod:`kdzoo_plugins.cifar_nets` (``resnet20_cifar``, ..., ``mobilenetv2_cifar``);
* short aliases for the CIFAR nets, as the KD literature names them (:data:`ALIASES`): ``resnet8`` …
  ``resnet110``, ``resnet8x4``, ``resnet32x4``, ``wrn_16_1`` … ``wrn_40_2``, ``vgg8``,
  ``shufflenet_v1``, ``shufflenet_v2``, ``mobile_half`` (RepDistiller's MobileNetV2, stride-2 stem) and
  ``mobilenetv2_x0_5`` (the same width with a stride-1 stem). An alias that timm itself uses is not
  registered: the timm model wins, so the CIFAR ``vgg11``…``vgg19`` and ``resnet50`` go by their
  ``*_cifar`` names.

The names are one lazy family (``register.family``): importing this module imports neither timm nor
torch, and timm's names are listed only when kdzoo first looks up or lists a model, so commands that
need only methods (``kdzoo methods``, ``kdzoo plugins``) never import timm.

Every factory is ``factory(num_classes=10, pretrained=False, cifar_stem=False, **kwargs)`` and calls
``timm.create_model``; ``kwargs`` pass through to it. ``cifar_stem=True`` gives an ImageNet model a
CIFAR stem (a 3x3 stride-1 conv and no max-pool) and rewrites ``feature_info`` with the true
reductions. Supported families: timm's ``ResNet`` (resnet*, resnext*, seresnet*, wide_resnet*,
...: the stem is replaced, so its pretrained weights are dropped), ``EfficientNet`` and
``MobileNetV3`` (mobilenetv2_*, efficientnet_*, mobilenetv3_*, ...: the 3x3 stem conv keeps its
weights and gets stride 1). The CIFAR nets already have one, so the flag changes nothing there.
"""
from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

from kdzoo import KDZooError, hookimpl

if TYPE_CHECKING:  # timm and torch are imported when a model is listed or built, not with this module
    from torch import nn

#: Short names of the CIFAR nets (kdzoo_plugins.cifar_nets.CIFAR_MODELS; a test checks they agree).
#: The nets whose short name is a timm ImageNet model (resnet50, vgg11/13/16/19) keep their full
#: ``*_cifar`` name here: timm's model wins a shared name, and every CIFAR net must be listed.
ALIASES: dict[str, str] = {
    **{f"resnet{d}": f"resnet{d}_cifar" for d in ("8", "14", "20", "32", "44", "56", "110", "8x4", "32x4")},
    **{f"wrn_{d}_{k}": f"wrn_{d}_{k}_cifar" for d in (16, 40) for k in (1, 2)},
    "mobilenetv2_x0_5": "mobilenetv2_cifar",  # RepDistiller's mobile_half with a stride-1 stem
    "mobile_half": "mobile_half_cifar",
    "vgg8": "vgg8_cifar",
    "shufflenet_v1": "shufflenet_v1_cifar",
    "shufflenet_v2": "shufflenet_v2_cifar",
    **{name: name for name in ("resnet50_cifar", "vgg11_cifar", "vgg13_cifar", "vgg16_cifar", "vgg19_cifar")},
}


def _timm() -> ModuleType:
    """timm, with the CIFAR nets registered into it."""
    import timm

    from kdzoo_plugins import cifar_nets  # noqa: F401  (registers the CIFAR nets into timm)

    return timm


def _network_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (OSError,)  # hf_hub and urllib errors are OSErrors
    try:  # huggingface_hub >= 1.0 talks through httpx, whose transport errors are not OSErrors
        import httpx

        errors += (httpx.TransportError,)
    except ImportError:  # pragma: no cover
        pass
    return errors


class TimmFactory:
    """Builds the timm model ``model_name``. Cheap to create: nothing is instantiated until called."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name

    def __repr__(self) -> str:
        return f"TimmFactory({self.model_name!r})"

    def __call__(self, num_classes: int = 10, pretrained: bool = False, cifar_stem: bool = False,
                 **kwargs: Any) -> nn.Module:
        for option, value in (("pretrained", pretrained), ("cifar_stem", cifar_stem)):
            if not isinstance(value, bool):  # "maybe" or "yes" is truthy: never read a string as true
                raise KDZooError(
                    f"Model option '{option}' of '{self.model_name}' must be true or false, got {value!r}. "
                    f"Write --model-option {option}=true (or false), or `{option}: true` under the model's "
                    "options in YAML."
                )
        timm = _timm()
        if pretrained and not ({"pretrained_cfg", "pretrained_cfg_overlay"} & kwargs.keys()):
            cfg = timm.models.get_pretrained_cfg(self.model_name)
            if cfg is None or not cfg.has_weights:
                raise KDZooError(
                    f"timm has no pretrained weights for '{self.model_name}'. Use pretrained=False "
                    "(the CIFAR nets are always trained from scratch), or pick a timm model that "
                    "has weights (`timm.list_models(pretrained=True)`)."
                )
        try:
            model = timm.create_model(self.model_name, pretrained=pretrained, num_classes=num_classes, **kwargs)
        except _network_errors() as exc:
            if not pretrained:
                raise
            raise KDZooError(
                f"Cannot download pretrained weights for '{self.model_name}', you are probably offline "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}). "
                "Use pretrained=False, or pre-populate the Hugging Face cache on a machine with a "
                "connection and set HF_HUB_OFFLINE=1 to use the cached copy."
            ) from exc
        if cifar_stem and self.model_name not in ALIASES.values():  # the CIFAR nets have a CIFAR stem
            model = to_cifar_stem(model, self.model_name)
        return model


def _rescale_feature_info(model: nn.Module, factor: int) -> None:
    """Divide every ``feature_info`` reduction by the removed stem downsampling (at least 1)."""
    info = model.feature_info
    info = info.get_dicts() if hasattr(info, "get_dicts") else info
    model.feature_info = [dict(entry, reduction=max(1, entry["reduction"] // factor)) for entry in info]


def to_cifar_stem(model: nn.Module, name: str = "") -> nn.Module:
    """Give a timm ImageNet model a CIFAR stem in place (see module docstring); returns ``model``."""
    from timm.models.efficientnet import EfficientNet
    from timm.models.mobilenetv3 import MobileNetV3
    from timm.models.resnet import ResNet
    from torch import nn

    if isinstance(model, ResNet):
        first = next(m for m in model.conv1.modules() if isinstance(m, nn.Conv2d))
        conv = nn.Conv2d(first.in_channels, model.bn1.num_features, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        conv.to(device=first.weight.device, dtype=first.weight.dtype)
        model.conv1, model.maxpool = conv, nn.Identity()
        _rescale_feature_info(model, 4)
    elif isinstance(model, (EfficientNet, MobileNetV3)) and tuple(model.conv_stem.kernel_size) == (3, 3) \
            and tuple(model.conv_stem.stride) == (2, 2):
        model.conv_stem.stride = (1, 1)
        _rescale_feature_info(model, 2)
    else:
        raise KDZooError(
            f"cifar_stem=True is not supported for '{name or type(model).__name__}' "
            f"({type(model).__name__}). It works for timm's ResNet, EfficientNet and MobileNetV3 "
            "families and is built into the *_cifar nets; use cifar_stem=False to run this model "
            "with its ImageNet stem (it still accepts 32x32 inputs)."
        )
    return model


def list_names() -> list[str]:
    """Every name this plugin provides: ``timm.list_models()`` (the CIFAR nets included) and the
    aliases that timm does not use itself."""
    names = _timm().list_models()
    taken = set(names)
    return names + [alias for alias in ALIASES if alias not in taken]


def make_factory(name: str) -> TimmFactory:
    """The factory of a name from :func:`list_names`: an alias builds its CIFAR net unless timm lists the name."""
    if name in ALIASES and name not in _timm().list_models():
        return TimmFactory(ALIASES[name])
    return TimmFactory(name)


@hookimpl
def register_models(register):
    register.family(list_names, make_factory, f"every timm model and {len(ALIASES)} CIFAR names")
