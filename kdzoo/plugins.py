"""The plugin manager: entry-point discovery, enable/disable, broken-plugin isolation.

``load_plugins()`` builds a fresh pluggy manager every call (no import-time global), so tests
and tools can load different plugin sets side by side.

* The builtin plugin (``kdzoo.methods``: the ``ce`` baseline) is always registered, like
  pytest's builtin plugins.
* Entry points of the ``kdzoo`` group are loaded one at a time, each followed by
  ``check_pending()`` (which catches a misspelled hook name). pluggy's own
  ``load_setuptools_entrypoints`` would stop at the first failure.
* Each plugin's hooks are called separately, so a hook that raises, or a name that clashes
  with an earlier plugin, disables that plugin only; the error is recorded on it.
  ``strict=True`` re-raises instead.
* ``KDZOO_LOAD_PLUGINS=a,b`` loads only those entry points (empty: none), and
  ``KDZOO_DISABLE_PLUGINS=a,b`` or ``disable=[...]`` (the CLI's ``-p no:NAME``) turns some off.
  A plugin is matched by entry-point name or distribution name.
* Checkpoint formats (``register_checkpoint_formats``) are collected like methods: a name that two plugins
  register breaks the later plugin, and ``kdzoo`` (kdzoo's own format) cannot be registered.
* Run observers (``register_observers``: experiment trackers, :mod:`kdzoo.observers`) are collected like
  methods too; a run chooses them by name (``--log NAME``, ``loggers:``).
* Model names registered with ``register.family(...)`` are listed only when a model is first
  looked up or listed (``Registry.models``), so commands that need only methods never import
  timm; a family name that another plugin also registers is reported when it is used.
* This module imports neither torch nor a plugin at import time (``kdzoo --help`` stays fast); the
  builtin ``ce`` (``kdzoo.methods``, which imports torch) is loaded by ``load_plugins()``.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import os
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

import pluggy

from kdzoo import KDZooError, __version__, hookspecs
from kdzoo.errors import suggest

if TYPE_CHECKING:  # torch is imported by load_plugins(), never by importing this module
    from torch import nn

    from kdzoo.datasets import Dataset
    from kdzoo.methods import Method
    from kdzoo.observers import Observer

ModelFactory = Callable[..., "nn.Module"]

GROUP = "kdzoo"
ENV_LOAD = "KDZOO_LOAD_PLUGINS"
ENV_DISABLE = "KDZOO_DISABLE_PLUGINS"
BUILTIN = "builtin"


@dataclass
class PluginInfo:
    """One plugin as ``kdzoo plugins`` shows it."""

    name: str
    dist: str
    version: str
    source: str  # "builtin" or the entry point's "module:attr"
    methods: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)  # names registered with register(name, factory)
    datasets: list[str] = field(default_factory=list)
    checkpoint_formats: list[str] = field(default_factory=list)
    observers: list[str] = field(default_factory=list)  # run observers (experiment trackers)
    model_families: list[str] = field(default_factory=list)  # descriptions of register.family(...) families
    error: str | None = None
    disabled: bool = False
    disabled_by: str = ""  # "-p no:NAME" (load_plugins' disable=), KDZOO_DISABLE_PLUGINS, KDZOO_LOAD_PLUGINS or "only="

    @property
    def status(self) -> str:
        return "disabled" if self.disabled else "broken" if self.error else "ok"

    def why_unavailable(self) -> str:
        """Why a disabled or broken plugin registered nothing, and how to get it back."""
        if not self.disabled:
            return f"broken ({self.error}); fix or reinstall its package (`kdzoo plugins` shows the error)"
        by = self.disabled_by
        if by.startswith("-p "):
            return f"disabled ({by}); re-enable it: drop {by}"
        if by == ENV_DISABLE:
            return f"disabled ({ENV_DISABLE}); re-enable it: remove it from {ENV_DISABLE}"
        if by in (ENV_LOAD, "only="):
            return f"not loaded ({by} does not name it); add '{self.name}' to {by}"
        return "disabled"


@dataclass(frozen=True)
class ModelFamily:
    """Model names that a plugin registered lazily with ``register.family(list_names, make_factory, description)``."""

    plugin: str
    list_names: Callable[[], Iterable[str]]
    make_factory: Callable[[str], ModelFactory]
    description: str


class ModelTable(Mapping[str, ModelFactory]):
    """``Registry.models``: the registered backbones, a read-only mapping of model name -> factory.

    Names from ``register(name, factory)`` are known once the plugins are loaded. The first use of
    the table (a lookup, ``in``, iteration, ``len``) lists every family (``register.family``) once,
    and a family's factory for a name is made on the first lookup of that name. A name registered
    twice (by two plugins, or twice by one through a family) stays listed, but looking it up raises
    ``KDZooError`` naming both plugins. A family whose ``list_names()`` raises is left out and its
    error kept in ``errors`` (and raised as ``KDZooError`` when the registry is strict).
    """

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._eager: dict[str, tuple[str, ModelFactory]] = {}  # name -> (plugin, factory)
        self._families: list[ModelFamily] = []
        self._index: dict[str, list[str]] | None = None  # name -> plugins registering it; None until listed
        self._family_of: dict[str, ModelFamily] = {}
        self._made: dict[str, ModelFactory] = {}
        self.errors: dict[str, str] = {}  # plugin -> why its family could not be listed

    def add(self, plugin: str, factories: Mapping[str, ModelFactory], families: Iterable[ModelFamily]) -> None:
        """Merge one plugin's registrations (the caller has checked its plain names for clashes)."""
        self._eager.update({name: (plugin, factory) for name, factory in factories.items()})
        self._families.extend(families)
        self._index = None

    def registered_owner(self, name: str) -> str | None:
        """The plugin that registered ``name`` with ``register(name, factory)``, without listing families."""
        entry = self._eager.get(name)
        return entry[0] if entry else None

    def owner_of(self, name: str) -> str:
        """The plugin that registered ``name``: ``KeyError`` if none, ``KDZooError`` if two did."""
        plugins = self._names()[name]
        if len(plugins) > 1:
            raise KDZooError(self._clash(name, plugins))
        return plugins[0]

    def _names(self) -> dict[str, list[str]]:
        if self._index is None:
            index = {name: [plugin] for name, (plugin, _) in self._eager.items()}
            family_of: dict[str, ModelFamily] = {}
            for family in self._families:
                try:
                    names = list(dict.fromkeys(family.list_names()))
                    bad = next((n for n in names if not isinstance(n, str) or not n), None)
                    if bad is not None:
                        raise TypeError(f"list_names() returned {bad!r}, which is not a model name")
                except Exception as exc:  # a broken family must not hide the other plugins' models
                    self._failed(family, exc)
                    continue
                for name in names:
                    index.setdefault(name, []).append(family.plugin)
                    family_of.setdefault(name, family)
            self._index, self._family_of = index, family_of
        return self._index

    def _failed(self, family: ModelFamily, exc: Exception) -> None:
        info = self._registry.plugin(family.plugin)
        self.errors[family.plugin] = f"listing its models ({family.description}) raised {_format_error(exc)}"
        if self._registry.strict:
            raise KDZooError(f"Plugin '{info.name}' ({info.dist}) is broken: {self.errors[family.plugin]}") from exc

    def _clash(self, name: str, plugins: list[str]) -> str:
        who = [f"plugin '{p}' ({self._registry.plugin(p).dist})" for p in dict.fromkeys(plugins)]
        where = f"both {who[0]} and {who[1]}" if len(who) == 2 else ", ".join(who) if len(who) > 2 else f"{who[0]} twice"
        return (f"model name clash: '{name}' is registered by {where}. "
                f"Disable one of them with -p no:NAME or {ENV_DISABLE}.")

    def __getitem__(self, name: str) -> ModelFactory:
        self.owner_of(name)  # KeyError for an unknown name, KDZooError for a clash
        if name in self._eager:
            return self._eager[name][1]
        if name not in self._made:
            family = self._family_of[name]
            try:
                factory = family.make_factory(name)
                if not callable(factory):
                    raise TypeError(f"make_factory({name!r}) returned {factory!r}, which is not callable")
            except KDZooError:
                raise
            except Exception as exc:
                info = self._registry.plugin(family.plugin)
                raise KDZooError(f"Plugin '{info.name}' ({info.dist} {info.version}) could not make the factory "
                                 f"of model '{name}': {_format_error(exc)}") from exc
            self._made[name] = factory
        return self._made[name]

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __repr__(self) -> str:
        state = f"{len(self._index)} names" if self._index is not None else "families not listed yet"
        return f"<ModelTable: {len(self._eager)} registered, {len(self._families)} families; {state}>"


@dataclass(frozen=True)
class CheckpointFormat:
    """A foreign teacher-checkpoint format from ``register_checkpoint_formats``: ``convert(model_name, payload)``
    returns the kdzoo network's state dict; ``pretrained(model_name, dataset, folder)``, if any, returns the path
    of published weights (see :mod:`kdzoo.hookspecs`)."""

    name: str
    plugin: str
    convert: Callable[[str, Any], Mapping[str, Any]]
    pretrained: Callable[..., Any] | None = None


NATIVE_FORMAT = "kdzoo"  # kdzoo's own checkpoints (kdzoo.checkpoint); not a plugin's


class _Owners(Mapping[tuple[str, str], str]):
    """``Registry.owner``: ``(kind, name) -> plugin name``, kind ``"method"`` or ``"model"`` (a model
    name from a family is resolved on lookup; a clashing one raises ``KDZooError``)."""

    def __init__(self, methods: dict[str, str], models: ModelTable) -> None:
        self._methods, self._models = methods, models

    def __getitem__(self, key: tuple[str, str]) -> str:
        kind, name = key
        if kind == "method":
            return self._methods[name]
        if kind == "model":
            return self._models.owner_of(name)
        raise KeyError(key)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        yield from (("method", name) for name in self._methods)
        yield from (("model", name) for name in self._models)

    def __len__(self) -> int:
        return len(self._methods) + len(self._models)


@dataclass
class Registry:
    """What the loaded plugins registered: methods and model factories by name, with owners."""

    plugins: list[PluginInfo]
    methods: dict[str, type[Method]] = field(default_factory=dict)
    models: ModelTable = field(init=False, repr=False)  # name -> factory; families are listed on first use
    owner: Mapping[tuple[str, str], str] = field(init=False, repr=False)  # (kind, name) -> plugin name
    datasets: dict[str, type[Dataset]] = field(default_factory=dict)
    dataset_owner: dict[str, str] = field(default_factory=dict)  # dataset name -> plugin name
    checkpoint_formats: dict[str, CheckpointFormat] = field(default_factory=dict)  # foreign teacher formats
    checkpoint_format_owner: dict[str, str] = field(default_factory=dict)  # format name -> plugin name
    observers: dict[str, type[Observer]] = field(default_factory=dict)  # run observers (`--log NAME`)
    observer_owner: dict[str, str] = field(default_factory=dict)  # observer name -> plugin name
    warnings: list[str] = field(default_factory=list)  # e.g. an unknown name in -p no:NAME; the CLI prints them
    strict: bool = False  # a model family that cannot be listed raises instead of being left out

    def __post_init__(self) -> None:
        self._method_owner: dict[str, str] = {}
        self.models = ModelTable(self)
        self.owner = _Owners(self._method_owner, self.models)

    def plugin(self, name: str) -> PluginInfo:
        return next(p for p in self.plugins if p.name == name)

    def dataset(self, name: str) -> type[Dataset]:
        """The dataset class registered as ``name``; ``KDZooError`` with close matches otherwise."""
        if name not in self.datasets:
            off = [p for p in self.plugins if p.disabled or p.error]
            same = next((p for p in off if p.name == name), None)
            why = (f" It is provided by plugin '{same.name}' ({same.dist} {same.version}), which is "
                   f"{same.why_unavailable()}." if same is not None else "")
            raise KDZooError(
                f"Unknown dataset '{name}'.{suggest(name, self.datasets)}{why} Available datasets: "
                f"{', '.join(sorted(self.datasets)) or '(none)'} (`kdzoo datasets` lists them).")
        return self.datasets[name]

    def checkpoint_format(self, name: str) -> CheckpointFormat:
        """The foreign checkpoint format registered as ``name``; ``KDZooError`` with close matches otherwise
        (``kdzoo``, kdzoo's own format, is no plugin's and is not in the table)."""
        if name not in self.checkpoint_formats:
            off = [p for p in self.plugins if p.disabled or p.error]
            known = [NATIVE_FORMAT, *sorted(self.checkpoint_formats)]
            note = (" Not loaded: " + ", ".join(f"plugin '{p.name}' ({p.status})" for p in off)
                    + "; one of them may provide it (`kdzoo plugins` shows why)." if off else "")
            raise KDZooError(
                f"Unknown checkpoint format '{name}'.{suggest(name, known)} Available formats: {', '.join(known)} "
                f"({NATIVE_FORMAT}: a checkpoint written by `kdzoo train`; the others read teachers trained by "
                f"other code bases and come from plugins).{note}")
        return self.checkpoint_formats[name]

    def observer(self, name: str) -> type[Observer]:
        """The observer class registered as ``name``; ``KDZooError`` with close matches otherwise."""
        if name not in self.observers:
            off = [p for p in self.plugins if p.disabled or p.error]
            # kdzoo's own observer plugins are called NAME_observer (tensorboard_observer provides tensorboard)
            same = next((p for p in off if p.name in (name, f"{name}_observer")), None)
            why = (f" It is provided by plugin '{same.name}' ({same.dist} {same.version}), which is "
                   f"{same.why_unavailable()}." if same is not None else "")
            raise KDZooError(
                f"Unknown observer '{name}' (--log, loggers:).{suggest(name, self.observers)}{why} Available "
                f"observers: {', '.join(sorted(self.observers)) or '(none)'} (`kdzoo plugins` lists them; a package "
                "adds more through the register_observers hook).")
        return self.observers[name]

    def method(self, name: str) -> type[Method]:
        """The method class registered as ``name``; ``KDZooError`` with close matches otherwise."""
        if name not in self.methods:
            off = [p for p in self.plugins if p.disabled or p.error]
            # A disabled plugin was never imported, so what it registers is unknown; a plugin named like
            # the method (kd -> kd, rkd -> rkd, dkd -> dkd) is taken to provide it.
            same = next((p for p in off if p.name == name), None)
            if same is not None:
                raise KDZooError(f"Method '{name}' is provided by plugin '{same.name}' ({same.dist} {same.version}), "
                                 f"which is {same.why_unavailable()}.")
            note = ("Not loaded: " + ", ".join(f"plugin '{p.name}' ({p.status})" for p in off)
                    + "; one of them may provide it (`kdzoo plugins` shows why)." if off else
                    "Run `kdzoo plugins` to see which plugins are loaded, broken or disabled.")
            raise KDZooError(
                f"Unknown method '{name}'.{suggest(name, self.methods)} Available methods: "
                f"{', '.join(sorted(self.methods)) or '(none)'}. {note}"
            )
        return self.methods[name]

    def describe_origin(self, method: str) -> str:
        """``"plugin 'kd' (kdzoo 0.1.0)"``: where a registered method comes from, for error messages."""
        info = self.plugin(self.owner[("method", method)])
        return f"plugin '{info.name}' ({info.dist} {info.version})"

    def model_names(self, pattern: str | None = None) -> list[str]:
        """Every registered model name (families included), sorted; only those matching the glob ``pattern``."""
        names = sorted(self.models)
        return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names

    def create_model(self, name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
        """Build the backbone registered as ``name``; ``KDZooError`` for an unknown or clashing name."""
        if name not in self.models:
            unlisted = "".join(f" Plugin '{p}' is broken: {e}." for p, e in self.models.errors.items())
            raise KDZooError(
                f"Unknown model '{name}'.{suggest(name, self.models)}{unlisted} Run `kdzoo models '*{name[:4]}*'` "
                "to search the registered backbones, or `kdzoo plugins` to check that the backbone "
                "plugin is loaded."
            )
        factory = self.models[name]
        try:
            return factory(num_classes=num_classes, **kwargs)
        except KDZooError:
            raise
        except TypeError as e:
            raise KDZooError(
                f"Model '{name}' (from plugin '{self.owner[('model', name)]}') rejected its options "
                f"{kwargs}: {e}. Check the model options in your config."
            ) from e


def _selected(ep: EntryPoint, only: set[str] | None, disable: set[str]) -> bool:
    names = {ep.name, _dist_name(ep)}
    if names & disable:
        return False
    return only is None or bool(names & only)


def _dist_name(ep: EntryPoint) -> str:
    return ep.dist.name if ep.dist is not None else "?"


def _split_env(var: str) -> set[str] | None:
    value = os.environ.get(var)
    if value is None:
        return None
    return {s.strip() for s in value.split(",") if s.strip()}


def _format_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _unknown_names(candidates: list[tuple[str, PluginInfo, Callable[[], object]]], disable_arg: set[str],
                   env_disable: set[str], only_arg: set[str] | None, env_only: set[str] | None) -> list[str]:
    """One warning per name in -p no:NAME, KDZOO_DISABLE_PLUGINS, KDZOO_LOAD_PLUGINS or ``only`` that
    matches no plugin: a typo there silently disables or loads nothing."""
    plugins = sorted({info.name for _, info, _ in candidates})
    known = set(plugins) | {info.dist for _, info, _ in candidates if info.dist != "(in-process)"}
    out = []
    for where, names, effect in (("-p no:{}", disable_arg, "nothing was disabled"),
                                 (ENV_DISABLE, env_disable, "nothing was disabled"),
                                 (ENV_LOAD, env_only or set(), "nothing was loaded for it"),
                                 ("only=", only_arg or set(), "nothing was loaded for it")):
        for name in sorted(names - known):
            out.append(f"{where.format(name)}: no installed plugin is called '{name}', so {effect}."
                       f"{suggest(name, sorted(known))} Installed plugins: {', '.join(plugins) or '(none)'}.")
    return out


def discover() -> list[EntryPoint]:
    """Entry points of the ``kdzoo`` group, deduplicated, first-party (kdzoo's own) first."""
    seen: dict[tuple[str, str], EntryPoint] = {}
    for ep in entry_points(group=GROUP):
        seen.setdefault((ep.name, ep.value), ep)
    return sorted(seen.values(), key=lambda ep: (_dist_name(ep) != "kdzoo", ep.name))


def load_plugins(
    *,
    disable: Iterable[str] = (),
    only: Iterable[str] | None = None,
    strict: bool = False,
    extra: Iterable[tuple[str, object]] = (),
) -> Registry:
    """Discover, load and call every plugin; return what they registered.

    ``disable``/``only`` add to ``KDZOO_DISABLE_PLUGINS``/``KDZOO_LOAD_PLUGINS``. ``extra`` are
    ``(name, plugin_object)`` pairs registered as if from entry points (for tests and notebooks).
    """
    env_only, env_disable = _split_env(ENV_LOAD), _split_env(ENV_DISABLE) or set()
    only_arg, disable_arg = (None if only is None else set(only)), set(disable)
    only_set = None if only_arg is None and env_only is None else (only_arg or set()) | (env_only or set())
    disable_set = disable_arg | env_disable

    def disabled_by(names: set[str]) -> str:
        if names & disable_arg:
            return f"-p no:{min(names & disable_arg)}"
        return ENV_DISABLE if names & env_disable else ENV_LOAD if env_only is not None else "only="

    from kdzoo import methods as builtin_methods  # the builtin ce; imports torch

    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    pm.register(builtin_methods, name=BUILTIN)
    infos: dict[str, PluginInfo] = {BUILTIN: PluginInfo(BUILTIN, "kdzoo", __version__, "builtin")}

    candidates: list[tuple[str, PluginInfo, Callable[[], object]]] = []
    for ep in discover():
        info = PluginInfo(ep.name, _dist_name(ep), ep.dist.version if ep.dist else "?", ep.value)
        candidates.append((ep.name, info, ep.load))
        info.disabled = not _selected(ep, only_set, disable_set)
        info.disabled_by = disabled_by({ep.name, info.dist}) if info.disabled else ""
    for name, obj in extra:
        info = PluginInfo(name, "(in-process)", "-", repr(obj))
        info.disabled = name in disable_set
        info.disabled_by = disabled_by({name}) if info.disabled else ""
        candidates.append((name, info, lambda obj=obj: obj))
    warnings = _unknown_names(candidates, disable_arg, env_disable, only_arg, env_only)
    if warnings and strict:
        raise KDZooError(" ".join(warnings) + " (An error because of --strict-plugins.)")

    for name, info, load in candidates:
        if name in infos:
            info.error = f"another plugin is already called '{name}' (from {infos[name].dist})"
            infos[f"{name} ({info.dist})"] = info
            if strict:
                raise KDZooError(f"Plugin name clash: {info.error}.")
            continue
        infos[name] = info
        if info.disabled:
            continue
        try:
            pm.register(load(), name=name)
            pm.check_pending()
        except Exception as exc:  # a broken plugin must not take down the others
            if pm.get_plugin(name) is not None:
                pm.unregister(name=name)
            info.error = _format_error(exc)
            if strict:
                raise KDZooError(f"Plugin '{name}' ({info.dist}) failed to load: {info.error}") from exc

    registry = Registry(plugins=list(infos.values()), strict=strict)
    registry.warnings.extend(warnings)
    for name in [BUILTIN] + [n for n, i, _ in candidates if pm.get_plugin(n) is not None]:
        _collect(pm, name, infos[name], registry, strict)
    return registry


class _ModelRegister:
    """The ``register`` callback of ``register_models``: ``register(name, factory)`` and
    ``register.family(list_names, make_factory, description)`` (see :mod:`kdzoo.hookspecs`)."""

    def __init__(self, plugin: str) -> None:
        self.plugin = plugin
        self.factories: dict[str, ModelFactory] = {}
        self.families: list[ModelFamily] = []

    def __call__(self, name: str, factory: ModelFactory) -> None:
        if not callable(factory):
            raise TypeError(f"register('{name}', factory): factory is not callable")
        self.factories[name] = factory

    def family(self, list_names: Callable[[], Iterable[str]], make_factory: Callable[[str], ModelFactory],
               description: str) -> None:
        """Register the names ``list_names()`` returns, listed only when a model is first looked up or listed."""
        if not (callable(list_names) and callable(make_factory)):
            raise TypeError("register.family(list_names, make_factory, description): list_names and "
                            "make_factory must be callable")
        if not isinstance(description, str) or not description.strip():
            raise TypeError("register.family(...): description must be a non-empty string (`kdzoo plugins` shows it)")
        self.families.append(ModelFamily(self.plugin, list_names, make_factory, description.strip()))


def _collect(pm: pluggy.PluginManager, name: str, info: PluginInfo, registry: Registry, strict: bool) -> None:
    """Call one plugin's hooks; merge its registrations only if all of them succeed.

    Plain names are checked for clashes here; the names of a model family when it is first listed."""
    from kdzoo.methods import Method  # imported by load_plugins already

    from kdzoo.datasets import Dataset
    from kdzoo.observers import Observer

    methods: dict[str, type[Method]] = {}
    datasets: dict[str, type[Dataset]] = {}
    formats: dict[str, CheckpointFormat] = {}
    observers: dict[str, type[Observer]] = {}
    models = _ModelRegister(name)

    def class_register(kind: str, base: type, table: dict[str, type]) -> Callable[..., None]:
        """``register(cls, name=None)`` for a hook that registers subclasses of ``base`` (methods, datasets)."""
        def register(cls: type, name: str | None = None) -> None:
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise TypeError(f"register() expects a subclass of {base.__module__}.{base.__name__}, got {cls!r}")
            key = name or cls.name
            if not key:
                raise TypeError(f"{cls.__name__} has no name: set the class attribute `name` or pass name=")
            if key in table:
                raise ValueError(f"{kind} '{key}' registered twice")
            table[key] = cls
        return register

    register_method = class_register("method", Method, methods)
    register_dataset = class_register("dataset", Dataset, datasets)
    register_class_observer = class_register("observer", Observer, observers)

    def register_observer(cls: type, name: str | None = None) -> None:
        if isinstance(cls, type) and issubclass(cls, Observer) and not dataclasses.is_dataclass(cls.Options):
            raise TypeError(f"{cls.__name__}.Options must be a dataclass (its fields are the observer's options)")
        register_class_observer(cls, name)

    owner = name  # the plugin's name: register_format's own `name` parameter shadows it

    def register_format(name: str, convert: Callable[[str, Any], Mapping[str, Any]],
                        pretrained: Callable[..., Any] | None = None) -> None:
        if not (isinstance(name, str) and name.isidentifier() and name == name.lower()):
            raise TypeError(f"register({name!r}, convert): a checkpoint format's name must be a lowercase identifier "
                            "(it is written as `format: NAME` and --teacher-format NAME)")
        if name == NATIVE_FORMAT:
            raise ValueError(f"'{NATIVE_FORMAT}' is kdzoo's own checkpoint format; register another name")
        if not callable(convert) or (pretrained is not None and not callable(pretrained)):
            raise TypeError(f"register('{name}', convert, pretrained=None): convert (and pretrained, if given) "
                            "must be callable")
        if name in formats:
            raise ValueError(f"checkpoint format '{name}' registered twice")
        formats[name] = CheckpointFormat(name, owner, convert, pretrained)

    plugin = pm.get_plugin(name)
    try:
        for hook, callback in (("register_methods", register_method), ("register_models", models),
                               ("register_datasets", register_dataset),
                               ("register_checkpoint_formats", register_format),
                               ("register_observers", register_observer)):
            for impl in getattr(pm.hook, hook).get_hookimpls():
                if impl.plugin is plugin:
                    impl.function(register=callback)
        clashes = [("method", n, registry.owner[("method", n)]) for n in sorted(methods) if n in registry.methods]
        clashes += [("model", n, registry.models.registered_owner(n)) for n in sorted(models.factories)
                    if registry.models.registered_owner(n) is not None]
        clashes += [("dataset", n, registry.dataset_owner[n]) for n in sorted(datasets) if n in registry.datasets]
        clashes += [("checkpoint format", n, registry.checkpoint_format_owner[n]) for n in sorted(formats)
                    if n in registry.checkpoint_formats]
        clashes += [("observer", n, registry.observer_owner[n]) for n in sorted(observers) if n in registry.observers]
        if clashes:
            kind, clash, other = clashes[0]
            raise KDZooError(
                f"{kind} name clash: '{clash}' is registered by both plugin '{other}' "
                f"({registry.plugin(other).dist}) and plugin '{name}' ({info.dist}). "
                f"Disable one of them with -p no:NAME or {ENV_DISABLE}."
            )
    except Exception as exc:
        info.error = str(exc) if isinstance(exc, KDZooError) else f"hook raised {_format_error(exc)}"
        pm.unregister(name=name)
        if strict:
            raise KDZooError(f"Plugin '{name}' ({info.dist}) is broken: {info.error}") from exc
        return
    registry.methods.update(methods)
    registry._method_owner.update({k: name for k in methods})
    registry.datasets.update(datasets)
    registry.dataset_owner.update({k: name for k in datasets})
    info.datasets = sorted(datasets)
    registry.checkpoint_formats.update(formats)
    registry.checkpoint_format_owner.update({k: name for k in formats})
    info.checkpoint_formats = sorted(formats)
    registry.observers.update(observers)
    registry.observer_owner.update({k: name for k in observers})
    info.observers = sorted(observers)
    registry.models.add(name, models.factories, models.families)
    info.methods = sorted(methods)
    info.models = sorted(models.factories)
    info.model_families = [f.description for f in models.families]
