"""Rich progress bars for training: epochs, batches with img/s, and a line per finished epoch."""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichBars, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from kdzoo.engine import Progress


class RichProgress(Progress):
    """Shows an epoch bar and a batch bar (with images per second) while a cohort trains."""

    def __init__(self, console: Console | None = None, title: str = "") -> None:
        self.console = console or Console(stderr=True)
        self.title = title
        self.bars: RichBars | None = None

    def run_start(self, labels: list[str], epochs: int, steps_per_epoch: int, start_epoch: int = 0) -> None:
        self.bars = RichBars(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.console, transient=False,
        )
        self.bars.start()
        name = self.title or ", ".join(labels)
        self.epoch_task = self.bars.add_task(f"{name} epochs", total=epochs, completed=start_epoch, rate="")
        self.batch_task = self.bars.add_task("batches", total=steps_per_epoch, rate="")
        self.images = 0

    def step(self, images: int) -> None:
        self.images += images
        task = self.bars.tasks[self.batch_task]
        self.bars.advance(self.batch_task)
        if task.elapsed:
            self.bars.update(self.batch_task, rate=f"{self.images / task.elapsed:,.0f} img/s")

    def epoch_end(self, epoch: int, records: dict[str, dict[str, Any]]) -> None:
        self.bars.advance(self.epoch_task)
        self.bars.reset(self.batch_task)
        self.images = 0
        for label, r in records.items():
            losses = " ".join(f"{k}={v:.3f}" for k, v in r["loss"].items())
            self.bars.console.print(
                f"[dim]epoch {r['epoch']}[/] {label}: top1 [bold]{r['test']['top1']:.2f}[/]  {losses}  "
                f"{r['train_img_per_s']:,.0f} img/s"
            )

    def run_end(self) -> None:
        if self.bars is not None:
            self.bars.remove_task(self.batch_task)
            self.bars.stop()
            self.bars = None
