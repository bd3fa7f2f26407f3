"""Hash-index backends of dynamic embedding tables.

* :mod:`gauss_kernels.hash_table.cpu_ext` — ``CpuHashIndex``, a compiled C++ op (CPU).
* :mod:`gauss_kernels.hash_table.triton_index` — ``TritonHashIndex`` (CUDA).

Both implement :class:`gauss_plugins.embedding.index.HashIndex`; the reference they are
tested against is :class:`gauss_plugins.embedding.index.TorchHashIndex`. Importing this
package compiles nothing and imports neither triton nor a compiler.
"""
