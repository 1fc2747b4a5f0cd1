"""How long kdzoo takes to start: the CLI's light commands, and pytest with kdzoo installed.

    python benchmarks/startup.py [--runs N] [--json PATH]

Each row is the wall time of a fresh subprocess, from start to exit, median (and min) over
``--runs`` runs after one untimed warm-up run (which fills the file cache). The rows are
interleaved round by round, so load from other processes hits them alike.

* ``kdzoo --help``, ``kdzoo methods``, ``kdzoo plugins``, ``kdzoo models 'resnet2*'``: the
  ``kdzoo`` script of this environment (else ``python -m kdzoo.cli``), output discarded.
* ``pytest`` and ``pytest -p no:kdzoo``: ``python -m pytest -q`` on a one-line test in a
  throwaway folder, with kdzoo's pytest plugin (entry point ``pytest11``) active and disabled.
  kdzoo's plugin should cost next to nothing: every project in an environment where kdzoo is
  installed pays it.
* ``python -c 'import torch'``: the floor of ``methods`` and ``plugins``, which load the method
  plugins, and so torch (a method is an ``nn.Module``).

Goals (issue 8): ``--help`` ≤ 0.5 s; ``methods`` and ``plugins`` ≤ 1.5 s; pytest with kdzoo's
plugin within 10 % of ``-p no:kdzoo``. Run it on an otherwise idle machine: the table prints the
load average before and after. Speed is measured here, never asserted in tests.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (lscpu, else /proc/cpuinfo, else platform)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "-"


def commands(test_dir: Path) -> dict[str, list[str]]:
    """Row label -> argv."""
    script = Path(sys.executable).with_name("kdzoo")
    kdzoo = [str(script)] if script.exists() else [sys.executable, "-m", "kdzoo.cli"]
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_dir)]
    return {
        "kdzoo --help": kdzoo + ["--help"],
        "kdzoo methods": kdzoo + ["methods"],
        "kdzoo plugins": kdzoo + ["plugins"],
        "kdzoo models 'resnet2*'": kdzoo + ["models", "resnet2*"],
        "pytest (kdzoo plugin on)": pytest,
        "pytest -p no:kdzoo": pytest + ["-p", "no:kdzoo"],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    }


def time_once(argv: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited with {proc.returncode}:\n{proc.stderr}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9, help="timed runs per row (default 9)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)

    # No plugin filters from the caller's shell; one thread is plenty for a start-up.
    env = {k: v for k, v in os.environ.items() if k not in ("KDZOO_LOAD_PLUGINS", "KDZOO_DISABLE_PLUGINS",
                                                            "PYTEST_ADDOPTS", "PYTEST_PLUGINS")}
    env.update(COLUMNS="120", OMP_NUM_THREADS="1")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kdzoo-startup-") as tmp:
        test_dir = Path(tmp)
        (test_dir / "test_one.py").write_text("def test_one():\n    assert True\n")
        rows = commands(test_dir)
        times: dict[str, list[float]] = {label: [] for label in rows}
        for round_ in range(args.runs + 1):
            order = list(rows) if round_ % 2 == 0 else list(reversed(rows))
            for label in order:
                t = time_once(rows[label], test_dir, env)
                if round_ > 0:  # round 0 warms the file cache
                    times[label].append(t)
    load_after = os.getloadavg()

    med = {label: statistics.median(ts) for label, ts in times.items()}
    ratio = med["pytest (kdzoo plugin on)"] / med["pytest -p no:kdzoo"]
    goals = {
        "kdzoo --help": ("≤ 0.5 s", med["kdzoo --help"] <= 0.5),
        "kdzoo methods": ("≤ 1.5 s", med["kdzoo methods"] <= 1.5),
        "kdzoo plugins": ("≤ 1.5 s", med["kdzoo plugins"] <= 1.5),
        "pytest (kdzoo plugin on)": (f"≤ 1.10× no:kdzoo (is {ratio:.2f}×)", ratio <= 1.10),
    }
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); Python {platform.python_version()}, "
          f"kdzoo {_version('kdzoo')}, torch {_version('torch')}, timm {_version('timm')}, "
          f"pytest {_version('pytest')}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; {args.runs} runs per row\n")
    print("| command | median | min | goal |")
    print("|---|---|---|---|")
    for label, ts in times.items():
        goal, ok = goals.get(label, ("", None))
        mark = "" if ok is None else (" ✓" if ok else " ✗")
        print(f"| `{label}` | {med[label]:.2f} s | {min(ts):.2f} s | {goal}{mark} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "cpu": cpu_model(), "python": platform.python_version(),
            "versions": {d: _version(d) for d in ("kdzoo", "torch", "timm", "pytest")},
            "load_before": load_before, "load_after": load_after, "runs": times, "median": med,
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
