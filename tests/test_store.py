"""The results store cannot lie: every record is validated when read, a damaged one never counts as done,
and nothing non-finite reaches a JSON file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdzoo import KDZooError
from kdzoo.records import (BenchRecord, BestEpoch, RecordError, RunRecord, Scores, TeacherRecord, TeacherRef,
                           load_record)
from kdzoo.store import Store, write_json

DAMAGES = {
    "random bytes": os.urandom(64) + b"\xff\xfe",
    "a JSON list": b"[1, 2, 3]",
    "null": b"null",
    "a partial record": b'{"status": "ok"}',
    "half-written JSON": b'{"schema": "kdzoo.run/2", "run_id": "ab',
    "a record with a NaN token": None,  # filled in below from a valid record
    "a finished run without metrics": None,
}


def run_record(run_id="r1", **changes):
    fields = dict(run_id=run_id, cohort_id="c", teacher=TeacherRef(model="t", key="k", top1=90.0, params=10),
                  model="s", method="kd", variant="kd", seed=0, status="ok", last=Scores(top1=50.0, top5=90.0),
                  best=BestEpoch(top1=51.0, epoch=2, chosen_on="test"), params=100, epochs_done=2)
    return RunRecord(**{**fields, **changes})


def damaged_bytes(kind: str, valid: Path) -> bytes:
    if kind == "a record with a NaN token":
        return valid.read_text().replace('"top1": 50.0', '"top1": NaN').encode()
    if kind == "a finished run without metrics":
        data = json.loads(valid.read_text())
        data["last"] = None
        return json.dumps(data).encode()
    return DAMAGES[kind]


def test_records_round_trip_through_their_types(tmp_path):
    store = Store(tmp_path)
    record = run_record()
    teacher = TeacherRecord(run_id="teacher-k", key="k", model="t", seed=0, status="ok", source="checkpoint",
                            checkpoint="/x.pt", params=10, last=Scores(top1=90.0))
    store.write_run(record)
    store.write_run(teacher)
    scan = store.scan()
    assert scan.damaged == [] and scan.records == {"r1": record, "teacher-k": teacher}
    bench = BenchRecord(name="b", columns=["ce"], pairs=[["t", "s"]], seeds=[0], run_ids=["r1"], teachers={"t": "k"})
    store.write_bench(bench)
    assert store.bench() == bench


@pytest.mark.parametrize("kind", list(DAMAGES))
def test_a_damaged_record_is_reported_with_its_path_and_never_counts_as_done(tmp_path, kind):
    store = Store(tmp_path)
    store.write_run(run_record("good"))
    store.write_run(run_record("bad"))
    bad = store.run_path("bad")
    content = damaged_bytes(kind, bad)
    bad.write_bytes(content)
    scan = store.scan()
    assert list(scan.records) == ["good"] and [e.path for e in scan.damaged] == [bad]
    assert not scan.done("bad") and not store.has_run("bad") and store.has_run("good")
    with pytest.raises(KDZooError) as e:
        store.runs()
    assert str(bad.name) in str(e.value) and "kdzoo bench" in str(e.value)
    moved = store.set_aside(scan.damaged[0])
    assert not bad.exists() and moved.parent == tmp_path / "damaged" and moved.read_bytes() == content


@pytest.mark.parametrize("text, problem", [
    (b"\x80\x81", "not JSON"),
    (b"[1]", "holds list"),
    (b'{"schema": "kdzoo.run/1", "run_id": "r1"}', "schema is 'kdzoo.run/1'"),
    (b'{"schema": "kdzoo.run/2", "run_id": "r1"}', "missing the required key"),
])
def test_record_errors_say_what_is_wrong(tmp_path, text, problem):
    path = tmp_path / "r1.json"
    path.write_bytes(text)
    with pytest.raises(RecordError) as e:
        load_record(path)
    assert str(path) in str(e.value) and problem in str(e.value)


def test_a_record_under_another_run_id_is_damaged(tmp_path):
    store = Store(tmp_path)
    store.write_run(run_record("r1"))
    os.replace(store.run_path("r1"), store.run_path("r2"))
    assert not store.has_run("r2")
    assert "not the run its file name says" in str(store.scan().damaged[0])


def test_no_nan_or_infinity_token_is_ever_written(tmp_path):
    write_json(tmp_path / "x.json", {"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -float("inf")}})
    text = (tmp_path / "x.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "c": {"d": None}}


def _kdzoo(*args, **env):
    return subprocess.run([sys.executable, "-m", "kdzoo.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200", **env}, timeout=300)


@pytest.mark.slow  # runs the kdzoo command in subprocesses
@pytest.mark.parametrize("kind", ["random bytes", "a JSON list", "a partial record"])
def test_kdzoo_report_on_a_damaged_folder_is_a_clear_error_and_keeps_the_old_report(tmp_path, kind):
    store = Store(tmp_path)
    store.write_run(run_record("r1"))
    store.write_bench(BenchRecord(name="b", columns=["kd"], pairs=[["t", "s"]], seeds=[0], run_ids=["r1"],
                                  teachers={"t": "k"}))
    assert _kdzoo("report", str(tmp_path)).returncode == 0
    report_md = (tmp_path / "report.md").read_bytes()
    store.run_path("r1").write_bytes(DAMAGES[kind])
    proc = _kdzoo("report", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "r1.json" in proc.stderr and "kdzoo bench" in proc.stderr
    assert (tmp_path / "report.md").read_bytes() == report_md  # not overwritten with a degraded table
    store.write_run(run_record("r1"))
    (tmp_path / "bench.json").write_bytes(DAMAGES["random bytes"])
    proc = _kdzoo("report", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "bench.json" in proc.stderr
