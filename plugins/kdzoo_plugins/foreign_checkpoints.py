"""First-party checkpoint formats: teachers trained by RepDistiller, mdistiller and torchdistill.

Registered with ``register_checkpoint_formats`` (see :mod:`kdzoo.hookspecs`); a teacher is then
``{model: resnet56, checkpoint: FILE, format: repdistiller}`` in a benchmark, or ``kdzoo distill --teacher FILE
--teacher-format repdistiller --teacher-model resnet56``. kdzoo reads the file safely (weights only,
through ``kdzoo.checkpoint.load_payload``); the converters below only rename keys, and kdzoo checks the result against the network
key by key and shape by shape.

* ``repdistiller``: HobbitLong/RepDistiller's ``train_teacher.py`` files, ``save/models/<model>_vanilla/
  ckpt_epoch_240.pth`` or ``<model>_best.pth``: ``{'epoch', 'model': state_dict, 'best_acc' or 'accuracy',
  'optimizer'}``. (Its ``<model>_last.pth`` also pickles the argparse options, which kdzoo will not load: use the
  others.) Networks: RepDistiller's ``model_dict`` for CIFAR, :data:`REPDISTILLER_NAMES` gives their kdzoo names.
* ``mdistiller``: megvii-research/mdistiller reads and publishes the same teacher files
  (``cifar_teachers/<model>_vanilla/ckpt_epoch_240.pth``, loaded as ``load_checkpoint(path)["model"]``); its own
  ``student_best``/``student_latest`` files (``{'model': student_state_dict}``) load too, and so do its
  ``best``/``latest`` distiller files, from which the student's weights are taken.
* ``torchdistill``: yoshitomo-matsubara/torchdistill's CIFAR ResNets (``models/classification/resnet.py``,
  ``ResNet4Cifar``: RepDistiller's keys and function) as a plain state dict, its published CIFAR-10 files
  (``pretrained: torchdistill`` downloads them, :data:`TORCHDISTILL_URLS`) or ``{'model': state_dict, ...}``.
  Its Wide ResNets and DenseNets have no kdzoo network (see :data:`TORCHDISTILL_UNSUPPORTED`).

Every format accepts a plain state dict too, and strips the ``module.`` prefix of ``DataParallel`` weights.

The kdzoo CIFAR nets were made to hold RepDistiller's tensors (:mod:`kdzoo_plugins.cifar_nets`): ResNets, VGG and
ShuffleNets key for key (the classifier aside), WRN and MobileNetV2 under timm-style names, mapped here.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from kdzoo import KDZooError, hookimpl

if TYPE_CHECKING:  # torch is imported by the converters (the payload already holds tensors by then)
    from torch import Tensor

    StateDict = dict[str, Tensor]

Rename = Callable[[str], str]

_RESNET_DEPTHS = ("8", "14", "20", "32", "44", "56", "110")

#: RepDistiller's (and mdistiller's) ``model_dict`` names → kdzoo's. The ones not listed are the same in both.
REPDISTILLER_NAMES: dict[str, str] = {
    "ResNet50": "resnet50_cifar", "MobileNetV2": "mobile_half", "ShuffleV1": "shufflenet_v1",
    "ShuffleV2": "shufflenet_v2", **{f"vgg{d}": f"vgg{d}_cifar" for d in (11, 13, 16, 19)},
}

#: torchdistill's published CIFAR-10 teachers (release v0.1.1; ``torchdistill/models/classification/resnet.py``,
#: ``MODEL_URL_DICT``), by (kdzoo dataset, kdzoo model). The file is saved under the URL's file name.
_TORCHDISTILL_ROOT = "https://github.com/yoshitomo-matsubara/torchdistill/releases/download/v0.1.1"
TORCHDISTILL_URLS: dict[tuple[str, str], str] = {
    ("cifar10", f"resnet{d}"): f"{_TORCHDISTILL_ROOT}/cifar10-resnet{d}.pt" for d in (20, 32, 44, 56, 110)}

#: torchdistill networks with published weights that no kdzoo network computes, and why.
TORCHDISTILL_UNSUPPORTED = (
    "torchdistill's wide_resnet40_4, wide_resnet28_10 and wide_resnet16_8 are not RepDistiller's WRN (their "
    "projection shortcuts read the block's raw input, not the activated one, and WRN-40-4/28-10/16-8 are not among "
    "kdzoo's wrn_{16,40}_{1,2}), and its densenet_bc_* have no kdzoo counterpart, so kdzoo cannot run them as "
    "teachers")


# --------------------------------------------------------------------------- reading the payload


def _describe(payload: Any) -> str:
    if isinstance(payload, Mapping):
        keys = list(payload)
        shown = ", ".join(repr(k) for k in keys[:6]) + (", ..." if len(keys) > 6 else "")
        return f"a dict with the keys {shown}" if keys else "an empty dict"
    return f"a {type(payload).__name__}"


def _is_state_dict(value: Any) -> bool:
    import torch

    return (isinstance(value, Mapping) and len(value) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()))


def _weights(payload: Any, layout: str) -> StateDict:
    """The network's weights in a payload: ``payload['model']`` (or ``['state_dict']``), or the payload itself when
    it is a state dict; without the ``module.`` prefix that ``DataParallel`` adds."""
    state = payload
    if isinstance(payload, Mapping) and not _is_state_dict(payload):
        state = next((payload[k] for k in ("model", "state_dict") if _is_state_dict(payload.get(k))), None)
    if not _is_state_dict(state):
        raise KDZooError(f"the file holds {_describe(payload)}, not {layout} nor a state dict (a dict of parameter "
                         "names to tensors). Is it a teacher checkpoint of this code base?")
    state = dict(state)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _renamed(state: StateDict, rename: Rename) -> StateDict:
    """Every key renamed; keys the renaming leaves as they are pass through, so kdzoo's check names the ones that
    do not fit the network."""
    out: StateDict = {}
    source: dict[str, str] = {}
    for key, value in state.items():
        new = rename(key)
        if new in out:  # two keys of the file on one place of the network: a file of another network
            raise KDZooError(f"the file's keys '{source[new]}' and '{key}' both map to '{new}'. Is it a checkpoint "
                             "of this network?")
        out[new], source[new] = value, key
    return out


# --------------------------------------------------------------------------- RepDistiller's networks


def _classifier(prefix: str) -> Rename:
    """Rename the classifier ``prefix`` (``linear``, ``classifier``) to kdzoo's ``fc``."""
    return lambda key: "fc" + key[len(prefix):] if key.startswith(prefix + ".") else key


_WRN_BLOCK = re.compile(r"^block(\d)\.layer\.(\d+)\.(bn1|conv1|bn2|conv2|convShortcut)\.(.+)$")
_WRN_PARTS = {"conv1": "conv1", "bn2": "norm2", "conv2": "conv2", "convShortcut": "shortcut"}


def _wrn_key(key: str) -> str:
    """RepDistiller ``models/wrn.py`` → :class:`~kdzoo_plugins.cifar_nets.CifarWideResNet`. The BN + ReLU that opens
    the first block of stages 2 and 3 (``block{2,3}.layer.0.bn1``) is the end of the previous stage in kdzoo
    (``norm1``, ``norm2``); the final ``bn1`` is ``norm``."""
    match = _WRN_BLOCK.match(key)
    if match:
        stage, block, part, rest = int(match[1]), int(match[2]), match[3], match[4]
        if part == "bn1":
            return f"norm{stage - 1}.{rest}" if block == 0 and stage > 1 else f"layer{stage}.{block}.norm1.{rest}"
        return f"layer{stage}.{block}.{_WRN_PARTS[part]}.{rest}"
    return "norm" + key[len("bn1"):] if key.startswith("bn1.") else key


_MBV2_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.conv\.(\d)\.(.+)$")
_MBV2_PARTS = {"0": "conv_pw", "1": "bn1", "3": "conv_dw", "4": "bn2", "6": "conv_pwl", "7": "bn3"}
_MBV2_TOP = {"conv1.0": "conv_stem", "conv1.1": "bn1", "conv2.0": "conv_head", "conv2.1": "bn2", "classifier.0": "fc"}


def _mobilenetv2_key(key: str) -> str:
    """RepDistiller ``models/mobilenetv2.py`` (``mobile_half``) → :class:`~kdzoo_plugins.cifar_nets.CifarMobileNetV2`."""
    match = _MBV2_BLOCK.match(key)
    if match and match[3] in _MBV2_PARTS:
        return f"blocks.{match[1]}.{match[2]}.{_MBV2_PARTS[match[3]]}.{match[4]}"
    module, _, rest = key.rpartition(".")
    return f"{_MBV2_TOP[module]}.{rest}" if module in _MBV2_TOP else key


def _repdistiller_renames() -> dict[str, Rename]:
    """kdzoo model name (short and ``_cifar``) → the renaming of RepDistiller's keys into it."""
    table: dict[str, Rename] = {}

    def add(short: str | None, full: str, rename: Rename) -> None:
        table[full] = rename
        if short:
            table[short] = rename

    same: Rename = lambda key: key  # noqa: E731  (RepDistiller's resnet.py already names its classifier fc)
    for depth in (*_RESNET_DEPTHS, "8x4", "32x4"):
        add(f"resnet{depth}", f"resnet{depth}_cifar", same)
    add(None, "resnet50_cifar", _classifier("linear"))  # "resnet50" is timm's ImageNet model
    add("vgg8", "vgg8_cifar", _classifier("classifier"))
    for depth in (11, 13, 16, 19):
        add(None, f"vgg{depth}_cifar", _classifier("classifier"))  # "vgg13" etc. are timm's ImageNet VGGs
    add("shufflenet_v1", "shufflenet_v1_cifar", _classifier("linear"))
    add("shufflenet_v2", "shufflenet_v2_cifar", _classifier("linear"))
    for depth in (16, 40):
        for widen in (1, 2):
            add(f"wrn_{depth}_{widen}", f"wrn_{depth}_{widen}_cifar", _wrn_key)
    add("mobile_half", "mobile_half_cifar", _mobilenetv2_key)
    return table


_REPDISTILLER = _repdistiller_renames()


def _unsupported(source: str, model: str, supported: list[str], note: str = "") -> KDZooError:
    return KDZooError(f"{source} has no network that maps onto kdzoo's '{model}'.{note} Supported models: "
                      f"{', '.join(supported)}.")


def _repdistiller_model(source: str, model: str) -> Rename:
    """The renaming of ``source``'s (RepDistiller's or mdistiller's) keys into kdzoo's ``model``; ``KDZooError``
    listing the supported models (and the right name, for one of theirs) otherwise."""
    rename = _REPDISTILLER.get(model)
    if rename is not None:
        return rename
    supported = sorted(k for k in _REPDISTILLER if not k.endswith("_cifar") or k.removesuffix("_cifar") not in _REPDISTILLER)
    note = ""
    if model in ("resnet50", "vgg11", "vgg13", "vgg16", "vgg19"):
        note = (f" kdzoo's '{model}' is timm's ImageNet network; {source}'s CIFAR '{model}' is kdzoo's "
                f"'{model}_cifar'.")
    elif model in REPDISTILLER_NAMES:
        note = f" {source}'s '{model}' is kdzoo's '{REPDISTILLER_NAMES[model]}': use that name."
    elif model in ("mobilenetv2_x0_5", "mobilenetv2_cifar"):
        note = (f" '{model}' is RepDistiller's MobileNetV2 with a stride-1 stem, another function of the same "
                f"weights; {source}'s MobileNetV2 (mobile_half) is kdzoo's 'mobile_half'.")
    raise _unsupported(source, model, supported, note)


def convert_repdistiller(model_name: str, payload: Any, source: str = "RepDistiller") -> StateDict:
    """A RepDistiller teacher file (``{'model': state_dict, 'epoch', 'best_acc', ...}``) → the state dict of kdzoo's
    ``model_name``."""
    rename = _repdistiller_model(source, model_name)
    layout = f"{source}'s layout ({{'model': state_dict, 'epoch': ..., ...}})"
    return _renamed(_weights(payload, layout), rename)


def convert_mdistiller(model_name: str, payload: Any) -> StateDict:
    """An mdistiller file → the state dict of kdzoo's ``model_name``: its CIFAR teachers (RepDistiller's files),
    ``student_*`` files, or the student inside a ``best``/``latest`` distiller file."""
    rename = _repdistiller_model("mdistiller", model_name)
    state = _weights(payload, "mdistiller's layout ({'model': state_dict, ...})")
    if any(k.startswith("student.") for k in state):  # a distiller's state: its student, teacher and method parts
        state = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    return _renamed(state, rename)


# --------------------------------------------------------------------------- torchdistill


_TORCHDISTILL = {**{f"resnet{d}": d for d in _RESNET_DEPTHS}, **{f"resnet{d}_cifar": d for d in _RESNET_DEPTHS}}


def convert_torchdistill(model_name: str, payload: Any) -> StateDict:
    """A torchdistill CIFAR ResNet (``ResNet4Cifar``; a plain state dict, as its published files, or
    ``{'model': state_dict, ...}``) → the state dict of kdzoo's ``model_name``: the same keys."""
    if model_name not in _TORCHDISTILL:
        note = f" ({TORCHDISTILL_UNSUPPORTED}.)" if model_name.startswith(("wrn", "wide_resnet", "densenet")) else ""
        raise _unsupported("torchdistill", model_name, [f"resnet{d}" for d in _RESNET_DEPTHS], note)
    return _weights(payload, "torchdistill's layout (a state dict, or {'model': state_dict, ...})")


def _write_record(record: Path, digest: str, name: str) -> None:
    tmp = record.with_name(f".{record.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{digest}  {name}\n")  # sha256sum's format: `sha256sum -c` checks it
    os.replace(tmp, record)


def pretrained_torchdistill(model_name: str, dataset: str, folder: Path) -> Path:
    """The local file of torchdistill's published ``model_name`` for ``dataset``, downloaded into ``folder`` under
    its published name when it is not there. The sha256 of the file is recorded beside it (``NAME.sha256``) when
    it is downloaded, or first found there (placed by hand), and checked on every later use."""
    from kdzoo.checkpoint import file_sha256

    model = model_name.removesuffix("_cifar")
    url = TORCHDISTILL_URLS.get((dataset, model))
    if url is None:
        published = ", ".join(f"{m} ({d})" for d, m in TORCHDISTILL_URLS)
        unsupported = f" {TORCHDISTILL_UNSUPPORTED}." if model.startswith(("wrn", "wide_resnet", "densenet")) else ""
        raise KDZooError(f"torchdistill publishes no weights of kdzoo's '{model_name}' for '{dataset}' that kdzoo can "
                         f"run. Pretrained torchdistill teachers: {published}.{unsupported}")
    name = Path(urlparse(url).path).name
    target, record = folder / name, folder / f"{name}.sha256"
    if not target.is_file():
        _download(url, target, model, dataset)
        _write_record(record, file_sha256(target), name)
        return target
    digest = file_sha256(target)
    if not record.is_file():  # placed by hand: from now on it must stay this file
        _write_record(record, digest, name)
    else:
        recorded = record.read_text().split()[0] if record.read_text().strip() else ""
        if recorded != digest:
            raise KDZooError(
                f"{target} is not the file kdzoo recorded: its sha256 is {digest}, {record} says {recorded or '(empty)'}. "
                f"It changed after it was fetched (a partial copy, or another file put in its place). Delete both files "
                f"and run again to download it from {url}, or put the original file back.")
    return target


def _download(url: str, target: Path, model: str, dataset: str) -> None:
    """Fetch ``url`` into ``target`` (atomically: torch.hub writes a temporary file and moves it) and check that it
    is a PyTorch file of tensors (read with weights_only=True); KDZooError when offline or it is not."""
    import torch

    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(target), progress=False)
    except (OSError, ValueError) as e:  # URLError, HTTPError and socket errors are OSErrors
        detail = str(getattr(e, "reason", "") or e).strip().splitlines()
        raise KDZooError(
            f"Cannot download torchdistill's pretrained {model} ({dataset}) from {url} ({type(e).__name__}: "
            f"{detail[0] if detail else 'no detail'}); you are probably offline. On a machine with a connection, "
            f"download that URL and place the file at exactly {target} (for example `mkdir -p {target.parent} && "
            f"curl -L -o {target} {url}`), then run again: kdzoo uses the file it finds there and records its sha256 "
            f"beside it ({target.name}.sha256).") from e
    try:  # an error page, a captive portal or a truncated transfer is not kept
        torch.load(target, map_location="cpu", weights_only=True)
    except Exception as e:
        target.unlink(missing_ok=True)
        raise KDZooError(
            f"What {url} sent is not a PyTorch file of tensors ({type(e).__name__}), so it is not torchdistill's "
            f"{model}; it was removed. Run again later, or download that URL by hand and place the file at exactly "
            f"{target}.") from e


@hookimpl
def register_checkpoint_formats(register):
    register("repdistiller", convert_repdistiller)
    register("mdistiller", convert_mdistiller)
    register("torchdistill", convert_torchdistill, pretrained=pretrained_torchdistill)
