"""Pickle-free tensor files in the safetensors layout, written with torch and json only.

Layout (the one the ``safetensors`` package reads and writes)::

    8 bytes     little-endian u64: N, the length of the JSON header
    N bytes     JSON: {"<name>": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]},
                       ..., "__metadata__": {"<str>": "<str>"}}   (space-padded to 8 bytes)
    rest        the tensors' raw little-endian bytes; offsets are relative to this part

The core must not depend on the ``safetensors`` package, so this module writes the format by
hand; a test checks that the files load with the package. Writes are atomic: the file is
written to a temporary name in the same directory, fsynced, then renamed over the target
(``os.replace``), so a reader sees the old file or the new one, never a torn one.

*Checksum.* :func:`save_tensors` stores ``"gauss.checksum": "crc32:<8 hex>"`` in
``__metadata__``: a CRC-32 over the header (as canonical JSON, without that key) followed by the
data section, so one flipped byte anywhere -- a value, a shape, an offset, a metadata string --
is caught. :func:`load_tensors` verifies it before returning anything and raises
:class:`ChecksumError` on a mismatch. Files without the key (written by the ``safetensors``
package, or by this module before checksums existed) load as before unless the caller asks
for ``missing_checksum="warn"`` or ``"error"``. CRC-32 because the threat is bit rot and bad
copies, not an adversary (a malicious file cannot execute code here anyway: nothing unpickles),
and it runs at memory speed through zlib.

Nothing here unpickles: loading a file can never execute code.
"""
from __future__ import annotations

import json
import os
import struct
import sys
import tempfile
import warnings
import zlib
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch

__all__ = ["save_tensors", "load_tensors", "read_metadata", "write_atomic", "ChecksumError", "CHECKSUM_KEY"]

CHECKSUM_KEY = "gauss.checksum"

_DTYPE_TO_CODE = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
}
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"),
                     ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _DTYPE_TO_CODE[getattr(torch, _name)] = _code
_CODE_TO_DTYPE = {code: dtype for dtype, code in _DTYPE_TO_CODE.items()}

# A header larger than this is not a tensor file (the safetensors package uses the same cap).
_MAX_HEADER = 100 * 1024 * 1024

class ChecksumError(ValueError):
    """A tensor file's bytes do not match the checksum stored in it (or it has none and the
    caller required one)."""


def _header_crc(header: Mapping[str, object]) -> int:
    """CRC-32 of the header as canonical JSON, without the checksum entry itself."""
    meta = dict(header.get("__metadata__") or {})
    meta.pop(CHECKSUM_KEY, None)
    body = {k: v for k, v in header.items() if k != "__metadata__"}
    if meta:
        body["__metadata__"] = meta
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8"))


if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("gauss_plugins.serialization supports little-endian hosts only")


def save_tensors(path: str, tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write ``tensors`` (name -> tensor, any device) and ``metadata`` (str -> str) to ``path``.

    Atomic: the file appears complete at ``path`` or not at all. Tensors are copied to CPU;
    sparse, quantized and other exotic tensors are refused. Raises ``TypeError`` /
    ``ValueError`` with the offending name on bad input, before anything is written.
    """
    header: Dict[str, object] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"metadata must map str to str; bad entries: {bad[:5]} (json.dumps values first)")
        if CHECKSUM_KEY in metadata:
            raise ValueError(f"metadata key {CHECKSUM_KEY!r} is reserved for the file's checksum")
        header["__metadata__"] = dict(metadata)
    prepared = []
    for name, tensor in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"tensor names must be strings other than '__metadata__', got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.layout != torch.strided:
            raise TypeError(f"{name!r}: only dense (strided) tensors can be saved, got {tensor.layout}")
        if tensor.dtype not in _DTYPE_TO_CODE:
            raise TypeError(f"{name!r}: dtype {tensor.dtype} has no safetensors code")
        prepared.append((name, tensor.detach().to("cpu").contiguous()))
    # Largest element first, then by name, as the safetensors package does: every tensor then
    # starts at an offset aligned to its element size, so loading needs no copy.
    prepared.sort(key=lambda item: (-item[1].element_size(), item[0]))
    offset = 0
    for name, tensor in prepared:
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _DTYPE_TO_CODE[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    crc = _header_crc(header)
    for _, tensor in prepared:
        if tensor.numel():
            crc = zlib.crc32(tensor.reshape(-1).view(torch.uint8).numpy().data, crc)
    header.setdefault("__metadata__", {})[CHECKSUM_KEY] = f"crc32:{crc:08x}"
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)

    def chunks():
        yield struct.pack("<Q", len(header_bytes))
        yield header_bytes
        for _, tensor in prepared:
            if tensor.numel():
                yield tensor.reshape(-1).view(torch.uint8).numpy().data

    write_atomic(path, chunks())


def write_atomic(path, chunks: Iterable) -> None:
    """Write the byte chunks to ``path`` atomically: a temporary file beside it, fsync,
    rename over ``path``, fsync of the folder. A failure leaves ``path`` as it was and no
    temporary file behind."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Make the rename itself durable (best effort: some filesystems refuse)."""
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _read_header(f, path: str) -> Tuple[dict, int]:
    raw = f.read(8)
    if len(raw) != 8:
        raise ValueError(f"{path}: not a tensor file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", raw)
    if n > _MAX_HEADER:
        raise ValueError(f"{path}: not a tensor file (header length {n} is implausible)")
    blob = f.read(n)
    if len(blob) != n:
        raise ValueError(f"{path}: truncated header ({len(blob)} of {n} bytes)")
    try:
        header = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is not a JSON object")
    return header, 8 + n


def read_metadata(path: str) -> Dict[str, str]:
    """Only the ``__metadata__`` of a tensor file (reads the header, not the data, so nothing
    is verified; the checksum entry is left out)."""
    with open(path, "rb") as f:
        header, _ = _read_header(f, os.fspath(path))
    meta = dict(header.get("__metadata__") or {})
    meta.pop(CHECKSUM_KEY, None)
    return meta


def load_tensors(path: str, missing_checksum: str = "accept") -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Read a file written by :func:`save_tensors` (or by the safetensors package).

    Returns ``(tensors, metadata)``; tensors are writable CPU tensors (views into one buffer read from the file; no copies).
    The stored checksum is verified before anything is returned: :class:`ChecksumError` on a
    mismatch. A file without
    one is loaded (``missing_checksum="accept"``), loaded with a warning (``"warn"``) or refused
    (``"error"``). Raises ``ValueError`` naming the problem for a truncated or malformed file.
    """
    if missing_checksum not in ("accept", "warn", "error"):
        raise ValueError(f"missing_checksum must be 'accept', 'warn' or 'error', got {missing_checksum!r}")
    path = os.fspath(path)
    with open(path, "rb") as f:
        header, start = _read_header(f, path)
        f.seek(0, os.SEEK_END)
        data_len = f.tell() - start
        f.seek(start)
        data = bytearray(data_len)
        if f.readinto(data) != data_len:
            raise ValueError(f"{path}: could not read {data_len} data bytes")
    # Layout problems (a truncated file) are reported first, as the more specific error;
    # the checksum is verified before anything is returned.
    metadata = dict(header.get("__metadata__") or {})
    metadata.pop(CHECKSUM_KEY, None)
    tensors: Dict[str, torch.Tensor] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _CODE_TO_DTYPE[entry["dtype"]]
            shape = [int(s) for s in entry["shape"]]
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: malformed header entry for {name!r}: {entry!r}") from None
        numel = 1
        for s in shape:
            numel *= s
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not (0 <= begin <= end <= data_len) or end - begin != numel * itemsize:
            raise ValueError(f"{path}: tensor {name!r} has offsets {begin}..{end} inconsistent with "
                             f"shape {shape} {entry['dtype']} and {data_len} data bytes (truncated file?)")
        if numel == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        if begin % itemsize == 0:
            flat = torch.frombuffer(data, dtype=torch.uint8, count=end - begin, offset=begin).view(dtype)
        else:  # written by another tool without alignment: copy to aligned memory
            flat = torch.frombuffer(bytearray(data[begin:end]), dtype=torch.uint8).view(dtype)
        tensors[name] = flat.view(shape)
    _verify_checksum(path, header, data, missing_checksum)
    return tensors, metadata


def _verify_checksum(path: str, header: dict, data: bytearray, missing: str) -> None:
    stored = (header.get("__metadata__") or {}).get(CHECKSUM_KEY)
    if stored is None:
        if missing == "accept":
            return
        msg = (f"{path} carries no checksum (written before checksums existed, or by another tool), so damage to "
               f"it cannot be detected; save it again to add one")
        if missing == "error":
            raise ChecksumError(msg)
        warnings.warn(msg, stacklevel=3)
        return
    if not (isinstance(stored, str) and stored.startswith("crc32:")):
        raise ChecksumError(f"{path}: unknown checksum {stored!r} (expected 'crc32:<hex>'): the file was written "
                            f"by a newer gauss-plugins or damaged")
    computed = f"crc32:{zlib.crc32(data, _header_crc(header)):08x}"
    if computed != stored:
        raise ChecksumError(f"{path}: checksum mismatch (stored {stored}, computed {computed}): the file was damaged "
                            f"after it was written; nothing was loaded. Use another copy or an earlier checkpoint.")
