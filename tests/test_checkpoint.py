"""Checkpoints: atomic safetensors with a checksum; corrupt or pickled files are refused."""

from __future__ import annotations

import pickle

import pytest
import torch

from fundiff import FundiffError
from fundiff.checkpoint import load_checkpoint, save_checkpoint


def test_round_trip_keeps_tensors_and_metadata(tmp_path):
    path = str(tmp_path / "c.safetensors")
    tensors = {"a": torch.arange(5.0), "b.c": torch.ones(2, 3, dtype=torch.bfloat16), "s": torch.tensor(3.0)}
    save_checkpoint(path, tensors, {"step": "7", "extra": {"k": 1}})
    loaded, meta = load_checkpoint(path)
    assert loaded.keys() == tensors.keys()
    for k in tensors:
        assert torch.equal(loaded[k], tensors[k])
    assert meta["step"] == "7" and meta["extra"] == '{"k": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temporary left behind


def test_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(str(path), {"a": torch.randn(100)}, {})
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(FundiffError, match="truncated or corrupt"):
        load_checkpoint(str(path))


def test_flipped_byte_fails_the_checksum(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(str(path), {"a": torch.zeros(100)}, {})
    payload = bytearray(path.read_bytes())
    payload[-3] ^= 0xFF  # inside the tensor data, header intact
    path.write_bytes(bytes(payload))
    with pytest.raises(FundiffError, match="checksum"):
        load_checkpoint(str(path))


def test_pickle_files_are_never_unpickled(tmp_path):
    path = tmp_path / "model.pt"
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path.write_bytes(pickle.dumps(Exploit(), protocol=4))
    with pytest.raises(FundiffError, match="never unpickles"):
        load_checkpoint(str(path))
    assert not marker.exists()


def test_missing_checkpoint_names_the_fix(tmp_path):
    with pytest.raises(FundiffError, match="fundiff train"):
        load_checkpoint(str(tmp_path / "nope.safetensors"))
