"""The benchmark table's renderers: a :class:`~kdzoo.summary.Summary` → rich table, Markdown, CSV, JSON.

The numbers come from :mod:`kdzoo.summary` (its names are re-exported here: ``summarize``,
``summarize_dir``, ``Summary``, ...). Every renderer shows the same cell: top-1 mean ± std (n), the
row's best marked ``*`` and the cell's rank; for methods, Δ vs ce with its confidence interval
``[low, high]`` and ``†`` when the interval excludes zero; what is missing or failed; ours against
the published number. The caption (``Summary.caption``) says what every mark means.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.table import Table
from rich.text import Text

from kdzoo.checkpoint import atomic_write
from kdzoo.store import write_json
from kdzoo.summary import (  # noqa: F401  (re-exported: kdzoo.report is the public entry point)
    CONFIDENCE, METRICS, REFERENCE_METRICS, SIGNIFICANT, Cell, Failure, Row, Stat, Summary, summarize, summarize_dir,
)

__all__ = [
    "CSV_COLUMNS", "export", "render_table", "to_csv", "to_json", "to_markdown", "transposed",
    # from kdzoo.summary
    "CONFIDENCE", "METRICS", "REFERENCE_METRICS", "SIGNIFICANT", "Cell", "Failure", "Row", "Stat", "Summary",
    "summarize", "summarize_dir",
]
CSV_COLUMNS = [
    "teacher", "student", "variant", "metric", "n", "mean", "std", "delta_vs_ce", "delta_std", "seeds",
    "reference", "reference_diff", "teacher_top1", "student_params",
    # extras, after the agreed columns
    "method", "status", "best", "delta_n", "failed_seeds", "missing_seeds", "reference_metric",
    "reference_ours", "teacher_params", "method_params",
    # confidence intervals and ranks (kdzoo.stats), after the extras
    "delta_ci_low", "delta_ci_high", "delta_significant", "rank", "rank_tied",
]


# -- cell text (shared by every renderer) ------------------------------------------------------
def _params(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.2f}M"


def _mean_std(stat: Stat) -> str:
    return f"{stat.mean:.2f}" + (f" ± {stat.std:.2f}" if stat.std is not None else "")


def _delta_text(cell: Cell) -> str | None:
    """"Δ +1.23 [+0.40, +2.06]†": the mean paired gain, its interval (from 2 pairs) and the mark."""
    if cell.delta is None or not cell.delta.n:
        return None
    text = f"Δ {cell.delta.mean:+.2f}"
    ci = cell.delta_ci
    if ci is not None and ci.low is not None:
        text += f" [{ci.low:+.2f}, {ci.high:+.2f}]" + (SIGNIFICANT if ci.excludes_zero else "")
    return text + (f" ({cell.delta.n} paired)" if cell.delta.n != cell.stat.n else "")


def _rank_text(cell: Cell) -> str:
    return f" rank {cell.rank}" if cell.rank else ""


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
        text.append(f" (n={cell.stat.n})" + _rank_text(cell), style="dim")
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


CELL_WIDTH = 27  # characters a cell's widest line takes in a terminal ("Δ +3.25 [+0.71, +5.79]†" and borders)
FIXED_WIDTH = 60  # the pair label, the teacher's top-1 and both parameter counts


def transposed(summary: Summary, width: int | None = None) -> bool:
    """Whether the table is laid out a row per method (columns: pairs) rather than a row per pair: when
    there are more than six methods and more methods than pairs, so that wide benchmarks stay readable,
    and in a terminal ``width`` characters wide, when a row per pair would not fit and a row per method
    is narrower."""
    if len(summary.columns) > max(6, len(summary.rows)):
        return True
    if width is None:
        return False
    per_pair = FIXED_WIDTH + CELL_WIDTH * len(summary.columns)
    return per_pair > width and 20 + CELL_WIDTH * len(summary.rows) < per_pair


def _grid(summary: Summary, teacher: Callable[[Row], Any], cell: Callable[[Cell], Any],
          text: Callable[[str], Any], width: int | None = None) -> tuple[list[str], list[list[Any]]]:
    """The header and rows of the table in its layout (:func:`transposed`), cells made by the callbacks."""
    fixed: list[tuple[str, Callable[[Row], Any]]] = [
        ("Teacher top-1", teacher),
        ("Teacher params", lambda r: text(_params(r.teacher_params))),
        ("Student params", lambda r: text(_params(r.student_params))),
    ]
    if not transposed(summary, width):
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
    """Print the table (a row per pair, or per method for wide benchmarks and narrow terminals:
    :func:`transposed`), then the
    reference source, the n/a cells and one line per failed run."""
    # Text, not markup: the caption's "[95% ...]" and a benchmark's name are not rich tags.
    table = Table(title=Text(f"{summary.name}: {summary.metric_label}", style="table.title"),
                  caption=Text(summary.caption, style="table.caption"), show_lines=True)
    header, rows = _grid(summary, lambda r: _rich_teacher(r, summary), lambda c: _rich_cell(c, summary), Text,
                         width=console.width)
    for i, name in enumerate(header):
        table.add_column(name, no_wrap=i == 0, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if summary.reference_source is not None:
        console.print(Text(f"Reference: {summary.reference_source}"))
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
        lines = [(f"**{head}**\\*" if cell.best else head) + f" (n={cell.stat.n})" + _rank_text(cell)]
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
    """One dict per (pair, variant): the CSV/JSON rows, with plain Python values. ``delta_significant`` is
    None (empty) where there is no interval, so that "false" always means an interval that includes 0. ``rank``
    is a number and ``rank_tied`` says whether another cell shares it (the table's "=2": a spreadsheet would read
    that text as a formula)."""
    out = []
    for row in summary.rows:
        for c in row.cells:
            ci = c.delta_ci
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
                "delta_ci_low": ci.low if ci else None, "delta_ci_high": ci.high if ci else None,
                "delta_significant": ci.excludes_zero if ci and ci.low is not None else None,
                "rank": int(c.rank.lstrip("=")) if c.rank else None,
                "rank_tied": c.rank.startswith("=") if c.rank else None, "delta_ci_level": ci.level if ci else None,
                "delta_ci_reason": ci.reason if ci else None,
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
        "confidence_level": CONFIDENCE,
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
