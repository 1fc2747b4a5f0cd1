"""The engine: schedules, metrics, determinism, cohort == solo, non-finite stops, checkpoints."""
from __future__ import annotations

import math
import re

import pytest
import torch

from kdzoo import KDZooError
from kdzoo.checkpoint import load_checkpoint, save_checkpoint
from kdzoo.config import Recipe
from kdzoo.data import prepare_data
from kdzoo_plugins.cifar10 import load_cifar10
from kdzoo.engine import Member, Trainer, lr_factor
from kdzoo.methods import Method
from kdzoo.metrics import classification_metrics
from kdzoo.plugins import load_plugins
from kdzoo.runner import build_method, build_student

TINY = Recipe(epochs=2, batch_size=64, lr=0.05, eval_batch_size=500)


@pytest.fixture(scope="module")
def registry():
    return load_plugins(strict=True)


@pytest.fixture(scope="module")
def tiny_data(cifar_path):
    return prepare_data(load_cifar10(cifar_path), train_size=256, test_size=200, subset_seed=0)


def timing_free(history):
    drop = {"train_img_per_s", "epoch_time_s"}
    return [{k: v for k, v in r.items() if k not in drop} for r in history]


def test_schedules():
    f = lr_factor(Recipe(epochs=10, schedule="cosine"), steps_per_epoch=10)
    assert f(0) == 1.0 and f(50) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    f = lr_factor(Recipe(epochs=10, schedule="multistep", milestones=[5, 8], gamma=0.1), 10)
    assert [f(49), f(50), f(79), f(80)] == pytest.approx([1.0, 0.1, 0.1, 0.01])
    f = lr_factor(Recipe(epochs=10, schedule="cosine", warmup_epochs=1), 10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    f = lr_factor(Recipe(epochs=4, schedule="onecycle"), 10)
    assert f(0) == pytest.approx(0.04) and f(10) == pytest.approx(1.0) and f(40) == pytest.approx(0.0)
    assert lr_factor(Recipe(schedule="constant"), 10)(123) == 1.0


def test_metrics_against_hand_computation():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 0])
    logits = torch.nn.functional.one_hot(pred, 3).float()
    m = classification_metrics(logits, labels, teacher_pred=torch.tensor([0, 0, 1, 1, 2, 2]))
    # class 0: tp 1, predicted 2, true 2; class 1: tp 2, predicted 3, true 2; class 2: tp 1, predicted 1, true 2
    precision = [1 / 2, 2 / 3, 1 / 1]
    recall = [1 / 2, 2 / 2, 1 / 2]
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall)]
    assert m["top1"] == pytest.approx(100 * 4 / 6)
    assert m["precision"] == pytest.approx(100 * sum(precision) / 3)
    assert m["recall"] == pytest.approx(100 * sum(recall) / 3)
    assert m["f1"] == pytest.approx(100 * sum(f1) / 3)
    assert m["agreement"] == pytest.approx(100 * 4 / 6)
    assert m["top5"] == 100.0  # only 3 classes: top-k clamps to 3


def _member(registry, label, model, method, seed, teacher=None, **hp):
    student = build_student(registry, model, {}, seed, num_classes=10)
    return Member(label, student, build_method(registry, method, hp, student.info, teacher.info if teacher else None, seed))


def _teacher(registry):
    torch.manual_seed(123)
    return build_student(registry, "resnet20", {}, 123, num_classes=10)  # an untrained but fixed teacher suffices here


def test_same_seed_same_numbers(registry, tiny_data):
    runs = []
    for _ in range(2):
        m = _member(registry, "ce", "resnet20", "ce", seed=3)
        runs.append(Trainer([m], tiny_data, TINY, seed=3).fit()[0])
    assert timing_free(runs[0]["history"]) == timing_free(runs[1]["history"])
    m = _member(registry, "ce", "resnet20", "ce", seed=4)
    other = Trainer([m], tiny_data, TINY, seed=4).fit()[0]
    assert timing_free(other["history"]) != timing_free(runs[0]["history"])


def test_cohort_member_equals_solo_bit_for_bit(registry, tiny_data):
    teacher = _teacher(registry)
    methods = ["ce", "kd", "fitnets", "attention", "rkd"]
    recipe = Recipe(epochs=1, batch_size=64, lr=0.05, eval_batch_size=500)
    cohort = Trainer([_member(registry, m, "wrn_16_1", m, 7, teacher) for m in methods], tiny_data, recipe,
                     teacher=teacher, seed=7).fit()
    for name, together in zip(methods, cohort):
        alone = Trainer([_member(registry, name, "wrn_16_1", name, 7, teacher)], tiny_data, recipe,
                        teacher=teacher, seed=7).fit()[0]
        assert together["status"] == alone["status"] == "ok"
        assert timing_free(together["history"]) == timing_free(alone["history"]), name


def test_a_cohort_of_several_students_equals_the_solo_runs_with_one_teacher_pass(registry, tiny_data):
    """Students of one teacher share a cohort: the teacher runs once per batch, each run equals its solo run."""
    teacher = _teacher(registry)
    cells = [("wrn_16_1", "kd"), ("resnet8", "kd"), ("resnet8", "attention"), ("wrn_16_1", "ce")]
    recipe = Recipe(epochs=1, batch_size=64, lr=0.05, eval_batch_size=500)
    members = [_member(registry, f"{s}/{m}", s, m, 7, teacher) for s, m in cells]
    trainer = Trainer(members, tiny_data, recipe, teacher=teacher, seed=7)
    passes, training = [], []  # teacher forwards while training (evaluation predicts with it too)
    hook = teacher.register_forward_hook(lambda *_: passes.append(1) if training else None)
    shared = trainer._teacher_outputs

    def counted(*args):
        training.append(1)
        try:
            return shared(*args)
        finally:
            training.pop()

    trainer._teacher_outputs = counted
    together = trainer.fit()
    hook.remove()
    assert len(passes) == trainer.steps_per_epoch  # one per batch, not one per student
    for (s, m), result in zip(cells, together):
        alone = Trainer([_member(registry, m, s, m, 7, teacher)], tiny_data, recipe, teacher=teacher, seed=7).fit()[0]
        assert result["status"] == alone["status"] == "ok"
        assert timing_free(result["history"]) == timing_free(alone["history"]), (s, m)


def test_a_stopped_member_trains_no_further_and_the_rest_are_unchanged(registry, tiny_data, tmp_path):
    """Trainer.stop (a search pruning a trial): the member keeps its history, is not a failure, and the
    others equal their solo runs bit for bit; the stop survives a save and resume."""
    teacher = _teacher(registry)
    recipe = Recipe(epochs=3, batch_size=64, lr=0.05, eval_batch_size=500)
    members = [_member(registry, m, "resnet8", m, 7, teacher) for m in ("kd", "attention")]
    trainer = Trainer(members, tiny_data, recipe, teacher=teacher, seed=7)
    state = tmp_path / "state.pt"

    def on_epoch(done):
        if done == 1:
            trainer.stop(members[0], "pruned")
            save_checkpoint(state, trainer.state_dict())

    stopped, other = trainer.fit(on_epoch=on_epoch)
    assert stopped["status"] == "ok" and stopped["error"] is None and stopped["stopped"] == "pruned"
    assert stopped["epochs_done"] == 1 and len(stopped["history"]) == 1
    alone = Trainer([_member(registry, "attention", "resnet8", "attention", 7, teacher)], tiny_data, recipe,
                    teacher=teacher, seed=7).fit()[0]
    assert other["stopped"] is None and other["epochs_done"] == 3
    assert timing_free(other["history"]) == timing_free(alone["history"])
    kd_alone = Trainer([_member(registry, "kd", "resnet8", "kd", 7, teacher)], tiny_data, recipe, teacher=teacher,
                       seed=7).fit()[0]
    assert timing_free(stopped["history"]) == timing_free(kd_alone["history"][:1])  # up to its stop, as alone
    resumed = Trainer([_member(registry, m, "resnet8", m, 7, teacher) for m in ("kd", "attention")], tiny_data,
                      recipe, teacher=teacher, seed=7)
    resumed.load_state_dict(load_checkpoint(state))
    again = resumed.fit(start_epoch=1)
    assert again[0]["stopped"] == "pruned" and again[0]["epochs_done"] == 1
    assert timing_free(again[1]["history"]) == timing_free(alone["history"])


def test_cohort_equals_solo_with_dropout(registry, tiny_data):
    """Dropout draws random numbers: each member keeps its own RNG stream, so cohort == solo still."""
    recipe = Recipe(epochs=1, batch_size=64, lr=0.05, eval_batch_size=500)

    def member(label):
        student = build_student(registry, "wrn_16_1", {"drop_rate": 0.3}, 5, num_classes=10)
        return Member(label, student, build_method(registry, "ce", {}, student.info, None, 5))

    cohort = Trainer([member("a"), member("b")], tiny_data, recipe, seed=5).fit()
    alone = Trainer([member("b")], tiny_data, recipe, seed=5).fit()[0]
    assert timing_free(cohort[0]["history"]) == timing_free(cohort[1]["history"]) == timing_free(alone["history"])


class ExplodingMethod(Method):
    name = "explode"
    needs_teacher = False
    defaults = {"w_ce": 1.0, "at_step": 2}

    def forward(self, student, teacher, labels):
        self.calls = getattr(self, "calls", 0) + 1
        ce = self.ce(student.logits, labels)
        return {"ce": ce * (math.inf if self.calls > self.at_step else 1.0)}


class RaisingMethod(ExplodingMethod):
    name = "raising"

    def forward(self, student, teacher, labels):
        raise ValueError("plugin bug")


def test_non_finite_loss_stops_the_member_and_not_the_cohort(registry, tiny_data):
    student = build_student(registry, "resnet20", {}, 0, num_classes=10)
    bad = Member("bad", student, ExplodingMethod(student.info))
    student2 = build_student(registry, "resnet20", {}, 0, num_classes=10)
    buggy = Member("buggy", student2, RaisingMethod(student2.info))
    good = _member(registry, "good", "resnet20", "ce", 0)
    results = Trainer([bad, buggy, good], tiny_data, TINY, seed=0).fit()
    assert results[0]["status"] == "failed" and "non-finite" in results[0]["error"]
    assert "epoch 1, step 3" in results[0]["error"] and "ce" in results[0]["error"]
    assert results[0]["epochs_done"] == 0
    assert results[1]["status"] == "failed" and "raising" in results[1]["error"] and "plugin bug" in results[1]["error"]
    assert results[2]["status"] == "ok" and results[2]["epochs_done"] == 2


class NotATensor:  # an arbitrary pickled object: weights_only=True must refuse to load it
    pass


def test_checkpoint_roundtrip_and_bad_files(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"model": "resnet20", "state_dict": {"w": torch.arange(3.0)}, "meta": {"top1": 12.5}})
    ckpt = load_checkpoint(path)
    assert ckpt["model"] == "resnet20" and torch.equal(ckpt["state_dict"]["w"], torch.arange(3.0))
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temp file
    truncated = tmp_path / "t.pt"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(KDZooError, match="truncated, corrupt"):
        load_checkpoint(truncated)
    foreign = tmp_path / "f.pt"
    torch.save({"weights": torch.zeros(1)}, foreign)
    with pytest.raises(KDZooError, match="not a kdzoo checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(KDZooError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    evil = tmp_path / "evil.pt"
    torch.save({"format": "kdzoo.checkpoint/1", "x": NotATensor()}, evil)
    with pytest.raises(KDZooError, match="code or objects that kdzoo will not load: .*NotATensor"):
        load_checkpoint(evil)


class Payload:  # unpickling this runs a shell command: kdzoo must refuse it without running it
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_checkpoint_with_a_code_payload_is_refused_naming_it(tmp_path):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "kdzoo.checkpoint/1", "model": "resnet20", "x": Payload(marker)}, evil)
    with pytest.raises(KDZooError) as e:
        load_checkpoint(evil)
    msg = str(e.value)
    assert not marker.exists()  # the payload never ran
    assert re.search(r"contains code or objects that kdzoo will not load: (posix|nt)\.system \(os\.system\)", msg)
    assert "weights_only" not in msg and "will likely succeed" not in msg and "add_safe_globals" not in msg


def test_preflight_leaves_no_trace_and_names_a_batch_too_small(registry):
    from kdzoo.preflight import preflight

    student = build_student(registry, "resnet18", {}, 0, num_classes=10)  # an ImageNet net: 1x1 maps at 32x32
    method = build_method(registry, "ce", {}, student.info, None, 0)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    rng = torch.get_rng_state()
    with pytest.raises(KDZooError, match=r"^Batch size too small for model 'resnet18': a training batch of 1 image "
                                         r"reaches a BatchNorm layer.*at least 2"):
        preflight(student, method, None, [1], model="resnet18")
    preflight(student, method, None, [128], model="resnet18")
    after = student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics restored
    assert torch.equal(rng, torch.get_rng_state()) and student.training
    assert all(p.grad is None for p in student.parameters())


def test_run_single_refuses_a_batch_too_small_before_training(registry, tmp_path, monkeypatch, cifar_path):
    from kdzoo.config import DataConfig, RunConfig
    from kdzoo.runner import run_single

    # the dataset is read first (the network's number of classes and image size come from it), then the check
    cfg = RunConfig(model="resnet18", recipe=Recipe(batch_size=1), out=str(tmp_path / "out"),
                    data=DataConfig(source=cifar_path))
    with pytest.raises(KDZooError, match="Batch size too small for model 'resnet18'"):
        run_single(cfg, registry)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_validation_split_chooses_the_best_epoch(registry, cifar_path):
    data = prepare_data(load_cifar10(cifar_path), train_size=256, test_size=200, val_size=100, subset_seed=0)
    m = _member(registry, "ce", "wrn_16_1", "ce", seed=1)
    result = Trainer([m], data, Recipe(epochs=3, batch_size=64, lr=0.05, eval_batch_size=500), seed=1).fit()[0]
    history = result["history"]
    assert all({"test", "val"} <= set(r) for r in history)
    best = max(history, key=lambda r: r["val"]["top1"])  # chosen on val, reported on test
    assert result["best"]["chosen_on"] == "val" and result["best"]["epoch"] == best["epoch"]
    assert result["best"]["top1"] == best["test"]["top1"]
    assert result["last"] == history[-1]["test"]
