"""Checkpoints: safetensors files written atomically, carrying a checksum.

A checkpoint holds named tensors (model, EMA and optimizer state) and string metadata
(step, fundiff version, the hash of the resolved recipe). It is written to a temporary file
in the same directory, flushed, fsynced and renamed over the old one, so a crash leaves
either the old or the new checkpoint, never half of one. Loading only ever goes through
safetensors (no pickle); a file that is truncated, altered or not a safetensors file is
refused with a message that says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import FundiffError

FORMAT_VERSION = "1"


def tensor_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def atomic_write_bytes(path: str, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so that readers see the old or the new file, never a mix."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(path: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> None:
    plain = {name: t.detach().contiguous().cpu().clone() for name, t in tensors.items()}
    meta = {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}
    meta["format_version"] = FORMAT_VERSION
    meta["checksum"] = tensor_checksum(plain)
    atomic_write_bytes(path, st_save(plain, metadata=meta))


def load_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a checkpoint written by :func:`save_checkpoint`; verify format and checksum."""
    try:
        with open(path, "rb") as handle:
            payload = handle.read()
    except FileNotFoundError:
        raise FundiffError(f"no checkpoint at {path}; train the run first (fundiff train RECIPE --run-dir DIR)") from None
    if payload[:2] == b"\x80\x04" or payload[:2] == b"\x80\x02" or payload[:2] == b"PK":
        raise FundiffError(
            f"{path} looks like a pickle / torch.save file; fundiff loads weights only from safetensors "
            "files and never unpickles. Convert it with safetensors in a trusted Python session."
        )
    try:
        tensors = st_load(payload)
        # safetensors exposes metadata only through safe_open; parse the header ourselves
        header_len = int.from_bytes(payload[:8], "little")
        header = json.loads(payload[8 : 8 + header_len])
        metadata = header.get("__metadata__", {}) or {}
    except (SafetensorError, ValueError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FundiffError(
            f"{path} is not a readable safetensors checkpoint (truncated or corrupt: {exc}); "
            "restore it from a backup or train again"
        ) from None
    if metadata.get("format_version") != FORMAT_VERSION:
        raise FundiffError(
            f"{path} has checkpoint format {metadata.get('format_version')!r}, this fundiff reads "
            f"format {FORMAT_VERSION!r}; use the fundiff version that wrote it"
        )
    if metadata.get("checksum") != tensor_checksum(tensors):
        raise FundiffError(f"{path}: checksum mismatch, the checkpoint is corrupt; restore it or train again")
    return tensors, metadata
