"""HSTU (Hierarchical Sequential Transduction Units) on jagged sequences.

* :mod:`.attention`: the mask, the reference, and ``hstu_attention`` (a custom op
  dispatching to the ``attention_backend`` plugins).
* :mod:`.modules`: ``HSTUBlock`` / ``HSTUEncoder`` and their ``HSTUConfig``.
* :mod:`.mfalcon`: M-FALCON candidate scoring with a cached history.
"""
from gauss_plugins.hstu.attention import (
    AttentionBackend,
    attention_mask,
    hstu_attention,
    hstu_attention_reference,
    hstu_attention_reference_backward,
)

__all__ = [
    "AttentionBackend",
    "attention_mask",
    "hstu_attention",
    "hstu_attention_reference",
    "hstu_attention_reference_backward",
]
