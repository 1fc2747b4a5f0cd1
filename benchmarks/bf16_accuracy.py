"""What bf16 autocast costs in accuracy: the same runs in float32 and in bf16, side by side.

    KDZOO_DATA=/path/to/cifar10.npz python benchmarks/bf16_accuracy.py [--epochs 3] [--seeds 0,1]
        [--model resnet20] [--train-size N] [--bf16 auto|native|emulated] [--runs float32,bf16,control]
        [--json PATH]

Each seed trains ``--model`` with ``ce`` on (a stratified subset of) real CIFAR-10 with ``autocast: off``
(float32) and with ``autocast: bf16``; everything else is identical (initial weights, batches,
schedule). It prints the test top-1 of every run (last and best epoch) and the paired difference
bf16 - float32 per seed. The ``control`` run is float32 again with the channels-first memory format:
the same arithmetic summed in another order, so its difference from float32 is what any change of
rounding does to a short run, the yardstick for bf16's.

``--bf16 native`` uses torch's bf16 kernels. ``emulated`` keeps autocast's real bf16 path for every
op but computes each convolution and matrix product (forward and backward) the way bf16 hardware
does: bf16 operands, products and sums in float32, one rounding of the result to bf16 (AMX,
AVX512-BF16 and GPU tensor cores; only the order of the sums differs). ``auto`` (the default) is
native where the CPU has AMX-BF16 or AVX512-BF16 and emulated elsewhere: on an AVX2-only CPU torch's
own bf16 kernels are about 12x slower and, in the backward pass, round more often than bf16 hardware.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from kdzoo.config import Recipe
from kdzoo.data import prepare_data
from kdzoo.engine import Member, Trainer
from kdzoo.plugins import load_plugins
from kdzoo.precision import cpu_name, native_bf16
from kdzoo.runner import build_method, build_student
from kdzoo_plugins.cifar10 import load_cifar10


_aten = torch.ops.aten
# inference mode hands composite ops (conv2d, linear) to the mode before they decompose
_MATMULS = {_aten.convolution.default, _aten.convolution_backward.default, _aten.conv1d.default,
            _aten.conv2d.default, _aten.conv3d.default, _aten.linear.default, _aten.matmul.default,
            _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default}


class EmulatedBF16(TorchDispatchMode):
    """Inside it, a convolution or matrix product given bf16 tensors computes in float32 on their (exact)
    bf16 values and rounds each result to bf16: what a bf16 kernel with float32 accumulation returns.
    Every other op runs as it is (autocast's own bf16 path)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MATMULS and any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
            def up(a: Any) -> Any:
                return a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else a

            def down(o: Any) -> Any:
                return o.to(torch.bfloat16) if isinstance(o, torch.Tensor) and o.dtype == torch.float32 else o
            return tree_map(down, func(*tree_map(up, args), **tree_map(up, kwargs)))
        return func(*args, **kwargs)


#: name -> (autocast, channels_last)
CONFIGS = {"float32": ("off", True), "bf16": ("bf16", True), "control": ("off", False)}


def run(model: str, seed: int, config: str, epochs: int, data: Any, registry: Any,
        emulate: bool = False) -> dict[str, Any]:
    autocast, channels_last = CONFIGS[config]
    student = build_student(registry, model, {}, seed, num_classes=10)
    member = Member(f"{model}/{config}", student, build_method(registry, "ce", {}, student.info, None, seed))
    recipe = Recipe(epochs=epochs, batch_size=128, lr=0.1, schedule="cosine", weight_decay=5e-4, autocast=autocast,
                    channels_last=channels_last)
    t0 = time.perf_counter()
    trainer = Trainer([member], data, recipe, seed=seed)
    with EmulatedBF16() if emulate and autocast == "bf16" else contextlib.nullcontext():
        (result,) = trainer.fit()
    return {"seed": seed, "config": config, "autocast": autocast, "channels_last": channels_last,
            "dtype": trainer.precision.name, "emulated": emulate and autocast == "bf16", "last": result["last"]["top1"],
            "best": result["best"]["top1"], "wall_s": time.perf_counter() - t0, "status": result["status"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.environ.get("KDZOO_DATA", "auto"))
    p.add_argument("--model", default="resnet20")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--train-size", type=int, default=None, help="default: all 50,000 training images")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--bf16", choices=("auto", "native", "emulated"), default="auto",
                   help="bf16 kernels: torch's own, or emulated at the kernel level (default: native only on "
                        "a CPU with AMX-BF16 or AVX512-BF16)")
    p.add_argument("--runs", default="float32,bf16", help="which of float32, bf16, control to train per seed")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    configs = args.runs.split(",")
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        p.error(f"--runs: unknown {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    native = ", ".join(native_bf16())
    cpu = torch.device(args.device).type == "cpu"
    emulate = args.bf16 == "emulated" or (args.bf16 == "auto" and cpu and not native)
    how = "emulated (float32 accumulation, bf16 results)" if emulate else "torch's native kernels"
    where = "" if cpu else f"{torch.cuda.get_device_name()}; "
    print(f"{where}CPU: {cpu_name()}; native bf16: {native or 'none'}; bf16 runs: {how}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    registry = load_plugins()
    data = prepare_data(load_cifar10(args.data), train_size=args.train_size, device=args.device)
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for config in configs:
            runs.append(run(args.model, seed, config, args.epochs, data, registry, emulate))
            r = runs[-1]
            print(f"  seed {seed} {config:>7}: last {r['last']:.2f}%, best {r['best']:.2f}% ({r['wall_s']:.0f} s)",
                  flush=True)
    by = {(r["seed"], r["config"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    deltas = {c: [by[(s, c)]["last"] - by[(s, "float32")]["last"] for s in seeds]
              for c in configs if c != "float32" and "float32" in configs}
    print(f"{args.model}, {args.epochs} epochs on {len(data.train_y):,} images, test on {len(data.test_y):,}:")
    for config, d in deltas.items():
        spread = f" ± {statistics.stdev(d):.2f} (sd)" if len(d) > 1 else ""
        print(f"  {config} - float32 (last epoch) per seed: {', '.join(f'{x:+.2f}' for x in d)}; "
              f"mean {statistics.fmean(d):+.2f}{spread}")
    result = {"cpu": cpu_name(), "device": args.device, "native_bf16": native, "bf16_emulated": emulate,
              "model": args.model, "epochs": args.epochs, "runs": runs, "delta_last": deltas}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
