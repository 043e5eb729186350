"""Atomic, HF-compatible safetensors writer, plus the format's dtype table shared with the reader."""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import re
import sys
import tempfile
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import ml_dtypes  # noqa: F401  (registers the bfloat16 / float8 dtype names with numpy)
import numpy as np

if sys.byteorder != "little":  # safetensors is little-endian and ml_dtypes types have no byte-swapped form
    raise ImportError("mtp.checkpoint safetensors I/O supports little-endian hosts only")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DTYPE_TABLE = (  # safetensors dtype name : numpy dtype (the file format is little-endian)
    "F64:<f8 F32:<f4 F16:<f2 BF16:bfloat16 F8_E4M3:float8_e4m3fn F8_E5M2:float8_e5m2 C64:<c8 "
    "I64:<i8 I32:<i4 I16:<i2 I8:i1 U64:<u8 U32:<u4 U16:<u2 U8:u1 BOOL:?"
)
DTYPES: dict[str, np.dtype] = {n: np.dtype(t) for n, t in (e.split(":") for e in _DTYPE_TABLE.split())}
_NAMES: dict[np.dtype, str] = {dt: name for name, dt in DTYPES.items()}
_OWN_FILES_RE = re.compile(r"model(\.safetensors(\.index\.json)?|-\d{5}-of-\d{5}\.safetensors)")


def _atomic_write(path: pathlib.Path, write: Callable[[BinaryIO], object]) -> None:
    """Write to a temp file beside `path`, fsync, then rename, so `path` is never half-written."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_file(path: pathlib.Path, arrays: Mapping[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write one .safetensors file byte-compatible with the reference (Rust) writer."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, a in arrays.items():
        header[key] = {
            "dtype": _NAMES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)  # the reference pads with spaces so the data section is 8-byte aligned

    def write(f: BinaryIO) -> None:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for a in arrays.values():
            f.write(a.reshape(-1).view(np.uint8).data)

    _atomic_write(path, write)


def _split(sizes: dict[str, int], max_shard_bytes: int | None) -> list[list[str]]:
    """Greedy sharding exactly as huggingface_hub's split_state_dict_into_shards_factory does it."""
    limit = math.inf if max_shard_bytes is None else max_shard_bytes
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for key, size in sizes.items():
        if size > limit:  # an oversized tensor gets a shard of its own
            shards.append([key])
            continue
        if current_size + size > limit:
            shards.append(current)
            current, current_size = [], 0
        current.append(key)
        current_size += size
    return [*shards, current] if current or not shards else shards


def save_safetensors(
    tensors: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    *,
    metadata: dict[str, str] | None = None,
    max_shard_bytes: int | None = None,
) -> list[pathlib.Path]:
    """Save tensors into directory `path` as HF does; returns the files written (shards, then any index)."""
    root = pathlib.Path(path)
    if root.suffix == ".safetensors" or root.is_file():
        raise ValueError(f"{root}: save_safetensors takes a directory (it writes {SINGLE_FILE} inside)")
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    # transformers refuses safetensors files without {"format": "pt"}.
    metadata = {"format": "pt"} if metadata is None else dict(metadata)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError(f"metadata must map str -> str, got {metadata!r}")
    arrays: dict[str, np.ndarray] = {}
    for key in sorted(tensors):
        if not isinstance(key, str) or key == "__metadata__":
            raise ValueError(f"invalid tensor name {key!r}")
        a = np.asarray(tensors[key])
        dtype = a.dtype.newbyteorder("=")  # big-endian input is byte-swapped to the file's little-endian
        if dtype not in _NAMES:
            raise TypeError(f"tensor {key!r}: dtype {a.dtype} is not storable; use one of {', '.join(DTYPES)}")
        arrays[key] = a.astype(dtype, order="C", copy=False)
    shards = _split({k: a.nbytes for k, a in arrays.items()}, max_shard_bytes)
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    root.mkdir(parents=True, exist_ok=True)
    for name, keys in zip(names, shards, strict=True):
        _write_file(root / name, {k: arrays[k] for k in sorted(keys)}, metadata)
    written = [root / name for name in names]
    if n > 1:
        weight_map = {k: name for name, keys in zip(names, shards, strict=True) for k in keys}
        index = {"metadata": {"total_size": sum(a.nbytes for a in arrays.values())}, "weight_map": weight_map}
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        _atomic_write(root / INDEX_FILE, lambda f: f.write(text.encode()))
        written.append(root / INDEX_FILE)
    # A stale model.safetensors would shadow new shards (and stale shards confuse HF loaders): remove them.
    for p in root.iterdir():
        if _OWN_FILES_RE.fullmatch(p.name) and p not in written:
            p.unlink()
    return written
