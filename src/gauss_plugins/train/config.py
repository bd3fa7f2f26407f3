"""Experiment configuration: typed dataclasses, loaded from YAML.

A config file has the sections ``data``, ``model``, ``loss``, ``optim``, ``train`` and
``streaming`` (each optional, defaults below are the paper's ML-1M settings) plus a
``name``. Unknown keys are an error naming the key and the keys that exist, so a typo never
silently falls back to a default. YAML is read with pyyaml, an optional dependency of the
``lightning`` extra, imported only here.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

__all__ = [
    "DataConfig",
    "ModelConfig",
    "LossConfig",
    "OptimConfig",
    "TrainConfig",
    "StreamingConfig",
    "ExperimentConfig",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "with_overrides",
]


@dataclass
class DataConfig:
    dataset: str = "ml-1m"            # a registered dataset: ml-100k, ml-1m, ml-20m, seqfile, synthetic...
    path: Optional[str] = None        # file or folder; None: the data folder (data.locate)
    max_len: int = 200                # most recent items fed to the encoder
    # Items excluded from the ranking at evaluation: "window" = the items of the encoder's
    # input (the paper code's invalid_ids), "full" = the user's whole history.
    exclude_history: str = "window"
    options: Dict[str, Any] = field(default_factory=dict)  # extra keyword options of the dataset factory


@dataclass
class ModelConfig:
    arch: str = "hstu"                # hstu | sasrec
    dim: int = 50                     # item embedding dimension = model width
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.2
    attention_dim: int = 25           # HSTU: per-head query/key dimension (paper dqk)
    linear_dim: int = 25              # HSTU: per-head value dimension (paper dv)
    ffn_dim: Optional[int] = None     # SASRec feed-forward width (default: dim)
    item_embedding: str = "dynamic"   # dynamic (DynamicEmbeddingTable) | static (nn.Embedding)
    # HSTU relative attention bias (ignored by SASRec); an ablation is one of these lines
    relative_position_bias: bool = True   # learned bias by relative position
    num_time_buckets: int = 128           # learned bias by log time gap, in this many buckets; 0 = off
    time_bucket_scale: float = 0.301      # bucket width in ln(seconds): floor(ln(|dt|) / scale)
    # HSTU: a LayerNorm after the last block (before the L2 normalisation). The paper's research
    # code has none; select on validation.
    output_norm: bool = True
    # HSTU: learned scale and shift in the encoder's LayerNorms. The paper's research block
    # normalises without them (F.layer_norm with no weight): false there.
    layer_norm_affine: bool = True
    # Initialisation of the learned absolute position embedding of the input: "normal" =
    # N(0, 1/dim) (earlier versions), "truncated_normal" = the same cut at 2 std (the paper code's
    # SASRec), "xavier_normal" = Xavier normal over the [max_len, dim] table (what the paper code's
    # HSTU ends with: its reset_params re-initialises every parameter outside the blocks and the
    # item table).
    position_init: str = "normal"


@dataclass
class LossConfig:
    num_negatives: int = 128
    temperature: float = 0.05
    # One set of num_negatives ids for the whole batch instead of one per position: a batch
    # then reads few rows beyond its own items (what lets an embedding cache hold less than the corpus).
    shared_negatives: bool = False


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: Tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0


@dataclass
class TrainConfig:
    mode: str = "epoch"               # epoch (leave-one-out, paper protocol) | streaming
    max_epochs: int = 101
    batch_size: int = 128
    eval_batch_size: int = 256
    eval_every: int = 1               # validate every N epochs
    monitor: str = "val/ndcg@10"      # model selection metric (higher is better); never a test metric
    early_stopping_patience: Optional[int] = None  # validations without improvement before stopping
    # Epoch mode: after the epoch count is selected on validation, train a fresh model (same seed)
    # on the training prefixes plus the validation items for that many epochs and test it: the
    # papers' code trains on all but the test item. Validation metrics stay the selection run's.
    refit: bool = False
    seed: int = 42
    accelerator: str = "cpu"          # cpu | gpu
    num_threads: Optional[int] = None # torch intra-op threads on CPU (None: torch's default)
    # None or "single": one process. "gauss": GaussStrategy (DDP for dense weights, dynamic tables
    # behind the lookahead embedding cache, replicated across `devices` processes).
    strategy: Optional[str] = None
    devices: int = 1                  # processes under strategy gauss (torchrun's environment overrides it)
    cache_budget_rows: Optional[int] = None  # gauss: rows the item table holds while training (None: all)
    cache_window: int = 8             # gauss: batches the cache looks ahead (the one trained included)
    cache_policy: str = "lookahead"   # gauss: lookahead | lru | lfu (the fetch-on-miss baselines)


@dataclass
class StreamingConfig:
    num_windows: int = 8              # the time-ordered events are cut into this many windows
    epochs_per_window: int = 1


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)

    def validate(self) -> "ExperimentConfig":
        """Raise ``ValueError`` naming the first bad setting."""
        from gauss_plugins.models.retrieval import POSITION_INITS

        checks = [
            (self.model.arch in ("hstu", "sasrec"), f"model.arch must be 'hstu' or 'sasrec', got {self.model.arch!r}"),
            (self.model.item_embedding in ("dynamic", "static"),
             f"model.item_embedding must be 'dynamic' or 'static', got {self.model.item_embedding!r}"),
            (self.train.mode in ("epoch", "streaming"), f"train.mode must be 'epoch' or 'streaming', got {self.train.mode!r}"),
            (self.train.accelerator in ("cpu", "gpu"), f"train.accelerator must be 'cpu' or 'gpu', got {self.train.accelerator!r}"),
            (self.data.exclude_history in ("window", "full"),
             f"data.exclude_history must be 'window' or 'full', got {self.data.exclude_history!r}"),
            (self.data.max_len >= 2, f"data.max_len must be >= 2, got {self.data.max_len}"),
            (self.model.dim >= 1 and self.model.num_blocks >= 1 and self.model.num_heads >= 1,
             "model.dim, num_blocks and num_heads must be >= 1"),
            (0.0 <= self.model.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.model.dropout}"),
            (isinstance(self.model.relative_position_bias, bool),
             f"model.relative_position_bias must be true or false, got {self.model.relative_position_bias!r}"),
            (isinstance(self.model.output_norm, bool),
             f"model.output_norm must be true or false, got {self.model.output_norm!r}"),
            (isinstance(self.model.layer_norm_affine, bool),
             f"model.layer_norm_affine must be true or false, got {self.model.layer_norm_affine!r}"),
            (self.model.position_init in POSITION_INITS,
             f"model.position_init must be one of {', '.join(POSITION_INITS)}, got {self.model.position_init!r}"),
            (isinstance(self.model.num_time_buckets, int) and not isinstance(self.model.num_time_buckets, bool)
             and self.model.num_time_buckets >= 0,
             f"model.num_time_buckets must be a whole number >= 0 (0 turns the time bias off), got "
             f"{self.model.num_time_buckets!r}"),
            (isinstance(self.model.time_bucket_scale, (int, float)) and not isinstance(self.model.time_bucket_scale, bool)
             and math.isfinite(self.model.time_bucket_scale) and self.model.time_bucket_scale > 0,
             f"model.time_bucket_scale must be a positive number (the paper's is 0.301), got "
             f"{self.model.time_bucket_scale!r}"),
            (self.loss.num_negatives >= 1, f"loss.num_negatives must be >= 1, got {self.loss.num_negatives}"),
            (self.loss.temperature > 0, f"loss.temperature must be > 0, got {self.loss.temperature}"),
            (self.optim.lr > 0, f"optim.lr must be > 0, got {self.optim.lr}"),
            (len(self.optim.betas) == 2 and all(0 <= b < 1 for b in self.optim.betas),
             f"optim.betas must be two numbers in [0, 1), got {self.optim.betas}"),
            (self.train.max_epochs >= 1, f"train.max_epochs must be >= 1, got {self.train.max_epochs}"),
            (self.train.batch_size >= 1 and self.train.eval_batch_size >= 1, "batch sizes must be >= 1"),
            (self.train.eval_every >= 1, f"train.eval_every must be >= 1, got {self.train.eval_every}"),
            (self.train.monitor.startswith("val/"), f"train.monitor must be a validation metric (val/...), got "
                                                    f"{self.train.monitor!r}: selecting on test would tune on the test set"),
            (self.streaming.num_windows >= 3, f"streaming.num_windows must be >= 3 (train, validate, test), got "
                                              f"{self.streaming.num_windows}"),
            (self.streaming.epochs_per_window >= 1, "streaming.epochs_per_window must be >= 1"),
            (self.train.strategy in (None, "single", "gauss"),
             f"train.strategy must be 'gauss' or 'single' (or left out), got {self.train.strategy!r}"),
            (_positive_int(self.train.devices), f"train.devices must be a whole number >= 1, got {self.train.devices!r}"),
            (self.train.devices == 1 or self.train.strategy == "gauss",
             f"train.devices = {self.train.devices} needs `strategy: gauss` in the train section (one process "
             f"otherwise trains alone)"),
            (self.train.cache_budget_rows is None or _positive_int(self.train.cache_budget_rows),
             f"train.cache_budget_rows must be a whole number >= 1 or left out, got {self.train.cache_budget_rows!r}"),
            (_positive_int(self.train.cache_window), f"train.cache_window must be a whole number >= 1, got "
                                                     f"{self.train.cache_window!r}"),
            (self.train.cache_policy in ("lookahead", "lru", "lfu"),
             f"train.cache_policy must be lookahead, lru or lfu, got {self.train.cache_policy!r}"),
            (self.train.strategy == "gauss" or (self.train.cache_budget_rows is None and self.train.cache_window == 8
                                                and self.train.cache_policy == "lookahead"),
             "train.cache_budget_rows / cache_window / cache_policy configure the cache of `strategy: gauss`; "
             "set `strategy: gauss` in the train section or remove them"),
            (self.train.strategy != "gauss" or self.model.item_embedding == "dynamic",
             "train.strategy gauss caches the dynamic item table: set model.item_embedding to dynamic"),
            (isinstance(self.train.refit, bool), f"train.refit must be true or false, got {self.train.refit!r}"),
            (not self.train.refit or self.train.mode == "epoch",
             "train.refit retrains on the validation items of the leave-one-out split: it needs train.mode epoch"),
            (not self.train.refit or self.train.devices == 1,
             f"train.refit runs in one process; train.devices = {self.train.devices} is not supported with it "
             "(set refit: false, or train on one device)"),
            (isinstance(self.loss.shared_negatives, bool),
             f"loss.shared_negatives must be true or false, got {self.loss.shared_negatives!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self

    def check_data(self, seqs: Any) -> None:
        """Raise ``ValueError`` when the loaded data cannot feed this config: HSTU's time bias
        (``model.num_time_buckets > 0``) needs timestamps, which a sequence file (e.g. the
        shared ``ml-1m_seq.txt``) does not have. ``seqs`` is a ``UserSequences``."""
        if self.model.arch == "hstu" and self.model.num_time_buckets > 0 and seqs.timestamps is None:
            source = seqs.info.get("source", "") if isinstance(seqs.info, dict) else ""
            raise ValueError(
                f"model.num_time_buckets = {self.model.num_time_buckets} asks for HSTU's time bias, but the data "
                f"({seqs.name or self.data.dataset}{', ' + source if source else ''}) has no timestamps (a sequence "
                "file keeps only the order). Set `num_time_buckets: 0` in the config's model section to train "
                "with the position bias only, or use data with times (for ML-1M, the GroupLens folder with "
                "ratings.dat)")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "loss": LossConfig, "optim": OptimConfig,
             "train": TrainConfig, "streaming": StreamingConfig}


def _build(cls: type, values: Any, where: str) -> Any:
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(known)}")
    kwargs = dict(values)
    if "betas" in kwargs:
        kwargs["betas"] = tuple(float(b) for b in kwargs["betas"])
    for float_key in ("lr", "weight_decay", "temperature", "dropout", "time_bucket_scale"):
        if float_key in kwargs and isinstance(kwargs[float_key], str):
            kwargs[float_key] = float(kwargs[float_key])  # YAML 1.1 reads "1e-3" as a string
    return cls(**kwargs)


def config_from_dict(raw: Dict[str, Any], where: str = "config") -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig` from a plain mapping."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping at the top level, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_SECTIONS) - {"name"})
    if unknown:
        raise ValueError(f"{where}: unknown section(s) {', '.join(unknown)}; known: name, {', '.join(_SECTIONS)}")
    sections = {key: _build(cls, raw.get(key), f"{where}: {key}") for key, cls in _SECTIONS.items()}
    return ExperimentConfig(name=str(raw.get("name", "experiment")), **sections).validate()


CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def packaged_configs() -> List[str]:
    """Names of the configs shipped with the package (``gauss_plugins/configs/*.yaml``)."""
    return sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))


def resolve_config(name_or_path: str) -> str:
    """A config file path: an existing file as given, else a shipped config by name
    (``ml-1m-hstu`` or ``ml-1m-hstu.yaml``)."""
    if os.path.isfile(name_or_path):
        return name_or_path
    base = os.path.basename(name_or_path)
    shipped = os.path.join(CONFIG_DIR, base if base.endswith(".yaml") else base + ".yaml")
    if os.path.isfile(shipped):
        return shipped
    raise FileNotFoundError(f"no config file at {name_or_path}, and no shipped config of that name; "
                            f"shipped: {', '.join(packaged_configs())}")


def load_config(path: str) -> ExperimentConfig:
    """Read a YAML config file, or a shipped config by name (needs pyyaml: the ``lightning``
    extra)."""
    from gauss_plugins._optional import require

    yaml = require("yaml", "lightning", feature="reading YAML configs")
    path = resolve_config(path)
    with open(path, "r", encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML ({exc})") from None
    return config_from_dict(raw, where=path)


def config_to_dict(config: ExperimentConfig) -> Dict[str, Any]:
    """A JSON-friendly copy (tuples become lists)."""
    out = dataclasses.asdict(config)
    out["optim"]["betas"] = list(config.optim.betas)
    return out


def with_overrides(config: ExperimentConfig, **overrides: Any) -> ExperimentConfig:
    """A copy with ``section__key=value`` overrides applied (``None`` values are ignored)."""
    raw = config_to_dict(config)
    for key, value in overrides.items():
        if value is None:
            continue
        section, _, name = key.partition("__")
        if section not in raw or not isinstance(raw[section], dict) or name not in raw[section]:
            raise KeyError(f"no setting {section}.{name}")
        raw[section][name] = value
    return config_from_dict(raw)

