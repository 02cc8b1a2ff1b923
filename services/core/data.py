"""Datasets: loaders for the formats genfleet trains on, and a deterministic split.

A data spec names the source: ``digits`` (scikit-learn's bundled 8x8 digits, the
default, no download), ``mnist:DIR_OR_IMAGES_FILE``, ``cifar10:DIR``, ``folder:DIR``,
``npz:FILE``, ``text:FILE`` or ``patches:SOURCE``, optionally followed by
``?key=value&...`` options:

- ``folder``: ``size`` (resize to size x size), ``mode`` (``L`` grey or ``RGB``).
- ``patches``: square RGB crops of photographs: ``SOURCE`` is ``sklearn`` (the two sample
  photographs scikit-learn ships) or a directory of images; ``size`` (default 32),
  ``stride`` (default size / 2), ``scale`` (shrink each photo by this factor first,
  default 1), ``grid`` (default 1). A crop's label is the photograph it comes from and,
  with ``grid`` G > 1, the cell of a G x G division of it that holds the crop's centre.
- ``npz``: ``x`` / ``y`` (array names, default ``x`` and ``y``), ``levels``.
- ``text``: ``seq_len`` (characters per example, default 64).
- any: ``limit`` (keep the first N examples).

Every loader returns integer data (levels) so that likelihoods are of discrete data; a
missing, malformed or truncated file raises ``DataError`` naming the file.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl

import numpy as np

from services.core.errors import DataError, InvalidArgument

Kind = Literal["image", "text"]


@dataclass
class Dataset:
    """Integer data with optional labels.

    Attributes:
        values: ``(N, C, H, W)`` image levels in ``[0, levels)`` or ``(N, L)`` token ids.
        labels: ``(N,)`` int64 class ids, or None.
        levels: number of discrete values per dimension (vocabulary size for text).
        class_names: one name per class (empty without labels).
        kind: ``image`` or ``text``.
        vocab: for text, the character of each token id.
        name: the spec it was loaded from.
    """

    values: np.ndarray
    labels: np.ndarray | None
    levels: int
    class_names: list[str] = field(default_factory=list)
    kind: Kind = "image"
    vocab: str = ""
    name: str = ""

    def __post_init__(self) -> None:
        self.values = np.ascontiguousarray(self.values)
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if self.labels.shape != (len(self.values),):
                raise DataError(self.name, "labels and data have different lengths")

    def __len__(self) -> int:
        return len(self.values)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one example."""
        return tuple(self.values.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.labels is not None else 0

    def subset(self, index: np.ndarray) -> Dataset:
        labels = None if self.labels is None else self.labels[index]
        return Dataset(self.values[index], labels, self.levels, self.class_names, self.kind,
                       self.vocab, self.name)

    def as_float(self) -> np.ndarray:
        """Images as float32 in [0, 1] (level / (levels - 1)); text stays as token ids."""
        if self.kind == "text":
            return self.values.astype(np.int64)
        return self.values.astype(np.float32) / (self.levels - 1)

    def fingerprint(self) -> str:
        """A short hash of the data and labels (keys caches such as the eval classifier)."""
        h = hashlib.sha256(self.values.tobytes())
        h.update(str(self.values.shape).encode())
        if self.labels is not None:
            h.update(self.labels.tobytes())
        return h.hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """JSON-friendly description stored in checkpoint metadata."""
        return {
            "name": self.name,
            "kind": self.kind,
            "shape": list(self.shape),
            "levels": self.levels,
            "classes": self.class_names,
            "vocab": self.vocab,
            "size": len(self),
        }


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset


def split(data: Dataset, *, val: float = 0.05, test: float = 0.2, seed: int = 0) -> Splits:
    """Deterministic train/val/test split (a seeded permutation; same data, same split)."""
    if not (0 <= val < 1 and 0 < test < 1 and val + test < 1):
        raise InvalidArgument("split", "val and test fractions must leave a training set")
    n = len(data)
    order = np.random.default_rng(seed).permutation(n)
    n_test, n_val = max(1, round(n * test)), round(n * val)
    if n - n_test - n_val < 1:
        raise DataError(data.name, f"{n} examples are too few to split")
    return Splits(
        train=data.subset(np.sort(order[n_test + n_val:])),
        val=data.subset(np.sort(order[n_test:n_test + n_val])),
        test=data.subset(np.sort(order[:n_test])),
    )


# --------------------------------------------------------------------------- loaders
def load_digits() -> Dataset:
    """scikit-learn's bundled digits: 1797 images, 8x8, 17 levels (0..16), 10 classes."""
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    values = bunch.images.astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    return Dataset(values, bunch.target, 17, [str(i) for i in range(10)], name="digits")


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(path, f"cannot read: {exc.strerror or exc}") from exc
    if path.suffix == ".gz":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(path, f"not a valid gzip file ({exc})") from exc
    return raw


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST format), raw or gzip-compressed, as a uint8 array."""
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(path, "not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise DataError(path, f"unsupported IDX element type 0x{raw[2]:02x} (need uint8)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(path, "truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(path, f"truncated or padded: header says {expected} bytes of data, "
                              f"file has {len(raw) - header}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def load_mnist(path: Path) -> Dataset:
    """MNIST IDX files: a directory holding ``*images-idx3-ubyte[.gz]`` and the matching
    ``*labels-idx1-ubyte[.gz]`` (train and t10k are concatenated), or one images file."""
    if path.is_dir():
        image_files = sorted(path.glob("*images*idx3-ubyte*"))
        if not image_files:
            raise DataError(path, "no *images-idx3-ubyte[.gz] file in this directory")
    else:
        image_files = [path]
    images, labels = [], []
    for img_file in image_files:
        x = read_idx(img_file)
        if x.ndim != 3:
            raise DataError(img_file, f"expected (N, H, W) images, got shape {x.shape}")
        label_file = img_file.with_name(img_file.name.replace("images", "labels").replace("idx3", "idx1"))
        if label_file.exists():
            y = read_idx(label_file)
            if y.shape != (len(x),):
                raise DataError(label_file, f"{len(y)} labels for {len(x)} images")
            labels.append(y.astype(np.int64))
        images.append(x[:, None])
    y_all = np.concatenate(labels) if len(labels) == len(images) else None
    return Dataset(np.concatenate(images), y_all, 256,
                   [str(i) for i in range(10)] if y_all is not None else [], name=f"mnist:{path}")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10 batches only: plain containers and numpy arrays, no other code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_cifar_batch(path: Path) -> dict[bytes, Any]:
    try:
        with path.open("rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except OSError as exc:
        raise DataError(path, f"cannot read: {exc.strerror or exc}") from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise DataError(path, f"not a CIFAR-10 python batch ({exc})") from exc
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(path, "not a CIFAR-10 batch (needs 'data' and 'labels')")
    return batch


def load_cifar10(path: Path) -> Dataset:
    """CIFAR-10 python batches: ``data_batch_*`` and ``test_batch`` in a directory."""
    files = sorted(path.glob("data_batch_*")) + sorted(path.glob("test_batch"))
    if not files:
        raise DataError(path, "no data_batch_* or test_batch files in this directory")
    images, labels = [], []
    for f in files:
        batch = _load_cifar_batch(f)
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        y = np.asarray(batch[b"labels"], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3072 or len(y) != len(data):
            raise DataError(f, f"expected (N, 3072) data and N labels, got {data.shape}, {len(y)}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(y)
    names = [str(i) for i in range(10)]
    meta = path / "batches.meta"
    if meta.exists():
        raw = _load_cifar_batch_meta(meta)
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in raw]
    return Dataset(np.concatenate(images), np.concatenate(labels), 256, names,
                   name=f"cifar10:{path}")


def _load_cifar_batch_meta(path: Path) -> list[Any]:
    try:
        with path.open("rb") as f:
            meta = _ArrayUnpickler(f, encoding="bytes").load()
        return list(meta[b"label_names"])
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError) as exc:
        raise DataError(path, f"not a CIFAR-10 batches.meta file ({exc})") from exc


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def load_image_folder(path: Path, *, size: int | None = None, mode: str = "L") -> Dataset:
    """Images under ``path/<class name>/``; every image resized to ``size`` if given."""
    from PIL import Image, UnidentifiedImageError

    if mode not in ("L", "RGB"):
        raise InvalidArgument("mode", "must be L or RGB")
    if not path.is_dir():
        raise DataError(path, "not a directory")
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise DataError(path, "no class sub-folders")
    images: list[np.ndarray] = []
    labels: list[int] = []
    for k, name in enumerate(classes):
        for file in sorted((path / name).iterdir()):
            if file.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as opened:
                    im = opened.convert(mode)
                if size is not None:
                    im = im.resize((size, size), Image.Resampling.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
            except (UnidentifiedImageError, Image.DecompressionBombError, OSError,
                    SyntaxError) as exc:
                raise DataError(file, f"unreadable image ({exc})") from exc
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            if images and arr.shape != images[0].shape:
                raise DataError(file, f"size {arr.shape} differs from {images[0].shape}; "
                                      "pass ?size=N to resize")
            images.append(arr)
            labels.append(k)
    if not images:
        raise DataError(path, "no images found")
    return Dataset(np.stack(images), np.array(labels), 256, classes, name=f"folder:{path}")


def load_patches(source: str, *, size: int = 32, stride: int | None = None,
                 scale: int = 1, grid: int = 1) -> Dataset:
    """``size`` x ``size`` RGB crops every ``stride`` pixels of each photograph, labelled
    by the photograph and, with ``grid`` > 1, by which cell of a ``grid`` x ``grid``
    division of it the crop's centre lies in (a finer task for a feature classifier);
    ``source``: ``sklearn`` or a directory of images."""
    from PIL import Image, UnidentifiedImageError

    stride = stride or max(1, size // 2)
    if size < 2 or stride < 1 or scale < 1 or grid < 1:
        raise InvalidArgument("data", "patches: size >= 2 and stride, scale, grid >= 1 required")
    photos: list[tuple[str, np.ndarray]] = []
    if source == "sklearn":
        from sklearn.datasets import load_sample_images

        bunch = load_sample_images()
        photos = [(Path(f).stem, np.asarray(im)) for f, im in
                  zip(bunch.filenames, bunch.images, strict=True)]
    else:
        directory = Path(source).expanduser()
        if not directory.is_dir():
            raise DataError(directory, "not a directory (patches: takes sklearn or a folder)")
        for file in sorted(directory.iterdir()):
            if file.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as opened:
                    photos.append((file.stem, np.asarray(opened.convert("RGB"))))
            except (UnidentifiedImageError, Image.DecompressionBombError, OSError,
                    SyntaxError) as exc:
                raise DataError(file, f"unreadable image ({exc})") from exc
        if not photos:
            raise DataError(directory, "no images found")
    crops: list[np.ndarray] = []
    labels: list[int] = []
    for k, (_, photo) in enumerate(photos):
        if scale > 1:
            h, w = photo.shape[0] // scale, photo.shape[1] // scale
            if min(h, w) < size:
                continue  # too small for one crop once shrunk
            photo = np.asarray(Image.fromarray(photo).resize((w, h), Image.Resampling.BOX))
        chw = photo.transpose(2, 0, 1)  # (3, H, W)
        height, width = chw.shape[1:]
        for top in range(0, height - size + 1, stride):
            for left in range(0, width - size + 1, stride):
                crops.append(chw[:, top:top + size, left:left + size])
                row = min(grid - 1, (top + size // 2) * grid // height)
                col = min(grid - 1, (left + size // 2) * grid // width)
                labels.append(k * grid * grid + row * grid + col)
    if not crops:
        raise InvalidArgument("data", f"patches: every photograph is smaller than {size} px"
                                      + (f" once shrunk by {scale}" if scale > 1 else ""))
    names = [name if grid == 1 else f"{name}-{r}-{c}" for name, _ in photos
             for r in range(grid) for c in range(grid)]
    return Dataset(np.stack(crops).astype(np.uint8), np.array(labels), 256, names,
                   name=f"patches:{source}")


def load_npz(path: Path, *, x: str = "x", y: str = "y", levels: int | None = None) -> Dataset:
    """Arrays from an ``.npz``: images ``(N, H, W)`` or ``(N, C, H, W)`` of integer levels."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if x not in f:
                raise DataError(path, f"no array named {x!r} (has {sorted(f.files)})")
            values = f[x]
            labels = f.get(y, None)
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(path, f"not a readable .npz file ({exc})") from exc
    if values.ndim == 3:
        values = values[:, None]
    if values.ndim != 4 or not np.issubdtype(values.dtype, np.integer):
        raise DataError(path, f"{x!r} must be integer (N, [C,] H, W), got {values.dtype} {values.shape}")
    if values.min() < 0:
        raise DataError(path, f"{x!r} has negative values")
    top = int(values.max())
    levels = levels or (256 if values.dtype == np.uint8 else top + 1)
    if top >= levels:
        raise DataError(path, f"values reach {top} but levels={levels}")
    names: list[str] = []
    if labels is not None:
        labels = labels.astype(np.int64).reshape(-1)
        if len(labels) != len(values):
            raise DataError(path, f"{len(labels)} labels for {len(values)} examples")
        names = [str(i) for i in range(int(labels.max()) + 1)]
    return Dataset(values, labels, levels, names, name=f"npz:{path}")


def load_text(path: Path, *, seq_len: int = 64) -> Dataset:
    """A UTF-8 text file, character level, cut into non-overlapping ``seq_len`` windows."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise DataError(path, f"cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not valid UTF-8 at byte {exc.start}") from exc
    if seq_len < 2:
        raise InvalidArgument("seq_len", "must be at least 2")
    n = len(text) // seq_len
    if n < 2:
        raise DataError(path, f"{len(text)} characters: too short for seq_len={seq_len}")
    vocab = "".join(sorted(set(text)))
    index = {c: i for i, c in enumerate(vocab)}
    ids = np.fromiter((index[c] for c in text[: n * seq_len]), dtype=np.int64, count=n * seq_len)
    return Dataset(ids.reshape(n, seq_len), None, len(vocab), kind="text", vocab=vocab,
                   name=f"text:{path}")


def decode_text(tokens: np.ndarray, vocab: str) -> list[str]:
    """Token ids ``(B, L)`` -> strings."""
    return ["".join(vocab[int(t)] for t in row) for row in tokens]


def _int_option(opts: dict[str, str], key: str) -> int | None:
    if key not in opts:
        return None
    try:
        return int(opts.pop(key))
    except ValueError:
        raise InvalidArgument(f"data.{key}", "must be an integer") from None


_KINDS = ("digits", "mnist", "cifar10", "folder", "npz", "text", "patches")


def load(spec: str = "digits") -> Dataset:
    """Load a dataset from a spec string (see the module docstring).

    Raises:
        InvalidArgument: an unknown kind or option.
        DataError: a file is missing, malformed or truncated.
    """
    base, _, query = spec.partition("?")
    kind, _, location = base.partition(":")
    opts = dict(parse_qsl(query, keep_blank_values=True))
    limit = _int_option(opts, "limit")
    path = Path(location).expanduser()
    if kind not in _KINDS:
        raise InvalidArgument(
            "data", f"unknown data kind {kind!r}; use digits, mnist:, cifar10:, folder:, npz:, text:, "
                    f"patches:"
        )
    if kind != "digits" and not location:
        raise InvalidArgument("data", f"{kind}: needs a path, e.g. {kind}:/data/{kind}")
    if kind not in ("digits", "patches") and not path.exists():
        raise DataError(path, "no such file or directory")
    data: Dataset
    if kind == "digits":
        data = load_digits()
    elif kind == "mnist":
        data = load_mnist(path)
    elif kind == "cifar10":
        data = load_cifar10(path)
    elif kind == "folder":
        data = load_image_folder(path, size=_int_option(opts, "size"), mode=opts.pop("mode", "L"))
    elif kind == "npz":
        data = load_npz(path, x=opts.pop("x", "x"), y=opts.pop("y", "y"),
                        levels=_int_option(opts, "levels"))
    elif kind == "text":
        data = load_text(path, seq_len=_int_option(opts, "seq_len") or 64)
    elif kind == "patches":
        data = load_patches(location, size=_int_option(opts, "size") or 32,
                            stride=_int_option(opts, "stride"), scale=_int_option(opts, "scale") or 1,
                            grid=_int_option(opts, "grid") or 1)
    else:
        raise InvalidArgument(
            "data", f"unknown data kind {kind!r}; use digits, mnist:, cifar10:, folder:, npz:, text:, "
                    f"patches:"
        )
    if opts:
        raise InvalidArgument("data", f"unknown options {sorted(opts)} for {kind}")
    if limit is not None:
        data = data.subset(np.arange(min(limit, len(data))))
    data.name = spec
    return data


def to_pngs(samples: np.ndarray, levels: int) -> list[bytes]:
    """Images ``(N, C, H, W)`` with values in [0, 1] -> one 8-bit PNG each.

    Values are first rounded to the model's ``levels`` (what it generates), then spread
    over 0..255; the one PNG encoder of the serving path and of batch datasets.
    """
    from PIL import Image

    ints = np.rint(samples.astype(np.float64) * (levels - 1))
    scaled = np.round(ints * 255.0 / (levels - 1)).astype(np.uint8)  # (N, C, H, W)
    out: list[bytes] = []
    for img in scaled:
        pil = Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))
        buf = io.BytesIO()
        pil.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out
