"""The results store of a benchmark: one JSON file per run, written atomically.

Layout of a benchmark folder ``DIR``::

    DIR/bench.json              the resolved benchmark (name, plan, reference block), written first
    DIR/runs/<run_id>.json      one finished (or failed) run, schema ``kdzoo.run/1``
    DIR/cohorts/<cohort_id>.pt  the latest epoch checkpoint of an unfinished cohort (deleted when done)

A run record (``kdzoo.run/1``) is a JSON object::

    schema, run_id (a hash of everything that determines the run: teacher key, student, method,
    hyperparameters, seed, recipe, data fingerprint, kdzoo version), cohort_id,
    kind ("teacher" | "student"), status ("ok" | "failed"), error,
    teacher: {"model", "key", "top1", "best_top1", "params"} | null,
    student: {"model", "params"},          # params of the backbone alone
    method, variant (column label, e.g. "kd" or "kd(T=2)"), hparams, seed,
    history: [per-epoch records], last: {top1, top5, precision, recall, f1[, agreement]},
    best: {epoch, chosen_on, top1, ...}, params: {"student", "method"}, flops (forward, per image),
    wall_time_s, img_per_s, epochs_done, recipe, data: {fingerprint, train, val, test}, environment

A teacher run has ``teacher: null`` and its own ``model`` and ``key`` at the top level.

Writes go to a temporary file that is fsynced and renamed over the target, so a reader (or a
run resumed after ``kill -9``) sees either the old file or the new one, never a partial one.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kdzoo import KDZooError
from kdzoo.checkpoint import atomic_write

SCHEMA = "kdzoo.run/1"


def write_json(path: str | Path, data: Any) -> None:
    """Atomically write ``data`` as JSON."""
    text = json.dumps(data, indent=1, sort_keys=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise KDZooError(f"Cannot read {path}: {e}. The file is damaged; delete it to redo that run.") from e


class Store:
    """The results of one benchmark folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.runs_dir = self.root / "runs"
        self.cohorts_dir = self.root / "cohorts"

    def run_path(self, run_id: str) -> Path:
        return self.runs_dir / f"{run_id}.json"

    def has_run(self, run_id: str) -> bool:
        return self.run_path(run_id).is_file()

    def write_run(self, record: dict[str, Any]) -> None:
        write_json(self.run_path(record["run_id"]), {"schema": SCHEMA, **record})

    def runs(self) -> list[dict[str, Any]]:
        """Every run record, sorted by file name (stable)."""
        if not self.runs_dir.is_dir():
            return []
        return [read_json(p) for p in sorted(self.runs_dir.glob("*.json"))]

    def write_bench(self, bench: dict[str, Any]) -> None:
        write_json(self.root / "bench.json", bench)

    def bench(self) -> dict[str, Any]:
        path = self.root / "bench.json"
        if not path.is_file():
            raise KDZooError(
                f"{self.root} is not a kdzoo benchmark folder (no bench.json). Pass the --out folder of `kdzoo bench`."
            )
        return read_json(path)

    def cohort_path(self, cohort_id: str) -> Path:
        return self.cohorts_dir / f"{cohort_id}.pt"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder for one writer; a second ``kdzoo bench`` on it fails clearly.

        An OS file lock (``flock``), so a killed process releases it at once and leaves no stale lock.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as e:
                raise KDZooError(
                    f"Another kdzoo process is writing to {self.root}. Wait for it to finish (or stop it), or "
                    "pass a different --out folder: two runners on one folder would train the same runs twice."
                ) from e
            f.write(str(os.getpid()))
            f.flush()
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
