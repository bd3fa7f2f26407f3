"""Registers the ``torch`` HSTU attention backend (the reference every other backend is
tested against). The ``triton`` backend comes from :mod:`gauss_kernels.plugin`."""
from __future__ import annotations

from gauss_plugins.components import Component
from gauss_plugins.plugins import hookimpl


@hookimpl
def gauss_register_attention_backends():
    return [
        Component(
            kind="attention_backend",
            name="torch",
            factory="gauss_plugins.hstu.attention:TorchReferenceBackend",
            description="plain PyTorch HSTU attention (padded, dense masks), any device, all masks",
            priority=0,
        ),
    ]
