"""What a plugin registers: a :class:`Component` (kind, name, factory, availability check).

A component is cheap to describe and expensive to build: the factory may be given as an
import path (``"package.module:attribute"``) so that listing components never imports
triton, torchrec or ray. Availability is checked on demand and reported with a reason.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from gauss_plugins._optional import install_hint, is_installed

# The kinds of component, one hook each (see hookspecs.py).
KINDS = (
    "attention_backend",
    "embedding_store",
    "eviction_policy",
    "admission_policy",
    "cache_policy",
    "export_target",
    "table_backend",
    "sparse_optimizer",
    "dataset",
    "trainer",
    "elastic_launcher",
)


@dataclass(frozen=True)
class Availability:
    """Whether a component can be used here, and if not, why."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


AVAILABLE = Availability(True, "")

Factory = Union[str, Callable[..., Any]]
AvailabilityCheck = Callable[[], Availability]


def resolve_object(path: str) -> Any:
    """Import ``"package.module:attr.sub"`` and return the attribute."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected an import path 'package.module:attribute', got {path!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _module_file_exists(module_name: str) -> bool:
    """Whether ``a.b.c`` exists as a file, importing only the top-level package: a parent
    package may import a heavy framework (ray, torchrec) that a listing must not pay for."""
    top, *rest = module_name.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    if not rest:
        return True
    paths = list(spec.submodule_search_locations or [])
    for i, part in enumerate(rest):
        last = i == len(rest) - 1
        next_paths = []
        for base in paths:
            package_dir = os.path.join(base, part)
            if os.path.isfile(os.path.join(package_dir, "__init__.py")):
                next_paths.append(package_dir)
            elif last and os.path.isfile(os.path.join(base, part + ".py")):
                return True
        if not next_paths:
            return False
        paths = next_paths
    return True


@dataclass(frozen=True)
class Component:
    """One registered implementation of a kind (an attention backend, a store, a policy...).

    ``factory`` builds it (a callable or a lazy import path). ``check`` says whether it can
    run on this machine. ``supports`` (optional) says whether it handles a given call
    context, e.g. CUDA tensors only; automatic selection picks the available component of
    highest ``priority`` that supports the context.
    """

    kind: str
    name: str
    factory: Factory
    description: str = ""
    check: Optional[AvailabilityCheck] = None
    supports: Optional[Callable[..., bool]] = None
    priority: int = 0
    provider: str = ""  # filled in by the registry from the plugin that registered it
    plugin: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown component kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"a {self.kind} needs a non-empty string name, got {self.name!r}")
        if not (callable(self.factory) or isinstance(self.factory, str)):
            raise TypeError(f"{self.kind} {self.name!r}: factory must be callable or an import path string")

    def availability(self) -> Availability:
        """Whether this component can run here: its own check, then (for a lazy factory)
        whether the factory's module exists, so a listing never claims what cannot load."""
        if self.check is not None:
            try:
                result = self.check()
            except Exception as exc:  # a broken check must not break listing
                return Availability(False, f"availability check failed: {type(exc).__name__}: {exc}")
            if isinstance(result, bool):
                result = Availability(result, "" if result else "unavailable")
            if not result:
                return result
        if isinstance(self.factory, str):
            module_name = self.factory.partition(":")[0]
            if not _module_file_exists(module_name):
                return Availability(False, f"module {module_name} not found (incomplete installation)")
        return AVAILABLE

    def load(self) -> Any:
        """The factory itself (imported if it was given as a path)."""
        return resolve_object(self.factory) if isinstance(self.factory, str) else self.factory

    def create(self, *args: Any, **kwargs: Any) -> Any:
        avail = self.availability()
        if not avail:
            raise RuntimeError(f"{self.kind} {self.name!r} is not available here: {avail.reason}")
        return self.load()(*args, **kwargs)


# ---------------------------------------------------------------- availability checks
def requires_modules(*modules: str, extra: str) -> AvailabilityCheck:
    """Available when every module can be found; else the reason names the extra."""

    def check() -> Availability:
        missing = [m for m in modules if not is_installed(m)]
        if missing:
            return Availability(False, f"{', '.join(missing)} not installed ({install_hint(extra)})")
        return AVAILABLE

    return check


def requires_cuda() -> Availability:
    import torch

    if not torch.cuda.is_available():
        return Availability(False, "no CUDA device")
    return AVAILABLE


def all_of(*checks: AvailabilityCheck) -> AvailabilityCheck:
    """Available when every check passes; the first failing reason is reported."""

    def check() -> Availability:
        for c in checks:
            a = c()
            if not a:
                return a
        return AVAILABLE

    return check
