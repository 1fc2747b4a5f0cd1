"""First-party run observer ``tensorboard``: TensorBoard event files in each run's own folder.

Each run writes to ``<run folder>/tensorboard/`` (``kdzoo train``/``distill``: the ``--out`` folder; a
benchmark: ``<results>/logs/<run_id>``), so ``tensorboard --logdir runs`` shows every run below
``runs/``. Scalars are the epoch's numbers of ``metrics.json``'s history (``loss/ce``, ``test/top1``,
``lr``...; :func:`kdzoo.observers.epoch_metrics`) at step = epoch; the text tab holds the run's
description. A resumed run hides the events of its interrupted process (``purge_step``) and writes its
whole history again. Needs the ``tensorboard`` package (``pip install "kdzoo[tensorboard]"``), imported
only when the observer is used.
"""
from __future__ import annotations

from typing import Any

from kdzoo import KDZooError, hookimpl
from kdzoo.observers import Observer, RunInfo

INSTALL = 'pip install "kdzoo[tensorboard]"'


class TensorBoardObserver(Observer):
    name = "tensorboard"
    description = "TensorBoard event files in each run's folder (<run>/tensorboard)"

    @classmethod
    def check(cls, options: Any) -> None:
        try:
            import tensorboard  # noqa: F401  (torch's writer needs it; a clear message instead of torch's)
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as e:
            raise KDZooError(f"the tensorboard observer (--log tensorboard) needs the tensorboard package, which "
                             f"cannot be imported here ({e}). Install it: {INSTALL}") from e

    def start(self, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run.folder / "tensorboard"),
                                    purge_step=1 if run.start_epoch else None)
        rows = {"run id": run.run_id, "method": run.method, "student": run.student, "teacher": run.teacher or "-",
                "seed": run.seed, "hyperparameters": ", ".join(f"{k}={v}" for k, v in run.hparams.items()) or "-",
                "experiment": run.experiment, "cohort": run.cohort_id or "-"}
        table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows.items())
        self.writer.add_text("run", f"**{run.name}**\n\n{table}", global_step=0)
        self.step = 0

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=epoch)
        self.writer.flush()  # visible in a running TensorBoard after each epoch
        self.step = epoch

    def end(self, result: dict[str, Any]) -> None:
        status = result.get("status", "failed")
        self.writer.add_text("status", status + (f": {result['error']}" if result.get("error") else ""),
                             global_step=self.step)
        self.writer.close()


@hookimpl
def register_observers(register):
    register(TensorBoardObserver)
