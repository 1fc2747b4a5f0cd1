"""Which dtype training computes in: ``recipe.autocast`` resolved for this device, with the reason.

``auto`` picks bf16 autocast where it is faster and float32 elsewhere:

* CUDA: bf16 where the GPU supports it (``torch.cuda.is_bf16_supported()``).
* CPU, by the public capability API (``torch.cpu.get_capabilities()``): AMX-BF16 runs bf16 matmuls
  natively (bf16); without AVX512-BF16 either, bf16 would be emulated and is many times slower
  (float32). A CPU with AVX512-BF16 but no AMX is not conclusive, so a short measured probe decides:
  a few training steps (forward and backward) of the run's own network in each dtype, interleaved;
  bf16 only if it is at least :data:`MIN_SPEEDUP` times faster. The result is cached per machine,
  torch version and network in ``$KDZOO_CACHE/precision.json`` (and in memory), so the probe runs
  once and every run of a benchmark makes the same choice.

Every run records the dtype it used and why (``environment.autocast``, ``environment.autocast_reason``).
"""
from __future__ import annotations

import copy
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

MIN_SPEEDUP = 1.2  # bf16 must be this much faster than float32 in the probe to be chosen
PROBE_BATCH = 64
_memo: dict[str, dict[str, Any]] = {}  # this process's probe results, so that its choices never change


@dataclass(frozen=True)
class Precision:
    """The autocast dtype (None: float32) and why it was chosen."""

    dtype: torch.dtype | None
    reason: str

    @property
    def name(self) -> str:
        return "float32" if self.dtype is None else str(self.dtype).replace("torch.", "")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def cpu_capabilities() -> dict[str, Any]:
    """``torch.cpu.get_capabilities()``, or ``{}`` where this torch lacks it."""
    try:
        return dict(torch.cpu.get_capabilities())
    except Exception:
        return {}


def native_bf16() -> list[str]:
    """The CPU's native bf16 instruction sets (``amx_bf16``, ``avx512_bf16``); empty where bf16 is emulated."""
    caps = cpu_capabilities()
    return [k for k in ("amx_bf16", "avx512_bf16") if caps.get(k)]


def choose(autocast: str, device: torch.device, net: nn.Module | None = None,
           input_size: tuple[int, int] = (32, 32)) -> Precision:
    """Resolve ``autocast`` ("auto", "bf16" or "off") for ``device``; ``net`` is probed where the CPU's
    capabilities are not conclusive (see the module docstring)."""
    if autocast == "off":
        return Precision(None, "autocast: off")
    if autocast == "bf16":
        return Precision(torch.bfloat16, "autocast: bf16")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(torch.bfloat16, "CUDA GPU with bf16")
        return Precision(None, "CUDA GPU without bf16")
    if device.type != "cpu":
        return Precision(None, f"no bf16 rule for {device.type}")
    caps = cpu_capabilities()
    if caps.get("amx_bf16"):
        return Precision(torch.bfloat16, "CPU with AMX-BF16 (native bf16 matmuls)")
    if not caps.get("avx512_bf16"):
        return Precision(None, "CPU without AMX-BF16 or AVX512-BF16: bf16 would be emulated")
    if net is None:
        return Precision(None, "CPU with AVX512-BF16 but no AMX, and no network to probe: float32")
    result = probe(net, device, input_size)
    speedup = result["bf16_speedup"]
    verdict = "bf16" if speedup >= MIN_SPEEDUP else "float32"
    reason = (f"CPU with AVX512-BF16 but no AMX: measured bf16 at {speedup:.2f}x float32 "
              f"for {result['network']} (bf16 needs >= {MIN_SPEEDUP}x), so {verdict}")
    return Precision(torch.bfloat16 if speedup >= MIN_SPEEDUP else None, reason)


def _key(net: nn.Module, input_size: tuple[int, int]) -> tuple[str, str]:
    model = getattr(net, "model", net)
    params = sum(p.numel() for p in model.parameters())
    network = f"{type(model).__name__} ({params:,} parameters, {input_size[0]}x{input_size[1]})"
    return f"{cpu_name()} | torch {torch.__version__} | {network} | batch {PROBE_BATCH}", network


def probe(net: nn.Module, device: torch.device, input_size: tuple[int, int] = (32, 32),
          timer: Callable[[nn.Module, torch.Tensor, torch.dtype | None], float] | None = None) -> dict[str, Any]:
    """The cached (or freshly measured) probe of ``net``: ``{"bf16_speedup", "network", ...}``. Measures a
    copy, so ``net`` (its weights, statistics and gradients) is untouched."""
    from kdzoo import cache_dir
    from kdzoo.store import write_json

    key, network = _key(net, input_size)
    if key in _memo:
        return _memo[key]
    path = cache_dir() / "precision.json"
    try:
        import json

        cached = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        cached = {}
    if isinstance(cached, dict) and isinstance(cached.get(key), dict) and "bf16_speedup" in cached[key]:
        _memo[key] = cached[key]
        return cached[key]
    timer = timer or _step_seconds
    model = copy.deepcopy(net).to(device).train()
    x = torch.randn(PROBE_BATCH, 3, *input_size, generator=torch.Generator().manual_seed(0)).to(device)
    for dtype in (None, torch.bfloat16):  # warm-up (first-call allocations, kernel selection)
        timer(model, x, dtype)
    seconds: dict[Any, list[float]] = {None: [], torch.bfloat16: []}
    for r in range(3):  # interleaved, so a load change hits both alike
        for dtype in (None, torch.bfloat16) if r % 2 == 0 else (torch.bfloat16, None):
            seconds[dtype].append(timer(model, x, dtype))
    fp32, bf16 = statistics.median(seconds[None]), statistics.median(seconds[torch.bfloat16])
    result = {"bf16_speedup": fp32 / bf16, "float32_step_s": fp32, "bf16_step_s": bf16, "network": network,
              "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    _memo[key] = result
    try:
        cached = cached if isinstance(cached, dict) else {}
        write_json(path, {**cached, key: result})
    except OSError:
        pass  # an unwritable cache: the choice holds for this process
    return result


def _step_seconds(model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> float:
    """One forward and backward of ``model`` on ``x`` under autocast ``dtype`` (None: float32), in seconds."""
    model.zero_grad(set_to_none=True)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    t0 = time.perf_counter()
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model(x)
        logits = out.logits if hasattr(out, "logits") else out
    logits.float().sum().backward()
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - t0
