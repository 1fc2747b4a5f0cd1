"""The warning when other processes compete for the CPUs (training gets slower, never different)."""
from __future__ import annotations

from kdzoo.cli import busy_warning


def test_busy_means_one_competing_process_on_two_cores():
    assert busy_warning(load=0.4, cpus=2) is None
    assert busy_warning(load=0.9, cpus=2) is None
    warning = busy_warning(load=1.3, cpus=2)
    assert "load average 1.3 over the last minute on 2 CPUs" in warning and "same results" in warning
    assert busy_warning(load=3.0, cpus=16) is None  # a big machine with a few busy cores is not crowded
    assert busy_warning(load=8.0, cpus=16) is not None
