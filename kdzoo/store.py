"""The results store of a benchmark: one JSON file per run, written atomically and read back validated.

Layout of a benchmark folder ``DIR``::

    DIR/bench.json              the resolved benchmark (:class:`kdzoo.records.BenchRecord`), written first
    DIR/runs/<run_id>.json      one finished or failed run (:class:`~kdzoo.records.RunRecord`, or a
                                :class:`~kdzoo.records.TeacherRecord` as ``teacher-<key>.json``)
    DIR/cohorts/<cohort_id>.pt  the latest epoch checkpoint of an unfinished cohort (deleted when done)
    DIR/damaged/                files that failed validation, kept aside (with a timestamp) when a rerun redoes them

A run's ``run_id`` hashes everything that determines its result: the teacher's key, the student
and its options, the method and its hyperparameters, the seed, the recipe, the data fingerprint,
and the versions of kdzoo and of the plugin distributions that provide the method and the networks.

Writes go to a temporary file that is fsynced and renamed over the target, so a reader (or a
run resumed after ``kill -9``) sees either the old file or the new one, never a partial one. A
file that is not a valid record (damaged, hand-edited, from another version) never counts as a
finished run: :meth:`Store.scan` reports it with its path, and the runner keeps it aside and redoes it.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdzoo import KDZooError
from kdzoo.checkpoint import atomic_write
from kdzoo.records import BenchRecord, Record, RecordError, dumps, load_record


def write_json(path: str | Path, data: Any) -> None:
    """Atomically write ``data`` (a record or plain values) as JSON; non-finite floats become null."""
    text = dumps(data)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


@dataclass
class Scan:
    """What a results folder holds: valid records by run id, and the files that are not valid records."""

    records: dict[str, Record] = field(default_factory=dict)
    damaged: list[RecordError] = field(default_factory=list)

    def done(self, run_id: str) -> bool:
        return run_id in self.records


class Store:
    """The results of one benchmark folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.runs_dir = self.root / "runs"
        self.cohorts_dir = self.root / "cohorts"

    def run_path(self, run_id: str) -> Path:
        return self.runs_dir / f"{run_id}.json"

    def has_run(self, run_id: str) -> bool:
        """Whether ``run_id`` has a valid record (a damaged file does not count)."""
        path = self.run_path(run_id)
        if not path.is_file():
            return False
        try:
            load_record(path)
        except RecordError:
            return False
        return True

    def write_run(self, record: Record) -> None:
        write_json(self.run_path(record.run_id), record)

    def scan(self) -> Scan:
        """Read and validate every record of the folder, sorted by file name."""
        scan = Scan()
        if self.runs_dir.is_dir():
            for path in sorted(self.runs_dir.glob("*.json")):
                try:
                    record = load_record(path)
                except RecordError as e:
                    scan.damaged.append(e)
                else:
                    scan.records[record.run_id] = record
        return scan

    def runs(self) -> list[Record]:
        """Every valid record; ``KDZooError`` naming each damaged file (``kdzoo report`` must not show a table
        that silently lacks runs)."""
        scan = self.scan()
        if scan.damaged:
            raise KDZooError(
                f"{len(scan.damaged)} file(s) in {self.runs_dir} are not valid run records: "
                + "; ".join(f"{e.path.name}: {e.problem}" for e in scan.damaged)
                + ". Rerun the same `kdzoo bench FILE --out " + str(self.root) + "` to redo those runs "
                "(the damaged files are kept aside under damaged/), or delete them."
            )
        return list(scan.records.values())

    def set_aside(self, error: RecordError) -> Path:
        """Move a damaged file into ``damaged/`` (never deleted: it may be evidence of a bug); return its new path."""
        target = self.root / "damaged" / f"{error.path.name}.{time.strftime('%Y%m%d-%H%M%S')}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(error.path, target)
        return target

    def write_bench(self, bench: BenchRecord) -> None:
        write_json(self.root / "bench.json", bench)

    def bench(self) -> BenchRecord:
        path = self.root / "bench.json"
        if not path.is_file():
            raise KDZooError(
                f"{self.root} is not a kdzoo benchmark folder (no bench.json). Pass the --out folder of `kdzoo bench`."
            )
        try:
            return BenchRecord.load(path)
        except RecordError as e:
            raise KDZooError(f"{e} Rerun `kdzoo bench FILE --out {self.root}` with the benchmark's YAML: it "
                             "rewrites bench.json and keeps every finished run.") from e

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
