"""HSTU (Hierarchical Sequential Transduction Units) on jagged sequences.

* :mod:`.attention`: the mask, the reference, and :func:`hstu_attention` (dispatching to
  the ``attention_backend`` plugins; a ``torch.library`` custom op when traced).
* :mod:`.modules`: :class:`HSTUBlock`, :class:`HSTUEncoder` and their :class:`HSTUConfig`.
* :mod:`.mfalcon`: :class:`MFalcon` candidate scoring with a cached history.

Names are imported on first use, so that loading this package's plugin (to list the
backends) does not register the custom ops or build modules.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AttentionBackend": "attention",
    "attention_mask": "attention",
    "hstu_attention": "attention",
    "hstu_attention_reference": "attention",
    "hstu_attention_reference_backward": "attention",
    "relative_bias_dense": "attention",
    "HSTUBlock": "modules",
    "HSTUConfig": "modules",
    "HSTUEncoder": "modules",
    "PaddedHSTUEncoder": "modules",
    "RelativeAttentionBias": "modules",
    "HistoryCache": "mfalcon",
    "MFalcon": "mfalcon",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
