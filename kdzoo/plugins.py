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
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Callable, Iterable

import pluggy
from torch import nn

from kdzoo import KDZooError, __version__, hookspecs
from kdzoo import methods as builtin_methods
from kdzoo.methods import Method, suggest

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
    models: list[str] = field(default_factory=list)
    error: str | None = None
    disabled: bool = False

    @property
    def status(self) -> str:
        return "disabled" if self.disabled else "broken" if self.error else "ok"


@dataclass
class Registry:
    """What the loaded plugins registered: methods and model factories by name, with owners."""

    plugins: list[PluginInfo]
    methods: dict[str, type[Method]] = field(default_factory=dict)
    models: dict[str, Callable[..., nn.Module]] = field(default_factory=dict)
    owner: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, name) -> plugin name

    def plugin(self, name: str) -> PluginInfo:
        return next(p for p in self.plugins if p.name == name)

    def method(self, name: str) -> type[Method]:
        """The method class registered as ``name``; ``KDZooError`` with close matches otherwise."""
        if name not in self.methods:
            raise KDZooError(
                f"Unknown method '{name}'.{suggest(name, self.methods)} Available methods: "
                f"{', '.join(sorted(self.methods)) or '(none)'}. Run `kdzoo plugins` to see "
                "which plugins are loaded, broken or disabled."
            )
        return self.methods[name]

    def describe_origin(self, method: str) -> str:
        """``"plugin 'kd' (kdzoo 0.1.0)"``: where a registered method comes from, for error messages."""
        info = self.plugin(self.owner[("method", method)])
        return f"plugin '{info.name}' ({info.dist} {info.version})"

    def model_names(self, pattern: str | None = None) -> list[str]:
        names = sorted(self.models)
        return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names

    def create_model(self, name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
        """Build the backbone registered as ``name``."""
        if name not in self.models:
            raise KDZooError(
                f"Unknown model '{name}'.{suggest(name, self.models)} Run `kdzoo models '*{name[:4]}*'` "
                "to search the registered backbones, or `kdzoo plugins` to check that the backbone "
                "plugin is loaded."
            )
        try:
            return self.models[name](num_classes=num_classes, **kwargs)
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
    env_only = _split_env(ENV_LOAD)
    only_set = None if only is None and env_only is None else set(only or ()) | (env_only or set())
    disable_set = set(disable) | (_split_env(ENV_DISABLE) or set())

    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    pm.register(builtin_methods, name=BUILTIN)
    infos: dict[str, PluginInfo] = {BUILTIN: PluginInfo(BUILTIN, "kdzoo", __version__, "builtin")}

    candidates: list[tuple[str, PluginInfo, Callable[[], object]]] = []
    for ep in discover():
        info = PluginInfo(ep.name, _dist_name(ep), ep.dist.version if ep.dist else "?", ep.value)
        candidates.append((ep.name, info, ep.load))
        info.disabled = not _selected(ep, only_set, disable_set)
    for name, obj in extra:
        info = PluginInfo(name, "(in-process)", "-", repr(obj))
        info.disabled = name in disable_set
        candidates.append((name, info, lambda obj=obj: obj))

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

    registry = Registry(plugins=list(infos.values()))
    for name in [BUILTIN] + [n for n, i, _ in candidates if pm.get_plugin(n) is not None]:
        _collect(pm, name, infos[name], registry, strict)
    return registry


def _collect(pm: pluggy.PluginManager, name: str, info: PluginInfo, registry: Registry, strict: bool) -> None:
    """Call one plugin's hooks; merge its registrations only if all of them succeed."""
    methods: dict[str, type[Method]] = {}
    models: dict[str, Callable[..., nn.Module]] = {}

    def register_method(cls: type[Method], name: str | None = None) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"register() expects a subclass of kdzoo.methods.Method, got {cls!r}")
        key = name or cls.name
        if not key:
            raise TypeError(f"{cls.__name__} has no name: set the class attribute `name` or pass name=")
        if key in methods:
            raise ValueError(f"method '{key}' registered twice")
        methods[key] = cls

    def register_model(key: str, factory: Callable[..., nn.Module]) -> None:
        if not callable(factory):
            raise TypeError(f"register('{key}', factory): factory is not callable")
        models[key] = factory

    plugin = pm.get_plugin(name)
    try:
        for hook, callback in (("register_methods", register_method), ("register_models", register_model)):
            for impl in getattr(pm.hook, hook).get_hookimpls():
                if impl.plugin is plugin:
                    impl.function(register=callback)
        for kind, found, table in (("method", methods, registry.methods), ("model", models, registry.models)):
            clashes = sorted(set(found) & set(table))
            if clashes:
                other = registry.owner[(kind, clashes[0])]
                raise KDZooError(
                    f"{kind} name clash: '{clashes[0]}' is registered by both plugin '{other}' "
                    f"({registry.plugin(other).dist}) and plugin '{name}' ({info.dist}). "
                    f"Disable one of them with -p no:NAME or {ENV_DISABLE}."
                )
    except Exception as exc:
        info.error = str(exc) if isinstance(exc, KDZooError) else f"hook raised {_format_error(exc)}"
        pm.unregister(name=name)
        if strict:
            raise KDZooError(f"Plugin '{name}' ({info.dist}) is broken: {info.error}") from exc
        return
    for kind, found, table in (("method", methods, registry.methods), ("model", models, registry.models)):
        table.update(found)
        registry.owner.update({(kind, k): name for k in found})
    info.methods = sorted(methods)
    info.models = sorted(models)

