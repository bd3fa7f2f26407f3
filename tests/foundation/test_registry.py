"""The plugin registry: built-ins, selection, env allow/deny lists, tracing, bad input."""
from __future__ import annotations

import types

import pytest
import torch

from gauss_plugins import Availability, Component, hookimpl
from gauss_plugins.components import requires_modules
from gauss_plugins.plugins import GaussPluginManager, Registry, create_plugin_manager


def _plugin(name: str, *components: Component):
    """A plugin module object registering ``components`` through the policy hooks."""
    mod = types.ModuleType(name)

    def reg(kind):
        return [c for c in components if c.kind == kind]

    mod.gauss_register_eviction_policies = hookimpl(lambda: reg("eviction_policy"))
    mod.gauss_register_attention_backends = hookimpl(lambda: reg("attention_backend"))
    return mod


def _registry_with(*plugins) -> Registry:
    """A registry of only these plugins (no built-ins, no entry points)."""
    pm = GaussPluginManager()
    for i, p in enumerate(plugins):
        pm.register_provided(p, f"test{i}", "test-dist")
    return Registry(pm)


def test_distribution_plugins_come_through_entry_points(fresh_registry):
    reg = fresh_registry.get_registry()
    plugin_names = {name for name, _ in reg.pm.list_name_plugin()}
    assert {"kernels", "integrations"} <= plugin_names
    triton = reg.get("attention_backend", "triton")
    assert triton.provider == "gauss-plugins" and triton.plugin == "kernels"
    if not torch.cuda.is_available():
        avail = triton.availability()
        assert not avail.ok and ("CUDA" in avail.reason or "triton" in avail.reason)


def test_auto_selection_prefers_priority_and_respects_supports():
    calls = []
    fast = Component("attention_backend", "fast", lambda: "fast", priority=10,
                     supports=lambda **ctx: ctx.get("device") == "cuda")
    slow = Component("attention_backend", "slow", lambda: "slow", priority=0)
    reg = _registry_with(_plugin("p", fast, slow))
    assert reg.select("attention_backend", device="cuda").name == "fast"
    assert reg.select("attention_backend", device="cpu").name == "slow"
    with pytest.raises(ValueError, match="does not support"):
        reg.select("attention_backend", "fast", device="cpu")
    assert reg.create("attention_backend", "slow") == "slow"


def test_unavailable_component_reports_reason_and_is_skipped():
    broken = Component("eviction_policy", "needs_x", lambda: 1, priority=5,
                       check=requires_modules("surely_not_a_module_xyz", extra="redis"))
    ok = Component("eviction_policy", "ok", lambda: 2)
    reg = _registry_with(_plugin("p", broken, ok))
    avail = reg.availability("eviction_policy", "needs_x")
    assert not avail and 'pip install "gauss-plugins[redis]"' in avail.reason
    assert reg.select("eviction_policy").name == "ok"
    with pytest.raises(RuntimeError, match="not available here"):
        reg.create("eviction_policy", "needs_x")


def test_duplicate_names_are_reported_not_overwritten():
    a = Component("eviction_policy", "lru", lambda: "first")
    b = Component("eviction_policy", "lru", lambda: "second")
    reg = _registry_with(_plugin("p1", a), _plugin("p2", b))
    assert reg.create("eviction_policy", "lru") == "first"
    assert any("already registered" in p.reason for p in reg.problems)


def test_bad_queries_give_clear_errors():
    reg = _registry_with()
    with pytest.raises(ValueError, match="unknown component kind"):
        reg.components("no_such_kind")
    with pytest.raises(KeyError, match="gauss plugins"):
        reg.get("eviction_policy", "missing")
    with pytest.raises(ValueError, match="unknown component kind"):
        Component("nope", "x", lambda: 0)
    with pytest.raises(TypeError):
        Component("eviction_policy", "x", 42)


def test_failing_hook_is_a_problem_not_a_crash():
    mod = types.ModuleType("bad")

    @hookimpl
    def gauss_register_cache_policies():
        raise RuntimeError("boom")

    mod.gauss_register_cache_policies = gauss_register_cache_policies
    reg = _registry_with(mod)
    assert reg.components("cache_policy") == []
    assert any("boom" in p.reason for p in reg.problems)


def test_select_hook_overrides_auto():
    a = Component("eviction_policy", "a", lambda: "a", priority=10)
    b = Component("eviction_policy", "b", lambda: "b")
    chooser = types.ModuleType("chooser")
    chooser.gauss_select_component = hookimpl(lambda kind, context: "b" if kind == "eviction_policy" else None)
    reg = _registry_with(_plugin("p", a, b), chooser)
    assert reg.select("eviction_policy").name == "b"


def test_deny_and_allow_lists(monkeypatch, fresh_registry):
    monkeypatch.setenv("GAUSS_PLUGINS_DENY", "kernels")
    names = {n for n, _ in create_plugin_manager().list_name_plugin()}
    assert "kernels" not in names and "integrations" in names
    monkeypatch.delenv("GAUSS_PLUGINS_DENY")
    monkeypatch.setenv("GAUSS_PLUGINS_LOAD", "kernels")
    names = {n for n, _ in create_plugin_manager().list_name_plugin()}
    assert "kernels" in names and "integrations" not in names
    monkeypatch.setenv("GAUSS_PLUGINS_LOAD", "")
    names = {n for n, _ in create_plugin_manager().list_name_plugin()}
    assert not names & {"kernels", "integrations"}


def test_trace_prints_hook_calls(monkeypatch, capsys):
    monkeypatch.setenv("GAUSS_TRACE_PLUGINS", "1")
    Registry(create_plugin_manager())
    err = capsys.readouterr().err
    assert "gauss_register_attention_backends" in err and "returned" in err


def test_availability_of_lazy_factory_checks_the_module_exists():
    comp = Component("export_target", "ghost", "gauss_plugins.no_such_module:thing")
    avail = comp.availability()
    assert not avail and "not found" in avail.reason
    assert Component("export_target", "real", "gauss_plugins.cli:main").availability().ok
    assert Component("export_target", "plain", lambda: 1, check=lambda: False).availability() == Availability(False, "unavailable")
