"""The ``kdzoo`` command.

Every run option can come from a YAML file (``--config``); options given on the command line
override it. User errors print one paragraph and exit 2, without a traceback (``--debug``
shows it).
"""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any, Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kdzoo import KDZooError, __version__, catalog
from kdzoo.config import RunConfig, parse, parse_assignment, read_yaml
from kdzoo.plugins import Registry, load_plugins

if TYPE_CHECKING:  # the commands import these lazily, so that `kdzoo plugins` starts fast
    from kdzoo.plan import Plan
    from kdzoo.store import Scan, Store

console = Console()
err_console = Console(stderr=True)

# CLI option → (section, key) in the config mapping; section None = top level.
RUN_OPTIONS: dict[str, tuple[str | None, str]] = {
    "model": (None, "model"), "method": (None, "method"), "teacher": (None, "teacher"), "seed": (None, "seed"),
    "teacher_format": (None, "teacher_format"), "teacher_model": (None, "teacher_model"),
    "teacher_pretrained": (None, "teacher_pretrained"),
    "device": (None, "device"), "out": (None, "out"),
    "dataset": ("data", "dataset"), "data": ("data", "source"), "data_root": ("data", "root"), "train_size": ("data", "train_size"),
    "test_size": ("data", "test_size"), "val_size": ("data", "val_size"),
    "epochs": ("recipe", "epochs"), "batch_size": ("recipe", "batch_size"), "lr": ("recipe", "lr"),
    "schedule": ("recipe", "schedule"), "weight_decay": ("recipe", "weight_decay"),
    "label_smoothing": ("recipe", "label_smoothing"), "autocast": ("recipe", "autocast"),
}


def _common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS if suppress else False,
                        help="show tracebacks for errors")
    parser.add_argument("-p", dest="plugin_flags", action="append", metavar="no:NAME", default=default,
                        help="disable plugin NAME (entry-point or distribution name); repeatable")
    parser.add_argument("--strict-plugins", action="store_true", default=argparse.SUPPRESS if suppress else False,
                        help="fail when any plugin is broken instead of skipping it")


def _run_options(parser: argparse.ArgumentParser, distill: bool) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML file with any of the options below (CLI wins)")
    if distill:
        parser.add_argument("--teacher", metavar="CKPT", help="teacher checkpoint from `kdzoo train` (or another "
                            "code base's: --teacher-format)")
        parser.add_argument("--teacher-format", metavar="FORMAT", help="format of --teacher: kdzoo (default), or one "
                            "a plugin reads, e.g. repdistiller, mdistiller, torchdistill")
        parser.add_argument("--teacher-model", metavar="MODEL", help="the kdzoo network a foreign --teacher holds, "
                            "e.g. resnet56 (a kdzoo checkpoint names its own)")
        parser.add_argument("--teacher-pretrained", metavar="SOURCE", help="instead of --teacher: published weights "
                            "of --teacher-model, downloaded into $KDZOO_CACHE (e.g. torchdistill, CIFAR-10)")
        parser.add_argument("--student", dest="model", metavar="MODEL", help="student backbone, e.g. resnet8x4")
        parser.add_argument("--method", help="distillation method (default: kd); see `kdzoo methods`")
    else:
        parser.add_argument("--model", help="backbone to train, e.g. resnet20; see `kdzoo models`")
    parser.add_argument("--set", dest="hparams", action="append", default=[], metavar="KEY=VALUE",
                        help="method hyperparameter, e.g. --set T=2 (repeatable)")
    parser.add_argument("--model-option", dest="model_options", action="append", default=[], metavar="KEY=VALUE",
                        help="backbone factory option, e.g. --model-option cifar_stem=true")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--schedule", help="cosine, multistep, onecycle or constant")
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--label-smoothing", type=float)
    parser.add_argument("--autocast", help="auto, off or bf16")
    parser.add_argument("--train-size", type=int, help="stratified training subset (default: all 50,000)")
    parser.add_argument("--test-size", type=int, help="stratified test subset (default: all 10,000)")
    parser.add_argument("--val-size", type=int, help="validation images held out of the training set")
    parser.add_argument("--dataset", help="dataset to train on (default: cifar10); see `kdzoo datasets`")
    parser.add_argument("--data-option", dest="data_options", action="append", default=[], metavar="KEY=VALUE",
                        help="dataset option, e.g. --data-option path=my_images (repeatable)")
    parser.add_argument("--data", metavar="SOURCE", help="auto, download, or a path (cifar10: auto = $KDZOO_DATA, else torchvision)")
    parser.add_argument("--data-root", help="download/cache folder (default: $KDZOO_CACHE or ~/.cache/kdzoo)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--out", metavar="DIR", help="output folder for checkpoint.pt and metrics.json")
    _log_option(parser)


def _log_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log", metavar="NAME", action="append", default=[],
                        help="run observer (experiment tracker), e.g. tensorboard or mlflow; repeatable; added to "
                             "`loggers:` of the config or benchmark file. `kdzoo plugins` lists them")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdzoo", description="Knowledge-distillation method zoo for PyTorch.")
    parser.add_argument("--version", action="version", version=f"kdzoo {__version__}")
    _common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        _common(p, suppress=True)
        return p

    p = add("plugins", "list plugins with their distribution, version, registrations and errors")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add("methods", "list distillation methods by family with their needs and default hyperparameters; "
                       "with NAME, one method in full")
    p.add_argument("name", nargs="?", help="a method: its defaults, per-pair defaults, needs, init stage, "
                   "reference and documentation")
    add("datasets", "list datasets with their sizes, options and whether they are available here")
    p = add("models", "list registered backbones")
    p.add_argument("pattern", nargs="?", help="glob pattern, e.g. 'resnet*'")
    _run_options(add("train", "train a network with cross-entropy (a teacher, or a baseline)"), distill=False)
    _run_options(add("distill", "distil a student from a teacher checkpoint"), distill=True)
    p = add("bench", "run a benchmark file: every teacher × student × method × seed, then print the table")
    p.add_argument("file", help="benchmark YAML, e.g. benchmarks/quick.yaml")
    p.add_argument("--out", metavar="DIR", help="results folder (default: runs/bench/NAME); rerun to resume")
    p.add_argument("--dry-run", action="store_true", help="validate and show the plan with a time estimate; train nothing")
    p.add_argument("--no-cohorts", action="store_true", help="train every run alone (for comparison)")
    p.add_argument("--metric", choices=("last", "best"), default="last", help="accuracy shown in the table")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the file's, else auto)")
    p.add_argument("--data", metavar="SOURCE", help="override the file's data source (auto, torchvision, or a .npz path)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: one cohort after another here; ray: one Ray task per cohort (GPUs, clusters)")
    p.add_argument("--ray-address", metavar="ADDR", help="an existing Ray cluster (default: start a local one)")
    _log_option(p)
    p = add("report", "re-render a benchmark's table from its results folder, without training")
    p.add_argument("dir", help="the --out folder of `kdzoo bench`")
    p.add_argument("--metric", choices=("last", "best"), default="last", help="accuracy shown in the table")
    p.add_argument("--no-export", action="store_true", help="do not (re)write report.md/.csv/.json")
    p.add_argument("--html", action="store_true", help="also write report.html: the table, plots, failures, budget "
                   "and environment in one offline page (needs matplotlib: pip install \"kdzoo[report]\")")
    p = add("tune", "search methods' hyperparameters on a validation split (Optuna, pruned, resumable), then write "
                    "a benchmark with the best settings as a METHOD(tuned) variant")
    p.add_argument("file", help="tuning YAML, e.g. benchmarks/tune-kd-cifar10.yaml")
    p.add_argument("--out", metavar="DIR", help="results folder with the Optuna study (study.db) and tuned.yaml "
                   "(default: runs/tune/NAME); rerun to resume")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the file's, else auto)")
    p.add_argument("--data", metavar="SOURCE", help="override the file's data source (auto, torchvision, or a .npz path)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: search here; ray: Ray tasks search together on one study (GPUs, clusters)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="Ray tasks to run (default: one per GPU, else one per node)")
    p.add_argument("--ray-address", metavar="ADDR", help="an existing Ray cluster (default: start a local one)")
    p = add("new-plugin", "write a ready-to-install method package kdzoo-NAME (pyproject, skeleton, README, tests)")
    p.add_argument("name", help="method name: lowercase letters, digits, underscores (e.g. my_kd)")
    p.add_argument("--dir", default=".", help="parent folder of the new package (default: the current folder)")
    return parser


def _disabled(flags: list[str] | None) -> list[str]:
    names = []
    for flag in flags or []:
        if not flag.startswith("no:") or len(flag) <= 3:
            raise KDZooError(f"-p expects no:NAME to disable a plugin (like pytest), got '-p {flag}'.")
        names.append(flag[3:])
    return names


def run_config(args: argparse.Namespace, command: str) -> RunConfig:
    """Merge the YAML file (if any) and the command-line options into a validated RunConfig."""
    mapping: dict[str, Any] = read_yaml(args.config) if args.config else {}
    for option, (section, key) in RUN_OPTIONS.items():
        value = getattr(args, option, None)
        if value is not None:
            (mapping.setdefault(section, {}) if section else mapping)[key] = value
    if command == "distill":
        mapping.setdefault("method", "kd")
    for field_name, pairs in (("hparams", args.hparams), ("model_options", args.model_options)):
        if pairs:
            mapping[field_name] = {**mapping.get(field_name, {}), **dict(parse_assignment(p) for p in pairs)}
    if args.data_options:
        data = mapping.setdefault("data", {})
        data["options"] = {**(data.get("options") or {}), **dict(parse_assignment(p) for p in args.data_options)}
    cfg = parse(RunConfig, mapping)
    if not cfg.model:
        flag = "--student" if command == "distill" else "--model"
        raise KDZooError(f"No model given: pass {flag} NAME (see `kdzoo models`) or set `model:` in the config file.")
    if "out" not in mapping:
        cfg.out = f"runs/{cfg.model}-{cfg.method}-s{cfg.seed}"
    return cfg


def cmd_plugins(args: argparse.Namespace, registry: Registry) -> None:
    catalog.plugins(registry, console, as_json=args.json)


def cmd_methods(args: argparse.Namespace, registry: Registry) -> None:
    if getattr(args, "name", None):
        catalog.show_method(args.name, registry, console)
    else:
        catalog.methods(registry, console, err_console)


def cmd_datasets(args: argparse.Namespace, registry: Registry) -> None:
    catalog.datasets(registry, console)


def cmd_models(args: argparse.Namespace, registry: Registry) -> None:
    catalog.models(registry, args.pattern, console, err_console)


def _warn_if_busy() -> None:
    """On a busy machine, say once (before training) what to expect and what helps (:mod:`kdzoo.cpu_load`)."""
    import torch

    from kdzoo.cpu_load import busy_warning

    message = busy_warning(torch.get_num_threads())
    if message:
        err_console.print(f"[bold yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def cmd_run(args: argparse.Namespace, registry: Registry) -> None:
    from kdzoo.observers import merge_loggers
    from kdzoo.progress import RichProgress
    from kdzoo.runner import run_single

    cfg = run_config(args, args.command)
    cfg.loggers = merge_loggers(cfg.loggers, args.log)
    _warn_if_busy()
    result = run_single(cfg, registry, RichProgress(err_console), report=lambda message: err_console.print(
        f"[bold yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True))
    if result["status"] != "ok":
        raise KDZooError(f"The run failed: {result['error']} (metrics so far are in {cfg.out}/metrics.json)")
    last, best = result["last"], result["best"]
    console.print(
        f"[bold]{result['label']}[/]: last-epoch top-1 {last['top1']:.2f}%, best {best['top1']:.2f}% "
        f"(epoch {best['epoch']}), top-5 {last['top5']:.2f}%, macro F1 {last['f1']:.2f}%"
        + (f", teacher agreement {last['agreement']:.2f}%" if "agreement" in last else "")
        + (f"; teacher top-1 {result['teacher']['top1_measured']:.2f}% on the same test images"
           if result.get("teacher") and result["teacher"].get("top1_measured") is not None else "")
        + f". Wrote {cfg.out}/checkpoint.pt and metrics.json."
    )


def cmd_bench(args: argparse.Namespace, registry: Registry) -> int:
    from pathlib import Path

    from kdzoo import bench
    from kdzoo.checkpoint import ensure_writable_dir
    from kdzoo.observers import merge_loggers, resolve_observers
    from kdzoo.progress import RichProgress
    from kdzoo.store import Store

    plan, data, device = bench.prepare(args.file, registry, device=args.device,
                                       cohorts=False if args.no_cohorts else None, data_source=args.data)
    plan.bench.loggers = merge_loggers(plan.bench.loggers, args.log)  # observers are in no run id
    resolve_observers(registry, plan.bench.loggers)  # a missing package or a bad option: now, before training
    out = Path(args.out or f"runs/bench/{plan.bench.name}")
    store = Store(out)
    teachers_todo = [t for t in plan.teachers if bench.teacher_status(t) == "train"]
    scan = store.scan()  # every record read and validated once
    runs_todo = [r for r in plan.runs if not scan.done(r.run_id)]
    if args.dry_run:
        show_plan(plan, store, scan)
        seconds = bench.estimate_seconds(plan, data, registry, device)
        console.print(f"Estimated time for what is left: [bold]{seconds / 60:.1f} min[/] on {device} "
                      f"(from a short measured probe; evaluation included roughly).")
        return 0
    ensure_writable_dir(out, "results (--out)")
    if runs_todo or teachers_todo:
        _warn_if_busy()
    if teachers_todo:
        ensure_writable_dir(bench.cache_dir() / "teachers", "teacher cache ($KDZOO_CACHE)")
    if args.executor == "ray":
        from kdzoo.distributed import RayExecutor

        executor: bench.Executor = RayExecutor(args.ray_address)
    else:
        executor = bench.run_local
    console.print(f"[bold]{plan.bench.name}[/]: {len(plan.runs)} runs in {len(plan.cohorts)} cohorts, "
                  f"{len(runs_todo)} to train, {len(teachers_todo)} teacher(s) to train; results in {out}")
    with RichProgress(err_console, plan_total=len(runs_todo) + len(teachers_todo)) as progress:
        outcome = bench.run_plan(plan, data, registry, store, device, progress, progress.say, executor=executor)
    report(store, args.metric, export=True)
    if outcome.failed:
        err_console.print(f"[red]{len(outcome.failed)} run(s) failed[/] (listed under the table); the others finished.")
        return 1
    return 0


def show_plan(plan: Plan, store: Store, scan: Scan) -> None:
    from kdzoo.plan import teacher_status

    table = Table(title=f"{plan.bench.name}: plan")
    for col in ("teacher", "status"):
        table.add_column(col)
    for t in plan.teachers:
        fmt = f" ({t.format} format)" if t.format != "kdzoo" else ""
        status = {"checkpoint": f"checkpoint {t.checkpoint}{fmt}", "train": f"train {t.recipe.epochs} epochs",
                  "cached": f"cached ({t.dir})"}[teacher_status(t)]
        table.add_row(t.model, status)
    console.print(table)
    table = Table(title="cohorts (runs trained together on identical batches, one teacher pass per batch)")
    for col in ("teacher → students", "seed", "runs", "status"):
        table.add_column(col)
    for c in plan.cohorts:
        done = sum(scan.done(r.run_id) for r in c.runs)
        status = "done" if done == len(c.runs) else (
            "resumable" if store.cohort_path(c.cohort_id).is_file() else "to train")
        table.add_row(f"{c.teacher.model} → {', '.join(s.model for s in c.students)}", str(c.seed),
                      ", ".join(c.member_label(r) for r in c.runs), status)
    console.print(table)
    for error in scan.damaged:
        err_console.print(f"[yellow]warning:[/] {escape(str(error))}; the run will be redone (the file is kept "
                          "aside under damaged/).", highlight=False)


def report(store: Store, metric: str, export: bool, html: bool | None = None) -> None:
    """Print the table; with ``export`` write report.md/csv/json. ``html``: True writes report.html (an error
    without matplotlib, after the text exports), None writes it when matplotlib is installed (else one line
    says how to get it: the end of ``kdzoo bench``), False never."""
    from kdzoo import html_report
    from kdzoo import report as rep

    summary = rep.summarize(store.runs(), store.bench(), metric)
    rep.render_table(summary, console)
    if export:
        paths = rep.export(summary, store.root)
        console.print(f"[dim]wrote {', '.join(str(p) for p in paths)}[/]")
    if html is False:
        return
    if html is None and not html_report.available():
        console.print('[dim]no report.html: its plots need matplotlib (pip install "kdzoo\\[report]")[/]')
        return
    path = html_report.write_html(store.root, metric)  # KDZooError naming the pip command without matplotlib
    console.print(f"[dim]wrote {path}: open it in a browser (offline, self-contained)[/]")


def cmd_report(args: argparse.Namespace, registry: Registry) -> None:
    from kdzoo.store import Store

    report(Store(args.dir), args.metric, export=not args.no_export, html=args.html)


def cmd_new_plugin(args: argparse.Namespace, registry: Registry) -> None:
    from kdzoo.scaffold import new_plugin

    folder = new_plugin(args.name, args.dir, taken=registry.methods)
    console.print(f"Wrote {folder}. Next: cd {folder} && pip install -e \".[test]\" && pytest; then "
                  f"`kdzoo plugins` lists it and `--method {args.name}` uses it. See docs/writing-plugins.md.",
                  markup=False, highlight=False, soft_wrap=True)


def cmd_tune(args: argparse.Namespace, registry: Registry) -> int:
    from pathlib import Path

    from kdzoo import tune, tune_run
    from kdzoo.checkpoint import ensure_writable_dir
    from kdzoo.progress import RichProgress

    tune_run._optuna()  # the optional extra: a clear message before anything is loaded
    if args.workers is not None and (args.executor != "ray" or args.workers < 1):
        raise KDZooError(f"--workers {args.workers}: the number of Ray tasks that search together needs "
                         "--executor ray and a count of at least 1 (a local search is one process; start "
                         "`kdzoo tune` again with the same --out to add another).")
    if args.executor == "ray":
        from kdzoo.distributed import require_ray

        require_ray()  # before the data is loaded
    setup = tune.prepare(args.file, registry, device=args.device, data_source=args.data)
    out = ensure_writable_dir(Path(args.out or f"runs/tune/{setup.config.name}"), "results (--out)")
    _warn_if_busy()
    console.print(f"[bold]{setup.config.name}[/]: {', '.join(setup.spaces)} on {setup.plan.pairs[0][0]} → "
                  f"{setup.plan.pairs[0][1]}, {setup.config.budget.trials} trials of {tune_run.epochs_per_trial(setup)} "
                  f"epochs, scored on {len(setup.data.val_y):,} validation images; study in {out / 'study.db'}")
    if args.executor == "ray":
        from kdzoo.distributed import tune_on_ray

        trained = tune_on_ray(args.file, out, registry, address=args.ray_address, workers=args.workers,
                              device=args.device, data_source=args.data, say=lambda e, d: err_console.print(d))
        outcome = tune_run.read_outcome(tune_run.open_study(setup, out), setup, trained)
    else:
        with RichProgress(err_console) as progress:
            outcome = tune_run.search(setup, registry, out, progress, progress.say)
    tune_run.render(outcome, setup, console)
    if outcome.running:  # every process tells its trials before it reads the study: the last one sees them all
        console.print(f"Trials {', '.join(map(str, outcome.running))} are still training in another process "
                      "sharing this study, so the best may change: that process writes tuned.yaml when it finishes.",
                      highlight=False, soft_wrap=True)
        return 0
    if outcome.best is None:
        return 1
    path, note = tune_run.write_bench(outcome, setup, out / "tuned.yaml")
    console.print(f"Wrote {path}{' (' + note + ')' if note else ''}. Measure it on the test set over seeds "
                  f"{setup.config.bench_seeds}: kdzoo bench {path}", highlight=False, soft_wrap=True)
    return 0


COMMANDS = {"plugins": cmd_plugins, "methods": cmd_methods, "datasets": cmd_datasets, "models": cmd_models, "train": cmd_run, "distill": cmd_run,
            "bench": cmd_bench, "report": cmd_report, "new-plugin": cmd_new_plugin}

COMMANDS["tune"] = cmd_tune


def main(argv: Sequence[str] | None = None) -> int:
    from kdzoo.cpu_load import prefer_passive_wait

    prefer_passive_wait()  # before torch loads OpenMP: idle threads sleep instead of spinning (kdzoo/cpu_load.py)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.registry = load_plugins(disable=_disabled(args.plugin_flags), strict=args.strict_plugins)
        for warning in args.registry.warnings:  # e.g. -p no:NAME naming no installed plugin
            err_console.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False)
        rc = COMMANDS[args.command](args, args.registry)
    except KDZooError as e:
        if args.debug:
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        return 2
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        return 130
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
