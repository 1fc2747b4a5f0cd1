"""Building blocks shared by ``kdzoo train``, ``kdzoo distill`` and the benchmark runner:
students and methods from names, the data, one run end to end, and its files on disk (teachers are
loaded by :mod:`kdzoo.teachers`)."""
from __future__ import annotations

import dataclasses
import platform
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

import kdzoo
from kdzoo import KDZooError, cache_dir
from kdzoo.checkpoint import atomic_write, ensure_writable_dir, save_checkpoint
from kdzoo.config import DataConfig, RunConfig
from kdzoo.data import Data, prepare_data, train_batch_sizes
from kdzoo.datasets import Arrays
from kdzoo.engine import Member, Progress, Trainer, resolve_device
from kdzoo.preflight import preflight
from kdzoo.methods import Method
from kdzoo.models import KDNet, NetInfo
from kdzoo.observers import ObservedProgress, ObserverSet, RunInfo, resolve_observers
from kdzoo.plugins import NATIVE_FORMAT, Registry
from kdzoo.store import write_json
from kdzoo.teachers import load_teacher, pretrained_teacher


def build_student(registry: Registry, name: str, options: dict[str, Any], seed: int, num_classes: int,
                  input_size: tuple[int, int] = (32, 32)) -> KDNet:
    """The backbone ``name`` with weights initialised from ``seed`` (same seed ⇒ same weights), with one
    output per class of the dataset and stage shapes measured at its ``input_size``."""
    torch.manual_seed(seed)
    return KDNet(registry.create_model(name, num_classes=num_classes, **options), input_size=input_size)


def build_method(
    registry: Registry, name: str, hparams: dict[str, Any], student: NetInfo, teacher: NetInfo | None, seed: int,
    *, pair: tuple[str, str] | None = None, teacher_net: KDNet | None = None, train_labels: torch.Tensor | None = None,
) -> Method:
    """The method ``name`` for this student/teacher pair, ready to train; its own parameters are seeded too.

    ``pair`` (teacher and student model names) selects the method's ``pair_defaults``; ``hparams`` (the
    user's) win over them. A method that asks for them gets ``bind_teacher(teacher_net)`` and
    ``bind_train_set(train_labels)`` here, before any training."""
    cls = registry.method(name)
    if pair is not None:
        base = cls.defaults
        hparams = {**{k: v for k, v in cls.resolve_defaults(*pair).items() if base.get(k) != v}, **hparams}
    torch.manual_seed(seed + 1)
    try:
        method = cls(student, teacher, **hparams)
        if cls.needs_teacher_net:
            if teacher_net is None:
                raise ValueError(f"method '{name}' needs the teacher network: pass teacher_net")
            method.bind_teacher(teacher_net)
        if cls.needs_train_labels:
            if train_labels is None:
                raise ValueError(f"method '{name}' needs the training labels: pass train_labels")
            method.bind_train_set(train_labels.cpu())
        return method
    except KDZooError:
        raise
    except Exception as e:
        raise KDZooError(
            f"Method '{name}' (plugin '{registry.owner[('method', name)]}') could not be built for this "
            f"teacher/student pair: {type(e).__name__}: {e}"
        ) from e


def environment(device: torch.device, recipe: Any = None, precision: Any = None) -> dict[str, Any]:
    """Versions and hardware of a run; the autocast dtype it computed in and why (``precision``, a
    ``kdzoo.precision.Precision``, e.g. ``Trainer.precision``; else resolved from ``recipe`` without a probe)."""
    import timm

    from kdzoo.cpu_load import wait_policy
    from kdzoo.precision import choose, cpu_name

    if precision is None and recipe is not None:
        precision = choose(recipe.autocast, device)
    extra = {"autocast": precision.name, "autocast_reason": precision.reason} if precision is not None else {}
    return {**extra,
        "kdzoo": kdzoo.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": wait_policy(),  # the kdzoo command sets PASSIVE (kdzoo/cpu_load.py)
    }


def load_arrays(registry: Registry, d: DataConfig) -> Arrays:
    """The verified splits of the dataset a data config names (from its plugin), on the CPU."""
    dataset = registry.dataset(d.dataset)(**d.options)
    return dataset.load(d.source, Path(d.root).expanduser() if d.root else cache_dir())


def load_data(registry: Registry, d: DataConfig, device: torch.device, arrays: Arrays | None = None) -> Data:
    """The subsets a data config describes, on ``device`` (``arrays``: already loaded with ``load_arrays``)."""
    arrays = arrays if arrays is not None else load_arrays(registry, d)
    return prepare_data(arrays, d.train_size, d.test_size, d.val_size, d.subset_seed, device=device,
                        placement=d.placement)


def data_info(data: Data) -> dict[str, Any]:
    """What a run record says about its data."""
    return {"dataset": data.dataset, "fingerprint": data.fingerprint, "train": len(data.train_y),
            "val": len(data.val_y), "test": len(data.test_y)}


def save_run_checkpoint(path: str | Path, model: str, options: dict[str, Any], student: KDNet, method: Method,
                        result: dict[str, Any], data: Data, seed: int, **meta: Any) -> None:
    """The checkpoint of a finished run: the student, the method's state, and what produced them."""
    save_checkpoint(path, {
        "model": model, "model_options": options, "num_classes": data.num_classes,
        "state_dict": student.model.state_dict(), "method": method.name, "hparams": method.hparams,
        "method_state": method.state_dict(),
        "meta": {"top1": result["last"]["top1"], "best_top1": result["best"]["top1"], "seed": seed,
                 "dataset": data.dataset, "classes": list(data.class_names), "image_size": list(data.image_size), "data_fingerprint": data.fingerprint,
                 "kdzoo": kdzoo.__version__, **meta},
    })


def run_single(cfg: RunConfig, registry: Registry, progress: Progress | None = None,
               report: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train (method ``ce``, no teacher) or distil one student; write checkpoint + metrics under ``cfg.out``.

    The observers of ``cfg.loggers`` (:mod:`kdzoo.observers`) are checked before anything is loaded, then
    follow the run; one that fails is reported through ``report`` (default: a Python warning) and dropped."""
    cfg.recipe.validate()
    specs = resolve_observers(registry, cfg.loggers)
    out = ensure_writable_dir(cfg.out, "--out")
    device = resolve_device(cfg.device)
    method_cls = registry.method(cfg.method)
    teacher, teacher_meta = (None, None)
    arrays = load_arrays(registry, cfg.data)
    teacher_path, teacher_format = cfg.teacher, cfg.teacher_format
    if method_cls.needs_teacher:
        if cfg.teacher_pretrained:
            if cfg.teacher:
                raise KDZooError(f"Give the teacher either as a file (--teacher {cfg.teacher}) or as published weights "
                                 f"(--teacher-pretrained {cfg.teacher_pretrained}), not both.")
            if not cfg.teacher_model:
                raise KDZooError(f"--teacher-pretrained {cfg.teacher_pretrained} needs the network: pass --teacher-model "
                                 "NAME (e.g. resnet56).")
            if cfg.teacher_format not in (NATIVE_FORMAT, cfg.teacher_pretrained):
                raise KDZooError(f"--teacher-pretrained {cfg.teacher_pretrained} weights are in {cfg.teacher_pretrained} "
                                 f"format, not {cfg.teacher_format}: drop --teacher-format.")
            teacher_path = str(pretrained_teacher(registry, cfg.teacher_pretrained, cfg.teacher_model, arrays.dataset))
            teacher_format = cfg.teacher_pretrained
        elif not cfg.teacher:
            raise KDZooError(f"Method '{cfg.method}' distils from a teacher: pass --teacher CHECKPOINT (from `kdzoo train`).")
        teacher, teacher_meta = load_teacher(registry, teacher_path, dataset=arrays.dataset, format=teacher_format,
                                             model=cfg.teacher_model, num_classes=arrays.num_classes,
                                             image_size=arrays.image_size, class_names=arrays.class_names)
    student = build_student(registry, cfg.model, cfg.model_options, cfg.seed, arrays.num_classes, arrays.image_size)
    data = load_data(registry, cfg.data, device, arrays)
    method = build_method(registry, cfg.method, cfg.hparams, student.info, teacher.info if teacher else None, cfg.seed,
                          pair=(teacher_meta["model"], cfg.model) if teacher_meta else None, teacher_net=teacher,
                          train_labels=data.train_y)
    # Before training: can this student and method train at the batch sizes the run will see?
    preflight(student, method, teacher, train_batch_sizes(len(data.train_y), cfg.recipe.batch_size), model=cfg.model,
              input_size=arrays.image_size)
    member = Member(label=f"{cfg.model}/{cfg.method}", student=student, method=method,
                    origin=registry.describe_origin(cfg.method))
    observed = ObservedProgress(progress, {member.label: ObserverSet(specs, RunInfo(
        run_id=out.resolve().name, name=out.resolve().name, method=cfg.method, hparams=dict(method.hparams),
        student=cfg.model, teacher=teacher_meta["model"] if teacher_meta else None, seed=cfg.seed, folder=out,
        results_dir=out.resolve().parent, config=dataclasses.asdict(cfg)), report)}) if specs else None
    trainer = Trainer([member], data, cfg.recipe, teacher=teacher, seed=cfg.seed, device=device,
                      progress=observed or progress)
    try:
        (result,) = trainer.fit()
        result.update(
            model=cfg.model,
            teacher=({"checkpoint": str(teacher_path), "model": teacher_meta["model"],
                      "top1": teacher_meta["meta"].get("top1"),  # as its checkpoint records it (None if foreign)
                      "top1_measured": trainer.teacher_top1("test"),  # on this run's test split
                      **({"format": teacher_format} if teacher_format != NATIVE_FORMAT else {})}
                     if teacher_meta else None),
            data=data_info(data),
            config=dataclasses.asdict(cfg),
            environment=environment(device, precision=trainer.precision),
        )
        written = [out / "metrics.json", out / "config.yaml"]
        if result["status"] == "ok":
            save_run_checkpoint(out / "checkpoint.pt", cfg.model, cfg.model_options, student, method, result, data,
                                cfg.seed)
            written.insert(0, out / "checkpoint.pt")
        write_json(out / "metrics.json", result)
        atomic_write(out / "config.yaml",
                     lambda tmp: Path(tmp).write_text(yaml.safe_dump(result["config"], sort_keys=False)))
    except BaseException as e:  # the observers learn that the run stopped, then the error goes on
        if observed is not None:
            observed.end_all(e)
        raise
    if observed is not None:
        (observers,) = observed.runs.values()
        for path in written:
            observers.artifact(path)
        observers.end(result)
    return result

