"""How should the students of a cohort share a device that one small student cannot fill?

    python benchmarks/cohort_gpu.py [--device cuda] [--members 5] [--batch-size 128] [--steps 30]
        [--warmup 5] [--options engine,sequential,streams,stacked,batch4x] [--compile] [--json PATH]

A cohort of ``members`` resnet20 students distils from one resnet56 teacher with ``kd`` (the same
method for every member, so that the options below compute the same thing), on synthetic
CIFAR-shaped data (no ``KDZOO_DATA`` needed). Each option trains for ``steps`` batches after
``warmup`` untimed ones and reports member-images per second (images x members / time):

* ``engine``: kdzoo's ``Trainer`` (members one after another, each with its own RNG streams and
  bookkeeping): what kdzoo does today.
* ``sequential``: the least code that does the same: the teacher once, then each member's
  forward, loss, backward and SGD step, one after another on one stream.
* ``streams``: ``sequential`` with each member's step on its own CUDA stream, so that the GPU may
  run members' kernels side by side (CUDA only).
* ``stacked``: the members' weights stacked (``torch.func.stack_module_state``) and one
  ``vmap``-ed forward and backward for all of them, SGD on the stacked tensors (SGD is elementwise,
  so this is the same update as one optimiser per member). Also reports how far member 0's first
  logits are from the ``sequential`` ones: zero means stacking could keep cohort == solo.
* ``batch4x``: ``sequential`` with 4x the batch size (a different recipe: shows how much of the
  device a batch of ``batch-size`` leaves idle).
* ``compile`` (with ``--compile``): ``sequential`` with each student ``torch.compile``-d
  (default mode); the compile time is reported separately and not timed.

It also counts the operators one member step dispatches (``TorchDispatchMode``): on a GPU each is
at least one kernel launch, which bounds a small student's step from below whatever its batch.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from kdzoo.config import Recipe
from kdzoo.data import Data
from kdzoo.engine import Member, Trainer, autocast_dtype, resolve_device
from kdzoo.plugins import Registry, load_plugins
from kdzoo.runner import build_method, build_student

TEACHER, STUDENT, METHOD = "resnet56", "resnet20", "kd"
T, W_CE, W_KD, LR = 4.0, 0.1, 0.9, 0.05
OPTIONS = ("engine", "sequential", "streams", "stacked", "batch4x")


@dataclass
class Setup:
    device: torch.device
    members: int
    batch_size: int
    steps: int
    warmup: int
    amp: torch.dtype | None
    fmt: torch.memory_format


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic(device: torch.device, n: int, seed: int = 0) -> Data:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n + 10, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n + 10,), generator=g)
    return Data(x[:n].to(device), y[:n].to(device), x[n:].to(device), y[n:].to(device))


def kd_terms(s_logits: torch.Tensor, t_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``kd``'s loss (w_ce CE + w_kd T^2 KL), in float32; the last dimension is the classes."""
    s = s_logits.float()
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), y.reshape(-1))
    kl = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t_logits.float() / T, -1), reduction="sum") / y.numel()
    return W_CE * ce + W_KD * T * T * kl


def batches(data: Data, batch_size: int, epoch: int, fmt: torch.memory_format):
    for x, y in data.train_batches(0, epoch, batch_size):
        yield x.contiguous(memory_format=fmt), y


class Loop:
    """Teacher + ``members`` students, trained by hand; ``step`` is one batch for every member."""

    def __init__(self, registry: Registry, s: Setup, streams: bool = False, compile: bool = False) -> None:
        self.s = s
        self.teacher = build_student(registry, TEACHER, {}, 1, num_classes=10).model.to(s.device, memory_format=s.fmt).eval()
        self.teacher.requires_grad_(False)
        self.students = [build_student(registry, STUDENT, {}, 0, num_classes=10).model.to(s.device, memory_format=s.fmt).train()
                         for _ in range(s.members)]
        self.opts = [torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4) for m in self.students]
        self.streams = [torch.cuda.Stream(s.device) for _ in self.students] if streams else None
        self.compile_s = 0.0
        if compile:
            self.calls = [torch.compile(m) for m in self.students]
        else:
            self.calls = list(self.students)

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(self.s.device.type, dtype=self.s.amp or torch.float32,
                                                    enabled=self.s.amp is not None):
            return self.teacher(x).clone()

    def member_step(self, i: int, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.s.device.type, dtype=self.s.amp or torch.float32, enabled=self.s.amp is not None):
            loss = kd_terms(self.calls[i](x), t, y)
        self.opts[i].zero_grad(set_to_none=True)
        loss.backward()
        self.opts[i].step()
        return loss.detach()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        t = self.teacher_logits(x)
        t = t.clone() if t.is_inference() else t
        if self.streams is None:
            for i in range(len(self.students)):
                self.member_step(i, x, y, t)
            return
        main = torch.cuda.current_stream(self.s.device)
        for i, stream in enumerate(self.streams):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                self.member_step(i, x, y, t)
        for stream in self.streams:
            main.wait_stream(stream)


class Stacked:
    """The members' weights stacked; one ``vmap``-ed forward/backward and one SGD for all of them."""

    def __init__(self, registry: Registry, s: Setup) -> None:
        from torch.func import functional_call, stack_module_state, vmap

        self.s = s
        self.teacher = build_student(registry, TEACHER, {}, 1, num_classes=10).model.to(s.device, memory_format=s.fmt).eval()
        self.teacher.requires_grad_(False)
        students = [build_student(registry, STUDENT, {}, 0, num_classes=10).model.to(s.device, memory_format=s.fmt).train()
                    for _ in range(s.members)]
        self.params, self.buffers = stack_module_state(students)
        base = copy.deepcopy(students[0]).to("meta")

        def one(p: dict, b: dict, x: torch.Tensor) -> torch.Tensor:
            return functional_call(base, (p, b), (x,))

        self.forward = vmap(one, in_dims=(0, 0, None))
        self.opt = torch.optim.SGD(list(self.params.values()), lr=LR, momentum=0.9, weight_decay=5e-4)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.s.device.type, dtype=self.s.amp or torch.float32, enabled=self.s.amp is not None):
            return self.forward(self.params, self.buffers, x)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.inference_mode(), torch.autocast(self.s.device.type, dtype=self.s.amp or torch.float32,
                                                    enabled=self.s.amp is not None):
            t = self.teacher(x)
        t = t.clone()
        out = self.logits(x)  # (members, B, classes)
        k = out.shape[0]
        loss = kd_terms(out, t.expand(k, *t.shape), y.expand(k, *y.shape)) * k  # the sum of the members' losses
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def timed(step: Callable[[torch.Tensor, torch.Tensor], None], data: Data, s: Setup, batch_size: int) -> float:
    """Member-images per second of ``step`` over ``s.steps`` batches after ``s.warmup`` untimed ones."""
    it = batches(data, batch_size, 0, s.fmt)
    for _ in range(s.warmup):
        step(*next(it))
    sync(s.device)
    t0 = time.perf_counter()
    n = 0
    for _ in range(s.steps):
        x, y = next(it)
        step(x, y)
        n += len(y)
    sync(s.device)
    return n * s.members / (time.perf_counter() - t0)


def engine_rate(registry: Registry, s: Setup) -> float:
    """kdzoo's Trainer: one ``train_epoch`` of warm-up, then one timed epoch of exactly ``steps`` batches."""
    teacher = build_student(registry, TEACHER, {}, 1, num_classes=10)
    members = []
    for i in range(s.members):
        st = build_student(registry, STUDENT, {}, 0, num_classes=10)
        members.append(Member(f"kd{i}", st, build_method(registry, METHOD, {}, st.info, teacher.info, 0)))
    recipe = Recipe(epochs=100_000, batch_size=s.batch_size, lr=LR, eval_batch_size=1000,
                    autocast="bf16" if s.amp is not None else "off")
    data = synthetic(s.device, s.steps * s.batch_size)
    trainer = Trainer(members, data, recipe, teacher=teacher, seed=0, device=s.device)
    for epoch in range(2):
        trainer.train_epoch(epoch)
    failed = [m.error for m in trainer.members if m.error]
    if failed:
        raise RuntimeError(failed[0])
    return s.members * trainer.members[0].history[-1]["train_img_per_s"]


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def ops_per_member_step(loop: Loop, x: torch.Tensor, y: torch.Tensor) -> dict[str, int]:
    """Operators dispatched by the teacher's forward and by one member's step (forward, loss, backward, SGD)."""
    with _Count() as c:
        t = loop.teacher_logits(x)
    teacher_ops = c.n
    t = t.clone()
    with _Count() as c:
        loop.member_step(0, x, y, t)
    return {"teacher_forward": teacher_ops, "member_step": c.n}


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    registry = load_plugins(strict=True)
    amp = autocast_dtype(Recipe(), device)  # the engine's default: bf16 where native
    s = Setup(device, args.members, args.batch_size, args.steps, args.warmup, amp, torch.channels_last)
    options = [o for o in args.options.split(",") if o]
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise SystemExit(f"unknown options {sorted(unknown)}; choose from {', '.join(OPTIONS)}")
    if device.type != "cuda" and "streams" in options:
        options.remove("streams")
    n = (s.warmup + s.steps) * s.batch_size * (4 if "batch4x" in options else 1)
    data = synthetic(device, n)
    out: dict[str, Any] = {"device": str(device), "name": torch.cuda.get_device_name(device) if device.type == "cuda"
                           else platform.processor() or "cpu", "torch": torch.__version__, "members": s.members,
                           "batch_size": s.batch_size, "steps": s.steps, "warmup": s.warmup,
                           "autocast": str(amp or "float32"), "student": STUDENT, "teacher": TEACHER,
                           "rates": {}, "errors": {}}

    def say(msg: str) -> None:
        print(f"[cohort_gpu] {msg}", file=sys.stderr, flush=True)

    probe = Loop(registry, s)
    x0, y0 = next(batches(data, s.batch_size, 0, s.fmt))
    out["ops"] = ops_per_member_step(probe, x0, y0)
    say(f"ops: {out['ops']}")
    for option in options:
        try:
            if option == "engine":
                rate = engine_rate(registry, s)
            elif option in ("sequential", "streams"):
                rate = timed(Loop(registry, s, streams=option == "streams").step, data, s, s.batch_size)
            elif option == "batch4x":
                rate = timed(Loop(registry, s).step, data, s, 4 * s.batch_size)
            elif option == "stacked":
                stacked = Stacked(registry, s)
                with torch.no_grad():  # before any step: both start from the same weights
                    ref = Loop(registry, s)
                    a = stacked.logits(x0)[0].float()
                    b = ref.calls[0](x0).float()
                out["stacked_vs_sequential_max_abs_diff"] = (a - b).abs().max().item()
                del ref
                rate = timed(stacked.step, data, s, s.batch_size)
            out["rates"][option] = rate
            say(f"{option}: {rate:,.0f} member-img/s")
        except Exception as e:  # one option failing (e.g. vmap on an op without a batching rule) is a result too
            out["errors"][option] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            say(f"{option} failed: {out['errors'][option]}")
    if args.compile:
        try:
            loop = Loop(registry, s, compile=True)
            t0 = time.perf_counter()
            it = batches(data, s.batch_size, 1, s.fmt)
            loop.step(*next(it))
            sync(device)
            out["compile_s"] = time.perf_counter() - t0
            out["rates"]["compile"] = timed(loop.step, data, s, s.batch_size)
            say(f"compile: {out['rates']['compile']:,.0f} member-img/s (compiled in {out['compile_s']:.0f} s)")
        except Exception as e:
            out["errors"]["compile"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    base = out["rates"].get("sequential")
    out["relative_to_sequential"] = {k: v / base for k, v in out["rates"].items()} if base else {}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--members", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=30, help="timed batches per option")
    p.add_argument("--warmup", type=int, default=5, help="untimed batches per option")
    p.add_argument("--options", default=",".join(OPTIONS), help=f"comma-separated, from {', '.join(OPTIONS)}")
    p.add_argument("--compile", action="store_true", help="also time torch.compile-d students (slow to compile)")
    p.add_argument("--threads", type=int, help="torch threads (CPU)")
    p.add_argument("--json", metavar="PATH", help="also write the numbers to PATH")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    print(f"{result['members']} x {STUDENT} <- {TEACHER}, batch {result['batch_size']}, {result['device']} "
          f"({result['name']}), autocast {result['autocast']}")
    print(f"ops dispatched: teacher forward {result['ops']['teacher_forward']}, one member step "
          f"{result['ops']['member_step']}")
    for k, v in result["rates"].items():
        rel = result["relative_to_sequential"].get(k)
        print(f"  {k:<11} {v:>12,.0f} member-img/s" + (f"   {rel:.2f}x sequential" if rel else ""))
    for k, v in result["errors"].items():
        print(f"  {k:<11} failed: {v}")
    if "stacked_vs_sequential_max_abs_diff" in result:
        print(f"stacked vs sequential logits, max |diff|: {result['stacked_vs_sequential_max_abs_diff']:.3g}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
