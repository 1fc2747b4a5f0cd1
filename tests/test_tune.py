"""`kdzoo tune`: bad input refused before the first trial; a real search on CIFAR-10 that prunes, never reads the
test split, reports the store's best and writes a benchmark that validates; resume after an interruption."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from kdzoo import KDZooError, hookimpl
from kdzoo import tune, tune_run
from kdzoo.cli import main
from kdzoo.data import Data
from kdzoo.engine import Progress
from kdzoo.methods import Method
from kdzoo.plugins import load_plugins

TINY = {
    "name": "tiny",
    "teacher": "resnet8",
    "student": "resnet8",
    "data": {"train_size": 1000, "val_size": 500, "test_size": 300},
    "recipe": {"epochs": 2, "batch_size": 64, "lr": 0.05, "eval_batch_size": 500},
    "teacher_recipe": {"epochs": 3},
    "methods": {"kd": {"w_ce": {"low": 0.0, "high": 1.0}, "w_kd": {"low": 0.0, "high": 1.0}}},
    "budget": {"trials": 4},
    # Trials 0-1 (the defaults, then plain CE) finish; then w_ce = w_kd = 0 (a zero loss: it cannot learn)
    # is below the median of the finished trials after epoch 1 and must be pruned.
    "search": {"cohort": 2, "pruner_options": {"n_startup_trials": 2},
               "enqueue": [{"w_ce": 1.0, "w_kd": 0.0}, {"w_ce": 0.0, "w_kd": 0.0}]},
    "bench_seeds": [0, 1],
}


def write(tmp_path: Path, mapping: dict, name: str = "t.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(mapping))
    return path


def with_(base: dict, **changes) -> dict:
    out = yaml.safe_load(yaml.safe_dump(base))
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return out


class NoHparams(Method):
    name = "bare"
    needs_teacher = False
    defaults: dict = {}

    def forward(self, student, teacher, labels):
        return {"ce": self.ce(student.logits, labels)}


# -- bad input: one clear error naming the YAML path, before any data is loaded ------------------------
BAD = [
    (with_(TINY, methods={"kd": {"temp": {"low": 1, "high": 8}}}), ["methods.kd.temp", "Did you mean 'T'?"]),
    (with_(TINY, methods={"kd": {"T": {"low": "1", "high": 8}}}), ["methods.kd.T.low must be a number"]),
    (with_(TINY, methods={"dkd": {"warmup": {"low": 1.5, "high": 10}}}), ["methods.dkd.warmup.low must be an integer"]),
    (with_(TINY, methods={"kd": {"T": {"low": 8, "high": 1}}}), ["methods.kd.T", "low (8) must be below high (1)"]),
    (with_(TINY, methods={"kd": {"w_kd": {"low": 0, "high": 10, "log": True}}}), ["methods.kd.w_kd", "low > 0"]),
    (with_(TINY, methods={"kd": {"w_kd": {"low": -1.0, "high": 1.0}}}), ["methods.kd.w_kd.low", "must be >= 0"]),
    (with_(TINY, methods={"kd": {"T": {"low": 1, "hi": 8}}}), ["methods.kd.T.hi is not a space key", "'high'"]),
    (with_(TINY, methods={"kd": {"logit_std": {"low": 0, "high": 1}}}), ["methods.kd.logit_std", "choices"]),
    (with_(TINY, methods={"kd": {"T": 4.0}}), ["methods.kd searches nothing"]),
    (with_(TINY, methods={"kdd": {"T": {"low": 1, "high": 8}}}), ["methods.kdd", "'kd'"]),
    (with_(TINY, methods={"bare": {"w_ce": {"low": 0.1, "high": 1.0}}}),
     ["methods.bare", "declares no hyperparameters"]),
    (with_(TINY, data__val_size=None), ["data.val_size is 0", "never on the test set", "val_size"]),
    (with_(TINY, budget={"trials": 4, "epochs": 1}), ["budget.epochs is 1", "one trial trains 2", "not even one"]),
    (with_(TINY, budget={"trials": 0}), ["budget.trials is 0"]),
    (with_(TINY, budjet={"trials": 4}), ["Unknown key 'budjet'", "Did you mean 'budget'"]),
    (with_(TINY, search__pruner="medain"), ["search.pruner is 'medain'", "Did you mean 'median'?"]),
    (with_(TINY, search__enqueue=[{"w_ce": 2.0}]), ["search.enqueue[0].w_ce = 2.0 lies outside", "[0.0, 1.0]"]),
]


@pytest.mark.parametrize("mapping, expected", BAD, ids=[e[0] for _, e in BAD])
def test_bad_input_is_one_clear_error_before_any_data_or_trial(tmp_path, mapping, expected):
    plugin = types.SimpleNamespace(register_methods=hookimpl(lambda register: register(NoHparams)))
    registry = load_plugins(extra=[("bare-plugin", plugin)])
    # A data source that does not exist: reaching the data loader would raise another error.
    with pytest.raises(KDZooError) as info:
        tune.prepare(write(tmp_path, mapping), registry, data_source=str(tmp_path / "no-such-data.npz"))
    for text in expected:
        assert text in str(info.value), str(info.value)
    assert "no-such-data" not in str(info.value)


def test_cli_prints_the_error_without_a_traceback(tmp_path, capsys):
    path = write(tmp_path, with_(TINY, methods={"kd": {"temperature": {"low": 1, "high": 8}}}))
    assert main(["tune", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "methods.kd.temperature" in err and "Did you mean 'T'?" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "study.db").exists()


@pytest.mark.parametrize("args", [["--workers", "2"], ["--executor", "ray", "--workers", "0"]])
def test_workers_need_the_ray_executor_and_a_positive_count(tmp_path, capsys, args):
    path = write(tmp_path, TINY)
    assert main(["tune", str(path), "--out", str(tmp_path / "out"), *args]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--workers {args[-1]}:" in err and "needs --executor ray and a count of at least 1" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


# -- real searches on CIFAR-10 -------------------------------------------------------------------------
class SplitGuard(Data):
    """A Data whose test split may not be read: any access is recorded and raises."""

    reads: list[str] = []

    @property
    def test_x(self):
        SplitGuard.reads.append("test_x")
        raise AssertionError("the search read the test images")

    @test_x.setter
    def test_x(self, value):
        self.__dict__["_test_x"] = value

    @property
    def test_y(self):
        SplitGuard.reads.append("test_y")
        raise AssertionError("the search read the test labels")

    @test_y.setter
    def test_y(self, value):
        self.__dict__["_test_y"] = value


@pytest.fixture
def env(tmp_path, cifar_path, monkeypatch, one_thread):
    monkeypatch.setenv("KDZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KDZOO_DATA", cifar_path)
    monkeypatch.setenv("COLUMNS", "200")
    return tmp_path


def stored_values(db: Path) -> dict[int, tuple[str, float | None]]:
    """Trial number → (state, value), read from Optuna's SQLite file with plain SQL."""
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT t.number, t.state, v.value FROM trials t LEFT JOIN trial_values v "
                           "ON v.trial_id = t.trial_id").fetchall()
    return {n: (state, value) for n, state, value in rows}


def test_search_prunes_never_reads_the_test_split_and_writes_a_benchmark(env, capsys, monkeypatch):
    registry = load_plugins(strict=True)
    path = write(env, TINY)
    out = env / "out"
    # The teacher is trained first, as `kdzoo bench` trains it (its record measures its test accuracy).
    setup = tune.prepare(path, registry)
    tune_run.ensure_teacher_net(setup, registry, out, Progress(), lambda *a: None)

    from kdzoo import runner

    load_data = runner.load_data

    def guarded(*args, **kwargs):
        data = load_data(*args, **kwargs)
        data.__class__ = SplitGuard
        return data

    monkeypatch.setattr(runner, "load_data", guarded)
    SplitGuard.reads = []
    assert main(["tune", str(path), "--out", str(out)]) == 0
    assert SplitGuard.reads == []  # validation, search, report and benchmark never touched the test split
    printed = capsys.readouterr().out

    stored = stored_values(out / "study.db")
    assert sorted(stored) == [0, 1, 2, 3]
    assert stored[2][0] == "PRUNED"  # w_ce = w_kd = 0
    study = tune_run.open_study(setup, out)
    trials = {t.number: t for t in study.get_trials()}
    assert trials[2].params == {"method": "kd", "kd.w_ce": 0.0, "kd.w_kd": 0.0}
    assert len(trials[2].user_attrs["val_top1"]) == 1 and trials[2].user_attrs["epochs"] == 1
    finished = [t for t in trials.values() if t.state.name == "COMPLETE"]
    assert len(finished) >= 2
    for t in finished:  # real learning, well above chance (10%) and above the trial that could not learn
        assert len(t.user_attrs["val_top1"]) == 2 and t.user_attrs["epochs"] == 2
        assert t.user_attrs["val_top1"][0] > trials[2].user_attrs["val_top1"][0]
        assert t.value == t.user_attrs["val_top1"][-1] > 15
    # The reported best is the best complete value in the store.
    best_number, best_value = max(((n, v) for n, (s, v) in stored.items() if s == "COMPLETE"), key=lambda x: x[1])
    assert f"Best: trial {best_number}, kd " in printed and f"validation top-1 {best_value:.2f}%" in printed
    used = sum(t.user_attrs["epochs"] for t in trials.values())
    assert f"trained {used} student epochs" in printed and "trains every point for 2: 8 epochs" in printed

    # The benchmark it wrote validates, reuses the cached teacher and holds the best settings as kd(tuned).
    from kdzoo.plan import teacher_status
    from kdzoo.validation import prepare

    bench = yaml.safe_load((out / "tuned.yaml").read_text())
    plan, _, _ = prepare(out / "tuned.yaml", registry)
    assert teacher_status(plan.teachers[0]) == "cached"
    labels = [v.label for v in plan.variants]
    best = trials[best_number]
    if best.user_attrs["hparams"] == {"w_ce": 0.1, "w_kd": 0.9}:
        assert labels == ["ce", "kd"]
    else:
        tuned = next(v for v in plan.variants if v.label == "kd(tuned)")
        assert labels == ["ce", "kd", "kd(tuned)"] and tuned.hparams == best.user_attrs["hparams"]
    assert bench["seeds"] == [0, 1] and bench["data"] == TINY["data"]


class Interrupt(Progress):
    """Interrupts training at the ``at``-th epoch end of a cohort of trials (as Ctrl-C or a kill would)."""

    def __init__(self, at: int) -> None:
        self.at, self.seen = at, 0

    def epoch_end(self, epoch, records):
        self.seen += any(label.startswith("trial") for label in records)
        if self.seen == self.at:
            raise KeyboardInterrupt


def test_an_interrupted_search_resumes_without_redoing_finished_trials(env):
    registry = load_plugins(strict=True)
    mapping = with_(TINY, recipe__epochs=1, search={"cohort": 2, "pruner": "none", "defaults_first": False})
    setup = tune.prepare(write(env, mapping), registry)
    out = env / "out"
    with pytest.raises(KeyboardInterrupt):  # the second cohort (trials 2-3) is interrupted in its epoch
        tune_run.search(setup, registry, out, Interrupt(at=2), lambda *a: None)
    before = stored_values(out / "study.db")
    assert {n: s for n, (s, _) in before.items()} == {0: "COMPLETE", 1: "COMPLETE", 2: "RUNNING", 3: "RUNNING"}
    study = tune_run.open_study(setup, out)
    interrupted = {t.number: t.params for t in study.get_trials() if t.number in (2, 3)}

    said = []
    outcome = tune_run.search(setup, registry, out, Progress(), lambda event, detail: said.append(detail))
    assert outcome.trained_now == 2  # only the interrupted trials' settings were trained again
    after = stored_values(out / "study.db")
    assert after[0] == before[0] and after[1] == before[1]  # finished trials untouched
    assert after[2][0] == after[3][0] == "FAIL"
    retried = {t.number: t for t in outcome.trials if t.number >= 4}
    assert sorted(retried) == [4, 5] and all(t.state.name == "COMPLETE" for t in retried.values())
    assert sorted(map(str, (t.params for t in retried.values()))) == sorted(map(str, interrupted.values()))
    assert sum("was interrupted" in s for s in said) == 2
    assert tune_run.spent(study, 1) == (4, 4)  # the interrupted attempts do not count against the budget
    # A third run finds the budget spent and trains nothing.
    assert tune_run.search(setup, registry, out, Progress(), lambda *a: None).trained_now == 0


def test_two_processes_share_one_study_and_one_teacher_within_the_budget(env):
    """Two `kdzoo tune` processes started together on one folder: the teacher is trained once (the other waits
    for it), every trial is trained once, both processes train some, and together they stay within budget."""
    mapping = with_(TINY, recipe__epochs=1, budget={"trials": 6}, search={"cohort": 1, "pruner": "none"})
    path, out = write(env, mapping), env / "out"
    cmd = [sys.executable, "-m", "kdzoo", "tune", str(path), "--out", str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    printed = "\n".join(outputs)
    assert printed.count("resnet8: training (3 epochs)") == 1, printed

    stored = stored_values(out / "study.db")
    assert stored == {n: ("COMPLETE", stored[n][1]) for n in range(6)}  # six trials, each trained once
    study = tune_run.open_study(tune.prepare(path, load_plugins(strict=True)), out)
    trials = study.get_trials()
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both processes trained trials
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6
    # tuned.yaml is written by whichever process saw every trial finished, from the study's best trial.
    best = max(trials, key=lambda t: (t.value, -t.number))
    bench = yaml.safe_load((out / "tuned.yaml").read_text())
    assert f"validation top-1 {best.value:.2f}%" in bench["description"]
    assert sum("Wrote " in o for o in outputs) >= 1


def test_ray_workers_share_one_study(env):
    """`kdzoo tune --executor ray --workers 2` on a local Ray instance: two tasks search one study together."""
    pytest.importorskip("ray", reason="the optional Ray executor (pip install 'kdzoo[ray]'); CI installs it")
    mapping = with_(TINY, recipe__epochs=1, budget={"trials": 4}, search={"cohort": 1, "pruner": "none"})
    path, out = write(env, mapping), env / "out"
    proc = subprocess.run([sys.executable, "-m", "kdzoo", "tune", str(path), "--out", str(out), "--executor", "ray",
                           "--workers", "2"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Ray: 2 tuning worker(s)" in proc.stderr and "{'num_cpus': 1}" in proc.stderr
    stored = stored_values(out / "study.db")
    assert stored == {n: ("COMPLETE", stored[n][1]) for n in range(4)}
    trials = tune_run.open_study(tune.prepare(path, load_plugins(strict=True)), out).get_trials()
    assert len({t.user_attrs["worker"] for t in trials}) == 2 and all(t.value > 15 for t in trials)
    best = max(trials, key=lambda t: (t.value, -t.number))
    assert f"Best: trial {best.number}, kd " in proc.stdout and (out / "tuned.yaml").is_file()
