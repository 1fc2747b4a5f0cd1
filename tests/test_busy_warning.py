"""Sharing the CPU: the OpenMP wait policy the kdzoo command sets, and the busy-machine warning."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from kdzoo.cpu_load import busy_threads, busy_warning


def test_busy_means_one_competing_process_on_two_cores():
    assert busy_threads(load=0.4, cpus=2) is None
    assert busy_threads(load=0.9, cpus=2) is None  # quiet: torch's default threads
    assert busy_threads(load=1.3, cpus=2) == 1
    assert busy_threads(load=2.6, cpus=2) == 1  # never fewer than one
    assert busy_threads(load=3.0, cpus=16) is None  # a big machine with a few busy cores is not crowded
    assert busy_threads(load=8.0, cpus=16) == 8


def test_the_warning_says_what_helps(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert busy_warning(2, load=0.5, cpus=2, policy="PASSIVE") is None  # quiet: nothing to say
    passive = busy_warning(2, load=1.4, cpus=2, policy="passive")
    assert "busy (load average 1.4 on 2 CPUs)" in passive and "one training job at a time" in passive
    assert "OMP_" not in passive  # passive threads already yield: nothing to set
    spinning = busy_warning(2, load=1.4, cpus=2, policy="ACTIVE")
    assert "OMP_WAIT_POLICY=PASSIVE" in spinning and "this process has ACTIVE" in spinning
    assert "OMP_NUM_THREADS=1" in spinning
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user chose the threads: only the policy is suggested
    assert "OMP_NUM_THREADS" not in busy_warning(2, load=1.4, cpus=2, policy="DEFAULT")


def _policy_in_fresh_process(code: str, env: dict[str, str]) -> list:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_kdzoo_command_sets_passive_wait_before_torch_loads():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = ("import json, os, sys; from kdzoo.cli import main; main(['plugins']); import torch; "
            "from kdzoo.cpu_load import wait_policy; "
            "print(json.dumps([os.environ.get('OMP_WAIT_POLICY'), wait_policy()]))")
    assert _policy_in_fresh_process(code, env) == ["PASSIVE", "PASSIVE"]
    # a policy the user set is kept
    assert _policy_in_fresh_process(code, {**env, "OMP_WAIT_POLICY": "active"}) == ["active", "ACTIVE"]
    # torch imported first: too late for OpenMP to read it, so the environment is left alone and the
    # record says what the process really has
    late = ("import json, os, torch; from kdzoo.cpu_load import prefer_passive_wait, wait_policy; "
            "print(json.dumps([prefer_passive_wait(), os.environ.get('OMP_WAIT_POLICY'), wait_policy()]))")
    assert _policy_in_fresh_process(late, env) == [False, None, "DEFAULT"]
