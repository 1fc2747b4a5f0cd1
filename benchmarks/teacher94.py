"""Time to 94% on CIFAR-10: kdzoo's plain-ResNet teacher recipe against airbench, on one GPU.

    python benchmarks/teacher94.py airbench --runs 2 --json airbench.json
    python benchmarks/teacher94.py kdzoo --config benchmarks/configs/teacher94.yaml --json kdzoo.json [-- KDZOO TRAIN ARGS]
    python benchmarks/teacher94.py compare airbench.json kdzoo.json [--json both.json]

``airbench`` runs the ``airbench`` package from PyPI (Keller Jordan's airbench94: 94.01% mean
accuracy with test-time augmentation in 3.83 s on an A100), installed separately (see
``benchmarks/prepare-device.sh``): one warm-up run as its README prescribes, then ``--runs``
timed runs. Its data comes from ``$KDZOO_DATA`` (verified), written in the layout its loader reads
(``cifar10/train.pt``, ``cifar10/test.pt``) under ``--workdir``, so nothing is downloaded.
Timed like airbench times itself: training (whitening init included) plus the TTA evaluation,
with the data already on the GPU; reported with and without TTA.

``kdzoo`` runs ``kdzoo train --config ...`` in a subprocess, as a user would, and reads its
``metrics.json``: the time to the target is the engine's training time (``epoch_time_s``, the
per-epoch evaluation excluded) summed up to the first epoch whose test top-1 reaches it. The
command's wall time (start-up, data verification, evaluation included) is reported too. kdzoo
gets no warm-up run: its first epoch includes CUDA's start-up costs.

``compare`` prints both and the ratio against the goal (kdzoo within 2x of airbench).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TARGET = 94.0
GOAL_RATIO = 2.0


def _write(path: str | None, result: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1))


def airbench_data(workdir: Path, source: str) -> Path:
    """Write verified CIFAR-10 as airbench's loader stores it: ``cifar10/{train,test}.pt`` holding
    uint8 NHWC ``images``, int64 ``labels`` and ``classes``. Returns the ``cifar10`` folder."""
    import numpy as np
    import torch

    from kdzoo_plugins.cifar10 import load_cifar10

    raw = load_cifar10(source)
    folder = workdir / "cifar10"
    folder.mkdir(parents=True, exist_ok=True)
    for split, x, y in (("train", raw.x_train, raw.y_train), ("test", raw.x_test, raw.y_test)):
        torch.save({"images": torch.from_numpy(np.array(x)), "labels": torch.from_numpy(np.array(y)),
                    "classes": list(raw.class_names)}, folder / f"{split}.pt")
    return folder


def run_airbench(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    workdir = Path(args.workdir).resolve()
    t0 = time.perf_counter()
    airbench_data(workdir, args.data)
    result: dict[str, Any] = {"tool": "airbench", "data_prep_s": time.perf_counter() - t0, "runs": []}
    try:
        import airbench
        from airbench import lib_airbench94
    except ImportError as e:
        return {**result, "status": "skipped", "reason": f"airbench is not installed ({e}); see benchmarks/prepare-device.sh"}
    result["version"] = getattr(airbench, "__version__", None) or _dist_version("airbench")
    if not torch.cuda.is_available():
        return {**result, "status": "skipped", "reason": "airbench needs a CUDA GPU (its networks are built with .cuda())"}
    result["device"] = torch.cuda.get_device_name(0)
    os.chdir(workdir)  # airbench reads ./cifar10
    hyp = lib_airbench94.hyp
    train_loader = airbench.CifarLoader("cifar10", train=True, batch_size=hyp["opt"]["batch_size"],
                                        aug=hyp["aug"], altflip=True)
    test_loader = airbench.CifarLoader("cifar10", train=False, batch_size=2000)
    airbench.warmup94(train_loader=train_loader)  # its README's warm-up: compiles kernels, tunes cuDNN
    for run in range(args.runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model = airbench.train94(train_loader=train_loader, verbose=False)
        torch.cuda.synchronize()
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        top1_tta = 100 * airbench.evaluate(model, test_loader, tta_level=hyp["net"]["tta_level"])
        torch.cuda.synchronize()
        tta_s = time.perf_counter() - t0
        top1 = 100 * airbench.evaluate(model, test_loader, tta_level=0)
        result["runs"].append({"train_s": train_s, "tta_eval_s": tta_s, "total_s": train_s + tta_s,
                               "top1": top1, "top1_tta": top1_tta})
        print(f"[airbench] run {run}: {train_s:.2f} s training + {tta_s:.2f} s TTA evaluation, "
              f"top-1 {top1:.2f}% ({top1_tta:.2f}% with TTA)", flush=True)
    runs = result["runs"]
    result.update(status="ok", mean_total_s=statistics.mean(r["total_s"] for r in runs),
                  mean_train_s=statistics.mean(r["train_s"] for r in runs),
                  mean_top1=statistics.mean(r["top1"] for r in runs),
                  mean_top1_tta=statistics.mean(r["top1_tta"] for r in runs))
    return result


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def summarise_kdzoo(metrics: dict[str, Any], target: float) -> dict[str, Any]:
    """Time to ``target`` (cumulative training time, evaluation excluded) from a run's ``metrics.json``."""
    history = metrics.get("history") or []
    elapsed, reached = 0.0, None
    per_epoch = []
    for r in history:
        elapsed += r["epoch_time_s"]
        per_epoch.append({"epoch": r["epoch"], "top1": r["test"]["top1"], "epoch_time_s": r["epoch_time_s"]})
        if reached is None and r["test"]["top1"] >= target:
            reached = {"epoch": r["epoch"], "train_s": elapsed}
    env = metrics.get("environment") or {}
    return {"status": metrics.get("status"), "error": metrics.get("error"), "epochs": len(history),
            "train_s": elapsed, "last_top1": (metrics.get("last") or {}).get("top1"),
            "best_top1": (metrics.get("best") or {}).get("top1"), "reached": reached,
            "img_per_s": metrics.get("img_per_s"), "device": env.get("device"), "autocast": env.get("autocast"),
            "torch": env.get("torch"), "per_epoch": per_epoch}


def run_kdzoo(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    out = Path(args.out)
    cmd = [sys.executable, "-m", "kdzoo.cli", "train", "--config", args.config, "--out", str(out), *extra]
    print("[kdzoo] " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd)
    wall = time.perf_counter() - t0
    result: dict[str, Any] = {"tool": "kdzoo", "command": cmd[2:], "wall_s": wall, "returncode": proc.returncode}
    metrics = out / "metrics.json"
    if not metrics.is_file():
        return {**result, "status": "failed", "reason": f"no {metrics} (exit status {proc.returncode})"}
    return {**result, **summarise_kdzoo(json.loads(metrics.read_text()), args.target), "target": args.target}


def compare(a: dict[str, Any], k: dict[str, Any], target: float = TARGET) -> dict[str, Any]:
    """Both results side by side, and kdzoo's time to ``target`` over airbench's (goal <= 2)."""
    out: dict[str, Any] = {"target_top1": target, "goal_ratio": GOAL_RATIO, "airbench": a, "kdzoo": k, "ratio": None}
    if a.get("status") == "ok" and k.get("reached"):
        out["ratio"] = k["reached"]["train_s"] / a["mean_total_s"]
        out["met"] = out["ratio"] <= GOAL_RATIO
    return out


def print_comparison(c: dict[str, Any]) -> None:
    a, k = c["airbench"], c["kdzoo"]
    print(f"Time to {c['target_top1']:g}% CIFAR-10 test accuracy")
    if a.get("status") == "ok":
        print(f"  airbench94 ({a.get('device')}): {a['mean_total_s']:.2f} s (training {a['mean_train_s']:.2f} s + TTA), "
              f"top-1 {a['mean_top1_tta']:.2f}% with TTA, {a['mean_top1']:.2f}% without; {len(a['runs'])} runs")
    else:
        print(f"  airbench94: {a.get('status')}: {a.get('reason')}")
    if k.get("status") == "ok":
        when = (f"reached at epoch {k['reached']['epoch']} after {k['reached']['train_s']:.1f} s of training"
                if k.get("reached") else f"NOT reached (best {k['best_top1']:.2f}%)")
        print(f"  kdzoo teacher94 ({k.get('device')}, {k.get('autocast')}): {when}; {k['epochs']} epochs, "
              f"{k['train_s']:.1f} s training, {k['wall_s']:.1f} s wall, last top-1 {k['last_top1']:.2f}%")
    else:
        print(f"  kdzoo teacher94: {k.get('status')}: {k.get('reason') or k.get('error')}")
    if c["ratio"] is not None:
        print(f"  ratio kdzoo / airbench: {c['ratio']:.1f}x (goal <= {c['goal_ratio']:g}x: "
              f"{'met' if c['met'] else 'not met'})")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("airbench", help="time airbench94 (needs the airbench package and a GPU)")
    a.add_argument("--runs", type=int, default=2)
    a.add_argument("--data", default=os.environ.get("KDZOO_DATA", ""), help="cifar10.npz (default: $KDZOO_DATA)")
    a.add_argument("--workdir", default="runs/airbench", help="where airbench's cifar10/*.pt are written")
    a.add_argument("--json", metavar="PATH")
    k = sub.add_parser("kdzoo", help="time `kdzoo train --config CONFIG` (arguments after -- pass through)")
    k.add_argument("--config", default="benchmarks/configs/teacher94.yaml")
    k.add_argument("--out", default="runs/teacher94")
    k.add_argument("--target", type=float, default=TARGET)
    k.add_argument("--json", metavar="PATH")
    c = sub.add_parser("compare", help="print both results and the ratio")
    c.add_argument("airbench_json")
    c.add_argument("kdzoo_json")
    c.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if args.what == "airbench":
        if not args.data:
            raise SystemExit("error: set KDZOO_DATA (or --data) to cifar10.npz")
        result = run_airbench(args)
        if result["status"] != "ok":
            print(f"[airbench] {result['status']}: {result['reason']}", flush=True)
        _write(args.json, result)
    elif args.what == "kdzoo":
        result = run_kdzoo(args, extra)
        _write(args.json, result)
        if result["status"] != "ok":
            raise SystemExit(f"kdzoo run failed: {result.get('reason') or result.get('error')}")
    else:
        def load(path: str) -> dict[str, Any]:
            f = Path(path)
            return json.loads(f.read_text()) if f.is_file() else {"status": "missing", "reason": f"no {path}"}

        both = compare(load(args.airbench_json), load(args.kdzoo_json))
        print_comparison(both)
        _write(args.json, both)


if __name__ == "__main__":
    main()
