"""The HTML report's figures: plain numbers in, one self-contained SVG string out (matplotlib, Agg).

Every function takes the data already aggregated by :mod:`kdzoo.html_report` and draws it; none
reads the store. The SVG keeps its text as text (``svg.fonttype = none``: small, searchable, drawn
in the page's font) and loses its XML prolog and metadata, so that it can be inlined in HTML; each
figure gets its own id salt, so that two inlined figures never share an element id.

matplotlib is an optional extra (``pip install "kdzoo[report]"``); importing this module without it
raises ``KDZooError`` saying so.
"""
from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from kdzoo import KDZooError

try:
    import matplotlib

    matplotlib.use("Agg")  # never a GUI backend: the report is written by batch jobs
    from matplotlib import pyplot as plt
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter
except ImportError as e:  # pragma: no cover - exercised by the CLI test with matplotlib hidden
    raise KDZooError(
        'The HTML report draws its plots with matplotlib, which is not installed. Install it with '
        'pip install "kdzoo[report]" (or pip install "matplotlib>=3.7"); the text reports need nothing more.'
    ) from e

CE_COLOUR = "#555555"
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#9edae5", "#dbdb8d"]
TERM_COLOURS = ["#222222", "#c51b7d", "#4d9221", "#2166ac", "#b35806", "#542788"]  # not the methods' colours
LINESTYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
STYLE = {
    "svg.fonttype": "none", "font.family": "sans-serif", "font.size": 10, "axes.titlesize": 11,
    "axes.titleweight": "bold", "axes.labelsize": 10, "axes.spines.top": False, "axes.spines.right": False,
    "axes.grid": True, "grid.color": "#e6e6e6", "grid.linewidth": 0.8, "axes.edgecolor": "#888888",
    "legend.frameon": False, "legend.fontsize": 9, "figure.dpi": 100,
}


@dataclass
class Band:
    """A quantity over epochs: its mean over seeds and the lowest/highest seed at each epoch."""

    x: list[float]
    mean: list[float]
    low: list[float]
    high: list[float]
    n: int  # seeds


@dataclass
class Curves:
    """One table column of one pair: test top-1 by main-stage epoch, and each loss term by epoch
    (init-stage epochs at x ≤ 0)."""

    top1: Band | None
    loss: dict[str, Band] = field(default_factory=dict)


@dataclass
class Gain:
    """One method's paired gain over ce: the per-seed differences, their mean and interval (None: none)."""

    variant: str
    values: list[float]
    mean: float
    low: float | None
    high: float | None
    significant: bool


@dataclass
class Point:
    """One finished run for the size plot."""

    variant: str
    student: str
    params: int | None
    flops: int | None
    top1: float


def colours(variants: Sequence[str]) -> dict[str, tuple[str, str]]:
    """(colour, line style) per variant, the same in every figure; ce is grey and solid."""
    out, i = {}, 0
    for v in variants:
        if v == "ce":
            out[v] = (CE_COLOUR, "-")
        else:
            out[v] = (PALETTE[i % len(PALETTE)], LINESTYLES[(i // len(PALETTE)) % len(LINESTYLES)])
            i += 1
    return out


def to_svg(fig: Figure, salt: str, label: str) -> str:
    """``fig`` as an inlinable ``<svg>`` element (no prolog, no metadata) that scales to its container."""
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": salt}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)
    # matplotlib numbers its ids per figure (figure_1, axes_1, ...): prefix them, and their references, so
    # that the page's ids stay unique
    text = re.sub(r'\bid="([^"]+)"', rf'id="{salt}-\1"', text)
    text = re.sub(r'(href="#|url\(#)([^")]+)', rf"\1{salt}-\2", text)

    def root(m: re.Match) -> str:
        width = float(re.search(r'\bwidth="([\d.]+)pt"', m.group(0)).group(1))
        tag = re.sub(r'\s(width|height)="[^"]*"', "", m.group(0))
        # as wide as the page allows, but never larger than drawn (1 pt = 4/3 CSS px): text keeps its size
        return tag.replace("<svg", f'<svg role="img" aria-label="{label}" class="plot" '
                                   f'style="max-width: {width * 4 / 3:.0f}px"', 1)

    return re.sub(r"<svg\b[^>]*>", root, text, count=1)


def _figure(width: float, height: float) -> Figure:
    with plt.rc_context(STYLE):
        return plt.figure(figsize=(width, height), layout="constrained")


def _band(ax: Any, band: Band, colour: str, style: str, label: str) -> None:
    ax.plot(band.x, band.mean, color=colour, linestyle=style, marker="o", markersize=3, linewidth=1.8, label=label)
    if band.n > 1:
        ax.fill_between(band.x, band.low, band.high, color=colour, alpha=0.15, linewidth=0)


def learning_curves(curves: dict[str, Curves], teacher_top1: float | None, palette: dict[str, tuple[str, str]],
                    salt: str, title: str) -> str:
    """Test top-1 against epoch, one line per column (mean over seeds, band from lowest to highest seed),
    the teacher's accuracy dashed."""
    with plt.rc_context(STYLE):
        fig = _figure(9.5, 4.0)
        ax = fig.add_subplot()
        for variant, c in curves.items():
            if c.top1 is not None and c.top1.x:
                _band(ax, c.top1, *palette[variant], variant)
        if teacher_top1 is not None:
            ax.axhline(teacher_top1, color="#222222", linestyle=(0, (5, 4)), linewidth=1)
            ax.annotate(f"teacher {teacher_top1:.2f}", (1, teacher_top1), xycoords=("axes fraction", "data"),
                        xytext=(-4, 4), textcoords="offset points", ha="right", va="bottom", fontsize=9,
                        color="#222222")
        ax.set_xlabel("epoch (main stage)")
        ax.set_ylabel("test top-1 (%)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), ncols=1 if len(curves) <= 14 else 2)
        return to_svg(fig, salt, f"test top-1 against epoch, {title}")


def loss_terms(curves: dict[str, Curves], salt: str, title: str) -> str:
    """One small panel per column: each loss term's mean over seeds against epoch (band: seed range)."""
    shown = {v: c for v, c in curves.items() if c.loss}
    ncols = min(5, max(1, len(shown)))
    nrows = max(1, math.ceil(len(shown) / ncols))
    with plt.rc_context(STYLE):
        fig = _figure(9.5, 0.6 + 2.1 * nrows)
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for ax in axes.flat[len(shown):]:
            ax.set_visible(False)
        for ax, (variant, c) in zip(axes.flat, shown.items()):
            lows = [v for b in c.loss.values() for v in b.mean]
            for j, (term, band) in enumerate(c.loss.items()):
                _band(ax, band, TERM_COLOURS[j % len(TERM_COLOURS)], "-", term)
            if lows and min(lows) > 0 and max(lows) / min(lows) > 30:  # terms of very different sizes
                ax.set_yscale("log")
            if any(x <= 0 for b in c.loss.values() for x in b.x):
                ax.axvspan(min(x for b in c.loss.values() for x in b.x) - 0.5, 0.5, color="#f0e6d2", zorder=0)
            ax.set_title(variant, loc="left", fontsize=10)
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.tick_params(labelsize=8)
            ax.legend(fontsize=8)
        fig.supxlabel("epoch (shaded: init stage)" if any(
            x <= 0 for c in shown.values() for b in c.loss.values() for x in b.x) else "epoch", fontsize=9)
        fig.supylabel("training loss (mean per batch)", fontsize=9)
        return to_svg(fig, salt, f"loss terms against epoch, {title}")


def gains(pairs: dict[str, list[Gain]], palette: dict[str, tuple[str, str]], level: float, salt: str) -> str:
    """Per pair, each method's mean paired gain over ce (dot), its confidence interval (bar; filled dot
    when it excludes 0) and the per-seed differences (small grey dots)."""
    n = len(pairs)
    ncols = min(3, max(1, n))
    nrows = max(1, math.ceil(n / ncols))
    longest = max((len(g) for g in pairs.values()), default=1)
    with plt.rc_context(STYLE):
        fig = _figure(9.5, 0.9 + nrows * (0.6 + 0.32 * longest))
        axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
        for ax in axes.flat[n:]:
            ax.set_visible(False)
        for ax, (label, items) in zip(axes.flat, pairs.items()):
            ax.axvline(0, color="#222222", linewidth=1)
            for y, g in enumerate(reversed(items)):
                colour = palette[g.variant][0]
                ax.scatter(g.values, [y] * len(g.values), s=14, color="#666666", zorder=3.5)
                if g.low is not None:
                    ax.plot([g.low, g.high], [y, y], color=colour, linewidth=2.5, solid_capstyle="butt", zorder=3)
                    for end in (g.low, g.high):
                        ax.plot([end, end], [y - 0.18, y + 0.18], color=colour, linewidth=1.5, zorder=3)
                ax.scatter([g.mean], [y], s=55, zorder=4, color=colour if g.significant else "white",
                           edgecolors=colour, linewidths=1.8)
            ax.set_yticks(range(len(items)), [g.variant for g in reversed(items)])
            ax.set_ylim(-0.7, len(items) - 0.3)
            ax.grid(axis="y", visible=False)
            ax.set_title(label, loc="left", fontsize=10)
        fig.supxlabel(f"gain over ce (top-1 points; bar: {level:.0%} confidence interval over paired seeds)",
                      fontsize=9)
        return to_svg(fig, salt, "gain of each method over ce per pair")


def size_plot(points: list[Point], palette: dict[str, tuple[str, str]], metric_label: str, salt: str) -> str:
    """Top-1 against the student's parameters and FLOPs (log scales), one point per run: colour by method,
    marker by student network; runs of one network are spread slightly sideways so that none hides another."""
    students = list(dict.fromkeys(p.student for p in points))
    variants = [v for v in palette if any(p.variant == v for p in points)]  # the table's column order
    with plt.rc_context(STYLE):
        fig = _figure(9.5, 3.8)
        axes = fig.subplots(1, 2, sharey=True)
        for ax, (attr, name, scale) in zip(axes, (("params", "student parameters (millions)", 1e6),
                                                  ("flops", "student FLOPs per image (millions)", 1e6))):
            shown = [p for p in points if getattr(p, attr)]
            if not shown:
                ax.text(0.5, 0.5, f"no {attr} recorded", transform=ax.transAxes, ha="center", color="#888888")
                continue
            for p in shown:
                i = variants.index(p.variant)
                x = getattr(p, attr) / scale * 10 ** ((i - (len(variants) - 1) / 2) * 0.012)
                ax.scatter([x], [p.top1], s=30, color=palette[p.variant][0], alpha=0.85,
                           marker=MARKERS[students.index(p.student) % len(MARKERS)], edgecolors="white",
                           linewidths=0.5, zorder=3)
            for s in students:
                xs = [getattr(p, attr) / scale for p in shown if p.student == s]
                if xs:
                    ax.annotate(s, (xs[0], 1), xycoords=("data", "axes fraction"), ha="center", va="bottom",
                                fontsize=8, color="#444444")
            values = [getattr(p, attr) / scale for p in shown]
            lo, hi = min(values), max(values)
            if hi / lo > 4:  # sizes an order of magnitude apart: a log scale, labelled in plain numbers
                ax.set_xscale("log")
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
            ax.set_xlim(lo / 1.25, hi * 1.25)
            ax.set_xlabel(name)
        axes[0].set_ylabel(f"{metric_label} (%)")
        handles = [plt.Line2D([], [], color=palette[v][0], marker="o", linestyle="", label=v) for v in variants]
        if len(students) > 1:
            handles += [plt.Line2D([], [], color="#555555", marker=MARKERS[i % len(MARKERS)], linestyle="",
                                   label=s) for i, s in enumerate(students)]
        fig.legend(handles=handles, loc="outside right center")
        return to_svg(fig, salt, "accuracy against student size")


def reference_plot(points: list[tuple[str, str, float, float]], metric: str, salt: str) -> str:
    """Ours against the published number, one point per (pair, column) with both; the diagonal is equality.
    ``points``: (pair label, column, published, ours)."""
    pairs = list(dict.fromkeys(p[0] for p in points))
    unit = "test error (%)" if metric == "error" else "top-1 (%)"
    with plt.rc_context(STYLE):
        fig = _figure(6.5, 5.0)
        ax = fig.add_subplot()
        values = [v for p in points for v in p[2:]]
        lo, hi = min(values), max(values)
        pad = max(0.5, (hi - lo) * 0.08)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="#888888", linewidth=1, linestyle="--")
        for pair, column, theirs, ours in points:
            colour = PALETTE[pairs.index(pair) % len(PALETTE)]
            ax.scatter([theirs], [ours], color=colour, s=30, zorder=3,
                       label=pair if column == next(p[1] for p in points if p[0] == pair) else None)
            ax.annotate(column, (theirs, ours), xytext=(4, 3), textcoords="offset points", fontsize=8)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_aspect("equal")
        ax.set_xlabel(f"published {unit}")
        ax.set_ylabel(f"ours, {unit}")
        if len(pairs) > 1:
            ax.legend(loc="upper left")
        return to_svg(fig, salt, "ours against the published numbers")
