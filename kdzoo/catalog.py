"""What is installed: the listings behind ``kdzoo plugins``, ``methods``, ``models`` and ``datasets``.

Contract: each function prints to the consoles it is given and changes nothing; unknown names raise
:class:`~kdzoo.KDZooError` (with close matches) for the command to report.
"""
from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kdzoo import KDZooError
from kdzoo.plugins import Registry


def plugins(registry: Registry, console: Console, as_json: bool = False) -> None:
    """``kdzoo plugins``: every plugin, its distribution, status and what it provides (a table, or JSON)."""
    if as_json:
        print(json.dumps([vars(p) | {"status": p.status} for p in registry.plugins], indent=1))
        return
    table = Table(title="kdzoo plugins")
    for col in ("plugin", "distribution", "version", "status", "provides"):
        table.add_column(col, overflow="fold")
    for p in registry.plugins:
        models = [(", ".join(p.models) if len(p.models) <= 3 else f"{len(p.models)} (see `kdzoo models`)")] if p.models else []
        models += [f"{family} (listed on use: `kdzoo models`)" for family in p.model_families]
        provides = [f"{kind}: {text}" for kind, text in (
            ("methods", ", ".join(p.methods)), ("models", "; ".join(models)), ("datasets", ", ".join(p.datasets)),
            ("checkpoint formats", ", ".join(p.checkpoint_formats)), ("observers", ", ".join(p.observers)),
        ) if text]
        status = {"ok": "[green]ok[/]", "disabled": "[yellow]disabled[/]"}.get(p.status, f"[red]broken[/]: {p.error}")
        table.add_row(p.name, p.dist, p.version, status, escape("\n".join(provides)))
    console.print(table)


#: What a method can ask of the engine: (class attribute, how listings call it), in the order shown.
METHOD_NEEDS: tuple[tuple[str, str], ...] = (
    ("needs_teacher", "teacher"), ("needs_features", "features"), ("needs_preact", "pre-activation features"),
    ("needs_stem", "stem"), ("needs_embedding", "embedding"), ("needs_indices", "sample indices"),
    ("needs_train_labels", "training labels"), ("needs_teacher_net", "teacher network"),
    ("has_init_stage", "init stage"),
)
#: The schedule ``kdzoo methods NAME`` sizes an init stage against (RepDistiller's CIFAR-100 recipe).
REFERENCE_EPOCHS = 240


def method_needs(cls: type) -> list[str]:
    """What method class ``cls`` asks of the engine, in words (``METHOD_NEEDS`` order)."""
    return [what for attr, what in METHOD_NEEDS if getattr(cls, attr, False)]


def method_groups(methods: dict[str, type]) -> list[tuple[str, list[str]]]:
    """Registered method names grouped by family: logits, features, relation, then any other family a
    plugin declares (sorted), then "other" for methods without one; names sorted within a group."""
    from kdzoo.methods import FAMILIES

    groups: dict[str, list[str]] = {}
    for name in sorted(methods):
        groups.setdefault(str(getattr(methods[name], "family", "") or "other"), []).append(name)
    order = [f for f in FAMILIES if f in groups]
    order += sorted(f for f in groups if f not in FAMILIES and f != "other")
    order += ["other"] if "other" in groups else []
    return [(family, groups[family]) for family in order]


def _assignments(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def init_stage_epochs(cls: type, main_epochs: int = REFERENCE_EPOCHS) -> int:
    """Epochs of ``cls``'s init stage before ``main_epochs`` main-stage epochs, from its class defaults
    (``init_epochs``, else ``init_fraction`` of ``main_epochs``), by ``Method.num_init_epochs``'s rule."""
    from types import SimpleNamespace

    from kdzoo.methods import INIT_STAGE_DEFAULTS, Method

    if not getattr(cls, "has_init_stage", False):
        return 0
    values = {**INIT_STAGE_DEFAULTS, **{k: cls.defaults[k] for k in INIT_STAGE_DEFAULTS if k in cls.defaults}}
    return Method.num_init_epochs(SimpleNamespace(has_init_stage=True, **values), main_epochs)  # type: ignore[arg-type]


def methods(registry: Registry, console: Console, err_console: Console) -> None:
    """``kdzoo methods``: one line per method (plugin, needs, defaults), grouped by family."""
    rows = {name: (name, registry.owner[("method", name)], ", ".join(method_needs(cls)) or "-",
                   _assignments(cls.defaults)) for name, cls in registry.methods.items()}
    header = ("method", "plugin", "needs", "defaults")
    widths = [max(len(r[i]) for r in [header, *rows.values()]) for i in range(3)]

    def line(cells: tuple[str, ...]) -> str:
        return "  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + cells[3]

    # One line per method, never wrapped or cut (soft_wrap), so that each can be grepped whole.
    console.print(line(header), style="dim", markup=False, highlight=False, soft_wrap=True)
    for family, names in method_groups(registry.methods):
        console.print(family, style="bold", markup=False, highlight=False, soft_wrap=True)
        for name in names:
            console.print(line(rows[name]).rstrip(), markup=False, highlight=False, soft_wrap=True)
    err_console.print(f"[dim]{len(rows)} method(s); `kdzoo methods NAME` shows one in full[/]")


def show_method(name: str, registry: Registry, console: Console) -> None:
    """``kdzoo methods NAME``: everything a user needs to choose and configure one method."""
    import inspect

    cls = registry.method(name)  # KDZooError with close matches, or the plugin that is off
    plain = {"markup": False, "highlight": False, "soft_wrap": True}
    title = name + (f" (class name '{cls.name}')" if cls.name != name else "")
    console.print(title, style="bold", **plain)
    fields = [("from", registry.describe_origin(name)),
              ("family", str(cls.family or "other (none declared)")),
              ("needs", ", ".join(method_needs(cls)) or "nothing but the student's logits")]
    n_init = init_stage_epochs(cls)
    if getattr(cls, "has_init_stage", False):
        how = (f"init_epochs={cls.defaults['init_epochs']}" if cls.defaults.get("init_epochs", 0) > 0 else
               f"init_fraction={cls.defaults.get('init_fraction')} of the main stage's epochs; --set init_epochs=N "
               "fixes the count")
        student = "" if getattr(cls, "init_uses_student", True) else "; it runs without a student forward pass"
        if n_init:
            fields.append(("init stage", f"yes: {n_init} epoch{'s' if n_init != 1 else ''} before a "
                                         f"{REFERENCE_EPOCHS}-epoch schedule's main stage ({how}){student}"))
        else:
            fields.append(("init stage", "off by default (init_epochs=0, init_fraction=0); --set init_epochs=N "
                                         f"turns it on{student}"))
    else:
        fields.append(("init stage", "none"))
    if cls.signed_weights:
        fields.append(("signed weights", ", ".join(sorted(cls.signed_weights)) + " may be negative"))
    fields.append(("reference", cls.reference or "-"))
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        console.print(f"{key.ljust(width)}  {value}", **plain)

    table = Table(title="defaults", title_justify="left")
    table.add_column("hyperparameter")
    table.add_column("default")
    for key, value in cls.defaults.items():
        table.add_row(escape(key), escape(repr(value) if isinstance(value, str) else str(value)))
    console.print(table)
    if cls.pair_defaults:
        table = Table(title="per-pair defaults", title_justify="left",
                      caption="they replace the defaults for that pair; settings you give (--set, a benchmark "
                              "entry) win over both", caption_justify="left")
        table.add_column("teacher → student")
        table.add_column("overrides")
        for (teacher, student_name), values in cls.pair_defaults.items():
            table.add_row(escape(f"{teacher} → {student_name}"), escape(_assignments(values)))
        console.print(table)
    else:
        console.print("per-pair defaults: none (the defaults above serve every pair)", **plain)

    docs = [inspect.cleandoc(cls.__doc__)] if cls.__doc__ else []  # cls.__doc__: never the base class's
    module = sys.modules.get(cls.__module__)
    if module is not None and module.__doc__ and inspect.cleandoc(module.__doc__) not in docs:
        docs.append(f"From module {cls.__module__}:\n\n" + inspect.cleandoc(module.__doc__))
    for doc in docs:
        console.print("", **plain)
        console.print(doc, **plain)


def datasets(registry: Registry, console: Console) -> None:
    """``kdzoo datasets``: each dataset, its plugin, size, options and whether it is found here."""
    from kdzoo import cache_dir

    table = Table(title="kdzoo datasets")
    for col in ("dataset", "plugin", "size", "options", "here (source auto)"):
        table.add_column(col)
    for name, cls in sorted(registry.datasets.items()):
        try:
            found = cls().locate("auto", cache_dir())
        except KDZooError as e:  # a dataset that needs options (a folder's path) cannot say without them
            found = None if "option" not in str(e) else "(give its options)"
        where = found or "[yellow]not found[/] (downloads on first use where it can)"
        options = ", ".join(f"{k}={v}" for k, v in cls.defaults.items()) or "-"
        size = (cls().sizes() if not cls.defaults else "") or cls.description
        table.add_row(name, registry.dataset_owner[name], size, options, escape(where) if found else where)
    console.print(table)


def models(registry: Registry, pattern: str, console: Console, err_console: Console) -> None:
    """``kdzoo models [PATTERN]``: the registered model names matching a glob, one per line."""
    names = registry.model_names(pattern)
    for plugin, error in registry.models.errors.items():  # a model family that could not be listed
        err_console.print(f"[bold yellow]warning:[/] plugin '{plugin}' is broken: {escape(error)}", highlight=False)
    if not names:
        raise KDZooError(f"No registered model matches '{pattern}'. Patterns are globs, e.g. 'resnet*' or '*cifar*'.")
    console.print("\n".join(names), soft_wrap=True)
    err_console.print(f"[dim]{len(names)} model(s)[/]")
