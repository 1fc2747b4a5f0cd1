"""Building blocks shared by ``kdzoo train``, ``kdzoo distill`` and the benchmark runner:
students, teachers and methods from names, one run end to end, and its files on disk."""
from __future__ import annotations

import dataclasses
import platform
from pathlib import Path
from typing import Any

import torch
import yaml

import kdzoo
from kdzoo import KDZooError
from kdzoo.checkpoint import atomic_write, ensure_writable_dir, load_checkpoint, save_checkpoint
from kdzoo.config import DataConfig, RunConfig
from kdzoo.data import CifarData, prepare_data, train_batch_sizes, train_set_size
from kdzoo.engine import Member, Progress, Trainer, preflight, resolve_device
from kdzoo.methods import Method
from kdzoo.models import KDNet, NetInfo
from kdzoo.plugins import Registry
from kdzoo.store import write_json

NUM_CLASSES = 10


def build_student(registry: Registry, name: str, options: dict[str, Any], seed: int) -> KDNet:
    """The backbone ``name`` with weights initialised from ``seed`` (same seed ⇒ same weights)."""
    torch.manual_seed(seed)
    return KDNet(registry.create_model(name, num_classes=NUM_CLASSES, **options))


def build_method(
    registry: Registry, name: str, hparams: dict[str, Any], student: NetInfo, teacher: NetInfo | None, seed: int
) -> Method:
    """The method ``name`` for this student/teacher pair; its own parameters are seeded too."""
    cls = registry.method(name)
    torch.manual_seed(seed + 1)
    try:
        return cls(student, teacher, **hparams)
    except KDZooError:
        raise
    except Exception as e:
        raise KDZooError(
            f"Method '{name}' (plugin '{registry.owner[('method', name)]}') could not be built for this "
            f"teacher/student pair: {type(e).__name__}: {e}"
        ) from e


def load_teacher(registry: Registry, path: str | Path) -> tuple[KDNet, dict[str, Any]]:
    """A frozen teacher from a kdzoo checkpoint, and the checkpoint's metadata."""
    ckpt = load_checkpoint(path)
    net = KDNet(registry.create_model(ckpt["model"], num_classes=ckpt["num_classes"], **ckpt["model_options"]))
    try:
        net.model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise KDZooError(
            f"Checkpoint {path} does not match model '{ckpt['model']}' as registered now: "
            f"{str(e).splitlines()[0]} Was it written by a different version of the model's plugin?"
        ) from e
    return net.eval().requires_grad_(False), ckpt


def environment(device: torch.device, recipe: Any = None) -> dict[str, Any]:
    """Versions and hardware of a run; with ``recipe``, the autocast dtype it resolved to."""
    import timm

    from kdzoo.engine import autocast_dtype

    extra = {"autocast": str(autocast_dtype(recipe, device) or "float32")} if recipe is not None else {}
    return {**extra,
        "kdzoo": kdzoo.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
    }


def load_data(d: DataConfig, device: torch.device) -> CifarData:
    """The CIFAR-10 splits a data config describes, on ``device``."""
    return prepare_data(d.source, d.root, d.train_size, d.test_size, d.val_size, d.subset_seed, device=device)


def data_info(data: CifarData) -> dict[str, Any]:
    """What a run record says about its data."""
    return {"fingerprint": data.fingerprint, "train": len(data.train_y), "val": len(data.val_y), "test": len(data.test_y)}


def save_run_checkpoint(path: str | Path, model: str, options: dict[str, Any], student: KDNet, method: Method,
                        result: dict[str, Any], data: CifarData, seed: int, **meta: Any) -> None:
    """The checkpoint of a finished run: the student, the method's state, and what produced them."""
    save_checkpoint(path, {
        "model": model, "model_options": options, "num_classes": NUM_CLASSES,
        "state_dict": student.model.state_dict(), "method": method.name, "hparams": method.hparams,
        "method_state": method.state_dict(),
        "meta": {"top1": result["last"]["top1"], "best_top1": result["best"]["top1"], "seed": seed,
                 "data_fingerprint": data.fingerprint, "kdzoo": kdzoo.__version__, **meta},
    })


def run_single(cfg: RunConfig, registry: Registry, progress: Progress | None = None) -> dict[str, Any]:
    """Train (method ``ce``, no teacher) or distil one student; write checkpoint + metrics under ``cfg.out``."""
    cfg.recipe.validate()
    out = ensure_writable_dir(cfg.out, "--out")
    device = resolve_device(cfg.device)
    method_cls = registry.method(cfg.method)
    teacher, teacher_meta = (None, None)
    if method_cls.needs_teacher:
        if not cfg.teacher:
            raise KDZooError(f"Method '{cfg.method}' distils from a teacher: pass --teacher CHECKPOINT (from `kdzoo train`).")
        teacher, teacher_meta = load_teacher(registry, cfg.teacher)
    student = build_student(registry, cfg.model, cfg.model_options, cfg.seed)
    method = build_method(registry, cfg.method, cfg.hparams, student.info, teacher.info if teacher else None, cfg.seed)
    # Before loading data or training: can this student and method train at the batch sizes the run will see?
    preflight(student, method, teacher, train_batch_sizes(train_set_size(cfg.data.train_size, cfg.data.val_size),
                                                          cfg.recipe.batch_size), model=cfg.model)
    data = load_data(cfg.data, device)
    member = Member(label=f"{cfg.model}/{cfg.method}", student=student, method=method,
                    origin=registry.describe_origin(cfg.method))
    trainer = Trainer([member], data, cfg.recipe, teacher=teacher, seed=cfg.seed, device=device, progress=progress)
    (result,) = trainer.fit()

    result.update(
        model=cfg.model,
        teacher=({"checkpoint": str(cfg.teacher), "model": teacher_meta["model"], "top1": teacher_meta["meta"].get("top1")}
                 if teacher_meta else None),
        data=data_info(data),
        config=dataclasses.asdict(cfg),
        environment=environment(device, cfg.recipe),
    )
    if result["status"] == "ok":
        save_run_checkpoint(out / "checkpoint.pt", cfg.model, cfg.model_options, student, method, result, data, cfg.seed)
    write_json(out / "metrics.json", result)
    atomic_write(out / "config.yaml", lambda tmp: Path(tmp).write_text(yaml.safe_dump(result["config"], sort_keys=False)))
    return result

