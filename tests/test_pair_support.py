"""A method that cannot serve a pair: n/a at plan validation, the rest of the benchmark planned and reported."""
from __future__ import annotations

import types

from rich.console import Console

from kdzoo import bench as B
from kdzoo import hookimpl
from kdzoo.config import BenchConfig, parse
from kdzoo.data import DataShape
from kdzoo.methods import Method, PairNotSupported
from kdzoo.plugins import load_plugins
from kdzoo.records import BestEpoch, RunRecord, Scores, TeacherRecord, TeacherRef
from kdzoo.report import render_table, summarize, to_json, to_markdown


class SameWidths(Method):
    """Serves only pairs whose stages have the same channel counts (like FSP)."""

    name = "samewidths"
    family = "features"
    needs_features = True
    defaults = {"w_ce": 1.0}

    def __init__(self, student, teacher=None, **hparams):
        super().__init__(student, teacher, **hparams)
        if student.stage_channels != teacher.stage_channels:
            raise PairNotSupported(f"samewidths needs equal channels per stage: teacher {teacher.stage_channels}, "
                                   f"student {student.stage_channels}.")

    def forward(self, student, teacher, labels):
        return {"ce": self.w_ce * self.ce(student.logits, labels)}


BENCH = {
    "name": "na", "data": {"train_size": 256, "test_size": 100}, "seeds": [0],
    "recipe": {"epochs": 1, "batch_size": 64}, "teacher_recipe": {"epochs": 1},
    "teachers": ["resnet20"], "students": ["resnet14", "resnet8x4"], "methods": ["kd", "samewidths"],
}


def plan_and_registry():
    plugin = types.SimpleNamespace(register_methods=hookimpl(lambda register: register(SameWidths)))
    registry = load_plugins(extra=[("samewidths-plugin", plugin)])
    plan = B.expand(parse(BenchConfig, BENCH), DataShape("cifar10", "fp", 10, (32, 32), 256), registry)
    plan.flops = B.validate(plan, registry)
    return plan, registry


def test_an_unsupported_pair_leaves_the_plan_and_the_rest_stays():
    plan, _ = plan_and_registry()
    assert [(u["teacher"], u["student"], u["column"]) for u in plan.unsupported] == [
        ("resnet20", "resnet8x4", "samewidths")]
    assert "teacher (16, 32, 64), student (64, 128, 256)" in plan.unsupported[0]["reason"]
    cells = {(r.student.model, r.variant.label) for c in plan.cohorts for r in c.runs}
    assert cells == {("resnet14", "ce"), ("resnet14", "kd"), ("resnet14", "samewidths"),
                     ("resnet8x4", "ce"), ("resnet8x4", "kd")}


def test_the_report_shows_n_a_with_the_reason(tmp_path):
    plan, _ = plan_and_registry()
    data = types.SimpleNamespace(dataset="cifar10", train_y=[0] * 256, test_y=[0] * 100)
    bench = B.bench_summary(plan, data)
    assert bench.unsupported == plan.unsupported
    teacher = plan.teachers[0]
    records = [TeacherRecord(run_id=f"teacher-{teacher.key}", key=teacher.key, model="resnet20", seed=0, status="ok",
                             source="trained", last=Scores(top1=80.0), best=BestEpoch(top1=80.0, epoch=1))]
    for c in plan.cohorts:
        for r in c.runs:
            records.append(RunRecord(run_id=r.run_id, cohort_id=c.cohort_id, teacher=TeacherRef(model="resnet20", key=teacher.key),
                                     model=r.student.model, method=r.variant.method, variant=r.variant.label,
                                     seed=0, status="ok", last=Scores(top1=50.0), best=BestEpoch(top1=50.0, epoch=1)))
    summary = summarize(records, bench)
    statuses = {(row.student, c.variant): c.status for row in summary.rows for c in row.cells}
    assert statuses[("resnet8x4", "samewidths")] == "n/a"
    assert statuses[("resnet14", "samewidths")] == "ok" and statuses[("resnet8x4", "kd")] == "ok"
    assert "n/a" in to_markdown(summary) and "needs equal channels" in to_markdown(summary)
    assert to_json(summary)["not_applicable"] == [f"resnet20 → resnet8x4 samewidths: {plan.unsupported[0]['reason']}"]
    console = Console(record=True, width=200)
    render_table(summary, console)
    assert "n/a: resnet20 → resnet8x4 samewidths" in console.export_text()
