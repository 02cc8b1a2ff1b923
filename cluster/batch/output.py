"""Where a batch job writes: a local directory (a path or ``file://`` URI, on storage every
worker mounts) or an object store (``s3://``, ``gs://``, ``abfs://``, ``hdfs://`` through
``pyarrow.fs``).

The commit protocol is "a file is complete iff it exists under its final name":
- local: written to ``.<name>.tmp-XXXX`` in the same directory, fsynced, renamed;
- object store: there is no rename, but an object becomes visible only when its upload
  completes (one PUT, or a completed multipart upload), so it is written under its final
  key directly and no temporary is ever left behind.

S3 settings come from the URI's query (``?endpoint_override=host:port&scheme=http&region=``,
as ``pyarrow.fs.S3FileSystem.from_uri`` reads them) and credentials from the standard
environment (``AWS_ACCESS_KEY_ID`` ..., on every node).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from services.core.errors import InvalidArgument

T = TypeVar("T")
OBJECT_STORES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs")


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Output:
    """A job's output location; paths below it are '/'-separated relative names."""

    def __init__(self, out: str) -> None:
        self.out = out
        parsed = urlparse(out)
        self.scheme = parsed.scheme
        if parsed.scheme in ("", "file"):
            path = Path(parsed.path if parsed.scheme == "file" else out).expanduser()
            if not out.strip() or not str(path):
                raise InvalidArgument("out", "give an output directory or URI")
            self.local: Path | None = path
            return
        if parsed.scheme not in OBJECT_STORES:
            raise InvalidArgument("out", f"{parsed.scheme}:// outputs are not supported; give a "
                                         f"directory, file://, or one of "
                                         f"{', '.join(s + '://' for s in OBJECT_STORES)}")
        if not parsed.netloc or not parsed.path.strip("/"):
            raise InvalidArgument("out", f"{out}: give a bucket and a prefix "
                                         f"({parsed.scheme}://BUCKET/PREFIX)")
        self.local = None
        self._store: tuple[Any, str] | None = None  # (pyarrow filesystem, bucket/prefix)

    @property
    def _fs(self) -> Any:
        return self._connect()[0]

    @property
    def _root(self) -> str:
        return self._connect()[1]

    def _connect(self) -> tuple[Any, str]:
        """The object store's filesystem, made on first use: checking a URI's form
        (``BatchRequest.validate``) needs no network, while pyarrow's S3 resolves the bucket's
        region when it is made."""
        if self._store is None:
            from pyarrow import fs

            try:
                filesystem, root = fs.FileSystem.from_uri(self.out)
            except (ValueError, OSError) as exc:
                raise InvalidArgument("out", f"{self.out}: {exc}") from exc
            self._store = (filesystem, root.rstrip("/"))
        return self._store

    def __str__(self) -> str:
        return str(self.local) if self.local is not None else self._display()

    def _display(self) -> str:
        parsed = urlparse(self.out)
        return f"{parsed.scheme}://{parsed.netloc}{parsed.path}"  # without the query

    def uri(self, rel: str = "") -> str:
        """A URI for ``rel`` (the output itself when empty), for clients and manifests."""
        if self.local is not None:
            return (self.local.resolve() / rel).as_uri() if rel else self.local.resolve().as_uri()
        return f"{self._display().rstrip('/')}/{rel}" if rel else self._display()

    # ----------------------------------------------------------------- reading
    def exists(self, rel: str) -> bool:
        if self.local is not None:
            return (self.local / rel).exists()
        from pyarrow import fs

        return bool(self._fs.get_file_info(f"{self._root}/{rel}").type == fs.FileType.File)

    def read(self, rel: str) -> bytes:
        if self.local is not None:
            return (self.local / rel).read_bytes()
        with self._fs.open_input_stream(f"{self._root}/{rel}") as f:
            return bytes(f.read())

    def files(self, sub: str) -> set[str]:
        """The complete files below ``sub`` (relative names; one listing, not one request
        per file)."""
        if self.local is not None:
            base = self.local / sub
            return {p.relative_to(self.local).as_posix() for p in base.rglob("*")
                    if p.is_file() and not p.name.startswith(".")} if base.is_dir() else set()
        from pyarrow import fs

        entries = self._fs.get_file_info(fs.FileSelector(f"{self._root}/{sub}",
                                                         allow_not_found=True, recursive=True))
        return {e.path[len(self._root) + 1:] for e in entries if e.type == fs.FileType.File}

    def check_container(self) -> bool:
        """Whether the output exists and has entries; raises when it is not a directory
        (locally) or the store cannot be reached (wrong endpoint, credentials, bucket)."""
        if self.local is not None:
            if self.local.exists() and not self.local.is_dir():
                raise InvalidArgument("out", f"{self.local} is a file, not a directory")
            return self.local.exists() and any(self.local.iterdir())
        from pyarrow import fs

        bucket = self._root.split("/", 1)[0]
        if self._call(lambda: self._fs.get_file_info(bucket).type) == fs.FileType.NotFound:
            raise InvalidArgument("out", f"{self}: bucket {bucket!r} does not exist")
        entries = self._call(lambda: self._fs.get_file_info(
            fs.FileSelector(self._root, allow_not_found=True, recursive=False)))
        return bool(entries)

    # ----------------------------------------------------------------- writing
    def prepare(self) -> None:
        if self.local is not None:
            self.local.mkdir(parents=True, exist_ok=True)

    def write(self, rel: str, data: bytes) -> None:
        """Make ``rel`` hold ``data``, visible only once complete."""
        if self.local is not None:
            atomic_write(self.local / rel, data)
            return

        with self._fs.open_output_stream(f"{self._root}/{rel}") as f:
            f.write(data)

    def remove_temporaries(self) -> None:
        """Delete what an interrupted local write left (object stores leave nothing)."""
        if self.local is not None and self.local.exists():
            for path in self.local.rglob(".*.tmp-*"):
                path.unlink(missing_ok=True)

    def _call(self, fn: Callable[[], T]) -> T:
        """``fn()`` at planning time: an unreachable store (endpoint, credentials, bucket,
        which pyarrow reports as OSError) is the caller's error, before any work."""
        try:
            return fn()
        except OSError as exc:
            raise InvalidArgument("out", f"{self}: {exc}") from exc
