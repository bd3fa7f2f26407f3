"""Load the model ``gauss train`` wrote, and freeze its item rows into a snapshot.

``gauss train`` (and ``gauss demo``) write ``<run>/model.safetensors``: every tensor of the
model (the dynamic table's keys and rows included) plus the experiment config and
``num_items`` as metadata (``gauss_integrations.lightning.fit.save_checkpoint``). The file
is pickle-free and CRC-checked; :func:`load_trained_model` rebuilds the model from the
config stored in it and loads the tensors strictly, so a checkpoint that does not fit the
config is refused with the differing names or shapes.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

__all__ = ["CheckpointMismatchError", "TrainedModel", "item_rows", "load_trained_model"]

CHECKPOINT_FORMAT = "gauss-plugins/retrieval-model/1"
CHECKPOINT_NAME = "model.safetensors"


class CheckpointMismatchError(ValueError):
    """The checkpoint and the config describe different models."""


@dataclass
class TrainedModel:
    model: torch.nn.Module
    config: Any  # ExperimentConfig
    path: str
    num_items: int

    @property
    def version(self) -> str:
        """A name for the model in package metadata: the config name and the checkpoint file."""
        return f"{self.config.name}@{os.path.abspath(self.path)}"


def _checkpoint_path(path: str) -> str:
    if os.path.isdir(path):
        candidate = os.path.join(path, CHECKPOINT_NAME)
        if not os.path.isfile(candidate):
            raise FileNotFoundError(f"{path} is a folder without {CHECKPOINT_NAME}: pass the run folder that "
                                    "`gauss train --output-dir` wrote, or the checkpoint file itself")
        return candidate
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist (expected a run folder or a {CHECKPOINT_NAME})")
    return path


def _differences(a: Any, b: Any, prefix: str = "") -> List[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: List[str] = []
        for key in sorted(set(a) | set(b)):
            out += _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: checkpoint {a!r} vs config {b!r}"]


def load_trained_model(path: str, config: Optional[Any] = None) -> TrainedModel:
    """The trained model of a run folder or checkpoint file, in eval mode on the CPU.

    ``config`` (an ExperimentConfig, e.g. from ``--config``) must describe the same model as
    the one stored in the checkpoint (its ``model`` and ``data.max_len`` settings); any
    difference raises :class:`CheckpointMismatchError` listing them.
    """
    from gauss_plugins.models.builder import build_model
    from gauss_plugins.serialization import load_tensors
    from gauss_plugins.train.config import config_from_dict, config_to_dict

    file = _checkpoint_path(path)
    tensors, meta = load_tensors(file)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointMismatchError(f"{file} is not a retrieval-model checkpoint (format {meta.get('format')!r}, "
                                      f"expected {CHECKPOINT_FORMAT!r})")
    stored = config_from_dict(json.loads(meta["config"]), where=f"{file} (stored config)")
    num_items = int(meta["num_items"])
    if config is not None:
        want, have = config_to_dict(config), config_to_dict(stored)
        diffs = _differences({"model": have["model"], "max_len": have["data"]["max_len"]},
                             {"model": want["model"], "max_len": want["data"]["max_len"]})
        if diffs:
            raise CheckpointMismatchError(f"checkpoint {file} does not match the config: " + "; ".join(diffs[:6])
                                          + ". Pass the config the run was trained with, or omit --config to use "
                                          "the one stored in the checkpoint")
    model = build_model(stored, num_items=num_items, device=torch.device("cpu"))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = "; ".join(line.strip() for line in str(exc).splitlines()[1:4])
        raise CheckpointMismatchError(f"checkpoint {file} does not fit the model its config builds ({first}): "
                                      "it was written by another version or edited") from None
    return TrainedModel(model.eval(), stored, file, num_items)


@torch.no_grad()
def item_rows(model: torch.nn.Module) -> Tuple[torch.Tensor, torch.Tensor, str]:
    """``(ids, rows, embedding_version)`` of every corpus item that has a row: ids ascending
    in ``1..num_items``. Items the dynamic table never saw have no row and are left out, so
    serving them is an error rather than a silent zero vector."""
    items = model.item_embeddings
    ids = torch.arange(1, model.num_items + 1, dtype=torch.int64)
    if items.kind == "dynamic":
        table = items.table
        ids = ids[table.contains(ids)]
        values, _ = table.get(ids)
        return ids, values.float().cpu().contiguous(), f"dynamic-table-v{table.version}"
    if items.kind == "static":
        return ids, items.weight[1:].detach().float().cpu().contiguous(), "static"
    raise TypeError(f"unknown item embeddings {type(items).__name__}")

