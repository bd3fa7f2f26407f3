"""Every hook of gauss-plugins, in one place.

Plugins (built-in modules, the ``gauss_kernels`` and ``gauss_integrations`` packages of this
distribution, and third-party packages through the ``gauss_plugins`` entry point group)
implement these with ``@gauss_plugins.hookimpl``. Built-in components come in through the
very same hooks as third-party ones.

The registration hooks are called once per registry build; each implementation returns a
list of :class:`gauss_plugins.components.Component` (or ``None``). The registry stamps each
component with the plugin and the distribution that provided it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence

import pluggy

if TYPE_CHECKING:
    from gauss_plugins.components import Component

hookspec = pluggy.HookspecMarker("gauss_plugins")


# -------------------------------------------------------------------------
# Registration: which components exist
# -------------------------------------------------------------------------


@hookspec
def gauss_register_attention_backends() -> Optional[Sequence["Component"]]:
    """Register HSTU attention backends (kind ``attention_backend``).

    Called when the registry is built. A backend's factory returns a callable with the
    signature of :func:`gauss_plugins.hstu.attention.hstu_attention_reference`. ``supports``
    receives the call's tensors and mask options as keyword arguments and says whether this
    backend handles them (e.g. CUDA tensors only); ``hstu_attention(..., backend="auto")``
    picks the available supporting backend of highest priority.
    """


@hookspec
def gauss_register_table_backends() -> Optional[Sequence["Component"]]:
    """Register hash-index backends of dynamic embedding tables (kind ``table_backend``).

    A backend implements find / insert / gather of int64 keys on one device type (a
    vectorized torch index, a compiled CPU op, a Triton probe kernel on CUDA). Called when
    the registry is built; selection is automatic by priority and ``supports(device=...)``.
    """


@hookspec
def gauss_register_embedding_stores() -> Optional[Sequence["Component"]]:
    """Register embedding stores (kind ``embedding_store``): training stores (TierPS) and
    inference stores (WePS embedded, Redis). The factory takes the store's config as keyword
    arguments and returns an object with batched ``get`` / ``put`` / ``delete`` by id."""


@hookspec
def gauss_register_eviction_policies() -> Optional[Sequence["Component"]]:
    """Register eviction policies (kind ``eviction_policy``) for dynamic tables: LRU, LFU,
    TTL, custom scores. The factory takes the policy options as keyword arguments."""


@hookspec
def gauss_register_admission_policies() -> Optional[Sequence["Component"]]:
    """Register admission policies (kind ``admission_policy``) deciding when a new id gets a
    row: after N sightings, with probability p, always."""


@hookspec
def gauss_register_cache_policies() -> Optional[Sequence["Component"]]:
    """Register embedding-cache policies (kind ``cache_policy``) of the Gauss strategy, e.g.
    the Bagpipe-style lookahead cache that prefetches rows of future batches."""


@hookspec
def gauss_register_export_targets() -> Optional[Sequence["Component"]]:
    """Register export targets (kind ``export_target``): ways to turn a trained model into a
    serving artifact, e.g. an AOTInductor ``.pt2`` package."""


@hookspec
def gauss_register_sparse_optimizers() -> Optional[Sequence["Component"]]:
    """Register fused sparse optimizers (kind ``sparse_optimizer``) that keep their state in
    the embedding row: SGD, Adagrad, row-wise Adagrad, Adam."""


@hookspec
def gauss_register_datasets() -> Optional[Sequence["Component"]]:
    """Register event sources (kind ``dataset``): MovieLens loaders, sequence files, the
    synthetic stream. The factory takes the dataset options and returns per-user sequences."""


@hookspec
def gauss_register_trainers() -> Optional[Sequence["Component"]]:
    """Register training loops (kind ``trainer``), e.g. the Lightning integration's.

    The core never imports a training framework: ``gauss train``, ``gauss demo`` and
    :mod:`gauss_plugins.train.compare` get their loop from the registry through
    :func:`gauss_plugins.train.trainers.get_trainer`. A trainer's factory is a callable
    ``run(config, output_dir, progress=True, log=print, sequences=None) -> dict`` that
    trains and evaluates an :class:`~gauss_plugins.train.config.ExperimentConfig`, writes
    ``metrics.json``, ``report.json`` and a checkpoint into ``output_dir``, and returns the
    flat ``val/...`` and ``test/...`` metrics. Its availability check names what is missing
    (``gauss plugins`` shows it), e.g. the extra to install.
    """


@hookspec
def gauss_register_elastic_launchers() -> Optional[Sequence["Component"]]:
    """Register elastic launchers (kind ``elastic_launcher``), e.g. the Ray integration's.

    ``gauss elastic status|scale`` reaches a running job's coordinator through the registry:
    a launcher's factory is ``get_coordinator(name) -> handle`` of the running job named
    ``name`` (the handle has ``status()`` and ``set_target(n)`` as remote methods), raising a
    clear error when none runs. Its availability check names the extra to install.
    """


# -------------------------------------------------------------------------
# Setup: preparing this machine
# -------------------------------------------------------------------------


@hookspec
def gauss_build_extensions() -> Optional[Sequence[dict]]:
    """Compile now what the plugin would otherwise compile on first use (C++ ops).

    Called by ``gauss build`` (at install, in CI, or before a timed run). Each result is a
    dict ``{"name", "path", "built", "seconds"}``: what was built, where it is cached,
    whether this call compiled it (``False``: the cache had it), and how long that took.
    Raise with a message saying what to fix when it cannot be built.
    """


# -------------------------------------------------------------------------
# Runtime: called while components are being used
# -------------------------------------------------------------------------


@hookspec(firstresult=True)
def gauss_select_component(kind: str, context: dict) -> Optional[str]:
    """Choose the component name for ``kind`` when the caller asked for ``"auto"``.

    ``context`` holds what the caller knows (device, dtype, shapes). Stops at the first
    non-None result; with no answer the registry picks the available component of highest
    priority whose ``supports`` accepts the context.
    """


@hookspec
def gauss_component_created(component: "Component", instance: Any) -> None:
    """Called after a component was built through the registry, with the component and the
    object its factory returned (for logging, metrics, or wiring plugins together)."""
