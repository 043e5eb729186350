"""Training rows via ``datasets``: local JSONL / Parquet / text files (paths, directories, globs) or a hub data set.

A row is ``{"messages": [{role, content}, ...]}``, ``{"text": ...}`` or ``{"prompt": ..., "response": ...}``. Every
row is checked when loaded, and a bad one raises an error naming its file, its row number and what is wrong.
"""

from __future__ import annotations

import bisect
import glob
import json
import operator
import pathlib
from collections.abc import Sequence

import datasets
from etils import epath

from mtp.data.chat import RowError, parse_row
from mtp.errors import UserError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


class DataSourceError(UserError):
    """A data source cannot be found, read, or holds a malformed row."""


class Rows(Sequence):
    """Several loaded files as one random-access sequence of rows that remembers where each row came from."""

    def __init__(self, parts: Sequence[tuple[str, datasets.Dataset]]):
        self.parts = list(parts)
        self._starts = [0]
        for _, part in self.parts:
            self._starts.append(self._starts[-1] + len(part))

    def __len__(self) -> int:
        return self._starts[-1]

    def _find(self, index: int) -> tuple[int, int]:
        """(part, offset within the part) of row ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        part = bisect.bisect_right(self._starts, index) - 1
        return part, index - self._starts[part]

    def locate(self, index: int) -> tuple[str, int]:
        """(source name, 1-based row number within it) of row ``index``."""
        part, offset = self._find(index)
        return self.parts[part][0], offset + 1

    def __getitem__(self, index: int) -> dict:  # grain reads rows one index at a time
        index = operator.index(index)  # numpy integers too; slices are refused
        part, offset = self._find(index + len(self) if index < 0 else index)
        return self.parts[part][1][offset]


def _remote_glob(spec: str) -> list[epath.Path]:
    """``gs://bucket/dir/chats-*.jsonl``: the pattern from the first part that holds a wildcard, through epath."""
    parts = spec.split("/")
    first = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
    return list(epath.Path("/".join(parts[:first])).glob("/".join(parts[first:])))


def _local_files(spec: str) -> list[epath.Path]:
    """The files of a path, directory or glob; local or remote (``gs://...``, through etils epath)."""
    path = epath.Path(spec)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in BUILDERS)
    if "://" in spec and any(c in spec for c in "*?["):
        return sorted(p for p in _remote_glob(spec) if p.is_file())
    if "://" in spec:
        return [path] if path.is_file() else []
    return sorted(epath.Path(p) for p in glob.glob(spec, recursive=True) if pathlib.Path(p).is_file())


def _is_local(spec: str) -> bool:
    """A file path or glob (local or remote) rather than a hub data set name."""
    return (
        "://" in spec
        or pathlib.Path(spec).exists()
        or any(c in spec for c in "*?[")
        or pathlib.Path(spec).suffix in BUILDERS
    )


def _first_bad_json_line(path: epath.Path) -> str | None:
    """Where datasets could not parse a JSONL file, the first line that is not a JSON object, if any."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                if not isinstance(json.loads(line), dict):
                    return f"{path} line {number}: not a JSON object."
            except json.JSONDecodeError as e:
                return f"{path} line {number}: not valid JSON ({e})."
    return None


def _load_file(path: epath.Path, cache_dir: str | None) -> datasets.Dataset:
    builder = BUILDERS.get(path.suffix)
    if builder is None:
        raise DataSourceError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(BUILDERS)}.")
    # Plain text becomes one LM document per blank-line separated paragraph.
    extra = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files=[str(path)], split="train", cache_dir=cache_dir, **extra)
    except Exception as e:  # datasets wraps parse errors in several exception types
        detail = _first_bad_json_line(path) if builder == "json" else None
        raise DataSourceError(detail or f"{path}: datasets could not read it: {e}") from e


def _load_hub(name: str, split: str, cache_dir: str | None) -> datasets.Dataset:
    try:
        return datasets.load_dataset(name, split=split, cache_dir=cache_dir)
    except Exception as e:
        raise DataSourceError(
            f"Could not load {name!r} (split {split!r}) from the Hugging Face hub. It is not a local file or glob, so "
            f"it was taken for a hub data set name; this machine may not reach the hub (or the name is wrong): {e}"
        ) from e


def validate(rows: Rows) -> None:
    """Raises ``DataSourceError`` naming the file and row of the first malformed row."""
    for name, part in rows.parts:
        for number, row in enumerate(part, start=1):
            try:
                parse_row(row)
            except RowError as e:
                raise DataSourceError(f"{name} row {number}: {e}") from None


def load_rows(
    sources: str | Sequence[str], *, split: str = "train", cache_dir: str | None = None, check: bool = True
) -> Rows:
    """Rows of every source in order: local files, directories and globs, or hub data set names."""
    specs = [sources] if isinstance(sources, str) else list(sources)
    if not specs:
        raise DataSourceError("No data sources given.")
    parts = []
    for spec in specs:
        if _is_local(spec):
            files = _local_files(spec)
            if not files:
                raise DataSourceError(f"No data files match {spec!r} (supported: {sorted(BUILDERS)}).")
            parts += [(str(f), _load_file(f, cache_dir)) for f in files]
        else:
            parts.append((f"{spec}[{split}]", _load_hub(spec, split, cache_dir)))
    rows = Rows(parts)
    if check:
        validate(rows)
    return rows
