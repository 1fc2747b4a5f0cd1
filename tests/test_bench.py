"""The benchmark runner: plan expansion, validation, teacher cache, failure isolation, kill -9 and resume."""
from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import yaml

from kdzoo import KDZooError, hookimpl
from kdzoo import bench as B
from kdzoo.config import BenchConfig, parse
from kdzoo.data import DataShape
from kdzoo.methods import Method
from kdzoo.plugins import load_plugins
from kdzoo.store import Store

TINY = {
    "name": "tiny",
    "data": {"train_size": 384, "test_size": 200},
    "seeds": [0],
    "recipe": {"epochs": 3, "batch_size": 64, "lr": 0.05, "eval_batch_size": 200},
    "teacher_recipe": {"epochs": 2},
    "teachers": ["resnet20"],
    "students": ["wrn_16_1"],
    "methods": ["kd", "attention"],
}
TIMING = {"wall_time_s", "img_per_s", "train_img_per_s", "epoch_time_s", "environment"}


def strip_timing(obj):
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


@functools.cache
def _registry():
    return load_plugins(strict=True)


@pytest.fixture(scope="module")
def registry():
    return _registry()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KDZOO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def shape(fingerprint="fp0", n_train=384):
    return DataShape("cifar10", fingerprint, 10, (32, 32), n_train)


def plan_of(mapping, fingerprint="fp0", registry=None):
    """The plan of ``mapping`` for CIFAR-10 (the training-set size as its ``data.train_size`` says)."""
    n_train = (mapping.get("data") or {}).get("train_size") or 50000
    return B.expand(parse(BenchConfig, mapping), shape(fingerprint, n_train), registry or _registry())


# -- plan ----------------------------------------------------------------------------------------
def test_plan_expansion_sweeps_and_baseline():
    plan = plan_of({**TINY, "students": ["wrn_16_1", "resnet20"], "seeds": [0, 1],
                    "methods": ["fitnets", {"name": "kd", "T": [2, 4, 8], "w_kd": 0.9}]})
    assert [v.label for v in plan.variants] == ["ce", "fitnets", "kd(T=2, w_kd=0.9)", "kd(T=4, w_kd=0.9)",
                                                "kd(T=8, w_kd=0.9)"]
    assert plan.variants[2].hparams == {"T": 2, "w_kd": 0.9}
    # one cohort per (teacher, seed), across both students: the teacher runs once per batch for all ten runs
    assert len(plan.cohorts) == 2 and all(len(c.runs) == 2 * 5 for c in plan.cohorts)
    assert [s.model for s in plan.cohorts[0].students] == ["wrn_16_1", "resnet20"]
    assert len({plan.cohorts[0].member_label(r) for r in plan.cohorts[0].runs}) == 10
    assert len({r.run_id for r in plan.runs}) == 20
    assert plan.pairs == [("resnet20", "wrn_16_1"), ("resnet20", "resnet20")]
    solo = plan_of({**TINY, "cohorts": False})
    assert len(solo.cohorts) == 3 and all(len(c.runs) == 1 for c in solo.cohorts)
    assert {r.run_id for r in solo.runs} == {r.run_id for r in plan_of(TINY).runs}  # cohorts don't change results
    wide = {**TINY, "students": ["wrn_16_1", "resnet20"], "seeds": [0, 1],
            "methods": ["fitnets", {"name": "kd", "T": [2, 4, 8], "w_kd": 0.9}]}
    capped = plan_of({**wide, "cohort_size": 4})  # each (teacher, seed)'s 10 runs in cohorts of at most 4
    assert [len(c.runs) for c in capped.cohorts] == [4, 4, 2, 4, 4, 2]
    assert [r.run_id for r in capped.runs] == [r.run_id for r in plan.runs]
    assert [len(c.runs) for c in plan_of({**wide, "cohort_size": 99}).cohorts] == [10, 10]
    for bad, message in ((0, "cohort_size is 0: .* must be at least 1"), (-2, "cohort_size is -2"),
                         (True, "cohort_size must be an integer or null, got True")):
        with pytest.raises(KDZooError, match=message):
            plan_of({**wide, "cohort_size": bad})
    labelled = plan_of({**TINY, "methods": [{"name": "kd", "label": "hinton", "T": [2, 4], "w_kd": 0.5}]})
    assert [v.label for v in labelled.variants] == ["ce", "hinton(T=2)", "hinton(T=4)"]
    assert labelled.variants[1].hparams == {"T": 2, "w_kd": 0.5}
    explicit = plan_of({**TINY, "methods": ["ce", "kd"]})
    assert [v.label for v in explicit.variants] == ["ce", "kd"]


def test_logit_cache_roles_follow_the_plans_order(registry):
    """Solo runs of one teacher and seed, in plan order: ce runs no teacher; kd runs it first and writes its
    logits; attention needs features (it runs the teacher); dkd needs only logits and reads them. A teacher
    and seed with one cohort keeps no logits unless the benchmark asks."""
    from kdzoo.plan import logit_cache_roles

    methods = {**TINY, "methods": ["kd", "attention", "dkd"], "seeds": [0, 1]}

    def roles(plan):
        by_id = logit_cache_roles(plan, registry)
        return [[(r.variant.label, by_id[c.cohort_id]) for r in c.runs] for c in plan.cohorts]

    solo = roles(plan_of({**methods, "cohorts": False}))
    assert solo == [[("ce", "")], [("kd", "write")], [("attention", "write")], [("dkd", "read")]] * 2
    assert roles(plan_of(methods)) == [[(m, "") for m in ("ce", "kd", "attention", "dkd")]] * 2
    asked = roles(plan_of({**methods, "cache_teacher_logits": True}))
    assert asked == [[(m, "write") for m in ("ce", "kd", "attention", "dkd")]] * 2
    # capped: [ce, kd] writes; [attention, dkd] needs features, so it runs the teacher (and writes again)
    assert roles(plan_of({**methods, "cohort_size": 2})) == [[("ce", "write"), ("kd", "write")],
                                                             [("attention", "write"), ("dkd", "write")]] * 2
    feature_only = roles(plan_of({**TINY, "methods": ["attention", "fitnets"], "cohorts": False}))
    assert feature_only == [[("ce", "")], [("attention", "")], [("fitnets", "")]]  # none could read: off


def test_dry_run_estimate_charges_a_cohort_reading_cached_logits_without_its_teacher(registry, monkeypatch):
    """estimate_seconds probes a cohort that will read cached logits as such (``from_cache``), and sums every
    probe over the cohort's images and epochs; the real probe of one runs and gives a positive cost."""
    from kdzoo import estimate
    from kdzoo.data import Data
    from kdzoo.models import KDNet

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (448, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.arange(448) % 10
    data = Data(x[:384], y[:384], x[384:], y[384:])
    plan = plan_of({**TINY, "methods": ["kd", "dkd"], "cohorts": False})
    monkeypatch.setattr(estimate, "teacher_status", lambda job: "cached")  # time the cohorts only
    calls = []

    def fake_probe(registry, data, runs, teacher, device, recipe, steps, from_cache=False):
        calls.append(([v.label for _, v in runs], from_cache))
        return 0.25 if from_cache else 1.0

    real_probe = estimate._probe
    monkeypatch.setattr(estimate, "_probe", fake_probe)
    seconds = estimate.estimate_seconds(plan, data, registry, torch.device("cpu"))
    assert calls == [(["ce"], False), (["kd"], False), (["dkd"], True)]
    assert seconds == pytest.approx((1.0 + 1.0 + 0.25) * 384 * 3 * 1.1)

    teacher = KDNet(registry.create_model("resnet20", num_classes=10))
    runs = [(plan.cohorts[2].runs[0].student, plan.cohorts[2].runs[0].variant)]
    cost = real_probe(registry, data, runs, teacher, torch.device("cpu"), plan.cohorts[2].recipe, 2, True)
    assert 0 < cost < 1


@pytest.mark.parametrize("change, fragment", [
    ({"methods": ["kd", "kd"]}, "more than once"),
    ({"methods": [{"T": 2}]}, "methods[0] must be a method name"),
    ({"methods": [{"name": "kd", "T": []}]}, "methods[0].T is an empty sweep"),
    ({"pairs": [["resnet20", "nope"]]}, "pairs[0]"),
    ({"seeds": []}, "seeds"),
    ({"teacher_recipe": {"epoch": 2}}, "Unknown key 'teachers[0].recipe.epoch'"),
])
def test_plan_errors(change, fragment):
    with pytest.raises(KDZooError) as e:
        plan_of({**TINY, **change})
    assert fragment in str(e.value)


def test_teacher_key_changes_with_every_determining_field():
    base = plan_of(TINY).teachers[0].key
    assert plan_of(TINY).teachers[0].key == base
    variants = [
        {**TINY, "teachers": [{"model": "resnet32"}]},
        {**TINY, "teachers": [{"model": "resnet20", "seed": 1}]},
        {**TINY, "teachers": [{"model": "resnet20", "options": {"drop_rate": 0.1}}]},
        {**TINY, "teacher_recipe": {"epochs": 3}},
        {**TINY, "recipe": {**TINY["recipe"], "lr": 0.1}},
    ]
    keys = [plan_of(v).teachers[0].key for v in variants] + [plan_of(TINY, "fp1").teachers[0].key]
    assert base not in keys and len(set(keys)) == len(keys)
    # student-only settings do not retrain the teacher
    assert plan_of({**TINY, "student_recipe": {"epochs": 9}, "seeds": [5]}).teachers[0].key == base


@pytest.mark.parametrize("change, fragment", [
    ({"students": ["wrn_16_l"]}, "Unknown model 'wrn_16_l'"),
    ({"methods": ["kd", "atention"]}, "methods[1] (atention)"),
    ({"methods": [{"name": "kd", "TT": 2}]}, "Did you mean 'T'"),
    ({"methods": [{"name": "fitnets", "hint_stage": 7}]}, "hint_stage"),
])
def test_validation_before_training_names_the_path(registry, change, fragment):
    with pytest.raises(KDZooError) as e:
        B.validate(plan_of({**TINY, **change}), registry)
    assert fragment in str(e.value)


# -- running in-process --------------------------------------------------------------------------
class FailsAtEpoch2(Method):
    name = "flaky"
    needs_teacher = False
    defaults = {"w_ce": 1.0}

    def forward(self, student, teacher, labels):
        if self.epoch >= 1:
            raise RuntimeError("flaky plugin gave up")
        return {"ce": self.ce(student.logits, labels)}


def test_failed_run_is_recorded_and_the_rest_continue(cifar_path, cache, tmp_path):
    plugin = types.SimpleNamespace(register_methods=hookimpl(lambda register: register(FailsAtEpoch2)))
    registry = load_plugins(extra=[("flaky-plugin", plugin)])
    cfg = tmp_path / "b.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "methods": ["kd", "flaky"], "recipe": {**TINY["recipe"], "epochs": 2}}))
    plan, data, device = B.prepare(cfg, registry)
    store = Store(tmp_path / "out")
    outcome = B.run_plan(plan, data, registry, store, device)
    runs = {r.variant: r for r in store.runs() if r.kind == "student"}
    assert runs["flaky"].status == "failed" and "flaky plugin gave up" in runs["flaky"].error
    assert "plugin 'flaky-plugin'" in runs["flaky"].error and runs["flaky"].epochs_done == 1
    assert runs["kd"].status == runs["ce"].status == "ok" and runs["kd"].epochs_done == 2
    assert [f.variant for f in outcome.failed] == ["flaky"]
    # the teacher is cached: a second benchmark reuses it without training
    teacher_ckpt = B.TeacherJob.checkpoint_path.fget(plan.teachers[0])
    mtime = teacher_ckpt.stat().st_mtime_ns
    events = []
    other = Store(tmp_path / "out2")
    ctx = B.Context(plan, data, registry, other, device, B.Progress(), lambda e, d: events.append((e, d)))
    record = B.ensure_teacher(plan.teachers[0], ctx)
    assert events == [("teacher", f"resnet20: cached ({plan.teachers[0].dir})")]
    assert other.has_run(record.run_id) and record.last.top1 > 0
    assert teacher_ckpt.stat().st_mtime_ns == mtime
    # and rerunning in the same folder trains nothing
    events.clear()
    again = B.run_plan(plan, data, registry, store, device, say=lambda e, d: events.append((e, d)))
    assert again.trained == 0 and again.skipped == 3 and not [e for e in events if e[0] == "cohort"]


def test_a_teacher_in_training_is_awaited_and_reused_not_trained_twice(cifar_path, cache, tmp_path, registry):
    """Two processes (here threads, each with its own store) need the same untrained teacher: the second waits
    on the cache folder's lock while the first trains, then reuses its checkpoint."""
    import threading

    cfg = tmp_path / "b.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "teacher_recipe": {"epochs": 1}}))
    plan, data, device = B.prepare(cfg, registry)
    job = plan.teachers[0]
    training, said, records = threading.Event(), {"a": [], "b": []}, {}

    def run(name: str) -> None:
        def say(event, detail):
            said[name].append(detail)
            if detail.endswith("training (1 epochs)"):
                training.set()
                time.sleep(1.0)  # the other process arrives while this one trains

        ctx = B.Context(plan, data, registry, Store(tmp_path / name), device, B.Progress(), say)
        records[name] = B.ensure_teacher(job, ctx)

    first = threading.Thread(target=run, args=("a",))
    first.start()
    assert training.wait(120)
    second = threading.Thread(target=run, args=("b",))
    second.start()
    first.join(300)
    second.join(300)
    assert said["a"] == ["resnet20: training (1 epochs)"]
    assert said["b"] == ["resnet20: another process is training it; waiting to reuse it",
                         f"resnet20: cached ({job.dir})"]
    assert records["b"] == records["a"] and records["a"].status == "ok" and records["a"].source == "trained"
    assert Store(tmp_path / "b").has_run(records["a"].run_id)


# -- kill -9 and resume ---------------------------------------------------------------------------
def _bench_cmd(cfg: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "kdzoo.cli", "bench", str(cfg), "--out", str(out)]


def _store_snapshot(out: Path) -> dict[str, dict]:
    return {p.name: strip_timing(json.loads(p.read_text())) for p in sorted((out / "runs").glob("*.json"))}


def _kill_when(cmd, env, condition, timeout=300):
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if condition():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.02)
    proc.wait()
    return False


@pytest.fixture(scope="module")
def uninterrupted(cifar_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    cfg = root / "b.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "cohorts": False}))
    env = {**os.environ, "KDZOO_CACHE": str(root / "cache"), "KDZOO_DATA": cifar_path}
    subprocess.run(_bench_cmd(cfg, root / "ref"), env=env, check=True, capture_output=True)
    # cohorts: false keeps the teacher's training logits (one file per epoch): the resumed runs below read them
    assert len(list((root / "cache" / "teacher-logits").glob("*/epoch-*.pt"))) == TINY["recipe"]["epochs"]
    for p in _students(root / "ref"):  # the command set OpenMP's passive wait before torch loaded
        policy = json.loads(p.read_text())["environment"]["omp_wait_policy"]
        assert policy == os.environ.get("OMP_WAIT_POLICY", "passive").upper()
    return cfg, env, _store_snapshot(root / "ref")


def _students(out: Path) -> list[Path]:
    return [p for p in (out / "runs").glob("*.json") if not p.name.startswith("teacher-")] if (out / "runs").is_dir() else []


@pytest.mark.parametrize("point", ["teacher", "mid-run", "after-result"])
def test_kill_9_and_resume_equals_uninterrupted(uninterrupted, tmp_path, point):
    cfg, env, reference = uninterrupted
    assert len(reference) == 4 and all(r["status"] == "ok" for r in reference.values())
    out = tmp_path / "out"
    env = dict(env)
    if point == "teacher":  # a fresh cache, killed once the teacher has saved an epoch
        env["KDZOO_CACHE"] = str(tmp_path / "cache")
        condition = lambda: any((tmp_path / "cache").glob("teachers/*/state.pt"))  # noqa: E731
    elif point == "mid-run":
        condition = lambda: any((out / "cohorts").glob("*.pt")) if (out / "cohorts").is_dir() else False  # noqa: E731
    else:
        condition = lambda: len(_students(out)) >= 1  # noqa: E731
    assert _kill_when(_bench_cmd(cfg, out), env, condition), "the run finished before the kill point"
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in _students(out)}
    for p in out.rglob("*.json"):
        json.loads(p.read_text())  # nothing written is corrupt
    resumed = subprocess.run(_bench_cmd(cfg, out), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = _store_snapshot(out)
    assert after == reference
    for name, (mtime, content) in before.items():  # finished results were not redone or rewritten
        assert (out / "runs" / name).stat().st_mtime_ns == mtime and (out / "runs" / name).read_bytes() == content
    if point != "after-result":
        assert "resuming at epoch" in resumed.stderr
    assert not list(out.rglob("*.tmp")) and not list((out / "cohorts").glob("*.pt"))


def _shipped(kind: str) -> list[Path]:
    """The shipped YAML files of one kind: tuning files (`kdzoo tune`) have `budget:`; the rest are benchmarks."""
    from kdzoo.config import read_yaml

    paths = sorted(Path(__file__).parent.parent.glob("benchmarks/*.yaml"))
    return [p for p in paths if ("budget" in read_yaml(p)) == (kind == "tune")]


@pytest.mark.slow  # a dry training step of every model and method of every pair: minutes for the big tables
@pytest.mark.parametrize("path", _shipped("bench"), ids=lambda p: p.name)
def test_shipped_benchmarks_are_valid(registry, path):
    from kdzoo.config import read_yaml

    plan = B.expand(parse(BenchConfig, read_yaml(path)), shape("fp", 50000), registry)
    one_seed = {"all-methods.yaml"}  # every method at a glance within 15 minutes on 2 cores, not a comparison
    assert plan.variants[0].label == "ce" and (len(plan.bench.seeds) >= 2 or path.name in one_seed)
    B.validate(plan, registry)
    if plan.bench.reference:
        columns = {v.label for v in plan.variants} | {"teacher"}
        for row in plan.bench.reference.rows:
            assert (row.teacher, row.student) in plan.pairs and set(row.values) <= columns


@pytest.mark.parametrize("path", _shipped("tune"), ids=lambda p: p.name)
def test_shipped_tuning_files_are_valid(registry, path, cifar_path):
    from kdzoo import tune

    setup = tune.prepare(path, registry, data_source=cifar_path)  # spaces, range ends, plan and budget
    assert setup.spaces and setup.config.data.val_size > 0
    # `kdzoo bench` on a tuning file points to `kdzoo tune` instead of listing unknown keys
    proc = subprocess.run([sys.executable, "-m", "kdzoo", "bench", str(path), "--dry-run"],
                          capture_output=True, text=True, env={**os.environ, "KDZOO_DATA": cifar_path})
    assert proc.returncode != 0 and "is a tuning file" in proc.stderr and "Traceback" not in proc.stderr


def test_one_runner_per_folder(tmp_path):
    store = Store(tmp_path / "out")
    with store.lock():
        with pytest.raises(KDZooError, match="Another kdzoo process is writing"):
            with Store(tmp_path / "out").lock():
                pass
    with store.lock():  # released on exit
        pass


def test_capped_cohorts_give_the_same_runs_reading_the_teachers_logits(uninterrupted, tmp_path):
    """cohort_size: 2 splits (ce, kd, attention) into [ce, kd] and [attention]; [ce, kd] reads the teacher's
    logits that the reference run cached; every record equals the reference but for its cohort id."""
    cfg, env, reference = uninterrupted
    capped = tmp_path / "capped.yaml"
    capped.write_text(yaml.safe_dump({**yaml.safe_load(cfg.read_text()), "cohorts": True, "cohort_size": 2}))
    cached = sorted(Path(env["KDZOO_CACHE"]).glob("teacher-logits/*/epoch-*.pt"))
    proc = subprocess.run(_bench_cmd(capped, tmp_path / "out"), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 runs in 2 cohorts" in " ".join(proc.stdout.split())

    def without_cohort(snapshot):
        return {k: {f: v for f, v in r.items() if f != "cohort_id"} for k, r in snapshot.items()}

    assert without_cohort(_store_snapshot(tmp_path / "out")) == without_cohort(reference)
    # [ce, kd] read all three epochs' logits; [attention] ran the teacher (it needs features)
    read = {json.loads(p.read_text())["variant"]: json.loads(p.read_text())["environment"]["teacher_logits_from_cache"]
            for p in _students(tmp_path / "out")}
    assert read == {"ce": 3, "kd": 3, "attention": 0}
    assert sorted(Path(env["KDZOO_CACHE"]).glob("teacher-logits/*/epoch-*.pt")) == cached
    assert [torch.load(p, weights_only=True).shape[0] for p in cached] == [384] * 3


def test_ray_executor_gives_the_same_store(uninterrupted, tmp_path):
    pytest.importorskip("ray", reason="the optional Ray executor (pip install 'kdzoo[ray]'); CI installs it")
    cfg, env, reference = uninterrupted
    env = {**env, "KDZOO_CACHE": str(tmp_path / "cache"), "RAY_AUTH_MODE": "disabled"}  # the teacher trains on Ray too
    proc = subprocess.run(_bench_cmd(cfg, tmp_path / "out") + ["--executor", "ray"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Ray:" in proc.stderr and "done (Ray)" in proc.stderr
    assert _store_snapshot(tmp_path / "out") == reference


def test_checkpoint_teacher_must_match_its_model(registry, tmp_path):
    from kdzoo.checkpoint import save_checkpoint

    ckpt = tmp_path / "t.pt"
    save_checkpoint(ckpt, {"model": "resnet20", "model_options": {}, "num_classes": 10, "state_dict": {}})
    plan = plan_of({**TINY, "teachers": [{"model": "resnet56", "checkpoint": str(ckpt)}]})
    assert plan.teachers[0].checkpoint_path == ckpt
    with pytest.raises(KDZooError, match="holds a 'resnet20', not a 'resnet56'"):
        B.validate(plan, registry)


def test_bench_with_a_checkpoint_teacher(uninterrupted, registry, tmp_path):
    cfg, env, reference = uninterrupted
    (ckpt,) = Path(env["KDZOO_CACHE"]).glob("teachers/*/checkpoint.pt")
    teacher_top1 = next(r for r in reference.values() if r["schema"] == "kdzoo.teacher/1")["last"]["top1"]
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump({**TINY, "teachers": [{"model": "resnet20", "checkpoint": str(ckpt)}],
                                    "methods": ["kd"], "recipe": {**TINY["recipe"], "epochs": 1}}))
    plan, data, device = B.prepare(path, registry)
    store = Store(tmp_path / "out")
    outcome = B.run_plan(plan, data, registry, store, device)
    assert outcome.failed == [] and outcome.trained == 2
    records = {r.kind if r.kind == "teacher" else r.variant: r for r in store.runs()}
    assert records["teacher"].source == "checkpoint" and records["teacher"].last.top1 == teacher_top1
    assert records["kd"].teacher.top1 == teacher_top1 and records["kd"].status == "ok"


# -- trust: stale keys and damaged records ------------------------------------------------------
def test_run_ids_change_with_plugin_versions_and_checkpoint_bytes(tmp_path):
    from kdzoo.checkpoint import save_checkpoint

    def ids(registry):
        plan = plan_of(TINY, registry=registry)
        return plan.teachers[0].key, {r.variant.label: r.run_id for r in plan.runs}

    key, base = ids(load_plugins(strict=True))
    upgraded = load_plugins(strict=True)
    upgraded.plugin(upgraded.owner[("method", "kd")]).version = "99.0"
    key2, after = ids(upgraded)
    assert key2 == key and after["kd"] != base["kd"] and after["ce"] == base["ce"]
    assert after["attention"] == base["attention"]  # another plugin: unchanged
    new_nets = load_plugins(strict=True)
    new_nets.plugin(new_nets.owner[("model", "resnet20")]).version = "99.0"
    key3, after = ids(new_nets)
    assert key3 != key and not set(after.values()) & set(base.values())

    ckpt = tmp_path / "t.pt"
    save_checkpoint(ckpt, {"model": "resnet20", "model_options": {}, "num_classes": 10, "state_dict": {}})
    with_ckpt = {**TINY, "teachers": [{"model": "resnet20", "checkpoint": str(ckpt)}]}
    first = plan_of(with_ckpt)
    save_checkpoint(ckpt, {"model": "resnet20", "model_options": {}, "num_classes": 10, "state_dict": {},
                           "meta": {"top1": 1.0}})  # the same path, overwritten
    second = plan_of(with_ckpt)
    assert first.teachers[0].key != second.teachers[0].key
    assert {r.run_id for r in first.runs}.isdisjoint(r.run_id for r in second.runs)
    assert len(second.teachers[0].provenance["checkpoint_sha256"]) == 64
    with pytest.raises(KDZooError, match=r"teachers\[0\].checkpoint: .* does not exist"):
        plan_of({**TINY, "teachers": [{"model": "resnet20", "checkpoint": str(tmp_path / "nope.pt")}]})


DAMAGES = {"random bytes": bytes(range(256)), "a JSON list": b"[1, 2, 3]", "a partial record": b'{"status": "ok"}'}


@pytest.mark.parametrize("kind", list(DAMAGES))
def test_a_damaged_record_is_set_aside_and_redone(uninterrupted, tmp_path, kind):
    import shutil

    cfg, env, reference = uninterrupted
    out = tmp_path / "out"
    shutil.copytree(cfg.parent / "ref", out)
    victim = sorted(_students(out))[0]
    victim.write_bytes(DAMAGES[kind])
    proc = subprocess.run(_bench_cmd(cfg, out), env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    squash = lambda text: "".join(text.split())  # noqa: E731  (rich wraps long lines)
    assert squash(f"{victim.name} is not a valid kdzoo record") in squash(proc.stderr)
    assert squash("1 to train") in squash(proc.stdout)
    assert _store_snapshot(out) == reference  # redone, bit-identical
    (kept,) = (out / "damaged").iterdir()
    assert kept.name.startswith(victim.name) and kept.read_bytes() == DAMAGES[kind]


def test_unwritable_bench_output_is_refused_before_training(cifar_path, tmp_path):
    cfg = tmp_path / "b.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    (tmp_path / "file").write_text("x")
    env = {**os.environ, "KDZOO_CACHE": str(tmp_path / "cache"), "KDZOO_DATA": cifar_path}
    for out in (tmp_path / "file", tmp_path / "file" / "below"):
        proc = subprocess.run(_bench_cmd(cfg, out), env=env, capture_output=True, text=True)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        text = " ".join(proc.stderr.split())
        assert "cannot be used" in text and "nothing has been trained yet" in text
    assert not (tmp_path / "cache").exists()


# -- up-front validation of inputs that used to train silently or fail mid-run ---------------------
def test_duplicate_seeds_are_refused_naming_both():
    with pytest.raises(KDZooError, match=r"seeds\[0\] and seeds\[2\] are both 0.*Remove the duplicate"):
        plan_of({**TINY, "seeds": [0, 1, 0]})


@pytest.mark.parametrize("methods, first, second", [
    (["kd", {"name": "kd", "T": 4.0}], "methods[0] (kd)", "methods[1] (kd(T=4.0))"),  # T=4 is kd's default
    (["kd", {"name": "kd", "T": [2, 4], "label": "hot"}], "methods[0] (kd)", "methods[1] (hot(T=4))"),
    ([{"name": "ce", "w_ce": 1}], "the CE baseline (always in the plan)", "methods[0] (ce(w_ce=1))"),
])
def test_variants_identical_after_defaults_are_refused(registry, methods, first, second):
    with pytest.raises(KDZooError) as e:
        B.validate(plan_of({**TINY, "methods": methods}), registry)
    assert f"{first} and {second} are the same run" in str(e.value)


@pytest.mark.parametrize("change, fragment", [
    # BatchNorm at a 1x1 feature map cannot train on one image: the model is named, not method 'ce'
    ({"students": ["resnet18"], "recipe": {**TINY["recipe"], "batch_size": 1}},
     r"^students \(resnet18, batch_size 1\): Batch size too small for model 'resnet18'.*at least 2"),
    ({"teachers": ["resnet18"], "teacher_recipe": {"epochs": 2, "batch_size": 1}},
     r"^teachers\[0\] \(resnet18, batch_size 1\): Batch size too small for model 'resnet18'"),
    ({"methods": ["rkd"], "recipe": {**TINY["recipe"], "batch_size": 2}},
     r"^methods\[0\] \(rkd\) with teacher resnet20 → student wrn_16_1: Method 'rkd' cannot learn from batches of 2"),
    ({"methods": [{"name": "rkd", "angle_max_batch": 32}]},  # the memory guard, before training
     r"methods\[0\] \(rkd\(angle_max_batch=32\)\).*a batch of 64 exceeds angle_max_batch=32"),
    ({"methods": [{"name": "kd", "w_kd": -0.5}]}, r"methods\[0\] \(kd\(w_kd=-0.5\)\).*loss weights must be >= 0"),
    ({"methods": [{"name": "kd", "T": float("nan")}]}, r"Hyperparameter 'T' of method 'kd' must be a finite number"),
])
def test_validation_refuses_runs_that_cannot_train(registry, change, fragment):
    with pytest.raises(KDZooError, match=fragment):
        B.validate(plan_of({**TINY, **change}), registry)


def test_validation_uses_the_smallest_batch_the_data_gives(registry):
    # 384 images in batches of 64: every batch is full (the engine drops a partial last batch) ...
    B.validate(plan_of({**TINY, "methods": ["rkd"]}), registry)
    # ... but a training set no larger than one batch is a single batch of that size
    big = {**TINY, "methods": ["rkd"], "recipe": {**TINY["recipe"], "batch_size": 1000},
           "data": {"train_size": 600, "test_size": 200}}
    with pytest.raises(KDZooError, match="a batch of 600 exceeds angle_max_batch=512"):
        B.validate(plan_of(big), registry)


def test_method_of_a_disabled_plugin_is_named_in_validation():
    registry = load_plugins(disable=["kd"])
    with pytest.raises(KDZooError) as e:
        B.validate(plan_of(TINY, registry=registry), registry)
    assert "methods[0] (kd)" in str(e.value)
    assert "Method 'kd' is provided by plugin 'kd' (kdzoo" in str(e.value) and "drop -p no:kd" in str(e.value)
