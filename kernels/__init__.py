"""gauss_kernels: Triton (and CUDA/C++) kernels of gauss-plugins.

Each kernel has a PyTorch reference in the core it is tested against, and a benchmark under
``benchmarks/``. Kernels are reached only through the plugin hooks: this package registers
them in :mod:`gauss_kernels.plugin` (entry point ``gauss_plugins: kernels``). Importing this
package imports neither triton nor a compiler.
"""
