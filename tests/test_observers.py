"""Run observers (kdzoo.observers): the TensorBoard and MLflow observers read back with their own readers and
compared with metrics.json, observers that raise leave training unchanged, validation refuses missing
packages and bad options before training, the registry isolates and lists observer plugins, a resumed run
replays its history, and the guide's example observer works as printed."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
import yaml

from kdzoo import KDZooError, hookimpl
from kdzoo.checkpoint import load_checkpoint
from kdzoo.cli import main
from kdzoo.config import BenchConfig, Recipe, RunConfig, parse
from kdzoo.data import Data
from kdzoo.engine import Member, Trainer
from kdzoo.models import KDNet
from kdzoo.observers import (ObservedProgress, Observer, ObserverSet, ObserverWarning, RunInfo, epoch_metrics,
                             resolve_observers)
from kdzoo.plugins import load_plugins
from kdzoo.runner import build_method, run_single

DATA = ["--train-size", "2000", "--test-size", "500", "--batch-size", "100", "--lr", "0.1", "--autocast", "off"]
TIMING = {"train_img_per_s", "epoch_time_s"}  # wall-clock numbers: the only ones two identical runs may differ in
GUIDE = Path(__file__).resolve().parents[1] / "docs" / "writing-plugins.md"


def flat_history(metrics: dict) -> list[dict[str, float]]:
    """metrics.json's history flattened by hand (independently of kdzoo.observers.epoch_metrics)."""
    out = []
    for record in metrics["history"]:
        row = {"lr": record["lr"], "train_img_per_s": record["train_img_per_s"], "epoch_time_s": record["epoch_time_s"]}
        row.update({f"loss/{k}": v for k, v in record["loss"].items()})
        for split in ("test", "val"):
            row.update({f"{split}/{k}": v for k, v in record.get(split, {}).items()})
        out.append(row)
    return out


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in ``folder``, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def mlflow_client(uri: str):
    import os

    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=uri)


def mlflow_run(uri: str, experiment: str, run_id: str):
    """The one MLflow run tagged with kdzoo's ``run_id`` in ``experiment``, read through MLflow's client."""
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment '{experiment}' in {uri}"
    (run,) = client.search_runs([exp.experiment_id], f"tags.`kdzoo.run_id` = '{run_id}'")
    return client, run


def assert_tensorboard_matches(folder: Path, metrics: dict) -> None:
    expected = flat_history(metrics)
    scalars = tensorboard_scalars(folder)
    assert set(scalars) == set(expected[0]), set(scalars) ^ set(expected[0])
    for key, points in scalars.items():
        assert [step for step, _ in points] == list(range(1, len(expected) + 1)), key
        for (_, value), row in zip(points, expected):
            assert value == pytest.approx(row[key], rel=1e-6, abs=1e-9), key  # TensorBoard stores float32


def assert_mlflow_matches(client, run, metrics: dict, files: dict[str, Path]) -> None:
    expected = flat_history(metrics)
    assert run.info.status == "FINISHED"
    for key in expected[0]:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert history == [(i + 1, row[key]) for i, row in enumerate(expected)], key  # float64: exact
    for part in ("last", "best"):
        for key, value in metrics[part].items():
            if isinstance(value, (int, float)):
                assert run.data.metrics[f"{part}/{key}"] == value, (part, key)
    assert run.data.params["method"] == metrics["method"] and run.data.params["seed"] == str(metrics["config"]["seed"])
    for key, value in metrics["hparams"].items():
        assert run.data.params[key] == str(value), key
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == set(files)
    for name, path in files.items():
        local = client.download_artifacts(run.info.run_id, name)
        assert Path(local).read_bytes() == path.read_bytes(), name


@pytest.fixture(scope="module")
def teacher(cifar_path, tmp_path_factory):
    """`kdzoo train --log tensorboard --log mlflow` on 2,000 real CIFAR-10 images, 2 epochs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("observed")
    out = root / "teacher"
    try:
        assert main(["train", "--model", "resnet8", "--epochs", "2", "--data", cifar_path, "--out", str(out), *DATA,
                     "--log", "tensorboard", "--log", "mlflow"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_train_tensorboard_event_files_hold_the_metrics_json_numbers(teacher):
    metrics = json.loads((teacher / "metrics.json").read_text())
    assert metrics["status"] == "ok" and len(metrics["history"]) == 2
    assert metrics["last"]["top1"] > 20.0  # real learning on real data; chance is 10%
    assert metrics["config"]["loggers"] == ["tensorboard", "mlflow"]  # --log lands in the run's config
    assert_tensorboard_matches(teacher / "tensorboard", metrics)


def test_train_mlflow_run_read_back_from_the_local_store(teacher):
    metrics = json.loads((teacher / "metrics.json").read_text())
    store = teacher.parent / "mlruns"  # the default: the results folder (--out's parent)
    assert store.is_dir()
    client, run = mlflow_run(store.resolve().as_uri(), "kdzoo", teacher.name)
    assert run.info.run_name == teacher.name and run.data.params["teacher"] == "-"
    assert_mlflow_matches(client, run, metrics, {n: teacher / n for n in ("checkpoint.pt", "metrics.json", "config.yaml")})


def test_distill_with_loggers_from_the_config_file_and_the_command_line(teacher, cifar_path, tmp_path):
    store = (tmp_path / "tracking").resolve().as_uri()
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"loggers": [{"name": "mlflow", "tracking_uri": store, "experiment": "kd-runs",
                                                   "artifacts": False}]}))
    out = tmp_path / "student"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["distill", "--config", str(config), "--teacher", str(teacher / "checkpoint.pt"), "--student",
                     "resnet8", "--method", "kd", "--epochs", "1", "--data", cifar_path, "--out", str(out), *DATA,
                     "--log", "tensorboard", "--log", "mlflow"]) == 0  # mlflow twice: the file's entry wins
    finally:
        torch.set_num_threads(threads)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e if isinstance(e, str) else e["name"] for e in metrics["config"]["loggers"]] == ["mlflow", "tensorboard"]
    assert {"loss/kd", "test/agreement"} <= set(flat_history(metrics)[0])
    assert_tensorboard_matches(out / "tensorboard", metrics)
    client, run = mlflow_run(store, "kd-runs", out.name)
    assert run.data.params["teacher"] == "resnet8" and run.data.params["T"] == "4.0"
    assert_mlflow_matches(client, run, metrics, {})  # artifacts: false
    assert not (tmp_path / "mlruns").exists()  # the tracking_uri given replaces the default store


def guide_namespace(monkeypatch) -> dict:
    """The guide's example observer, run from its own code block as a module (its dataclass needs one)."""
    blocks = re.findall(r"^```(\w*)\n(.*?)^```$", GUIDE.read_text(), re.M | re.S)
    (body,) = [b for lang, b in blocks if lang == "python" and "class JsonLinesObserver(Observer)" in b]
    module = ModuleType("from_the_guide")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(body, "writing-plugins.md", "exec"), module.__dict__)
    return vars(module)


class Flaky:
    """Observers that raise: in the constructor, in start, and in every epoch (counting its calls)."""

    epoch_calls = 0

    class BrokenConstructor(Observer):
        name = "broken_constructor"

        def __init__(self, options):
            raise RuntimeError("no tracker here")

    class ExplodesOnStart(Observer):
        name = "explodes_on_start"

        def start(self, run):
            raise ConnectionError("tracking server unreachable")

    class ExplodesOnEpoch(Observer):
        name = "explodes_on_epoch"

        def epoch(self, epoch, metrics):
            Flaky.epoch_calls += 1
            raise ValueError(f"cannot log epoch {epoch}")

    @hookimpl
    def register_observers(self, register):
        for cls in (self.BrokenConstructor, self.ExplodesOnStart, self.ExplodesOnEpoch):
            register(cls)


def test_observers_that_raise_change_nothing_and_are_reported_once(cifar_path, tmp_path, one_thread, monkeypatch):
    guide = guide_namespace(monkeypatch)
    Flaky.epoch_calls = 0
    registry = load_plugins(extra=[("flaky", Flaky()),
                                   ("guide", SimpleNamespace(register_observers=guide["register_observers"]))])

    def run(name: str, loggers: list, report=None) -> dict:
        cfg = parse(RunConfig, {"model": "resnet8", "seed": 3, "out": str(tmp_path / name), "device": "cpu",
                                "data": {"source": cifar_path, "train_size": 1000, "test_size": 300},
                                "recipe": {"epochs": 2, "batch_size": 100, "lr": 0.1, "autocast": "off"},
                                "loggers": loggers})
        return run_single(cfg, registry, report=report)

    plain = run("plain", [])
    reports: list[str] = []
    observed = run("observed", ["broken_constructor", "explodes_on_start", "explodes_on_epoch",
                                {"name": "jsonl", "file": "calls.jsonl"}], reports.append)

    assert plain["status"] == observed["status"] == "ok" and plain["last"]["top1"] > 15.0
    for a, b in zip(plain["history"], observed["history"], strict=True):
        assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}
    assert (plain["last"], plain["best"]) == (observed["last"], observed["best"])
    weights = [load_checkpoint(tmp_path / n / "checkpoint.pt")["state_dict"] for n in ("plain", "observed")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    # One report per failing observer, naming it, the call and the error; the failing epoch hook ran once.
    assert len(reports) == 3, reports
    for name, call, error in (("broken_constructor", "its constructor", "RuntimeError: no tracker here"),
                              ("explodes_on_start", "start()", "ConnectionError: tracking server unreachable"),
                              ("explodes_on_epoch", "epoch(1)", "ValueError: cannot log epoch 1")):
        (message,) = [r for r in reports if f"observer '{name}'" in r]
        assert call in message and error in message and "the run goes on" in message
    assert Flaky.epoch_calls == 1

    # The guide's observer, beside them, saw every call, with metrics.json's numbers.
    lines = [json.loads(line) for line in (tmp_path / "observed" / "calls.jsonl").read_text().splitlines()]
    assert [r["call"] for r in lines] == ["start", "epoch", "epoch", "artifact", "artifact", "artifact", "end"]
    assert lines[0]["run_id"] == "observed" and lines[0]["seed"] == 3 and lines[0]["method"] == "ce"
    metrics = json.loads((tmp_path / "observed" / "metrics.json").read_text())
    for line, row in zip(lines[1:3], flat_history(metrics), strict=True):
        assert {k: v for k, v in line.items() if k not in ("call", "epoch")} == row
    assert [r["epoch"] for r in lines[1:3]] == [1, 2]
    assert [r["file"] for r in lines[3:6]] == ["checkpoint.pt", "metrics.json", "config.yaml"]
    assert lines[-1] == {"call": "end", "status": "ok", "top1": metrics["last"]["top1"]}


def test_an_observer_failure_is_a_warning_by_default():
    class Fails(Observer):
        name = "fails"

        def end(self, result):
            raise OSError("disk full")

    from kdzoo.observers import ObserverSpec

    info = RunInfo("r1", "r1", "ce", {}, "resnet8", None, 0, Path("unused"), Path("unused"))
    observers = ObserverSet([ObserverSpec("fails", Fails, None)], info)
    observers.start()
    with pytest.warns(ObserverWarning, match=r"observer 'fails' failed in end\(\) for run r1 \(OSError: disk full\)"):
        observers.end({"status": "ok"})
    observers.end({"status": "ok"})  # ends once: no second call, no second warning


@pytest.mark.parametrize("observer, extra", [("tensorboard", "tensorboard"), ("mlflow", "mlflow")])
def test_a_missing_tracker_package_is_refused_before_anything_runs(observer, extra, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, extra, None)  # `import tensorboard` / `import mlflow` now raises ImportError
    out = tmp_path / "never"
    assert main(["train", "--model", "resnet8", "--data", str(tmp_path / "no-such.npz"), "--out", str(out),
                 "--log", observer]) == 2
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert f'pip install "kdzoo[{extra}]"' in err and "loggers[0]" in err and "Traceback" not in err
    assert not out.exists()  # refused before the data (a missing file here) or the output folder were touched


def test_a_missing_tracker_package_fails_a_benchmark_at_validation(cifar_path, tmp_path, monkeypatch, capsys):
    bench = tmp_path / "bench.yaml"
    bench.write_text(yaml.safe_dump({
        "name": "tiny", "teachers": ["resnet8"], "students": ["resnet8"], "methods": ["kd"], "seeds": [0],
        "data": {"source": cifar_path, "train_size": 500, "test_size": 200}, "recipe": {"epochs": 1}}))
    monkeypatch.setitem(sys.modules, "mlflow", None)
    assert main(["bench", str(bench), "--dry-run", "--out", str(tmp_path / "out"), "--log", "mlflow"]) == 2
    assert 'pip install "kdzoo[mlflow]"' in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "out").exists()


def test_bad_logger_entries_are_refused_naming_the_entry():
    registry = load_plugins()
    cases = [
        (["tensorbord"], r"Unknown observer 'tensorbord'.*Did you mean 'tensorboard'\?.*Available observers: mlflow, "
                         r"tensorboard"),
        ([{"name": "mlflow", "trackinguri": "file:///x"}],
         r"Unknown key 'loggers\[0\]\.trackinguri'\. Did you mean 'tracking_uri'\?"),
        (["tensorboard", {"name": "mlflow", "artifacts": "yes"}], r"loggers\[1\]\.artifacts must be true/false"),
        (["tensorboard", "tensorboard"], r"loggers\[1\]: observer 'tensorboard' is listed twice"),
        ([{"tracking_uri": "file:///x"}], r"loggers\[0\] needs `name:`"),
        ([3], r"loggers\[0\] must be an observer name or a mapping"),
    ]
    for loggers, message in cases:
        with pytest.raises(KDZooError, match=message):
            resolve_observers(registry, loggers)
    with pytest.raises(KDZooError, match=r"loggers must be list"):
        parse(RunConfig, {"model": "resnet8", "loggers": "mlflow"})
    assert parse(BenchConfig, {"loggers": ["tensorboard", {"name": "mlflow"}]}).loggers[1] == {"name": "mlflow"}
    (spec,) = resolve_observers(registry, [{"name": "mlflow", "experiment": "x"}])
    assert (spec.options.experiment, spec.options.tracking_uri, spec.options.artifacts) == ("x", None, True)


def test_an_observer_of_a_disabled_plugin_names_the_plugin(capsys):
    registry = load_plugins(disable=["mlflow_observer"])
    with pytest.raises(KDZooError, match=r"provided by plugin 'mlflow_observer' \(kdzoo .*\), which is disabled "
                                         r"\(-p no:mlflow_observer\)"):
        resolve_observers(registry, ["mlflow"])
    assert main(["-p", "no:tensorboard_observer", "train", "--model", "resnet8", "--log", "tensorboard"]) == 2
    assert "which is disabled (-p no:tensorboard_observer)" in " ".join(capsys.readouterr().err.split())


def test_observer_plugins_are_listed_isolated_and_checked_for_clashes(capsys):
    class Tracker(Observer):
        name = "tracker"

    class BadOptions(Observer):
        name = "bad_options"
        Options = dict  # not a dataclass

    def plugin(*classes):
        return SimpleNamespace(register_observers=hookimpl(lambda register: [register(c) for c in classes]))

    class Clashing(Observer):
        name = "tensorboard"

    registry = load_plugins(extra=[("good", plugin(Tracker)), ("bad", plugin(BadOptions)),
                                   ("clash", plugin(Clashing)), ("not_a_class", plugin(object))])
    assert registry.observer("tracker") is Tracker and registry.plugin("good").observers == ["tracker"]
    assert "Options must be a dataclass" in registry.plugin("bad").error
    assert "observer name clash: 'tensorboard' is registered by both plugin 'tensorboard_observer'" in \
        registry.plugin("clash").error
    assert "subclass of kdzoo.observers.Observer" in registry.plugin("not_a_class").error
    assert registry.observer("tensorboard").__module__ == "kdzoo_plugins.tensorboard_observer"
    assert {p.name: p.observers for p in registry.plugins if p.observers} == {
        "tensorboard_observer": ["tensorboard"], "mlflow_observer": ["mlflow"], "good": ["tracker"]}
    assert main(["plugins", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert listed["mlflow_observer"]["observers"] == ["mlflow"] and listed["mlflow_observer"]["status"] == "ok"


def test_observer_plugins_import_no_tracker():
    import subprocess

    code = ("import sys; from kdzoo.plugins import load_plugins; r = load_plugins(strict=True); "
            "print(sorted(r.observers), [m for m in ('mlflow', 'tensorboard', 'torch.utils.tensorboard') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['mlflow', 'tensorboard'] []"


class Recorder(Observer):
    """Keeps every call (for the resume test)."""

    name = "recorder"
    calls: list = []

    def start(self, run):
        Recorder.calls.append(("start", run.start_epoch))

    def epoch(self, epoch, metrics):
        Recorder.calls.append(("epoch", epoch, metrics["loss/ce"]))

    def end(self, result):
        Recorder.calls.append(("end", result["status"], result.get("error")))


def test_a_resumed_run_replays_its_history_then_continues(tmp_path, one_thread):
    from kdzoo.observers import ObserverSpec

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (48, 3, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 3, (48,), generator=g)
    data = Data(x[:32], y[:32], x[32:], y[32:], class_names=("a", "b", "c"))
    recipe = Recipe(epochs=3, batch_size=16, lr=0.1, autocast="off", channels_last=False)
    registry = load_plugins()

    def member() -> Member:
        torch.manual_seed(0)
        student = KDNet(registry.create_model("resnet8", num_classes=3), input_size=(8, 8))
        return Member("ce", student, build_method(registry, "ce", {}, student.info, None, 0))

    def observed(m: Member) -> ObservedProgress:
        info = RunInfo("r", "r", "ce", {}, "resnet8", None, 0, tmp_path, tmp_path)
        return ObservedProgress(None, {"ce": ObserverSet([ObserverSpec("recorder", Recorder, None)], info)}, [m])

    class Stop(KeyboardInterrupt):
        pass

    first = member()
    progress = observed(first)
    trainer = Trainer([first], data, recipe, seed=0, progress=progress)
    saved = {}

    def interrupt(done: int) -> None:
        if done == 2:
            saved.update(trainer.state_dict())
            raise Stop

    Recorder.calls = []
    with pytest.raises(Stop):
        try:
            trainer.fit(on_epoch=interrupt)
        except BaseException as e:
            progress.end_all(e)
            raise
    before = list(Recorder.calls)
    assert [c[0] for c in before] == ["start", "epoch", "epoch", "end"] and before[-1] == ("end", "failed", "interrupted")

    second = member()
    progress = observed(second)
    trainer = Trainer([second], data, recipe, seed=0, progress=progress)
    trainer.load_state_dict(saved)
    Recorder.calls = []
    (result,) = trainer.fit(start_epoch=2)
    progress.runs["ce"].end(result)
    after = Recorder.calls
    assert after[0] == ("start", 2)
    assert after[1:3] == before[1:3]  # the saved epochs, replayed with their numbers
    assert after[3][:2] == ("epoch", 3) and after[3][2] == result["history"][2]["loss"]["ce"]
    assert after[4] == ("end", "ok", None) and len(after) == 5


def test_epoch_metrics_flattens_records_and_marks_init_stages():
    main_record = {"epoch": 2, "stage": "main", "lr": 0.05, "loss": {"ce": 1.5, "kd": 0.25},
                   "train_img_per_s": 100.0, "epoch_time_s": 3.0, "test": {"top1": 40.0, "agreement": 60.0},
                   "val": {"top1": 38.0}}
    assert epoch_metrics(main_record) == {"lr": 0.05, "loss/ce": 1.5, "loss/kd": 0.25, "train_img_per_s": 100.0,
                                          "epoch_time_s": 3.0, "test/top1": 40.0, "test/agreement": 60.0,
                                          "val/top1": 38.0}
    init = {"epoch": 1, "stage": "init", "lr": 0.1, "loss": {"hint": 2.0}, "train_img_per_s": 1.0, "epoch_time_s": 1.0}
    assert epoch_metrics(init) == {"init/lr": 0.1, "init/loss/hint": 2.0, "init/train_img_per_s": 1.0,
                                   "init/epoch_time_s": 1.0}


def test_loggers_are_not_part_of_run_ids():
    from kdzoo.data import DataShape
    from kdzoo.plan import expand

    registry = load_plugins()
    shape = DataShape("cifar10", "fingerprint", 10, (32, 32), 50000)
    base = {"name": "ids", "teachers": ["resnet8"], "students": ["resnet8"], "methods": ["kd", "dkd"], "seeds": [0, 1]}
    plain = expand(parse(BenchConfig, base), shape, registry)
    logged = expand(parse(BenchConfig, {**base, "loggers": ["tensorboard", {"name": "mlflow", "experiment": "e"}]}),
                    shape, registry)
    assert [r.run_id for r in plain.runs] == [r.run_id for r in logged.runs] and len(plain.runs) == 6
    assert [c.cohort_id for c in plain.cohorts] == [c.cohort_id for c in logged.cohorts]
    assert [t.key for t in plain.teachers] == [t.key for t in logged.teachers]


def test_bench_runs_each_get_their_own_tensorboard_folder_and_mlflow_run(teacher, cifar_path, tmp_path):
    """Needs the observer hook in kdzoo.bench.run_cohort (the cohort's runs, trained together)."""
    bench = tmp_path / "bench.yaml"
    spec = {"name": "observed-bench", "teachers": [{"model": "resnet8", "checkpoint": str(teacher / "checkpoint.pt")}],
            "students": ["resnet8"], "methods": ["kd"], "seeds": [0],
            "data": {"source": cifar_path, "train_size": 2000, "test_size": 500},
            "recipe": {"epochs": 1, "batch_size": 100, "lr": 0.1, "autocast": "off"}, "device": "cpu",
            "loggers": [{"name": "mlflow", "experiment": "cohorts"}]}
    bench.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["bench", str(bench), "--out", str(out), "--log", "tensorboard"]) == 0
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json")) if
               not p.name.startswith("teacher-")]
    assert sorted(r["method"] for r in records) == ["ce", "kd"] and len({r["cohort_id"] for r in records}) == 1
    mlflow_ids = set()
    for record in records:
        assert record["status"] == "ok" and record["last"]["top1"] > 15.0
        metrics = {**record, "config": {"seed": record["seed"]}}
        assert_tensorboard_matches(out / "logs" / record["run_id"] / "tensorboard", metrics)
        client, run = mlflow_run((out / "mlruns").resolve().as_uri(), "cohorts", record["run_id"])
        assert run.data.tags["kdzoo.cohort_id"] == record["cohort_id"]
        assert_mlflow_matches(client, run, metrics, {f"{record['run_id']}.json": out / "runs" / f"{record['run_id']}.json"})
        mlflow_ids.add(run.info.run_id)
    assert len(mlflow_ids) == 2  # one MLflow run per kdzoo run, never shared by the cohort

    # The same benchmark without loggers plans the same run and cohort ids.
    from kdzoo.validation import prepare

    spec.pop("loggers")
    bench.write_text(yaml.safe_dump(spec))
    plan, _, _ = prepare(bench, load_plugins())
    assert {r.run_id for r in plan.runs} == {r["run_id"] for r in records}
    assert [c.cohort_id for c in plan.cohorts] == [records[0]["cohort_id"]]


def test_bench_observes_the_teacher_it_trains(cifar_path, tmp_path, monkeypatch):
    """A teacher trained by `kdzoo bench` is a run too: the benchmark's observers follow it."""
    monkeypatch.setenv("KDZOO_CACHE", str(tmp_path / "cache"))
    bench = tmp_path / "bench.yaml"
    bench.write_text(yaml.safe_dump({
        "name": "observed-teacher", "teachers": ["resnet8"], "students": ["resnet8"], "methods": ["kd"], "seeds": [0],
        "data": {"source": cifar_path, "train_size": 1000, "test_size": 300},
        "recipe": {"epochs": 1, "batch_size": 100, "lr": 0.1, "autocast": "off"}, "teacher_recipe": {"epochs": 2},
        "device": "cpu", "loggers": ["tensorboard", {"name": "mlflow", "experiment": "teachers"}]}))
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["bench", str(bench), "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    (path,) = (out / "runs").glob("teacher-*.json")
    record = json.loads(path.read_text())
    assert record["source"] == "trained" and len(record["history"]) == 2
    metrics = {**record, "method": "ce", "hparams": {}, "config": {"seed": record["seed"]}}
    assert_tensorboard_matches(out / "logs" / record["run_id"] / "tensorboard", metrics)
    client, run = mlflow_run((out / "mlruns").resolve().as_uri(), "teachers", record["run_id"])
    assert run.data.params["teacher"] == "-" and run.data.params["student"] == "resnet8"
    assert_mlflow_matches(client, run, metrics, {path.name: path})
    # the students were observed as before: one MLflow run each beside the teacher's
    exp = client.get_experiment_by_name("teachers")
    assert len(client.search_runs([exp.experiment_id])) == 3
