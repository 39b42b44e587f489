"""Run-directory I/O over pyarrow filesystems: the same calls for a local path, s3:// or gs://.

Cluster nodes share no disk, so every stage reads and writes through here. Writes of Parquet
parts are atomic (temp name, then move; on object stores a single PUT is atomic already), so a
crash never leaves a half-written part that a resume would trust.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from distill.errors import MissingInput
from distill.schema import PARQUET_OPTIONS


@dataclass(frozen=True)
class Location:
    fs: pafs.FileSystem
    path: str  # path inside `fs`
    uri: str  # what the user wrote (for messages and Ray Data)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def join(self, *parts: str) -> "Location":
        sep = "/" if not self.path.endswith("/") else ""
        tail = "/".join(parts)
        uri_sep = "/" if not self.uri.endswith("/") else ""
        return Location(self.fs, f"{self.path}{sep}{tail}", f"{self.uri}{uri_sep}{tail}")

    # --- queries
    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def list_files(self, suffix: str = "") -> list[str]:
        """Paths (inside fs) of files directly under this folder, sorted; [] if absent."""
        if not self.exists():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False))
        return sorted(
            i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix)
        )

    # --- text / json
    def read_text(self) -> str:
        with self.fs.open_input_stream(self.path) as f:
            return f.read().decode()

    def write_text(self, text: str) -> None:
        self.mkdir_parent()
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(text.encode())
        self.fs.move(tmp, self.path)

    def read_json(self) -> Any:
        return json.loads(self.read_text())

    def write_json(self, obj: Any) -> None:
        self.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")

    # --- folders
    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def mkdir_parent(self) -> None:
        parent = self.path.rsplit("/", 1)[0]
        if parent and parent != self.path:
            self.fs.create_dir(parent, recursive=True)

    def remove(self) -> None:
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path)

    # --- parquet
    def write_part(self, table: pa.Table, name: str) -> str:
        """Write `table` as `<this folder>/<name>.parquet`, atomically. Returns the path."""
        self.mkdir()
        final = f"{self.path}/{name}.parquet"
        tmp = f"{self.path}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
        pq.write_table(table, tmp, filesystem=self.fs, **PARQUET_OPTIONS)
        self.fs.move(tmp, final)
        return final

    def read_table(self, columns: list[str] | None = None) -> pa.Table:
        """All `*.parquet` parts of this folder as one table (empty folder: no rows)."""
        parts = self.list_files(".parquet")
        if not parts:
            raise MissingInput(f"no Parquet files under {self.uri}")
        tables = [pq.read_table(p, filesystem=self.fs, columns=columns) for p in parts]
        return pa.concat_tables(tables, promote_options="default")

    def parquet_bytes(self) -> int:
        return sum(self.fs.get_file_info(p).size for p in self.list_files(".parquet"))


def hash64(texts, count: int):
    """An 8-byte blake2b hash per string, as a uint64 array: what content keys and the
    completeness check hold instead of the rows themselves."""
    import hashlib

    import numpy as np

    return np.fromiter((int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little")
                        for t in texts), dtype=np.uint64, count=count)


_DIGESTS: dict[tuple, str] = {}


def tree_digest(loc: Location) -> str:
    """Content hash of a file, or of every file under a folder (paths relative, sorted). Memoised
    per process on the listing (path, size, mtime), since stage keys ask for it repeatedly."""
    import hashlib

    info = loc.fs.get_file_info(loc.path)
    if info.type == pafs.FileType.NotFound:
        raise MissingInput(f"{loc.uri} does not exist")
    files = [info] if info.type == pafs.FileType.File else sorted(
        (i for i in loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
         if i.type == pafs.FileType.File and not i.base_name.startswith((".", "_"))), key=lambda i: i.path)
    listing = tuple((f.path, f.size, f.mtime_ns) for f in files)
    if (loc.uri, listing) not in _DIGESTS:
        h = hashlib.sha256()
        for f in files:
            h.update(f.path.removeprefix(loc.path).encode())
            with loc.fs.open_input_stream(f.path) as stream:
                while chunk := stream.read(1 << 22):
                    h.update(chunk)
        _DIGESTS[(loc.uri, listing)] = h.hexdigest()[:16]
    return _DIGESTS[(loc.uri, listing)]


UPLOAD_COMPLETE = ".complete"


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local folder to a folder URI (replacing it): how a model reaches object storage."""
    dest = locate(uri)
    dest.remove()
    dest.mkdir()
    pafs.copy_files(local_dir, dest.path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=dest.fs)
    dest.join(UPLOAD_COMPLETE).write_text("")  # last: a half-finished upload has no marker


def download_dir(uri: str, cache_root: str) -> str:
    """A node-local copy of a folder URI (a model on object storage), cached by URI and file listing;
    returns its path.
    Engines (vLLM, transformers) load from local disk, and cluster nodes share none."""
    import hashlib

    from filelock import FileLock

    src = locate(uri)
    if not src.exists():
        raise MissingInput(f"{uri} does not exist")
    # keyed by the listing too: a retrained model at the same URI is fetched again
    files = src.fs.get_file_info(pafs.FileSelector(src.path, recursive=True))
    listing = sorted((f.path, f.size, f.mtime_ns) for f in files if f.type == pafs.FileType.File)
    key = hashlib.sha256(json.dumps([uri, listing]).encode()).hexdigest()[:16]
    target = os.path.join(cache_root, key)
    os.makedirs(cache_root, exist_ok=True)
    with FileLock(target + ".lock"):
        marker = os.path.join(target, ".complete")
        if not os.path.exists(marker):
            import shutil

            partial = target + ".part"
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
            pafs.copy_files(src.path, partial, source_filesystem=src.fs,
                            destination_filesystem=pafs.LocalFileSystem())
            shutil.rmtree(target, ignore_errors=True)
            os.replace(partial, target)
            open(marker, "w").close()
    return target


def locate(uri: str) -> Location:
    """Location for a local path or a filesystem URI (s3://, gs://, file://)."""
    if "://" in uri and not uri.startswith("file://"):
        fs, path = pafs.FileSystem.from_uri(uri)
        return Location(fs, path.rstrip("/"), uri.rstrip("/"))
    local = os.path.abspath(uri.removeprefix("file://"))
    return Location(pafs.LocalFileSystem(), local, local)
