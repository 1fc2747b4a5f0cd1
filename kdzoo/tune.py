"""`kdzoo tune`: a tuning file → a validated search (:class:`TuneSetup`), checked before the first trial.

Contract: :func:`prepare` reads a tuning YAML (a teacher, a student, the data and recipe as a benchmark
names them, one or more methods with a search space over their declared hyperparameters, and a budget),
loads the data, expands it into a one-teacher benchmark plan (``kdzoo.plan.expand``, so the teacher key and
cache are the benchmark's) and validates that plan (``kdzoo.validation.validate``: every method builds and
takes a dry step). Every bad input is one ``KDZooError`` naming its YAML path, before any training.
The search itself (Optuna, trials, pruning, the report) is :mod:`kdzoo.tune_run`.

A space entry is ``{low, high}`` (``log: true``, ``step:`` optional; integers for an integer
hyperparameter), ``{choices: [...]}`` (or a plain list), or a fixed value. With several methods the
method itself is a choice. Trials are scored on ``data.val_size`` images held out of the training set.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdzoo import KDZooError
from kdzoo.config import BenchConfig, DataConfig, Recipe, parse, read_yaml
from kdzoo.errors import suggest

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "halving", "none")


@dataclass
class Budget:
    """How much the search may spend: ``trials`` (finished, pruned or failed) and optionally ``epochs``
    (student epochs over all trials; pruned trials spend fewer, so more trials fit)."""

    trials: int
    epochs: int | None = None


@dataclass
class Search:
    """The Optuna sampler and pruner (``*_options`` are passed to their constructors), how many trials
    train together as one cohort (one teacher pass per batch), and the points tried first."""

    sampler: str = "tpe"
    sampler_options: dict[str, Any] = field(default_factory=dict)
    pruner: str = "median"
    pruner_options: dict[str, Any] = field(default_factory=dict)
    cohort: int = 4
    seed: int = 0
    defaults_first: bool = True  # the published defaults of each method are the first trials
    enqueue: list[dict[str, Any]] = field(default_factory=list)  # more points to try first: {method: kd, T: 2}


@dataclass
class TuneConfig:
    """A tuning file. ``teacher``/``student`` are written as one entry of a benchmark's ``teachers``/``students``."""

    budget: Budget
    name: str = "tune"
    description: str = ""
    teacher: Any = None
    student: Any = None
    methods: dict[str, Any] = field(default_factory=dict)  # method -> {hyperparameter: space}
    seed: int = 0  # every trial's (paired: the same student initialisation and batches)
    data: DataConfig = field(default_factory=DataConfig)
    recipe: Recipe = field(default_factory=Recipe)
    teacher_recipe: dict[str, Any] = field(default_factory=dict)
    student_recipe: dict[str, Any] = field(default_factory=dict)
    search: Search = field(default_factory=Search)
    bench_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # seeds of the benchmark it writes
    device: str = "auto"


@dataclass
class Param:
    """One searched hyperparameter: a float/int range or categorical choices (Optuna name ``method.key``)."""

    method: str
    key: str
    kind: str  # "float", "int" or "choice"
    low: Any = None
    high: Any = None
    log: bool = False
    step: Any = None
    choices: list[Any] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.method}.{self.key}"

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in self.choices
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high

    def describe(self) -> str:
        if self.kind == "choice":
            return "{" + ", ".join(map(str, self.choices)) + "}"
        return f"[{self.low}, {self.high}]" + (" log" if self.log else "") + (f" step {self.step}" if self.step else "")


@dataclass
class MethodSpace:
    method: str
    params: list[Param]
    fixed: dict[str, Any]  # hyperparameters set to one value for every trial
    defaults: dict[str, Any]  # the published defaults for this pair (pair_defaults applied)


@dataclass
class TuneSetup:
    """A validated search: its config, the expanded one-pair plan (teacher job, student recipe), the data,
    the device, the spaces, and ``key`` (hash of everything that determines a trial's result)."""

    path: Path
    config: TuneConfig
    raw: dict[str, Any]  # the file as written (the benchmark it ends with copies its sections)
    plan: Any  # kdzoo.plan.Plan
    data: Any  # kdzoo.data.Data
    device: Any  # torch.device
    spaces: dict[str, MethodSpace]
    key: str

    @property
    def recipe(self) -> Recipe:
        """The students' recipe (the file's ``recipe`` with ``student_recipe`` applied)."""
        return self.plan.cohorts[0].recipe

    @property
    def student(self) -> Any:
        """The student's ``kdzoo.config.StudentSpec``."""
        return self.plan.cohorts[0].runs[0].student

    @property
    def dims(self) -> int:
        """Searched dimensions of the largest method space, plus one for the method when it is a choice."""
        return max(len(s.params) for s in self.spaces.values()) + (len(self.spaces) > 1)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_param(method_cls: type, method: str, key: str, spec: Any, defaults: dict[str, Any],
                path: str) -> Param | tuple[str, Any]:
    """A space entry → :class:`Param`, or ``(key, value)`` for a fixed value; ``KDZooError`` naming ``path``."""
    from kdzoo.methods import coerce_hparams

    if not defaults:
        raise KDZooError(
            f"{path}: method '{method}' declares no hyperparameters, so there is nothing of it to search. List it "
            f"as `{method}: {{}}` to let the search choose between it and the other methods, or remove it.")

    def check(value: Any, where: str) -> Any:  # name, type, finiteness and sign, as for `--set`
        try:
            return coerce_hparams(method, defaults, {key: value}, method_cls.signed_weights)[key]
        except KDZooError as e:
            raise KDZooError(f"{where}: {e}") from e

    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        return key, check(spec, path)
    check(defaults.get(key), path)  # the name first: "Did you mean"
    allowed = ("choices",) if "choices" in spec else ("low", "high", "log", "step")
    for k in spec:
        if k not in allowed:
            raise KDZooError(f"{path}.{k} is not a space key here.{suggest(k, allowed)} A space is {{low, high}} "
                             "(with optional log and step) or {choices: [...]}, not both.")
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise KDZooError(f"{path}.choices must be a non-empty list of values, got {choices!r}.")
        values = [check(c, f"{path}.choices[{i}]") for i, c in enumerate(choices)]
        if any(not isinstance(v, (bool, int, float, str, type(None))) for v in values):
            raise KDZooError(f"{path}.choices: choices must be numbers, strings, true/false or null.")
        if len(set(map(repr, values))) != len(values):
            raise KDZooError(f"{path}.choices lists a value twice: {choices}. List each once.")
        return Param(method, key, "choice", choices=values)
    default = defaults[key]
    if isinstance(default, bool) or not _is_number(default):
        raise KDZooError(f"{path}: '{key}' of '{method}' is {type(default).__name__} (default {default!r}), not a "
                         f"number, so it has no range: write {path.rsplit('.', 1)[-1]}: {{choices: [...]}}.")
    kind = "int" if isinstance(default, int) else "float"
    for bound in ("low", "high"):
        if bound not in spec:
            raise KDZooError(f"{path} needs `{bound}:` (a range is {{low: A, high: B}}; or give {{choices: [...]}}).")
        if not _is_number(spec[bound]) or (kind == "int" and not isinstance(spec[bound], int)):
            what = "an integer" if kind == "int" else "a number"
            raise KDZooError(f"{path}.{bound} must be {what} ('{key}' of '{method}' is {kind}, default {default!r}), "
                             f"got {spec[bound]!r}.")
        check(spec[bound], f"{path}.{bound}")
    low, high = spec["low"], spec["high"]
    if not low < high:
        raise KDZooError(f"{path}: low ({low}) must be below high ({high}). Swap them, or give a fixed value "
                         f"({key}: {low}) to not search it.")
    log, step = spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        raise KDZooError(f"{path}.log must be true or false, got {log!r}.")
    if log and low <= 0:
        raise KDZooError(f"{path}: a log range needs low > 0, got low={low}. Raise low or drop `log: true`.")
    if step is not None:
        if not _is_number(step) or step <= 0 or (kind == "int" and not isinstance(step, int)):
            what = "integer" if kind == "int" else "number"
            raise KDZooError(f"{path}.step must be a positive {what}, got {step!r}.")
        if log:
            raise KDZooError(f"{path}: `step` and `log: true` do not mix (Optuna samples one or the other). Drop one.")
    return Param(method, key, kind, low=low, high=high, log=log, step=step)


def parse_spaces(cfg: TuneConfig, registry: Any, teacher: str, student: str) -> dict[str, MethodSpace]:
    """``cfg.methods`` → one :class:`MethodSpace` per method; ``KDZooError`` naming the YAML path."""
    if not isinstance(cfg.methods, dict) or not cfg.methods:
        raise KDZooError("`methods:` must map each method to search to its space, e.g. methods: {kd: {T: {low: 1, "
                         "high: 8}, w_kd: {low: 0.1, high: 10, log: true}}}.")
    spaces = {}
    for method, space in cfg.methods.items():
        path = f"methods.{method}"
        try:
            cls = registry.method(method)
        except KDZooError as e:
            raise KDZooError(f"{path}: {e}") from e
        if space is None:
            space = {}
        if not isinstance(space, dict):
            raise KDZooError(f"{path} must map hyperparameters to spaces, got {space!r}.")
        defaults = cls.resolve_defaults(teacher, student)
        params, fixed = [], {}
        for key, spec in space.items():
            out = parse_param(cls, method, str(key), spec, defaults, f"{path}.{key}")
            if isinstance(out, Param):
                params.append(out)
            else:
                fixed[out[0]] = out[1]
        spaces[method] = MethodSpace(method, params, fixed, defaults)
    if len(spaces) == 1 and not next(iter(spaces.values())).params:
        (method,) = spaces
        raise KDZooError(f"methods.{method} searches nothing: give at least one hyperparameter a range or choices "
                         f"(e.g. T: {{low: 1, high: 8}}), or list more methods to choose between.")
    return spaces


def enqueued_points(cfg: TuneConfig, spaces: dict[str, MethodSpace]) -> list[tuple[dict[str, Any], str]]:
    """The points tried first, as Optuna params with a note: each method's published defaults (when inside
    its space; ``search.defaults_first``), then ``search.enqueue``. ``KDZooError`` for a point outside the space."""
    points = []
    if cfg.search.defaults_first:
        for s in spaces.values():
            if all(p.contains(s.defaults[p.key]) for p in s.params):
                points.append(({"method": s.method, **{p.name: s.defaults[p.key] for p in s.params}},
                               f"{s.method} defaults"))
    for i, point in enumerate(cfg.search.enqueue):
        path = f"search.enqueue[{i}]"
        if not isinstance(point, dict):
            raise KDZooError(f"{path} must be a mapping like {{method: kd, T: 2.0}}, got {point!r}.")
        method = point.get("method", next(iter(spaces)) if len(spaces) == 1 else None)
        if method not in spaces:
            raise KDZooError(f"{path}.method must be one of the searched methods ({', '.join(spaces)}), got "
                             f"{method!r}.{suggest(method, spaces)}")
        params = {p.key: p for p in spaces[method].params}
        out: dict[str, Any] = {"method": method}
        for key, value in point.items():
            if key == "method":
                continue
            if key not in params:
                raise KDZooError(f"{path}.{key}: '{key}' is not searched for '{method}' (searched: "
                                 f"{', '.join(params) or 'nothing'}).{suggest(key, params)}")
            if not params[key].contains(value):
                raise KDZooError(f"{path}.{key} = {value!r} lies outside its space {params[key].describe()} "
                                 f"(methods.{method}.{key}). Widen the space or change the point.")
            out[params[key].name] = value
        points.append((out, "given first"))
    return points


def _check_search(cfg: TuneConfig, epochs_per_trial: int) -> None:
    s, b = cfg.search, cfg.budget
    for name, value, allowed in (("sampler", s.sampler, SAMPLERS), ("pruner", s.pruner, PRUNERS)):
        if value not in allowed:
            raise KDZooError(f"search.{name} is '{value}', not one of {', '.join(allowed)}.{suggest(value, allowed)}")
    if s.cohort < 1:
        raise KDZooError(f"search.cohort must be at least 1 (trials trained together), got {s.cohort}.")
    if b.trials < 1:
        raise KDZooError(f"budget.trials is {b.trials}: the search needs at least one trial. Give budget.trials >= 1.")
    if b.epochs is not None and b.epochs < epochs_per_trial:
        raise KDZooError(
            f"budget.epochs is {b.epochs}, but one trial trains {epochs_per_trial} student epochs (recipe.epochs"
            f"{', plus the longest init stage' if epochs_per_trial != cfg.recipe.epochs else ''}), so not even one "
            f"trial fits. Give budget.epochs >= {epochs_per_trial}, or lower recipe.epochs.")
    if not cfg.bench_seeds:
        raise KDZooError("bench_seeds is empty: the benchmark written at the end needs seeds, e.g. [0, 1, 2].")


def bench_config(cfg: TuneConfig, methods: list[Any], seeds: list[int], name: str) -> dict[str, Any]:
    """The benchmark mapping of this tuning file (teacher, student, data and recipes) with ``methods``."""
    return {"name": name, "description": cfg.description, "teachers": [cfg.teacher], "students": [cfg.student],
            "methods": methods, "seeds": seeds, "data": dataclasses.asdict(cfg.data),
            "recipe": dataclasses.asdict(cfg.recipe), "teacher_recipe": dict(cfg.teacher_recipe),
            "student_recipe": dict(cfg.student_recipe)}


def _yaml_paths(e: KDZooError, methods: list[str]) -> KDZooError:
    """A benchmark error about this file's one-pair plan, with the tuning file's paths."""
    text = str(e).replace("teachers[0]", "teacher").replace("students[0]", "student")
    for i, m in enumerate(methods):
        text = text.replace(f"methods[{i}]", f"methods.{m}")
    return KDZooError(text)


def prepare(path: str | Path, registry: Any, device: str | None = None, data_source: str | None = None) -> TuneSetup:
    """Read and validate a tuning file; load its data; build and validate its plan. Nothing is trained."""
    from kdzoo.engine import resolve_device
    from kdzoo.plan import expand
    from kdzoo.runner import load_data
    from kdzoo.validation import validate

    raw = read_yaml(path)
    cfg = parse(TuneConfig, raw)
    if data_source is not None:
        cfg.data.source = data_source
    for key in ("teacher", "student"):
        if not getattr(cfg, key):
            raise KDZooError(f"`{key}:` is missing: name the {key} model (e.g. {key}: resnet20), or a mapping as "
                             f"in a benchmark's `{key}s:` list.")
    if not cfg.data.val_size:
        raise KDZooError(
            "data.val_size is 0: trials are scored on a validation split held out of the training set, never on the "
            "test set. Add one, e.g. `data: {val_size: 5000}` (10% of CIFAR-10's training set).")
    cfg.recipe.validate()
    methods = list(cfg.methods) if isinstance(cfg.methods, dict) else []
    mapping = bench_config(cfg, methods, [cfg.seed], cfg.name)
    try:
        bench = parse(BenchConfig, mapping)
    except KDZooError as e:
        raise _yaml_paths(e, methods) from e

    def model(entry: Any) -> str | None:
        return entry if isinstance(entry, str) else entry.get("model") if isinstance(entry, dict) else None

    # Everything the file alone decides is checked before the data is loaded.
    spaces = parse_spaces(cfg, registry, model(cfg.teacher), model(cfg.student))
    enqueued_points(cfg, spaces)  # validated now, enqueued when the study is created
    _check_search(cfg, int(cfg.student_recipe.get("epochs", cfg.recipe.epochs)))
    dev = resolve_device(device or cfg.device)
    data = load_data(registry, cfg.data, dev)
    try:
        plan = expand(bench, data.shape(), registry)
        plan.flops = validate(plan, registry, data.train_y.cpu())
    except KDZooError as e:
        raise _yaml_paths(e, methods) from e
    teacher, student = plan.pairs[0]
    for u in plan.unsupported:
        raise KDZooError(f"methods.{u['column']} cannot distil {teacher} → {student}: {u['reason']} Remove it from "
                         "`methods:` or change the pair.")
    _check_range_ends(spaces, registry, plan, data)
    recipe = plan.cohorts[0].recipe
    _check_search(cfg, recipe.epochs + max(plan.init_epochs.values(), default=0))
    cohort = plan.cohorts[0]
    key = hashlib.sha256(json.dumps({
        "teacher": cohort.teacher.key, "student": dataclasses.asdict(cohort.runs[0].student),
        "recipe": dataclasses.asdict(recipe),
        "seed": cfg.seed, "data": data.fingerprint, "spaces": {m: dataclasses.asdict(s) for m, s in spaces.items()},
        "provenance": [r.provenance for r in cohort.runs]}, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return TuneSetup(Path(path), cfg, raw, plan, data, dev, spaces, key)


def _check_range_ends(spaces: dict[str, MethodSpace], registry: Any, plan: Any, data: Any) -> None:
    """Build each method at both ends of each range (and at each choice), so that a value the method's own
    checks refuse fails now, naming the YAML path, not as a failed trial."""
    import torch

    from kdzoo.models import KDNet
    from kdzoo.runner import build_method

    teacher, student = plan.cohorts[0].teacher, plan.cohorts[0].runs[0].student
    nets = [KDNet(registry.create_model(m, num_classes=data.num_classes, **o), input_size=data.image_size)
            for m, o in ((teacher.model, teacher.options), (student.model, student.options))]
    pair = (teacher.model, student.model)
    labels = data.train_y.cpu()
    with torch.random.fork_rng():
        for s in spaces.values():
            for p in s.params:
                ends = p.choices if p.kind == "choice" else [p.low, p.high]
                for value in ends:
                    try:
                        build_method(registry, s.method, {**s.fixed, p.key: value}, nets[1].info, nets[0].info, 0,
                                     pair=pair, teacher_net=nets[0], train_labels=labels)
                    except KDZooError as e:
                        raise KDZooError(f"methods.{s.method}.{p.key} = {value!r}: {e}") from e
