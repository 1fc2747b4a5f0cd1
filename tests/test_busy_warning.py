"""The threads kdzoo suggests on a busy machine (the CPUs the other processes leave free)."""
from __future__ import annotations

from kdzoo.cli import busy_threads


def test_busy_means_one_competing_process_on_two_cores():
    assert busy_threads(load=0.4, cpus=2) is None
    assert busy_threads(load=0.9, cpus=2) is None  # quiet: torch's default threads
    assert busy_threads(load=1.3, cpus=2) == 1
    assert busy_threads(load=2.6, cpus=2) == 1  # never fewer than one
    assert busy_threads(load=3.0, cpus=16) is None  # a big machine with a few busy cores is not crowded
    assert busy_threads(load=8.0, cpus=16) == 8
