"""Streaming, validating reader for Hugging Face safetensors checkpoints (never pickle), plus the writer."""

from __future__ import annotations

import difflib
import json
import math
import os
import pathlib
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from mtp.checkpoint.safetensors_write import DTYPES, INDEX_FILE, SINGLE_FILE, save_safetensors

__all__ = [
    "DTYPES",
    "INDEX_FILE",
    "SINGLE_FILE",
    "CheckpointError",
    "SafetensorsCheckpoint",
    "save_safetensors",
]

# The reference implementation refuses larger headers; a bigger length prefix means a corrupt or foreign file.
_MAX_HEADER_BYTES = 100_000_000
_PICKLE_RE = re.compile(r"pytorch_model.*|.*\.(bin|pt|pth|ckpt|pkl)")
_REDO = "re-download or re-export it"
_PICKLE_HINT = (
    "pickle checkpoints are not supported (loading them can run arbitrary code); convert with "
    "`AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst, safe_serialization=True)` or "
    "`safetensors.torch.save_file(torch.load(f, weights_only=True), 'model.safetensors')`"
)


class CheckpointError(ValueError):
    """Bad checkpoint: the message names the file (and key) and says how to fix it."""


@dataclass(frozen=True)
class _TensorInfo:
    """Where one tensor lives: its file, dtype, shape and byte range within the file's data section."""

    file: pathlib.Path
    dtype: np.dtype
    shape: tuple[int, ...]
    data_start: int
    begin: int
    end: int


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """object_pairs_hook for json.loads that rejects repeated keys (json.loads alone keeps the last)."""
    if len(out := dict(pairs)) != len(pairs):
        raise ValueError(f"duplicate keys {sorted(k for k, c in Counter(k for k, _ in pairs).items() if c > 1)}")
    return out


def _parse_entry(path: pathlib.Path, key: str, entry: Any, data_start: int, file_size: int) -> _TensorInfo:
    """Validate one header entry against the dtype table and the file's actual size."""
    where = f"{path}: tensor {key!r}"
    try:
        name, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if not isinstance(name, str) or not all(type(v) is int and v >= 0 for v in (*shape, begin, end)):
            raise ValueError("dtype must be a string, shape and data_offsets ints >= 0")
    except (TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{where}: malformed header entry {entry!r} ({e}); {_REDO}") from e
    dtype = DTYPES.get(name)
    if dtype is None:
        raise CheckpointError(f"{where}: unknown dtype {name!r}; re-save it as one of {', '.join(DTYPES)}")
    if end - begin != (expected := math.prod(shape) * dtype.itemsize):
        raise CheckpointError(
            f"{where}: data_offsets [{begin}, {end}] span {end - begin} bytes but {name} {list(shape)} needs "
            f"{expected}; the header is corrupt, {_REDO}"
        )
    if data_start + end > file_size:
        raise CheckpointError(
            f"{where}: file is truncated: expected at least {data_start + end} bytes, found {file_size} "
            f"({data_start + end - file_size} missing); {_REDO}"
        )
    return _TensorInfo(path, dtype, shape, data_start, begin, end)


def _read_header(path: pathlib.Path) -> tuple[dict[str, _TensorInfo], dict[str, str]]:
    """Parse and validate one .safetensors file's header (all tensors) without touching tensor data."""
    size = path.stat().st_size
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if not 0 <= n <= min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(
                f"{path}: header length {n} does not fit the file's {size} bytes (truncated, or not a "
                f"safetensors file); {_REDO}"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid header JSON ({e}); {_REDO}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object; {_REDO}")
    metadata = header.pop("__metadata__", None) or {}
    return {key: _parse_entry(path, key, entry, 8 + n, size) for key, entry in header.items()}, metadata


def _read_index(index_path: pathlib.Path) -> tuple[dict[str, _TensorInfo], dict[str, str]]:
    """Resolve model.safetensors.index.json into tensor locations, validating every shard it names."""
    try:
        index = json.loads(index_path.read_text(), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{index_path}: invalid JSON ({e}); {_REDO}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: no 'weight_map' object of tensor name -> shard file; {_REDO}")
    root = index_path.parent
    shards: dict[str, tuple[dict[str, _TensorInfo], dict[str, str]]] = {}
    for fname in sorted(set(weight_map.values())):
        if pathlib.PurePath(fname).name != fname or not (root / fname).is_file():
            example = next(k for k, v in weight_map.items() if v == fname)
            raise CheckpointError(
                f"{index_path}: shard {fname!r} (holding e.g. {example!r}) is missing from {root}; "
                "download it, or regenerate the index"
            )
        shards[fname] = _read_header(root / fname)
    seen: dict[str, pathlib.Path] = {}
    for fname, (tensors, _) in shards.items():
        for key in tensors:
            if key in seen:
                raise CheckpointError(
                    f"{root / fname}: tensor {key!r} also appears in {seen[key]}; duplicate keys across "
                    "shards are ambiguous, remove one copy and regenerate the index"
                )
            seen[key] = root / fname
    out: dict[str, _TensorInfo] = {}
    for key, fname in weight_map.items():
        if (info := shards[fname][0].get(key)) is None:
            found = f" (it is in {seen[key].name})" if key in seen else ""
            raise CheckpointError(
                f"{index_path}: tensor {key!r} is mapped to {fname!r} but that shard lacks it{found}; "
                "regenerate the index or re-download the shard"
            )
        out[key] = info
    return out, next(iter(shards.values()))[1] if shards else {}


class SafetensorsCheckpoint:
    """A model directory's safetensors weights: model.safetensors, or shards listed in its index json."""

    def __init__(self, path: pathlib.Path, tensors: dict[str, _TensorInfo], metadata: dict[str, str]) -> None:
        """Use SafetensorsCheckpoint.open; this only stores already-validated headers."""
        self.path = path
        self.metadata = metadata  # __metadata__ of the single file, or of the first shard
        self._tensors = tensors
        self._maps: dict[pathlib.Path, np.ndarray] = {}
        self._closed = False

    @classmethod
    def open(cls, path: str | os.PathLike) -> SafetensorsCheckpoint:
        """Open a directory, .safetensors file or index json; validates all headers, reads no tensor data."""
        path = pathlib.Path(path)
        if path.is_dir():
            if (path / SINGLE_FILE).is_file():
                return cls(path, *_read_header(path / SINGLE_FILE))
            if (path / INDEX_FILE).is_file():
                return cls(path, *_read_index(path / INDEX_FILE))
            names = sorted(p.name for p in path.iterdir())
            if any(_PICKLE_RE.fullmatch(n) for n in names):
                raise CheckpointError(f"{path}: only pickle files ({', '.join(names)}); {_PICKLE_HINT}")
            raise CheckpointError(
                f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found; found files: "
                f"{', '.join(names) or '(none)'}; pass the model directory or a .safetensors file"
            )
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file or directory; pass a model dir or .safetensors file")
        if _PICKLE_RE.fullmatch(path.name):
            raise CheckpointError(f"{path}: {_PICKLE_HINT}")
        if path.name.endswith(".index.json"):
            return cls(path.parent, *_read_index(path))
        return cls(path, *_read_header(path))

    def keys(self) -> list[str]:
        """All tensor names, sorted."""
        return sorted(self._tensors)

    def __contains__(self, key: object) -> bool:
        """Whether the checkpoint holds a tensor of this name."""
        return key in self._tensors

    def __len__(self) -> int:
        """Number of tensors."""
        return len(self._tensors)

    def __iter__(self) -> Iterator[str]:
        """Tensor names, sorted."""
        return iter(self.keys())

    def _info(self, key: str) -> _TensorInfo:
        """Look a key up, suggesting near misses on failure."""
        if key not in self._tensors:
            close = difflib.get_close_matches(key, self._tensors, n=3)
            raise KeyError(f"{key!r} is not in {self.path}" + (f"; did you mean {close}?" if close else ""))
        return self._tensors[key]

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of a tensor."""
        return self._info(key).shape

    def dtype(self, key: str) -> np.dtype:
        """numpy dtype of a tensor (BF16 -> ml_dtypes.bfloat16)."""
        return self._info(key).dtype

    def file_of(self, key: str) -> pathlib.Path:
        """The .safetensors file that holds a tensor."""
        return self._info(key).file

    def read(self, key: str, index: tuple[slice | int, ...] | None = None) -> np.ndarray:
        """Copy out a tensor, or a basic slice of it (as jax.make_array_from_callback passes one shard)."""
        info = self._info(key)
        if self._closed:
            raise ValueError(f"checkpoint {self.path} is closed")
        if (mm := self._maps.get(info.file)) is None:
            size = info.file.stat().st_size - info.data_start
            # np.memmap refuses empty maps; a file of zero-size tensors has nothing to map.
            mm = np.memmap(info.file, np.uint8, "r", info.data_start, (size,)) if size else np.zeros(0, "u1")
            self._maps[info.file] = mm
        view = mm[info.begin : info.end].view(info.dtype).reshape(info.shape)
        if index is not None:
            index = index if isinstance(index, tuple) else (index,)
            # Fancy indexing could gather the whole tensor; slices/ints keep page faults to the needed bytes.
            if any(isinstance(i, bool) or not isinstance(i, slice | int | np.integer) for i in index):
                raise TypeError(f"read({key!r}): index must hold only slices and ints, got {index!r}")
            view = view[index]
        # Copy so callers never keep the file mapping alive (and device_put never aliases it).
        return np.array(view, copy=True)

    def close(self) -> None:
        """Drop the file mappings; later reads raise."""
        self._maps.clear()
        self._closed = True

    def __enter__(self) -> SafetensorsCheckpoint:
        """Context-manager entry."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close on context exit."""
        self.close()
