"""The benchmark summary: run records → the numbers of a table laid out like published KD tables.

One row per (teacher → student) pair, one column per method variant (``ce``, the student trained
alone, first). A cell holds top-1 (%) as mean ± sample std over seeds with n, and Δ against the CE
baseline: the mean of *paired* per-seed differences (method seed s − ce seed s, over the seeds
both have), so the comparison shares initial weights and batches, with the 95% Student-t confidence
interval of those differences (:mod:`kdzoo.stats`; none with fewer than two pairs). Each cell with
data is ranked within its row by top-1 (:func:`kdzoo.stats.ranks`: ties where the 95% intervals of
top-1 over seeds cannot separate them), once the row has two cells with data. The teacher's accuracy
and both networks' parameter counts sit alongside. With a ``reference`` block, each cell with a
published number shows ours beside theirs (converted to test error when the reference is in error)
and the difference ours − theirs. Rendering (rich, Markdown, CSV, JSON) is :mod:`kdzoo.report`'s.

Inputs (``summarize``): the typed records of :mod:`kdzoo.records` as the store reads them
(``RunRecord`` and ``TeacherRecord``) and the folder's ``BenchRecord``. Only the records of the
current plan count (``bench.run_ids``, ``bench.teachers``). A pair's teacher is the teacher record
whose key its students name (before any student has run, the key the plan names); without a
teacher record, the students' ``teacher`` blocks supply its numbers.

Cell states: ``ok`` (every seed finished), ``partial`` (some seeds finished, others failed or not
run: stats cover the finished seeds and the cell says what is missing), ``failed`` (no seed
finished, at least one failed), ``missing`` (nothing run yet, shown as "—") and ``n/a`` (the method
cannot serve the pair, decided at plan validation; the reason is listed under the table).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdzoo import KDZooError
from kdzoo.records import BenchRecord, Record, RunRecord, TeacherRecord
from kdzoo.stats import Interval, ranks, t_interval
from kdzoo.store import Store

METRICS = {"last": "last-epoch top-1", "best": "best-epoch top-1"}
REFERENCE_METRICS = ("top1", "error")
CONFIDENCE = 0.95  # the level of every interval in the report
SIGNIFICANT = "†"  # marks a Δ whose confidence interval excludes zero


@dataclass
class Stat:
    """Mean ± sample std (ddof=1; None when n < 2) of ``values``, one per seed."""

    seeds: list[int]
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) >= 2 else None


@dataclass
class Cell:
    """One (pair, variant) cell. ``reference_ours`` is ours in the reference metric (error = 100 − top-1)."""

    variant: str
    method: str
    stat: Stat
    status: str  # "ok" | "partial" | "failed" | "missing" | "n/a"
    failed_seeds: list[int] = field(default_factory=list)
    missing_seeds: list[int] = field(default_factory=list)
    delta: Stat | None = None  # paired differences vs ce; None for the ce column itself
    delta_ci: Interval | None = None  # their CONFIDENCE t-interval (low/high None under 2 pairs); None for ce
    rank: str = ""  # within the row by top-1 (kdzoo.stats.ranks: "1", "=2"); "" unranked
    best: bool = False
    reference: float | None = None
    reference_ours: float | None = None
    reference_diff: float | None = None
    method_params: int | None = None


@dataclass
class Row:
    teacher: str
    student: str
    teacher_stat: Stat  # one value per distinct teacher (usually one)
    teacher_status: str  # "ok" | "failed" | "missing"
    teacher_params: int | None
    student_params: int | None
    cells: list[Cell]
    teacher_reference: float | None = None
    teacher_reference_ours: float | None = None
    teacher_reference_diff: float | None = None

    @property
    def label(self) -> str:
        return f"{self.teacher} → {self.student}"


@dataclass
class Failure:
    teacher: str | None
    student: str
    variant: str  # "teacher" for a failed teacher run
    seed: int | None
    run_id: str
    error: str


@dataclass
class Summary:
    name: str
    description: str
    budget: str
    metric: str  # "last" | "best"
    seeds: list[int]
    columns: list[str]
    rows: list[Row]
    failures: list[Failure]
    reference_source: str | None = None
    reference_metric: str | None = None  # "top1" | "error"
    not_applicable: list[str] = field(default_factory=list)  # "teacher → student column: reason"

    @property
    def metric_label(self) -> str:
        return METRICS[self.metric]

    @property
    def caption(self) -> str:
        parts = [f"{self.metric_label} accuracy (%), mean ± std over seeds (n per cell; {len(self.seeds)} seeds planned)"]
        if self.budget:
            parts.append(self.budget)
        level = f"{CONFIDENCE:.0%}"
        if len(self.seeds) == 1:
            parts.append("Δ = paired difference vs ce (same seed); * = best of the pair")
            parts.append(f"one seed: no confidence intervals and no {SIGNIFICANT} marks (an interval needs at least "
                         "2 seeds); rank orders the single runs by top-1 alone (= tied)")
        else:
            parts.append(f"Δ = mean paired difference vs ce (same seed) [its {level} confidence interval, "
                         "Student's t; none under 2 pairs]")
            parts.append(f"{SIGNIFICANT} = the interval excludes 0; * = best of the pair; rank = 1 + the methods whose "
                         f"{level} interval of top-1 lies wholly above (= tied)")
        if self.reference_source is not None:
            if self.reference_metric == "error":
                parts.append("reference in test error (%): ours converted to error = 100 − top-1, diff = ours − reference")
            else:
                parts.append("reference in top-1 (%): diff = ours − reference")
        return "; ".join(parts)


# -- building the summary ----------------------------------------------------------------------
def _top1(rec: RunRecord | TeacherRecord, metric: str) -> float | None:
    scores = rec.last if metric == "last" else rec.best
    return scores.top1 if scores is not None else None


def _one_line(text: Any) -> str:
    return " ".join(str(text or "unknown error").split())


def _number(value: Any) -> float | None:
    """A published number, or None for an empty entry ("—", null)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _runs_by_seed(students: list[RunRecord], pair: tuple[str, str], variant: str,
                  seeds: list[int]) -> dict[int, RunRecord]:
    """The record of each seed for one cell (run ids are unique per seed within a plan)."""
    t_model, s_model = pair
    found = [r for r in students if r.variant == variant and r.model == s_model and r.seed in seeds
             and r.teacher.model == t_model]
    return {r.seed: r for r in sorted(found, key=lambda r: r.seed)}


def _failure(rec: RunRecord | TeacherRecord, metric: str, teacher: str | None, student: str,
             variant: str) -> Failure:
    error = rec.error if rec.status != "ok" else f"the run recorded no {metric}-epoch metrics"
    return Failure(teacher, student, variant, rec.seed, rec.run_id, _one_line(error))


def _cell(runs: dict[int, RunRecord], pair: tuple[str, str], variant: str, seeds: list[int], metric: str,
          failures: list[Failure]) -> Cell:
    vals: dict[int, float] = {}
    failed: list[int] = []
    for seed, r in runs.items():
        top1 = _top1(r, metric) if r.status == "ok" else None
        if top1 is None:
            failed.append(seed)
            failures.append(_failure(r, metric, pair[0], pair[1], variant))
        else:
            vals[seed] = top1
    missing = [s for s in seeds if s not in runs]
    status = "missing" if not runs else "failed" if not vals else "ok" if not failed and not missing else "partial"
    method = next((r.method for r in runs.values()), variant.split("(")[0])
    method_params = next((r.method_params for r in runs.values() if r.method_params is not None), None)
    return Cell(variant, method, Stat(list(vals), list(vals.values())), status, failed, missing,
                method_params=method_params)


def _teacher(teachers: list[TeacherRecord], pair_records: list[RunRecord], t_model: str, metric: str,
             planned_key: str | None, failures: list[Failure]) -> tuple[Stat, str, int | None]:
    """(accuracy, status, params) of the teacher(s) this pair's students distilled from.

    The teacher records decide; without one (its file was damaged and set aside, say) the students'
    ``teacher`` blocks supply the numbers."""
    keys = {r.teacher.key for r in pair_records} or ({planned_key} if planned_key else set())
    runs = [r for r in teachers if r.model == t_model and (not keys or r.key in keys)]
    vals: list[float] = []
    params = None
    failed = False
    for r in runs:
        params = params or r.params
        if r.status != "ok":
            failed = True
            failures.append(_failure(r, metric, None, t_model, "teacher"))
        elif _top1(r, metric) is not None:  # a user checkpoint may carry no best-epoch number
            vals.append(_top1(r, metric))
    refs = list({r.teacher.key: r.teacher for r in pair_records}.values())
    if not runs:
        vals = [v for v in ((b.top1 if metric == "last" else b.best_top1) for b in refs) if v is not None]
    if params is None:
        params = next((b.params for b in refs if b.params is not None), None)
    status = "ok" if vals else "failed" if failed else "missing"
    return Stat(list(range(len(vals))), vals), status, params


def _apply_reference(row: Row, published: dict[str, Any], ref_metric: str) -> None:
    """Set ours-vs-theirs on every cell with a published number (keyed by label, method, or 'teacher')."""
    def ours(top1: float | None) -> float | None:
        return None if top1 is None else 100.0 - top1 if ref_metric == "error" else top1

    for cell in row.cells:
        lookup = [cell.variant, cell.method] + (["student"] if cell.variant == "ce" else [])
        theirs = next((_number(published[k]) for k in lookup if _number(published.get(k)) is not None), None)
        if theirs is not None:
            cell.reference, cell.reference_ours = theirs, ours(cell.stat.mean)
            cell.reference_diff = None if cell.reference_ours is None else cell.reference_ours - theirs
    theirs = _number(published.get("teacher"))
    if theirs is not None:
        row.teacher_reference, row.teacher_reference_ours = theirs, ours(row.teacher_stat.mean)
        if row.teacher_reference_ours is not None:
            row.teacher_reference_diff = row.teacher_reference_ours - theirs


def summarize(records: list[Record], bench: BenchRecord, metric: str = "last") -> Summary:
    """Aggregate run records into the benchmark table (see the module docstring for the layout)."""
    if metric not in METRICS:
        raise KDZooError(f"Unknown accuracy '{metric}' for the report. Use 'last' (last-epoch top-1) or 'best' (best-epoch top-1).")
    columns = list(bench.columns)
    pairs = [(t, s) for t, s in bench.pairs]
    ref = bench.reference
    ref_metric = ref.get("metric", "top1") if ref is not None else None
    if ref is not None and ref_metric not in REFERENCE_METRICS:
        raise KDZooError(
            f"The reference block's metric is '{ref_metric}'. Use 'top1' (accuracy, %) or 'error' (test error, %)."
        )
    ref_rows = {(str(r["teacher"]), str(r["student"])): r.get("values") or {} for r in (ref or {}).get("rows", [])}

    # A folder rerun with an edited YAML keeps the old records; show only the current plan's.
    planned = set(bench.run_ids)
    current_teachers = {f"teacher-{key}" for key in bench.teachers.values()}
    students = [r for r in records if isinstance(r, RunRecord) and r.run_id in planned]
    teachers = [r for r in records if isinstance(r, TeacherRecord) and r.run_id in current_teachers]
    seeds = list(bench.seeds)

    failures: list[Failure] = []
    rows: list[Row] = []
    not_applicable = {(u["teacher"], u["student"], u["column"]): u["reason"] for u in bench.unsupported}
    for pair in pairs:
        by_variant = {v: _runs_by_seed(students, pair, v, seeds) for v in columns}
        cells = [_cell(by_variant[v], pair, v, seeds, metric, failures) for v in columns]
        for c in cells:
            if (pair[0], pair[1], c.variant) in not_applicable and not c.stat.n:
                c.status = "n/a"
        ce = next((c for c in cells if c.variant == "ce"), None)
        if ce is not None:
            ce_vals = dict(zip(ce.stat.seeds, ce.stat.values))
            for cell in cells:
                if cell is not ce:
                    paired = [(s, v - ce_vals[s]) for s, v in zip(cell.stat.seeds, cell.stat.values) if s in ce_vals]
                    cell.delta = Stat([s for s, _ in paired], [d for _, d in paired])
                    cell.delta_ci = t_interval(cell.delta.values, CONFIDENCE)
        with_data = [c for c in cells if c.stat.n]
        if len(with_data) >= 2:
            top = max(c.stat.mean for c in with_data)
            for c in with_data:
                c.best = c.stat.mean == top
            order = ranks({c.variant: t_interval(c.stat.values, CONFIDENCE) for c in with_data})
            for c in with_data:
                c.rank = order[c.variant]

        pair_records = [r for runs in by_variant.values() for r in runs.values()]
        student_params = next((r.params for r in pair_records if r.params is not None), None)
        t_stat, t_status, t_params = _teacher(teachers, pair_records, pair[0], metric, bench.teachers.get(pair[0]),
                                              failures)
        row = Row(pair[0], pair[1], t_stat, t_status, t_params, student_params, cells)
        if ref_rows.get(pair):
            _apply_reference(row, ref_rows[pair], ref_metric)
        rows.append(row)

    # A teacher shared by two pairs is listed once.
    seen: set[str] = set()
    failures = [f for f in failures if not (f.run_id in seen or seen.add(f.run_id))]
    return Summary(
        name=bench.name, description=bench.description, budget=bench.budget, metric=metric, seeds=seeds,
        columns=columns, rows=rows,
        failures=failures, reference_source=(str(ref.get("source", "")) if ref is not None else None),
        reference_metric=ref_metric,
        not_applicable=[f"{t} → {st} {col}: {_one_line(reason)}" for (t, st, col), reason in not_applicable.items()],
    )


def summarize_dir(root: str | Path, metric: str = "last") -> Summary:
    """``summarize`` the store in benchmark folder ``root`` (no training)."""
    store = Store(root)
    return summarize(store.runs(), store.bench(), metric)
