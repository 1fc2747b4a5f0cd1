"""The benchmark table: run records → a summary laid out like published KD tables.

One row per (teacher → student) pair, one column per method variant (``ce``, the student trained
alone, first). A cell holds top-1 (%) as mean ± sample std over seeds with n, and Δ against the CE
baseline: the mean of *paired* per-seed differences (method seed s − ce seed s, over the seeds
both have), so the comparison shares initial weights and batches. The teacher's accuracy and both
networks' parameter counts sit alongside. With a ``reference`` block, each cell with a published
number shows ours beside theirs (converted to test error when the reference is in error) and the
difference ours − theirs.

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

import csv
import io
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.table import Table
from rich.text import Text

from kdzoo import KDZooError
from kdzoo.checkpoint import atomic_write
from kdzoo.records import BenchRecord, Record, RunRecord, TeacherRecord
from kdzoo.store import Store, write_json

METRICS = {"last": "last-epoch top-1", "best": "best-epoch top-1"}
REFERENCE_METRICS = ("top1", "error")
CSV_COLUMNS = [
    "teacher", "student", "variant", "metric", "n", "mean", "std", "delta_vs_ce", "delta_std", "seeds",
    "reference", "reference_diff", "teacher_top1", "student_params",
    # extras, after the agreed columns
    "method", "status", "best", "delta_n", "failed_seeds", "missing_seeds", "reference_metric",
    "reference_ours", "teacher_params", "method_params",
]


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
        parts.append("Δ = mean paired difference vs ce (same seed); * = best in row")
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
        with_data = [c for c in cells if c.stat.n]
        if len(with_data) >= 2:
            top = max(c.stat.mean for c in with_data)
            for c in with_data:
                c.best = c.stat.mean == top

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


# -- cell text (shared by every renderer) ------------------------------------------------------
def _params(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.2f}M"


def _mean_std(stat: Stat) -> str:
    return f"{stat.mean:.2f}" + (f" ± {stat.std:.2f}" if stat.std is not None else "")


def _delta_text(cell: Cell) -> str | None:
    if cell.delta is None or not cell.delta.n:
        return None
    text = f"Δ {cell.delta.mean:+.2f}"
    return text + (f" ({cell.delta.n} paired)" if cell.delta.n != cell.stat.n else "")


def _gaps_text(cell: Cell) -> str | None:
    if cell.status != "partial":
        return None
    parts = ([f"{len(cell.failed_seeds)} failed"] if cell.failed_seeds else []) + \
            ([f"{len(cell.missing_seeds)} missing"] if cell.missing_seeds else [])
    return ", ".join(parts)


def _reference_text(reference: float | None, ours: float | None, diff: float | None, metric: str | None) -> str | None:
    if reference is None:
        return None
    prefix = "err " if metric == "error" else ""
    if ours is None:
        return f"{prefix}ref {reference:.2f}"
    return f"{prefix}{ours:.2f} vs ref {reference:.2f} ({diff:+.2f})"


def _teacher_text(row: Row) -> str:
    if row.teacher_status == "missing":
        return "—"
    if row.teacher_status == "failed":
        return "failed"
    return _mean_std(row.teacher_stat) + (f" (n={row.teacher_stat.n})" if row.teacher_stat.n > 1 else "")


# -- rich --------------------------------------------------------------------------------------
def _rich_cell(cell: Cell, summary: Summary) -> Text:
    if cell.status == "missing":
        text = Text("—", style="dim")
    elif cell.status == "n/a":
        text = Text("n/a", style="dim")
    elif cell.status == "failed":
        text = Text("failed", style="bold red")
    else:
        text = Text()
        text.append(_mean_std(cell.stat) + ("*" if cell.best else ""), style="bold" if cell.best else "")
        text.append(f" (n={cell.stat.n})", style="dim")
        delta = _delta_text(cell)
        if delta is not None:
            colour = "green" if cell.delta.mean > 0 else "red" if cell.delta.mean < 0 else ""
            text.append("\n" + delta, style=colour)
        gaps = _gaps_text(cell)
        if gaps:
            text.append("\n" + gaps, style="yellow")
    ref = _reference_text(cell.reference, cell.reference_ours, cell.reference_diff, summary.reference_metric)
    if ref:
        text.append("\n" + ref, style="cyan")
    return text


def transposed(summary: Summary) -> bool:
    """Whether the table is laid out a row per method (columns: pairs) rather than a row per pair: when
    there are more than six methods and more methods than pairs, so that wide benchmarks stay readable."""
    return len(summary.columns) > max(6, len(summary.rows))


def _grid(summary: Summary, teacher: Callable[[Row], Any], cell: Callable[[Cell], Any],
          text: Callable[[str], Any]) -> tuple[list[str], list[list[Any]]]:
    """The header and rows of the table in its layout (:func:`transposed`), cells made by the callbacks."""
    fixed: list[tuple[str, Callable[[Row], Any]]] = [
        ("Teacher top-1", teacher),
        ("Teacher params", lambda r: text(_params(r.teacher_params))),
        ("Student params", lambda r: text(_params(r.student_params))),
    ]
    if not transposed(summary):
        header = ["Teacher → Student", *(name for name, _ in fixed), *summary.columns]
        rows = [[text(r.label), *(f(r) for _, f in fixed), *(cell(c) for c in r.cells)] for r in summary.rows]
        return header, rows
    header = ["Method", *(r.label for r in summary.rows)]
    rows = [[text(name), *(f(r) for r in summary.rows)] for name, f in fixed]
    rows += [[text(column), *(cell(r.cells[i]) for r in summary.rows)] for i, column in enumerate(summary.columns)]
    return header, rows


def _rich_teacher(row: Row, summary: Summary) -> Text:
    teacher = Text(_teacher_text(row), style="red" if row.teacher_status == "failed" else "")
    ref = _reference_text(row.teacher_reference, row.teacher_reference_ours, row.teacher_reference_diff,
                          summary.reference_metric)
    if ref:
        teacher.append("\n" + ref, style="cyan")
    return teacher


def render_table(summary: Summary, console: Console) -> None:
    """Print the table (a row per pair, or per method for wide benchmarks: :func:`transposed`), then the
    reference source, the n/a cells and one line per failed run."""
    table = Table(title=f"{summary.name}: {summary.metric_label}", caption=summary.caption, show_lines=True)
    header, rows = _grid(summary, lambda r: _rich_teacher(r, summary), lambda c: _rich_cell(c, summary), Text)
    for i, name in enumerate(header):
        table.add_column(name, no_wrap=i == 0, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if summary.reference_source is not None:
        console.print(f"Reference: {summary.reference_source}", highlight=False)
    for line in summary.not_applicable:
        console.print(Text(f"n/a: {line}", style="dim"), soft_wrap=True)
    if summary.failures:
        console.print(f"[bold red]{len(summary.failures)} failed run(s):[/]", highlight=False)
        for line in _failure_lines(summary):
            console.print(Text(line), soft_wrap=True)


def _failure_lines(summary: Summary) -> list[str]:
    lines = []
    for f in summary.failures:
        where = f"teacher {f.student}" if f.variant == "teacher" else f"{f.teacher} → {f.student} {f.variant} seed {f.seed}"
        lines.append(f"{where} ({f.run_id}): {f.error}")
    return lines


# -- exports -----------------------------------------------------------------------------------
def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _markdown_cell(cell: Cell, summary: Summary) -> str:
    if cell.status in ("missing", "n/a"):
        lines = ["—" if cell.status == "missing" else "n/a"]
    elif cell.status == "failed":
        lines = ["failed"]
    else:
        head = _mean_std(cell.stat)
        lines = [(f"**{head}**\\*" if cell.best else head) + f" (n={cell.stat.n})"]
        lines += [t for t in (_delta_text(cell), _gaps_text(cell)) if t]
    ref = _reference_text(cell.reference, cell.reference_ours, cell.reference_diff, summary.reference_metric)
    if ref:
        lines.append(ref)
    return "<br>".join(_md_escape(line) for line in lines)


def to_markdown(summary: Summary) -> str:
    """A GitHub table with the rich table's content, a caption line, the reference source and failures."""
    def teacher(row: Row) -> str:
        lines = [_teacher_text(row)]
        ref = _reference_text(row.teacher_reference, row.teacher_reference_ours, row.teacher_reference_diff,
                              summary.reference_metric)
        return "<br>".join(_md_escape(t) for t in lines + ([ref] if ref else []))

    header, rows = _grid(summary, teacher, lambda c: _markdown_cell(c, summary), _md_escape)
    out = [f"**{summary.name}**: {summary.caption}.", ""]
    if summary.description:
        out[0:0] = [summary.description, ""]
    out.append("| " + " | ".join(_md_escape(h) for h in header) + " |")
    out.append("|" + "---|" * len(header))
    out += ["| " + " | ".join(cells) + " |" for cells in rows]
    if summary.reference_source is not None:
        out += ["", f"Reference: {summary.reference_source}"]
    if summary.not_applicable:
        out += ["", "Not applicable (n/a):", ""] + [f"- {_md_escape(line)}" for line in summary.not_applicable]
    if summary.failures:
        out += ["", f"Failed runs ({len(summary.failures)}):", ""]
        out += [f"- {_md_escape(line)}" for line in _failure_lines(summary)]
    return "\n".join(out) + "\n"


def _records(summary: Summary) -> list[dict[str, Any]]:
    """One dict per (pair, variant): the CSV/JSON rows, with plain Python values."""
    out = []
    for row in summary.rows:
        for c in row.cells:
            out.append({
                "teacher": row.teacher, "student": row.student, "variant": c.variant, "metric": summary.metric,
                "n": c.stat.n, "mean": c.stat.mean, "std": c.stat.std,
                "delta_vs_ce": c.delta.mean if c.delta else None, "delta_std": c.delta.std if c.delta else None,
                "seeds": c.stat.seeds, "reference": c.reference, "reference_diff": c.reference_diff,
                "teacher_top1": row.teacher_stat.mean, "student_params": row.student_params,
                "method": c.method, "status": c.status, "best": c.best, "delta_n": c.delta.n if c.delta else 0,
                "failed_seeds": c.failed_seeds, "missing_seeds": c.missing_seeds,
                "reference_metric": summary.reference_metric if c.reference is not None else None,
                "reference_ours": c.reference_ours, "teacher_params": row.teacher_params,
                "method_params": c.method_params, "values": c.stat.values,
            })
    return out


def to_csv(summary: Summary) -> str:
    """One row per (pair, variant); floats with 4 decimals, empty for none, seed lists joined by ';'."""
    def fmt(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float):
            return f"{value:.4f}"
        if isinstance(value, list):
            return ";".join(str(v) for v in value)
        return str(value)

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for rec in _records(summary):
        writer.writerow([fmt(rec[k]) for k in CSV_COLUMNS])
    return buf.getvalue()


def to_json(summary: Summary) -> dict[str, Any]:
    """The header (name, metric, seeds, columns, reference, caption), one dict per cell, and failures."""
    return {
        "schema": "kdzoo.report/1",
        "name": summary.name,
        "description": summary.description,
        "budget": summary.budget,
        "metric": summary.metric,
        "metric_label": summary.metric_label,
        "caption": summary.caption,
        "seeds": summary.seeds,
        "columns": summary.columns,
        "pairs": [
            {"teacher": r.teacher, "student": r.student, "teacher_status": r.teacher_status,
             "teacher_top1": r.teacher_stat.mean, "teacher_std": r.teacher_stat.std, "teacher_n": r.teacher_stat.n,
             "teacher_params": r.teacher_params, "student_params": r.student_params,
             "teacher_reference": r.teacher_reference, "teacher_reference_ours": r.teacher_reference_ours,
             "teacher_reference_diff": r.teacher_reference_diff}
            for r in summary.rows
        ],
        "reference": (None if summary.reference_source is None else
                      {"source": summary.reference_source, "metric": summary.reference_metric}),
        "cells": _records(summary),
        "failures": [
            {"teacher": f.teacher, "student": f.student, "variant": f.variant, "seed": f.seed,
             "run_id": f.run_id, "error": f.error}
            for f in summary.failures
        ],
        "not_applicable": summary.not_applicable,
    }


def export(summary: Summary, out_dir: str | Path) -> list[Path]:
    """Write report.md, report.csv and report.json into ``out_dir`` atomically; return their paths."""
    out_dir = Path(out_dir)
    md, csv_path, js = out_dir / "report.md", out_dir / "report.csv", out_dir / "report.json"
    markdown, table = to_markdown(summary), to_csv(summary)
    atomic_write(md, lambda tmp: Path(tmp).write_text(markdown, encoding="utf-8"))
    atomic_write(csv_path, lambda tmp: Path(tmp).write_text(table, encoding="utf-8"))
    write_json(js, to_json(summary))
    return [md, csv_path, js]
