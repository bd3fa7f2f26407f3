"""A small case for ``compute-sanitizer --tool memcheck`` on the GPU machine::

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 kernels/cuda/memcheck_case.py

Runs the CUDA HSTU kernels (forward, dQ, dK/dV, position-bias gradient) once per dtype and
head dim on short jagged sequences whose lengths are not multiples of the tiles (a
sequence of 1, one empty, targets, max_seq_len above every length), so every boundary path
is exercised, at a short and a long max_seq_len; exits non-zero when the backend cannot run here or an output is not finite.
"""
from __future__ import annotations

import sys

import torch

from gauss_kernels.hstu.cuda_attention import hstu_attention_cuda


def main() -> int:
    backend = hstu_attention_cuda()
    g = torch.Generator().manual_seed(0)
    # a short batch (the kernels' short-sequence tiles) and a longer one (the long tiles)
    for lengths, n in (([1, 0, 70, 129, 17], 133), ([300, 1, 257, 0, 33], 301)):
        if check(backend, g, lengths, n):
            return 1
    return 0


def check(backend, g, lengths, n) -> int:
    offsets = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), device="cuda")
    T, H = sum(lengths), 2
    num_targets = torch.tensor([min(x, t) for x, t in zip(lengths, (1, 0, 5, 64, 2))], device="cuda")
    table = torch.randn(2 * n + 3, generator=g).cuda()
    for dtype in (torch.bfloat16, torch.float16):
        for d in (64, 128):
            q, k, v, go = (torch.randn(T, H, d, generator=g).to("cuda", dtype) for _ in range(4))
            opts = dict(max_seq_len=n, alpha=1 / d ** 0.5, num_targets=num_targets, position_bias=table)
            reason = backend.unsupported_reason(q, k, v, **opts)
            if reason is not None:
                print(f"cuda backend cannot run here: {reason}", file=sys.stderr)
                return 1
            out = backend.forward(q, k, v, offsets, **opts)
            dq, dk, dv, _, dpos, _ = backend.backward(go, q, k, v, offsets, compute_drab=False, **opts)
            torch.cuda.synchronize()
            for name, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv), ("dpos", dpos)):
                if not torch.isfinite(x).all():
                    print(f"{dtype} d={d}: {name} is not finite", file=sys.stderr)
                    return 1
            print(f"{dtype} d={d} max_seq_len={n}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
