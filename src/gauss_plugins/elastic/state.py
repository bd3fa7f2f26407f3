"""Peer state transfer and disaster checkpoints: one message format for both.

A replica's trainable state is its model's ``state_dict`` plus its optimizer's. The *message*
is a JSON spec (names, dtypes, shapes, the optimizer's scalar state and param groups) and a list
of tensors in spec order. Peers exchange it over ``torch.distributed``: the spec goes as a
uint8 tensor (length first), the tensors as one flat buffer per dtype, so a transfer is a few
broadcasts whatever the number of parameters. A disaster checkpoint is the same message in a
safetensors file (:mod:`gauss_plugins.serialization`: atomic, CRC-checked, no pickle) with the
spec in its metadata. Nothing here unpickles.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Any, Dict, List, Optional, Tuple

import torch

from gauss_plugins.serialization import load_tensors, save_tensors

__all__ = ["pack_state", "unpack_state", "broadcast_state", "save_disaster_checkpoint",
           "load_disaster_checkpoint", "latest_disaster_checkpoint", "FORMAT"]

FORMAT = "gauss.elastic.state/1"
_CKPT_RE = re.compile(r"^disaster-step(\d{10})\.safetensors$")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def pack_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Tuple[dict, List[torch.Tensor]]:
    """``(spec, tensors)`` of the model's and the optimizer's state."""
    spec: Dict[str, Any] = {"format": FORMAT, "model": [], "opt_tensors": [], "opt_scalars": []}
    tensors: List[torch.Tensor] = []
    for name, t in model.state_dict().items():
        spec["model"].append([name, _dtype_name(t.dtype), list(t.shape)])
        tensors.append(t.detach())
    opt = optimizer.state_dict()
    for pid, entries in opt["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                spec["opt_tensors"].append([int(pid), key, _dtype_name(value.dtype), list(value.shape)])
                tensors.append(value.detach())
            elif isinstance(value, (int, float, bool)) or value is None:
                spec["opt_scalars"].append([int(pid), key, value])
            else:
                raise TypeError(f"optimizer state {key!r} of parameter {pid} is a {type(value).__name__}: "
                                "only tensors and numbers can be transferred")
    spec["param_groups"] = opt["param_groups"]
    json.dumps(spec)  # fail here, with the offending value, rather than half-way through a transfer
    return spec, tensors


def _empty_like_spec(spec: dict, device: torch.device) -> List[torch.Tensor]:
    out = [torch.empty(shape, dtype=getattr(torch, dt), device=device) for _, dt, shape in spec["model"]]
    out += [torch.empty(shape, dtype=getattr(torch, dt), device=device) for _, _, dt, shape in spec["opt_tensors"]]
    return out


def unpack_state(spec: dict, tensors: List[torch.Tensor], model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer) -> None:
    """Load a message into ``model`` and ``optimizer`` (both must have the sender's structure)."""
    if spec.get("format") != FORMAT:
        raise ValueError(f"not an elastic state message (format {spec.get('format')!r}, expected {FORMAT!r})")
    n_model = len(spec["model"])
    if len(tensors) != n_model + len(spec["opt_tensors"]):
        raise ValueError(f"message has {len(tensors)} tensors, its spec names "
                         f"{n_model + len(spec['opt_tensors'])}")
    model.load_state_dict({name: t for (name, _, _), t in zip(spec["model"], tensors[:n_model])})
    state: Dict[int, Dict[str, Any]] = {}
    for (pid, key, _, _), t in zip(spec["opt_tensors"], tensors[n_model:]):
        state.setdefault(pid, {})[key] = t
    for pid, key, value in spec["opt_scalars"]:
        state.setdefault(pid, {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": spec["param_groups"]})


def broadcast_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, src: int,
                    device: torch.device) -> int:
    """Give every rank of the default process group ``src``'s state; returns the bytes moved."""
    import torch.distributed as dist

    rank = dist.get_rank()
    if rank == src:
        spec, tensors = pack_state(model, optimizer)
        blob = torch.frombuffer(bytearray(json.dumps(spec).encode("utf-8")), dtype=torch.uint8).to(device)
        length = torch.tensor([blob.numel()], dtype=torch.int64, device=device)
    else:
        length = torch.zeros(1, dtype=torch.int64, device=device)
    dist.broadcast(length, src)
    if rank != src:
        blob = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
    dist.broadcast(blob, src)
    if rank != src:
        spec = json.loads(bytes(blob.cpu().numpy()).decode("utf-8"))
        tensors = _empty_like_spec(spec, device)
    moved = 0
    by_dtype: Dict[torch.dtype, List[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    for dtype in sorted(by_dtype, key=str):  # the same order on every rank
        idx = by_dtype[dtype]
        if rank == src:
            flat = torch.cat([tensors[i].reshape(-1).to(device) for i in idx])
        else:
            flat = torch.empty(sum(tensors[i].numel() for i in idx), dtype=dtype, device=device)
        dist.broadcast(flat, src)
        moved += flat.numel() * flat.element_size()
        if rank != src:
            offset = 0
            for i in idx:
                n = tensors[i].numel()
                tensors[i] = flat[offset:offset + n].view(tensors[i].shape).clone()
                offset += n
    if rank != src:
        unpack_state(spec, tensors, model, optimizer)
    return moved


def save_disaster_checkpoint(directory: str, step: int, cursor: int, model: torch.nn.Module,
                             optimizer: torch.optim.Optimizer, keep: int = 2) -> str:
    """Write the state after ``step`` (``cursor`` samples consumed) atomically; keep the newest ``keep``."""
    spec, tensors = pack_state(model, optimizer)
    path = os.path.join(directory, f"disaster-step{step:010d}.safetensors")
    save_tensors(path, {f"t{i:06d}": t for i, t in enumerate(tensors)},
                 metadata={"gauss.elastic.spec": json.dumps(spec), "gauss.elastic.step": str(step),
                           "gauss.elastic.cursor": str(cursor)})
    for old in _checkpoints(directory)[:-keep]:
        os.unlink(old)
    return path


def _checkpoints(directory: str) -> List[str]:
    found = [p for p in glob.glob(os.path.join(directory, "disaster-step*.safetensors"))
             if _CKPT_RE.match(os.path.basename(p))]
    return sorted(found)


def latest_disaster_checkpoint(directory: str) -> Optional[str]:
    """The newest disaster checkpoint in ``directory``, or None."""
    found = _checkpoints(directory)
    return found[-1] if found else None


def load_disaster_checkpoint(path: str, model: Optional[torch.nn.Module] = None,
                             optimizer: Optional[torch.optim.Optimizer] = None) -> Tuple[int, int]:
    """Verify ``path`` (CRC), load it into ``model``/``optimizer`` when given; returns ``(step, cursor)``."""
    tensors, meta = load_tensors(path, missing_checksum="error")
    try:
        spec = json.loads(meta["gauss.elastic.spec"])
        step, cursor = int(meta["gauss.elastic.step"]), int(meta["gauss.elastic.cursor"])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path} is not an elastic disaster checkpoint ({exc})") from None
    if model is not None and optimizer is not None:
        unpack_state(spec, [tensors[k] for k in sorted(tensors)], model, optimizer)
    return step, cursor
