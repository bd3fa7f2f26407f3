"""The pickle-free tensor file format (safetensors layout, written by hand)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from gauss_plugins.serialization import CHECKSUM_KEY, ChecksumError, load_tensors, read_metadata, save_tensors

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool]


def _sample():
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dt in enumerate(DTYPES):
        base = torch.randn(3, 5, generator=g) * 100
        out[f"t{i}"] = base > 0 if dt == torch.bool else base.to(dt)
    out["scalar"] = torch.tensor(7, dtype=torch.int64)
    out["empty"] = torch.zeros(0, 4)
    out["noncontig"] = torch.arange(12.0).view(3, 4).t()
    return out


def test_roundtrip_every_dtype(tmp_path):
    tensors = _sample()
    path = tmp_path / "x.safetensors"
    save_tensors(path, tensors, {"kind": "full", "n": "3"})
    loaded, meta = load_tensors(path)
    assert meta == {"kind": "full", "n": "3"}
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape
        assert torch.equal(loaded[k], v), k
    assert read_metadata(path) == meta


def test_safetensors_package_reads_ours_and_we_read_theirs(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    from safetensors import safe_open

    tensors = _sample()
    ours = tmp_path / "ours.safetensors"
    save_tensors(ours, tensors, {"a": "b"})
    theirs_loaded = st.load_file(str(ours))
    for k, v in tensors.items():
        assert torch.equal(theirs_loaded[k], v), k
    with safe_open(str(ours), "pt") as f:
        meta = f.metadata()
    assert meta.pop(CHECKSUM_KEY).startswith("crc32:") and meta == {"a": "b"}
    theirs = tmp_path / "theirs.safetensors"
    st.save_file({k: v.contiguous() for k, v in tensors.items()}, str(theirs), metadata={"c": "d"})
    loaded, meta = load_tensors(theirs)
    assert meta == {"c": "d"}
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v), k


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "x.safetensors"
    save_tensors(path, {"a": torch.ones(2)}, {"v": "1"})

    class Boom(dict):
        def items(self):
            yield "a", torch.ones(2)
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        save_tensors(path, Boom(), {"v": "2"})
    assert load_tensors(path)[1] == {"v": "1"}
    assert os.listdir(tmp_path) == ["x.safetensors"]  # no temp file left behind


def test_bad_inputs_and_files(tmp_path):
    with pytest.raises(TypeError, match="str to str"):
        save_tensors(tmp_path / "a", {"a": torch.ones(1)}, {"k": 1})
    with pytest.raises(TypeError, match="torch.Tensor"):
        save_tensors(tmp_path / "a", {"a": [1, 2]})
    with pytest.raises(ValueError, match="__metadata__"):
        save_tensors(tmp_path / "a", {"__metadata__": torch.ones(1)})
    path = tmp_path / "t.safetensors"
    save_tensors(path, {"a": torch.arange(100)})
    data = path.read_bytes()
    path.write_bytes(data[:-8])
    with pytest.raises(ValueError, match="truncated|inconsistent"):
        load_tensors(path)
    path.write_bytes(b"\x01")
    with pytest.raises(ValueError, match="not a tensor file"):
        load_tensors(path)
    path.write_bytes((10).to_bytes(8, "little") + b"not json!!")
    with pytest.raises(ValueError, match="JSON"):
        load_tensors(path)


def test_file_is_pickle_free(tmp_path):
    path = tmp_path / "x.safetensors"
    save_tensors(path, {"a": torch.ones(2)}, {"m": "x"})
    assert b"\x80\x04" not in path.read_bytes()[:64]  # no pickle protocol header
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_len % 8 == 0


def strip_checksum(path) -> None:
    """Rewrite a file as it was written before checksums existed (same tensors and data)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    del header["__metadata__"][CHECKSUM_KEY]
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n:])


@pytest.mark.parametrize("where", ["data", "metadata value", "shape"])
def test_one_changed_byte_is_a_checksum_error(tmp_path, where):
    path = tmp_path / "x.safetensors"
    save_tensors(path, {"w": torch.arange(64.0).view(16, 4), "ids": torch.arange(8)}, {"version": "17"})
    raw = bytearray(path.read_bytes())
    if where == "data":
        raw[-100] ^= 0x01  # one bit of a value of "w"
    else:  # header edits that keep the JSON valid and the layout consistent
        old, new = {"metadata value": (b'"version":"17"', b'"version":"16"'),
                    "shape": (b'"shape":[16,4]', b'"shape":[4,16]')}[where]
        assert raw.count(old) == 1
        raw = raw.replace(old, new)
    path.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match=f"{path}: checksum mismatch .*nothing was loaded"):
        load_tensors(path)


def test_files_without_a_checksum_accept_warn_or_refuse(tmp_path):
    path = tmp_path / "old.safetensors"
    save_tensors(path, {"a": torch.arange(5)}, {"k": "v"})
    strip_checksum(path)
    loaded, meta = load_tensors(path)  # default: accepted (files of other tools have none)
    assert torch.equal(loaded["a"], torch.arange(5)) and meta == {"k": "v"}
    with pytest.warns(UserWarning, match="carries no checksum.*save it again"):
        load_tensors(path, missing_checksum="warn")
    with pytest.raises(ChecksumError, match="carries no checksum"):
        load_tensors(path, missing_checksum="error")
    with pytest.raises(ValueError, match="missing_checksum"):
        load_tensors(path, missing_checksum="maybe")
    with pytest.raises(ValueError, match="reserved"):
        save_tensors(tmp_path / "y", {"a": torch.ones(1)}, {CHECKSUM_KEY: "crc32:00000000"})
    assert not (tmp_path / "y").exists()
