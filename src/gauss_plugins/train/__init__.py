"""Framework-neutral training pieces: configs, batching, the streaming windows, reports.

The training loops themselves live in the framework adapters, which register them as
``trainer`` components (:mod:`gauss_plugins.train.trainers`).
"""
from gauss_plugins.train.config import (
    DataConfig,
    ExperimentConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    StreamingConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    with_overrides,
)

__all__ = [
    "DataConfig",
    "ExperimentConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "StreamingConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "with_overrides",
]
