"""The plugin manager and the component registry built from it.

* Built-in core plugins are the modules in :data:`DEFAULT_PLUGINS`.
* Everything else arrives through the ``gauss_plugins`` entry point group, this
  distribution's own ``gauss_kernels`` and ``gauss_integrations`` included.
* ``GAUSS_PLUGINS_LOAD=a,b`` loads only the named entry-point plugins (empty: none; a name
  that no installed package provides is warned about);
  ``GAUSS_PLUGINS_DENY=a,b`` blocks the named plugins (built-ins too).
* ``GAUSS_TRACE_PLUGINS=1`` prints each hook call with its arguments and results.

Nothing here runs at import time: :func:`get_plugin_manager` and :func:`get_registry` build
on first use and cache; :func:`reset` drops the cache (tests build fresh ones).
"""
from __future__ import annotations

import functools
import os
import sys
import threading
import warnings
from dataclasses import dataclass, replace
from importlib import metadata
from typing import Any, Dict, Iterable, List, Optional

import pluggy

from gauss_plugins import hookspecs
from gauss_plugins.components import KINDS, Availability, Component

ENTRY_POINT_GROUP = "gauss_plugins"
PROJECT = "gauss_plugins"
CORE_DISTRIBUTION = "gauss-plugins"

# Core plugins: framework-neutral, importing only torch at most when their factories run.
DEFAULT_PLUGINS = (
    "gauss_plugins.embedding.plugin",
    "gauss_plugins.hstu.plugin",
    "gauss_plugins.stores.plugin",
    "gauss_plugins.data.plugin",
    "gauss_plugins.cache.plugin",
    "gauss_plugins.export.plugin",
)

# kind -> the registration hook that provides it
_KIND_HOOKS = {
    "attention_backend": "gauss_register_attention_backends",
    "table_backend": "gauss_register_table_backends",
    "embedding_store": "gauss_register_embedding_stores",
    "eviction_policy": "gauss_register_eviction_policies",
    "admission_policy": "gauss_register_admission_policies",
    "cache_policy": "gauss_register_cache_policies",
    "export_target": "gauss_register_export_targets",
    "sparse_optimizer": "gauss_register_sparse_optimizers",
    "dataset": "gauss_register_datasets",
    "trainer": "gauss_register_trainers",
    "elastic_launcher": "gauss_register_elastic_launchers",
}
assert set(_KIND_HOOKS) == set(KINDS)

hookimpl = pluggy.HookimplMarker(PROJECT)


class PluginLoadWarning(UserWarning):
    """The plugin environment variables name something that does not exist."""


@dataclass(frozen=True)
class PluginProblem:
    """A plugin that could not be loaded, and why (shown by ``gauss plugins``)."""

    name: str
    provider: str
    reason: str


def _env_list(var: str) -> Optional[List[str]]:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return [p.strip() for p in raw.split(",") if p.strip()]


class GaussPluginManager(pluggy.PluginManager):
    """A pluggy manager that remembers which distribution provided each plugin and which
    plugins failed to load."""

    def __init__(self) -> None:
        super().__init__(PROJECT)
        self.add_hookspecs(hookspecs)
        self.providers: Dict[str, str] = {}
        self.problems: List[PluginProblem] = []
        self.tracing = False

    def register_provided(self, plugin: Any, name: str, provider: str) -> None:
        self.register(plugin, name=name)
        self.providers[name] = provider


def _load_default_plugins(pm: GaussPluginManager, deny: List[str]) -> None:
    import importlib

    for modname in DEFAULT_PLUGINS:
        if modname in deny:
            continue
        try:
            module = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name == modname:  # a capability not shipped in this build
                continue
            pm.problems.append(PluginProblem(modname, CORE_DISTRIBUTION, f"import failed: {exc}"))
            continue
        except Exception as exc:
            pm.problems.append(PluginProblem(modname, CORE_DISTRIBUTION, f"import failed: {type(exc).__name__}: {exc}"))
            continue
        pm.register_provided(module, modname, CORE_DISTRIBUTION)


def _entry_points() -> Iterable[metadata.EntryPoint]:
    eps = metadata.entry_points()
    return eps.select(group=ENTRY_POINT_GROUP) if hasattr(eps, "select") else eps.get(ENTRY_POINT_GROUP, [])


def _load_entry_point_plugins(pm: GaussPluginManager, allow: Optional[List[str]], deny: List[str]) -> None:
    seen = set()
    for ep in _entry_points():
        if ep.name in seen:  # the same distribution found twice on sys.path
            continue
        seen.add(ep.name)
        provider = ep.dist.name if getattr(ep, "dist", None) is not None else "?"
        if ep.name in deny or (allow is not None and ep.name not in allow):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:
            pm.problems.append(PluginProblem(ep.name, provider, f"import of {ep.value} failed: {type(exc).__name__}: {exc}"))
            continue
        if pm.is_registered(plugin):
            continue
        pm.register_provided(plugin, ep.name, provider)
    unknown = [name for name in allow or () if name not in seen]
    if unknown:
        # A misspelt name would otherwise load nothing and say nothing.
        message = (f"GAUSS_PLUGINS_LOAD names {', '.join(map(repr, unknown))}, which no installed package provides; "
                   f"the {ENTRY_POINT_GROUP} entry points here are: {', '.join(sorted(seen)) or 'none'}")
        warnings.warn(message, PluginLoadWarning, stacklevel=3)
        pm.problems.append(PluginProblem(",".join(unknown), "GAUSS_PLUGINS_LOAD", message))


def _trace_call(hook_name: str, plugin_names: List[str], kwargs: Dict[str, Any]) -> None:
    print(f"[gauss-plugins] {hook_name}({kwargs}) -> {plugin_names}", file=sys.stderr)


def _trace_result(hook_name: str, result: Any) -> None:
    print(f"[gauss-plugins] {hook_name} returned {result!r}", file=sys.stderr)


def _trace(pm: GaussPluginManager) -> None:
    pm.tracing = True
    pm.add_hookcall_monitoring(
        lambda hook_name, hook_impls, kwargs: _trace_call(hook_name, [i.plugin_name for i in hook_impls], kwargs),
        lambda outcome, hook_name, hook_impls, kwargs: _trace_result(hook_name, outcome.get_result()),
    )


def create_plugin_manager(load_entry_points: bool = True) -> GaussPluginManager:
    """A new manager with the built-ins and (unless disabled) the entry-point plugins."""
    pm = GaussPluginManager()
    deny = _env_list("GAUSS_PLUGINS_DENY") or []
    _load_default_plugins(pm, deny)
    if load_entry_points:
        _load_entry_point_plugins(pm, _env_list("GAUSS_PLUGINS_LOAD"), deny)
    if os.environ.get("GAUSS_TRACE_PLUGINS"):
        _trace(pm)
    return pm


class Registry:
    """All components registered by the plugins of one manager, by kind and name."""

    def __init__(self, pm: GaussPluginManager) -> None:
        self.pm = pm
        self._by_kind: Dict[str, Dict[str, Component]] = {kind: {} for kind in KINDS}
        self.problems: List[PluginProblem] = list(pm.problems)
        for kind, hook_name in _KIND_HOOKS.items():
            hook = getattr(pm.hook, hook_name)
            # Each implementation is called on its own (not through ``hook()``) so that every
            # component is stamped with the plugin that returned it.
            for impl in hook.get_hookimpls():
                plugin_name = impl.plugin_name
                provider = pm.providers.get(plugin_name, "?")
                try:
                    if pm.tracing:
                        _trace_call(hook_name, [plugin_name], {})
                    result = impl.function()
                    if pm.tracing:
                        _trace_result(hook_name, result)
                except Exception as exc:
                    self.problems.append(PluginProblem(plugin_name, provider, f"{hook_name} raised {type(exc).__name__}: {exc}"))
                    continue
                for comp in result or ():
                    self._add(kind, comp, plugin_name, provider)

    def _add(self, kind: str, comp: Component, plugin_name: str, provider: str) -> None:
        if not isinstance(comp, Component) or comp.kind != kind:
            self.problems.append(PluginProblem(plugin_name, provider, f"returned {comp!r} from the {kind} hook"))
            return
        existing = self._by_kind[kind].get(comp.name)
        if existing is not None:
            self.problems.append(PluginProblem(
                plugin_name, provider,
                f"{kind} {comp.name!r} already registered by {existing.plugin} ({existing.provider}); ignored"))
            return
        self._by_kind[kind][comp.name] = replace(comp, plugin=plugin_name, provider=provider)

    # ------------------------------------------------------------------ queries
    def components(self, kind: Optional[str] = None) -> List[Component]:
        kinds = [kind] if kind is not None else list(KINDS)
        for k in kinds:
            self._check_kind(k)
        return [c for k in kinds for c in sorted(self._by_kind[k].values(), key=lambda c: (-c.priority, c.name))]

    def names(self, kind: str) -> List[str]:
        return [c.name for c in self.components(kind)]

    def get(self, kind: str, name: str) -> Component:
        self._check_kind(kind)
        try:
            return self._by_kind[kind][name]
        except KeyError:
            known = ", ".join(sorted(self._by_kind[kind])) or "none"
            raise KeyError(f"no {kind} named {name!r}; registered: {known} (see `gauss plugins`)") from None

    def select(self, kind: str, name: str = "auto", **context: Any) -> Component:
        """The component ``name``, or for ``"auto"`` the best available one for ``context``."""
        if name != "auto":
            comp = self.get(kind, name)
            avail = comp.availability()
            if not avail:
                raise RuntimeError(f"{kind} {name!r} is not available here: {avail.reason}")
            if comp.supports is not None and not comp.supports(**context):
                raise ValueError(f"{kind} {name!r} does not support this call ({_describe(context)})")
            return comp
        chosen = self.pm.hook.gauss_select_component(kind=kind, context=context)
        if chosen is not None:
            return self.select(kind, chosen, **context)
        reasons = []
        for comp in self.components(kind):
            avail = comp.availability()
            if not avail:
                reasons.append(f"{comp.name}: {avail.reason}")
                continue
            if comp.supports is None or comp.supports(**context):
                return comp
            reasons.append(f"{comp.name}: does not support {_describe(context)}")
        raise RuntimeError(f"no available {kind} for this call; " + ("; ".join(reasons) or "none registered"))

    def create(self, kind: str, name: str = "auto", *args: Any, **kwargs: Any) -> Any:
        """Build the component ``name`` of ``kind`` with the given arguments."""
        comp = self.select(kind, name)
        instance = comp.create(*args, **kwargs)
        self.pm.hook.gauss_component_created(component=comp, instance=instance)
        return instance

    def availability(self, kind: str, name: str) -> Availability:
        return self.get(kind, name).availability()

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown component kind {kind!r}; expected one of {', '.join(KINDS)}")


def _describe(context: Dict[str, Any]) -> str:
    parts = []
    for key, value in context.items():
        if hasattr(value, "device") and hasattr(value, "dtype"):
            parts.append(f"{key}: {value.dtype} on {value.device}")
        else:
            parts.append(f"{key}={value!r}")
    return ", ".join(parts) or "no context"


_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def _cached_manager() -> GaussPluginManager:
    return create_plugin_manager()


def get_plugin_manager() -> GaussPluginManager:
    """The process-wide plugin manager, built on first use."""
    with _lock:
        return _cached_manager()


_registry: Optional[Registry] = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use from :func:`get_plugin_manager`."""
    global _registry
    with _lock:
        if _registry is None:
            _registry = Registry(_cached_manager())
        return _registry


def reset() -> None:
    """Forget the cached manager and registry (after installing a plugin, or in tests)."""
    global _registry
    with _lock:
        _cached_manager.cache_clear()
        _registry = None
