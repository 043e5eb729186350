"""Safetensors I/O through the library: bit-exact round trips (bf16, sharded), slice reads, and clear errors."""

from __future__ import annotations

import json
import pathlib
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from mtp.checkpoint.safetensors_io import (
    DTYPES,
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    SafetensorsCheckpoint,
    save_safetensors,
)

NUMPY_NATIVE = [n for n in DTYPES if n != "BF16"]  # numpy itself has no bfloat16


def _sample(dtype: np.dtype, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random values spanning the dtype's range (full-range ints, normal floats)."""
    rng = np.random.default_rng(seed)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(shape).astype(dtype)  # also bf16 / float8 via ml_dtypes


def _every_dtype() -> dict[str, np.ndarray]:
    """One matrix, scalar and empty tensor per supported dtype."""
    shapes = {"matrix": (3, 5), "scalar": (), "empty": (0, 4)}
    return {f"{n}.{k}": _sample(DTYPES[n], s, i) for i, n in enumerate(DTYPES) for k, s in shapes.items()}


def _torch_bytes(t: torch.Tensor) -> bytes:
    """Raw bytes of a torch tensor of any dtype (bf16/float8 have no .numpy())."""
    return t.contiguous().flatten().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("name", list(DTYPES))
def test_round_trip_every_dtype(tmp_path: pathlib.Path, name: str) -> None:
    tensors = {k: v for k, v in _every_dtype().items() if k.startswith(f"{name}.")}
    assert save_safetensors(tensors, tmp_path) == [tmp_path / SINGLE_FILE]
    with SafetensorsCheckpoint.open(tmp_path) as ckpt:
        assert ckpt.keys() == sorted(tensors) and ckpt.metadata == {"format": "pt"}
        for key, expected in tensors.items():
            got = ckpt.read(key)
            assert ckpt.dtype(key) == expected.dtype == got.dtype and ckpt.shape(key) == expected.shape
            assert got.shape == expected.shape and got.tobytes() == expected.tobytes()


def test_reads_torch_written_bf16_and_mixed_layout(tmp_path: pathlib.Path) -> None:
    gen = torch.Generator().manual_seed(0)
    ref = {
        "w.bf16": torch.randn(7, 9, generator=gen).to(torch.bfloat16),
        "b.f32": torch.randn(9, generator=gen),
        "ids.i64": torch.arange(5),
        "mask": torch.tensor([True, False, True]),
    }
    safetensors.torch.save_file(ref, tmp_path / SINGLE_FILE, metadata={"format": "pt"})
    ckpt = SafetensorsCheckpoint.open(tmp_path / SINGLE_FILE)
    assert ckpt.dtype("w.bf16") == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(ckpt.read("w.bf16").astype(np.float32), ref["w.bf16"].float().numpy())
    for key, t in ref.items():
        assert ckpt.read(key).tobytes() == _torch_bytes(t) and ckpt.shape(key) == tuple(t.shape)
    # float8 (which the library's numpy reader lacks) is a clear error naming the file, tensor and fix.
    safetensors.torch.save_file({"scales": torch.ones(4).to(torch.float8_e4m3fn)}, tmp_path / "f8.safetensors")
    with pytest.raises(CheckpointError, match=r"f8\.safetensors: tensor 'scales' is F8_E4M3.*re-save"):
        SafetensorsCheckpoint.open(tmp_path / "f8.safetensors").read("scales")


def test_writer_output_loads_in_reference_library(tmp_path: pathlib.Path) -> None:
    tensors = _every_dtype()
    save_safetensors(tensors, tmp_path)
    by_torch = safetensors.torch.load_file(tmp_path / SINGLE_FILE)
    assert sorted(by_torch) == sorted(tensors)
    for key, t in by_torch.items():
        assert tuple(t.shape) == tensors[key].shape and _torch_bytes(t) == tensors[key].tobytes(), key
    bf16 = tensors["BF16.matrix"]
    np.testing.assert_array_equal(by_torch["BF16.matrix"].float().numpy(), bf16.astype(np.float32))
    numpy_only = {k: v for k, v in tensors.items() if k.split(".")[0] in NUMPY_NATIVE}
    save_safetensors(numpy_only, tmp_path / "np")
    by_numpy = safetensors.numpy.load_file(tmp_path / "np" / SINGLE_FILE)
    for key, expected in numpy_only.items():
        assert by_numpy[key].dtype == expected.dtype and by_numpy[key].tobytes() == expected.tobytes(), key


def test_writer_accepts_non_contiguous_and_big_endian(tmp_path: pathlib.Path) -> None:
    base = _sample(np.dtype(np.float32), (4, 6))
    save_safetensors({"t": base.T, "be": base.astype(">f4"), "strided": base[::2, 1::3]}, tmp_path)
    ckpt = SafetensorsCheckpoint.open(tmp_path)
    np.testing.assert_array_equal(ckpt.read("t"), base.T)
    np.testing.assert_array_equal(ckpt.read("be"), base)
    np.testing.assert_array_equal(ckpt.read("strided"), base[::2, 1::3])
    with pytest.raises(Exception, match="dtype"):
        save_safetensors({"s": np.array(["x"])}, tmp_path / "bad")


@pytest.mark.parametrize("dtype", ["F32", "BF16", "I8"])
def test_slices_match_full_read(tmp_path: pathlib.Path, dtype: str) -> None:
    save_safetensors({"w": _sample(DTYPES[dtype], (8, 6, 4))}, tmp_path)
    ckpt = SafetensorsCheckpoint.open(tmp_path)
    full = ckpt.read("w")
    for index in [
        (slice(2, 5), slice(None)),
        (slice(None), slice(1, 6, 2), slice(3, None)),
        (slice(7, 8), slice(0, 0)),
        (3, slice(None), 1),
        (slice(None, None, None),) * 3,
    ]:
        part = ckpt.read("w", index)
        assert part.tobytes() == full[index].tobytes() and part.shape == full[index].shape, index
        assert part.flags.writeable  # a copy, not a read-only view of the file
    with pytest.raises(TypeError, match="slices and ints"):
        ckpt.read("w", (np.array([0, 2]),))  # type: ignore[arg-type]


def test_make_array_from_callback(tmp_path: pathlib.Path) -> None:
    jax = pytest.importorskip("jax")
    w = _sample(np.dtype(ml_dtypes.bfloat16), (6, 4))
    save_safetensors({"w": w}, tmp_path)
    with SafetensorsCheckpoint.open(tmp_path) as ckpt:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        arr = jax.make_array_from_callback(ckpt.shape("w"), sharding, lambda idx: ckpt.read("w", idx))
    assert arr.dtype == w.dtype and np.asarray(arr).tobytes() == w.tobytes()


def test_sharded_round_trip_and_stale_files(tmp_path: pathlib.Path) -> None:
    tensors = {f"layer.{i}": _sample(np.dtype(ml_dtypes.bfloat16), (200,), i) for i in range(7)}  # 400 B each
    tensors["embed"] = _sample(np.dtype(np.float32), (500,))  # 2000 B: oversized, gets its own shard
    written = save_safetensors(tensors, tmp_path, max_shard_bytes=1000)
    assert written[-1] == tmp_path / INDEX_FILE and len(written) == 6
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"] == {"total_size": 4800} and sorted(index["weight_map"]) == sorted(tensors)
    ckpt = SafetensorsCheckpoint.open(tmp_path)
    assert ckpt.keys() == sorted(tensors) and len(ckpt) == 8
    for key, expected in tensors.items():
        assert ckpt.file_of(key) == tmp_path / index["weight_map"][key]
        got = ckpt.read(key)
        assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes()
    assert SafetensorsCheckpoint.open(tmp_path / INDEX_FILE).keys() == ckpt.keys()
    # Re-saving unsharded removes the stale shards and index, and vice versa.
    save_safetensors({"x": np.ones(3, np.float32)}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [SINGLE_FILE]
    save_safetensors(tensors, tmp_path, max_shard_bytes=1000)
    assert SINGLE_FILE not in {p.name for p in tmp_path.iterdir()}
    assert SafetensorsCheckpoint.open(tmp_path).keys() == sorted(tensors)


def test_crash_mid_write_leaves_old_file(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_safetensors({"old": np.zeros(2, np.float32)}, tmp_path)
    before = (tmp_path / SINGLE_FILE).read_bytes()

    def disk_full(tensors, path, metadata=None):
        pathlib.Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        save_safetensors({"new": np.ones(2, np.float32)}, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [SINGLE_FILE]  # no temp file left behind
    assert (tmp_path / SINGLE_FILE).read_bytes() == before


def test_slice_of_large_file_copies_only_the_slice(tmp_path: pathlib.Path) -> None:
    rows, cols = 1 << 15, 1 << 13  # 1 GiB of float32, as a sparse file so the test stays fast
    raw = json.dumps({"big": {"dtype": "F32", "shape": [rows, cols], "data_offsets": [0, rows * cols * 4]}}).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / SINGLE_FILE
    path.write_bytes(len(raw).to_bytes(8, "little") + raw)
    data_start = path.stat().st_size
    marker = np.arange(cols, dtype="<f4")
    with path.open("r+b") as f:
        f.seek(data_start + 1000 * cols * 4)
        f.write(marker.tobytes())
        f.truncate(data_start + rows * cols * 4)
    ckpt = SafetensorsCheckpoint.open(path)
    tracemalloc.start()
    part = ckpt.read("big", (slice(999, 1002), slice(None)))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_array_equal(part[1], marker)
    assert not part[0].any() and not part[2].any()
    assert peak < 4 * part.nbytes, peak  # numpy allocations are traced: nothing near 1 GiB was copied


# Validation errors: each names the file (and key).
def test_directory_without_weights(tmp_path: pathlib.Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"found files: config\.json") as e:
        SafetensorsCheckpoint.open(tmp_path)
    assert str(tmp_path) in str(e.value)
    with pytest.raises(CheckpointError, match="no such file"):
        SafetensorsCheckpoint.open(tmp_path / "nope")


def test_pickle_only_directory(tmp_path: pathlib.Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(CheckpointError, match=r"pickle checkpoints are not supported.*safetensors") as e:
        SafetensorsCheckpoint.open(tmp_path)
    assert str(tmp_path) in str(e.value) and "pytorch_model.bin" in str(e.value)
    with pytest.raises(CheckpointError, match="pickle"):
        SafetensorsCheckpoint.open(tmp_path / "pytorch_model.bin")


def _sharded(tmp_path: pathlib.Path, shards: dict[str, list[str]], weight_map: dict[str, str]) -> None:
    """Write shard files holding the given keys plus an index with the given weight map."""
    for fname, keys in shards.items():
        safetensors.numpy.save_file({k: np.zeros(2, np.float32) for k in keys}, tmp_path / fname)
    (tmp_path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_index_errors(tmp_path: pathlib.Path) -> None:
    s1, s2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    _sharded(tmp_path, {s1: ["a"]}, {"a": s1, "b": s2})
    with pytest.raises(CheckpointError, match=f"{INDEX_FILE}.*shard '{s2}'.*'b'.*missing"):
        SafetensorsCheckpoint.open(tmp_path)
    _sharded(tmp_path, {s1: ["a"], s2: ["b"]}, {"a": s1, "b": s2, "c": s1})
    with pytest.raises(CheckpointError, match=f"{INDEX_FILE}: tensor 'c' is mapped to '{s1}'"):
        SafetensorsCheckpoint.open(tmp_path)
    _sharded(tmp_path, {s1: ["a", "b"], s2: ["b"]}, {"a": s1, "b": s2})
    with pytest.raises(CheckpointError, match=f"{s2}: tensor 'b' also appears in .*{s1}.*duplicate"):
        SafetensorsCheckpoint.open(tmp_path)


@pytest.mark.parametrize(
    "content",
    [b"", b"\x10" + bytes(7) + b'{"w": 1}', (1 << 20).to_bytes(8, "little") + b"{}", b"PK\x03\x04 a zip file"],
    ids=["empty", "bad-header", "header-too-long", "foreign"],
)
def test_corrupt_files(tmp_path: pathlib.Path, content: bytes) -> None:
    path = tmp_path / "weights.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"not a readable safetensors file.*re-download") as e:
        SafetensorsCheckpoint.open(path)
    assert str(path) in str(e.value)


def test_file_truncated_by_a_few_bytes_is_caught_at_open(tmp_path: pathlib.Path) -> None:
    save_safetensors({"a": np.ones((4, 4), np.float32), "z": np.ones(8, np.int64)}, tmp_path)
    path = tmp_path / SINGLE_FILE
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable.*re-download"):
        SafetensorsCheckpoint.open(tmp_path)


def test_unknown_key_and_closed_checkpoint(tmp_path: pathlib.Path) -> None:
    save_safetensors({"model.layers.0.weight": np.ones(2, np.float32)}, tmp_path)
    ckpt = SafetensorsCheckpoint.open(tmp_path)
    assert "model.layers.0.weight" in ckpt and "x" not in ckpt
    with pytest.raises(KeyError, match="did you mean"):
        ckpt.read("model.layer.0.weight")
    ckpt.close()
    with pytest.raises(ValueError, match="closed"):
        ckpt.read("model.layers.0.weight")
