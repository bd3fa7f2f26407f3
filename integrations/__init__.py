"""gauss_integrations: one adapter per ecosystem (TorchRec, Lightning, Ray, TorchX, Redis).

Each subpackage imports its framework and is importable only when the matching extra is
installed; otherwise the import fails with the ``pip install "gauss-plugins[...]"`` to run.
Components are registered in :mod:`gauss_integrations.plugin` (entry point
``integrations``) without importing any framework.
"""
