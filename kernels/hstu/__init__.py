"""Fused HSTU attention kernels (Triton): forward, dK/dV and dQ, every mask mode.

:mod:`.triton_kernels` holds the ``@triton.jit`` kernels, :mod:`.triton_attention` the
backend (``hstu_attention_triton`` is the factory registered as attention backend
``triton``). Importing this package imports neither module, so listing backends stays cheap.
"""
