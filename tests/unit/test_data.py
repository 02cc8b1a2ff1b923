"""Loaders on small files written by the tests; clear errors naming bad files."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.core import data as datasets
from services.core.errors import DataError, InvalidArgument


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_digits_has_17_levels_labels_and_8x8_images() -> None:
    data = datasets.load("digits")
    assert len(data) == 1797 and data.shape == (1, 8, 8)
    assert data.levels == 17 and int(data.values.max()) == 16
    assert data.num_classes == 10 and data.labels is not None


def test_split_is_deterministic_and_disjoint() -> None:
    data = datasets.load("digits")
    a, b = datasets.split(data), datasets.split(data)
    np.testing.assert_array_equal(a.test.values, b.test.values)
    sizes = (len(a.train), len(a.val), len(a.test))
    assert sum(sizes) == 1797 and min(sizes) > 0
    index = np.arange(len(data))
    parts = [datasets.split(datasets.Dataset(index[:, None], None, len(data)), seed=0)]
    ids = [set(p.values[:, 0].tolist()) for p in (parts[0].train, parts[0].val, parts[0].test)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert set().union(*ids) == set(index.tolist())


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_raw_and_gz(tmp_path: Path, compress: bool) -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    labels = np.array([0, 1, 2, 3, 9])
    suffix = ".gz" if compress else ""
    for name, arr in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        raw = _idx(arr)
        (tmp_path / (name + suffix)).write_bytes(gzip.compress(raw) if compress else raw)
    data = datasets.load(f"mnist:{tmp_path}")
    assert data.shape == (1, 28, 28) and data.levels == 256
    np.testing.assert_array_equal(data.values[:, 0], images)
    np.testing.assert_array_equal(data.labels, labels)


def test_truncated_idx_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(_idx(np.zeros((5, 28, 28)))[:-100])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: truncated"):
        datasets.load(f"mnist:{tmp_path}")
    bad.write_bytes(b"\x01\x02garbage")
    with pytest.raises(DataError, match="bad magic"):
        datasets.load(f"mnist:{bad}")
    gz = tmp_path / "x-images-idx3-ubyte.gz"
    gz.write_bytes(b"not gzip")
    with pytest.raises(DataError, match="gzip"):
        datasets.read_idx(gz)


def _cifar_batch(path: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"labels": rng.integers(0, 10, n).tolist()}
    path.write_bytes(pickle.dumps(batch))


def test_cifar10_batches(tmp_path: Path) -> None:
    _cifar_batch(tmp_path / "data_batch_1", 4, 0)
    _cifar_batch(tmp_path / "test_batch", 3, 1)
    (tmp_path / "batches.meta").write_bytes(
        pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    data = datasets.load(f"cifar10:{tmp_path}")
    assert len(data) == 7 and data.shape == (3, 32, 32) and data.class_names[3] == "c3"


def test_cifar10_refuses_pickled_code_and_truncation(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # would run a command if unpickled naively
            return (print, ("pwned",))

    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(DataError, match="data_batch_1: not a CIFAR-10 python batch"):
        datasets.load(f"cifar10:{tmp_path}")
    _cifar_batch(tmp_path / "data_batch_1", 4, 0)
    raw = (tmp_path / "data_batch_1").read_bytes()
    (tmp_path / "data_batch_1").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="data_batch_1"):
        datasets.load(f"cifar10:{tmp_path}")


def test_image_folder_with_class_subfolders(tmp_path: Path) -> None:
    for k, name in enumerate(["cat", "dog"]):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("L", (10, 10), color=40 * (k + i)).save(tmp_path / name / f"{i}.png")
    data = datasets.load(f"folder:{tmp_path}?size=8")
    assert data.shape == (1, 8, 8) and data.class_names == ["cat", "dog"]
    np.testing.assert_array_equal(data.labels, [0, 0, 0, 1, 1, 1])
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"broken\.png"):
        datasets.load(f"folder:{tmp_path}?size=8")


def test_npz_arrays(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4), y=np.array([1, 0]))
    data = datasets.load(f"npz:{path}")
    assert data.shape == (1, 4, 4) and data.levels == 256 and data.num_classes == 2
    np.savez(path, images=np.zeros((2, 4, 4), dtype=np.int16))
    assert datasets.load(f"npz:{path}?x=images&levels=4").levels == 4
    with pytest.raises(DataError, match="no array named 'x'"):
        datasets.load(f"npz:{path}")
    path.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(DataError, match=r"d\.npz"):
        datasets.load(f"npz:{path}")


def test_text_character_level(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("hello world, héllo again! " * 10, encoding="utf-8")
    data = datasets.load(f"text:{path}?seq_len=16")
    assert data.kind == "text" and data.shape == (16,) and data.labels is None
    assert "é" in data.vocab and data.levels == len(data.vocab)
    assert datasets.decode_text(data.values[:1], data.vocab)[0] == ("hello world, héllo again! " * 10)[:16]
    path.write_bytes(b"\xff\xfe bad utf8")
    with pytest.raises(DataError, match=r"t\.txt: not valid UTF-8"):
        datasets.load(f"text:{path}")


def test_bad_specs_are_clear() -> None:
    with pytest.raises(InvalidArgument, match="unknown data kind 'imagenet'"):
        datasets.load("imagenet:/x")
    with pytest.raises(DataError, match="no such file"):
        datasets.load("mnist:/definitely/not/here")
    with pytest.raises(InvalidArgument, match="unknown options"):
        datasets.load("digits?colour=1")
    assert len(datasets.load("digits?limit=10")) == 10


def test_patches_of_the_sklearn_photographs() -> None:
    data = datasets.load("patches:sklearn")
    assert data.shape == (3, 32, 32) and data.levels == 256 and len(data) == 1950
    assert data.class_names == ["china", "flower"] and data.labels is not None
    assert np.bincount(data.labels).tolist() == [975, 975]
    small = datasets.load("patches:sklearn?size=16&stride=16&scale=2&limit=5")
    assert small.shape == (3, 16, 16) and len(small) == 5
    assert datasets.load("patches:sklearn?stride=64").values.dtype == np.uint8
    regions = datasets.load("patches:sklearn?grid=3")
    assert regions.num_classes == 18 and regions.class_names[:2] == ["china-0-0", "china-0-1"]
    assert regions.labels is not None and set(regions.labels.tolist()) == set(range(18))


def test_patches_of_a_folder_and_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("b", "a"):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    data = datasets.load(f"patches:{tmp_path}?size=16&stride=8")
    assert data.class_names == ["a", "b"] and len(data) == 2 * 4 * 5
    with pytest.raises(InvalidArgument, match="smaller than 64"):
        datasets.load(f"patches:{tmp_path}?size=64")
    with pytest.raises(InvalidArgument, match="once shrunk by 1000"):
        datasets.load("patches:sklearn?scale=1000")
    (tmp_path / "c.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="unreadable image"):
        datasets.load(f"patches:{tmp_path}")
    with pytest.raises(DataError, match="not a directory"):
        datasets.load(f"patches:{tmp_path / 'missing'}")
    with pytest.raises(InvalidArgument, match="unknown options"):
        datasets.load("patches:sklearn?colour=1")
