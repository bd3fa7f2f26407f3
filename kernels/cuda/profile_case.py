"""One forward and one backward of the CUDA HSTU kernels at the benchmark's N=4096 shape
(B=8, H=4, D=128, bf16, causal, lengths in [N/2, N]), for a profiler on the GPU machine::

    ncu --clock-control none -k regex:hstu_ --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats python3 kernels/cuda/profile_case.py
"""
from __future__ import annotations

import math

import torch

from gauss_kernels.hstu.cuda_attention import hstu_attention_cuda


def main() -> None:
    backend = hstu_attention_cuda()
    g = torch.Generator().manual_seed(0)
    B, N, H, D = 8, 4096, 4, 128
    lengths = torch.randint(N // 2, N + 1, (B,), generator=g)
    offsets = torch.zeros(B + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    T = int(offsets[-1])
    q, k, v, go = (torch.randn(T, H, D, generator=g).to("cuda", torch.bfloat16) for _ in range(4))
    offsets = offsets.cuda()
    opts = dict(max_seq_len=N, alpha=1 / math.sqrt(D))
    reason = backend.unsupported_reason(q, k, v, **opts)
    if reason is not None:
        raise SystemExit(f"cuda backend cannot run here: {reason}")
    backend.forward(q, k, v, offsets, **opts)
    backend.backward(go, q, k, v, offsets, compute_drab=False, **opts)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
