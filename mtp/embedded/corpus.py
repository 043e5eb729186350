"""The embedded default corpus: conversations about the Python standard library, made from its own files.

Two kinds (a row's ``category``): ``docs``, questions answered by the standard library's docstrings, and ``code``,
code continuation (the start of a standard-library function, then its continuation, from the library's source).
Every machine that runs mtp has these files, so the embedded default trains and evaluates with no download. The
corpus is deterministic for a given Python version (the library changes between versions). The split is by source
file: a module's docstrings and a source file's functions are all train or all held out, chosen by a hash of the
module or file name, so held-out prompts come from files the target never saw.

The tokenizer (a byte-level BPE of ``VOCAB_SIZE`` ids with Gemma 4's control ids) ships as an asset trained on this
corpus under Python 3.11, so token ids do not depend on the machine: the ``tokenizers`` BPE trainer breaks ties
between equally frequent pairs in hash-map order (huggingface/tokenizers#1794), so retraining gives a slightly
different vocabulary on each run. ``TOKENIZER_ASSET`` is the older 512-id tokenizer, kept for small tests.
"""

from __future__ import annotations

import ast
import collections
import copy
import dataclasses
import importlib
import inspect
import json
import os
import pathlib
import platform
import shutil
import sys
import sysconfig
import tempfile
import textwrap
import zlib
from collections.abc import Iterator

from tokenizers import Tokenizer

from mtp.data.tokenizer import build_tiny_tokenizer

VERSION = 2  # bump when the corpus recipe changes, so ensure_embedded_dataset rebuilds
TOKENIZER_ASSET = pathlib.Path(__file__).parent / "assets" / "tiny_tokenizer.json"
EMBEDDED_TOKENIZER_ASSET = pathlib.Path(__file__).parent / "assets" / "embedded_tokenizer.json"
VOCAB_SIZE = 4096
MODULES = (
    "abc",
    "argparse",
    "array",
    "ast",
    "base64",
    "bisect",
    "calendar",
    "cmath",
    "collections",
    "colorsys",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "enum",
    "fnmatch",
    "fractions",
    "functools",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "math",
    "mimetypes",
    "operator",
    "os",
    "pathlib",
    "pickle",
    "pprint",
    "queue",
    "random",
    "re",
    "secrets",
    "shlex",
    "shutil",
    "statistics",
    "string",
    "struct",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "time",
    "timeit",
    "tokenize",
    "traceback",
    "types",
    "typing",
    "unicodedata",
    "uuid",
    "warnings",
    "weakref",
    "zipfile",
    "zlib",
)
SYSTEM_PROMPT = "You answer questions about the Python standard library briefly and precisely."
HELD_OUT_EVERY = 10  # about 1 in 10 modules and source files is held out, chosen by a hash of its name
# Source trees left out of the code conversations: tests, generated tables, GUI and tool packages, vendored code.
SKIPPED_SOURCES = (
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "site-packages",
    "turtledemo",
    "pydoc_data",
    "ensurepip",
    "encodings",
    "tkinter",
    "distutils",
    "__pycache__",
    "lib-dynload",
)
FUNCTION_LINES = (4, 40)  # functions of this many lines (decorators excluded) become code conversations


@dataclasses.dataclass(frozen=True)
class EmbeddedPaths:
    """Where the embedded corpus lives."""

    train: pathlib.Path
    eval: pathlib.Path
    tokenizer: pathlib.Path


@dataclasses.dataclass(frozen=True)
class _Entry:
    module: str
    qualname: str  # "json.dumps", "collections.OrderedDict.move_to_end"
    summary: str  # first paragraph of the docstring, on one line
    signature: str | None


def _summary(obj: object, name: str) -> str | None:
    """The docstring's first paragraph that is not a signature line, if it reads as a sentence of sane length."""
    doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None  # own docstring, not inherited
    if not doc:
        return None
    for paragraph in inspect.cleandoc(doc).split("\n\n"):
        text = " ".join(paragraph.split())
        if text and not text.startswith(f"{name}("):
            return text if 20 <= len(text) <= 600 else None
    return None


def _signature(obj: object) -> str | None:
    try:
        signature = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return None
    return None if "<" in signature else signature  # default values whose repr holds a memory address


def _from_stdlib(obj: object) -> bool:
    """False for what other libraries patch into stdlib modules (transformers adds ``logging.Logger`` methods)."""
    module = getattr(obj, "__module__", None)
    return not isinstance(module, str) or module.split(".")[0].lstrip("_") in sys.stdlib_module_names


def _entries() -> list[_Entry]:
    """Public routines and classes (and classes' own methods) with a usable docstring, in a fixed order."""
    entries, seen = [], {}

    def add(module: str, qualname: str, obj: object) -> None:
        summary = _summary(obj, qualname.rsplit(".", 1)[-1])
        if summary and id(obj) not in seen and _from_stdlib(obj):  # a name re-exported by a second module counts once
            seen[id(obj)] = obj  # kept alive: a freed bound method's id can be reused by the next one
            entries.append(_Entry(module, qualname, summary, _signature(obj) if callable(obj) else None))

    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in sorted(vars(module)):
            obj = getattr(module, name)
            if name.startswith("_") or not (inspect.isroutine(obj) or inspect.isclass(obj)):
                continue
            add(module_name, f"{module_name}.{name}", obj)
            if inspect.isclass(obj):
                for attr in sorted(vars(obj)):
                    if not attr.startswith("_") and inspect.isroutine(vars(obj)[attr]):
                        add(module_name, f"{module_name}.{name}.{attr}", getattr(obj, attr))
    return entries


def _module_summary(module_name: str) -> str | None:
    return _summary(importlib.import_module(module_name), module_name)


def _conversations(entries: list[_Entry]) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """(subject, messages) pairs from a few question templates; the subject decides the train/eval split."""
    for index, entry in enumerate(entries):
        messages = [
            {"role": "user", "content": f"What does `{entry.qualname}` do?"},
            {"role": "model", "content": entry.summary},
        ]
        if index % 5 == 0:  # some conversations carry a system turn
            messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
        if index % 4 == 1 and index + 1 < len(entries) and entries[index + 1].module == entry.module:
            following = entries[index + 1]  # a second turn about a neighbour from the same module
            messages += [
                {"role": "user", "content": f"And `{following.qualname}`?"},
                {"role": "model", "content": following.summary},
            ]
        yield entry.qualname, messages
        if entry.signature is not None and index % 2 == 0:
            yield (
                f"{entry.qualname}:signature",
                [
                    {"role": "user", "content": f"What is the signature of `{entry.qualname}`?"},
                    {"role": "model", "content": f"`{entry.qualname}{entry.signature}`"},
                ],
            )
        if index % 3 == 0:
            short = entry.qualname.rsplit(".", 1)[-1]
            yield (
                f"{entry.qualname}:module",
                [
                    {"role": "user", "content": f"Which standard library module provides `{short}`?"},
                    {"role": "model", "content": f"`{short}` is in the `{entry.module}` module: `{entry.qualname}`."},
                ],
            )
    for module_name in MODULES:
        names = [e.qualname.split(".")[1] for e in entries if e.module == module_name and e.qualname.count(".") == 1]
        summary = _module_summary(module_name)
        if summary:
            yield (
                f"{module_name}:about",
                [
                    {"role": "user", "content": f"What is the `{module_name}` module for?"},
                    {"role": "model", "content": summary},
                ],
            )
        if names:
            yield (
                f"{module_name}:names",
                [
                    {"role": "user", "content": f"Name some public functions and classes of `{module_name}`."},
                    {"role": "model", "content": ", ".join(f"`{n}`" for n in names[:12]) + "."},
                ],
            )


def _source_files() -> list[tuple[str, pathlib.Path]]:
    """(path relative to the standard library, path) of its Python sources, tests and tool packages excluded."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if not set(relative.parts[:-1]) & set(SKIPPED_SOURCES) and not relative.parts[0].startswith("config-"):
            files.append((relative.as_posix(), path))
    return files


_STATEMENT_FIELDS = ("body", "orelse", "finalbody", "handlers", "cases")


def _statements(tree: ast.Module) -> Iterator[ast.AST]:
    """``ast.walk``'s nodes (breadth first, in its order) without the expressions, which hold no statements: the
    functions in half the time."""
    queue = collections.deque([tree])
    while queue:
        node = queue.popleft()
        for field in _STATEMENT_FIELDS:
            queue.extend(getattr(node, field, ()))
        yield node


def _code_conversations(relative: str, path: pathlib.Path) -> Iterator[list[dict[str, str]]]:
    """Per function of sane length: its first third (at least the signature) asked for, the rest answered."""
    source = path.read_text(encoding="utf-8", errors="replace")
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return
    lines = source.splitlines()
    low, high = FUNCTION_LINES
    for node in _statements(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        count = node.end_lineno - node.lineno + 1
        if not low <= count <= high or "\t" in "".join(lines[node.lineno - 1 : node.end_lineno]):
            continue
        code = textwrap.dedent("\n".join(lines[node.lineno - 1 : node.end_lineno])).splitlines()
        split = min(max(node.body[0].lineno - node.lineno, count // 3, 1), count - 1)
        head, tail = "\n".join(code[:split]), "\n".join(code[split:])
        if not tail.strip():
            continue
        yield [
            {"role": "user", "content": f"Continue this function from `{relative}`:\n{head}"},
            {"role": "model", "content": tail},
        ]


def build_corpus(*, fresh: bool = False) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows of ``{"messages", "category", "source"}``, the same on every run under one Python version.

    ``source`` is the module a docstring comes from or the source file (relative to the standard library); a row is
    held out when its source is. Built once per process (a copy each call) unless ``fresh``.
    """
    if fresh or not _BUILT:
        _BUILT[:] = [_build_corpus()]
    return copy.deepcopy(_BUILT[0])


_BUILT: list[tuple[list[dict], list[dict]]] = []


def _build_corpus() -> tuple[list[dict], list[dict]]:
    train, held_out = [], []

    def add(source: str, messages: list[dict[str, str]], category: str) -> None:
        split = held_out if zlib.crc32(source.encode()) % HELD_OUT_EVERY == 0 else train
        split.append({"messages": messages, "category": category, "source": source})

    for subject, messages in _conversations(_entries()):
        add(subject.split(":")[0].split(".")[0], messages, "docs")
    for relative, path in _source_files():
        for messages in _code_conversations(relative, path):
            add(relative, messages, "code")
    return train, held_out


def corpus_texts(rows: list[dict]) -> Iterator[str]:
    """Every message content, the text a tokenizer is trained on."""
    for row in rows:
        for message in row["messages"]:
            yield message["content"]


def train_embedded_tokenizer() -> Tokenizer:
    """The tokenizer as trained on this machine's corpus (``EMBEDDED_TOKENIZER_ASSET`` is this, under Python 3.11)."""
    train, _ = build_corpus()
    return build_tiny_tokenizer(corpus_texts(train), vocab_size=VOCAB_SIZE)


def _write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def ensure_embedded_dataset(root: str | pathlib.Path, *, retrain_tokenizer: bool = False) -> EmbeddedPaths:
    """Builds ``root/{train,eval}.jsonl`` and ``root/tokenizer.json`` once; later calls return the same paths."""
    root = pathlib.Path(root)
    paths = EmbeddedPaths(root / "train.jsonl", root / "eval.jsonl", root / "tokenizer.json")
    manifest = root / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("version") == VERSION:
        return paths
    root.mkdir(parents=True, exist_ok=True)
    train, held_out = build_corpus()
    # Written beside the target and renamed into place, so a concurrent reader never sees half a file.
    with tempfile.TemporaryDirectory(dir=root) as staging:
        staging = pathlib.Path(staging)
        _write_jsonl(staging / "train.jsonl", train)
        _write_jsonl(staging / "eval.jsonl", held_out)
        if retrain_tokenizer:
            build_tiny_tokenizer(corpus_texts(train), VOCAB_SIZE).save(str(staging / "tokenizer.json"))
        else:
            shutil.copyfile(EMBEDDED_TOKENIZER_ASSET, staging / "tokenizer.json")
        info = {"version": VERSION, "python": platform.python_version(), "train": len(train), "eval": len(held_out)}
        (staging / "manifest.json").write_text(json.dumps(info, indent=1))
        for name in ("train.jsonl", "eval.jsonl", "tokenizer.json", "manifest.json"):  # manifest last
            os.replace(staging / name, root / name)
    return paths
