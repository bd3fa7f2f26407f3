"""Shared HSTU attention test inputs: the mask modes and a maker of random jagged inputs.

Loaded by path from the test files (pytest runs with --import-mode=importlib)."""
from __future__ import annotations

import torch

from gauss_plugins.jagged import lengths_to_offsets


MODES = {
    "causal": dict(),
    "not causal": dict(causal=False),
    "targets": dict(targets=True),
    "contextual": dict(contextual_len=2),
    "window": dict(max_attn_len=2),
    "everything": dict(targets=True, contextual_len=1, max_attn_len=3),
    "not causal + targets + window": dict(causal=False, targets=True, max_attn_len=2),
    "rab full": dict(rab=(None, None)),
    "rab shared by heads": dict(rab=(None, 1), targets=True),
    "rab shared by batch": dict(rab=(1, None), contextual_len=1),
    "seq_len normaliser": dict(normalizer="seq_len", targets=True),
}


def make_inputs(seed, mode, dtype=torch.float32, lengths=(4, 0, 6, 1, 5), heads=2, d_qk=3, d_v=2, max_seq_len=7):
    g = torch.Generator().manual_seed(seed)
    lengths_t = torch.tensor(lengths)
    offsets = lengths_to_offsets(lengths_t)
    total = int(offsets[-1])
    q = torch.randn(total, heads, d_qk, generator=g, dtype=dtype)
    k = torch.randn(total, heads, d_qk, generator=g, dtype=dtype)
    v = torch.randn(total, heads, d_v, generator=g, dtype=dtype)
    contextual = mode.get("contextual_len", 0)
    num_targets = None
    if mode.get("targets"):
        # keep targets out of the contextual prefix
        num_targets = torch.tensor([int(torch.randint(0, max(n - contextual, 0) + 1, (), generator=g))
                                    for n in lengths])
    rab = None
    if "rab" in mode:
        rb, rh = mode["rab"]
        rab = torch.randn(rb or len(lengths), rh or heads, max_seq_len, max_seq_len, generator=g, dtype=dtype)
    options = dict(max_seq_len=max_seq_len, alpha=0.7, causal=mode.get("causal", True), num_targets=num_targets,
                   contextual_len=contextual, max_attn_len=mode.get("max_attn_len", 0), rab=rab,
                   normalizer=mode.get("normalizer", "max_seq_len"))
    return q, k, v, offsets, list(lengths), options


# relative-bias tables on top of a mask mode: (mode in MODES, position table extra length
# L - max_seq_len or None, number of time buckets or None)
TABLE_MODES = {
    "position": ("causal", 0, None),
    "position, long table": ("targets", 3, None),
    "time": ("causal", None, 12),
    "position+time": ("causal", 0, 12),
    "position+time, targets": ("targets", 1, 9),
    "position+time, contextual": ("contextual", 0, 9),
    "position+time, window": ("window", 2, 9),
    "position+time, everything": ("everything", 0, 6),
    "position+time, not causal + targets + window": ("not causal + targets + window", 0, 6),
    "position+time + rab": ("rab shared by heads", 0, 6),
    "position+time, seq_len normaliser": ("seq_len normaliser", 0, 6),
}


def make_tables(seed, offsets, max_seq_len, position, time_buckets, dtype=torch.float32):
    """position_bias [2 (max_seq_len + position) - 1], time_bias [time_buckets + 1] and jagged
    increasing int64 timestamps (gaps 0..~3000 s: several buckets, ties too); None where absent."""
    g = torch.Generator().manual_seed(seed + 1000)
    tables = dict(position_bias=None, time_bias=None, timestamps=None)
    if position is not None:
        tables["position_bias"] = torch.randn(2 * (max_seq_len + position) - 1, generator=g, dtype=dtype)
    if time_buckets is not None:
        tables["time_bias"] = torch.randn(time_buckets + 1, generator=g, dtype=dtype)
        total = int(offsets[-1])
        gaps = (torch.rand(total, generator=g) ** 3 * 3000).to(torch.int64)
        lengths = (offsets[1:] - offsets[:-1]).tolist()
        tables["timestamps"] = torch.cat([torch.zeros(0, dtype=torch.int64)] + [
            torch.cumsum(part, 0) + 1_600_000_000 for part in torch.split(gaps, lengths)])
    return tables
