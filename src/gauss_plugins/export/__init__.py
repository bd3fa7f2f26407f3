"""Serving artifacts of a trained model: AOTInductor ``.pt2`` rankers, frozen embedding
snapshots, the parity check between eager and compiled, and a Python predictor.

* :mod:`.snapshot`: the ``.gsnp`` file of frozen item-embedding rows (read by the C++ runner too).
* :mod:`.program`: the ranker program (history + candidates -> scores; retrieval or M-FALCON head).
* :mod:`.aoti`: ``torch.export`` + ``aoti_compile_and_package`` with metadata and the parity check.
* :mod:`.predictor`: load a ``.pt2``, fetch rows, rank requests.

Submodules are imported on use: compiling pulls in ``torch._inductor``, which a reader of
snapshots does not need.
"""
