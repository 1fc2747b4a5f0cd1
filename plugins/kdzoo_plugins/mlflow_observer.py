"""First-party run observer ``mlflow``: one MLflow run per kdzoo run, through ``mlflow.MlflowClient``.

Options (``loggers: [{name: mlflow, ...}]``):

* ``tracking_uri``: where the runs go. Default: a local file store in the results folder,
  ``file://<results>/mlruns`` (``kdzoo train``/``distill``: the parent of ``--out``, e.g. ``runs/mlruns``;
  a benchmark: ``<results>/mlruns``). Recent MLflow versions refuse a file store unless
  ``MLFLOW_ALLOW_FILE_STORE=true``; kdzoo sets it in its own process when the store is a file store.
* ``experiment``: the MLflow experiment. Default: the benchmark's name, ``kdzoo`` for single runs.
* ``artifacts``: upload the run's files (checkpoint, ``metrics.json``, ``config.yaml``, a benchmark's
  run record) into the MLflow run (default true).

Every call names its MLflow run by id (no fluent "active run"), so the runs of a cohort, trained together
in one process, never mix. Params: the method, student, teacher, seed and the method's
hyperparameters; tags ``kdzoo.run_id`` and friends; metrics: the epoch's numbers at step = epoch, and
``last/...``, ``best/...`` at the end. Needs ``mlflow`` (``pip install "kdzoo[mlflow]"``, which installs
``mlflow-skinny``), imported only when the observer is used.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from kdzoo import KDZooError, hookimpl
from kdzoo.observers import Observer, RunInfo, final_metrics

INSTALL = 'pip install "kdzoo[mlflow]"'


@dataclass
class MLflowOptions:
    tracking_uri: str | None = None  # default: file://<results dir>/mlruns
    experiment: str | None = None  # default: the benchmark's name, "kdzoo" for `kdzoo train`/`distill`
    artifacts: bool = True  # log the run's files as MLflow artifacts


class MLflowObserver(Observer):
    name = "mlflow"
    description = "MLflow runs (default: a local file store <results>/mlruns)"
    Options = MLflowOptions

    @classmethod
    def check(cls, options: MLflowOptions) -> None:
        try:
            import mlflow  # noqa: F401
        except ImportError as e:
            raise KDZooError(f"the mlflow observer (--log mlflow) needs the mlflow package, which cannot be "
                             f"imported here ({e}). Install it: {INSTALL}") from e

    def start(self, run: RunInfo) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        uri = self.options.tracking_uri or (run.results_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:  # a file store; MLflow 3 wants an explicit opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = client = MlflowClient(tracking_uri=uri)
        name = self.options.experiment or run.experiment
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(name)
            except MlflowException:  # created meanwhile by another process of the benchmark
                experiment_id = client.get_experiment_by_name(name).experiment_id
        else:
            experiment_id = experiment.experiment_id
        tags = {"kdzoo.run_id": run.run_id, "kdzoo.folder": str(run.folder)}
        tags.update({"kdzoo.cohort_id": run.cohort_id} if run.cohort_id else {})
        tags.update({"kdzoo.resumed_at_epoch": str(run.start_epoch)} if run.start_epoch else {})
        self.run_id = client.create_run(experiment_id, run_name=run.name, tags=tags).info.run_id
        params = {"method": run.method, "student": run.student, "teacher": run.teacher or "-", "seed": run.seed}
        for key, value in run.hparams.items():
            params[key if key not in params else f"hparam.{key}"] = value
        client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def _log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self._log(metrics, epoch)

    def artifact(self, path) -> None:
        if self.options.artifacts:
            self.client.log_artifact(self.run_id, str(path))

    def end(self, result: dict[str, Any]) -> None:
        self._log(final_metrics(result), result.get("epochs_done", 0) + result.get("init_epochs_done", 0))
        if result.get("error"):
            self.client.set_tag(self.run_id, "kdzoo.error", str(result["error"])[:5000])
        self.client.set_terminated(self.run_id, "FINISHED" if result.get("status") == "ok" else "FAILED")


@hookimpl
def register_observers(register):
    register(MLflowObserver)
