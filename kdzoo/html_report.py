"""``report.html``: one self-contained page that explains a benchmark folder, built from its store alone.

The page holds the comparison table with the terminal's numbers (from :func:`kdzoo.report.to_json`,
the same dict as ``report.json``, and the same layout: :func:`kdzoo.report.transposed`), a short
plain-language summary, and figures drawn by :mod:`kdzoo.report_plots`: each method's gain over ce
per pair with its confidence interval, learning curves (test top-1 and the loss terms against
epoch, mean over seeds with the seeds' range as a band), top-1 against the student's parameters
and FLOPs (one point per run), and ours against the published numbers when the benchmark has a
``reference:`` block. Then the failures, the budget and data, and the environment of the runs.

Offline by construction: the figures are inline SVG, there is no script, and a Content-Security-Policy
forbids the page any fetch. Only the current plan's records are shown (as in the table). Table
cells carry ``data-teacher``/``data-student``/``data-variant`` and their numbers sit in spans with the
classes ``mean``, ``std``, ``delta``, ``ci-low`` and ``ci-high``, so that tests can read them back.
"""
from __future__ import annotations

import html
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable

from kdzoo import KDZooError, __version__
from kdzoo.checkpoint import atomic_write
from kdzoo.records import RunRecord, TeacherRecord
from kdzoo.store import Store

MISSING = ('The HTML report needs matplotlib for its plots: pip install "kdzoo[report]" '
           '(or pip install "matplotlib>=3.7"). The text reports (report.md, report.csv, report.json) need nothing more.')
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
ENV_KEYS = [("device", "device"), ("autocast", "compute dtype"), ("autocast_reason", "why that dtype"),
            ("torch", "torch"), ("timm", "timm"), ("kdzoo", "kdzoo"), ("python", "python"), ("threads", "CPU threads")]
RECIPE_KEYS = ["epochs", "batch_size", "lr", "schedule", "weight_decay", "momentum", "label_smoothing", "autocast"]


def available() -> bool:
    """Whether matplotlib can be imported (the HTML report's only extra)."""
    import importlib.util

    try:
        return importlib.util.find_spec("matplotlib") is not None
    except ValueError:  # a module set to None in sys.modules (hidden on purpose)
        return False


def write_html(root: Path, metric: str = "last") -> Path:
    """Write ``root/report.html`` (atomically) from the benchmark folder ``root``; return its path.

    Raises ``KDZooError`` when matplotlib is missing, or when the folder is not a readable benchmark."""
    try:
        from kdzoo import report_plots as plots
    except ImportError as e:
        raise KDZooError(MISSING) from e
    from kdzoo import report as rep

    root = Path(root)
    store = Store(root)
    records, bench = store.runs(), store.bench()
    summary = rep.summarize(records, bench, metric)
    table = rep.to_json(summary)
    planned = set(bench.run_ids)
    runs = [r for r in records if isinstance(r, RunRecord) and r.run_id in planned]
    current = {f"teacher-{k}" for k in bench.teachers.values()}
    teachers = [r for r in records if isinstance(r, TeacherRecord) and r.run_id in current]
    page = _page(summary, table, runs, teachers, plots, rep.transposed(summary), root)
    path = root / "report.html"
    atomic_write(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return path


# -- numbers for the figures -------------------------------------------------------------------
def _band(points: dict[float, list[float]], plots: Any) -> Any:
    xs = sorted(points)
    return plots.Band(xs, [statistics.fmean(points[x]) for x in xs], [min(points[x]) for x in xs],
                      [max(points[x]) for x in xs], max((len(v) for v in points.values()), default=0))


def _curves(runs: list[RunRecord], plots: Any) -> Any:
    """Mean and range over the runs (seeds) of one cell: top-1 per main-stage epoch, each loss term per epoch
    (an init stage's epochs numbered up to 0, so that epoch 1 is the first main-stage epoch everywhere)."""
    top1: dict[float, list[float]] = defaultdict(list)
    loss: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        n_init = sum(1 for h in r.history if h.get("stage") == "init")
        for h in r.history:
            init = h.get("stage") == "init"
            x = float(h["epoch"] - n_init if init else h["epoch"])
            test = h.get("test") or {}
            if not init and test.get("top1") is not None:  # init epochs are not evaluated
                top1[x].append(test["top1"])
            for term, value in (h.get("loss") or {}).items():
                if value is not None:
                    loss[term][x].append(value)
    return plots.Curves(_band(top1, plots) if top1 else None, {t: _band(v, plots) for t, v in loss.items()})


def _gains(summary: Any, plots: Any) -> dict[str, list[Any]]:
    out = {}
    for row in summary.rows:
        items = []
        for c in row.cells:
            if c.delta is None or not c.delta.n:
                continue
            ci = c.delta_ci
            low, high = (ci.low, ci.high) if ci is not None else (None, None)
            items.append(plots.Gain(c.variant, list(c.delta.values), c.delta.mean, low, high,
                                    bool(ci is not None and ci.excludes_zero)))
        if items:
            out[row.label] = items
    return out


# -- HTML pieces -------------------------------------------------------------------------------
def _e(text: Any) -> str:
    return html.escape(str(text))


def _num(value: float, cls: str, signed: bool = False) -> str:
    return f'<span class="{cls}">{value:+.2f}</span>' if signed else f'<span class="{cls}">{value:.2f}</span>'


def _params(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.2f}M"


def _reference_line(ref: float | None, ours: float | None, diff: float | None, metric: str | None) -> str:
    if ref is None:
        return ""
    prefix = "err " if metric == "error" else ""
    text = f"{prefix}ref {ref:.2f}" if ours is None else f"{prefix}{ours:.2f} vs ref {ref:.2f} ({diff:+.2f})"
    return f'<div class="ref">{_e(text)}</div>'


def _cell(c: dict[str, Any], significant_mark: str) -> str:
    """One table cell, line for line as the terminal shows it."""
    attrs = f'data-teacher="{_e(c["teacher"])}" data-student="{_e(c["student"])}" data-variant="{_e(c["variant"])}"'
    status = c["status"]
    if status in ("missing", "n/a", "failed"):
        body = {"missing": '<span class="dim">—</span>', "n/a": '<span class="dim">n/a</span>',
                "failed": '<span class="bad">failed</span>'}[status]
        return f'<td class="cell {status}" {attrs}>{body}' + _reference_line(
            c["reference"], c["reference_ours"], c["reference_diff"], c["reference_metric"]) + "</td>"
    head = _num(c["mean"], "mean") + (f" ± {_num(c['std'], 'std')}" if c["std"] is not None else "")
    head = f"<strong>{head}*</strong>" if c["best"] else head
    # The terminal's lines, with the longer ones broken in two so that five methods fit a page's width.
    rank = f' rank {"=" if c["rank_tied"] else ""}{c["rank"]}' if c["rank"] else ""
    lines = [f"<div>{head}</div>", f'<div class="dim">(n={c["n"]}){rank}</div>']
    if c["delta_vs_ce"] is not None and c["delta_n"]:
        d = c["delta_vs_ce"]
        tone = "up" if d > 0 else "down" if d < 0 else ""
        text = "Δ " + _num(d, "delta", signed=True) + (f" ({c['delta_n']} paired)" if c["delta_n"] != c["n"] else "")
        lines.append(f'<div class="{tone}">{text}</div>')
        if c["delta_ci_low"] is not None:
            mark = f'<span class="mark">{_e(significant_mark)}</span>' if c["delta_significant"] else ""
            lines.append(f'<div class="{tone} ci">[{_num(c["delta_ci_low"], "ci-low", True)}, '
                         f'{_num(c["delta_ci_high"], "ci-high", True)}]{mark}</div>')
    if status == "partial":
        gaps = ([f"{len(c['failed_seeds'])} failed"] if c["failed_seeds"] else []) + \
               ([f"{len(c['missing_seeds'])} missing"] if c["missing_seeds"] else [])
        lines.append(f'<div class="warn">{_e(", ".join(gaps))}</div>')
    lines.append(_reference_line(c["reference"], c["reference_ours"], c["reference_diff"], c["reference_metric"]))
    return f'<td class="cell {status}" {attrs}>' + "".join(lines) + "</td>"


def _teacher_cell(p: dict[str, Any], metric: str | None) -> str:
    if p["teacher_status"] == "missing":
        text = '<span class="dim">—</span>'
    elif p["teacher_status"] == "failed":
        text = '<span class="bad">failed</span>'
    else:
        text = _num(p["teacher_top1"], "teacher-mean") + (
            f" ± {p['teacher_std']:.2f}" if p["teacher_std"] is not None else "") + (
            f" (n={p['teacher_n']})" if p["teacher_n"] > 1 else "")
    return (f'<td class="teacher" data-teacher="{_e(p["teacher"])}" data-student="{_e(p["student"])}">{text}'
            + _reference_line(p["teacher_reference"], p["teacher_reference_ours"], p["teacher_reference_diff"],
                              metric) + "</td>")


def _table(table: dict[str, Any], transposed: bool, mark: str) -> str:
    """The comparison table in the terminal's layout: a row per pair, or a row per method for wide benchmarks."""
    pairs = table["pairs"]
    metric = (table["reference"] or {}).get("metric")
    cells = {(c["teacher"], c["student"], c["variant"]): c for c in table["cells"]}
    fixed = [("Teacher top-1", lambda p: _teacher_cell(p, metric)),
             ("Teacher params", lambda p: f'<td class="num">{_params(p["teacher_params"])}</td>'),
             ("Student params", lambda p: f'<td class="num">{_params(p["student_params"])}</td>')]
    label = lambda p: f'{_e(p["teacher"])} → {_e(p["student"])}'  # noqa: E731
    if not transposed:
        head = ["Teacher → Student", *(n for n, _ in fixed), *table["columns"]]
        body = ["<tr><th scope=\"row\">" + label(p) + "</th>" + "".join(f(p) for _, f in fixed)
                + "".join(_cell(cells[(p["teacher"], p["student"], v)], mark) for v in table["columns"]) + "</tr>"
                for p in pairs]
    else:
        head = ["Method", *(f'{p["teacher"]} → {p["student"]}' for p in pairs)]
        body = ["<tr><th scope=\"row\">" + _e(n) + "</th>" + "".join(f(p) for p in pairs) + "</tr>" for n, f in fixed]
        body += ["<tr><th scope=\"row\">" + _e(v) + "</th>"
                 + "".join(_cell(cells[(p["teacher"], p["student"], v)], mark) for p in pairs) + "</tr>"
                 for v in table["columns"]]
    return ('<div class="table-wrap"><table class="results"><thead><tr>'
            + "".join(f'<th scope="col">{_e(h)}</th>' for h in head) + "</tr></thead><tbody>"
            + "".join(body) + "</tbody></table></div>"
            + f'<p class="caption">{_e(table["caption"])}.</p>')


def _findings(summary: Any, table: dict[str, Any]) -> str:
    """A few plain sentences per pair: the best column, the teacher, and which gains over ce are clear."""
    items = []
    level = f"{table.get('confidence_level', 0.95):.0%}"
    for row in summary.rows:
        done = [c for c in row.cells if c.stat.n]
        if not done:
            items.append(f"<li><strong>{_e(row.label)}</strong>: no finished runs yet.</li>")
            continue
        best = max(done, key=lambda c: c.stat.mean)
        ce = next((c for c in done if c.variant == "ce"), None)
        parts = [f"best <strong>{_e(best.variant)}</strong> at {best.stat.mean:.2f}%"]
        if ce is not None and best is not ce:
            parts[0] += f" (ce {ce.stat.mean:.2f}%)"
        if row.teacher_stat.n:
            parts.append(f"teacher {row.teacher_stat.mean:.2f}%")
        with_ci = [c for c in done if c.delta_ci is not None and c.delta_ci.low is not None]
        up = [c for c in with_ci if c.delta_ci.excludes_zero and c.delta.mean > 0]
        down = [c for c in with_ci if c.delta_ci.excludes_zero and c.delta.mean < 0]
        if with_ci:
            parts.append("clearly above ce (the " + level + " interval of the gain excludes 0): "
                         + (", ".join(f"{_e(c.variant)} ({c.delta.mean:+.2f})" for c in up) or "none"))
            if down:
                parts.append("clearly below ce: " + ", ".join(f"{_e(c.variant)} ({c.delta.mean:+.2f})" for c in down))
        elif any(c.delta is not None and c.delta.n for c in done):
            parts.append("one seed per cell, so no confidence intervals: differences may be noise")
        items.append(f"<li><strong>{_e(row.label)}</strong>: " + "; ".join(parts) + ".</li>")
    return "<ul class=\"findings\">" + "".join(items) + "</ul>"


def _kv_table(rows: Iterable[tuple[str, str]], cls: str = "kv") -> str:
    return (f'<table class="{cls}"><tbody>' + "".join(f"<tr><th scope=\"row\">{_e(k)}</th><td>{_e(v)}</td></tr>"
                                                        for k, v in rows) + "</tbody></table>")


def _distinct(values: Iterable[Any]) -> str:
    """One value, or each distinct value with how many runs had it."""
    counts = Counter(str(v) for v in values if v is not None)
    if not counts:
        return "—"
    if len(counts) == 1:
        return next(iter(counts))
    return "; ".join(f"{v} ({n} runs)" for v, n in counts.most_common())


def _setup(summary: Any, runs: list[RunRecord], teachers: list[TeacherRecord]) -> str:
    rows = [("budget", summary.budget or "—"), ("seeds", ", ".join(map(str, summary.seeds)))]
    data = [r.data for r in [*runs, *teachers] if r.data]
    if data:
        rows += [("dataset", _distinct(d.get("dataset") for d in data)),
                 ("images (train / val / test)", _distinct(f"{d.get('train')} / {d.get('val')} / {d.get('test')}"
                                                          for d in data)),
                 ("data fingerprint (sha256)", _distinct(str(d.get("fingerprint", ""))[:16] for d in data))]
    for who, recs in (("student recipe", runs), ("teacher recipe", teachers)):
        recipes = [r.recipe for r in recs if r.recipe]
        if recipes:
            rows.append((who, _distinct(", ".join(f"{k} {rec[k]}" for k in RECIPE_KEYS if k in rec) for rec in recipes)))
    cohorts: dict[str, float] = {}
    for r in runs:  # members of a cohort share its wall time: count it once
        cohorts[r.cohort_id] = max(cohorts.get(r.cohort_id, 0.0), r.wall_time_s or 0.0)
    t_time = sum(t.wall_time_s or 0.0 for t in teachers if t.source == "trained")
    if cohorts or t_time:
        rows.append(("training time", f"{(sum(cohorts.values()) + t_time) / 60:.1f} min (students {sum(cohorts.values()) / 60:.1f}"
                                      f" min in {len(cohorts)} cohorts, teachers {t_time / 60:.1f} min)"))
    return _kv_table(rows)


def _environment(runs: list[RunRecord], teachers: list[TeacherRecord]) -> str:
    envs = [r.environment for r in [*runs, *teachers] if r.environment]
    if not envs:
        return "<p>The runs recorded no environment.</p>"
    return _kv_table((label, _distinct(e.get(key) for e in envs)) for key, label in ENV_KEYS
                     if any(e.get(key) is not None for e in envs))


def _failures(table: dict[str, Any]) -> str:
    parts = []
    if table["failures"]:
        items = []
        for f in table["failures"]:
            where = (f"teacher {f['student']}" if f["variant"] == "teacher"
                     else f"{f['teacher']} → {f['student']} {f['variant']} seed {f['seed']}")
            items.append(f"<li><strong>{_e(where)}</strong> <code>{_e(f['run_id'])}</code>: {_e(f['error'])}</li>")
        parts.append(f"<p>{len(table['failures'])} run(s) failed; the others finished and the table uses them.</p>"
                     "<ul class=\"failures\">" + "".join(items) + "</ul>")
    else:
        parts.append("<p>No run failed.</p>")
    if table["not_applicable"]:
        parts.append("<p>Cells marked n/a (the method cannot serve the pair; decided before training):</p><ul>"
                     + "".join(f"<li>{_e(line)}</li>" for line in table["not_applicable"]) + "</ul>")
    return "".join(parts)


def _figure(svg: str, caption: str) -> str:
    return f'<figure class="plot">{svg}<figcaption>{caption}</figcaption></figure>'


def _page(summary: Any, table: dict[str, Any], runs: list[RunRecord], teachers: list[TeacherRecord], plots: Any,
          transposed: bool, root: Path) -> str:
    from kdzoo.report import SIGNIFICANT

    level = float(table.get("confidence_level") or 0.95)
    palette = plots.colours(summary.columns)
    sections: list[tuple[str, str, str]] = []  # (id, title, html)
    sections.append(("summary", "In short", _findings(summary, table) + (
        f'<p class="note">Budget: {_e(summary.budget)}. Short schedules can rank methods differently from the '
        "published ones.</p>" if summary.budget else "")))
    sections.append(("table", "Results table", _table(table, transposed, SIGNIFICANT)
                     + (f'<p>Reference: {_e(table["reference"]["source"])}</p>' if table["reference"] else "")))

    gains = _gains(summary, plots)
    if gains:
        sections.append(("gains", "Gain over ce", _figure(plots.gains(gains, palette, level, "gains"),
            "Each method's top-1 minus ce's, paired by seed (same initial weights and batches). Dot: the mean gain, "
            f"filled when its {level:.0%} confidence interval (bar, Student's t over the seeds) excludes 0; grey dots: "
            "the single seeds. With one seed there is no interval.")))

    curves_html = []
    by_cell: dict[tuple[str, str, str], list[RunRecord]] = defaultdict(list)
    for r in runs:
        if r.status == "ok":
            by_cell[(r.teacher.model, r.model, r.variant)].append(r)
    for i, row in enumerate(summary.rows):
        curves = {v: _curves(by_cell[(row.teacher, row.student, v)], plots) for v in summary.columns
                  if by_cell.get((row.teacher, row.student, v))}
        if not curves:
            continue
        teacher = row.teacher_stat.mean if row.teacher_stat.n else None
        curves_html.append(f"<h3>{_e(row.label)}</h3>" + _figure(
            plots.learning_curves(curves, teacher, palette, f"curves{i}", row.label),
            "Test top-1 after each epoch: line, the mean over the seeds that finished; band, the lowest to the "
            "highest seed. Dashed: the teacher.")
            + _figure(plots.loss_terms(curves, f"loss{i}", f"{row.label}: loss terms"),
                      "Each term of each method's training loss, averaged over the batches of an epoch and over the "
                      "seeds (band: the seeds' range). Terms are as the method names them (ce: cross-entropy with the "
                      "labels)."))
    if curves_html:
        sections.append(("curves", "Learning curves", "".join(curves_html)))

    points = [plots.Point(r.variant, r.model, r.params, r.flops, score.top1) for r in runs
              if r.status == "ok" and (score := (r.last if summary.metric == "last" else r.best)) is not None]
    if points:
        sections.append(("size", "Accuracy against student size", _figure(
            plots.size_plot(points, palette, summary.metric_label, "size"),
            f"One point per finished run ({summary.metric_label}): colour, the method; marker, the student network. "
            "Points of one network are spread slightly sideways so that none hides another.")))

    if table["reference"]:
        ref = [(f"{row.teacher} → {row.student}", c.variant, c.reference, c.reference_ours)
               for row in summary.rows for c in row.cells if c.reference is not None and c.reference_ours is not None]
        ref += [(f"{row.teacher} → {row.student}", "teacher", row.teacher_reference, row.teacher_reference_ours)
                for row in summary.rows if row.teacher_reference is not None and row.teacher_reference_ours is not None]
        if ref:
            sections.append(("reference", "Against the published numbers", _figure(
                plots.reference_plot(ref, table["reference"]["metric"], "reference"),
                f"Source: {_e(table['reference']['source'])}. Ours is the mean over seeds"
                + (", converted to test error = 100 − top-1." if table["reference"]["metric"] == "error" else ".")
                + " On the dashed diagonal ours equals the published number; "
                + ("below" if table["reference"]["metric"] == "error" else "above") + " it, ours is better.")))

    sections.append(("failures", "Failures", _failures(table)))
    sections.append(("setup", "Budget and data", _setup(summary, runs, teachers)))
    sections.append(("environment", "Environment", _environment(runs, teachers)))

    n_ok = sum(r.status == "ok" for r in runs)
    meta = [summary.metric_label + " accuracy", f"{len(summary.seeds)} seed(s)",
            f"{n_ok} of {len(summary.rows) * len(summary.columns) * len(summary.seeds)} planned runs finished"]
    nav = " · ".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{_e(title)}</h2>{content}</section>' for sid, title, content in sections)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="kdzoo {_e(__version__)}">
<title>{_e(summary.name)}: kdzoo benchmark report</title>
<style>{STYLE}</style></head>
<body><main>
<header><p class="kicker">kdzoo benchmark report</p><h1>{_e(summary.name)}</h1>
{f'<p class="lead">{_e(summary.description)}</p>' if summary.description else ''}
<p class="meta">{_e(" · ".join(meta))}</p><nav>{nav}</nav></header>
{body}
<footer>Written by kdzoo {_e(__version__)} from the results folder <code>{_e(root)}</code>; report.json there
holds the table's numbers. Re-render with <code>kdzoo report {_e(root)} --html</code>.</footer>
</main></body></html>
"""


STYLE = """
:root { --ink: #1d2330; --muted: #5f6b7a; --line: #dde2e8; --up: #1a7f37; --down: #b42318; --accent: #0b5cad; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #f6f7f9;
  font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", "DejaVu Sans", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 48px; background: #fff; }
header { border-bottom: 2px solid var(--line); padding-bottom: 12px; margin-bottom: 8px; }
.kicker { margin: 0; color: var(--muted); font-size: 13px; text-transform: uppercase; letter-spacing: .06em; }
h1 { margin: 2px 0 6px; font-size: 28px; }
h2 { margin: 32px 0 10px; font-size: 20px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { margin: 22px 0 6px; font-size: 16px; }
.lead { margin: 0 0 4px; font-size: 16px; }
.meta, .caption, figcaption, .note, footer { color: var(--muted); font-size: 13px; }
nav a { color: var(--accent); text-decoration: none; font-size: 14px; }
.findings li { margin: 4px 0; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; }
table.results { font-size: 13px; font-variant-numeric: tabular-nums; }
table.results th, table.results td { border: 1px solid var(--line); padding: 5px 7px; vertical-align: top; }
table.results thead th { background: #eef1f5; text-align: center; }
table.results tbody th { text-align: left; white-space: nowrap; background: #fafbfc; }
table.results td { text-align: right; white-space: nowrap; }
.dim { color: var(--muted); }
.up { color: var(--up); } .down { color: var(--down); }
.bad { color: var(--down); font-weight: 600; } .warn { color: #9a6700; }
.ref { color: #0b6e79; white-space: normal; min-width: 7em; } .mark { font-weight: 700; }
figure.plot { margin: 8px 0 18px; }
svg.plot { width: 100%; height: auto; display: block; }
table.kv th { text-align: left; padding: 4px 16px 4px 0; color: var(--muted); font-weight: 500; vertical-align: top;
  white-space: nowrap; }
table.kv td { padding: 4px 0; }
code { font-size: 12.5px; background: #f1f3f6; padding: 1px 4px; border-radius: 3px; }
footer { margin-top: 36px; border-top: 1px solid var(--line); padding-top: 10px; }
"""
