"""What bf16 autocast costs in accuracy: the same runs in float32 and in bf16, side by side.

    KDZOO_DATA=/path/to/cifar10.npz python benchmarks/bf16_accuracy.py [--epochs 3] [--seeds 0,1]
        [--model resnet20] [--train-size N] [--json PATH]

Each seed trains ``--model`` with ``ce`` on (a stratified subset of) real CIFAR-10 twice, once with
``autocast: off`` and once with ``autocast: bf16``; everything else is identical (initial weights,
batches, schedule). It prints the test top-1 of every run (last and best epoch) and the paired
difference bf16 − float32 per seed. On a CPU without native bf16 (no AMX-BF16 or AVX512-BF16) the
bf16 arithmetic is emulated: slower, but rounded the same way, so the accuracy comparison holds; the
table names the CPU and its capabilities.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import torch

from kdzoo.config import Recipe
from kdzoo.data import prepare_data
from kdzoo.engine import Member, Trainer
from kdzoo.plugins import load_plugins
from kdzoo.precision import cpu_capabilities, cpu_name
from kdzoo.runner import build_method, build_student
from kdzoo_plugins.cifar10 import load_cifar10


def run(model: str, seed: int, autocast: str, epochs: int, data: Any, registry: Any) -> dict[str, Any]:
    student = build_student(registry, model, {}, seed, num_classes=10)
    member = Member(f"{model}/{autocast}", student, build_method(registry, "ce", {}, student.info, None, seed))
    recipe = Recipe(epochs=epochs, batch_size=128, lr=0.1, schedule="cosine", weight_decay=5e-4, autocast=autocast)
    t0 = time.perf_counter()
    (result,) = Trainer([member], data, recipe, seed=seed).fit()
    return {"seed": seed, "autocast": autocast, "last": result["last"]["top1"], "best": result["best"]["top1"],
            "wall_s": time.perf_counter() - t0, "status": result["status"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.environ.get("KDZOO_DATA", "auto"))
    p.add_argument("--model", default="resnet20")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--train-size", type=int, default=None, help="default: all 50,000 training images")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    caps = cpu_capabilities()
    bf16 = ", ".join(k for k in ("amx_bf16", "avx512_bf16") if caps.get(k)) or "none (bf16 emulated)"
    print(f"CPU: {cpu_name()}; native bf16: {bf16}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    registry = load_plugins()
    data = prepare_data(load_cifar10(args.data), train_size=args.train_size)
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for autocast in ("off", "bf16"):
            runs.append(run(args.model, seed, autocast, args.epochs, data, registry))
            r = runs[-1]
            print(f"  seed {seed} {'float32' if autocast == 'off' else 'bf16':>7}: last {r['last']:.2f}%, best "
                  f"{r['best']:.2f}% ({r['wall_s']:.0f} s)", flush=True)
    by = {(r["seed"], r["autocast"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    deltas = [by[(s, "bf16")]["last"] - by[(s, "off")]["last"] for s in seeds]
    print(f"{args.model}, {args.epochs} epochs on {len(data.train_y):,} images, test on {len(data.test_y):,}: "
          f"bf16 - float32 (last epoch) per seed: {', '.join(f'{d:+.2f}' for d in deltas)}; mean {statistics.fmean(deltas):+.2f}")
    result = {"cpu": cpu_name(), "bf16": bf16, "model": args.model, "epochs": args.epochs, "runs": runs,
              "delta_last": deltas}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
