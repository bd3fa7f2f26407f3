"""``DynamicEmbeddingTable``: raw int64 ids -> rows of dimension D, without collisions.

Lookup API (the names other modules use)::

    table = DynamicEmbeddingTable(DynamicTableConfig(name="items", dim=64, optimizer=OptimizerConfig("adam")))
    out = table(ids)                                    # == table.lookup(ids): float32[*ids.shape, D]
    pooled = table.lookup_pooled(ids, offsets, mode="sum", per_sample_weights=None)   # float32[B, D]

* ``ids``: int64 on the table's device, any values (negatives included). ``offsets``: int64
  ``[B + 1]`` with ``offsets[0] == 0`` and ``offsets[-1] == len(ids)`` (KeyedJaggedTensor's
  convention): bag ``b`` is ``ids[offsets[b]:offsets[b+1]]``; empty bags pool to zeros.
* Training mode (``table.train()``) inserts ids that are absent, subject to the admission
  policy; eval mode never changes the table. Ids without a row read the default: zeros,
  or the shared trainable "unknown" row (``default="unknown"``).
* Outputs are differentiable: backward records the gradients on the table; a
  :class:`~gauss_plugins.embedding.optim.SparseOptimizer` applies them (repeated ids summed).
  The table holds no ``nn.Parameter``: dense optimizers never see it.

Direct access: ``remap(ids) -> rows`` (a lookup without the gather),
``find(ids) -> rows`` (-1 absent), ``get(ids) -> (values, present)``,
``set(ids, values)``, ``delete(ids)``, ``evict(num=None, ids=None)``, ``len(table)``.

Change tracking (stores, the WePS syncer, incremental checkpoints)::

    v = table.version                                   # monotonically increasing
    ...                                                 # training
    ids, values, opt_state = table.changed_since(v)     # rows inserted, updated or written since v
    gone = table.evicted_since(v)                       # ids evicted or deleted since v (not live now)

Both cost O(rows changed / evicted since ``v``), not O(table): every mutation appends the
rows it stamps to a bounded change log (see :mod:`gauss_plugins.embedding.tracking`); a
``v`` older than the log reaches back falls back to one full scan.

Every mutation (a training lookup, an optimizer step, set, delete, evict, growth) advances
``version``; a row it inserts, updates or writes is stamped with the new version (so is a
row a training lookup reads when the eviction policy records reads, as LFU and TTL do:
their per-row state changed).

Capacity grows (rehash, rows keep their numbers) by ``growth_factor`` up to
``max_capacity``; a full table then evicts (if an eviction policy is set) or raises
:class:`TableFullError` naming the options to change.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from gauss_plugins.embedding.index import HashIndex, IndexFullError, check_keys, resolve_device
from gauss_plugins.embedding.initializers import Initializer, initial_values
from gauss_plugins.embedding.memory import alloc
from gauss_plugins.embedding.sparse_rules import OptimizerConfig, SparseRule, make_rule
from gauss_plugins.embedding.policies import AdmissionPolicy, AlwaysAdmit, Clock, EvictionPolicy
from gauss_plugins.embedding.tracking import (ChangeLog, ChangeSnapshot, RowScratch, VictimPreselector, expire_window,
                                              lowest_k, sampled_victims)

__all__ = ["DynamicTableConfig", "DynamicEmbeddingTable", "TableFullError", "UnknownIdError", "ReplicatedTableError"]

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
_STAMP_LIMIT = 2**31 - 1


class TableFullError(RuntimeError):
    """The table has no free row, may not grow, and may not evict."""


class UnknownIdError(LookupError):
    """An eval-mode lookup read ids without a row, and ``eval_unknown="error"`` forbids it."""


class ReplicatedTableError(RuntimeError):
    """A table is trained by several ranks of a process group (DDP, TorchRec's
    DistributedModelParallel): its rows are not synchronised across ranks, so each rank would
    train its own diverging copy."""


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@dataclass
class DynamicTableConfig:
    """Configuration of one dynamic table.

    ``admission`` / ``eviction``: a registered name (``"always"``, ``"counting"``,
    ``"probability"``; ``"lru"``, ``"lfu"``, ``"ttl"``, ``"score"``) with its options in
    ``admission_options`` / ``eviction_options``, or a policy instance; ``eviction=None``
    never evicts. ``evict_fraction``: when space must be made, this fraction of the capacity
    is freed beyond what the batch needs (fewer, larger eviction rounds).
    ``auto_evict_every``: run :meth:`DynamicEmbeddingTable.evict` (expiry, e.g. TTL) every
    this many training lookups (0: only when called).
    ``default``: what ids without a row read: ``"zeros"`` or ``"unknown"`` (one shared,
    trainable row). ``eval_unknown``: what :meth:`~DynamicEmbeddingTable.lookup` and
    :meth:`~DynamicEmbeddingTable.lookup_pooled` read in eval mode for an id the table has
    never seen (eval never inserts): ``"default"`` (the ``default`` above; zeros unless set,
    and silently so), ``"init"`` (the row the id would start with if training inserted it
    now: the deterministic initializer's values) or ``"error"`` (raise
    :class:`UnknownIdError` naming the ids).
    """

    name: str
    dim: int
    initial_capacity: int = 1024
    max_capacity: int = 1 << 24
    growth_factor: float = 2.0
    dtype: Union[str, torch.dtype] = "fp32"
    seed: int = 0
    initializer: Initializer = "uniform"
    init_min: float = -0.01
    init_max: float = 0.01
    init_std: float = 0.01
    admission: Union[str, AdmissionPolicy, None] = "always"
    admission_options: Dict[str, Any] = field(default_factory=dict)
    eviction: Union[str, EvictionPolicy, None] = None
    eviction_options: Dict[str, Any] = field(default_factory=dict)
    evict_fraction: float = 0.01
    auto_evict_every: int = 0
    default: str = "zeros"
    eval_unknown: str = "default"
    optimizer: Union[OptimizerConfig, str, None] = None
    backend: str = "auto"
    device: Union[str, torch.device] = "cpu"
    tombstone_limit: int = 10_000_000

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("DynamicTableConfig.name must be a non-empty string")
        if not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"DynamicTableConfig.dim must be a positive int, got {self.dim!r}")
        if self.initial_capacity < 1 or self.max_capacity < self.initial_capacity:
            raise ValueError(f"need 1 <= initial_capacity ({self.initial_capacity}) <= max_capacity ({self.max_capacity})")
        if self.growth_factor <= 1.0:
            raise ValueError(f"growth_factor must be > 1, got {self.growth_factor}")
        if self.storage_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be fp32, fp16 or bf16, got {self.dtype!r}")
        if self.default not in ("zeros", "unknown"):
            raise ValueError(f"default must be 'zeros' or 'unknown', got {self.default!r}")
        if self.eval_unknown not in ("default", "init", "error"):
            raise ValueError(f"eval_unknown must be 'default' (read the default row), 'init' (read the id's initial "
                             f"row) or 'error', got {self.eval_unknown!r}")
        if not 0.0 <= self.evict_fraction < 1.0:
            raise ValueError(f"evict_fraction must be in [0, 1), got {self.evict_fraction}")
        if isinstance(self.optimizer, str):
            self.optimizer = OptimizerConfig(name=self.optimizer)
        elif isinstance(self.optimizer, dict):
            self.optimizer = OptimizerConfig.from_dict(self.optimizer)

    @property
    def storage_dtype(self) -> torch.dtype:
        if isinstance(self.dtype, torch.dtype):
            return self.dtype
        try:
            return _DTYPES[str(self.dtype)]
        except KeyError:
            raise ValueError(f"dtype must be fp32, fp16 or bf16, got {self.dtype!r}") from None

    def to_json(self) -> str:
        """JSON of the serializable fields (policy instances and callables as their names)."""
        out: Dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "optimizer":
                value = value.to_dict() if value is not None else None
            elif f.name == "dtype":
                value = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.storage_dtype]
            elif f.name == "device":
                value = str(value)
            elif f.name in ("admission", "eviction") and value is not None and not isinstance(value, str):
                value = {"policy": value.name, "options": value.options()}
            elif f.name == "initializer" and callable(value):
                value = {"callable": getattr(value, "__qualname__", repr(value))}
            out[f.name] = value
        return json.dumps(out, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DynamicTableConfig":
        data = json.loads(text)
        if isinstance(data.get("initializer"), dict):
            raise ValueError("this table was configured with a callable initializer: build the table yourself "
                             "and load the checkpoint into it")
        for key in ("admission", "eviction"):
            if isinstance(data.get(key), dict):
                spec = data[key]
                data[key] = spec["policy"]
                data[f"{key}_options"] = {**spec["options"], **data.get(f"{key}_options", {})}
        return cls(**data)


def _resolve_policy(kind: str, spec, options: Dict[str, Any]):
    if spec is None or not isinstance(spec, str):
        return spec
    from gauss_plugins.plugins import get_registry

    return get_registry().create(kind, spec, **options)


@dataclass
class _GradRecord:
    ids: torch.Tensor          # int64[N]
    rows: torch.Tensor         # int64[N] (default row where absent)
    src: torch.Tensor          # float32[M, D]
    src_idx: torch.Tensor      # int64[N] or empty (identity)
    scale: torch.Tensor        # float32[N] or empty (ones)
    epoch: int


@dataclass
class _Prepared:
    finite: bool                           # False: known on the host to hold NaN/inf
    rows: Optional[torch.Tensor] = None    # two-phase: distinct rows and their summed grads
    grads: Optional[torch.Tensor] = None
    fused: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = None  # rows, src, idx, scale
    # sync-free (masked) step: grads summed per row of the whole table, the rows touched, and
    # a 0-dim bool on the device that says whether every sum is finite (never read here)
    masked: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    device_finite: Optional[torch.Tensor] = None

# Tables with at most this many rows (or 4x the step's ids) sum gradients into a dense
# per-row buffer instead of sorting the ids (torch.unique), when no fused kernel does it.
_DENSE_SUM_MIN_ROWS = 1 << 16
# Tables up to this many rows step every row under a mask when ``sync_free_step`` is on (no
# list of touched rows, so no device-to-host sync); larger ones list the touched rows: a
# whole-table pass would cost more than the sync it saves.
_MASKED_STEP_MAX_ROWS = 1 << 16
# Fused sum + update only when no sum can overflow: max|src| * max|scale| * positions below this.
_SAFE_SUM = 1e37


class _LookupFunction(torch.autograd.Function):
    """Runs a lookup and, in backward, records its gradient on the table."""

    @staticmethod
    def forward(ctx, anchor, compute, table, record):  # noqa: D401
        ctx.table, ctx.record = table, record
        return compute()

    @staticmethod
    def backward(ctx, grad_out):
        ctx.table._record_grad(ctx.record, grad_out)
        return None, None, None, None


class _WeightedPoolFunction(torch.autograd.Function):
    """A pooled lookup whose per-sample weights need a gradient (position weights of a
    feature processor, for instance), as ``nn.EmbeddingBag`` gives one.

    ``out[b] = sum_i w[i] * row[i]`` over the ids of bag ``b``, so ``d loss / d w[i]`` is the
    dot product of ``row[i]`` (as read in forward: ``values``) with ``d loss / d out[b]``.
    ``record`` is None when the table itself gets no gradient (eval mode).
    """

    @staticmethod
    def forward(ctx, anchor, weights, compute, table, record, values, bag):  # noqa: D401
        ctx.table, ctx.record, ctx.weights_dtype = table, record, weights.dtype
        ctx.save_for_backward(values, bag)
        return compute()

    @staticmethod
    def backward(ctx, grad_out):
        values, bag = ctx.saved_tensors
        if ctx.record is not None:
            ctx.table._record_grad(ctx.record, grad_out)
        grad_weights = None
        if ctx.needs_input_grad[1]:
            grad = grad_out.to(torch.float32).index_select(0, bag)
            grad_weights = (values * grad).sum(dim=1).to(ctx.weights_dtype)
        return None, grad_weights, None, None, None, None, None


class DynamicEmbeddingTable(nn.Module):
    """A growing, collision-free embedding table keyed by raw int64 ids (see module docs)."""

    def __init__(self, config: Optional[DynamicTableConfig] = None, **kwargs: Any) -> None:
        super().__init__()
        if config is None:
            config = DynamicTableConfig(**kwargs)
        elif kwargs:
            config = replace(config, **kwargs)
        self.config = config
        self.name = config.name
        self.dim = config.dim
        self.device = resolve_device(config.device)
        self.dtype = config.storage_dtype
        self.index = self._make_index(config.initial_capacity)
        self.admission: AdmissionPolicy = _resolve_policy("admission_policy", config.admission, config.admission_options) or AlwaysAdmit()
        self.admission.to(self.device)
        self.eviction: Optional[EvictionPolicy] = _resolve_policy("eviction_policy", config.eviction, config.eviction_options)
        self.rule: Optional[SparseRule] = None
        self.opt_state: Dict[str, torch.Tensor] = {}
        cap = self.index.capacity
        self.weight = alloc((cap + 1, self.dim), self.dtype, self.device)
        # row version = _stamp_base + _row_stamp; 0: at or before the base; -1: no key in this row
        self._row_stamp = alloc((cap + 1,), torch.int32, self.device, -1)
        self._row_ids = alloc((cap + 1,), torch.int64, self.device, 0)  # the key of each live row
        self._changes = ChangeLog(self._change_log_limit(cap))
        self._scratch = RowScratch()
        self._evict_rng: Optional[torch.Generator] = None
        self._evict_stream: Optional[torch.Tensor] = None
        self._victim_preselector: Optional[VictimPreselector] = None  # eviction option preselect
        self._expire_hand = 0         # where automatic expiry's sweep resumes
        self._victim_hand: Optional[torch.Tensor] = None  # int64[1]: where the victim sweep resumes
        self.sweep_fallbacks = 0      # sweep rounds that found too few low rows and sampled instead
        self.last_changed_scan = 0    # entries the last changed_since visited (log entries or rows)
        self._stamp_base = 0
        self._version = 0
        self._step = 0                # training lookups (the eviction clock)
        self._epoch = 0               # bumped when rows are freed or moved: re-resolve recorded grads
        self._tombstone_ids: List[torch.Tensor] = []
        self._tombstone_versions: List[int] = []
        self._tombstone_count = 0     # ids in _tombstone_ids (kept, not summed: ~1,500 chunks at 10M rows)
        self._tombstones_since = 0    # evicted_since(v) is complete for v >= this
        self._pending: List[_GradRecord] = []
        self._anchor = torch.zeros((), requires_grad=True)
        # A StoreBacking (attach_store): evicted rows go to its store, re-admitted ids come back from it.
        self.backing = None
        # Set by a caller that keeps the replicas of a multi-rank run identical (same rows
        # cached, row gradients summed across ranks before the optimizer step: the Gauss
        # strategy, the lookahead cache's data-parallel runs); else training refuses world size > 1.
        self.synchronized_replicas = False
        # The optimizer step of a small table (dense per-row sums, no fused kernels) without a
        # device-to-host sync: every row is stepped under the "touched and all finite" mask
        # and a NaN/inf is reported by a later SparseOptimizer call (see SparseOptimizer.step).
        # On by default on CUDA, where a sync stalls the CPU's run-ahead of kernel launches;
        # off on CPU, where listing the touched rows costs nothing and updates fewer rows.
        self.sync_free_step = self.device.type == "cuda"
        # The device-side finite checks of this table's sync-free steps not read yet, oldest
        # first (kept here, not in the optimizer, so that any later SparseOptimizer over the
        # table reports a skipped step, even when each step builds a new one).
        self._finite_checks: List[Any] = []
        self._all_rows: Optional[torch.Tensor] = None  # arange(rows): the masked step's change-log chunk
        if self.eviction is not None:
            self.eviction.bind(self)
            self.eviction.resize(cap + 1, self.device)
        if config.default == "unknown":
            self.weight[cap] = initial_values(config.initializer, torch.tensor([-(2**63)], device=self.device),
                                              self.dim, config.seed ^ 0x5EED, config.init_min, config.init_max,
                                              config.init_std)[0].to(self.dtype)
        if config.optimizer is not None:
            self.set_optimizer(config.optimizer)

    # ------------------------------------------------------------------ construction
    def _make_index(self, capacity: int) -> HashIndex:
        from gauss_plugins.plugins import get_registry

        name = self.config.backend
        registry = get_registry()
        comp = registry.select("table_backend", name, device=self.device)
        try:
            return comp.create(capacity, self.device)
        except Exception as exc:
            if name != "auto" or comp.name == "torch":
                raise
            warnings.warn(f"table {self.name!r}: table_backend {comp.name!r} failed ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); using the slower 'torch' backend",
                          RuntimeWarning, stacklevel=3)
            return registry.create("table_backend", "torch", capacity, self.device)

    def set_optimizer(self, config: Union[OptimizerConfig, str, None], **options: Any) -> None:
        """Use the sparse optimizer ``config``; resets the optimizer state unless the rule is
        unchanged (then only the hyperparameters change)."""
        if config is None:
            raise ValueError("set_optimizer needs an OptimizerConfig or a rule name")
        rule = make_rule(config, **options)
        if self.rule is not None and self.rule.name == rule.name and self.opt_state:
            self.rule = rule
            self.config.optimizer = rule.config
            return
        self.rule = rule
        self.config.optimizer = rule.config
        rows = self.weight.shape[0]
        self.opt_state = {}
        for name, (shape, dtype, init) in rule.state_fields(self.dim).items():
            self.opt_state[name] = alloc((rows, *shape), dtype, self.device, init)

    # ------------------------------------------------------------------ basic properties
    @property
    def capacity(self) -> int:
        return self.index.capacity

    @property
    def default_row(self) -> int:
        return self.index.capacity

    @property
    def version(self) -> int:
        return self._version

    @property
    def step_count(self) -> int:
        return self._step

    @property
    def row_stamps(self) -> torch.Tensor:
        """int32 per row: the (rebased) version at which the row was last inserted, read in
        training, updated or written; -1 for rows without a key. Larger is more recent."""
        return self._row_stamp

    def __len__(self) -> int:
        return len(self.index)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, dim={self.dim}, len={len(self)}, capacity={self.capacity}, "
                f"max_capacity={self.config.max_capacity}, dtype={self.dtype}, backend={type(self.index).__name__}")

    def memory_report(self) -> Dict[str, float]:
        """Bytes by component and the bookkeeping bytes per live row beyond the vector."""
        live = max(len(self), 1)
        index_bytes = self.index.memory_bytes()
        policy_bytes = (self.eviction.memory_bytes_per_row() * (self.capacity + 1)) if self.eviction else 0
        stamp_bytes = self._row_stamp.numel() * 4
        row_id_bytes = self._row_ids.numel() * 8  # row -> id, so change tracking never scans the index
        return {
            "live_rows": len(self),
            "capacity": self.capacity,
            "load_factor": len(self) / self.index.num_slots,
            "index_bytes": index_bytes,
            "policy_bytes": policy_bytes,
            "version_stamp_bytes": stamp_bytes,
            "row_id_bytes": row_id_bytes,
            "change_log_bytes": self._changes.nbytes() + self._scratch.nbytes(),
            "vector_bytes": self.weight.numel() * self.weight.element_size(),
            "optimizer_bytes": sum(t.numel() * t.element_size() for t in self.opt_state.values()),
            "overhead_bytes_per_row": (index_bytes + policy_bytes + stamp_bytes + row_id_bytes) / live,
        }

    # ------------------------------------------------------------------ validation
    def _check_ids(self, ids: torch.Tensor, what: str = "ids", flat: bool = False) -> None:
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor of int64 ids, got {type(ids).__name__}")
        check_keys(ids.reshape(-1) if not flat else ids, self.device, what)

    def _check_valid(self, valid: torch.Tensor, ids: torch.Tensor) -> None:
        if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or valid.shape != ids.shape:
            raise ValueError(f"valid must be a bool tensor of the ids' shape {tuple(ids.shape)}, got "
                             f"{getattr(valid, 'dtype', type(valid).__name__)} {tuple(getattr(valid, 'shape', ()))}")
        if valid.device != ids.device:
            raise ValueError(f"valid is on {valid.device} but the ids are on {ids.device}")

    def _check_offsets(self, offsets: torch.Tensor, n: int) -> None:
        if not isinstance(offsets, torch.Tensor) or offsets.dtype != torch.int64 or offsets.dim() != 1:
            raise TypeError(f"offsets must be a 1-D int64 tensor of B + 1 entries, got "
                            f"{getattr(offsets, 'dtype', type(offsets).__name__)} {tuple(getattr(offsets, 'shape', ()))}")
        if offsets.device != self.device:
            raise ValueError(f"offsets are on {offsets.device} but the table is on {self.device}")
        if offsets.numel() < 1:
            raise ValueError("offsets must have B + 1 >= 1 entries (offsets[0] == 0, offsets[-1] == len(ids))")
        if int(offsets[0]) != 0 or int(offsets[-1]) != n:
            raise ValueError(f"offsets must start at 0 and end at len(ids) = {n} (B + 1 entries, KJT convention); "
                             f"got first {int(offsets[0])}, last {int(offsets[-1])}")
        if offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError("offsets must be non-decreasing")

    # ------------------------------------------------------------------ versions
    def _bump(self) -> int:
        self._version += 1
        if self._version - self._stamp_base > _STAMP_LIMIT:
            # Rebase the int32 stamps; rows older than the new base read as "at or before base".
            shift = self._version - self._stamp_base - (_STAMP_LIMIT // 2)
            rebased = (self._row_stamp.to(torch.int64) - shift).clamp_min(0).to(torch.int32)
            self._row_stamp = torch.where(self._row_stamp < 0, self._row_stamp, rebased)
            self._stamp_base += shift
        return self._version

    def _stamp(self, rows: torch.Tensor, version: int, distinct: bool = True,
               ids: Optional[torch.Tensor] = None) -> None:
        self._row_stamp.index_fill_(0, rows, version - self._stamp_base)  # a scalar: no copy to the GPU
        self._changes.add(rows, version, distinct=distinct, ids=ids)

    @staticmethod
    def _change_log_limit(capacity: int) -> int:
        # Room for about a full table's worth of row changes (8 B each): a consumer that
        # falls further behind gets one full scan, which is exact anyway.
        return max(capacity, 1 << 20)

    def _eviction_stream(self) -> torch.Tensor:
        """int64[1]: the position in the compiled sampler's random stream (seeded by the
        table's seed, so a run's victims repeat run after run)."""
        if self._evict_stream is None:
            self._evict_stream = torch.tensor([(self.config.seed ^ 0xE71C7) << 32], dtype=torch.int64)
        return self._evict_stream

    def _sweep_hand(self) -> torch.Tensor:
        """int64[1]: the row the victim sweep looks at next (the compiled op moves it)."""
        if self._victim_hand is None:
            self._victim_hand = torch.zeros(1, dtype=torch.int64)
        return self._victim_hand

    def _eviction_rng(self) -> torch.Generator:
        if self._evict_rng is None:
            self._evict_rng = torch.Generator(device=self.device).manual_seed(self.config.seed ^ 0xE71C7)
        return self._evict_rng

    def _clock(self) -> Clock:
        return Clock(step=self._step, now=time.time())

    # ------------------------------------------------------------------ capacity
    def _grow(self, new_capacity: int) -> None:
        old = self.capacity
        self.index.rehash(new_capacity)
        new = self.index.capacity

        def grown(t: torch.Tensor, fill: float = 0) -> torch.Tensor:
            out = alloc((new + 1, *t.shape[1:]), t.dtype, t.device, fill)
            out[:old] = t[:old]
            out[new] = t[old]  # the default row moves to the end
            return out

        self.weight = grown(self.weight)
        self._row_stamp = grown(self._row_stamp, -1)
        self._row_ids = grown(self._row_ids)
        self._changes.limit = self._change_log_limit(new)
        if self.rule is not None:
            fields_ = self.rule.state_fields(self.dim)
            self.opt_state = {k: grown(v, fields_[k][2]) for k, v in self.opt_state.items()}
        if self.eviction is not None:
            self.eviction.resize(new + 1, self.device)
        self._epoch += 1
        self._bump()

    def _ensure_room(self, n_new: int, protect: Callable[[], torch.Tensor]) -> None:
        """Make room for ``n_new`` rows: grow, else evict (never the rows ``protect()`` returns)."""
        free = self.capacity - len(self)
        if n_new <= free:
            return
        cfg = self.config
        if self.capacity < cfg.max_capacity:
            target = max(math.ceil(self.capacity * cfg.growth_factor), len(self) + n_new)
            self._grow(min(cfg.max_capacity, target))
            free = self.capacity - len(self)
            if n_new <= free:
                return
        if self.eviction is None:
            raise TableFullError(
                f"dynamic table {self.name!r} is full: {len(self)} rows = max_capacity {cfg.max_capacity}, and "
                f"{n_new} new ids need rows. Raise DynamicTableConfig.max_capacity, set an eviction policy "
                f"(DynamicTableConfig.eviction='lru', 'lfu' or 'ttl'), or admit fewer ids "
                f"(DynamicTableConfig.admission='counting').")
        need = n_new - free
        k = need + int(cfg.evict_fraction * self.capacity)
        protected = protect()
        preselector = self._victim_preselector
        victims = preselector.take(self, k, protected) if preselector is not None else None
        if victims is None:
            victims = self._select_victims(k, protected)
        if victims.numel() < need:
            raise TableFullError(
                f"dynamic table {self.name!r}: a single batch brings {n_new} new ids but only "
                f"{free + victims.numel()} rows can be freed (capacity {self.capacity}); raise "
                f"DynamicTableConfig.max_capacity or use smaller batches")
        self._remove(victims)
        if getattr(self.eviction, "preselect", False):  # draw the next round's sample while training runs
            if preselector is None:
                preselector = self._victim_preselector = VictimPreselector(self.config.seed)
            preselector.prepare(self, k)

    def _select_victims(self, k: int, protect: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Ids (ascending) of the ``k`` lowest-scored live rows not in ``protect`` (rows; -1
        entries ignored; ties by id); on a large table, of a random sample of
        ``eviction.sample_factor * k`` rows
        (:func:`~gauss_plugins.embedding.tracking.sampled_victims`)."""
        if self.eviction is not None and k > 0:
            sampled = sampled_victims(self, k, protect)
            if sampled is not None:
                return sampled
        if protect is not None:
            protect = protect[protect >= 0]
        fused = self.index.fused
        array = self.eviction.score_array() if self.eviction is not None else None
        if fused is not None and array is not None and k > 0:
            guard = protect if protect is not None else _EMPTY_LONG
            return fused.select_victims(self.index, self._row_stamp, array, guard, self.capacity, k)[0]
        ids, rows = self.index.keys_and_rows()
        if protect is not None and protect.numel():
            mask = torch.zeros(self.capacity + 1, dtype=torch.bool, device=self.device)
            mask[protect] = True
            keep = ~mask[rows]
            ids, rows = ids[keep], rows[keep]
        if k <= 0 or ids.numel() == 0:
            return ids[:0]
        if k >= ids.numel():
            return ids.sort().values
        return lowest_k(ids, self.eviction.scores(ids, rows, self._clock(), self), k)

    def _remove(self, ids: torch.Tensor, write_back: bool = True, live: bool = False) -> torch.Tensor:
        """Remove ``ids`` (distinct) from the index; log them as tombstones. Returns rows.
        With a backing store, changed rows are written to it first (``write_back``: an
        eviction), or the ids are deleted from it too (a delete). ``live``: the caller knows
        every id has a row (no check read back from the device)."""
        if self.backing is not None and ids.numel():
            self.backing.on_remove(self, ids, write_back, live=live)
        rows = self.index.remove(ids)
        freed = rows >= 0
        # An eviction's victims are all live: skip the two masked copies (~0.1 ms a round).
        gone, freed_rows = (ids, rows) if live or bool(freed.all()) else (ids[freed], rows[freed])
        if gone.numel():
            self._row_stamp.index_fill_(0, freed_rows, -1)
            version = self._bump()
            self._tombstone_ids.append(gone.clone())
            self._tombstone_versions.append(version)
            self._tombstone_count += gone.numel()
            self._epoch += 1
            self._trim_tombstones()
        return rows

    def _trim_tombstones(self) -> None:
        while self._tombstone_count > self.config.tombstone_limit and len(self._tombstone_ids) > 1:
            self._tombstone_count -= self._tombstone_ids.pop(0).numel()
            self._tombstones_since = self._tombstone_versions.pop(0)

    def trim_tombstones(self, version: int) -> None:
        """Forget evictions at or before ``version`` (every consumer has synced past it)."""
        while self._tombstone_versions and self._tombstone_versions[0] <= version:
            self._tombstone_count -= self._tombstone_ids.pop(0).numel()
            self._tombstones_since = self._tombstone_versions.pop(0)

    # ------------------------------------------------------------------ rows
    def _init_rows(self, rows: torch.Tensor, ids: torch.Tensor, version: int,
                   values: Optional[torch.Tensor] = None) -> None:
        cfg = self.config
        fused = self.index.fused
        if values is not None:  # the caller has the rows (a store's copy): no initializer to compute
            self.weight[rows] = values.to(self.dtype)
        elif fused is not None and cfg.initializer == "uniform":
            fused.init_uniform(self.weight, rows, ids, cfg.seed, cfg.init_min, cfg.init_max)
        else:
            values = initial_values(cfg.initializer, ids, self.dim, cfg.seed, cfg.init_min, cfg.init_max, cfg.init_std)
            self.weight[rows] = values.to(self.dtype)
        if self.rule is not None:
            for name, (shape, dtype, init) in self.rule.state_fields(self.dim).items():
                # index_fill_ takes the value as a scalar: `t[rows] = init` copies it to the
                # device first, a host synchronisation on a GPU.
                self.opt_state[name].index_fill_(0, rows, init)
        if self.eviction is not None:
            self.eviction.on_insert(rows, self._clock())
        self._row_ids[rows] = ids
        self._stamp(rows, version, ids=ids)  # an insertion: the log keeps the ids too

    def _rows_for_training(self, ids: torch.Tensor, stamp: bool = True,
                           valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows of ``ids`` (flat), inserting admitted new ids; absent ones -> default row.
        Positions where ``valid`` (bool, flat) is False are treated as absent ids that are
        never admitted: they read the default row and nothing is inserted for them.

        The rows read are recorded (:meth:`_read_stamp`) unless ``stamp`` is False: then the
        caller must record them, e.g. in the kernel that reads them. If room
        cannot be made (:class:`TableFullError`) nothing changes but the step and version
        counters and the admission policy's sightings."""
        self._step += 1
        version = self._bump()
        rows = self.index.find(ids)
        absent = rows < 0
        if valid is not None:
            absent &= valid
        # The one device-to-host sync of a training lookup: once every id has a row (most
        # steps of an epoch) nothing else below runs.
        miss_pos = torch.nonzero(absent).squeeze(1)
        if miss_pos.numel():
            # Only the (few) positions of absent ids are touched from here on.
            cand, inverse, counts = torch.unique(ids[miss_pos], return_inverse=True, return_counts=True)
            admit = self.admission.admit(cand, counts)
            admitted = cand[admit]
            got = None
            if admitted.numel():
                # The batch's rows stay; its absent ids (-1) are skipped by the selection.
                self._ensure_room(admitted.numel(), protect=lambda: rows)
                try:
                    new_rows, _ = self.index.insert(admitted)
                except IndexFullError as exc:  # _ensure_room made room: this is a bug, say so
                    raise TableFullError(f"dynamic table {self.name!r}: {exc}") from exc
                self._init_rows(new_rows, admitted, version)
                if self.backing is not None:  # re-admitted ids get their stored rows back
                    self.backing.restore(self, admitted, new_rows, version)
                cand_rows = torch.full_like(cand, -1)
                cand_rows[admit] = new_rows
                got = cand_rows[inverse]
            default = self.default_row  # after any growth
            rows[miss_pos] = default if got is None else torch.where(got >= 0, got, torch.full_like(got, default))
        if valid is not None:
            rows = torch.where(valid, rows, self.default_row)
        if stamp:
            self._apply_read_stamp(rows, self._read_stamp(version))
        if self.config.auto_evict_every and self._step % self.config.auto_evict_every == 0:
            self._expire(protect=rows[rows != self.default_row], bounded=True)
        return rows

    def _read_stamp(self, version: int) -> Union[None, str, Dict[str, Any]]:
        """How the rows a training lookup reads are recorded: None (nothing to record: no
        eviction policy, or one that ignores reads, like LRU on the version stamps), a dict
        of fused-kernel arguments (stamp the version and the policy's array), or ``"torch"``
        (the policy's ``on_access`` and the version stamp, in torch)."""
        if self.eviction is None or not self.eviction.records_reads:
            return None
        spec = self.eviction.access_stamp(self._clock()) if self.index.fused is not None else None
        if spec is None:
            return "torch"
        mode, array, value = spec
        return dict(stamp=self._row_stamp, stamp_value=version - self._stamp_base, policy_array=array,
                    policy_mode=mode, policy_value=value, skip_row=self.default_row)

    def _apply_read_stamp(self, rows: torch.Tensor, spec: Union[None, str, Dict[str, Any]]) -> None:
        """Record ``rows`` as read (the default row excepted), as :meth:`_read_stamp` says."""
        if spec is None:
            return
        if spec == "torch":
            read = rows[rows != self.default_row]
            self.eviction.on_access(read, self._clock())
            self._stamp(read, self._version, distinct=False)
            return
        self.index.fused.stamp_rows(rows, **spec)
        self._changes.add(rows, spec["stamp_value"] + self._stamp_base, distinct=False)

    def _resolve(self, ids: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self._rows_for_training(ids)
        return self.index.find(ids, default=self.default_row)

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        return self.weight.index_select(0, rows).to(torch.float32)

    def _pool(self, rows: torch.Tensor, offsets: torch.Tensor, mode: int, psw: Optional[torch.Tensor],
              stamp: Optional[Dict[str, Any]] = None) -> torch.Tensor:
        fused = self.index.fused
        if fused is not None:
            return fused.pool_rows(self.weight, rows, offsets, psw, mode, **(stamp or {}))
        B = offsets.numel() - 1
        lengths = offsets[1:] - offsets[:-1]
        bag = torch.repeat_interleave(torch.arange(B, device=self.device), lengths)
        vals = self._gather(rows)
        if psw is not None:
            vals = vals * psw.to(torch.float32)[:, None]
        out = torch.zeros(B, self.dim, dtype=torch.float32, device=self.device).index_add_(0, bag, vals)
        if mode == 1:
            out = out * (1.0 / lengths.clamp_min(1).to(torch.float32))[:, None]
        return out

    # ------------------------------------------------------------------ lookups
    @torch.no_grad()
    def remap(self, ids: torch.Tensor) -> torch.Tensor:
        """int64 rows (shape of ``ids``) that a lookup of ``ids`` reads: in training mode
        absent ids are admitted and inserted and the access is recorded, exactly as in
        :meth:`lookup`; ids without a row map to :attr:`default_row`. For code that
        gathers from :attr:`weight` itself (no gradient is recorded)."""
        self._check_ids(ids)
        self._check_single_replica()
        return self._resolve(ids.reshape(-1)).view(ids.shape)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lookup(ids)

    def lookup(self, ids: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """float32[*ids.shape, dim]: the rows of ``ids``; absent ids read the default row (in
        eval mode, what ``DynamicTableConfig.eval_unknown`` says).

        ``valid`` (bool, shape of ``ids``), for padded batches: where it is False the id is
        not looked up at all; the position reads the default row (zeros unless
        ``default="unknown"``), inserts nothing, and its gradient goes where a default-row
        read's goes (dropped when ``default="zeros"``). Cheaper than compacting the valid
        ids first, which costs a host sync on CUDA."""
        self._check_ids(ids)
        self._check_single_replica()
        if valid is not None:
            self._check_valid(valid, ids)
        flat = ids.reshape(-1)
        vflat = None if valid is None else valid.reshape(-1)
        rows = self._rows_for_training(flat, valid=vflat) if self.training else self._resolve(flat)
        shape = (*ids.shape, self.dim)
        if not self.training:
            if vflat is None:
                return self._read_unknown(flat, rows, self._gather(rows)).view(shape)
            # Masked positions read the default row and are never "unknown" ids (-1 is no row).
            values = self._gather(torch.where(vflat, rows, self.default_row))
            return self._read_unknown(flat, torch.where(vflat, rows, -1), values).view(shape)
        if not torch.is_grad_enabled():
            return self._gather(rows).view(shape)
        record = _GradRecord(flat, rows, None, _EMPTY_LONG, _EMPTY_FLOAT, self._epoch)
        return _LookupFunction.apply(self._anchor, lambda: self._gather(rows), self, record).view(shape)

    def lookup_pooled(self, ids: torch.Tensor, offsets: torch.Tensor, mode: str = "sum",
                      per_sample_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """float32[B, dim]: per bag ``ids[offsets[b]:offsets[b+1]]``, the sum (or mean) of
        the rows, each scaled by ``per_sample_weights`` when given (sum mode only; they get a
        gradient when they require one). Absent ids read as in :meth:`lookup`."""
        self._check_ids(ids, flat=True)
        self._check_single_replica()
        self._check_offsets(offsets, ids.numel())
        if mode not in ("sum", "mean"):
            raise ValueError(f"mode must be 'sum' or 'mean', got {mode!r}")
        psw = per_sample_weights
        if psw is not None:
            if mode != "sum":
                raise ValueError("per_sample_weights are only supported with mode='sum' (as in nn.EmbeddingBag)")
            if not isinstance(psw, torch.Tensor) or not psw.is_floating_point() or psw.shape != ids.shape:
                raise ValueError(f"per_sample_weights must be a float tensor of shape {tuple(ids.shape)}")
            if psw.device != self.device:
                raise ValueError(f"per_sample_weights are on {psw.device} but the table is on {self.device}")
        imode = 0 if mode == "sum" else 1
        fused = self.index.fused
        # Per-sample weights that need a gradient: the rows read must be kept for backward.
        weights_grad = psw is not None and psw.requires_grad and torch.is_grad_enabled()
        if not self.training:
            if self.config.eval_unknown == "default" and not weights_grad and not self._eval_reads_store:
                if fused is not None:
                    return fused.lookup_pool(self.index, ids, offsets, self.weight, psw, imode, self.default_row)[0]
                return self._pool(self.index.find(ids, default=self.default_row), offsets, imode, psw)
            rows = self.index.find(ids, default=self.default_row)
            if not weights_grad:
                return self._pool_unknown(ids, rows, offsets, imode, psw)
            values = self._read_unknown(ids, rows, self._gather(rows))
            bag = self._bag_index(offsets)
            return _WeightedPoolFunction.apply(self._anchor, psw,
                                               lambda: self._pool_values(values, bag, offsets, imode, psw.detach()),
                                               self, None, values, bag)
        rows = self._rows_for_training(ids, stamp=False)
        spec = self._read_stamp(self._version)
        if spec == "torch":
            self._apply_read_stamp(rows, spec)
            spec = None
        elif spec is not None:  # the pooling kernel below stamps the rows it reads
            self._changes.add(rows, spec["stamp_value"] + self._stamp_base, distinct=False)
        if not torch.is_grad_enabled():
            return self._pool(rows, offsets, imode, psw, spec)
        lengths = offsets[1:] - offsets[:-1]
        src_idx = self._bag_index(offsets)
        if imode == 1:
            scale = (1.0 / lengths.clamp_min(1).to(torch.float32))[src_idx]
        else:
            scale = psw.detach().to(torch.float32) if psw is not None else _EMPTY_FLOAT
        record = _GradRecord(ids, rows, None, src_idx, scale, self._epoch)
        if weights_grad:
            # Gathered before the pool: a later lookup in the same forward may grow the table
            # or evict, and the optimizer step happens after backward anyway.
            values = self._gather(rows)
            return _WeightedPoolFunction.apply(self._anchor, psw, lambda: self._pool(rows, offsets, imode, psw.detach(), spec),
                                               self, record, values, src_idx)
        return _LookupFunction.apply(self._anchor, lambda: self._pool(rows, offsets, imode, psw, spec), self, record)

    def _pool_unknown(self, ids: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor, mode: int,
                      psw: Optional[torch.Tensor]) -> torch.Tensor:
        """Eval pooling at ``rows`` (default row where absent) with the absent ids read as
        ``config.eval_unknown`` says: the pool as usual, then, for the absent positions only,
        the difference between what they should read and the default row added to their bags
        (so the cost grows with the unseen ids, not with the batch)."""
        out = self._pool(rows, offsets, mode, psw)
        pos = torch.nonzero(rows == self.default_row).squeeze(1)
        if pos.numel() == 0:
            return out
        delta = self._absent_values(ids[pos]) - self.weight[self.default_row].to(torch.float32)
        bag = torch.searchsorted(offsets, pos, right=True) - 1
        if psw is not None:
            delta = delta * psw[pos].to(torch.float32)[:, None]
        if mode == 1:
            lengths = offsets[1:] - offsets[:-1]
            delta = delta / lengths[bag].to(torch.float32)[:, None]
        return out.index_add_(0, bag, delta)

    def _read_unknown(self, ids: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``values`` (gathered at ``rows``) with the ids that have no row read as
        ``config.eval_unknown`` says; raises :class:`UnknownIdError` before returning anything."""
        if self.config.eval_unknown == "default" and not self._eval_reads_store:
            return values
        missing = rows == self.default_row
        if bool(missing.any()):
            values[missing] = self._absent_values(ids[missing])
        return values

    @property
    def _eval_reads_store(self) -> bool:
        return self.backing is not None and self.backing.eval_reads_store

    def _absent_values(self, absent: torch.Tensor) -> torch.Tensor:
        """float32[N, dim]: what ids without a row read in eval mode: with a backing store,
        the stored row of those it holds (an evicted row is still trained, only elsewhere);
        the rest as ``config.eval_unknown`` says."""
        if not self._eval_reads_store:
            return self._unknown_values(absent) if self.config.eval_unknown != "default" else \
                self.weight[self.default_row].to(torch.float32).expand(absent.numel(), self.dim).clone()
        drain = getattr(self.backing, "drain", None)
        if drain is not None:  # write-backs queued by an asynchronous writer land first
            drain()
        got = self.backing.store.lookup(absent.cpu())
        found = got.found.to(self.device)
        # Through the storage dtype: exactly what the row would hold once re-admitted.
        out = got.values.to(self.device).to(self.dtype).to(torch.float32)
        rest = ~found
        if bool(rest.any()):
            if self.config.eval_unknown == "default":
                out[rest] = self.weight[self.default_row].to(torch.float32)
            else:
                out[rest] = self._unknown_values(absent[rest])
        return out

    def _unknown_values(self, unknown: torch.Tensor) -> torch.Tensor:
        """float32[N, dim]: what the ids ``unknown`` (all without a row) read in eval mode
        under ``eval_unknown`` "init"; raises :class:`UnknownIdError` under "error"."""
        if self.config.eval_unknown == "error":
            shown = torch.unique(unknown)
            raise UnknownIdError(
                f"dynamic table {self.name!r} (eval mode) has no row for {shown.numel()} id(s), e.g. "
                f"{shown[:5].tolist()}; eval_unknown='error' forbids reading them. Train on these ids first, or "
                f"set DynamicTableConfig.eval_unknown='default' (read the default row) or 'init' (read the "
                f"id's initial row)")
        cfg = self.config
        fused = self.index.fused
        if fused is not None and cfg.initializer == "uniform":  # as _init_rows: the same bits, compiled
            init = torch.empty(unknown.numel(), self.dim, dtype=self.dtype, device=self.device)
            fused.init_uniform(init, torch.arange(unknown.numel(), device=self.device), unknown, cfg.seed,
                               cfg.init_min, cfg.init_max)
        else:
            init = initial_values(cfg.initializer, unknown, self.dim, cfg.seed, cfg.init_min, cfg.init_max,
                                  cfg.init_std).to(self.dtype)
        # In the storage dtype first: exactly what the row would hold once inserted.
        return init.to(torch.float32)

    def _pool_values(self, values: torch.Tensor, bag: torch.Tensor, offsets: torch.Tensor, mode: int,
                     psw: Optional[torch.Tensor]) -> torch.Tensor:
        """Sum (mode 0) or mean (1) per bag of already gathered ``values``."""
        if psw is not None:
            values = values * psw.to(torch.float32)[:, None]
        out = torch.zeros(offsets.numel() - 1, self.dim, dtype=torch.float32, device=self.device)
        out.index_add_(0, bag, values)
        if mode == 1:
            lengths = offsets[1:] - offsets[:-1]
            out = out * (1.0 / lengths.clamp_min(1).to(torch.float32))[:, None]
        return out

    def _check_single_replica(self) -> None:
        """Refuse training lookups under a process group of several ranks (see
        :class:`ReplicatedTableError`); reading in eval mode stays allowed."""
        if not self.training or self.synchronized_replicas:
            return
        world = _world_size()
        if world > 1:
            raise ReplicatedTableError(
                f"dynamic table {self.name!r} is trained in a process group of world size {world} (DDP, "
                f"TorchRec's DistributedModelParallel, a multi-process Lightning or Ray run). Its rows are not "
                f"synchronised across ranks yet, so each rank would train its own diverging table. Train with "
                f"one process (world size 1) until distributed training of dynamic tables is supported")

    def _bag_index(self, offsets: torch.Tensor) -> torch.Tensor:
        """int64[N]: the bag of each id position."""
        fused = self.index.fused
        if fused is not None:
            return fused.bag_index(offsets)
        lengths = offsets[1:] - offsets[:-1]
        return torch.repeat_interleave(torch.arange(lengths.numel(), device=self.device), lengths)

    # ------------------------------------------------------------------ gradients
    def _record_grad(self, record: _GradRecord, grad_out: torch.Tensor) -> None:
        src = grad_out.detach().to(torch.float32).reshape(-1, self.dim).contiguous()
        self._pending.append(replace(record, src=src))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients recorded since the last optimizer step."""
        self._pending = []

    @property
    def has_pending_grads(self) -> bool:
        return bool(self._pending)

    def _accumulate(self, rows, src, src_idx, scale):
        fused = self.index.fused
        if fused is not None:
            return fused.accumulate_grads(rows, src, src_idx, scale)
        # An empty src_idx means "identity" only when there is one source row per id: a
        # batch whose bags are all empty has no ids but still one (zero) source row per bag.
        g = src if src_idx.numel() == 0 and src.shape[0] == rows.numel() else src.index_select(0, src_idx)
        if scale.numel():
            g = g * scale[:, None]
        uniq, inverse = torch.unique(rows, return_inverse=True)
        out = torch.zeros(uniq.numel(), self.dim, dtype=torch.float32, device=self.device).index_add_(0, inverse, g)
        return uniq, out, bool(torch.isfinite(out).all())

    def _prepare_dense(self, records) -> _Prepared:
        """The two-phase sum into a ``[rows, dim]`` buffer indexed by row: no sort (the
        unique of the generic path), one kernel per lookup, and the touched rows come out
        ascending, as ``torch.unique`` gives them, so the update is the same. Summation order
        per row is batch order, as on the generic path."""
        n_rows = self.weight.shape[0]
        sums = torch.zeros(n_rows, self.dim, dtype=torch.float32, device=self.device)
        touched = torch.zeros(n_rows, dtype=torch.bool, device=self.device)
        for rows, src, src_idx, scale in records:
            g = src if src_idx.numel() == 0 and src.shape[0] == rows.numel() else src.index_select(0, src_idx)
            if scale.numel():
                g = g * scale[:, None]
            sums.index_add_(0, rows, g)
            touched.index_fill_(0, rows, True)
        if self.config.default == "zeros":
            touched.select(0, self.default_row).fill_(False)  # a fill on the device: no sync
        if self._masked_step(n_rows):
            # Nothing is read back: the finite flag stays on the device (see _apply_gradients).
            return _Prepared(finite=True, masked=(sums, touched), device_finite=torch.isfinite(sums).all())
        finite = bool(torch.isfinite(sums).all())
        rows = touched.nonzero().squeeze(1)  # right after the sync above: the device is idle
        return _Prepared(finite=finite, rows=rows, grads=sums.index_select(0, rows))

    def _masked_step(self, n_rows: int) -> bool:
        """Whether the dense-sum step runs masked over every row (see ``sync_free_step``):
        only for small tables and rules that expose their per-row arithmetic (a plugin rule
        that only implements ``update`` keeps the listed-rows step)."""
        return (self.sync_free_step and n_rows <= _MASKED_STEP_MAX_ROWS
                and type(self.rule).step_rows is not SparseRule.step_rows)

    def _prepare_gradients(self) -> Optional[_Prepared]:
        """Check (and, on the two-phase path, sum) the recorded gradients without changing
        the table; :meth:`_apply_gradients` then updates it."""
        if not self._pending:
            return None
        if self.rule is None:
            raise RuntimeError(f"table {self.name!r} has gradients but no optimizer; set DynamicTableConfig.optimizer")
        records = []
        for rec in self._pending:
            rows = rec.rows
            if rec.epoch != self._epoch:  # rows were freed or moved since the lookup
                rows = self.index.find(rec.ids, default=self.default_row)
            records.append((rows, rec.src, rec.src_idx, rec.scale))
        fused = self.index.fused
        if fused is None and self.weight.shape[0] <= max(_DENSE_SUM_MIN_ROWS, 4 * sum(r[0].numel() for r in records)):
            return self._prepare_dense(records)
        rows, src, src_idx, scale = records[0] if len(records) == 1 else _concat_records(records)
        if fused is not None and self.rule.kind >= 0 and hasattr(fused, "accumulate_update"):
            amax = float(src.abs().max()) if src.numel() else 0.0
            smax = float(scale.abs().max()) if scale.numel() else 1.0
            if not (math.isfinite(amax) and math.isfinite(smax)):
                return _Prepared(finite=False)
            if amax * smax * max(rows.numel(), 1) < _SAFE_SUM:
                return _Prepared(finite=True, fused=(rows, src, src_idx, scale))
        rows, grads, finite = self._accumulate(rows, src, src_idx, scale)
        if self.config.default == "zeros":
            keep = rows != self.default_row
            if not bool(keep.all()):
                rows, grads = rows[keep], grads[keep]
        return _Prepared(finite=bool(finite), rows=rows, grads=grads)

    def _apply_gradients(self, prep: _Prepared, all_finite: Optional[torch.Tensor] = None) -> None:
        """Update the rows. ``all_finite`` (masked step only): the 0-dim device bool that
        every table stepped together is finite; False leaves every row and its state as it
        was (the version still advances)."""
        self._pending = []
        rule = self.rule
        fused = self.index.fused
        names = {0: (), 1: ("sum",), 2: ("sum",), 3: ("exp_avg", "exp_avg_sq", "step")}.get(rule.kind, ())
        state = [self.opt_state[n] for n in names] + [None] * (3 - len(names))
        if prep.masked is not None:
            sums, touched = prep.masked
            ok = prep.device_finite if all_finite is None else all_finite
            version = self._bump()
            kernel = getattr(self.index, "masked_sparse_update", None)  # one kernel instead of ~30 torch ops
            if kernel is not None and rule.kind >= 0:
                kernel(rule.kind, self.weight, sums, touched, ok, *state, rule.hyperparams(), self._row_stamp,
                       version - self._stamp_base)
            else:
                apply = touched & ok
                rule.masked_update(self.weight, self.opt_state, sums, apply)
                self._row_stamp.masked_fill_(apply, version - self._stamp_base)
            n_rows = self.weight.shape[0]  # the default row included: readers drop it (_changed_rows)
            if self._all_rows is None or self._all_rows.numel() != n_rows:
                self._all_rows = torch.arange(n_rows, device=self.device)
            # Every row, matched exactly by stamp: readers keep the rows stamped with this
            # version (the ones updated), with no list of them built here.
            self._changes.add(self._all_rows, version)
            return
        if prep.fused is not None:
            rows, src, src_idx, scale = prep.fused
            skip = self.default_row if self.config.default == "zeros" else -1
            version = self._bump()
            updated = fused.accumulate_update(rule.kind, self.weight, *state, rule.hyperparams(), rows, src, src_idx,
                                              scale, skip, self._row_stamp, version - self._stamp_base)
            self._changes.add(updated, version)  # distinct rows, as the kernel returns them
            return
        if prep.rows.numel() == 0:
            return
        version = self._bump()
        if fused is not None and rule.kind >= 0:
            fused.sparse_update(rule.kind, self.weight, prep.rows, prep.grads, *state, rule.hyperparams())
        else:
            rule.update(self.weight, self.opt_state, prep.rows, prep.grads)
        self._stamp(prep.rows, version)

    # ------------------------------------------------------------------ direct access
    def find(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``ids`` (any shape), -1 where absent. Never changes the table."""
        self._check_ids(ids)
        return self.index.find(ids.reshape(-1)).view(ids.shape)

    def contains(self, ids: torch.Tensor) -> torch.Tensor:
        return self.find(ids) >= 0

    @torch.no_grad()
    def get(self, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(float32[*ids.shape, dim] values, bool present); absent ids read the default row."""
        self._check_ids(ids)
        rows = self.index.find(ids.reshape(-1), default=self.default_row)
        return self._gather(rows).view(*ids.shape, self.dim), (rows != self.default_row).view(ids.shape)

    @torch.no_grad()
    def set(self, ids: torch.Tensor, values: torch.Tensor, optimizer_state: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Write ``values`` (float[N, dim]) for distinct ``ids``, inserting absent ids (no
        admission check). Optimizer state of new rows is reset unless given."""
        self._check_ids(ids, flat=True)
        if not isinstance(values, torch.Tensor) or not values.is_floating_point() or tuple(values.shape) != (ids.numel(), self.dim):
            raise ValueError(f"values must be a float tensor of shape ({ids.numel()}, {self.dim}), "
                             f"got {getattr(values, 'dtype', None)} {tuple(getattr(values, 'shape', ()))}")
        if values.device != self.device:
            raise ValueError(f"values are on {values.device} but the table is on {self.device}")
        if torch.unique(ids).numel() != ids.numel():
            raise ValueError("set() needs distinct ids")
        if optimizer_state is not None:
            self._check_optimizer_state(optimizer_state, ids.numel())
        rows = self.index.find(ids)
        missing = rows < 0
        version = self._bump()
        if bool(missing.any()):
            self._ensure_room(int(missing.sum()), protect=lambda: rows)
            new_rows, _ = self.index.insert(ids[missing])
            self._init_rows(new_rows, ids[missing], version)
            rows[missing] = new_rows
        self.weight[rows] = values.to(self.dtype)
        if optimizer_state is not None:
            for name, value in optimizer_state.items():
                self.opt_state[name][rows] = value.to(self.opt_state[name].dtype)
        self._stamp(rows, version)

    def _check_optimizer_state(self, state: Dict[str, torch.Tensor], n: int) -> None:
        if self.rule is None:
            raise ValueError(f"table {self.name!r} has no optimizer, so optimizer_state cannot be set")
        expected = self.rule.state_fields(self.dim)
        if set(state) != set(expected):
            raise ValueError(f"optimizer_state must have exactly {sorted(expected)}, got {sorted(state)}")
        for name, (shape, _, _) in expected.items():
            if tuple(state[name].shape) != (n, *shape):
                raise ValueError(f"optimizer_state[{name!r}] must have shape {(n, *shape)}, got {tuple(state[name].shape)}")

    @torch.no_grad()
    def delete(self, ids: torch.Tensor) -> torch.Tensor:
        """Remove ``ids``; bool[N] whether each was present. Reported by :meth:`evicted_since`."""
        self._check_ids(ids, flat=True)
        uniq = torch.unique(ids)
        rows = self._remove(uniq, write_back=False)
        return torch.isin(ids, uniq[rows >= 0])

    @torch.no_grad()
    def evict(self, num: Optional[int] = None, ids: Optional[torch.Tensor] = None,
              live_distinct: bool = False) -> torch.Tensor:
        """Evict and return ids: the given ``ids``, else the ``num`` lowest-scored rows (on a
        table above the policy's ``exact_below`` rows, the lowest of a random sample of
        ``sample_factor * num`` rows: see :mod:`~gauss_plugins.embedding.policies`), else (no
        arguments) every row the policy says has expired (TTL; a full scan).
        ``live_distinct``: the caller guarantees the ``ids`` are distinct and all resident
        (a cache that keeps its own record of them): on a GPU the eviction then waits for
        nothing but the index's removal."""
        if ids is not None:
            self._check_ids(ids, flat=True)
            if live_distinct:
                self._remove(ids, live=True)
                return ids
            uniq = torch.unique(ids)
            rows = self._remove(uniq)
            return uniq[rows >= 0]
        if self.eviction is None:
            raise ValueError(f"table {self.name!r} has no eviction policy; set DynamicTableConfig.eviction or pass ids")
        if num is not None:
            victims = self._select_victims(int(num))
            self._remove(victims)
            return victims
        return self._expire()

    def _expire(self, protect: Optional[torch.Tensor] = None, bounded: bool = False) -> torch.Tensor:
        """Remove expired rows: all of them, or (``bounded``, automatic expiry during
        training) those in the next window of a sweep (``eviction.expire_scan_rows`` rows)."""
        if self.eviction is None:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        if bounded:
            victims = expire_window(self, protect)
            if victims.numel():
                self._remove(victims)
            return victims
        keys, rows = self.index.keys_and_rows()
        expired = self.eviction.expired(rows, self._clock())
        if expired is None:
            return keys[:0]
        if protect is not None and protect.numel():
            mask = torch.zeros(self.capacity + 1, dtype=torch.bool, device=self.device)
            mask[protect] = True
            expired = expired & ~mask[rows]
        victims = keys[expired].sort().values
        if victims.numel():
            self._remove(victims)
        return victims

    def attach_store(self, store: Any, write: Optional[Callable[..., Any]] = None) -> Any:
        """Back this table by ``store`` (TierPS, ShardedTierPS: ``dim == self.dim``,
        ``state_dim`` = the optimizer state's width): evicted rows are written to it and
        re-admitted ids read their rows from it (:mod:`gauss_plugins.embedding.backing`).
        Returns the :class:`~gauss_plugins.embedding.backing.StoreBacking`; its ``flush(table)``
        writes every changed resident row."""
        from gauss_plugins.embedding.backing import StoreBacking

        if self.backing is not None:
            raise ValueError(f"table {self.name!r} already has a backing store; detach_store() first")
        self.backing = StoreBacking(self, store, write)
        return self.backing

    def detach_store(self, flush: bool = True) -> None:
        """Stop backing this table (writing every changed resident row first, unless ``flush=False``)."""
        if self.backing is not None and flush:
            self.backing.flush(self)
        self.backing = None

    def default_value(self) -> torch.Tensor:
        """float32[dim]: what ids without a row read (zeros or the "unknown" row)."""
        return self.weight[self.default_row].to(torch.float32).clone()

    # ------------------------------------------------------------------ change tracking
    def _changed_rows(self, version: int, sort: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        rel = version - self._stamp_base
        if rel >= 0 and self._changes.covers(version):
            # O(changed): the log's chunks after `version`, checked against the stamps.
            rows, self.last_changed_scan = self._changes.rows_since(version, self._row_stamp, self._stamp_base,
                                                                    self._scratch)
            rows = rows[rows != self.default_row]  # a trained "unknown" row is stamped too
            ids = self._row_ids.index_select(0, rows)
        else:  # older than the stamp window or the log: scan every row
            ids, rows = self.index.keys_and_rows()
            self.last_changed_scan = rows.numel()
            if rel >= 0:
                sel = self._row_stamp[rows].to(torch.int64) > rel
                ids, rows = ids[sel], rows[sel]
        if not sort:
            return ids, rows
        ids, order = ids.sort()
        return ids, rows.index_select(0, order)

    @torch.no_grad()
    def change_snapshot(self, version: int, deletions: bool = False) -> ChangeSnapshot:
        """What changed after ``version``, taken in O(log chunks) -- call it under the lock
        that guards training -- and resolved into ids and rows by
        :meth:`resolve_change_snapshot` after releasing it (see ``TableSource``). A version
        older than the change log reaches back is resolved here, by a scan.

        ``deletions``: also what :meth:`evicted_since` ``(version)`` would return now, for
        :meth:`resolve_deleted` to work out after the lock is released (raises the same
        ValueError when the table no longer remembers evictions that old)."""
        version = int(version)
        if deletions and version < self._tombstones_since:
            self.evicted_since(version)  # raises, with what to do
        log = self._changes
        if version - self._stamp_base >= 0 and log.covers(version):
            snap = ChangeSnapshot(version, self._version, self._stamp_base, self.default_row, log.tail(version),
                                  log=log, generation=log.generation)
            if deletions:
                snap.tombstones = self._tombstones_after(version)
                snap.inserted = log.inserted_after(version)
            return snap
        ids, rows = self._changed_rows(version, sort=False)
        snap = ChangeSnapshot(version, self._version, self._stamp_base, self.default_row, [], (ids, rows),
                              self.last_changed_scan, log, log.generation)
        if deletions:
            snap.deleted = self.evicted_since(version)
        return snap

    def _tombstones_after(self, version: int) -> List[Tuple[int, torch.Tensor]]:
        """``(version, ids)`` of the tombstone chunks after ``version``, newest first, in
        O(chunks returned) (versions only grow along the list)."""
        out = []
        for i in range(len(self._tombstone_versions) - 1, -1, -1):
            if self._tombstone_versions[i] <= version:
                break
            out.append((self._tombstone_versions[i], self._tombstone_ids[i]))
        return out

    @torch.no_grad()
    def resolve_deleted(self, snap: ChangeSnapshot) -> torch.Tensor:
        """The ids (ascending, distinct) evicted or deleted after ``snap.version`` that were
        not live at ``snap.now``: what :meth:`evicted_since` returned when a
        ``change_snapshot(version, deletions=True)`` was taken, worked out without the hash
        index, so safe while training runs on. An id evicted in that window was live again
        at ``now`` exactly when an insertion gave it a row after its last eviction there
        (only insertions make an id live, and the log keeps their ids)."""
        if snap.deleted is not None:
            return snap.deleted
        empty = torch.empty(0, dtype=torch.int64, device=self.device)
        if not snap.tombstones:
            return empty
        gone = torch.cat([t for _, t in snap.tombstones])
        if not snap.inserted:
            return torch.unique(gone)
        back = torch.cat([t for _, t in snap.inserted])
        # Each event (id, version, is a tombstone), ordered by id then version: an id's last
        # event decides. An id cannot be evicted and inserted at one version (eviction only
        # takes live rows, insertion only absent ids), so the order within a version is moot.
        ids = torch.cat([gone, back])
        version = torch.cat([torch.full((t.numel(),), v, dtype=torch.int64, device=self.device)
                             for v, t in [*snap.tombstones, *snap.inserted]])
        tomb = torch.zeros(ids.numel(), dtype=torch.bool, device=self.device)
        tomb[: gone.numel()] = True
        order = torch.argsort(version, stable=True)
        ids, tomb = ids.index_select(0, order), tomb.index_select(0, order)
        order = torch.argsort(ids, stable=True)
        ids, tomb = ids.index_select(0, order), tomb.index_select(0, order)
        last = torch.ones_like(tomb)
        last[:-1] = ids[1:] != ids[:-1]
        return ids[last & tomb]

    def rows_written_after(self, version: int) -> Optional[List[torch.Tensor]]:
        """The change-log row chunks written after ``version`` (O(chunks); call it under the
        training lock), or None when the log no longer reaches back that far. A reader that
        copied rows without the lock drops the rows in them: those were (re)written since
        ``version``, possibly while it copied."""
        if not self._changes.covers(version):
            return None
        return [chunk[1] for chunk in self._changes.tail(version)]

    def snapshot_is_current(self, snap: ChangeSnapshot) -> bool:
        """Whether the stamps still mean what they meant when ``snap`` was taken: no
        rebase of the stamps and no checkpoint load since (call it under the lock)."""
        return (snap.stamp_base == self._stamp_base and snap.log is self._changes
                and snap.generation == self._changes.generation)

    @torch.no_grad()
    def resolve_change_snapshot(self, snap: ChangeSnapshot, scratch: RowScratch) -> Tuple[torch.Tensor, torch.Tensor]:
        """(ids, rows) of ``snap``, unsorted; safe while training runs on (it reads stamps and
        ids, never the index), with a ``scratch`` of the caller's own. Rows written since the
        snapshot may be missing or carry newer values: check them with
        :meth:`rows_unchanged_since` under the lock."""
        if snap.resolved is not None:
            return snap.resolved
        rows, snap.visited = ChangeLog.filter(snap.chunks, snap.version, self._row_stamp, snap.stamp_base, scratch)
        rows = rows[rows != snap.default_row]  # a trained "unknown" row is stamped too
        return self._row_ids.index_select(0, rows), rows

    @torch.no_grad()
    def gather_change_snapshot(self, snap: ChangeSnapshot,
                               scratch: RowScratch) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids ascending, rows, values in the storage dtype) of ``snap``: what
        :meth:`resolve_change_snapshot` finds, sorted, with the rows copied. With the C++
        index, one call (no lock needed, as there); rows written since the snapshot must be
        dropped by the caller (:meth:`rows_written_after`, :meth:`rows_not_in`)."""
        gather = getattr(self.index.fused, "gather_changed", None)
        if snap.resolved is None and gather is not None:
            base = snap.stamp_base
            ids, rows, values, snap.visited = gather(
                [c[1] for c in snap.chunks], [c[0] - base for c in snap.chunks], [c[2] for c in snap.chunks],
                snap.version - base, self._row_stamp, self._row_ids, self.weight, snap.default_row)
            return ids, rows, values
        ids, rows = self.resolve_change_snapshot(snap, scratch)
        ids, order = ids.sort()
        rows = rows.index_select(0, order)
        return ids, rows, self.weight.index_select(0, rows)

    @torch.no_grad()
    def rows_not_in(self, rows: torch.Tensor, chunks: List[torch.Tensor], scratch: RowScratch) -> torch.Tensor:
        """bool per entry of ``rows``: in none of ``chunks`` (as :meth:`rows_written_after`
        returns them; call it with the lock released)."""
        num_rows = max(int(self._row_stamp.numel()), 1)
        fused = getattr(self.index.fused, "rows_not_in", None)
        if fused is not None:
            return fused(rows, chunks, num_rows)
        written = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        return ~scratch.marked(rows, scratch.mark(written, num_rows))

    @torch.no_grad()
    def rows_unchanged_since(self, rows: torch.Tensor, version: int) -> torch.Tensor:
        """bool per row: it holds a key and was not written after ``version`` (its stamp
        says so), so values read from it since then are its values at ``version``. Rows are
        stamped after every write of their values, and a row given to another id gets a new
        stamp, except on a checkpoint load (:meth:`snapshot_is_current` tells)."""
        rel = int(version) - self._stamp_base
        stamp = self._row_stamp.index_select(0, rows)
        return (stamp >= 0) & (stamp <= rel)

    @torch.no_grad()
    def changed_since(self, version: int, optimizer_state: bool = True,
                      sort: bool = True) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        """(ids, values [N, dim] in the storage dtype, optimizer state by name) of the live
        rows inserted, updated or written after ``version`` (and read in training, with an
        eviction policy that records reads). Ids are ascending unless ``sort=False`` (a
        caller holding a lock may sort after releasing it); ``optimizer_state=False``
        returns ``{}`` instead of copying the state. Costs O(rows changed since
        ``version``) while the change log reaches back that far (:attr:`last_changed_scan`
        says how many entries were visited)."""
        ids, rows = self._changed_rows(int(version), sort=sort)
        state = {k: v.index_select(0, rows) for k, v in self.opt_state.items()} if optimizer_state else {}
        return ids, self.weight.index_select(0, rows), state

    def evicted_since(self, version: int) -> torch.Tensor:
        """Ids (ascending, distinct) evicted or deleted after ``version`` that are not live now."""
        version = int(version)
        if version < self._tombstones_since:
            raise ValueError(f"table {self.name!r} only remembers evictions after version {self._tombstones_since} "
                             f"(tombstone_limit or trim_tombstones dropped older ones); resync fully from "
                             f"changed_since(0)")
        chunks = [t for t, v in zip(self._tombstone_ids, self._tombstone_versions) if v > version]
        if not chunks:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        ids = torch.unique(torch.cat(chunks))
        return ids[self.index.find(ids) < 0]

    # ------------------------------------------------------------------ state (checkpoints)
    def export_state(self, since_version: Optional[int] = None) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
        """Flat CPU tensors + str metadata: the full state, or with ``since_version`` the
        rows changed since then, the evicted ids and the table-wide state. See checkpoint.py."""
        meta = {
            "format": "gauss-dynamic-table/1",
            "kind": "full" if since_version is None else "incremental",
            "config": self.config.to_json(),
            "version": str(self._version),
            "step": str(self._step),
            "tombstones_since": str(self._tombstones_since),
            "backend": type(self.index).__name__,
        }
        tensors: Dict[str, torch.Tensor] = {}
        # The tombstone log (after since_version for an incremental), with its versions.
        after = -1 if since_version is None else int(since_version)
        if since_version is not None and after < self._tombstones_since:
            raise ValueError(f"table {self.name!r} no longer remembers evictions at version {after} "
                             f"(tombstone_limit / trim_tombstones); save a full checkpoint instead")
        chunks = [(t, v) for t, v in zip(self._tombstone_ids, self._tombstone_versions) if v > after]
        tensors["tombstones.ids"] = torch.cat([t for t, _ in chunks]).cpu() if chunks else _EMPTY_LONG
        tensors["tombstones.versions"] = torch.tensor([v for t, v in chunks for _ in range(t.numel())],
                                                      dtype=torch.int64)
        if since_version is None:
            index_state = self.index.state_dict()
            for k, v in index_state.items():
                tensors[f"index.{k}"] = v
            ids, rows = index_state["keys"].to(self.device), index_state["rows"].to(self.device)
        else:
            meta["base_version"] = str(after)
            ids, rows = self._changed_rows(after)
            tensors["ids"] = ids.cpu()
        tensors["weight"] = self.weight[rows].cpu()
        rel = self._row_stamp[rows].to(torch.int64)
        tensors["stamp"] = torch.where(rel > 0, rel + self._stamp_base, torch.zeros_like(rel)).cpu()
        for k, v in self.opt_state.items():
            tensors[f"opt.{k}"] = v[rows].cpu()
            tensors[f"default.opt.{k}"] = v[self.default_row].cpu()
        tensors["default.weight"] = self.weight[self.default_row].cpu()
        if self.eviction is not None:
            for k, v in self.eviction.row_state(rows).items():
                tensors[f"evict.row.{k}"] = v.cpu()
            for k, v in self.eviction.state_dict().items():
                tensors[f"evict.{k}"] = v.cpu()
        for k, v in self.admission.state_dict().items():
            tensors[f"admit.{k}"] = v.cpu()
        return tensors, meta

    @torch.no_grad()
    def import_state(self, tensors: Dict[str, torch.Tensor], meta: Dict[str, str]) -> None:
        """Load what :meth:`export_state` produced: a full state replaces the table; an
        incremental one applies on top of the state at its ``base_version``."""
        if meta.get("format") != "gauss-dynamic-table/1":
            raise ValueError(f"not a dynamic table state (format {meta.get('format')!r})")
        saved = json.loads(meta["config"])
        if saved["dim"] != self.dim:
            raise ValueError(f"checkpoint of table {saved['name']!r} has dim {saved['dim']}, this table has {self.dim}")
        saved_opt = (saved.get("optimizer") or {}).get("name")
        mine = self.rule.name if self.rule is not None else None
        if saved_opt != mine:
            raise ValueError(f"checkpoint optimizer {saved_opt!r} differs from this table's {mine!r}; "
                             f"configure the table with the same optimizer before loading")
        dev = self.device
        if meta["kind"] == "full":
            index_state = {k[len("index."):]: v for k, v in tensors.items() if k.startswith("index.")}
            capacity = int(index_state["capacity"])
            self.index.load_state_dict(index_state)
            self.weight = alloc((capacity + 1, self.dim), self.dtype, dev)
            self._row_stamp = alloc((capacity + 1,), torch.int32, dev, -1)
            self._row_ids = alloc((capacity + 1,), torch.int64, dev, 0)
            # Stamps come from the file; the log starts now (older queries scan once).
            self._changes = ChangeLog(self._change_log_limit(capacity), since=int(meta["version"]))
            self._expire_hand = 0
            self._victim_hand = None
            self._stamp_base = max(0, int(meta["version"]) - _STAMP_LIMIT // 2)
            if self.rule is not None:
                self.opt_state = {n: alloc((capacity + 1, *shape), dt, dev, init)
                                  for n, (shape, dt, init) in self.rule.state_fields(self.dim).items()}
            if self.eviction is not None:
                self.eviction.rows = {}
                self.eviction.resize(capacity + 1, dev)
            rows = index_state["rows"].to(dev)
            self._row_ids[rows] = index_state["keys"].to(dev)
            if self.backing is not None:  # every row number now holds another row
                self.backing.reset(self)
            self._tombstone_ids, self._tombstone_versions = [], []
            self._tombstone_count = 0
            self._tombstones_since = int(meta["tombstones_since"])
            self._append_tombstones(tensors)
        else:
            base = int(meta["base_version"])
            if base != self._version:
                raise ValueError(f"incremental checkpoint of table {self.name!r} applies on version {base}, but the "
                                 f"table is at version {self._version}: load the full checkpoint and the "
                                 f"incrementals in order")
            evicted = torch.unique(tensors["tombstones.ids"].to(dev))
            if evicted.numel():
                gone = self.index.remove(evicted)  # ids re-inserted since are among `ids` below
                self._row_stamp[gone[gone >= 0]] = -1
                self._epoch += 1
            self._append_tombstones(tensors)
            ids = tensors["ids"].to(dev)
            rows = self.index.find(ids)
            missing = rows < 0
            if bool(missing.any()):
                need = int(missing.sum()) - (self.capacity - len(self))
                if need > 0:
                    self._grow(min(self.config.max_capacity, max(len(self) + int(missing.sum()),
                                                                 math.ceil(self.capacity * self.config.growth_factor))))
                new_rows, _ = self.index.insert(ids[missing])
                rows[missing] = new_rows
            self._row_ids[rows] = ids
        self.weight[rows] = tensors["weight"].to(dev, self.dtype)
        self.weight[self.default_row] = tensors["default.weight"].to(dev, self.dtype)
        stamp = tensors["stamp"].to(dev) - self._stamp_base
        self._row_stamp[rows] = stamp.clamp(0, _STAMP_LIMIT).to(torch.int32)
        if meta["kind"] != "full":  # rows keep their saved versions: match them by "newer than"
            self._changes.add(rows, int(meta["version"]), exact=False, ids=ids)
            self._changes.generation += 1
        for k in self.opt_state:
            self.opt_state[k][rows] = tensors[f"opt.{k}"].to(dev, self.opt_state[k].dtype)
            self.opt_state[k][self.default_row] = tensors[f"default.opt.{k}"].to(dev, self.opt_state[k].dtype)
        if self.eviction is not None:
            row_state = {k[len("evict.row."):]: v for k, v in tensors.items() if k.startswith("evict.row.")}
            self.eviction.load_row_state(rows, row_state)
            self.eviction.load_state_dict({k[len("evict."):]: v for k, v in tensors.items()
                                           if k.startswith("evict.") and not k.startswith("evict.row.")})
        self.admission.load_state_dict({k[len("admit."):]: v.to(dev) for k, v in tensors.items() if k.startswith("admit.")})
        self._version = int(meta["version"])
        self._step = int(meta["step"])
        self._epoch += 1
        self._pending = []

    def _append_tombstones(self, tensors: Dict[str, torch.Tensor]) -> None:
        t_ids = tensors["tombstones.ids"].to(self.device)
        t_ver = tensors["tombstones.versions"].to(self.device)
        for v in torch.unique_consecutive(t_ver).tolist():
            self._tombstone_ids.append(t_ids[t_ver == v])
            self._tombstone_versions.append(int(v))
            self._tombstone_count += self._tombstone_ids[-1].numel()

    # nn.Module integration: model.state_dict() / load_state_dict() carry the full table.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        tensors, meta = self.export_state()
        for k, v in tensors.items():
            destination[f"{prefix}{k}"] = v
        destination[f"{prefix}_meta"] = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = f"{prefix}_meta"
        if key not in state_dict:
            if strict:
                missing_keys.append(key)
            return
        meta = json.loads(bytes(state_dict[key].cpu().numpy().tobytes()).decode())
        tensors = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix) and k != key}
        try:
            self.import_state(tensors, meta)
        except Exception as exc:
            error_msgs.append(f"{prefix or 'table'}: {exc}")


def _concat_records(records):
    """One (rows, src, src_idx, scale) for several lookups' gradients: sources stacked,
    indices shifted, missing indices and scales made explicit."""
    rows, srcs, idxs, scales = [], [], [], []
    offset = 0
    any_scale = any(r[3].numel() for r in records)
    for r, src, idx, scale in records:
        n = r.numel()
        rows.append(r)
        srcs.append(src)
        idxs.append((idx if idx.numel() else torch.arange(n, device=src.device)) + offset)
        if any_scale:
            scales.append(scale.to(src.device) if scale.numel() else torch.ones(n, device=src.device))
        offset += src.shape[0]
    scale = torch.cat(scales) if any_scale else _EMPTY_FLOAT
    return torch.cat(rows), torch.cat(srcs), torch.cat(idxs), scale


_EMPTY_LONG = torch.empty(0, dtype=torch.int64)
_EMPTY_FLOAT = torch.empty(0, dtype=torch.float32)
