"""TorchX components of gauss-plugins (``pip install "gauss-plugins[torchx]"``).

``gauss.train``, ``gauss.export`` and ``gauss.serve_bench`` (:mod:`.components`) are found by
TorchX through this distribution's ``torchx.components`` entry point, so
``torchx run -s local_cwd gauss.export --checkpoint runs/x --out model.pt2`` works once the
package is installed; ``torchx builtins`` lists them beside TorchX's own.
"""
