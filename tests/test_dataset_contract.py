"""Datasets are plugins: the number of classes, the image size and the normalisation follow the dataset
everywhere (networks, validation, FLOPs, checkpoints, keys), with no dataset known to the core by name."""
from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from kdzoo import KDZooError, hookimpl
from kdzoo import bench as B
from kdzoo.checkpoint import load_checkpoint
from kdzoo.data import DataShape
from kdzoo.datasets import Arrays, Dataset, verified
from kdzoo.plugins import load_plugins
from kdzoo.teachers import load_teacher
from kdzoo.store import Store


class Blobs(Dataset):
    """100 classes of 64x64 images: each class a colour blob at its own place, so networks can learn it."""

    name = "blobs"
    description = "synthetic: 100 classes, 64x64"
    defaults = {"classes": 100, "size": 64}

    def load(self, source: str, root: Path) -> Arrays:
        k, size = self.options["classes"], self.options["size"]
        rng = np.random.default_rng(0)

        def split(n: int) -> tuple[np.ndarray, np.ndarray]:
            y = np.arange(n) % k
            x = rng.integers(0, 60, (n, size, size, 3), dtype=np.uint8)
            for i, c in enumerate(y):
                r, col = divmod(int(c), 10)
                x[i, r * size // 10:(r + 1) * size // 10, col * size // 10:(col + 1) * size // 10, c % 3] = 255
            return x, y.astype(np.int64)

        (x_train, y_train), (x_test, y_test) = split(2 * k), split(k)
        return verified(self.name, {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test},
                        class_names=tuple(f"blob{c}" for c in range(k)), mean=(0.2, 0.2, 0.2), std=(0.3, 0.3, 0.3),
                        source="synthetic", where="blobs", fix="", pad=8)


PLUGIN = types.SimpleNamespace(register_datasets=hookimpl(lambda register: register(Blobs)))


@pytest.fixture
def registry():
    return load_plugins(extra=[("blobs-plugin", PLUGIN)], strict=True)


def test_a_dataset_plugin_is_registered_and_listed(registry):
    assert registry.datasets["blobs"] is Blobs and registry.dataset_owner["blobs"] == "blobs-plugin"
    assert "cifar10" in registry.datasets  # the first-party plugin
    with pytest.raises(KDZooError, match="Unknown dataset 'blob'. Did you mean 'blobs'"):
        registry.dataset("blob")
    with pytest.raises(KDZooError, match="Dataset 'blobs' has no option 'clases'. Did you mean 'classes'"):
        Blobs(clases=3)


@pytest.mark.slow  # trains a teacher and five students
def test_a_100_class_64px_dataset_trains_through_kdzoo_bench_with_every_method(registry, tmp_path, monkeypatch):
    monkeypatch.setenv("KDZOO_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "b.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "blobs", "data": {"dataset": "blobs", "test_size": 100}, "seeds": [0],
        "recipe": {"epochs": 1, "batch_size": 50, "lr": 0.05, "eval_batch_size": 100},
        "teacher_recipe": {"epochs": 2}, "teachers": ["resnet8"], "students": ["wrn_16_1"],
        "methods": ["kd", "fitnets", "attention", "rkd"]}))
    torch.set_num_threads(1)
    plan, data, device = B.prepare(cfg, registry)
    assert (plan.data.dataset, plan.data.num_classes, plan.data.image_size) == ("blobs", 100, (64, 64))
    at_32px = B.validate(B.expand(plan.bench, DataShape("blobs", "x", 100, (32, 32), 200), registry), registry)
    assert 3.9 < plan.flops["wrn_16_1"] / at_32px["wrn_16_1"] < 4.1  # FLOPs are counted at the dataset's 64x64
    outcome = B.run_plan(plan, data, registry, Store(tmp_path / "out"), device)
    assert outcome.failed == [] and outcome.trained == 5
    ckpt = load_checkpoint(plan.teachers[0].checkpoint_path)
    assert ckpt["num_classes"] == 100 and ckpt["meta"]["dataset"] == "blobs" and ckpt["meta"]["image_size"] == [64, 64]
    teacher, _ = load_teacher(registry, plan.teachers[0].checkpoint_path, dataset="blobs")
    assert teacher(torch.zeros(2, 3, 64, 64)).logits.shape == (2, 100)
    records = Store(tmp_path / "out").runs()
    assert {r.data["dataset"] for r in records if r.data} == {"blobs"}
    assert "blobs: 1 student epochs" in Store(tmp_path / "out").bench().budget  # the report's caption names it


def test_a_teacher_from_another_dataset_is_refused_before_training(registry, tmp_path, monkeypatch, cifar_path):
    monkeypatch.setenv("KDZOO_CACHE", str(tmp_path / "cache"))
    from kdzoo.runner import build_method, build_student, save_run_checkpoint
    from kdzoo.data import prepare_data

    data = prepare_data(Blobs().load("auto", tmp_path), train_size=100, test_size=100)
    teacher = build_student(registry, "resnet20", {}, 0, num_classes=data.num_classes, input_size=data.image_size)
    method = build_method(registry, "ce", {}, teacher.info, None, 0)
    ckpt = tmp_path / "blobs-teacher.pt"
    save_run_checkpoint(ckpt, "resnet20", {}, teacher, method, {"last": {"top1": 1.0}, "best": {"top1": 1.0}}, data, 0)
    cfg = tmp_path / "b.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "x", "data": {"train_size": 100, "test_size": 100, "source": cifar_path}, "seeds": [0],
        "recipe": {"epochs": 1, "batch_size": 50}, "teachers": [{"model": "resnet20", "checkpoint": str(ckpt)}],
        "students": ["wrn_16_1"], "methods": ["kd"]}))
    with pytest.raises(KDZooError, match=r"teachers\[0\]: the checkpoint .* was trained on 'blobs', but this "
                                         r"benchmark uses 'cifar10'"):
        B.prepare(cfg, registry)


def test_a_teacher_trained_on_other_classes_of_the_same_dataset_is_refused(registry, tmp_path):
    """Two datasets of one name (two `folder` trees) are told apart by their classes."""
    from kdzoo.data import prepare_data
    from kdzoo.runner import build_method, build_student, save_run_checkpoint

    data = prepare_data(Blobs(classes=10).load("auto", tmp_path), train_size=20, test_size=10)
    teacher = build_student(registry, "resnet8", {}, 0, num_classes=10, input_size=data.image_size)
    ckpt = tmp_path / "t.pt"
    save_run_checkpoint(ckpt, "resnet8", {}, teacher, build_method(registry, "ce", {}, teacher.info, None, 0),
                        {"last": {"top1": 1.0}, "best": {"top1": 1.0}}, data, 0)
    assert load_teacher(registry, ckpt, dataset="blobs", class_names=data.class_names)[1]["num_classes"] == 10
    renamed = tuple(f"other{c}" for c in range(10))
    with pytest.raises(KDZooError, match=r"other classes than this run's \(10 vs 10 classes, differing from class 0"):
        load_teacher(registry, ckpt, dataset="blobs", class_names=renamed)
