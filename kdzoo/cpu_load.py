"""Sharing the CPU with other processes: OpenMP's wait policy, and the busy-machine warning.

Contract: :func:`prefer_passive_wait` must run before ``torch`` is first imported (the OpenMP runtime
reads its settings once, when torch loads it); the ``kdzoo`` command calls it first thing. It never
overrides a policy the user set. :func:`busy_threads` and :func:`busy_warning` read the load average
only; nothing here changes torch's thread count (that could change a run's last bits, and a resumed
run must equal an uninterrupted one; the wait policy changes only how idle threads wait).

Why passive: measured 2026-12-03 on a 2-vCPU AMD EPYC (AVX2), the kd step resnet56 -> resnet20 at
batch 128 with torch's 2 threads, 12-step windows: quiet, 281-293 img/s with OpenMP's default
(spinning) wait and 279-293 with ``OMP_WAIT_POLICY=PASSIVE``; beside one CPU-bound process, 101-103
(2.9x slower than quiet) against 156-158 (1.9x), as fast as 1 thread (160-163).
"""
from __future__ import annotations

import math
import os
import sys

WAIT_POLICY = "PASSIVE"
_known: str | None = None  # the policy this process's OpenMP read, when kdzoo set the environment before torch


def prefer_passive_wait() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the environment already names a policy, if torch is not yet
    imported (afterwards it would not take effect, so the environment is left alone).

    Returns True when this process's OpenMP threads will sleep rather than spin while they wait."""
    global _known
    if "torch" in sys.modules:
        return False
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
    _known = os.environ["OMP_WAIT_POLICY"].upper()
    return _known == WAIT_POLICY


def wait_policy() -> str:
    """The OpenMP wait policy of this process as far as kdzoo can tell: the one set before torch loaded,
    else the environment's (``"DEFAULT"`` when unset), recorded in each run's ``environment``."""
    return _known or (os.environ.get("OMP_WAIT_POLICY") or "default").upper()


def busy_threads(load: float | None = None, cpus: int | None = None) -> int | None:
    """The CPUs the other processes leave free when the load average says they compete for the CPUs
    (a 1-minute load of at least half the CPUs and at least 1: on 2 cores, one other CPU-bound
    process), at least 1. None on a quiet machine."""
    try:
        load = os.getloadavg()[0] if load is None else load
    except OSError:  # not available on this platform
        return None
    cpus = cpus or os.cpu_count() or 1
    if load < max(1.0, cpus / 2):
        return None
    return max(1, cpus - math.floor(load + 0.5))


def busy_warning(torch_threads: int, load: float | None = None, cpus: int | None = None,
                 policy: str | None = None) -> str | None:
    """One paragraph for a busy machine (None when quiet): what to expect and what helps.

    With passive waiting (kdzoo's default), fewer threads would not help much, so the warning says
    what the timings mean; with spinning threads it names the setting that does help."""
    threads = busy_threads(load, cpus)
    if threads is None:
        return None
    load = os.getloadavg()[0] if load is None else load
    cpus = cpus or os.cpu_count() or 1
    policy = (policy or wait_policy()).upper()
    head = f"this machine is busy (load average {load:.1f} on {cpus} CPUs): "
    if policy == WAIT_POLICY:
        return (head + f"kdzoo's {torch_threads} torch threads share the CPUs with other processes and train more "
                "slowly (about 1.9x beside one busy process on 2 cores), so timings and time estimates will read "
                "high. Run one training job at a time for timings that mean something.")
    fix = f"OMP_WAIT_POLICY=PASSIVE (kdzoo's default; this process has {policy})"
    if threads < torch_threads and not os.environ.get("OMP_NUM_THREADS"):
        fix += f" or OMP_NUM_THREADS={threads}"
    return (head + f"torch's {torch_threads} threads spin while they wait for each other and steps can be several "
            f"times slower (2.9x beside one busy process on 2 cores). Start kdzoo with {fix}, or run one job "
            "at a time.")


__all__ = ["prefer_passive_wait", "wait_policy", "busy_threads", "busy_warning"]
