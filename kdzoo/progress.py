"""Rich progress bars: the plan (benchmarks), the current run's epochs, and its batches with img/s."""
from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichBars, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from kdzoo.engine import Progress


class RichProgress(Progress):
    """Shows an optional plan bar, an epoch bar and a batch bar (with images per second).

    Use as a context manager when it spans several runs (``kdzoo bench``).
    """

    def __init__(self, console: Console | None = None, plan_total: int | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.bars = RichBars(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.console,
        )
        self.plan_task = self.bars.add_task("plan (runs)", total=plan_total, rate="") if plan_total else None
        self.tasks: tuple[int, int] | None = None
        self.live = False

    def __enter__(self) -> "RichProgress":
        self.bars.start()
        self.live = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bars.stop()
        self.live = False

    def say(self, event: str, detail: str) -> None:
        style = {"resume": "yellow", "damaged": "yellow", "cohort_done": "dim"}.get(event, "bold")
        self.bars.console.print(f"[{style}]{escape(detail)}[/]", highlight=False)

    def run_start(self, labels: list[str], epochs: int, steps_per_epoch: int, start_epoch: int = 0) -> None:
        if not self.live:
            self.bars.start()
        self.labels = labels
        name = labels[0] if len(labels) == 1 else f"cohort of {len(labels)}"
        self.tasks = (
            self.bars.add_task(f"{name}: epochs", total=epochs, completed=start_epoch, rate=""),
            self.bars.add_task("batches", total=steps_per_epoch, rate=""),
        )
        self.images = 0
        self.t0 = time.perf_counter()

    def step(self, images: int) -> None:
        self.images += images
        batch_task = self.tasks[1]
        self.bars.advance(batch_task)
        elapsed = time.perf_counter() - self.t0
        if elapsed > 0:
            self.bars.update(batch_task, rate=f"{self.images / elapsed:,.0f} img/s")

    def epoch_end(self, epoch: int, records: dict[str, dict[str, Any]]) -> None:
        self.bars.advance(self.tasks[0])
        self.bars.reset(self.tasks[1])
        self.images = 0
        self.t0 = time.perf_counter()
        for label, r in records.items():
            losses = " ".join(f"{k}={v:.3f}" for k, v in r["loss"].items())
            score = (f"top1 [bold]{r['test']['top1']:.2f}[/]" if "test" in r
                     else "[dim]init stage[/]")  # the init stage is not evaluated
            self.bars.console.print(
                f"[dim]epoch {r['epoch']}[/] {label}: {score}  {losses}  {r['train_img_per_s']:,.0f} img/s",
                highlight=False,
            )

    def runs_done(self, n: int) -> None:
        if self.plan_task is not None:
            self.bars.advance(self.plan_task, n)

    def run_end(self) -> None:
        if self.tasks is not None:
            for task in self.tasks:
                self.bars.remove_task(task)
            self.tasks = None
        self.runs_done(len(self.labels))
        if not self.live:
            self.bars.stop()
