"""The benchmark report from a fixed, hand-made store: numbers, markers, exports and the reference block.

Store (seeds 0, 1, 2; columns ce, kd, attention), last-epoch / best-epoch top-1:

  resnet20 → mobilenet   teacher 90 / 91 (key tA; a stale teacher of key "old" at 50 must be ignored)
    ce         70 71 72  / 71 72 73   → 71.00 ± 1.00, best 72.00 ± 1.00
    kd         72 73 74  / 75 75 75   → 73.00 ± 1.00, Δ +2 (2,2,2);  best 75.00 ± 0.00, Δ +3 (4,3,2)
    attention  69 71 70  / 76 77 78   → 70.00 ± 1.00, Δ −1 (−1,0,−2); best 77.00 ± 1.00, Δ +5
  wrn40_1 → wrn16_1      teacher 93 / 93.5 (key tB); reference in test error
    ce         90 91 92               → 91.00 ± 1.00  (err 9.00 vs 8.77: +0.23)
    kd         91 93 —(not run)       → 92.00 ± 1.41, Δ +1.5 (1,2), std 0.71 (err 8.00 vs 8.39: −0.39)
    attention  92 93 failed           → 92.50 ± 0.71, Δ +2 (2,2)   (err 7.50 vs 8.25: −0.75)

95% intervals of Δ (mean ± t·s/√n, t from printed tables: t(.975, 2) = 4.30265273, t(.975, 1) = 12.706204736):
last-epoch attention −1 ± 2.4841 (includes 0), kd +2 ± 0 (identical pairs: zero width, excludes 0), wrn kd
+1.5 ± 6.3531; best-epoch kd +3 ± 2.4841 = [0.5159, 5.4841] (excludes 0). Ranks from the top-1 intervals:
best-epoch ce [69.52, 74.48] lies wholly below kd [75, 75] and attention [74.52, 79.48] → ce 3, kd =1, attention =1.
"""
from __future__ import annotations

import csv
import io
import json
import math

import pytest
from rich.console import Console

from kdzoo import KDZooError
from kdzoo.records import BenchRecord, BestEpoch, RunRecord, Scores, TeacherRecord, TeacherRef
from kdzoo.report import (
    CSV_COLUMNS, export, render_table, summarize, summarize_dir, to_csv, to_json, to_markdown, transposed,
)
from kdzoo.store import Store

NAN_ERROR = "Loss became non-finite (nan) at epoch 2, step 3.\nLower the learning rate."


def student(run_id, teacher, t_key, t_top1, t_params, model, s_params, variant, seed, last, best,
            status="ok", error=None, method=None):
    return RunRecord(
        run_id=run_id, cohort_id=f"c-{teacher}-{model}-{seed}", status=status, error=error,
        teacher=TeacherRef(model=teacher, key=t_key, top1=t_top1[0], best_top1=t_top1[1], params=t_params),
        model=model, params=s_params, method_params=0, method=method or variant, variant=variant, seed=seed,
        epochs_done=2,
        last=Scores(top1=last, top5=99.0) if status == "ok" else None,
        best=BestEpoch(epoch=1, chosen_on="test", top1=best) if status == "ok" else None,
    )


def teacher_run(model, key, last, best, params, status="ok", error=None, source="trained"):
    return TeacherRecord(
        run_id=f"teacher-{key}", key=key, model=model, seed=0, status=status, error=error, source=source,
        params=params, last=Scores(top1=last) if last is not None else None,
        best=BestEpoch(epoch=2, chosen_on="test", top1=best) if best is not None else None,
    )


def bench(records, **fields):
    """A BenchRecord whose plan holds every student run of ``records`` (the report filters by pair, column, seed)."""
    return BenchRecord(**{"name": "unit", "seeds": [0], "teachers": {},
                          "run_ids": [r.run_id for r in records if isinstance(r, RunRecord)], **fields})


REFERENCE = {"source": "Zagoruyko & Komodakis, ICLR 2017, Table 2", "metric": "error", "rows": [
    {"teacher": "wrn40_1", "student": "wrn16_1",
     "values": {"student": 8.77, "attention": 8.25, "kd": 8.39, "teacher": 6.58}},
]}
BENCH = dict(description="hand-made store", budget="2 epochs, 100 train images", columns=["ce", "kd", "attention"],
             pairs=[["resnet20", "mobilenet"], ["wrn40_1", "wrn16_1"]], seeds=[0, 1, 2], reference=REFERENCE,
             teachers={"resnet20": "tA", "wrn40_1": "tB"})

A = dict(teacher="resnet20", t_key="tA", t_top1=(90.0, 91.0), t_params=1_200_000, model="mobilenet", s_params=300_000)
B = dict(teacher="wrn40_1", t_key="tB", t_top1=(93.0, 93.5), t_params=600_000, model="wrn16_1", s_params=175_000)


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "bench")
    runs = [teacher_run("resnet20", "tA", 90.0, 91.0, 1_200_000),
            teacher_run("resnet20", "old", 50.0, 50.0, 1_200_000),
            teacher_run("wrn40_1", "tB", 93.0, 93.5, 600_000)]
    table_a = {"ce": ([70, 71, 72], [71, 72, 73]), "kd": ([72, 73, 74], [75, 75, 75]),
               "attention": ([69, 71, 70], [76, 77, 78])}
    for variant, (last, best) in table_a.items():
        for seed in range(3):
            runs.append(student(f"a-{variant}-{seed}", **A, variant=variant, seed=seed,
                                last=float(last[seed]), best=float(best[seed])))
    table_b = {"ce": [90, 91, 92], "kd": [91, 93, None], "attention": [92, 93, "failed"]}
    for variant, values in table_b.items():
        for seed, v in enumerate(values):
            if v is None:
                continue  # not run yet
            if v == "failed":
                runs.append(student(f"b-{variant}-{seed}", **B, variant=variant, seed=seed, last=None, best=None,
                                    status="failed", error=NAN_ERROR))
            else:
                runs.append(student(f"b-{variant}-{seed}", **B, variant=variant, seed=seed,
                                    last=float(v), best=float(v) + 0.5))
    # Noise the report must ignore: a variant outside the plan, a seed outside the plan.
    runs.append(student("x-rkd-0", **A, variant="rkd", seed=0, last=1.0, best=1.0))
    runs.append(student("x-kd-9", **A, variant="kd", seed=9, last=1.0, best=1.0))
    for r in runs:
        s.write_run(r)
    s.write_bench(bench(runs, **BENCH))
    return s


def cells(summary, row):
    return {c.variant: c for c in summary.rows[row].cells}


def test_means_stds_and_paired_delta(store):
    s = summarize(store.runs(), store.bench())
    assert [(r.teacher, r.student) for r in s.rows] == [("resnet20", "mobilenet"), ("wrn40_1", "wrn16_1")]
    assert s.columns == ["ce", "kd", "attention"] and s.seeds == [0, 1, 2]
    a = cells(s, 0)
    assert (a["ce"].stat.mean, a["ce"].stat.std, a["ce"].stat.n) == (71.0, 1.0, 3)
    assert (a["kd"].stat.mean, a["kd"].stat.std) == (73.0, 1.0)
    assert a["kd"].delta.values == [2.0, 2.0, 2.0] and a["kd"].delta.mean == 2.0 and a["kd"].delta.std == 0.0
    assert a["attention"].delta.values == [-1.0, 0.0, -2.0] and a["attention"].delta.mean == -1.0
    assert a["ce"].delta is None
    assert [c.best for c in a.values()] == [False, True, False]
    row = s.rows[0]
    assert row.teacher_stat.values == [90.0]  # the stale teacher (key "old") is not this pair's
    assert (row.teacher_params, row.student_params) == (1_200_000, 300_000)

    b = cells(s, 1)
    assert b["kd"].stat.seeds == [0, 1] and b["kd"].missing_seeds == [2] and b["kd"].status == "partial"
    assert b["kd"].stat.mean == 92.0 and b["kd"].stat.std == pytest.approx(math.sqrt(2))
    assert b["kd"].delta.values == [1.0, 2.0] and b["kd"].delta.std == pytest.approx(math.sqrt(0.5))
    assert b["attention"].failed_seeds == [2] and b["attention"].stat.mean == 92.5
    assert b["attention"].stat.std == pytest.approx(math.sqrt(0.5)) and b["attention"].delta.mean == 2.0
    assert [c.best for c in b.values()] == [False, False, True]
    assert s.rows[1].teacher_stat.values == [93.0]  # found through its top-level model/key
    assert [(f.variant, f.seed, f.run_id) for f in s.failures] == [("attention", 2, "b-attention-2")]
    assert "\n" not in s.failures[0].error and s.failures[0].error.startswith("Loss became non-finite (nan)")


def test_best_epoch_switch(store):
    last, best = summarize(store.runs(), store.bench(), "last"), summarize(store.runs(), store.bench(), "best")
    assert "last-epoch top-1" in last.caption and "best-epoch top-1" in best.caption
    a = cells(best, 0)
    assert (a["ce"].stat.mean, a["kd"].stat.mean, a["kd"].stat.std, a["attention"].stat.mean) == (72.0, 75.0, 0.0, 77.0)
    assert a["kd"].delta.values == [4.0, 3.0, 2.0] and a["kd"].delta.mean == 3.0 and a["kd"].delta.std == 1.0
    assert [c.best for c in a.values()] == [False, False, True]  # attention wins on best-epoch, kd on last
    assert best.rows[0].teacher_stat.mean == 91.0
    md = to_markdown(best)
    assert "| resnet20 → mobilenet | 91.00 | 1.20M | 0.30M | 72.00 ± 1.00 (n=3) rank 3 " \
           "| 75.00 ± 0.00 (n=3) rank =1<br>Δ +3.00 [+0.52, +5.48]† " \
           "| **77.00 ± 1.00**\\* (n=3) rank =1<br>Δ +5.00 [+5.00, +5.00]† |" in md
    with pytest.raises(KDZooError, match="'last'"):
        summarize(store.runs(), store.bench(), "final")


def test_reference_in_error(store):
    s = summarize(store.runs(), store.bench())
    assert s.reference_metric == "error" and "100 − top-1" in s.caption
    b = cells(s, 1)
    assert b["ce"].reference == 8.77 and b["ce"].reference_ours == 9.0  # "student" names the ce baseline
    assert b["ce"].reference_diff == pytest.approx(9.0 - 8.77)
    assert (b["kd"].reference_ours, b["kd"].reference_diff) == (8.0, pytest.approx(-0.39))
    assert (b["attention"].reference_ours, b["attention"].reference_diff) == (7.5, pytest.approx(-0.75))
    row = s.rows[1]
    assert (row.teacher_reference, row.teacher_reference_ours) == (6.58, 7.0)
    assert row.teacher_reference_diff == pytest.approx(0.42)
    assert all(c.reference is None for c in s.rows[0].cells)  # no published row for that pair


def test_markdown(store):
    md = to_markdown(summarize(store.runs(), store.bench()))
    lines = md.splitlines()
    assert lines[0] == "hand-made store"
    assert lines[2].startswith("**unit**: last-epoch top-1 accuracy (%)") and "2 epochs, 100 train images" in lines[2]
    assert "| Teacher → Student | Teacher top-1 | Teacher params | Student params | ce | kd | attention |" in lines
    assert "| resnet20 → mobilenet | 90.00 | 1.20M | 0.30M | 71.00 ± 1.00 (n=3) rank =1 " \
           "| **73.00 ± 1.00**\\* (n=3) rank =1<br>Δ +2.00 [+2.00, +2.00]† " \
           "| 70.00 ± 1.00 (n=3) rank =1<br>Δ -1.00 [-3.48, +1.48] |" in lines
    assert "| wrn40_1 → wrn16_1 | 93.00<br>err 7.00 vs ref 6.58 (+0.42) | 0.60M | 0.17M " \
           "| 91.00 ± 1.00 (n=3) rank =1<br>err 9.00 vs ref 8.77 (+0.23) " \
           "| 92.00 ± 1.41 (n=2) rank =1<br>Δ +1.50 [-4.85, +7.85]<br>1 missing<br>err 8.00 vs ref 8.39 (-0.39) " \
           "| **92.50 ± 0.71**\\* (n=2) rank =1<br>Δ +2.00 [+2.00, +2.00]†<br>1 failed" \
           "<br>err 7.50 vs ref 8.25 (-0.75) |" in lines
    assert "Reference: Zagoruyko & Komodakis, ICLR 2017, Table 2" in lines
    assert "- wrn40_1 → wrn16_1 attention seed 2 (b-attention-2): Loss became non-finite (nan) at epoch 2, step 3. " \
           "Lower the learning rate." in lines


def test_csv(store):
    rows = list(csv.DictReader(io.StringIO(to_csv(summarize(store.runs(), store.bench())))))
    assert len(rows) == 6
    assert list(rows[0])[:14] == ["teacher", "student", "variant", "metric", "n", "mean", "std", "delta_vs_ce",
                                  "delta_std", "seeds", "reference", "reference_diff", "teacher_top1", "student_params"]
    by = {(r["teacher"], r["variant"]): r for r in rows}
    kd = by["resnet20", "kd"]
    assert (kd["student"], kd["metric"], kd["n"], kd["seeds"]) == ("mobilenet", "last", "3", "0;1;2")
    assert (float(kd["mean"]), float(kd["std"]), float(kd["delta_vs_ce"]), float(kd["delta_std"])) == (73.0, 1.0, 2.0, 0.0)
    assert (kd["reference"], kd["teacher_top1"], kd["student_params"], kd["best"]) == ("", "90.0000", "300000", "true")
    ce = by["resnet20", "ce"]
    assert (ce["delta_vs_ce"], ce["delta_std"]) == ("", "")
    at = by["wrn40_1", "attention"]
    assert (at["n"], at["seeds"], at["status"], at["failed_seeds"]) == ("2", "0;1", "partial", "2")
    assert (float(at["mean"]), float(at["std"]), float(at["delta_vs_ce"])) == (92.5, 0.7071, 2.0)
    assert (float(at["reference"]), float(at["reference_diff"]), at["reference_metric"]) == (8.25, -0.75, "error")
    kd_b = by["wrn40_1", "kd"]
    assert (float(kd_b["std"]), float(kd_b["delta_vs_ce"]), kd_b["missing_seeds"]) == (1.4142, 1.5, "2")
    assert float(by["wrn40_1", "ce"]["reference_diff"]) == 0.23


def test_json_round_trip_and_export(store, tmp_path):
    s = summarize(store.runs(), store.bench())
    data = to_json(s)
    assert json.loads(json.dumps(data)) == data
    assert (data["metric"], data["seeds"], data["columns"]) == ("last", [0, 1, 2], ["ce", "kd", "attention"])
    assert data["reference"] == {"source": "Zagoruyko & Komodakis, ICLR 2017, Table 2", "metric": "error"}
    att = next(c for c in data["cells"] if c["teacher"] == "wrn40_1" and c["variant"] == "attention")
    assert (att["values"], att["seeds"], att["failed_seeds"], att["delta_vs_ce"]) == ([92.0, 93.0], [0, 1], [2], 2.0)
    assert data["failures"] == [{"teacher": "wrn40_1", "student": "wrn16_1", "variant": "attention", "seed": 2,
                                 "run_id": "b-attention-2", "error": " ".join(NAN_ERROR.split())}]
    paths = export(s, tmp_path / "out")
    assert [p.name for p in paths] == ["report.md", "report.csv", "report.json"]
    assert paths[0].read_text(encoding="utf-8") == to_markdown(s)
    assert paths[1].read_text(encoding="utf-8") == to_csv(s)
    assert json.loads(paths[2].read_text()) == data
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.csv", "report.json", "report.md"]
    assert to_json(summarize_dir(store.root)) == data  # from the folder alone


def test_rich_table(store):
    s = summarize(store.runs(), store.bench())
    console = Console(record=True, width=200, color_system="standard", force_terminal=True)
    render_table(s, console)
    styled = console.export_text(styles=True)
    text = Console(record=True, width=200)
    render_table(s, text)
    out = text.export_text()
    for expected in ("unit: last-epoch top-1", "71.00 ± 1.00 (n=3)", "73.00 ± 1.00* (n=3)", "Δ +2.00", "Δ -1.00",
                     "92.50 ± 0.71* (n=2)", "1 failed", "1 missing", "err 7.50 vs ref 8.25 (-0.75)",
                     "err 7.00 vs ref 6.58 (+0.42)", "1.20M", "0.17M", "2 epochs, 100 train images",
                     "Reference: Zagoruyko & Komodakis, ICLR 2017, Table 2",
                     "wrn40_1 → wrn16_1 attention seed 2 (b-attention-2): Loss became non-finite"):
        assert expected in out, expected
    assert "\x1b[32mΔ +2.00" in styled and "\x1b[31mΔ -1.00" in styled  # green / red


def test_failed_missing_and_checkpoint_teacher():
    """A cell with every seed failed, a column never run, Δ over fewer pairs, and a teacher without a record."""
    t = dict(teacher="resnet56", t_key="ckpt", t_top1=(94.0, 94.2), t_params=850_000, model="resnet8", s_params=78_000)
    runs = [
        student("ce-0", **t, variant="ce", seed=0, last=None, best=None, status="failed", error="boom"),
        student("ce-1", **t, variant="ce", seed=1, last=80.0, best=80.0),
        student("kd-0", **t, variant="kd(T=2)", method="kd", seed=0, last=81.0, best=81.0),
        student("kd-1", **t, variant="kd(T=2)", method="kd", seed=1, last=83.0, best=83.0),
        student("at-0", **t, variant="attention", seed=0, last=None, best=None, status="failed", error="bad shapes"),
    ]
    b = bench(runs, name="x", columns=["ce", "kd(T=2)", "attention", "rkd"], pairs=[["resnet56", "resnet8"]],
              seeds=[0, 1], reference={"source": "paper", "metric": "top1", "rows": [
                  {"teacher": "resnet56", "student": "resnet8", "values": {"kd": 82.5, "rkd": "—"}}]})
    s = summarize(runs, b)
    c = cells(s, 0)
    assert c["ce"].status == "partial" and c["ce"].failed_seeds == [0]
    assert c["kd(T=2)"].delta.seeds == [1] and c["kd(T=2)"].delta.mean == 3.0
    assert c["kd(T=2)"].reference == 82.5 and c["kd(T=2)"].reference_diff == -0.5  # by method name, top-1
    assert c["attention"].status == "failed" and c["rkd"].status == "missing" and c["rkd"].reference is None
    # no teacher record: the students' teacher blocks supply its numbers
    assert s.rows[0].teacher_stat.values == [94.0] and s.rows[0].teacher_params == 850_000
    assert summarize(runs, b, "best").rows[0].teacher_stat.values == [94.2]
    line = next(l for l in to_markdown(s).splitlines() if l.startswith("| resnet56"))
    # one pair: no interval; ce's single run (a point) lies inside kd's interval 82 ± 12.7: tied
    assert line == ("| resnet56 → resnet8 | 94.00 | 0.85M | 0.08M | 80.00 (n=1) rank =1<br>1 failed "
                    "| **82.00 ± 1.41**\\* (n=2) rank =1<br>Δ +3.00 (1 paired)<br>82.00 vs ref 82.50 (-0.50) "
                    "| failed | — |")
    assert c["kd(T=2)"].delta_ci.low is None and c["kd(T=2)"].delta_ci.reason == "one seed: no interval"
    assert (c["attention"].rank, c["rkd"].rank) == ("", "")
    assert [f.run_id for f in s.failures] == ["ce-0", "at-0"]
    with pytest.raises(KDZooError, match="'error'"):
        summarize(runs, bench(runs, columns=["ce"], pairs=[], reference={"source": "p", "metric": "acc", "rows": []}))


def test_teacher_runs_checkpoint_failed_and_planned_key():
    """A checkpoint teacher without a best-epoch number, a failed teacher, and bench.json's planned teacher keys."""
    ckpt = teacher_run("t1", "k1", 94.0, None, 2_000_000, source="checkpoint")
    bad = teacher_run("t2", "k2", None, None, 3_000_000, status="failed", error="Loss became non-finite.")
    stale = teacher_run("t1", "k0", 10.0, None, 2_000_000, source="checkpoint")
    b = bench([], columns=["ce", "kd"], pairs=[["t1", "s"], ["t2", "s"]],
              teachers={"t1": "k1", "t2": "k2"})  # no student has run yet: the planned keys decide
    last = summarize([stale, ckpt, bad], b)
    assert [(r.teacher_status, r.teacher_stat.values, r.teacher_params) for r in last.rows] == \
        [("ok", [94.0], 2_000_000), ("failed", [], 3_000_000)]
    best = summarize([stale, ckpt, bad], b, "best")
    assert best.rows[0].teacher_status == "missing"  # unknown, not failed
    assert [f.run_id for f in best.failures] == ["teacher-k2"]
    md = to_markdown(last)
    assert "| t1 → s | 94.00 | 2.00M | — | — | — |" in md and "| t2 → s | failed | 3.00M | — | — | — |" in md
    assert "- teacher t2 (teacher-k2): Loss became non-finite." in md


def test_only_the_current_plans_runs_are_shown():
    """A folder rerun with an edited YAML keeps old records; bench.json's run_ids decide what counts."""
    t = dict(teacher="t", t_key="k", t_top1=(90.0, 90.0), t_params=10, model="s", s_params=1000)
    records = [student("new-ce", **t, variant="ce", seed=0, last=50.0, best=50.0),
               student("new-kd", **t, variant="kd", seed=0, last=55.0, best=55.0),
               student("old-ce", **t, variant="ce", seed=0, last=10.0, best=10.0)]
    b = bench(records[:2], columns=["ce", "kd"], pairs=[["t", "s"]])
    row = summarize(records, b).rows[0]
    assert {name: cell.stat.values for name, cell in zip(["ce", "kd"], row.cells)} == {"ce": [50.0], "kd": [55.0]}


def test_wide_benchmarks_are_laid_out_a_row_per_method():
    """Eight methods and one pair: a row per method, so that every cell keeps its width."""
    columns = ["ce", "kd", "dkd", "dist", "fitnets", "attention", "rkd", "crd"]
    records = [teacher_run("resnet32", "tA", 60.0, 61.0, 470_000)]
    records += [student(f"r{i}", **{**A, "teacher": "resnet32", "model": "resnet8"}, variant=v, seed=0,
                        last=30.0 + i, best=31.0 + i) for i, v in enumerate(columns)]
    summary = summarize(records, bench(records, columns=columns, pairs=[["resnet32", "resnet8"]],
                                       teachers={"resnet32": "tA"}))
    md = to_markdown(summary).splitlines()
    header = next(line for line in md if line.startswith("| "))
    assert header == "| Method | resnet32 → resnet8 |"
    body = [line for line in md if line.startswith("| ") and line != header]
    assert [line.split(" | ")[0] for line in body] == [
        "| Teacher top-1", "| Teacher params", "| Student params", *(f"| {c}" for c in columns)]
    assert "37.00" in body[-1] and "Δ +7.00" in body[-1]  # crd: 30 + 7, and its paired gain over ce
    console = Console(record=True, width=60)
    render_table(summary, console)
    text = console.export_text()
    assert "37.00* (n=1)" in text and "Δ +7.00" in text  # nothing squeezed out at 60 columns
    # five methods keep the row-per-pair layout
    few = summarize(records, bench(records, columns=columns[:5], pairs=[["resnet32", "resnet8"]],
                                   teachers={"resnet32": "tA"}))
    assert "| Teacher → Student | Teacher top-1 |" in to_markdown(few)
    # ... in files and wide terminals; a terminal too narrow for them gets a row per method too
    assert not transposed(few) and not transposed(few, width=220) and transposed(few, width=100)
    narrow = Console(record=True, width=100)
    render_table(few, narrow)
    lines = narrow.export_text().splitlines()
    assert max(len(line) for line in lines) <= 100
    assert any(line.startswith("│ fitnets") and "34.00* (n=1)" in line for line in lines)  # 30 + 4, best


T975 = {1: 12.706204736, 2: 4.30265273}  # two-sided 95% Student-t quantiles, from printed tables


def test_delta_confidence_intervals_and_ranks(store):
    last, best = summarize(store.runs(), store.bench(), "last"), summarize(store.runs(), store.bench(), "best")
    a, b, a_best = cells(last, 0), cells(last, 1), cells(best, 0)
    half3 = T975[2] * 1.0 / math.sqrt(3)  # s = 1 over three pairs
    att = a["attention"].delta_ci
    assert (att.mean, att.n, att.level) == (-1.0, 3, 0.95)
    assert (att.low, att.high) == (pytest.approx(-1 - half3, abs=1e-7), pytest.approx(-1 + half3, abs=1e-7))
    assert not att.excludes_zero
    assert (a["kd"].delta_ci.low, a["kd"].delta_ci.high) == (2.0, 2.0) and a["kd"].delta_ci.excludes_zero
    kd_b = b["kd"].delta_ci  # two pairs: 1.5 ± 12.706·√0.5/√2
    assert (kd_b.low, kd_b.high) == (pytest.approx(1.5 - T975[1] * 0.5, abs=1e-7),
                                     pytest.approx(1.5 + T975[1] * 0.5, abs=1e-7))
    kd_best = a_best["kd"].delta_ci
    assert (kd_best.low, kd_best.high) == (pytest.approx(3 - half3, abs=1e-7), pytest.approx(3 + half3, abs=1e-7))
    assert kd_best.excludes_zero and a["ce"].delta_ci is None
    assert [c.rank for c in a.values()] == ["=1", "=1", "=1"]  # the top-1 intervals (± 2.48) all overlap
    assert [c.rank for c in a_best.values()] == ["3", "=1", "=1"]

    rows = {(r["teacher"], r["variant"]): r for r in csv.DictReader(io.StringIO(to_csv(last)))}
    assert CSV_COLUMNS[-5:] == ["delta_ci_low", "delta_ci_high", "delta_significant", "rank", "rank_tied"]
    assert list(rows["resnet20", "ce"]) == CSV_COLUMNS
    at = rows["resnet20", "attention"]
    assert (float(at["delta_ci_low"]), float(at["delta_ci_high"])) == (round(-1 - half3, 4), round(-1 + half3, 4))
    assert (at["delta_significant"], at["rank"], at["rank_tied"]) == ("false", "1", "true")
    assert (rows["resnet20", "kd"]["delta_significant"], rows["resnet20", "ce"]["delta_significant"]) == ("true", "")
    data = to_json(best)
    kd = next(c for c in data["cells"] if c["teacher"] == "resnet20" and c["variant"] == "kd")
    assert (kd["delta_ci_low"], kd["delta_ci_high"]) == (pytest.approx(3 - half3), pytest.approx(3 + half3))
    assert (kd["delta_significant"], kd["rank"], kd["rank_tied"], kd["delta_ci_level"]) == (True, 1, True, 0.95)
    assert data["confidence_level"] == 0.95
    ce = next(c for c in data["cells"] if c["teacher"] == "resnet20" and c["variant"] == "ce")
    assert (ce["delta_ci_low"], ce["delta_significant"], ce["rank"], ce["rank_tied"]) == (None, None, 3, False)

    console = Console(record=True, width=200)
    render_table(best, console)
    out = console.export_text()
    for expected in ("72.00 ± 1.00 (n=3) rank 3", "Δ +3.00 [+0.52, +5.48]†", "† = the interval excludes 0",
                     "95% confidence interval, Student's t"):
        assert expected in " ".join(out.split()), expected


def test_one_seed_shows_no_interval_and_says_why():
    t = dict(teacher="t", t_key="k", t_top1=(90.0, 90.0), t_params=10, model="s", s_params=1000)
    records = [student(f"r-{v}", **t, variant=v, seed=0, last=top1, best=top1)
               for v, top1 in (("ce", 50.0), ("kd", 55.0), ("rkd", 55.0), ("dkd", 49.0))]
    summary = summarize(records, bench(records, columns=["ce", "kd", "rkd", "dkd"], pairs=[["t", "s"]]))
    assert "one seed: no confidence intervals and no † marks (an interval needs at least 2 seeds)" in summary.caption
    row = cells(summary, 0)
    assert row["kd"].delta_ci.reason == "one seed: no interval" and row["kd"].delta_ci.low is None
    assert {v: c.rank for v, c in row.items()} == {"ce": "3", "kd": "=1", "rkd": "=1", "dkd": "4"}  # by top-1 alone
    md = to_markdown(summary)
    assert "| 50.00 (n=1) rank 3 | **55.00**\\* (n=1) rank =1<br>Δ +5.00 | **55.00**\\* (n=1) rank =1<br>Δ +5.00 " \
           "| 49.00 (n=1) rank 4<br>Δ -1.00 |" in md
    assert "[" not in md.split("| Teacher")[1] and "†" not in md.split("| Teacher")[1]
    kd = next(r for r in csv.DictReader(io.StringIO(to_csv(summary))) if r["variant"] == "kd")
    assert (kd["delta_ci_low"], kd["delta_ci_high"], kd["delta_significant"], kd["rank"], kd["rank_tied"]) == \
        ("", "", "", "1", "true")
