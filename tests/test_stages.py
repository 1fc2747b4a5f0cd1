"""Init stages in the engine: what they train, their history, resuming inside them, cohorts == solo runs."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kdzoo.checkpoint import load_checkpoint, save_checkpoint
from kdzoo.config import Recipe
from kdzoo.data import prepare_data
from kdzoo.engine import Member, Trainer
from kdzoo.methods import INIT_STAGE_DEFAULTS, Method, feature_parameters
from kdzoo.plugins import load_plugins
from kdzoo.runner import build_method, build_student
from kdzoo_plugins.cifar10 import load_cifar10

RECIPE = Recipe(epochs=2, batch_size=64, lr=0.05, eval_batch_size=500)


class ToyInit(Method):
    """An init stage that regresses the student's last stage onto the teacher's through a connector (trained
    with the student's feature layers), then plain CE."""

    name = "toyinit"
    family = "features"
    needs_features = True
    has_init_stage = True
    defaults = {"w_ce": 1.0, "w_hint": 1.0, **INIT_STAGE_DEFAULTS}

    def __init__(self, student, teacher=None, **hparams):
        super().__init__(student, teacher, **hparams)
        self.connector = nn.Conv2d(student.stage_channels[-1], teacher.stage_channels[-1], 1)

    def init_parameters(self, student):
        return list(self.parameters()) + feature_parameters(student)

    def init_forward(self, student, teacher, labels):
        hint = (self.connector(student.features[-1]).float() - teacher.features[-1].float()).pow(2).mean()
        return {"hint": self.w_hint * hint}

    def forward(self, student, teacher, labels):
        return {"ce": self.w_ce * self.ce(student.logits, labels)}


@pytest.fixture(scope="module")
def registry():
    return load_plugins(strict=True)


@pytest.fixture(scope="module")
def data(cifar_path):
    return prepare_data(load_cifar10(cifar_path), train_size=192, test_size=200, subset_seed=0)


@pytest.fixture(scope="module")
def teacher(registry):
    return build_student(registry, "resnet14", {}, 123, num_classes=10).eval()


def toy_member(registry, teacher, label="toy", seed=0, **hp):
    student = build_student(registry, "resnet8", {}, seed, num_classes=10)
    torch.manual_seed(seed + 1)
    return Member(label, student, ToyInit(student.info, teacher.info, **hp))


def kd_member(registry, teacher, seed=0):
    student = build_student(registry, "resnet8", {}, seed, num_classes=10)
    return Member("kd", student, build_method(registry, "kd", {}, student.info, teacher.info, seed))


def timing_free(history):
    return [{k: v for k, v in r.items() if k not in ("train_img_per_s", "epoch_time_s")} for r in history]


def test_init_epochs_scale_with_the_schedule_or_are_set(teacher):
    info = teacher.info
    assert ToyInit(info, info).num_init_epochs(240) == 30
    assert ToyInit(info, info).num_init_epochs(8) == 1  # never rounded away
    assert ToyInit(info, info, init_epochs=3).num_init_epochs(240) == 3
    assert ToyInit(info, info, init_fraction=0.0).num_init_epochs(240) == 0


def test_the_init_stage_trains_only_its_parameters(registry, data, teacher):
    m = toy_member(registry, teacher, init_epochs=1)
    head = {k: v.clone() for k, v in m.student.model.get_classifier().state_dict().items()}
    body = copy.deepcopy(m.student.state_dict())
    connector = copy.deepcopy(m.method.connector.state_dict())
    trainer = Trainer([m], data, RECIPE, teacher=teacher, seed=0)
    trainer.train_epoch(0)  # the whole init stage
    (record,) = m.history
    assert record["stage"] == "init" and record["epoch"] == 1 and set(record["loss"]) == {"hint"}
    assert "test" not in record  # the init stage is not evaluated
    for k, v in m.student.model.get_classifier().state_dict().items():
        assert torch.equal(v, head[k]), k  # not in init_parameters: exactly unchanged
    changed = [k for k, v in m.student.state_dict().items() if "weight" in k and not torch.equal(v, body[k])]
    assert changed and not any(k.startswith("model.fc") for k in changed)
    assert any(not torch.equal(v, connector[k]) for k, v in m.method.connector.state_dict().items())
    assert not m.optimizer.state  # the main stage's optimiser has not stepped
    assert m.scheduler.last_epoch == 0


def test_history_has_both_stages_and_scores_come_from_the_main_stage(registry, data, teacher):
    m = toy_member(registry, teacher, init_epochs=1)
    (result,) = Trainer([m], data, RECIPE, teacher=teacher, seed=0).fit()
    assert [(r["stage"], r["epoch"]) for r in result["history"]] == [("init", 1), ("main", 1), ("main", 2)]
    assert result["epochs_done"] == 2 and result["init_epochs_done"] == 1
    assert set(result["history"][1]["loss"]) == {"ce"}
    assert result["last"] == result["history"][-1]["test"]
    assert result["best"]["epoch"] in (1, 2)


def test_a_run_stopped_inside_the_init_stage_resumes_to_the_same_result(registry, data, teacher, tmp_path):
    whole = toy_member(registry, teacher, init_epochs=2)
    (expected,) = Trainer([whole], data, RECIPE, teacher=teacher, seed=0).fit()

    first = toy_member(registry, teacher, init_epochs=2)
    trainer = Trainer([first], data, RECIPE, teacher=teacher, seed=0)
    trainer.train_epoch(0)  # then the process dies, inside the init stage
    save_checkpoint(tmp_path / "state.pt", {"trainer": trainer.state_dict(), "epochs_done": 1})

    again = toy_member(registry, teacher, init_epochs=2)
    resumed = Trainer([again], data, RECIPE, teacher=teacher, seed=0)
    state = load_checkpoint(tmp_path / "state.pt")
    resumed.load_state_dict(state["trainer"])
    (got,) = resumed.fit(state["epochs_done"])
    assert timing_free(got["history"]) == timing_free(expected["history"])
    for k, v in whole.student.state_dict().items():
        assert torch.equal(v, again.student.state_dict()[k]), k


def test_a_cohort_mixing_init_stages_equals_the_solo_runs(registry, data, teacher):
    solo = [Trainer([toy_member(registry, teacher, init_epochs=1)], data, RECIPE, teacher=teacher, seed=0).fit()[0],
            Trainer([kd_member(registry, teacher)], data, RECIPE, teacher=teacher, seed=0).fit()[0]]
    cohort = Trainer([toy_member(registry, teacher, init_epochs=1), kd_member(registry, teacher)], data, RECIPE,
                     teacher=teacher, seed=0)
    assert cohort.epochs == 3  # the longest member: 1 init + 2 main epochs
    together = cohort.fit()
    for a, b in zip(solo, together):
        assert timing_free(a["history"]) == timing_free(b["history"])
        assert a["last"] == b["last"]
    assert len(together[1]["history"]) == 2  # kd has no init stage and finishes an epoch earlier


def test_kill_9_inside_an_init_stage_resumes_inside_it(cifar_path, tmp_path):
    """A real benchmark process killed during ab's init stage, rerun: the store equals an uninterrupted run's."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    bench = {"name": "init-stage", "data": {"train_size": 256, "test_size": 200}, "seeds": [0], "cohorts": False,
             "recipe": {"epochs": 1, "batch_size": 64, "lr": 0.05, "eval_batch_size": 200},
             "teacher_recipe": {"epochs": 1}, "teachers": ["resnet14"], "students": ["resnet8"],
             "methods": [{"name": "ab", "init_epochs": 3}]}
    cfg = tmp_path / "b.yaml"
    cfg.write_text(yaml.safe_dump(bench))
    env = {**os.environ, "KDZOO_CACHE": str(tmp_path / "cache"), "KDZOO_DATA": cifar_path}

    def cmd(out):
        return [sys.executable, "-m", "kdzoo.cli", "bench", str(cfg), "--out", str(out)]

    def snapshot(out):
        drop = {"wall_time_s", "img_per_s", "train_img_per_s", "epoch_time_s", "environment"}

        def strip(obj):
            if isinstance(obj, dict):
                return {k: strip(v) for k, v in obj.items() if k not in drop}
            return [strip(v) for v in obj] if isinstance(obj, list) else obj
        return {p.name: strip(json.loads(p.read_text())) for p in sorted((out / "runs").glob("*.json"))}

    subprocess.run(cmd(tmp_path / "ref"), env=env, check=True, capture_output=True)
    reference = snapshot(tmp_path / "ref")
    (ab,) = [r for r in reference.values() if r.get("method") == "ab"]
    assert [h["stage"] for h in ab["history"]] == ["init"] * 3 + ["main"]

    out = tmp_path / "out"
    proc = subprocess.Popen(cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, killed, seen = time.time() + 300, False, 0
    while time.time() < deadline and proc.poll() is None:
        states = list((out / "cohorts").glob("*.pt")) if (out / "cohorts").is_dir() else []
        ce_done = (out / "runs").is_dir() and any(not p.name.startswith("teacher-") for p in (out / "runs").glob("*.json"))
        seen = seen + 1 if states and ce_done else 0
        if seen >= 3:  # the ab cohort saved its first init-stage epoch (not ce's state about to be removed)
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    proc.wait()
    assert killed, "the run finished before the kill point"
    resumed = subprocess.run(cmd(out), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at epoch" in resumed.stderr
    assert snapshot(out) == reference
