"""Hugging Face safetensors checkpoints through the ``safetensors`` library, with errors that say what to fix.

Reading: ``safe_open(file, "numpy").get_slice(key)[index]`` reads only the bytes of one device's shard (bf16
comes back as ``ml_dtypes.bfloat16``). Writing: ``safetensors.numpy.save_file`` per shard, split as
``huggingface_hub`` splits (with the index json), each file written beside its destination and renamed into place
(on remote paths such as ``gs://``, through etils ``epath``, whose objects appear whole once written).
On top sit the checks the library leaves to us: pickle files refused with the conversion command, indexes whose
shards are missing or disagree, unknown keys with near-miss suggestions.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import pathlib
import re
import tempfile
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy
from etils import epath
from huggingface_hub import split_state_dict_into_shards_factory

from mtp.errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_PATTERN = "model{suffix}.safetensors"  # huggingface_hub fills in "-00001-of-00002"
_OWN_FILES_RE = re.compile(r"model(\.safetensors(\.index\.json)?|-\d{5}-of-\d{5}\.safetensors)")
_PICKLE_RE = re.compile(r"pytorch_model.*|.*\.(bin|pt|pth|ckpt|pkl)")
_REDO = "re-download or re-export it"
_PICKLE_HINT = (
    "pickle checkpoints are not supported (loading them can run arbitrary code); convert with "
    "`AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst, safe_serialization=True)` or "
    "`safetensors.torch.save_file(torch.load(f, weights_only=True), 'model.safetensors')`"
)
# The library's dtype names that its numpy reader handles, as numpy dtypes (bf16 through ml_dtypes; it has no fp8).
DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


class CheckpointError(UserError):
    """Bad checkpoint: the message names the file (and key) and says how to fix it."""


def _open_file(path: pathlib.Path):
    try:
        return safetensors.safe_open(path, framework="numpy")
    except (safetensors.SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); {_REDO}") from None


def _index_files(index_path: pathlib.Path) -> dict[str, pathlib.Path]:
    """model.safetensors.index.json as tensor name -> shard file, every shard checked to exist."""
    try:
        weight_map = json.loads(index_path.read_text()).get("weight_map")
    except (UnicodeDecodeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{index_path}: not a JSON object ({e}); {_REDO}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: no 'weight_map' object of tensor name -> shard file; {_REDO}")
    root = index_path.parent
    for name in sorted(set(weight_map.values())):
        if pathlib.PurePath(name).name != name or not (root / name).is_file():
            example = next(k for k, v in weight_map.items() if v == name)
            raise CheckpointError(
                f"{index_path}: shard {name!r} (holding e.g. {example!r}) is missing from {root}; download it, or "
                "regenerate the index"
            )
    return {key: root / name for key, name in weight_map.items()}


class SafetensorsCheckpoint:
    """A model directory's safetensors weights: model.safetensors, or shards listed in its index json."""

    def __init__(self, path: pathlib.Path, files: list[pathlib.Path], index: dict[str, pathlib.Path] | None = None):
        """Use ``SafetensorsCheckpoint.open``."""
        self.path = path
        self._handles = {file: _open_file(file) for file in files}
        self._file_of: dict[str, pathlib.Path] = {}
        for file, handle in self._handles.items():
            for key in handle.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                if key in self._file_of:
                    raise CheckpointError(
                        f"{file}: tensor {key!r} also appears in {self._file_of[key]}; duplicate keys across "
                        "shards are ambiguous, remove one copy and regenerate the index"
                    )
                self._file_of[key] = file
        for key, file in (index or {}).items():
            if self._file_of.get(key) != file:
                found = f" (it is in {self._file_of[key].name})" if key in self._file_of else ""
                raise CheckpointError(
                    f"{path / INDEX_FILE}: tensor {key!r} is mapped to {file.name!r} but that shard lacks it{found}; "
                    "regenerate the index or re-download the shard"
                )
        self.metadata = self._handles[files[0]].metadata() or {}  # of the single file, or of the first shard
        self._closed = False

    @classmethod
    def open(cls, path: str | os.PathLike) -> SafetensorsCheckpoint:
        """Open a directory, .safetensors file or index json; reads headers only."""
        path = pathlib.Path(path)
        if path.is_dir():
            if (path / SINGLE_FILE).is_file():
                return cls(path, [path / SINGLE_FILE])
            if (path / INDEX_FILE).is_file():
                index = _index_files(path / INDEX_FILE)
                return cls(path, sorted(set(index.values())), index)
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
            index = _index_files(path)
            return cls(path.parent, sorted(set(index.values())), index)
        return cls(path, [path])

    def keys(self) -> list[str]:
        """All tensor names, sorted."""
        return sorted(self._file_of)

    def __contains__(self, key: object) -> bool:
        return key in self._file_of

    def __len__(self) -> int:
        return len(self._file_of)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def file_of(self, key: str) -> pathlib.Path:
        """The .safetensors file that holds a tensor (unknown keys suggest near misses)."""
        if key not in self._file_of:
            close = difflib.get_close_matches(key, self._file_of, n=3)
            raise KeyError(f"{key!r} is not in {self.path}" + (f"; did you mean {close}?" if close else ""))
        return self._file_of[key]

    def _slice(self, key: str):
        if self._closed:
            raise ValueError(f"checkpoint {self.path} is closed")
        tensor = self._handles[self.file_of(key)].get_slice(key)
        if tensor.get_dtype() not in DTYPES:
            raise CheckpointError(
                f"{self.file_of(key)}: tensor {key!r} is {tensor.get_dtype()}, which mtp cannot read; re-save the "
                f"checkpoint in one of {', '.join(DTYPES)} (e.g. bf16)"
            )
        return tensor

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def dtype(self, key: str) -> np.dtype:
        """numpy dtype of a tensor (BF16 -> ml_dtypes.bfloat16)."""
        return np.dtype(DTYPES[self._slice(key).get_dtype()])

    def read(self, key: str, index: tuple[slice | int, ...] | None = None) -> np.ndarray:
        """A tensor, or a basic slice of it (as ``jax.make_array_from_callback`` asks for one shard)."""
        index = () if index is None else index if isinstance(index, tuple) else (index,)
        # Fancy indexing would gather the whole tensor; slices and ints read only the needed bytes.
        if any(isinstance(i, bool) or not isinstance(i, slice | int | np.integer) for i in index):
            raise TypeError(f"read({key!r}): index must hold only slices and ints, got {index!r}")
        tensor = self._slice(key)
        # The library, unlike numpy, refuses slice bounds past the end: clip them as numpy would.
        index = tuple(
            i if isinstance(i, int | np.integer) else slice(*i.indices(n))
            for i, n in zip(index, tensor.get_shape(), strict=False)
        )
        try:
            return tensor[index]
        except safetensors.SafetensorError as e:
            raise CheckpointError(f"{self.file_of(key)}: tensor {key!r} could not be read ({e}); {_REDO}") from None

    def close(self) -> None:
        """Drop the open files; later reads raise."""
        self._handles.clear()
        self._closed = True

    def __enter__(self) -> SafetensorsCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _replace_atomically(path: pathlib.Path, write) -> None:
    """``write(tmp)`` beside ``path``, then rename: ``path`` is never half-written."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def is_remote(path: str | os.PathLike) -> bool:
    """A path with a scheme (``gs://bucket/x``): written through epath, never through the local filesystem."""
    return "://" in os.fspath(path)


def save_safetensors(
    tensors: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    *,
    metadata: dict[str, str] | None = None,
    max_shard_bytes: int | None = None,
) -> list[epath.Path]:
    """Saves ``tensors`` into directory ``path`` as transformers does; returns the files written (shards, index)."""
    root = epath.Path(path)
    if root.suffix == ".safetensors" or root.is_file():
        raise ValueError(f"{root}: save_safetensors takes a directory (it writes {SINGLE_FILE} inside)")
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    metadata = {"format": "pt"} if metadata is None else dict(metadata)  # transformers refuses files without it
    # C-contiguous and little-endian, as the format stores them (0-d tensors stay 0-d).
    arrays = {}
    for key in sorted(tensors):
        a = np.asarray(tensors[key])
        arrays[key] = a.astype(a.dtype.newbyteorder("<"), order="C", copy=False)
    split = split_state_dict_into_shards_factory(
        arrays,
        get_storage_size=lambda a: a.nbytes,
        filename_pattern=_SHARD_PATTERN,
        max_shard_size=max_shard_bytes or 2**62,
    )
    root.mkdir(parents=True, exist_ok=True)
    remote = is_remote(path)
    written = []
    for name, keys in split.filename_to_tensors.items():
        shard = {key: arrays[key] for key in keys}
        if remote:
            (root / name).write_bytes(safetensors.numpy.save(shard, metadata))
        else:
            _replace_atomically(root / name, lambda tmp, s=shard: safetensors.numpy.save_file(s, tmp, metadata))
        written.append(root / name)
    if split.is_sharded:
        total = sum(a.nbytes for a in arrays.values())
        index = {"metadata": {"total_size": total}, "weight_map": split.tensor_to_filename}
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        if remote:
            (root / INDEX_FILE).write_text(text)
        else:
            _replace_atomically(root / INDEX_FILE, lambda tmp: pathlib.Path(tmp).write_text(text))
        written.append(root / INDEX_FILE)
    # A stale model.safetensors would shadow new shards (and stale shards confuse HF loaders): remove them.
    for p in root.iterdir():
        if _OWN_FILES_RE.fullmatch(p.name) and p not in written:
            p.unlink()
    return written
