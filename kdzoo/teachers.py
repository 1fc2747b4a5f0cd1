"""Teachers: the one place kdzoo loads a teacher network, from a kdzoo checkpoint or from a file written by
another code base (a format registered with ``register_checkpoint_formats``), and fetches published ones."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kdzoo import KDZooError, cache_dir
from kdzoo.checkpoint import Remedies, is_kdzoo_checkpoint, load_checkpoint, load_payload
from kdzoo.models import KDNet
from kdzoo.plugins import NATIVE_FORMAT, Registry


def foreign_formats_hint(registry: Registry) -> str:
    """The sentence that points a user with another code base's teacher at the registered formats."""
    names = sorted(registry.checkpoint_formats)
    if not names:
        return ""
    return (f"A teacher trained by another code base loads in its format ({', '.join(names)}): `format: NAME` on a "
            "benchmark teacher, or --teacher-format NAME --teacher-model MODEL for `kdzoo distill`.")


def load_teacher(registry: Registry, path: str | Path, dataset: str | None = None, *, format: str = NATIVE_FORMAT,
                 model: str | None = None, options: dict[str, Any] | None = None, num_classes: int | None = None,
                 image_size: tuple[int, int] = (32, 32), class_names: tuple[str, ...] = ()
                 ) -> tuple[KDNet, dict[str, Any]]:
    """A frozen teacher from a checkpoint, and the checkpoint's metadata. The one place kdzoo loads teachers.

    ``format="kdzoo"`` (a checkpoint from `kdzoo train`): the file names its network, classes and dataset. With
    ``dataset``, a teacher trained on another dataset is a ``KDZooError`` (its classes are not the student's); with
    ``class_names``, so is one trained on data of the same name with other classes (two ``folder`` trees); with
    ``model``, so is a checkpoint of another network.

    Another ``format`` (registered with ``register_checkpoint_formats``: a teacher trained by RepDistiller,
    mdistiller, torchdistill...) records neither network nor dataset: the file's weights are converted into the
    kdzoo network ``model`` (with ``options``) built with the run's ``num_classes`` at its ``image_size``, and
    checked key by key, shape by shape; a classifier of another width is an error naming the dataset. The
    metadata returned then has the layout of a kdzoo checkpoint (``model``, ``model_options``, ``num_classes``,
    ``meta`` with the run's ``dataset`` and the ``checkpoint_format``). Files are only ever read with
    ``torch.load(weights_only=True)``.
    """
    if format != NATIVE_FORMAT:
        return _load_foreign_teacher(registry, path, format, model, options or {}, dataset, num_classes, image_size)
    ckpt = load_checkpoint(path, hint=foreign_formats_hint(registry))
    trained_on = ckpt.get("meta", {}).get("dataset", "cifar10")  # checkpoints before datasets were plugins
    if dataset is not None and trained_on != dataset:
        raise KDZooError(
            f"The teacher {path} was trained on '{trained_on}', but this run uses '{dataset}': its "
            f"{ckpt['num_classes']} outputs are another dataset's classes. Train a teacher on '{dataset}' "
            f"(`kdzoo train --dataset {dataset} ...`), or distil on '{trained_on}'.")
    classes = ckpt.get("meta", {}).get("classes")  # two `folder` datasets share a name, not their classes
    if class_names and classes is not None and tuple(classes) != tuple(class_names):
        first = next((i for i, (a, b) in enumerate(zip(classes, class_names)) if a != b),
                     min(len(classes), len(class_names)))
        raise KDZooError(
            f"The teacher {path} was trained on '{trained_on}' data with other classes than this run's "
            f"({len(classes)} vs {len(class_names)} classes, differing from class {first} on), so its outputs do "
            "not mean this run's classes. Train a teacher on this data, or distil on the data the teacher was "
            "trained on.")
    if model is not None and ckpt["model"] != model:
        raise KDZooError(f"The teacher {path} holds a '{ckpt['model']}', not a '{model}'. Name the network it holds "
                         f"('{ckpt['model']}'), or point to the checkpoint of a '{model}'.")
    size = tuple(ckpt.get("meta", {}).get("image_size", (32, 32)))
    net = KDNet(registry.create_model(ckpt["model"], num_classes=ckpt["num_classes"], **ckpt["model_options"]),
                input_size=size)
    try:
        net.model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise KDZooError(
            f"Checkpoint {path} does not match model '{ckpt['model']}' as registered now: "
            f"{str(e).splitlines()[0]} Was it written by a different version of the model's plugin?"
        ) from e
    return net.eval().requires_grad_(False), ckpt


def _load_foreign_teacher(registry: Registry, path: str | Path, format: str, model: str | None,
                          options: dict[str, Any], dataset: str | None, num_classes: int | None,
                          image_size: tuple[int, int]) -> tuple[KDNet, dict[str, Any]]:
    fmt = registry.checkpoint_format(format)
    if not model:
        raise KDZooError(f"A {format} checkpoint does not record its network: name the kdzoo model it was trained as "
                         "(`model:` of the benchmark teacher, or --teacher-model for `kdzoo distill`; `kdzoo models` "
                         "lists them).")
    if num_classes is None:
        raise ValueError("load_teacher(format=...) needs num_classes: a foreign checkpoint does not record it")
    remedies = Remedies(
        missing=f"Check the path of the {format} teacher.",
        recreate="download or copy it again",
        holds=f"A {format} teacher's weights are tensors and plain Python values",
        refused="If the file also stores training state or the run's options as objects, use the file that holds "
                "the weights alone, or save just its state dict from the code that wrote it (`torch.save(ckpt['model'], "
                f"'weights.pt')`) and load that with format {format}.")
    payload = load_payload(path, remedies=remedies)
    if is_kdzoo_checkpoint(payload):
        raise KDZooError(f"{path} is a kdzoo checkpoint (written by `kdzoo train`), not a {format} one. Load it as "
                         f"one: remove `format: {format}` (or --teacher-format {format}).")
    origin = registry.plugin(fmt.plugin)
    try:
        state = fmt.convert(model, payload)
    except KDZooError as e:
        raise KDZooError(f"{path} cannot be read as a {format} '{model}': {e}") from e
    except Exception as e:
        raise KDZooError(f"Checkpoint format '{format}' (plugin '{origin.name}', {origin.dist} {origin.version}) "
                         f"failed to convert {path} into a '{model}': {type(e).__name__}: {e}") from e
    net = registry.create_model(model, num_classes=num_classes, **options)
    _check_converted(net, state, f"{path} ({format} format)", model, dataset, num_classes)
    net.load_state_dict(dict(state))
    teacher = KDNet(net, input_size=image_size)
    meta = {"model": model, "model_options": dict(options), "num_classes": num_classes,
            "meta": {"dataset": dataset, "image_size": list(image_size), "checkpoint_format": format}}
    return teacher.eval().requires_grad_(False), meta


def _classifier_key(net: torch.nn.Module) -> str | None:
    """The state-dict key of the classifier's weight: timm's ``get_classifier()``, else the last ``nn.Linear``."""
    head = net.get_classifier() if callable(getattr(net, "get_classifier", None)) else None
    if not isinstance(head, torch.nn.Linear):
        head = next((m for m in reversed(list(net.modules())) if isinstance(m, torch.nn.Linear)), None)
    name = next((n for n, m in net.named_modules() if m is head), None) if head is not None else None
    return f"{name}.weight" if name is not None else None


def _check_converted(net: torch.nn.Module, state: Any, what: str, model: str, dataset: str | None,
                     num_classes: int) -> None:
    """``state`` has exactly ``net``'s keys and shapes (BatchNorm's ``num_batches_tracked`` may be absent, as in
    files from old PyTorch versions, which ``load_state_dict`` fills in); ``KDZooError`` naming the first key that
    differs otherwise, or the dataset when only the classifier's width does."""
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise KDZooError(f"{what}: the converter returned {type(state).__name__}, not a state dict (a dict of names "
                         "to tensors). This is a bug of the format's plugin.")
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise KDZooError(f"{what}: the converted weights hold a {type(state[bad]).__name__} under '{bad}', not a "
                         "tensor. The file is damaged, or this is a bug of the format's plugin.")
    expected = net.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    head = _classifier_key(net)
    if not missing and not unexpected and head in shapes and state[head].shape[0] != num_classes:
        where = f"'{dataset}'" if dataset else "this run's dataset"
        raise KDZooError(
            f"{what}: its classifier ('{head}') has {state[head].shape[0]} outputs, but {where} has {num_classes} "
            "classes, so the teacher was trained on another dataset. Distil on the dataset it was trained on "
            "(`data: {dataset: ...}` of the benchmark, --dataset of `kdzoo distill`).")
    problems = ([f"'{k}' has shape {tuple(state[k].shape)} in the file but {tuple(expected[k].shape)} in '{model}'"
                 for k in shapes]
                + [f"'{k}' of '{model}' is not in the file" for k in missing]
                + [f"the file's '{k}' has no place in '{model}'" for k in unexpected])
    if problems:
        more = f" (and {len(problems) - 1} more difference{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise KDZooError(
            f"{what} does not fit kdzoo's '{model}': {problems[0]}{more}. A checkpoint fits only the network it was "
            f"trained as: name that network as the teacher's model (is the file a '{model}' at all?).")


def pretrained_teacher(registry: Registry, source: str, model: str, dataset: str) -> Path:
    """The local file of the published weights ``source`` (a checkpoint format whose plugin publishes weights:
    ``pretrained: torchdistill``) of ``model`` trained on ``dataset``, fetched into
    ``$KDZOO_CACHE/pretrained/<source>`` by the plugin when it is not there yet."""
    fmt = registry.checkpoint_format(source)
    if fmt.pretrained is None:
        have = sorted(n for n, f in registry.checkpoint_formats.items() if f.pretrained is not None)
        raise KDZooError(f"Checkpoint format '{source}' publishes no pretrained weights (plugin '{fmt.plugin}'). "
                         f"Pretrained teachers come from: {', '.join(have) or '(none)'}. For a {source} file of your "
                         f"own, give it as the checkpoint with format {source}.")
    folder = cache_dir() / "pretrained" / source
    try:
        path = fmt.pretrained(model, dataset, folder)
    except KDZooError:
        raise
    except Exception as e:
        info = registry.plugin(fmt.plugin)
        raise KDZooError(f"Plugin '{info.name}' ({info.dist} {info.version}) failed to provide the pretrained "
                         f"{source} '{model}' ({dataset}): {type(e).__name__}: {e}") from e
    if not isinstance(path, (str, Path)) or not Path(path).is_file():
        raise KDZooError(f"Plugin '{fmt.plugin}' returned {path!r} for the pretrained {source} '{model}', which is "
                         "not a file. This is a bug of the plugin.")
    return Path(path)
