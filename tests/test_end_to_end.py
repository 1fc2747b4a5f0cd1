"""Real CIFAR-10, real CLI: train a tiny teacher, distil a student with each of the four methods."""
from __future__ import annotations

import json
import math

import pytest

from kdzoo.checkpoint import load_checkpoint
from kdzoo.cli import main

DATA = ["--train-size", "4000", "--test-size", "1000", "--batch-size", "100"]


@pytest.fixture(scope="module")
def teacher(cifar_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    assert main(["train", "--model", "resnet20", "--epochs", "3", "--lr", "0.1", "--data", cifar_path,
                 "--out", str(out), *DATA]) == 0
    return out


def test_teacher_learns(teacher):
    metrics = json.loads((teacher / "metrics.json").read_text())
    assert metrics["status"] == "ok" and len(metrics["history"]) == 3
    assert metrics["last"]["top1"] > 30.0  # chance is 10%
    assert metrics["best"]["top1"] >= metrics["last"]["top1"]
    assert metrics["data"]["train"] == 4000 and metrics["data"]["test"] == 1000
    env = metrics["environment"]  # the dtype it computed in, and why
    assert env["autocast"] in ("float32", "bfloat16") and env["autocast_reason"]
    ckpt = load_checkpoint(teacher / "checkpoint.pt")
    assert ckpt["model"] == "resnet20" and ckpt["meta"]["top1"] == metrics["last"]["top1"]


@pytest.mark.parametrize("method, terms", [("kd", {"ce", "kd"}), ("fitnets", {"ce", "hint"}),
                                           ("attention", {"ce", "at"}), ("rkd", {"ce", "dist", "angle"})])
def test_distil_each_method(teacher, cifar_path, tmp_path, method, terms):
    out = tmp_path / method
    assert main(["distill", "--teacher", str(teacher / "checkpoint.pt"), "--student", "wrn_16_1",
                 "--method", method, "--epochs", "2", "--lr", "0.1", "--data", cifar_path, "--out", str(out), *DATA]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "ok" and m["method"] == method
    assert m["last"]["top1"] > 25.0, m["last"]
    for record in m["history"]:
        assert set(record["loss"]) == terms and all(math.isfinite(v) for v in record["loss"].values())
        assert 0.0 < record["test"]["agreement"] <= 100.0
    ckpt = load_checkpoint(out / "checkpoint.pt")
    if method == "fitnets":  # the regressor is saved with the student
        assert any(k.startswith("regressor.") for k in ckpt["method_state"])


def test_cli_errors_are_one_paragraph(teacher, cifar_path, tmp_path, capsys):
    assert main(["distill", "--teacher", str(teacher / "checkpoint.pt"), "--student", "wrn_16_1",
                 "--method", "kdd", "--data", cifar_path]) == 2
    err = capsys.readouterr().err
    assert "Unknown method 'kdd'" in err and "Did you mean 'kd'" in err and "Traceback" not in err
    broken = tmp_path / "broken.pt"
    broken.write_bytes((teacher / "checkpoint.pt").read_bytes()[:5000])
    assert main(["distill", "--teacher", str(broken), "--student", "wrn_16_1", "--data", cifar_path]) == 2
    assert "truncated, corrupt" in capsys.readouterr().err
    assert main(["train", "--model", "resnet20", "--data", str(tmp_path / "none.npz")]) == 2
    assert "KDZOO_DATA" in capsys.readouterr().err
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: resnet20\nrecipe:\n  epoch: 3\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "Unknown key 'recipe.epoch'. Did you mean 'epochs'" in capsys.readouterr().err
