"""A small case for ``compute-sanitizer --tool memcheck`` on the GPU machine::

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 kernels/cuda/memcheck_case.py

Runs the CUDA HSTU kernels (forward, dQ, dK/dV, position-bias gradient) once per dtype and
head dim on short jagged sequences whose lengths are not multiples of the tiles (a
sequence of 1, one empty, targets, max_seq_len above every length), so every boundary path
is exercised; exits non-zero when the backend cannot run here or an output is not finite.
"""
from __future__ import annotations

import sys

import torch

from gauss_kernels.hstu.cuda_attention import hstu_attention_cuda


def main() -> int:
    backend = hstu_attention_cuda()
    g = torch.Generator().manual_seed(0)
    lengths = [1, 0, 70, 129, 17]
    offsets = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), device="cuda")
    T, H, n = sum(lengths), 2, 133
    num_targets = torch.tensor([1, 0, 5, 64, 2], device="cuda")
    table = torch.randn(2 * n + 3, generator=g).cuda()
    for dtype in (torch.bfloat16, torch.float16):
        for d in (64, 128):
            q, k, v, go = (torch.randn(T, H, d, generator=g).to("cuda", dtype) for _ in range(4))
            opts = dict(max_seq_len=n, alpha=1 / d ** 0.5, num_targets=num_targets, position_bias=table)
            reason = backend.unsupported_reason(q, k, v, **opts)
            if reason is not None:
                print(f"cuda backend cannot run here: {reason}", file=sys.stderr)
                return 2
            out = backend.forward(q, k, v, offsets, **opts)
            dq, dk, dv, _, dpos, _ = backend.backward(go, q, k, v, offsets, compute_drab=False, **opts)
            torch.cuda.synchronize()
            for name, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv), ("dpos", dpos)):
                if not torch.isfinite(x).all():
                    print(f"{dtype} d={d}: {name} is not finite", file=sys.stderr)
                    return 1
            print(f"{dtype} d={d}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
