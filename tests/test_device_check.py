"""The GPU check's CPU side: benchmarks/device-check.sh parses and runs its smoke mode, the data
travels in parts and comes back bit-exact, the 94% recipe validates, and the helpers compute
what they say. No GPU and (except where ``cifar_path`` says so) no CIFAR-10 needed."""
from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kdzoo.config import RunConfig, parse, read_yaml
from kdzoo.plugins import load_plugins

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def script(name: str) -> dict:
    return runpy.run_path(str(BENCH / name), run_name=name.removesuffix(".py"))


def test_device_check_script_parses_and_documents_its_calls():
    sh = BENCH / "device-check.sh"
    assert subprocess.run(["bash", "-n", str(sh)]).returncode == 0
    assert subprocess.run(["bash", "-n", str(BENCH / "prepare-device.sh")]).returncode == 0
    text = sh.read_text()
    for needed in ("set -uo pipefail", "PYTHONUNBUFFERED=1", "timeout -s INT", 'carry=[".whl", ".data/a"]',
                   'carry=[".whl", ".data/b"]', "--dry"):
        assert needed in text, needed
    help_text = subprocess.run(["bash", str(sh), "--help"], capture_output=True, text=True, timeout=30)
    assert help_text.returncode == 0 and "pytest -m cuda" in help_text.stdout
    bad = subprocess.run(["bash", str(sh), "--steps", "nope"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown step 'nope'" in bad.stderr


@pytest.mark.slow  # runs the whole script's data-free steps on the CPU
def test_device_check_dry_run_of_its_data_free_steps(tmp_path):
    """The smoke mode runs end to end (here: pytest -m cuda, all skipped on a CPU) and leaves its files in $OUT."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "KDZOO_CHECK_WORK": str(tmp_path / "work"),
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "KDZOO_DATA": str(tmp_path / "none.npz")}
    proc = subprocess.run(["bash", str(BENCH / "device-check.sh"), "--dry", "--steps", "pytest"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["bench.md", "log.txt", "pytest-cuda.xml", "summary.md"]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| pytest | ok |" in summary and "pytest -m cuda**: " in summary


def test_data_travels_in_parts_and_comes_back_bit_exact(tmp_path):
    dd = script("device_data.py")
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8),
              "y_train": rng.integers(0, 10, 40), "class_names": np.array(["a", "b"])}
    src = tmp_path / "src.npz"
    np.savez_compressed(src, **arrays)
    dest = tmp_path / ".data"
    parts = dd["pack"](str(src), dest, parts=2, verify=False)
    assert [p.parent.name for p in parts] == ["a", "b"]
    assert abs(parts[0].stat().st_size - parts[1].stat().st_size) <= 1

    moved = tmp_path / "elsewhere"  # part b not (yet) there: a clear refusal, nothing written
    (moved / "a").mkdir(parents=True)
    for f in (dest / "a").iterdir():
        (moved / "a" / f.name).write_bytes(f.read_bytes())
    ok, message = dd["unpack"](moved)
    assert not ok and "parts b of 2 are missing" in message and not (moved / "cifar10.npz").exists()

    ok, message = dd["unpack"](dest)
    assert ok, message
    with np.load(dest / "cifar10.npz", allow_pickle=False) as f:
        assert set(f.files) == set(arrays)
        for k, v in arrays.items():
            assert np.array_equal(f[k], v), k
    assert dd["unpack"](dest)[0]  # already there

    part = parts[1]
    part.write_bytes(part.read_bytes()[:-1] + bytes([part.read_bytes()[-1] ^ 1]))  # one flipped bit
    (dest / "cifar10.npz").unlink()
    ok, message = dd["unpack"](dest)
    assert not ok and "corrupt" in message and not (dest / "cifar10.npz").exists()


def test_teacher94_recipe_validates_and_names_a_registered_model():
    cfg = parse(RunConfig, read_yaml(BENCH / "configs" / "teacher94.yaml"))
    cfg.recipe.validate()
    assert cfg.model in load_plugins().models and cfg.model_options == {"cifar_stem": True}
    assert (cfg.recipe.batch_size, cfg.recipe.epochs, cfg.recipe.schedule) == (512, 35, "onecycle")
    assert cfg.data.train_size is None and cfg.data.test_size is None  # the whole training and test sets


def test_time_to_target_and_the_comparison():
    t94 = script("teacher94.py")
    metrics = {"status": "ok", "history": [
        {"epoch": 1, "epoch_time_s": 2.0, "test": {"top1": 90.0}},
        {"epoch": 2, "epoch_time_s": 1.0, "test": {"top1": 94.2}},
        {"epoch": 3, "epoch_time_s": 1.0, "test": {"top1": 93.9}},
    ], "last": {"top1": 93.9}, "best": {"top1": 94.2}, "environment": {"device": "GPU", "autocast": "torch.bfloat16"}}
    k = {**t94["summarise_kdzoo"](metrics, 94.0), "wall_s": 9.0}
    assert k["reached"] == {"epoch": 2, "train_s": 3.0} and k["train_s"] == 4.0 and k["epochs"] == 3
    both = t94["compare"]({"status": "ok", "mean_total_s": 1.5}, k)
    assert both["ratio"] == pytest.approx(2.0) and both["met"]
    assert t94["compare"]({"status": "skipped", "reason": "no GPU"}, k)["ratio"] is None
    never = t94["summarise_kdzoo"]({**metrics, "history": metrics["history"][:1]}, 94.0)
    assert never["reached"] is None


def test_airbench_data_layout(cifar_path, tmp_path):
    """airbench's loader reads cifar10/{train,test}.pt: uint8 NHWC images, int64 labels, class names."""
    import torch

    folder = script("teacher94.py")["airbench_data"](tmp_path, cifar_path)
    train = torch.load(folder / "train.pt", weights_only=True)
    test = torch.load(folder / "test.pt", weights_only=True)
    assert train["images"].shape == (50000, 32, 32, 3) and train["images"].dtype == torch.uint8
    assert test["images"].shape == (10000, 32, 32, 3) and test["labels"].dtype == torch.int64
    assert train["labels"][:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3] and len(train["classes"]) == 10


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap's fallback for BatchNorm's statistics
def test_cohort_options_run_on_cpu(tmp_path, one_thread):
    result = script("cohort_gpu.py")["main"](["--device", "cpu", "--members", "2", "--batch-size", "2", "--steps", "1",
                                              "--warmup", "1", "--json", str(tmp_path / "c.json")])
    assert set(result["rates"]) == {"engine", "sequential", "stacked", "batch4x"} and not result["errors"]
    assert all(v > 0 for v in result["rates"].values())
    assert result["ops"]["member_step"] > result["ops"]["teacher_forward"] > 0
    assert result["stacked_vs_sequential_max_abs_diff"] == 0.0  # on the CPU, stacking gives the same logits
    assert (tmp_path / "c.json").is_file()


def test_throughput_takes_the_anchor_worker_candidates(cifar_path, monkeypatch, tmp_path, one_thread):
    """The device check gives the anchors the workers a many-core GPU host affords (--anchor-workers)."""
    from kdzoo import KDZooError

    monkeypatch.setenv("KDZOO_DATA", cifar_path)
    main = script("throughput.py")["main"]
    result = main(["--quick", "--only", "P4", "--anchor-workers", "0", "--json", str(tmp_path / "t.json")])
    assert result["settings"]["anchor_workers"] == (0,)
    assert set(result["extra"]["data_path_dataloader"]) == {"num_workers=0"}
    with pytest.raises(KDZooError, match="--anchor-workers"):
        main(["--quick", "--anchor-workers", "4,x"])
